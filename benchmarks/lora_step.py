"""LoRA vs full fine-tuning on the same model and batch, and what the frozen head saves, side by side.

    python benchmarks/lora_step.py --threads 2
    python benchmarks/lora_step.py --device cuda --hidden 1024 --layers 8

Rows 1-2: one optimizer step (loop.accumulate_gradients + clip + AdamW) with every weight trained
and with a rank-r LoRA adapter (lora.add_adapter: attention and MLP projections, head frozen):
trainable parameters, AdamW state bytes (exp_avg + exp_avg_sq) and the median step time.
Rows 3-4: the fused head path alone (logprobs.fused_token_loss forward + backward on the final hidden
states, the head weight trainable vs frozen): frozen skips the (V, H) head-weight gradient GEMM,
one of its three head GEMMs. The model is a random-weight Qwen2 with the real 151,936-token head.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from train_step import build_model, make_rows

from drpo_cli.config import TrainConfig
from drpo_cli.model import lora
from drpo_cli.model.batching import plan_micro_batches
from drpo_cli.model.logprobs import fused_token_loss
from drpo_cli.training.loop import accumulate_gradients


def step_stats(model, rows, cfg: TrainConfig, device, repeat: int) -> tuple[int, int, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    mask = torch.from_numpy(rows.loss_mask)
    behavior = torch.from_numpy(rows.behavior_logprobs)
    adv = torch.from_numpy(rows.advantages)
    times = []
    for _ in range(repeat + 1):  # the first step warms up (allocations, AdamW state)
        t0 = time.perf_counter()
        accumulate_gradients(model, rows, np.arange(rows.num_rows), cfg, anchor=behavior, rho=torch.ones_like(behavior),
                             behavior=behavior, advantages=adv, mask=mask)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return sum(p.numel() for p in params), state, statistics.median(times[1:])


def head_time(model, mb, frozen: bool, device, repeat: int) -> float:
    head = model.get_output_embeddings().weight
    head.requires_grad_(not frozen)
    for name, p in model.model.named_parameters():
        # Only the final norm trains besides the head: backward stops right after the head's dL/dh GEMM.
        p.requires_grad_(name == "norm.weight")
    times = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        loss, _, _ = fused_token_loss(model, mb, lambda logp, sl: (logp * 0.5).sum())
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        head.grad = None
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--response", type=int, default=128)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = make_rows(args.prompt, args.response, args.rows, args.vocab)
    cfg = TrainConfig(rollouts=("bench",), model="bench", micro_batch_tokens=1 << 20)

    results = {}
    for way in ("full", "lora"):
        model = build_model(args.vocab, args.hidden, args.layers).to(device).train()
        if way == "lora":
            lora.add_adapter(model, lora.new_config(args.lora_r, 2.0 * args.lora_r, ()))
            model.to(device)
        results[way] = step_stats(model, rows, cfg, device, args.repeat)
    total = sum(p.numel() for p in build_model(args.vocab, args.hidden, args.layers).parameters())
    for way, (trainable, state, seconds) in results.items():
        print(f"{way:>5} step: trainable {trainable:,} of {total:,} ({trainable / total:.2%}), "
              f"AdamW state {state / 1e6:,.1f} MB, step {seconds * 1e3:,.0f} ms", flush=True)
    full, small = results["full"], results["lora"]
    print(f"lora/full: trainable {small[0] / full[0]:.4f}, optimizer memory {small[1] / full[1]:.4f}, "
          f"step time {small[2] / full[2]:.2f}")

    model = build_model(args.vocab, args.hidden, args.layers).to(device)
    mb = plan_micro_batches(rows, np.arange(rows.num_rows), 1 << 20)[0].to(device)
    trained, frozen = head_time(model, mb, False, device, args.repeat), head_time(model, mb, True, device, args.repeat)
    print(f"fused head fwd+bwd ({mb.num_tokens} tokens, V={args.vocab:,}, H={args.hidden}): head trained "
          f"{trained * 1e3:,.0f} ms, head frozen {frozen * 1e3:,.0f} ms, frozen/trained {frozen / trained:.2f} "
          f"(3 -> 2 head GEMMs: ideal 0.67 of the GEMM time)")


if __name__ == "__main__":
    main()
