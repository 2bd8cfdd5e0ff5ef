"""Validate and stream a large rollout file: drpo's batch-streaming reader vs reading it whole.

    python benchmarks/read_large.py --size-gb 2            # writes /tmp/drpo_read_large.arrow once
    python benchmarks/read_large.py --path big.arrow       # reuses an existing file

The file is written in Arrow IPC stream format (what Hugging Face `datasets` writes) with int32 ids
and float32 log-probs, the usual logged types, so the canonical casts are part of the measurement.
Each way runs in its own process so that its peak RSS (getrusage ru_maxrss) is its own:
- streamed: validate_rollouts() then one pass over iter_batches(), as load_rows() reads;
- naive: pyarrow `read_all()` of the whole table, then the same checks on the in-memory table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa

ROWS_PER_BATCH = 1024
PROMPT_LEN = 128


def write_file(path: str, size_gb: float, seed: int = 0, vocab: int = 150_000) -> None:
    """Rows with 128 prompt tokens and 256..2047 response tokens (about 8 bytes per response token),
    token ids below `vocab`."""
    rng = np.random.default_rng(seed)
    schema = pa.schema([
        ("prompt_ids", pa.list_(pa.int32())), ("response_ids", pa.list_(pa.int32())),
        ("behavior_logprobs", pa.list_(pa.float32())), ("reward", pa.float32()), ("group_id", pa.int64()),
        ("sample_id", pa.string()), ("policy_version", pa.int64()),
    ], metadata={"drpo.schema_version": "1", "drpo.temperature": "1.0"})
    target, written, row = size_gb * 1e9, 0, 0
    tmp = path + ".partial"
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        while written < target:
            n = ROWS_PER_BATCH
            lengths = rng.integers(256, 2048, n)  # (n,)
            offsets = np.zeros(n + 1, dtype=np.int32)
            np.cumsum(lengths, out=offsets[1:])
            t = int(offsets[-1])
            p_off = np.arange(n + 1, dtype=np.int32) * PROMPT_LEN
            batch = pa.record_batch([
                pa.ListArray.from_arrays(p_off, rng.integers(0, vocab, n * PROMPT_LEN, dtype=np.int32)),
                pa.ListArray.from_arrays(offsets, rng.integers(0, vocab, t, dtype=np.int32)),
                pa.ListArray.from_arrays(offsets, -rng.exponential(1.0, t).astype(np.float32)),
                pa.array(rng.integers(0, 2, n).astype(np.float32)),
                pa.array(np.arange(row, row + n) // 8),  # groups of 8 samples
                pa.array([f"row-{i}" for i in range(row, row + n)]),
                pa.array(rng.integers(0, 4, n)),
            ], schema=schema)
            writer.write_batch(batch)
            written += batch.nbytes
            row += n
    os.replace(tmp, path)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_streamed(path: str) -> dict:
    from drpo_cli.rollouts.files import open_rollouts
    from drpo_cli.rollouts.validate import validate_rollouts

    source = open_rollouts(path)
    problems = validate_rollouts(source, limit=10)
    rows = tokens = 0
    for sb in source.iter_batches():  # the read that load_rows does after validating
        rows += sb.batch.num_rows
        tokens += len(sb.batch.column("response_ids").flatten())
    return {"rows": rows, "tokens": tokens, "problems": problems.total}


def run_naive(path: str) -> dict:
    from drpo_cli.rollouts import files, validate

    start = time.perf_counter()
    with pa.OSFile(path) as fh:
        table = pa.ipc.open_stream(fh).read_all()  # the whole file in memory
    read_seconds = time.perf_counter() - start
    source = files.open_rollouts(path)
    rf = source.files[0]
    out = validate.Problems(10)
    ids = validate.IdHashes()
    names = sorted(rf.fields, key=rf.fields.get)
    table = table.select([rf.fields[n] for n in names])
    rows = tokens = 0
    for raw in table.to_batches():
        batch, _ = files.canonical_batch(path, names, raw, rows)
        validate.check_batch(path, rows, batch, out, ids)
        rows += batch.num_rows
        tokens += len(batch.column("response_ids").flatten())
    return {"rows": rows, "tokens": tokens, "problems": out.total, "read_all_seconds": read_seconds}


def measure(path: str, mode: str) -> dict:
    start = time.perf_counter()
    result = run_streamed(path) if mode == "streamed" else run_naive(path)
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", default="/tmp/drpo_read_large.arrow", help="Rollout file to write or reuse.")
    ap.add_argument("--size-gb", type=float, default=2.0, help="Size of the file to write if it does not exist.")
    ap.add_argument("--rewrite", action="store_true", help="Write the file even if it exists.")
    ap.add_argument("--mode", choices=["streamed", "naive"], help=argparse.SUPPRESS)  # one measurement
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(measure(args.path, args.mode)))
        return
    if args.rewrite or not os.path.exists(args.path):
        start = time.perf_counter()
        write_file(args.path, args.size_gb)
        print(f"wrote {args.path} in {time.perf_counter() - start:.1f} s")
    size_gb = os.path.getsize(args.path) / 1e9
    results = {}
    for mode in ("streamed", "naive"):
        out = subprocess.run([sys.executable, __file__, "--path", args.path, "--mode", mode],
                             check=True, capture_output=True, text=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    s, n = results["streamed"], results["naive"]
    assert (s["rows"], s["tokens"], s["problems"]) == (n["rows"], n["tokens"], n["problems"])
    print(f"file: {args.path} ({size_gb:.2f} GB, IPC stream), {s['rows']:,} rows, {s['tokens']:,} response "
          f"tokens, {s['problems']} problems")
    print(f"{'':24}{'streamed (drpo)':>18}{'naive read_all':>18}{'naive / streamed':>18}")
    print(f"{'seconds':24}{s['seconds']:>18.2f}{n['seconds']:>18.2f}{n['seconds'] / s['seconds']:>18.2f}")
    s_tps, n_tps = s["tokens"] / s["seconds"], n["tokens"] / n["seconds"]
    print(f"{'M tokens/s':24}{s_tps / 1e6:>18.1f}{n_tps / 1e6:>18.1f}{n_tps / s_tps:>18.2f}")
    print(f"{'peak RSS (MB)':24}{s['peak_rss_mb']:>18.0f}{n['peak_rss_mb']:>18.0f}"
          f"{n['peak_rss_mb'] / s['peak_rss_mb']:>18.2f}")
    print(f"(naive: read_all {n['read_all_seconds']:.2f} s, checks {n['seconds'] - n['read_all_seconds']:.2f} s; "
          "streamed reads the file twice: validation, then the load pass)")


if __name__ == "__main__":
    main()
