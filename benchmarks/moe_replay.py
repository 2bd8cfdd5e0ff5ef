"""Routing replay (R3) on a tiny MoE whose sampler mis-routes: mismatch with and without replay, and its cost.

    python benchmarks/moe_replay.py                       # ~1 min on 2 CPU cores
    python benchmarks/moe_replay.py --rows 128 --noise 0.3 --device cuda

A seeded random Qwen3-MoE (router weights scaled so routing is decisive, as in a trained model) is
the trainer's policy. The "sampler" is a copy whose router weights carry Gaussian noise, standing
in for an inference engine whose router numerics differ (the published MoE figure is about 10% of
router decisions differing between engine and trainer); a second sampler also rounds its expert
weights to bfloat16 and has no router noise (expert computation in another precision, which replay
cannot fix, though the routing flips it causes downstream are replayed). Each
sampler generates rollouts at T = 1, logging its log-probs and the experts it chose (the
`routed_experts` column), written with RolloutWriter. drpo then computes the trainer's log-probs
without and with `--replay-routing` and prints, side by side: k3 = (r − 1) − log r and mean |log r|
over response tokens, `moe/routing_mismatch_frac`, the time of an inference pass and of a
forward + backward pass with and without replay, the routing tensors' memory, and the column's
bytes per token (in Arrow and on disk).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build(args) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from drpo_cli.model import moe

    config = Qwen3MoeConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                            moe_intermediate_size=args.hidden // 2, num_hidden_layers=args.layers,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
                            num_experts=args.experts, num_experts_per_tok=args.top_k, norm_topk_prob=True,
                            eos_token_id=None, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # a trained model's scales: decisive routing, experts that matter, peaked next tokens
        for gate in moe.routers(model, moe.MoeSpec.of(config)):
            gate.weight.mul_(args.router_scale)
        for name, p in model.named_parameters():
            if name.endswith("experts.down_proj"):
                p.mul_(args.expert_scale)
        model.lm_head.weight.mul_(args.logit_scale)
    return model


def sampler_of(model, noise: float, *, bf16_experts: bool, seed: int) -> torch.nn.Module:
    from drpo_cli.model import moe

    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in moe.routers(other, moe.MoeSpec.of(other.config)):
            gate.weight.add_(noise * gate.weight.std() * torch.randn(gate.weight.shape, generator=gen))
        if bf16_experts:
            for name, p in other.named_parameters():
                if ".experts." in name:
                    p.copy_(p.to(torch.bfloat16).float())
    return other


@torch.no_grad()
def sample(sampler, args, path: Path, *, with_routing: bool = True) -> None:
    """Rollouts of `sampler` at T = 1: behavior log-probs and (optionally) its routing, via RolloutWriter."""
    from drpo_cli.model import moe
    from drpo_cli.rollouts.writer import RolloutWriter

    spec = moe.MoeSpec.of(sampler.config)
    gen = torch.Generator().manual_seed(args.seed + 7)
    prompts = torch.randint(0, args.vocab, (args.rows, args.prompt), generator=gen)
    seq = prompts
    for _ in range(args.response):  # the sampler's own distribution at T = 1, one token at a time
        logits = sampler(input_ids=seq).logits[:, -1].float()
        seq = torch.cat([seq, torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)], dim=1)
    inputs = seq[:, :-1]  # (B, P + R − 1): every position the sampler ran forward on
    logp = torch.log_softmax(sampler(input_ids=inputs).logits[:, args.prompt - 1:].float(), -1)  # (B, R, V)
    response = seq[:, args.prompt:]  # (B, R)
    behavior = logp.gather(2, response[..., None])[..., 0]  # (B, R)
    routed = moe.own_routing(sampler, spec, inputs) if with_routing else None  # (B, P + R − 1, n_layers, k)
    with RolloutWriter(path, temperature=1.0, logprobs="processed", sampler="benchmarks/moe_replay.py") as w:
        for i in range(args.rows):
            row = {"prompt_ids": prompts[i].tolist(), "response_ids": response[i].tolist(),
                   "behavior_logprobs": behavior[i].tolist(), "advantage": float(torch.randn((), generator=gen))}
            if with_routing:
                row["routed_experts"] = routed[i]
            w.write_row(row)


def audit(model, rows, args, device, *, replay: bool) -> dict:
    """k3, mean |log r| and the routing mismatch over response tokens, through drpo's engine."""
    from drpo_cli.model import moe
    from drpo_cli.model.batching import plan_micro_batches
    from drpo_cli.model.head import reused_buffers
    from drpo_cli.model.logprobs import token_logprobs

    spec = moe.MoeSpec.of(model.config)
    moe.install(model, spec, replay=replay)
    count = moe.MismatchCount(spec)
    logp = torch.zeros(rows.num_tokens)
    with torch.inference_mode(), reused_buffers():
        for mb in plan_micro_batches(rows, np.arange(rows.num_rows), args.micro_batch_tokens):
            mb = mb.to(device)
            lp, _ = token_logprobs(model, mb, chunk_tokens=1024)
            logp[mb.token_index.cpu()] = lp.float().cpu()
            count.add(model, mb, torch.ones(mb.num_tokens, dtype=torch.bool))
    moe.remove(model)
    logr = (logp - torch.from_numpy(rows.behavior_logprobs)).double()
    frac, _ = count.result(replayed=replay)
    return {"k3": (logr.exp() - 1 - logr).mean().item(), "abs_logr": logr.abs().mean().item(), "mismatch": frac}


def timed_passes(model, rows, args, device, *, train: bool) -> tuple[dict, float]:
    """({replay: (seconds over every micro-batch, min over repeats; peak CUDA MiB)}, median of the paired
    replay / plain ratios) of an inference pass (an audit) or a forward + backward pass (a training
    step), the two arms interleaved run by run (a shared machine's load drifts between runs)."""
    from drpo_cli.model import moe
    from drpo_cli.model.batching import plan_micro_batches
    from drpo_cli.model.head import reused_buffers
    from drpo_cli.model.logprobs import fused_token_loss, token_logprobs

    batches = [mb.to(device) for mb in plan_micro_batches(rows, np.arange(rows.num_rows), args.micro_batch_tokens)]
    times: dict[bool, list[float]] = {False: [], True: []}
    peak: dict[bool, float | None] = {False: None, True: None}
    for _ in range(args.repeats):
        for replay in (False, True):
            moe.install(model, moe.MoeSpec.of(model.config), replay=replay)  # the audit's hooks in both arms
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            with reused_buffers(), torch.inference_mode(not train):
                for mb in batches:
                    if train:
                        loss, _, _ = fused_token_loss(model, mb, lambda logp, sl: -logp.sum(), chunk_tokens=1024)
                        loss.backward()
                    else:
                        token_logprobs(model, mb, chunk_tokens=1024)
            if device.type == "cuda":
                torch.cuda.synchronize()
                peak[replay] = torch.cuda.max_memory_allocated() / 2**20
            times[replay].append(time.perf_counter() - start)
            moe.remove(model)
    paired = float(np.median(np.array(times[True]) / np.array(times[False])))
    return {replay: (min(times[replay]), peak[replay]) for replay in (False, True)}, paired


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--prompt", type=int, default=8)
    p.add_argument("--response", type=int, default=32)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--router-scale", type=float, default=8.0)
    p.add_argument("--expert-scale", type=float, default=8.0, help="expert output weights × this")
    p.add_argument("--logit-scale", type=float, default=4.0, help="output head × this")
    p.add_argument("--noise", type=float, default=0.03, help="sampler router noise, × the router weights' std")
    p.add_argument("--micro-batch-tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=7, help="timed runs per arm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    from drpo_cli.model.batching import plan_micro_batches
    from drpo_cli.rollouts.rows import load_rows

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build(args).to(device)
    print(f"Qwen3-MoE, {args.layers} MoE layers, top-{args.top_k} of {args.experts} experts, hidden {args.hidden}, "
          f"V {args.vocab}; {args.rows} rows × ({args.prompt} prompt + {args.response} response) tokens; "
          f"sampler router noise {args.noise} × std; device {device}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"\n{'sampler':<34}{'routing mismatch':>17}{'k3 plain':>11}{'k3 replay':>11}{'ratio':>8}"
              f"{'|log r| plain':>15}{'|log r| replay':>16}{'ratio':>8}")
        rows = None
        for name, noise, bf16 in (("router noise", args.noise, False),
                                  ("bf16 experts, no router noise", 0.0, True),
                                  ("no noise (logged = own routing)", 0.0, False)):
            sampler = sampler_of(model.cpu(), noise, bf16_experts=bf16, seed=args.seed + 1)
            path = tmp / f"{name.replace(' ', '_')}.arrow"
            sample(sampler, args, path)
            these = load_rows(path)
            model.to(device)
            plain = audit(model, these, args, device, replay=False)
            replay = audit(model, these, args, device, replay=True)
            print(f"{name:<34}{plain['mismatch']:>17.4f}{plain['k3']:>11.3e}{replay['k3']:>11.3e}"
                  f"{_ratio(plain['k3'], replay['k3']):>8}{plain['abs_logr']:>15.3e}{replay['abs_logr']:>16.3e}"
                  f"{_ratio(plain['abs_logr'], replay['abs_logr']):>8}")
            if rows is None:
                rows, first_path = these, path

        print(f"\ncost of replay (same rollouts, {args.repeats} runs per arm, arms interleaved)")
        for label, train in (("inference pass (audit)", False), ("forward + backward (train)", True)):
            passes, paired = timed_passes(model, rows, args, device, train=train)
            (t_plain, m_plain), (t_replay, m_replay) = passes[False], passes[True]
            print(f"  {label + ':':<29}{t_plain:.3f} s plain, {t_replay:.3f} s replay (best: {t_replay / t_plain:.2f}×; "
                  f"median of paired runs: {paired:.2f}×)"
                  + (f"; peak CUDA memory {m_plain:.1f} / {m_replay:.1f} MiB ({m_replay / m_plain:.3f}×)"
                     if m_plain is not None else ""))
        largest = max(plan_micro_batches(rows, np.arange(rows.num_rows), args.micro_batch_tokens),
                      key=lambda mb: mb.routed_experts.numel())
        print(f"  extra memory: the micro-batch's routing tensor, at most {largest.routed_experts.numel() * 2:,} bytes "
              f"(int16, {largest.positions} positions × {args.layers} layers × {args.top_k}), and per MoE layer "
              f"the router's probabilities, which the router computes anyway")

        no_col = tmp / "no_routing.arrow"
        sample(sampler_of(model.cpu(), args.noise, bf16_experts=False, seed=args.seed + 1), args, no_col,
               with_routing=False)
        import pyarrow as pa

        table = pa.ipc.open_file(str(first_path)).read_all()
        positions = rows.num_tokens + int(rows.prompt_lengths().sum()) - rows.num_rows
        col = table.column("routed_experts").nbytes
        disk = first_path.stat().st_size - no_col.stat().st_size
        ids = args.layers * args.top_k
        print("\nthe routed_experts column")
        print(f"  Arrow, in memory: {col / positions:.1f} bytes per position ({ids} ids × 2 bytes = {2 * ids} "
              f"+ list offsets), {col / rows.num_tokens:.1f} bytes per response token")
        print(f"  on disk (uncompressed IPC, file with − without): {disk / rows.num_tokens:.1f} bytes per "
              f"response token; the rest of the row: {no_col.stat().st_size / rows.num_tokens:.1f}")
        for label, layers, k in (("Qwen3-30B-A3B", 48, 8), ("Qwen3.5-35B-A3B", 40, 8)):
            print(f"  {label} ({layers} MoE layers × top-{k}): {layers * k * 2 + 4 * layers + 4} bytes per position "
                  f"in int16 with offsets, {layers * k} as uint8 ids alone (arithmetic)")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}×" if b > 0 else "∞"


if __name__ == "__main__":
    main()
