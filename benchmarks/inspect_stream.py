"""`drpo inspect --model` memory on a large file: streamed (drpo) vs holding every row, and vs a 10× smaller file.

    python benchmarks/inspect_stream.py                    # 0.1 GB and 0.01 GB files, written once under /tmp
    python benchmarks/inspect_stream.py --size-gb 2        # read_large.py's 2 GB (hours on a CPU: ~13k tokens/s)

The files are benchmarks/read_large.py's (Arrow IPC stream, 128 prompt + 256..2047 response tokens
per row, reward + group_id advantages) with token ids below 256, so that a tiny model (seeded, random
weights, vocabulary 256) keeps the model's share of the time small: what is measured is the audit's
memory. Each measurement is its own process; its peak RSS is the child's ru_maxrss. Printed side by
side: the whole `drpo inspect --model` on the large and the small file (the ratio is the memory's
growth with the file: 1.0 is flat), and, for scale, what the rows alone take when loaded whole
(`rollouts.load_rows`, what model-mode inspect held before it streamed). The smallest file is one of
read_large's record batches (1,024 rows, about 10 MB). Under glibc, RSS drifts up by some tens of MB
over the first record batches as malloc's dynamic mmap threshold rises (heap fragmentation, not held
data); MALLOC_MMAP_THRESHOLD_=65536 in the environment pins it and keeps RSS flat, at some speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import read_large

VOCAB = 256


def make_model(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096)
    LlamaForCausalLM(config).save_pretrained(path)


def child(argv: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS MB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{err[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def load_all(path: str) -> None:
    from drpo_cli.rollouts.rows import load_rows

    rows = load_rows(path)
    print(rows.num_tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=0.1, help="the large file's size; the small one is 10× smaller")
    ap.add_argument("--dir", default="/tmp/drpo_inspect_stream", help="where the files and the model are kept")
    ap.add_argument("--micro-batch-tokens", type=int, default=65536)
    ap.add_argument("--load-all", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_all:
        load_all(args.load_all)
        return
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    model = root / "model"
    if not (model / "config.json").exists():
        make_model(model)
    sizes = {"large": args.size_gb, "small": args.size_gb / 10}
    files = {}
    for name, gb in sizes.items():
        files[name] = str(root / f"rollouts-{gb:g}gb.arrow")
        if not os.path.exists(files[name]):
            read_large.write_file(files[name], gb, vocab=VOCAB)
    results = {}
    for name, path in files.items():
        report = root / f"{name}.json"
        seconds, rss = child([sys.executable, "-m", "drpo_cli", "inspect", path, "--model", str(model), "--quiet",
                              "--device", "cpu", "--micro-batch-tokens", str(args.micro_batch_tokens),
                              "--json", str(report), "--overwrite"])
        tokens = json.loads(report.read_text())["model"]["tokens"]
        _, rows_rss = child([sys.executable, __file__, "--load-all", path])
        results[name] = {"gb": os.path.getsize(path) / 1e9, "tokens": tokens, "seconds": seconds, "rss": rss,
                         "rows_rss": rows_rss}
    large, small = results["large"], results["small"]
    print(f"drpo inspect --model (tiny model, vocabulary {VOCAB}), micro-batch tokens {args.micro_batch_tokens}")
    print(f"{'':34}{'small file':>14}{'large file':>14}{'large / small':>15}")
    print(f"{'file size (GB)':34}{small['gb']:>14.2f}{large['gb']:>14.2f}{large['gb'] / small['gb']:>15.2f}")
    print(f"{'trained tokens audited (M)':34}{small['tokens'] / 1e6:>14.1f}{large['tokens'] / 1e6:>14.1f}"
          f"{large['tokens'] / small['tokens']:>15.2f}")
    print(f"{'inspect --model peak RSS (MB)':34}{small['rss']:>14.0f}{large['rss']:>14.0f}"
          f"{large['rss'] / small['rss']:>15.2f}")
    print(f"{'inspect --model seconds':34}{small['seconds']:>14.1f}{large['seconds']:>14.1f}"
          f"{large['seconds'] / small['seconds']:>15.2f}")
    print(f"{'rows loaded whole: peak RSS (MB)':34}{small['rows_rss']:>14.0f}{large['rows_rss']:>14.0f}"
          f"{large['rows_rss'] / small['rows_rss']:>15.2f}")
    print(f"streamed inspect on the large file: {large['rss'] / large['rows_rss']:.2f}× the memory of its rows "
          f"loaded whole; {large['tokens'] / large['seconds'] / 1e6:.2f} M tokens/s")


if __name__ == "__main__":
    main()
