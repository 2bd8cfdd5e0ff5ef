"""What the peers' mismatch metrics (SPEC.md §2) cost `drpo inspect --model`: time and peak memory against the same
audit without them (the code at `--base`), in one run.

    python benchmarks/peer_metrics.py                      # base: git merge-base HEAD main
    python benchmarks/peer_metrics.py --base 0fa867c --repeats 5 --profile

The file is the first `--rows` rows of read_large.py's (128 prompt + 256..2047 response tokens per row,
reward + group_id) with token ids below the vocabulary; the model a seeded random Llama with a 32k vocabulary
(hidden 256, 2 layers), so that the output head weighs per token as a small real model's does (a tiny-vocabulary
model would make the per-token statistics look expensive beside a forward that costs nothing). The base tree is
`git archive REV` unpacked under --dir; each audit is its own process (CPU seconds: the child's user + system
time; peak RSS: its ru_maxrss). Base and current run in pairs, the order alternating from pair to pair, so that
both see the same load on a shared machine; the ratios are per pair (current / base), reported as their minimum
and median, beside each side's own minimum and median. On a machine shared with other jobs the wall time swings
by tens of percent from run to run and torch's intra-op threads spin while they wait for a core (a few-thousand-
element op can take milliseconds): `--threads 1` (OMP_NUM_THREADS for the children) makes CPU seconds a measure
of the work done. `--profile` adds one cProfile run of each tree and splits its audit's time into the model's log-probs,
the Diagnostics accumulator, the worst sequences' per-row sums and traces, the μ–π picture and the rest.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import read_large

VOCAB = 32000
# (label, file name ending, function name) of the profile's parts; their cumulative times are inside audit_model's.
PARTS = (("model log-probs", "inspect_model.py", "_logprobs"), ("Diagnostics.update", "divergence.py", "update"),
         ("worst sequences (row sums, traces)", "inspect_model.py", "add"),  # _Chunk.add and _Worst.add
         ("μ–π picture", "histograms.py", "update"),
         ("token_diagnostics outside update", "divergence.py", "token_diagnostics"))


def make_model(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)
    LlamaForCausalLM(config).save_pretrained(path)


def child(tree: Path, argv: list[str], env: dict, prefix: tuple[str, ...] = ()) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS MB) of `python [prefix] -m drpo_cli argv` run from the source tree `tree`."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *prefix, "-m", "drpo_cli", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=tree,
                            env={**os.environ, **env, "PYTHONPATH": str(tree)})
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{tree}: drpo {' '.join(argv)} failed:\n{err[-3000:]}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def profile_parts(path: Path) -> tuple[float, dict[str, float]]:
    """(audit_model's cumulative seconds, {part: cumulative seconds}) of a cProfile output."""
    import pstats

    stats = pstats.Stats(str(path)).stats  # {(file, line, name): (calls, primitive, tottime, cumtime, callers)}
    total, parts = 0.0, {}
    for (file, _, name), (_, _, _, cumtime, callers) in stats.items():
        if file.endswith("inspect_model.py") and name == "audit_model":
            total += cumtime
        for label, ending, function in PARTS:
            if file.endswith(ending) and name == function:
                if function == "token_diagnostics":  # only the calls that update does not make
                    cumtime = sum(c[3] for (f, _, n), c in callers.items() if n != "update")
                parts[label] = parts.get(label, 0.0) + cumtime
    return total, parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="the revision without the metrics (default: git merge-base HEAD main)")
    ap.add_argument("--rows", type=int, default=48, help="rows of the file (about 1,150 response tokens each)")
    ap.add_argument("--repeats", type=int, default=3, help="pairs of runs (base, current)")
    ap.add_argument("--profile", action="store_true", help="also one cProfile run of each tree, split into parts")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the audits (default: torch's own choice)")
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
    trees = {"base": tree, "current": ROOT}
    env = {} if args.threads is None else {"OMP_NUM_THREADS": str(args.threads)}
    runs: dict[str, list[tuple[float, float, float]]] = {"base": [], "current": []}
    for i in range(args.repeats):
        for name in ("base", "current") if i % 2 == 0 else ("current", "base"):
            runs[name].append(child(trees[name], argv, env))
    threads = "torch's default threads" if args.threads is None else f"OMP_NUM_THREADS={args.threads}"
    print(f"drpo inspect --model, {args.rows} rows, random Llama (vocabulary {VOCAB}, hidden 256, 2 layers), "
          f"{threads}, {args.repeats} pairs of runs, order alternating; base {base}")
    print(f"{'':16}{'base min':>10}{'median':>10}{'current min':>13}{'median':>10}"
          f"{'current / base per pair: min':>30}{'median':>10}")
    for j, (label, digits) in enumerate((("wall seconds", 2), ("CPU seconds", 2), ("peak RSS (MB)", 0))):
        b, c = ([r[j] for r in runs[n]] for n in ("base", "current"))
        ratios = [y / x for x, y in zip(b, c)]
        print(f"{label:16}{min(b):>10.{digits}f}{statistics.median(b):>10.{digits}f}{min(c):>13.{digits}f}"
              f"{statistics.median(c):>10.{digits}f}{min(ratios):>30.3f}{statistics.median(ratios):>10.3f}")
    if args.profile:
        print("\ncProfile, one run each: cumulative seconds inside audit_model (share of it)")
        profiles = {}
        for name in ("base", "current"):
            out = root / f"profile-{name}.out"
            child(trees[name], argv, env, ("-m", "cProfile", "-o", str(out)))
            profiles[name] = profile_parts(out)
        print(f"{'':34}{'base':>18}{'current':>18}")
        print(f"{'audit_model':34}" + "".join(f"{t:>10.2f} (100%)" for t, _ in profiles.values()))
        for label, _, _ in PARTS:
            cells = [(parts.get(label, 0.0), parts.get(label, 0.0) / total) for total, parts in profiles.values()]
            print(f"{label:34}" + "".join(f"{s:>10.2f} ({f:5.1%})" for s, f in cells))
        rest = [total - sum(parts.values()) for total, parts in profiles.values()]
        print(f"{'rest (model load, reading, ...)':34}" + "".join(
            f"{r:>10.2f} ({r / total:5.1%})" for r, (total, _) in zip(rest, profiles.values())))


if __name__ == "__main__":
    main()
