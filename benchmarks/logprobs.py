"""Naive full-logits log-probs vs the chunked engine, side by side, in one run (SPEC.md §5).

    python benchmarks/logprobs.py --threads 2

(a) training step (forward + backward of a PG-IS token-mean loss): naive vs fused (3 head GEMMs)
    vs chunked-recompute (4 head GEMMs); peak memory and tokens/s.
(b) inference mode (the audit path): tokens/s and peak memory at two response-token counts.
(c) a skewed batch (response lengths 16 … 4,096): token-budget micro-batches vs one batch padded to
    the longest row, both through the chunked head (the naive head on the padded batch would need
    37k × 151,936 float32 logits = 22 GB, which this machine cannot hold).

The model is a random-weight Qwen2 with a small body (default 1 layer, hidden 256) and the real
151,936-token untied head, so the head, where the time and memory go, dominates.

Peak memory: the kernel's resident-set high-water mark. Before each measurement we write "5" to
/proc/self/clear_refs (resets VmHWM to the current RSS, Linux ≥ 4.0) and report VmHWM − VmRSS at
the start, i.e. the extra resident memory the step needed at its peak, as the kernel saw it (torch's
CPU allocator returns large blocks to the OS, and tracemalloc cannot see torch). Where clear_refs is
not writable, a thread samples psutil RSS every millisecond instead (may miss very short peaks).
"""

from __future__ import annotations

import argparse
import gc
import math
import threading
import time
from collections.abc import Callable

import numpy as np
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from drpo_cli.model.batching import padding_fraction, plan_micro_batches
from drpo_cli.model.logprobs import fused_token_loss, token_logprobs
from drpo_cli.rollouts.rows import RolloutRows

GB = 1024**3


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _one(fn: Callable[[], object]) -> tuple[float, float, float]:
    """(wall seconds, process CPU seconds, peak extra resident bytes) of one call of fn."""
    gc.collect()
    if _reset_hwm():
        base = _status_kb("VmRSS")
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return wall, cpu, (_status_kb("VmHWM") - base) * 1024
    import psutil

    proc, stop, top = psutil.Process(), threading.Event(), [0]
    base = proc.memory_info().rss
    th = threading.Thread(target=_sample_rss, args=(proc, stop, top))
    th.start()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    stop.set()
    th.join()
    return wall, cpu, top[0] - base


def compare(
    arms: list[tuple[str, Callable[[], object]]],
    tokens: int,
    repeats: int,
    setup: Callable[[], object] = lambda: None,
) -> None:
    """Run the arms interleaved `repeats` times; print best wall/CPU time and max peak, ratios vs arm 0.

    Interleaving and best-of-N keep the comparison fair on a machine shared with other jobs; the CPU
    time (all threads of this process) is the steadier figure when the cores are oversubscribed.
    `setup` runs untimed before each call (e.g. dropping the previous step's gradients, which would
    otherwise be freed inside the measured window and hide that much of the peak).
    """
    best = {name: [math.inf, math.inf, 0.0] for name, _ in arms}
    for _ in range(repeats):
        for name, fn in arms:
            setup()
            wall, cpu, peak = _one(fn)
            b = best[name]
            b[0], b[1], b[2] = min(b[0], wall), min(b[1], cpu), max(b[2], peak)
    w0, c0, p0 = best[arms[0][0]]
    for i, (name, _) in enumerate(arms):
        wall, cpu, peak = best[name]
        ratios = (
            ""
            if i == 0
            else (
                f"  speed ×{w0 / wall:4.2f} wall, ×{c0 / cpu:4.2f} cpu;"
                f"  memory {100 * peak / max(p0, 1):5.1f}%"
            )
        )
        print(
            f"  {name:<44} {tokens / wall:7.0f} tok/s wall {tokens / cpu:7.0f} tok/cpu-s  "
            f"peak +{peak / GB:5.2f} GB{ratios}"
        )
    return best


def _sample_rss(proc, stop: threading.Event, top: list[int]) -> None:
    while not stop.is_set():
        top[0] = max(top[0], proc.memory_info().rss)
        time.sleep(0.001)


def gemm_flops(h: int, vocab: int, threads: int) -> float:
    """This machine's large-matmul FLOP/s: a (1024, H) × (H, V) product into a reused buffer."""
    a, w = torch.randn(1024, h), torch.randn(vocab, h)
    out = torch.empty(1024, vocab)
    torch.mm(a, w.t(), out=out)
    t0 = time.perf_counter()
    for _ in range(3):
        torch.mm(a, w.t(), out=out)
    return 3 * 2 * 1024 * h * vocab / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Model, rows, and the two ways of computing log-probs
# ---------------------------------------------------------------------------------------------


def build_model(vocab: int, hidden: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()


def make_rows(prompt_len: int, response_lens: list[int], vocab: int, seed: int = 0) -> RolloutRows:
    g = np.random.default_rng(seed)
    n, t = len(response_lens), int(sum(response_lens))
    return RolloutRows(
        prompt_ids=g.integers(0, vocab, n * prompt_len),
        prompt_offsets=np.arange(n + 1, dtype=np.int64) * prompt_len,
        response_ids=g.integers(0, vocab, t),
        response_offsets=np.concatenate([[0], np.cumsum(response_lens)]).astype(np.int64),
        behavior_logprobs=-g.exponential(2.0, t).astype(np.float32) - 10.0,  # near a random model's −log V
        advantages=g.standard_normal(t).astype(np.float32),
        loss_mask=np.ones(t, dtype=bool),
        proximal_logprobs=None,
        sample_ids=[str(i) for i in range(n)],
        policy_version=np.zeros(n, dtype=np.int64),
        temperature=np.array([(0.7, 1.0, 1.3)[i % 3] for i in range(n)], dtype=np.float32),
        source_file=["bench"] * n,
        source_row=np.arange(n, dtype=np.int64),
    )


def naive_logprobs(model, mb) -> torch.Tensor:
    """Full logits for every position → / temperature → float32 log_softmax → gather."""
    logits = model(
        input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids
    ).logits  # (B, L, V)
    temp = mb.temperature.new_ones(mb.num_rows).index_put((mb.seq_index,), mb.temperature)  # (B,)
    logp_all = torch.log_softmax(logits.float() / temp[:, None, None], dim=-1)  # (B, L, V)
    return logp_all.reshape(-1, logp_all.shape[-1])[mb.src_index].gather(1, mb.target_ids[:, None]).squeeze(1)


def pg_is_loss(rows: RolloutRows, mb):
    """PG-IS with token-mean aggregation, as loss_fn(logp_chunk, sl) (SPEC.md §1 table, first row)."""
    adv = torch.from_numpy(rows.advantages)[mb.token_index]  # (M,)
    mu = torch.from_numpy(rows.behavior_logprobs)[mb.token_index]  # (M,)
    denom = float(mb.num_tokens)

    def loss_fn(logp, sl):
        return (-adv[sl] * torch.exp((logp - mu[sl]).clamp(-20, 20))).sum() / denom

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def section_a(model, args):
    rows = make_rows(args.prompt, [args.response] * args.rows, args.vocab)
    (mb,) = plan_micro_batches(rows, np.arange(rows.num_rows), 10**9)
    loss_fn = pg_is_loss(rows, mb)
    m = mb.num_tokens
    print(
        f"\n(a) training step, forward + backward: {args.rows} rows × (prompt {args.prompt} + response "
        f"{args.response}) = {m} response tokens, chunk {args.chunk}"
    )

    def naive():
        loss_fn(naive_logprobs(model, mb), slice(None)).backward()

    def fused():
        fused_token_loss(model, mb, loss_fn, chunk_tokens=args.chunk)[0].backward()

    def recompute():
        loss_fn(token_logprobs(model, mb, chunk_tokens=args.chunk)[0], slice(None)).backward()

    def drop_grads():
        model.zero_grad(set_to_none=True)

    best = compare(
        [
            ("naive (full logits)", naive),
            ("ours fused (3 head GEMMs)", fused),
            ("ours chunked + recompute (4 head GEMMs)", recompute),
        ],
        m,
        args.repeats,
        drop_grads,
    )
    secs_f = best["ours fused (3 head GEMMs)"][0]
    model.zero_grad(set_to_none=True)
    head_flops = 3 * 2 * m * args.hidden * args.vocab
    print(
        f"  fused: head GEMMs at {head_flops / secs_f / 1e9:5.1f} GFLOP/s over the whole step's wall time = "
        f"{100 * head_flops / secs_f / args.peak_flops:4.1f}% of this machine's measured large-matmul rate"
    )


def section_b(model, args):
    print(
        f"\n(b) inference mode (audit path), response {args.response} per row, prompt {args.prompt}, "
        f"chunk {args.chunk}"
    )
    for t in args.infer_tokens:
        rows = make_rows(args.prompt, [args.response] * max(1, t // args.response), args.vocab, seed=t)
        (mb,) = plan_micro_batches(rows, np.arange(rows.num_rows), 10**9)

        def naive(mb=mb):
            with torch.inference_mode():
                naive_logprobs(model, mb)

        def ours(mb=mb):
            with torch.inference_mode():
                token_logprobs(model, mb, chunk_tokens=args.chunk)

        compare(
            [(f"naive (full logits), T={mb.num_tokens}", naive), (f"ours chunked, T={mb.num_tokens}", ours)],
            mb.num_tokens,
            args.repeats,
        )


def section_c(args):
    lens = [16 * 2**k for k in range(9)]  # 16 … 4,096
    model = build_model(args.vocab, args.hidden, args.skew_layers)
    rows = make_rows(args.prompt, lens, args.vocab, seed=1)
    idx = np.arange(rows.num_rows)
    padded = plan_micro_batches(rows, idx, 10**9)
    budgeted = plan_micro_batches(rows, idx, args.budget)
    t = rows.num_tokens
    print(
        f"\n(c) skewed batch, inference mode: response lengths {lens[0]} … {lens[-1]} ({t} tokens), prompt "
        f"{args.prompt}, body {args.skew_layers} layer(s); both arms use the chunked head"
    )

    def run(batches):
        with torch.inference_mode():
            for mb in batches:
                token_logprobs(model, mb, chunk_tokens=args.chunk)

    pos_p, pos_b = sum(mb.positions for mb in padded), sum(mb.positions for mb in budgeted)
    name_p = f"pad to longest: 1 batch, {pos_p} positions, pad {100 * padding_fraction(padded):.0f}%"
    name_b = f"budget {args.budget}: {len(budgeted)} batches, {pos_b} pos., pad {100 * padding_fraction(budgeted):.0f}%"
    compare([(name_p, lambda: run(padded)), (name_b, lambda: run(budgeted))], t, args.repeats)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=1, help="body layers for (a) and (b)")
    p.add_argument("--skew-layers", type=int, default=8, help="body layers for (c)")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--response", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=256, help="chunk_tokens of the chunked head")
    p.add_argument("--budget", type=int, default=8192, help="micro_batch_tokens for (c)")
    p.add_argument("--infer-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 4096])
    p.add_argument(
        "--repeats", type=int, default=3, help="interleaved timed calls per arm (best time, max memory)"
    )
    p.add_argument("--sections", default="abc")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.peak_flops = gemm_flops(args.hidden, args.vocab, args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, CPU; model: Qwen2 body of {args.layers} layer(s), "
        f"hidden {args.hidden}, untied head V={args.vocab} (tiny body to isolate the head)"
    )
    print(
        f"large-matmul rate on this machine (1024×{args.hidden} · {args.hidden}×{args.vocab}): "
        f"{args.peak_flops / 1e9:.1f} GFLOP/s;  memory = extra peak RSS (VmHWM) over the step's start"
    )
    model = build_model(args.vocab, args.hidden, args.layers)
    if "a" in args.sections:
        section_a(model, args)
    if "b" in args.sections:
        section_b(model, args)
    if "c" in args.sections:
        del model
        section_c(args)


if __name__ == "__main__":
    main()
