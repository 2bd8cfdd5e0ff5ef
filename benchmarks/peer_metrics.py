"""What the peers' mismatch metrics (SPEC.md §2) cost `drpo inspect --model`: time and peak memory against the same
audit without them (the code at `--base`), in one run.

    python benchmarks/peer_metrics.py                      # base: git merge-base HEAD main
    python benchmarks/peer_metrics.py --base 0fa867c --repeats 5

The file is the first `--rows` rows of read_large.py's (128 prompt + 256..2047 response tokens per row,
reward + group_id) with token ids below the vocabulary; the model a seeded random Llama with a 32k vocabulary (hidden 256, 2 layers), so that the
output head weighs per token as a small real model's does (a tiny-vocabulary model would make the per-token
statistics look expensive beside a forward that costs nothing). The base tree is `git archive REV` unpacked under
--dir; each audit is its own process (peak RSS: the child's ru_maxrss), base and current alternate, and the
fastest of `--repeats` runs of each is compared.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import read_large

VOCAB = 32000


def make_model(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)
    LlamaForCausalLM(config).save_pretrained(path)


def child(tree: Path, argv: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS MB) of `python -m drpo_cli argv` run from the source tree `tree`."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "drpo_cli", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)})
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{tree}: drpo {' '.join(argv)} failed:\n{err[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="the revision without the metrics (default: git merge-base HEAD main)")
    ap.add_argument("--rows", type=int, default=48, help="rows of the file (about 1,150 response tokens each)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/drpo_peer_metrics")
    args = ap.parse_args()
    base = args.base or subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=ROOT, check=True,
                                       capture_output=True, text=True).stdout.strip()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    tree = root / f"base-{base}"
    if not tree.is_dir():
        tree.mkdir()
        archive = subprocess.run(["git", "archive", base, "drpo_cli"], cwd=ROOT, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    model = root / "model"
    if not (model / "config.json").exists():
        make_model(model)
    path = str(root / f"rollouts-{args.rows}rows.arrow")
    if not os.path.exists(path):  # the first rows of one of read_large's record batches
        import pyarrow as pa

        whole = str(root / "batch.arrow")
        read_large.write_file(whole, 0.0001, vocab=VOCAB)
        with pa.OSFile(whole) as fh:
            table = pa.ipc.open_stream(fh).read_all().slice(0, args.rows)
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    argv = ["inspect", path, "--model", str(model), "--quiet", "--device", "cpu"]
    runs: dict[str, list[tuple[float, float]]] = {"base": [], "current": []}
    for _ in range(args.repeats):
        for name, where in (("base", tree), ("current", ROOT)):
            runs[name].append(child(where, argv))
    (b_s, b_rss), (c_s, c_rss) = (min(runs[n]) for n in ("base", "current"))
    print(f"drpo inspect --model, {args.rows} rows, random Llama (vocabulary {VOCAB}, hidden 256, 2 layers), "
          f"fastest of {args.repeats}; base {base}")
    print(f"{'':28}{'base':>10}{'current':>10}{'current / base':>16}")
    print(f"{'seconds':28}{b_s:>10.2f}{c_s:>10.2f}{c_s / b_s:>16.3f}")
    print(f"{'peak RSS (MB)':28}{b_rss:>10.0f}{c_rss:>10.0f}{c_rss / b_rss:>16.3f}")


if __name__ == "__main__":
    main()
