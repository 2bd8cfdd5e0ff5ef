"""One `drpo train` optimizer step vs a naive reference step on the same batch, side by side.

    python benchmarks/train_step.py --threads 2
    python benchmarks/train_step.py --device cuda --rows 16 --response 512

ours:  loop.accumulate_gradients (token-budget micro-batches, decoder body, chunked head over
       response positions only, fused head gradients: 3 head GEMMs, no T×V logits) + clip + AdamW.
naive: the HF forward with full logits for every position, float32 log_softmax / temperature,
       gather, the same loss (losses.token_loss) and aggregation (aggregation.aggregate), backward,
       clip + AdamW.
Both start from the same weights; the script first checks that their gradients agree.

Achieved FLOP/s counts the useful work of a step, the same for both: 6 · (body parameters) ·
(real input positions) for the decoder body and 6 · T · H · V for the head over the T response
tokens (forward and two gradient GEMMs; attention's quadratic term is left out). It is shown as a
fraction of this machine's large-matmul FLOP/s, measured in the same run (a square fp32 matmul).
The model is a random-weight Qwen2 with a small body and the real 151,936-token head, so the head,
where the time and memory go, dominates. Peak memory: extra resident memory at the step's peak
(CPU: the resident high-water mark, reset before each call) or torch.cuda.max_memory_allocated above
the start (CUDA).
"""

from __future__ import annotations

import argparse
import gc
import math
import time

import numpy as np
import torch

from drpo_cli.config import TrainConfig
from drpo_cli.model.batching import plan_micro_batches
from drpo_cli.objectives.aggregation import aggregate, aggregation_denominator
from drpo_cli.objectives.losses import token_loss
from drpo_cli.rollouts.rows import RolloutRows
from drpo_cli.training.loop import accumulate_gradients

GB = 1e9


def build_model(vocab: int, hidden: int, layers: int) -> torch.nn.Module:
    """A random-weight Qwen2 with a small body and an untied head of `vocab` rows."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=8192, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()


def make_rows(prompt_len: int, response_len: int, n: int, vocab: int, seed: int = 0) -> RolloutRows:
    """n random rows; behavior log-probs near a random model's −log V, temperatures 0.7 / 1.0 / 1.3."""
    g = np.random.default_rng(seed)
    t = n * response_len
    return RolloutRows(
        prompt_ids=g.integers(0, vocab, n * prompt_len), prompt_offsets=np.arange(n + 1) * prompt_len,
        response_ids=g.integers(0, vocab, t), response_offsets=np.arange(n + 1) * response_len,
        behavior_logprobs=(-g.exponential(2.0, t) - 10.0).astype(np.float32),
        advantages=g.standard_normal(t).astype(np.float32), loss_mask=np.ones(t, dtype=bool),
        proximal_logprobs=None, sample_ids=[str(i) for i in range(n)], policy_version=np.zeros(n, dtype=np.int64),
        temperature=np.array([(0.7, 1.0, 1.3)[i % 3] for i in range(n)], dtype=np.float32),
        source_file=["bench"] * n, source_row=np.arange(n),
    )


def naive_logprobs(model, mb) -> torch.Tensor:
    """Full logits for every position → / temperature → float32 log_softmax → gather."""
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                   position_ids=mb.position_ids).logits  # (B, L, V)
    temp = mb.temperature.new_ones(mb.num_rows).index_put((mb.seq_index,), mb.temperature)  # (B,)
    logp_all = torch.log_softmax(logits.float() / temp[:, None, None], dim=-1)  # (B, L, V)
    return logp_all.reshape(-1, logp_all.shape[-1])[mb.src_index].gather(1, mb.target_ids[:, None]).squeeze(1)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def measure(fn, repeats: int, device: torch.device) -> tuple[float, float]:
    """(best seconds, peak extra memory in bytes) over `repeats` calls.

    CPU: writing 5 to /proc/self/clear_refs resets the resident high-water mark (Linux), so VmHWM − VmRSS
    is the extra memory the call needed at its peak. CUDA: max_memory_allocated above the start.
    """
    best, peak = math.inf, 0.0
    for _ in range(repeats):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _status_kb("VmRSS") * 1024
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        top = torch.cuda.max_memory_allocated() if device.type == "cuda" else _status_kb("VmHWM") * 1024
        peak = max(peak, top - base)
    return best, peak


def matmul_flops(device: torch.device, n: int) -> float:
    """Best FLOP/s of an (n, n) × (n, n) fp32 matmul (TF32 off) over a few repeats."""
    torch.backends.cuda.matmul.allow_tf32 = False
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    best = math.inf
    for _ in range(4):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def useful_flops(model, rows, idx) -> float:
    """6·N_body·positions + 6·T·H·V: a training step's forward and backward GEMM work."""
    head = model.get_output_embeddings().weight  # (V, H)
    embed = model.get_input_embeddings().weight
    body = sum(p.numel() for p in model.parameters()) - head.numel() - embed.numel()
    positions = int((rows.prompt_lengths()[idx] + rows.response_lengths()[idx] - 1).sum())
    tokens = int(rows.response_lengths()[idx].sum())
    return 6 * body * positions + 6 * tokens * head.shape[0] * head.shape[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--response", type=int, default=128)
    p.add_argument("--loss", default="drpo")
    p.add_argument("--micro-batch-tokens", type=int, default=4096)
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    model = build_model(args.vocab, args.hidden, args.layers).to(device)
    model.train()  # the dropout-free Qwen2 config: train mode changes nothing numerically
    rows = make_rows(args.prompt, args.response, args.rows, args.vocab)
    idx = np.arange(rows.num_rows)
    cfg = TrainConfig(rollouts=("bench",), model="bench", loss=args.loss, micro_batch_tokens=args.micro_batch_tokens)
    hp = cfg.loss_hparams()
    t = torch.from_numpy
    per_token = {"anchor": t(rows.behavior_logprobs), "rho": torch.ones(rows.num_tokens),
                 "behavior": t(rows.behavior_logprobs), "advantages": t(rows.advantages), "mask": t(rows.loss_mask)}
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-7)

    def ours() -> None:
        accumulate_gradients(model, rows, idx, cfg, **per_token)

    def naive() -> None:
        mb = plan_micro_batches(rows, idx, 10**12)[0].to(device)  # every row in one padded batch
        logp = naive_logprobs(model, mb)  # (M,)
        ti = mb.token_index.cpu()
        mask = per_token["mask"][ti].to(device)
        loss_t = token_loss(args.loss, logp, per_token["anchor"][ti].to(device),
                            per_token["advantages"][ti].to(device), mask=mask, seq_index=mb.seq_index, **hp)
        denom = aggregation_denominator(cfg.agg, mask, mb.seq_index)
        aggregate(loss_t, mask, mb.seq_index, cfg.agg, denom).backward()

    def step(backward) -> None:
        backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)

    # Same gradient first (the comparison means nothing otherwise).
    grads = []
    for fn in (ours, naive):
        opt.zero_grad(set_to_none=True)
        fn()
        grads.append(torch.cat([q.grad.reshape(-1) for q in params]).cpu())
    opt.zero_grad(set_to_none=True)
    rel = ((grads[0] - grads[1]).abs().max() / grads[1].abs().max()).item()

    peak_flops = matmul_flops(device, args.matmul_n)
    work = useful_flops(model, rows, idx)
    tokens = rows.num_tokens
    print(f"device {args.device} ({args.threads} threads)  V={args.vocab:,} H={args.hidden} layers={args.layers}  "
          f"{args.rows} rows × (prompt {args.prompt} + response {args.response})  loss {args.loss}")
    print(f"large-matmul peak: {peak_flops / 1e9:.1f} GFLOP/s ({args.matmul_n}² fp32);  useful work per step "
          f"{work / 1e9:.1f} GFLOP;  max |grad ours − naive| / max |grad| = {rel:.1e}")
    print(f"  {'':<7} {'s/step':>8} {'tokens/s':>10} {'GFLOP/s':>9} {'of peak':>8} {'peak mem':>10}")
    results = {}
    for name, fn in (("naive", naive), ("ours", ours)):
        step(fn)  # warm-up
        secs, peak = measure(lambda fn=fn: step(fn), args.repeats, device)
        results[name] = (secs, peak)
        print(f"  {name:<7} {secs:8.3f} {tokens / secs:10.0f} {work / secs / 1e9:9.1f} "
              f"{100 * work / secs / peak_flops:7.1f}% {peak / GB:8.2f} GB")
    (ns, nm), (os_, om) = results["naive"], results["ours"]
    print(f"  ours vs naive: ×{ns / os_:.2f} tokens/s, {100 * om / max(nm, 1):.0f}% of the peak memory")


if __name__ == "__main__":
    main()
