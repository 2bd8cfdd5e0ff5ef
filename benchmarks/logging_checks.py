"""`drpo inspect --model` with and without the logging-bug checks, and the checks as separate passes.

    python benchmarks/logging_checks.py --threads 2

Workload (issue 13): a random-weight Qwen2 (1 layer, hidden 256, the real 151,936-token head), 16
rows, all from the current policy version (lag 0, so every row is a candidate for the checks),
responses 16 … 1,024 tokens. Three ways, in this one process, each timed end to end through
`audit.run_inspect` (load + passes + report), alternating, best of `--repeat`:
- `no checks`: the audit with the logging checks switched off;
- `in-pass`: the audit as shipped: each candidate temperature's log-prob of the sampled token comes
  from the same chunk logits (one more log-sum-exp per temperature over the checked tokens);
- `separate`: the audit without checks, then the rows of the fitted tokens recomputed in one more
  pass per candidate temperature (body + head each time), as before.
The in-pass check's figures must equal the separate passes' (printed).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from drpo_cli.audit import inspect_model
from drpo_cli.audit.inspect_data import run_inspect
from drpo_cli.config import InspectConfig
from drpo_cli.model.batching import plan_micro_batches
from drpo_cli.model.logprobs import token_logprobs


def skewed_lengths(rows: int, max_len: int = 1024) -> np.ndarray:
    """(rows,) response lengths spread geometrically from 16 to max_len (repeated when rows outnumber them)."""
    return np.resize(np.unique(np.geomspace(16, max_len, rows).astype(int)), rows)


def write_workload(root: Path, rows: int, vocab: int, hidden: int, seed: int = 0, *, max_len: int = 1024,
                   behavior=lambda g, n: -g.exponential(12.0, n)) -> tuple[Path, Path]:
    """model/ (a random 1-layer Qwen2) and rollouts.arrow (prompts of 32, `skewed_lengths` responses, lag 0).

    `behavior(rng, n)`: the logged log-probs of a response of n tokens.
    """
    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    model.save_pretrained(root / "model")
    return root / "model", write_rollouts(root / "rollouts.arrow", rows, vocab, seed, max_len=max_len,
                                          behavior=behavior)


def write_rollouts(path: Path, rows: int, vocab: int, seed: int = 0, *, max_len: int = 1024,
                   behavior=lambda g, n: -g.exponential(12.0, n)) -> Path:
    """rollouts.arrow: prompts of 32, `skewed_lengths` responses of tokens below `vocab`, lag 0."""
    g = np.random.default_rng(seed)
    lengths = skewed_lengths(rows, max_len)
    table = pa.table({
        "prompt_ids": pa.array([g.integers(0, vocab, 32).tolist() for _ in lengths], pa.list_(pa.int64())),
        "response_ids": pa.array([g.integers(0, vocab, n).tolist() for n in lengths], pa.list_(pa.int64())),
        "behavior_logprobs": pa.array([behavior(g, n).astype(np.float32).tolist() for n in lengths],
                                      pa.list_(pa.float32())),
        "advantage": pa.array(g.normal(size=rows), pa.float32()),
        "policy_version": pa.array(np.zeros(rows, dtype=np.int64)),
    })
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return path


def separate_passes(cfg: InspectConfig) -> dict:
    """The checks as before: the rows of the fitted tokens recomputed once per candidate temperature."""
    from drpo_cli.model.checkpoint import load_model
    from drpo_cli.rollouts.rows import load_rows

    rows = load_rows(list(cfg.rollouts))
    model, _ = load_model(cfg.model)
    every = np.ones(rows.num_rows, dtype=bool)
    check = inspect_model.LoggingCheck.plan(np.zeros(rows.num_rows, dtype=np.int64), rows.temperature,
                                          np.diff(np.concatenate([[0], np.cumsum(rows.loss_mask)])[rows.response_offsets]),
                                          every).chunk(rows)
    fit_rows = np.unique(rows.token_row()[check.fitted])
    fit = {}
    with torch.inference_mode():
        for temp in check.check.candidates:
            logr = []
            for mb in plan_micro_batches(rows, fit_rows, cfg.micro_batch_tokens):
                scaled = replace(mb, temperature=torch.full_like(mb.temperature, temp))
                lp = token_logprobs(model, scaled, chunk_tokens=cfg.chunk_tokens)[0].double().numpy()
                idx = mb.token_index.numpy()
                keep = check.fitted[idx]
                logr.append((lp - rows.behavior_logprobs[idx])[keep])
            fit[temp] = float(np.abs(np.concatenate(logr)).mean())
    return fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        model_dir, rollouts = write_workload(Path(d), args.rows, args.vocab, args.hidden)
        cfg = InspectConfig(rollouts=(str(rollouts),), model=str(model_dir), quiet=True, device="cpu").check()
        plan = inspect_model.LoggingCheck.plan

        def no_checks():
            inspect_model.LoggingCheck.plan = staticmethod(lambda *args: None)
            try:
                return run_inspect(cfg)
            finally:
                inspect_model.LoggingCheck.plan = plan

        def separate():
            no_checks()
            return separate_passes(cfg)

        runs = {"no checks": no_checks, "in-pass": lambda: run_inspect(cfg), "separate": separate}
        best, out = {k: float("inf") for k in runs}, {}
        for _ in range(args.repeat):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                out[name] = fn()
                best[name] = min(best[name], time.perf_counter() - t0)
    checks = out["in-pass"]["model"]["logging_checks"]
    in_pass = {f["temperature"]: f["abs_logr_mean"] for f in checks["temperature_fit"]}
    worst = max(abs(in_pass[t] - v) / max(abs(v), 1e-30) for t, v in out["separate"].items())
    tokens = out["in-pass"]["model"]["tokens"]
    print(json.dumps({"seconds": best, "tokens": tokens, "checked_tokens": checks["tokens"],
                      "temperatures": sorted(in_pass), "fit_in_pass": in_pass, "fit_separate": out["separate"]},
                     indent=2))
    base = best["no checks"]
    print(f"{args.rows} rows, {tokens:,} response tokens, V={args.vocab:,}, H={args.hidden}, {args.threads} threads; "
          f"offset check on {checks['tokens']:,} lag-0 tokens, temperature fit on {checks['fit_tokens']:,} of them "
          f"at {len(in_pass)} temperatures")
    print(f"audit without checks {base:.2f} s | checks in the same pass {best['in-pass']:.2f} s "
          f"({best['in-pass'] / base:.3f}x) | checks as separate passes {best['separate']:.2f} s "
          f"({best['separate'] / base:.3f}x)")
    print(f"in-pass vs separate mean |log r| per temperature: largest relative difference {worst:.1e}")


if __name__ == "__main__":
    main()
