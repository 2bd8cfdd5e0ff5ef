"""Data-only `drpo inspect` throughput and peak memory: streamed vectorised audit vs a per-row Python loop.

    python benchmarks/audit.py                        # reuses /tmp/drpo_read_large.arrow (2 GB) or writes it
    python benchmarks/audit.py --path big.arrow --small-gb 0.2

(The file is not called inspect.py: run as a script, it would shadow the standard library's
`inspect` module.) The rollout files come from benchmarks/read_large.py's generator: int32 ids,
float32 log-probs, reward + group_id advantages, so casts and group means are part of the
measurement. Each measurement runs in its own process so its peak RSS (ru_maxrss) is its own:
- streamed: `drpo inspect PATH --json OUT -q`, timed end to end (process start and imports included),
  on the large file and on a small one: peak RSS should not grow with the file;
- naive: `read_all()` then a Python loop over rows (to_pylist) computing the same token counts,
  rare-token share and mean −log μ, on the first rows only (its rate is per token, so it compares).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from read_large import write_file

NAIVE_ROWS = 2048


def streamed(path: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "report.json")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "drpo_cli", "inspect", path, "--json", out, "-q"], check=True)
        wall = time.perf_counter() - start
        with open(out, encoding="utf-8") as f:
            report = json.load(f)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    tokens = report["data"]["response_tokens"]
    return {"file_gb": os.path.getsize(path) / 1e9, "tokens": tokens, "wall_s": wall,
            "audit_s": report["settings"]["seconds"], "tokens_per_s": tokens / wall,
            "audit_tokens_per_s": tokens / report["settings"]["seconds"], "peak_rss_mb": rss}


def naive(path: str) -> dict:
    """Read everything, then loop over rows in Python (the obvious script)."""
    import pyarrow as pa

    start = time.perf_counter()
    with pa.OSFile(path) as f:
        table = pa.ipc.open_stream(f).read_all()
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    tokens = rare = 0
    nll = 0.0
    for row in table.slice(0, NAIVE_ROWS).select(["response_ids", "behavior_logprobs"]).to_pylist():
        for lp in row["behavior_logprobs"]:
            tokens += 1
            rare += lp <= math.log(0.01)
            nll -= lp
    loop_s = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens": tokens, "read_s": read_s, "loop_s": loop_s, "tokens_per_s": tokens / loop_s,
            "peak_rss_mb": rss}


def measure(path: str, mode: str) -> dict:
    """One measurement in a fresh process, so that ru_maxrss is that measurement's own."""
    out = subprocess.run([sys.executable, __file__, "--path", path, "--mode", mode], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", default="/tmp/drpo_read_large.arrow", help="Large rollout file (written if missing).")
    ap.add_argument("--size-gb", type=float, default=2.0, help="Size of the large file if it must be written.")
    ap.add_argument("--small-gb", type=float, default=0.2, help="Size of the small file (RSS comparison).")
    ap.add_argument("--mode", choices=["naive", "streamed"], help=argparse.SUPPRESS)  # one measurement
    args = ap.parse_args()
    if args.mode is not None:
        print(json.dumps((naive if args.mode == "naive" else streamed)(args.path)))
        return
    small = args.path + f".small-{args.small_gb:g}gb.arrow"
    for path, size in ((args.path, args.size_gb), (small, args.small_gb)):
        if not os.path.exists(path):
            print(f"writing {path} ({size:g} GB) ...", flush=True)
            write_file(path, size)
    results = {name: measure(path, mode) for name, path, mode in (
        ("streamed_small", small, "streamed"), ("streamed_large", args.path, "streamed"),
        ("naive_small", small, "naive"))}
    large, sm, nv = results["streamed_large"], results["streamed_small"], results["naive_small"]
    print(json.dumps(results, indent=2))
    print(f"drpo inspect (data-only), {large['file_gb']:.2f} GB, {large['tokens']:,} tokens: "
          f"{large['tokens_per_s'] / 1e6:.1f} M tokens/s end to end ({large['audit_tokens_per_s'] / 1e6:.1f} M/s "
          f"in the audit), peak RSS {large['peak_rss_mb']:.0f} MB")
    print(f"same on {sm['file_gb']:.2f} GB: peak RSS {sm['peak_rss_mb']:.0f} MB "
          f"(RSS ratio large/small {large['peak_rss_mb'] / sm['peak_rss_mb']:.2f} for a "
          f"{large['file_gb'] / sm['file_gb']:.0f}x larger file)")
    print(f"naive per-row loop: {nv['tokens_per_s'] / 1e6:.2f} M tokens/s after a {nv['read_s']:.1f} s read_all, "
          f"peak RSS {nv['peak_rss_mb']:.0f} MB on the small file; streamed audit is "
          f"{large['audit_tokens_per_s'] / nv['tokens_per_s']:.0f}x faster per token")


if __name__ == "__main__":
    main()
