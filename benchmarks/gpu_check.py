"""GPU check: one line per check, in under 5 minutes on one GPU; on a machine without one it says so and exits 0.

    python benchmarks/gpu_check.py

Checks (each prints `ok`/`FAIL` and its figures on one line; the exit code is 1 if any failed):
1. bf16 autocast log-probs vs fp32 on the same weights: max |Δ log p| ≤ 0.05 nats and mean ≤ 0.01
   (bf16 has 8 mantissa bits; the log-softmax itself is always float32).
2. a 1-GPU torchrun + nccl `drpo train` step on the bundled example (FSDP2 path, exit 0, weights written).
3. fused chunked head vs the naive full-logits head: forward + backward time and peak CUDA memory
   on 4,096 tokens with a 151,936-token head (gradients agree to 1e-4 relative).
4. attention: which implementation transformers picks (sdpa / flash_attention_2) and whether
   torch's flash or memory-efficient SDPA kernel runs for a bf16 causal batch.
5. fp16 autocast log-probs vs fp32, check 1's tolerances scaled by ε (fp16 ε is 1/8 of bf16's), and a
   `drpo train --dtype fp16` step with its loss scaler (exit 0, amp/loss_scale reported, the step applied).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "examples" / "toy"


def line(name: str, ok: bool, detail: str) -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return ok


def check_bf16_parity(torch) -> bool:
    import numpy as np
    from train_step import build_model, make_rows

    from drpo_cli.model.batching import plan_micro_batches
    from drpo_cli.model.logprobs import token_logprobs

    model = build_model(32_000, 512, 4).cuda().eval()
    rows = make_rows(64, 448, 8, 32_000)
    mb = plan_micro_batches(rows, np.arange(rows.num_rows), 1 << 20)[0].to("cuda")
    with torch.inference_mode():
        fp32 = token_logprobs(model, mb)[0]
        bf16 = token_logprobs(model, mb, dtype=torch.bfloat16)[0]
    diff = (bf16.float() - fp32).abs()
    ok = diff.max().item() <= 0.05 and diff.mean().item() <= 0.01
    return line("bf16 autocast log-prob parity", ok, f"max |Δ| {diff.max().item():.4f}, mean {diff.mean().item():.5f} "
                f"nats over {diff.numel()} tokens (tolerance max 0.05, mean 0.01)")


def check_fp16(torch) -> bool:
    import json

    import numpy as np
    from train_step import build_model, make_rows

    from drpo_cli.model.batching import plan_micro_batches
    from drpo_cli.model.logprobs import token_logprobs

    model = build_model(32_000, 512, 4).cuda().eval()
    rows = make_rows(64, 448, 8, 32_000)
    mb = plan_micro_batches(rows, np.arange(rows.num_rows), 1 << 20)[0].to("cuda")
    with torch.inference_mode():
        diff = (token_logprobs(model, mb, dtype=torch.float16)[0] - token_logprobs(model, mb)[0]).abs()
    scale = torch.finfo(torch.float16).eps / torch.finfo(torch.bfloat16).eps
    parity = diff.max().item() <= 0.05 * scale and diff.mean().item() <= 0.01 * scale
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        command = [sys.executable, "-m", "drpo_cli", "train", "-r", str(TOY / "rollouts.arrow"), "-m",
                   str(TOY / "model"), "--out", str(out), "--device", "cuda", "--dtype", "fp16", "--quiet",
                   "--lr", "1e-3"]
        run = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        report = json.loads((out / "drpo_report.json").read_text()) if run.returncode == 0 else None
    step = report["steps"][0] if report else {}
    ok = parity and run.returncode == 0 and not step.get("skipped", True)
    return line("fp16 autocast parity and loss-scaled train step", ok,
                f"max |Δ| {diff.max().item():.5f}, mean {diff.mean().item():.6f} nats (tolerance "
                f"{0.05 * scale:.5f}, {0.01 * scale:.6f}); train exit {run.returncode}, loss scale "
                f"{step.get('metrics', {}).get('amp/loss_scale')}, skipped {step.get('skipped')}")


def check_torchrun_step() -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m",
                   "drpo_cli", "train", "-r", str(TOY / "rollouts.arrow"), "-m", str(TOY / "model"), "--out", str(out),
                   "--device", "cuda", "--quiet", "--lr", "1e-3"]
        t0 = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        seconds = time.perf_counter() - t0
        ok = run.returncode == 0 and (out / "model.safetensors").is_file()
        tail = "" if ok else " | " + (run.stderr.strip().splitlines() or ["no stderr"])[-1][:200]
        return line("1-GPU torchrun + nccl train step", ok, f"exit {run.returncode} in {seconds:.1f} s{tail}")


def check_fused_head(torch) -> bool:
    import numpy as np
    from train_step import build_model, make_rows, naive_logprobs

    from drpo_cli.model.batching import plan_micro_batches
    from drpo_cli.model.logprobs import fused_token_loss

    model = build_model(151_936, 512, 2).cuda()
    rows = make_rows(64, 512, 8, 151_936)
    mb = plan_micro_batches(rows, np.arange(rows.num_rows), 1 << 20)[0].to("cuda")
    results = {}
    for way in ("naive", "fused"):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_mem = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        if way == "naive":
            loss = (naive_logprobs(model, mb) * 0.5).sum()
        else:
            loss = fused_token_loss(model, mb, lambda logp, sl: (logp * 0.5).sum())[0]
        loss.backward()
        torch.cuda.synchronize()
        grad = model.get_output_embeddings().weight.grad.clone()
        results[way] = (time.perf_counter() - t0, torch.cuda.max_memory_allocated() - start_mem, grad)
    (tn, mn, gn), (tf, mf, gf) = results["naive"], results["fused"]
    rel = ((gf - gn).norm() / gn.norm()).item()
    return line("fused head vs naive", rel <= 1e-4, f"time {tf * 1e3:.0f} vs {tn * 1e3:.0f} ms ({tn / tf:.1f}x), peak "
                f"{mf / 1e9:.2f} vs {mn / 1e9:.2f} GB ({mn / max(mf, 1):.1f}x), head grad rel diff {rel:.1e}")


def check_attention(torch) -> bool:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from drpo_cli.model.checkpoint import load_model

    model, _ = load_model(TOY / "model", device="cuda", dtype="bfloat16")
    impl = getattr(model.config, "_attn_implementation", "?")
    q = torch.randn(2, 8, 1024, 64, device="cuda", dtype=torch.bfloat16)
    kernels = []
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
            kernels.append(name)
        except RuntimeError:
            pass
    ok = impl in ("sdpa", "flash_attention_2") and bool(kernels)
    return line("attention kernels", ok, f"transformers uses {impl}; fused SDPA kernels available: "
                f"{', '.join(kernels) or 'none (math fallback)'}")


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False; nothing to check (exit 0)")
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    print(f"GPU: {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})", flush=True)
    results = []
    for check in (lambda: check_bf16_parity(torch), check_torchrun_step, lambda: check_fused_head(torch),
                  lambda: check_attention(torch), lambda: check_fp16(torch)):
        try:
            results.append(check())
        except Exception as err:  # noqa: BLE001 - one failing check must not hide the others
            results.append(line(getattr(check, "__name__", "check"), False, f"{type(err).__name__}: {err}"[:300]))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
