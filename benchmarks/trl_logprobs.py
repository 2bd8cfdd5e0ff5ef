"""drpo's log-prob path vs TRL's (GRPOTrainer) vs the naive one, on skewed batches, side by side in one run.

    python benchmarks/trl_logprobs.py --threads 2

What each path does for the same rows (a random-weight Qwen2 body, the real 151,936-token head):
- naive: one batch padded to the longest row, full logits for every position, float32
  log_softmax, gather;
- TRL: GRPOTrainer's log-prob path (`_get_per_token_logps` up to TRL 0.2x): left-padded prompts +
  right-padded completions in one batch, `model(input_ids, attention_mask, logits_to_keep=C + 1)
  .logits[:, :-1]` (C = the longest completion), the last C logits divided by the temperature, then
  `trl.trainer.utils.selective_log_softmax` (a logsumexp per row over full (B, C, V) logits). TRL
  1.16's GRPOTrainer can instead call the model with `fused_lm_head=True`; that path is not measured;
- drpo: token-budget micro-batches, response positions only, chunked float32 head, chunk buffers
  shared across micro-batches: `logprobs.token_logprobs` in inference (the audit's path),
  `logprobs.fused_token_loss` for forward + backward (`drpo train`'s: each chunk's head gradients
  formed right after its forward, 3 head GEMMs).
All three give the same log-probs, and drpo the same gradients as TRL (checked). Forward + backward
of Σ logp (a training step's shape) and inference mode, tokens/s and peak extra resident memory (VmHWM, as
benchmarks/logprobs.py); the fraction of the large-matmul FLOP/s peak measured here first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from logprobs import _one, make_rows  # (wall, cpu, peak extra bytes) of one call; random rows
from trl_paths import naive_logps, trl_batch, trl_logps

from drpo_cli.model.batching import plan_micro_batches
from drpo_cli.model.head import reused_buffers
from drpo_cli.model.logprobs import fused_token_loss, token_logprobs
from drpo_cli.rollouts.rows import RolloutRows

GB = 1024**3


def drpo_logps(model, rows: RolloutRows, budget: int, chunk: int) -> torch.Tensor:
    """The audit's path: token-budget micro-batches through the chunked head, buffers shared across them."""
    out = torch.zeros(rows.num_tokens)
    with reused_buffers():
        for mb in plan_micro_batches(rows, np.arange(rows.num_rows), budget):
            out = out.index_put((mb.token_index,), token_logprobs(model, mb, chunk_tokens=chunk)[0])
    return out


def drpo_backward(model, rows: RolloutRows, budget: int, chunk: int) -> None:
    """The training path (loop.accumulate_gradients): backward of Σ logp with the head gradients fused in forward."""
    with reused_buffers():
        for mb in plan_micro_batches(rows, np.arange(rows.num_rows), budget):
            fused_token_loss(model, mb, lambda logp, sl: logp.sum(), chunk_tokens=chunk)[0].backward()


def flat_trl(rows: RolloutRows, per_token: torch.Tensor) -> torch.Tensor:
    return torch.cat([per_token[i, :len(rows.response(i))] for i in range(rows.num_rows)])


def matmul_peak(threads: int) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 8192)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * 2048 * 2048 * 8192 / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=2, help="Timed runs per path after a warm-up (best kept).")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=args.vocab,
                      max_position_embeddings=8192, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float().eval()
    lengths = np.unique(np.geomspace(16, args.max_len, args.rows).astype(int)).tolist()
    rows = make_rows(args.prompt, np.resize(lengths, args.rows).tolist(), args.vocab)
    rows = replace(rows, temperature=np.ones(rows.num_rows, dtype=np.float32))  # one temperature, as GRPO has
    T = rows.num_tokens
    batch = trl_batch(rows)
    peak = matmul_peak(args.threads)
    head_flops = 2 * T * args.hidden * args.vocab  # forward; ×3 with backward

    with torch.inference_mode():
        ref = drpo_logps(model, rows, args.budget, args.chunk)
        diff_trl = (flat_trl(rows, trl_logps(model, batch)) - ref).abs().max().item()
        diff_naive = (naive_logps(model, rows) - ref).abs().max().item()

    def grads(step) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        step()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    g_trl = grads(lambda: (trl_logps(model, batch) * batch[3]).sum().backward())
    g_drpo = grads(lambda: drpo_backward(model, rows, args.budget, args.chunk))
    grad_diff = ((g_drpo - g_trl).abs().max() / g_trl.abs().max()).item()
    del g_trl, g_drpo
    paths = {
        "naive": lambda: naive_logps(model, rows),
        "trl": lambda: trl_logps(model, batch) * batch[3],  # completion_mask, as GRPO's loss applies it
        "drpo": lambda: drpo_logps(model, rows, args.budget, args.chunk),
    }
    results = {}
    for mode in ("inference", "train"):
        for name, fn in paths.items():
            def run(fn=fn, mode=mode):
                if mode == "inference":
                    with torch.inference_mode():
                        fn()
                else:
                    model.zero_grad(set_to_none=True)
                    if fn is paths["drpo"]:
                        drpo_backward(model, rows, args.budget, args.chunk)
                    else:
                        fn().sum().backward()
            run()  # warm-up
            wall, _, mem = min((_one(run) for _ in range(args.repeat)), key=lambda r: r[0])
            flops = head_flops * (1 if mode == "inference" else 3)
            results[f"{mode}/{name}"] = {"seconds": wall, "tokens_per_s": T / wall, "peak_extra_gb": mem / GB,
                                         "head_frac_of_peak": flops / wall / peak}
    print(json.dumps({"tokens": T, "rows": args.rows, "lengths": lengths, "matmul_peak_gflops": peak / 1e9,
                      "max_abs_diff_vs_drpo": {"trl": diff_trl, "naive": diff_naive},
                      "grad_max_diff_vs_trl_relative": grad_diff, "results": results}, indent=2))
    print(f"{args.rows} rows, responses {min(lengths)} … {max(lengths)} (+{args.prompt} prompt), {T:,} tokens, "
          f"V={args.vocab:,}, H={args.hidden}, {args.threads} threads; matmul peak {peak / 1e9:.0f} GFLOP/s")
    for mode in ("inference", "train"):
        d, t, n = (results[f"{mode}/{k}"] for k in ("drpo", "trl", "naive"))
        print(f"{mode:9s}: drpo {d['tokens_per_s']:,.0f} tok/s {d['peak_extra_gb']:.2f} GB "
              f"({d['head_frac_of_peak']:.0%} of peak) | TRL {t['tokens_per_s']:,.0f} tok/s {t['peak_extra_gb']:.2f} GB "
              f"({t['head_frac_of_peak']:.0%}) | naive {n['tokens_per_s']:,.0f} tok/s {n['peak_extra_gb']:.2f} GB | "
              f"drpo/TRL ×{d['tokens_per_s'] / t['tokens_per_s']:.2f} speed, "
              f"{d['peak_extra_gb'] / max(t['peak_extra_gb'], 1e-9):.0%} memory")
    print(f"log-probs vs drpo: TRL max |diff| {diff_trl:.1e}, naive {diff_naive:.1e}; gradients drpo vs TRL: "
          f"max |diff| / max |grad| {grad_diff:.1e}")


if __name__ == "__main__":
    main()
