"""Mixed precision on the CPU (torch's CPU autocast): bf16 and fp16 against fp32, all in CI.

Tolerances come from the dtype's machine epsilon ε (bf16 2^-7, fp16 2^-10): log p = z_y − lse(z), so
|Δ log p| ≤ 2·max_v |δz_v|, and each GEMM of the toy model (2 layers, then the head) rounds its
inputs to the dtype (relative ε/2 each) while accumulating in float32, so on its O(1) logits |δz| is a
few ε. Bounds used: max |Δ log p| ≤ 8ε and mean ≤ ε (measured: max 3.2ε, mean 0.6ε for both dtypes,
benchmarks/precision.py).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import FAST_TRAIN, LOGP_ULPS, assert_reordered
from safetensors.torch import load_file
from typer.testing import CliRunner

from drpo_cli.cli import app
from drpo_cli.config import TrainConfig
from drpo_cli.model.batching import plan_micro_batches
from drpo_cli.model.checkpoint import load_model
from drpo_cli.model.head import in_dtype, output_head
from drpo_cli.model.logprobs import (
    fused_token_loss,
    response_hidden_states,
    token_logprobs,
)
from drpo_cli.rollouts.rows import load_rows
from drpo_cli.training.loop import accumulate_gradients

LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
FAST = [*FAST_TRAIN, "--device", "cpu"]


@pytest.fixture(scope="module")
def toy_model(toy):
    model, _ = load_model(toy / "model")
    return model.eval(), load_rows(str(toy / "rollouts.arrow"))


def _logprobs(model, rows, dtype, budget=512):
    out = torch.zeros(rows.num_tokens)
    with torch.inference_mode():
        for mb in plan_micro_batches(rows, np.arange(rows.num_rows), budget):
            out[mb.token_index] = token_logprobs(model, mb, chunk_tokens=64, dtype=dtype)[0]
    return out


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_log_probs_under_autocast_stay_within_the_dtype_tolerance(toy_model, name):
    model, rows = toy_model
    eps = torch.finfo(LOW[name]).eps
    ref, low = _logprobs(model, rows, None), _logprobs(model, rows, LOW[name])
    d = (low - ref).abs()
    assert low.dtype == torch.float32 and d.max() > 0  # it did run in the low dtype
    assert d.max().item() <= 8 * eps and d.mean().item() <= eps, (d.max().item() / eps, d.mean().item() / eps)
    # The weights stored in the dtype (inspect --dtype) obey the same bound.
    stored = _logprobs(_copy(model).to(LOW[name]), rows, None)
    assert (stored - ref).abs().max().item() <= 8 * eps


def _copy(model):
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head_gemm_runs_in_the_low_dtype_and_log_sum_exp_in_float32(toy_model, dtype):
    model, rows = toy_model
    (mb,) = plan_micro_batches(rows, np.arange(8), 10**6)
    head = in_dtype(output_head(model), dtype)
    assert head.low.dtype == dtype and head.weight.dtype == torch.float32
    assert in_dtype(output_head(model), None).low is None
    with torch.inference_mode():
        ours, _ = token_logprobs(model, mb, chunk_tokens=5, dtype=dtype)
        h = response_hidden_states(model, mb, dtype=dtype)  # (M, H) under autocast
        z = torch.mm(h.to(dtype), model.lm_head.weight.to(dtype).t()).float() / mb.temperature[:, None]  # (M, V)
        naive = torch.log_softmax(z, dim=-1).gather(1, mb.target_ids[:, None]).squeeze(1)
    # The same low-dtype GEMM inputs, chunked or whole, and float32 log-softmax: other sums (LOGP_ULPS).
    assert_reordered(ours, naive, LOGP_ULPS, scale=1 + naive.abs(), msg="log-probs")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_head_gradients_under_autocast_match_autograd_through_hf_logits(toy_model, dtype):
    # The naive way: the whole HF forward under autocast (its lm_head GEMM in the dtype), float32
    # log-softmax, autograd. The fused path forms the same head gradients in its forward.
    model, rows = toy_model
    (mb,) = plan_micro_batches(rows, np.arange(16), 10**6)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(mb.num_tokens, generator=g) * 1024  # large enough that fp16 keeps the gradients
    model.zero_grad(set_to_none=True)
    loss, _, _ = fused_token_loss(model, mb, lambda lp, sl: (weight[sl] * lp).sum(), chunk_tokens=7, dtype=dtype)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype):
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids).logits
    z = logits.reshape(-1, logits.shape[-1])[mb.src_index].float() / mb.temperature[:, None]
    naive_loss = (weight * torch.log_softmax(z, -1).gather(1, mb.target_ids[:, None]).squeeze(1)).sum()
    naive_loss.backward()
    eps = torch.finfo(dtype).eps
    assert abs(loss.item() - naive_loss.item()) <= 4 * eps * abs(naive_loss.item())
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and ours[n].dtype == torch.float32  # fp32 master weights and grads
        scale = p.grad.abs().max().item()
        assert (ours[n] - p.grad).abs().max().item() <= 8 * eps * scale, n
    model.zero_grad(set_to_none=True)


def _step_inputs(rows) -> dict:
    """accumulate_gradients' per-token tensors for the behavior anchor, no correction."""
    t = torch.from_numpy
    return {"anchor": t(rows.behavior_logprobs), "rho": torch.ones(rows.num_tokens),
            "behavior": t(rows.behavior_logprobs), "advantages": t(rows.advantages), "mask": t(rows.loss_mask)}


def test_loss_scale_multiplies_the_gradients_exactly_and_leaves_the_loss(toy_model):
    # fp16's loss scale enters as a factor on every coefficient; a power of two scales exactly.
    model, rows = toy_model
    inputs = _step_inputs(rows)
    cfg = TrainConfig(rollouts=("x",), model="m", loss="ppo-clip", micro_batch_tokens=256, entropy_coef=0.01)
    idx = np.arange(0, rows.num_rows, 4)
    runs = []
    for scale in (1.0, 2.0**16):
        model.zero_grad(set_to_none=True)
        loss, _, _ = accumulate_gradients(model, rows, idx, cfg, scale=scale, **inputs)
        runs.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l1, g1), (l2, g2) = runs
    assert l1 == l2
    assert all(torch.equal(g2[n], g1[n] * 2.0**16) for n in g1)
    model.zero_grad(set_to_none=True)


def test_master_weights_stay_float32_under_autocast(toy_model):
    model, rows = toy_model
    inputs = _step_inputs(rows)
    cfg = TrainConfig(rollouts=("x",), model="m", micro_batch_tokens=256)
    grads = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        model.zero_grad(set_to_none=True)
        accumulate_gradients(model, rows, np.arange(32), cfg, autocast=dtype, **inputs)
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    eps = torch.finfo(torch.bfloat16).eps
    norm = torch.cat([g.reshape(-1) for g in grads["fp32"].values()]).norm()
    diff = torch.cat([(grads["bf16"][n] - grads["fp32"][n]).reshape(-1) for n in grads["fp32"]]).norm()
    assert 0 < diff <= 8 * eps * norm
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_train_and_inspect_run_in_every_dtype_on_cpu(toy, tmp_path, dtype):
    out = tmp_path / "out"
    argv = ["train", "-r", str(toy / "rollouts.arrow"), "-m", str(toy / "model"), "--out", str(out),
            "--dtype", dtype, "--minibatches", "2", *FAST]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "drpo_report.json").read_text())
    assert report["config"]["dtype"] == dtype and report["skipped_steps"] == 0
    first = report["steps"][0]["metrics"]
    assert first.get("amp/loss_scale") == (65536.0 if dtype == "fp16" else None)
    # The checkpoint keeps the input's float32 weights (fp32 master weights), and they moved.
    new, old = load_file(str(out / "model.safetensors")), load_file(str(toy / "model" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in new.values())
    assert any(not torch.equal(new[k], old[k]) for k in new)

    json_out = tmp_path / "inspect.json"
    result = CliRunner().invoke(app, ["inspect", str(toy / "rollouts.arrow"), "--model", str(toy / "model"), "--quiet",
                                      "--dtype", dtype, "--device", "cpu", "--json", str(json_out)])
    assert result.exit_code == 0, result.output
    audit = json.loads(json_out.read_text())
    assert audit["model"]["dtype"] == {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    assert audit["metrics"]["kl/k3_mean"] > 0


def test_fp16_resume_keeps_the_loss_scale(toy, tmp_path):
    from drpo_cli.base.hooks import INTERRUPT_AFTER_STEP as INTERRUPT_HOOK

    args = ["--dtype", "fp16", "--minibatches", "3", *FAST]
    runner = CliRunner()

    def run(out, *extra, env=None):
        argv = ["train", "-r", str(toy / "rollouts.arrow"), "-m", str(toy / "model"), "--out", str(out), *args, *extra]
        return runner.invoke(app, argv, env=env)

    assert run(tmp_path / "straight").exit_code == 0
    out, state = tmp_path / "out", tmp_path / "out.partial-state"
    assert run(out, env={INTERRUPT_HOOK: "0"}).exit_code == 130
    marker = json.loads((state / "state.json").read_text())
    assert marker["scaler"]["scale"] == 65536.0
    assert run(out, "--resume").exit_code == 0
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A scale lowered by overflows before the interrupt is the one the resumed steps use.
    shutil.rmtree(out)
    assert run(out, env={INTERRUPT_HOOK: "0"}).exit_code == 130
    marker = json.loads((state / "state.json").read_text())
    (state / "state.json").write_text(json.dumps({**marker, "scaler": {**marker["scaler"], "scale": 1024.0}}))
    assert run(out, "--resume").exit_code == 0
    steps = json.loads((out / "drpo_report.json").read_text())["steps"]
    assert [s["metrics"]["amp/loss_scale"] for s in steps] == [65536.0, 1024.0, 1024.0]
