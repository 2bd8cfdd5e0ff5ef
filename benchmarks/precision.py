"""Log-prob parity and speed of bf16 / fp16 autocast against fp32 on CPU, side by side, in one run.

    python benchmarks/precision.py --threads 2

For two models, the bundled toy example (examples/toy: its 192 logged rows) and a larger random-weight
Qwen2 (hidden 512, 4 layers, V 32,000, head scaled ×8 so that logits have std 3.6; uniformly random
target tokens), every response token's log π is computed through drpo's engine (`token_logprobs`) in fp32, then under CPU autocast in bf16 and
fp16 with fp32 master weights (the head GEMMs in the low dtype, log-sum-exp in float32), and with the
weights themselves stored in bf16 / fp16 (what `inspect --dtype` loads). Printed per arm: mean and max
|Δ log p| against fp32, both also in units of the dtype's machine epsilon, the k3 estimate of
KL(π_fp32‖π_low) (k3 = (r − 1) − log r, r = π_low/π_fp32, a mean over tokens), and the time of the
inference pass and of a training pass (fused forward + backward of a PG-IS loss) as a ratio to fp32
(best of --repeat, arms interleaved).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from logprobs import build_model, make_rows, pg_is_loss  # benchmarks/logprobs.py

from drpo_cli.model.batching import plan_micro_batches
from drpo_cli.model.checkpoint import load_model
from drpo_cli.model.head import reused_buffers
from drpo_cli.model.logprobs import fused_token_loss, token_logprobs
from drpo_cli.rollouts.rows import load_rows

TOY = HERE.parent / "examples" / "toy"
ARMS = (("fp32", None, None), ("bf16 autocast", torch.bfloat16, None), ("fp16 autocast", torch.float16, None),
        ("bf16 weights", None, torch.bfloat16), ("fp16 weights", None, torch.float16))


def logprobs_of(model, batches, dtype) -> torch.Tensor:
    out = []
    with torch.inference_mode(), reused_buffers():
        for mb in batches:
            out.append(token_logprobs(model, mb, chunk_tokens=1024, dtype=dtype)[0])
    return torch.cat(out)


def train_pass(model, rows, batches, dtype) -> None:
    with reused_buffers():
        for mb in batches:
            loss, _, _ = fused_token_loss(model, mb, pg_is_loss(rows, mb), chunk_tokens=1024, dtype=dtype)
            loss.backward()
    model.zero_grad(set_to_none=True)


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(name: str, model, rows, budget: int, repeat: int) -> None:
    batches = plan_micro_batches(rows, np.arange(rows.num_rows), budget)
    copies = {w: (model if w is None else _copy_in(model, w)) for w in (None, torch.bfloat16, torch.float16)}
    reference = logprobs_of(model, batches, None).double()  # (T,)
    times: dict[str, list[float]] = {arm: [] for arm, _, _ in ARMS}
    train_times: dict[str, list[float]] = {arm: [] for arm, _, w in ARMS if w is None}
    for _ in range(repeat):  # interleaved: drift in machine load hits every arm alike
        for arm, autocast, weights in ARMS:
            m = copies[weights]
            times[arm].append(best(lambda m=m, a=autocast: logprobs_of(m, batches, a), 1))
            if weights is None:
                train_times[arm].append(best(lambda a=autocast: train_pass(model, rows, batches, a), 1))
    print(f"\n{name}: {rows.num_rows} rows, {rows.num_tokens:,} response tokens, mean log p "
          f"{reference.mean().item():.3f}")
    print(f"{'arm':15} {'mean |Δlogp|':>13} {'max |Δlogp|':>12} {'mean/eps':>9} {'max/eps':>8} {'k3 mean':>10} "
          f"{'infer s':>8} {'ratio':>6} {'train s':>8} {'ratio':>6}")
    for arm, autocast, weights in ARMS:
        low = logprobs_of(copies[weights], batches, autocast).double()
        d = (low - reference).abs()
        logr = low - reference
        k3 = (torch.expm1(logr) - logr).mean().item()
        eps = torch.finfo(autocast or weights or torch.float32).eps
        t, t32 = min(times[arm]), min(times["fp32"])
        train = f"{min(train_times[arm]):8.2f} {min(train_times[arm]) / min(train_times['fp32']):6.2f}" \
            if arm in train_times else f"{'–':>8} {'–':>6}"
        print(f"{arm:15} {d.mean().item():13.2e} {d.max().item():12.2e} {d.mean().item() / eps:9.3f} "
              f"{d.max().item() / eps:8.2f} {k3:10.2e} {t:8.2f} {t / t32:6.2f} {train}")


def _copy_in(model, dtype):
    import copy

    return copy.deepcopy(model).to(dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--response", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU; eps: bf16 {torch.finfo(torch.bfloat16).eps:.3g}, "
          f"fp16 {torch.finfo(torch.float16).eps:.3g}")

    toy, _ = load_model(TOY / "model")
    measure("toy (examples/toy, 2 layers, V 21)", toy.eval(), load_rows(str(TOY / "rollouts.arrow")), 4096,
            args.repeat)

    big = build_model(vocab=32000, hidden=512, layers=4)
    with torch.no_grad():  # peaked next-token distributions, as a trained model has (a random one is ~uniform)
        big.lm_head.weight.mul_(8.0)  # logit std ≈ 3.6, max ≈ 17 (std 0.45 at the default init)
    rows = make_rows(64, [args.response] * args.rows, 32000)
    measure(f"random Qwen2 (hidden 512, 4 layers, V 32,000, {args.rows} × (64 + {args.response}) tokens)",
            big.eval(), rows, 8192, args.repeat)


if __name__ == "__main__":
    main()
