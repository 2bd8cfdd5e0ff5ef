"""`drpo validate` on one huge record batch vs the same rows in 512-row batches (issue 32, point 13).

    python benchmarks/huge_batch.py                          # 32,767 rows × 65,536 tokens: two 17 GB files
    python benchmarks/huge_batch.py --rows 2048 --keep       # a smaller copy (1 GB files), kept for reruns

The issue's file was written with one `write_table` (one record batch of 2.1 G tokens); drpo used to
read that batch whole and was killed at 24 GB, while the same rows in 512-row batches validated in
19 s at 1.2 GB. Both files are written here without holding them in memory (the values are zero
pages: token 0, log-prob 0.0, valid), uncompressed Arrow IPC with int32 ids and float32 log-probs,
as samplers log them. Each `drpo validate` runs in its own process; its resident memory is sampled
every 20 ms from /proc (VmRSS, and RssAnon: memory of its own, not file pages) and the process is
killed above --max-rss-gb, so that a reader that does not bound its memory is reported, not left to
take the machine. Prints time and peak memory of both files side by side.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

PROMPT = 64  # prompt tokens per row


def write(path: Path, rows: int, tokens: int, batch_rows: int | None) -> None:
    """rows × (PROMPT prompt + `tokens` response tokens), one record batch (None) or `batch_rows` per batch."""
    n = rows * tokens
    offsets = pa.array(np.arange(rows + 1, dtype=np.int64) * tokens, pa.int32())  # n < 2^31: list<…> offsets
    p_offsets = pa.array(np.arange(rows + 1, dtype=np.int64) * PROMPT, pa.int32())
    # np.zeros of this size is mapped lazily: reading its zero pages allocates nothing.
    ids, logprobs = pa.array(np.zeros(n, dtype=np.int32)), pa.array(np.zeros(n, dtype=np.float32))
    batch = pa.record_batch({
        "prompt_ids": pa.ListArray.from_arrays(p_offsets, pa.array(np.ones(rows * PROMPT, dtype=np.int32))),
        "response_ids": pa.ListArray.from_arrays(offsets, ids),
        "behavior_logprobs": pa.ListArray.from_arrays(offsets, logprobs),
        "reward": pa.array(np.arange(rows, dtype=np.float32) % 2),
        "group_id": pa.array(np.arange(rows) // 8),
        "sample_id": pa.array([f"row-{i}" for i in range(rows)]),
    })
    tmp = path.with_name(path.name + ".partial")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_table(pa.Table.from_batches([batch]), max_chunksize=batch_rows)
    os.replace(tmp, path)


def status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and RssAnon of a process, in KiB (empty once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in fh)
                    if k in ("VmRSS", "VmHWM", "RssAnon")}
    except (FileNotFoundError, ProcessLookupError):
        return {}


def validate(path: Path, max_rss_kib: int) -> dict:
    """`drpo validate PATH` in its own process: seconds, peak VmRSS / RssAnon (GB), exit code, killed."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "drpo_cli", "validate", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak = {"VmRSS": 0, "VmHWM": 0, "RssAnon": 0}
    killed = False
    while proc.poll() is None:
        now = status(proc.pid)
        for k, v in now.items():
            peak[k] = max(peak[k], v)
        if now.get("VmRSS", 0) > max_rss_kib:
            proc.kill()
            killed = True
        time.sleep(0.02)
    output = proc.stdout.read().strip()
    return {"seconds": time.perf_counter() - start, "rss_gb": max(peak["VmRSS"], peak["VmHWM"]) * 1024 / 1e9,
            "anon_gb": peak["RssAnon"] * 1024 / 1e9, "code": proc.returncode, "killed": killed,
            "output": output.splitlines()[-1] if output else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32_767)
    ap.add_argument("--tokens", type=int, default=65_536, help="response tokens per row")
    ap.add_argument("--batch-rows", type=int, default=512, help="rows per record batch of the second file")
    ap.add_argument("--dir", default="/tmp/drpo_huge_batch", help="where the two files go")
    ap.add_argument("--max-rss-gb", type=float, default=8.0, help="kill a validate process above this")
    ap.add_argument("--keep", action="store_true", help="keep the files (reused when they exist)")
    args = ap.parse_args()
    if args.rows * args.tokens >= 2**31:
        ap.error("rows × tokens must stay below 2^31 (list<...> offsets are int32)")
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    files = {"one record batch": root / f"one-{args.rows}x{args.tokens}.arrow",
             f"{args.batch_rows}-row batches": root / f"b{args.batch_rows}-{args.rows}x{args.tokens}.arrow"}
    try:
        for (label, path), batch_rows in zip(files.items(), (None, args.batch_rows)):
            if not path.exists():
                start = time.perf_counter()
                write(path, args.rows, args.tokens, batch_rows)
                print(f"wrote {path} ({label}, {path.stat().st_size / 1e9:.1f} GB) in {time.perf_counter() - start:.0f} s",
                      flush=True)
        results = {label: validate(path, int(args.max_rss_gb * 1e9 / 1024)) for label, path in files.items()}
    finally:
        if not args.keep:
            for path in files.values():
                path.unlink(missing_ok=True)
    tokens = args.rows * args.tokens
    print(f"drpo validate, {args.rows:,} rows × {args.tokens:,} response tokens ({tokens / 1e9:.2f} G tokens), "
          f"uncompressed Arrow IPC file, peak memory sampled every 20 ms")
    print(f"{'':28}" + "".join(f"{label:>22}" for label in results))
    rows = (("seconds", lambda r: f"{r['seconds']:.1f}"), ("peak RSS (GB)", lambda r: f"{r['rss_gb']:.2f}"),
            ("peak RssAnon (GB)", lambda r: f"{r['anon_gb']:.2f}"),
            ("exit code", lambda r: "killed" if r["killed"] else str(r["code"])))
    for name, cell in rows:
        print(f"{name:28}" + "".join(f"{cell(r):>22}" for r in results.values()))
    for label, r in results.items():
        print(f"{label}: {r['output']}")


if __name__ == "__main__":
    main()
