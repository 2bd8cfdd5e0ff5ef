"""`drpo convert --stream` on a logged stream vs `drpo convert` on the same responses unstreamed.

    python benchmarks/convert_streams.py --responses 2000 --tokens 256 --concurrent 64

Writes two inputs under /tmp/drpo_convert_streams/: whole.jsonl, one vLLM chat response per line (the
shape of chat_completion_full_generator, return_token_ids=true, a reward next to it), and stream.jsonl,
the same responses as vLLM's chat_completion_stream_generator streams them (raw SSE `data:` lines: the role
chunk, one chunk per token, the usage chunk, `[DONE]`; the final token chunk logged as JSON with the
reward next to it), `--concurrent` of them interleaved at a time as a server under load sends them. Each
convert runs in its own process, so its peak RSS (getrusage ru_maxrss) is its own; the two outputs are
checked to hold the same tokens and log-probs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

HERE = Path("/tmp/drpo_convert_streams")
PROMPT = [1, 1841, 314, 216, 34, 1232, 216, 35, 47]
RUN = """
import json, resource, sys, time
from drpo_cli.rollouts.convert import ConvertConfig, convert
t = time.perf_counter()
out, lines, rows = convert(ConvertConfig(inputs=(sys.argv[1],), out=sys.argv[2], format="openai", logprobs="processed",
                                         temperature=0.7, overwrite=True, stream=sys.argv[3] == "1"))
print(json.dumps({"seconds": time.perf_counter() - t, "lines": lines, "rows": rows,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def entry(tok: int, lp: float) -> dict:
    return {"token": f" w{tok}", "logprob": lp, "bytes": list(f" w{tok}".encode()), "top_logprobs": []}


def response(k: int, n: int, rng: random.Random) -> tuple[str, list[int], list[float]]:
    ids = [rng.randrange(3, 150_000) for _ in range(n - 1)] + [2]
    return f"chatcmpl-{k:06x}", ids, [round(-rng.expovariate(1.0), 6) for _ in ids]


def whole_line(rid: str, ids: list[int], lps: list[float]) -> str:
    choice = {"index": 0, "message": {"role": "assistant", "content": "x"}, "logprobs": {
        "content": [entry(t, lp) for t, lp in zip(ids, lps)]}, "finish_reason": "stop", "stop_reason": None,
        "token_ids": ids}
    return json.dumps({"id": rid, "object": "chat.completion", "created": 0, "model": "m", "choices": [choice],
                       "usage": {"prompt_tokens": len(PROMPT), "total_tokens": len(PROMPT) + len(ids),
                                 "completion_tokens": len(ids)}, "prompt_token_ids": PROMPT,
                       "kv_transfer_params": None, "reward": 1.0})


def sse(obj: dict) -> str:
    return "data: " + json.dumps(obj, separators=(",", ":"))


def stream_events(rid: str, ids: list[int], lps: list[float]):
    head = {"id": rid, "object": "chat.completion.chunk", "created": 0, "model": "m"}
    yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}], "prompt_token_ids": PROMPT, "prompt_text": None})
    for t, (tok, lp) in enumerate(zip(ids, lps)):
        last = t == len(ids) - 1
        choice = {"index": 0, "delta": {"content": f" w{tok}"}, "logprobs": {"content": [entry(tok, lp)]},
                  "finish_reason": "stop" if last else None, "token_ids": [tok]}
        event = {**head, "choices": [choice], "kv_transfer_params": None}
        yield json.dumps({**event, "reward": 1.0}) if last else sse(event)
    yield sse({**head, "choices": [], "usage": {"prompt_tokens": len(PROMPT), "total_tokens": len(PROMPT) + len(ids),
                                                "completion_tokens": len(ids)}})
    yield "data: [DONE]"


def write_inputs(responses: int, tokens: int, concurrent: int) -> tuple[Path, Path]:
    HERE.mkdir(exist_ok=True)
    rng = random.Random(0)
    answers = [response(k, tokens, rng) for k in range(responses)]
    whole, stream = HERE / "whole.jsonl", HERE / "stream.jsonl"
    with open(whole, "w") as fh:
        fh.writelines(whole_line(*a) + "\n" for a in answers)
    with open(stream, "w") as fh:
        pending, active = iter(answers), []
        while True:
            while len(active) < concurrent and (a := next(pending, None)) is not None:
                active.append(stream_events(*a))
            if not active:
                break
            for events in list(active):  # one event of each open stream in turn, a blank line after each
                event = next(events, None)
                if event is None:
                    active.remove(events)
                else:
                    fh.write(event + "\n\n")
    return whole, stream


def run(src: Path, stream: bool) -> dict:
    out = HERE / ("stream.arrow" if stream else "whole.arrow")
    result = subprocess.run([sys.executable, "-c", RUN, str(src), str(out), "1" if stream else "0"],
                            capture_output=True, text=True, check=True)
    return {**json.loads(result.stdout), "input_mb": os.path.getsize(src) / 1e6, "out": str(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=2000)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--concurrent", type=int, default=64)
    args = parser.parse_args()
    whole, stream = write_inputs(args.responses, args.tokens, args.concurrent)
    import pyarrow as pa

    results = {"unstreamed": run(whole, stream=False), "--stream": run(stream, stream=True)}
    tables = {k: pa.ipc.open_file(r["out"]).read_all() for k, r in results.items()}
    for col in ("response_ids", "behavior_logprobs", "prompt_ids"):
        a = sorted(zip(tables["unstreamed"].column("sample_id").to_pylist(), tables["unstreamed"].column(col).to_pylist()))
        b = sorted(zip(tables["--stream"].column("sample_id").to_pylist(), tables["--stream"].column(col).to_pylist()))
        assert a == b, f"{col} differs"
    tokens = args.responses * args.tokens
    print(f"{args.responses} responses x {args.tokens} tokens, {args.concurrent} streams open at a time; "
          "the two outputs hold the same ids and log-probs")
    print(f"{'input':12} {'MB':>8} {'lines':>9} {'rows':>6} {'seconds':>8} {'tokens/s':>10} {'peak RSS MB':>12}")
    for name, r in results.items():
        print(f"{name:12} {r['input_mb']:8.1f} {r['lines']:9,} {r['rows']:6,} {r['seconds']:8.2f} "
              f"{tokens / r['seconds']:10,.0f} {r['peak_rss_mb']:12.0f}")


if __name__ == "__main__":
    main()
