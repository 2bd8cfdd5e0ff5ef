"""`drpo train` end to end on the bundled example (examples/toy: a 2-layer Qwen2, 192 rollouts)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import EPS32, FAST_TRAIN, GRAD_ULPS, LOGP_ULPS, METRIC_ULPS, assert_reordered
from safetensors.torch import load_file
from typer.testing import CliRunner

from drpo_cli.base.hooks import INTERRUPT_AFTER_STEP as INTERRUPT_HOOK
from drpo_cli.base.hooks import INTERRUPT_IN_STEP
from drpo_cli.cli import app
from drpo_cli.config import AGG_MODES, TrainConfig
from drpo_cli.model.batching import plan_micro_batches
from drpo_cli.model.checkpoint import load_model
from drpo_cli.objectives.aggregation import aggregate, aggregation_denominator
from drpo_cli.objectives.corrections import reference_kl
from drpo_cli.objectives.losses import token_loss
from drpo_cli.reports.report_format import TRAIN_REPORT_SCHEMA
from drpo_cli.rollouts.rows import load_rows
from drpo_cli.training.loop import accumulate_gradients

FAST = FAST_TRAIN


def train(toy: Path, out: Path, *args: str, env: dict | None = None):
    argv = ["train", "-r", str(toy / "rollouts.arrow"), "-m", str(toy / "model"), "--out", str(out), *args]
    return CliRunner().invoke(app, argv, env=env)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("loss", ["pg-is", "ppo-clip", "spo", "dppo-tv", "dppo-kl", "drpo", "gspo", "cispo"])
def test_every_loss_trains(toy, tmp_path, loss):
    from transformers import AutoModelForCausalLM

    before = digest(toy)
    out = tmp_path / "out"
    result = train(toy, out, "--loss", loss, "--minibatches", "2", *FAST)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"wrote {out} (policy version 9)"
    assert digest(toy) == before  # input checkpoint and rollouts untouched, byte for byte

    new, old = weights(out), weights(toy / "model")
    assert new.keys() == old.keys()
    assert any(not torch.equal(new[k], old[k]) for k in new)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 21

    meta = json.loads((out / "drpo_checkpoint.json").read_text())
    assert meta["policy_version"] == 9 and meta["training"]["loss"] == loss
    report = json.loads((out / "drpo_report.json").read_text())
    jsonschema.validate(report, TRAIN_REPORT_SCHEMA)
    assert [s["step"] for s in report["steps"]] == [0, 1]
    assert sum(s["tokens"] for s in report["steps"]) == report["input"]["trained_tokens"]  # one pass
    assert report["output"] == {"dir": str(out), "policy_version": 9}
    assert report["skipped_steps"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or state directory left


@pytest.mark.parametrize("loss", ["pg-is", "drpo"])
def test_surrogate_loss_goes_down_over_passes(toy, tmp_path, loss):
    result = train(toy, tmp_path / "out", "--loss", loss, "--epochs", "4", "--quiet", "--lr", "3e-3")
    assert result.exit_code == 0, result.output
    losses = [s["loss"] for s in json.loads((tmp_path / "out" / "drpo_report.json").read_text())["steps"]]
    assert len(losses) == 4
    assert all(b < a for a, b in itertools.pairwise(losses)), losses


# ---- gradient: independent of the micro-batch size, equal to the naive full-logits computation ------


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _naive_grads(model, rows, idx, cfg, ref_logp=None) -> dict[str, torch.Tensor]:
    """Pad-to-longest HF forward with full logits, log_softmax / temperature, the same loss and aggregation
    (plus β·KL(π‖π_ref) and −c·H(π) from the full logits when the config asks for them)."""
    mb = plan_micro_batches(rows, idx, 10**9)[0]  # one micro-batch holding every row
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids).logits
    logits = logits.reshape(-1, logits.shape[-1])[mb.src_index].float() / mb.temperature[:, None]  # (M, V)
    logp_all = torch.log_softmax(logits, -1)  # (M, V)
    logp = logp_all.gather(1, mb.target_ids[:, None]).squeeze(1)  # (M,)
    t = mb.token_index
    mask = torch.from_numpy(rows.loss_mask)[t]
    mu = torch.from_numpy(rows.behavior_logprobs)[t]
    adv = torch.from_numpy(rows.advantages)[t]
    loss_t = token_loss(cfg.loss, logp, mu, adv, mask=mask, seq_index=mb.seq_index, **cfg.loss_hparams())
    if ref_logp is not None:
        loss_t = loss_t + cfg.resolved_kl_coef() * reference_kl(cfg.kl_estimator, logp, ref_logp[t])
    if cfg.entropy_coef:
        loss_t = loss_t + cfg.entropy_coef * (logp_all.exp() * logp_all).sum(-1)  # −c·H
    denom = aggregation_denominator(cfg.agg, mask, mb.seq_index)
    aggregate(loss_t, mask, mb.seq_index, cfg.agg, denom, cfg.horizon).backward()
    return _grads(model)


@pytest.mark.parametrize("loss,agg,extra", [
    *(("drpo", agg, {}) for agg in AGG_MODES),
    ("gspo", "seq-mean-token-mean", {"eps_low": 0.05, "eps_high": 0.05}),
    ("gspo", "token-mean", {"eps_low": 0.05, "eps_high": 0.05}),
    ("cispo", "token-mean", {"eps_high": 0.2}),
    ("ppo-clip", "token-mean", {"ref_model": "ref", "kl_coef": 0.5, "kl_estimator": "k3", "entropy_coef": 0.1}),
    ("gspo", "seq-mean-token-sum", {"ref_model": "ref", "kl_coef": 0.5, "kl_estimator": "k2", "entropy_coef": 0.1}),
])
def test_gradient_does_not_depend_on_micro_batch_tokens(toy, loss, agg, extra):
    rows = load_rows(str(toy / "rollouts.arrow"))
    idx = np.arange(0, rows.num_rows, 3)  # 64 rows of 8..14 input positions
    model, _ = load_model(toy / "model")
    # Move π away from μ so that the loss's non-linear parts (clip/penalty) are exercised.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    t = torch.from_numpy
    inputs = {"anchor": t(rows.behavior_logprobs), "rho": torch.ones(rows.num_tokens),
              "behavior": t(rows.behavior_logprobs), "advantages": t(rows.advantages), "mask": t(rows.loss_mask)}
    trained = int(sum(rows.loss_mask[rows.response_offsets[i] : rows.response_offsets[i + 1]].sum() for i in idx))
    ref_logp = None
    if "ref_model" in extra:  # a reference policy a little away from both π and μ
        ref_logp = t(rows.behavior_logprobs) + 0.2 * torch.randn(rows.num_tokens, generator=torch.Generator().manual_seed(2))
        ref_logp = ref_logp.clamp(max=0.0)
    grads, losses = [], []
    for budget in (16, 100, 10**6):  # 1 row per micro-batch ... all rows in one
        cfg = TrainConfig(rollouts=("x",), model="m", loss=loss, agg=agg, micro_batch_tokens=budget, horizon=64,
                          chunk_tokens=7, **extra)  # several head chunks per micro-batch
        model.zero_grad(set_to_none=True)
        loss_value, diag, tokens = accumulate_gradients(model, rows, idx, cfg, ref_logp=ref_logp, **inputs)
        assert tokens == diag.summary()["data/tokens"] == trained
        grads.append(_grads(model))
        losses.append(loss_value.item())
    model.zero_grad(set_to_none=True)
    reference = _naive_grads(model, rows, idx, cfg, ref_logp)
    for g in grads:
        assert g.keys() == reference.keys()
        for k in g:  # the same sums in another order: micro-batches, head chunks, one padded forward
            assert_reordered(g[k], reference[k], GRAD_ULPS, msg=k)
    # The step loss is a c_t-weighted mean of per-token losses of log p, each moving with its log-prob (LOGP_ULPS
    # of 1 + |log p|); the mean averages those errors (measured: 2.5 ε of max(1, |loss|), every kernel set).
    assert_reordered(losses, [losses[-1]] * 3, LOGP_ULPS, scale=max(1.0, abs(losses[-1])), msg="loss")


# ---- determinism, resume, output location --------------------------------------------------------


def test_same_seed_same_weights(toy, tmp_path):
    args = ["--minibatches", "3", *FAST]
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert train(toy, tmp_path / name, "--seed", seed, *args).exit_code == 0
    a, b, c = (weights(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # another seed shuffles into other mini-batches


def test_interrupt_then_resume_reaches_the_same_weights(toy, tmp_path):
    args = ["--epochs", "2", "--minibatches", "2", "--warmup-steps", "3", *FAST]
    assert train(toy, tmp_path / "straight", *args).exit_code == 0

    out = tmp_path / "out"
    state = tmp_path / "out.partial-state"
    first = train(toy, out, *args, env={INTERRUPT_HOOK: "1"})  # SIGTERM right after step 1
    assert first.exit_code == 130, first.output
    assert first.stderr.splitlines() == [
        (f"error: interrupted after step 2 of 4; state saved to {state}; rerun the same command with --resume "
         "to continue")
    ]
    assert not out.exists() and state.is_dir()

    changed = train(toy, out, *args, "--resume", "--lr", "2e-3")
    assert changed.exit_code == 2 and "--lr" in changed.stderr

    second = train(toy, out, *args, "--resume")
    assert second.exit_code == 0, second.output
    assert not state.exists()
    a, b = weights(tmp_path / "straight"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((out / "drpo_report.json").read_text())
    straight = json.loads((tmp_path / "straight" / "drpo_report.json").read_text())
    assert [s["step"] for s in report["steps"]] == [0, 1, 2, 3]
    assert [s["loss"] for s in report["steps"]] == [s["loss"] for s in straight["steps"]]


@pytest.mark.parametrize("extra", [[], ["--grad-checkpointing"]])
def test_a_signal_inside_a_step_stops_it_between_layers_and_resume_reruns_it(toy, tmp_path, extra):
    # Issue 32, point 8: a signal used to wait for the end of the step, however long. The hook sends
    # SIGTERM from the first decoder layer's pre-hook of step 1; the next layer's stops the forward.
    args = ["--minibatches", "3", *FAST, *extra]
    assert train(toy, tmp_path / "straight", *args).exit_code == 0
    out, state = tmp_path / "out", tmp_path / "out.partial-state"
    first = train(toy, out, *args, env={INTERRUPT_IN_STEP: "1"})
    assert first.exit_code == 130, first.output
    assert first.stderr.splitlines() == [
        f"error: interrupted during step 2 of 3; state saved to {state}; rerun the same command with --resume to continue"]
    meta = json.loads((state / "state.json").read_text())
    assert meta["next_step"] == 1 and [s["step"] for s in meta["steps"]] == [0]  # step 1's gradients dropped
    second = train(toy, out, *args, "--resume")
    assert second.exit_code == 0, second.output
    a, b = weights(tmp_path / "straight"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_signal_in_a_step_of_minutes_ends_the_run_in_seconds(toy, tmp_path):
    # One step of 1,920 rows in 1,920 micro-batches (1 to 7 minutes here, with the closing audit as long):
    # SIGTERM inside its first forward ends the process within seconds of loading, state saved.
    table = pa.ipc.open_file(toy / "rollouts.arrow").read_all()
    big = pa.concat_tables([table] * 10).drop_columns(["sample_id"])
    with pa.ipc.new_file(tmp_path / "big.arrow", big.schema) as writer:
        writer.write_table(big)
    command = [sys.executable, "-m", "drpo_cli", "train", "-r", str(tmp_path / "big.arrow"), "-m", str(toy / "model"),
               "--out", str(tmp_path / "out"), "--quiet", "--micro-batch-tokens", "8", "--device", "cpu"]
    t0 = time.perf_counter()
    run = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", INTERRUPT_IN_STEP: "0"})
    assert run.returncode == 130, run.stderr
    assert time.perf_counter() - t0 < 60, run.stderr  # imports and loading (about 10 s), then the signal
    assert "interrupted during step 1 of 1; state saved to" in run.stderr
    assert (tmp_path / "out.partial-state").is_dir() and not (tmp_path / "out").exists()


def test_default_out_is_a_versioned_sibling(toy, tmp_path):
    shutil.copytree(toy / "model", tmp_path / "ckpt")
    argv = ["train", "-r", str(toy / "rollouts.arrow"), "-m", str(tmp_path / "ckpt"), *FAST]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"wrote {tmp_path / 'ckpt-v9'} (policy version 9)"
    assert (tmp_path / "ckpt-v9" / "drpo_report.json").is_file()
    again = CliRunner().invoke(app, argv)  # the sibling now exists: refused, nothing written
    assert again.exit_code == 2
    assert again.stderr.splitlines() == [
        f"error: --out {tmp_path / 'ckpt-v9'}: already exists (pass --overwrite to replace it)"
    ]
    assert CliRunner().invoke(app, [*argv, "--overwrite", "--loss", "pg-is"]).exit_code == 0
    meta = json.loads((tmp_path / "ckpt-v9" / "drpo_checkpoint.json").read_text())
    assert meta["training"]["loss"] == "pg-is"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ckpt-v9"]


def test_vocabulary_mismatch_is_refused(toy, tmp_path):
    table = pa.ipc.open_file(toy / "rollouts.arrow").read_all()
    rows = table.to_pylist()
    rows[5]["response_ids"] = [*rows[5]["response_ids"][:-1], 21]  # vocab is 21: ids 0..20
    with pa.ipc.new_file(tmp_path / "bad.arrow", table.schema) as writer:
        writer.write_table(pa.Table.from_pylist(rows, table.schema))
    argv = ["train", "-r", str(tmp_path / "bad.arrow"), "-m", str(toy / "model"), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        (f"error: {tmp_path / 'bad.arrow'}, column 'response_ids', row 5 (sample_id '{rows[5]['sample_id']}'): "
         f"expected token ids in [0, 21) (the vocabulary of {toy / 'model'}), "
         f"found 21 at token {len(rows[5]['response_ids']) - 1}")
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.arrow"]


def test_proximal_anchor_recomputed_with_truncated_correction(toy, tmp_path):
    out = tmp_path / "out"
    result = train(toy, out, "--anchor", "proximal", "--is-correction", "tis", "--is-cap", "1.5", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "drpo_report.json").read_text())
    assert report["loss"]["anchor"] == "proximal" and report["loss"]["is_correction"] == "tis"
    assert report["config"]["is_cap"] == 1.5


def test_non_finite_steps_are_counted_and_never_applied(toy, tmp_path):
    table = pa.ipc.open_file(toy / "rollouts.arrow").read_all()
    # A = 3e38 (finite in float32) times r > 1.14 overflows −A·r to −inf on some tokens of every step.
    table = table.drop_columns(["reward", "group_id"]).append_column(
        "advantage", pa.array(np.full(table.num_rows, 3e38, dtype=np.float32)))
    with pa.ipc.new_file(tmp_path / "huge.arrow", table.schema) as writer:
        writer.write_table(table)
    argv = ["train", "-r", str(tmp_path / "huge.arrow"), "-m", str(toy / "model"), "--out", str(tmp_path / "o"),
            "--loss", "pg-is", "--minibatches", "2", *FAST]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o" / "drpo_report.json").read_text())
    assert report["skipped_steps"] == 2
    assert [(s["skipped"], s["loss"]) for s in report["steps"]] == [(True, None), (True, None)]
    new, old = weights(tmp_path / "o"), weights(toy / "model")
    assert all(torch.equal(new[k], old[k]) for k in old)


def test_a_learning_rate_adamw_cannot_apply_is_refused_and_a_huge_one_skips_its_non_finite_steps(toy, tmp_path):
    # Issue 32, point 7: --lr 1e38 trained every step, then lost the run in the histograms.
    # AdamW's first update is lr / (1 − β1) = 10·lr: above the float32 range it cannot be applied at all.
    refused = train(toy, tmp_path / "refused", *FAST, "--lr", "1e38")
    assert refused.exit_code == 2
    assert refused.stderr.splitlines() == [
        "error: --lr must be > 0 and <= 3.4e37 (AdamW's first update, 10·lr, is a float32), got 1e+38"]
    # Just inside it, step 0 moves the weights by ~3.4e38: every later gradient norm overflows, so those
    # steps are skipped and counted, and the run ends with its checkpoint and report.
    out = tmp_path / "o"
    result = train(toy, out, "--lr", "3.4e37", "--minibatches", "4", "--quiet", "--micro-batch-tokens", "512")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "drpo_report.json").read_text())
    jsonschema.validate(report, TRAIN_REPORT_SCHEMA)
    assert [s["skipped"] for s in report["steps"]] == [False, True, True, True] and report["skipped_steps"] == 3
    assert [s["grad_norm"] is None for s in report["steps"]] == [False, True, True, True]
    assert report["diverged"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_an_update_that_makes_weights_non_finite_stops_the_run_which_still_writes_checkpoint_and_report(
        toy, tmp_path, monkeypatch):
    # Whatever the cause (here an optimizer that writes +inf), every later forward would be NaN: the run
    # stops after that step, the closing audit leaves the NaN log-probs out of its statistics and its
    # μ-π histogram (once an IndexError that lost the run), the checkpoint and report are written, and
    # the exit code (1) and one line say what happened. The next round refuses the weights at load.
    import drpo_cli.training.train as train_module

    adamw = train_module._adamw

    def poisoned(params, cfg):
        optimizer = adamw(params, cfg)
        step = optimizer.step

        def step_then_overflow(*args, **kwargs):
            out = step(*args, **kwargs)
            with torch.no_grad():
                params[0].fill_(float("inf"))  # the (tied) embedding: every log-prob NaN
            return out

        optimizer.step = step_then_overflow
        return optimizer

    monkeypatch.setattr(train_module, "_adamw", poisoned)
    out = tmp_path / "o"
    result = train(toy, out, "--minibatches", "4", *FAST)
    assert result.exit_code == 1, result.output
    report = json.loads((out / "drpo_report.json").read_text())
    jsonschema.validate(report, TRAIN_REPORT_SCHEMA)
    parameter = report["diverged"]["parameter"]
    assert result.stderr.splitlines() == [
        (f"error: wrote {out} (policy version 9) but training diverged: the update of step 0 made {parameter} "
         "non-finite, so the run stopped there and drpo will refuse these weights; lower --lr (0.001) or "
         "--max-grad-norm (1)")]
    assert [(s["step"], s["skipped"]) for s in report["steps"]] == [(0, False)] and report["diverged"]["step"] == 0
    trained = report["input"]["trained_tokens"]
    assert (f"{trained} of {trained} trained tokens have a non-finite log-prob under the model (NaN or ±inf: "
            f"diverged weights or an overflow); every statistic is over the other 0") in report["notes"]
    histogram = report["final"]["mu_pi_histogram"]
    assert sum(map(sum, histogram["positive"] + histogram["negative"])) == 0
    assert report["final"]["metrics"]["kl/k3_mean"] is None
    inspect = CliRunner().invoke(app, ["inspect", str(toy / "rollouts.arrow"), "--model", str(out), "--quiet"])
    assert inspect.exit_code == 2 and "drpo refuses non-finite weights" in inspect.stderr  # the next round


def test_gradient_checkpointing_changes_nothing_but_memory(toy, tmp_path):
    for name, extra in (("plain", []), ("ckpt", ["--grad-checkpointing"])):
        assert train(toy, tmp_path / name, "--minibatches", "2", *FAST, *extra).exit_code == 0
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "ckpt")
    for k in a:  # the recompute repeats the forward's ops on the same inputs: the same arithmetic, bit for bit
        assert torch.equal(a[k], b[k]), k


def test_reference_kl_entropy_rejection_and_stale_filters_in_the_report(toy, tmp_path):
    rows = load_rows(str(toy / "rollouts.arrow"))
    lag = 8 - rows.policy_version  # the toy checkpoint is version 8
    out = tmp_path / "out"
    result = train(toy, out, "--loss", "cispo", "--ref-model", str(toy / "model"), "--kl-coef", "0.5",
                   "--kl-estimator", "k3", "--entropy-coef", "0.01", "--reject", "seq_mean_k3>0.02",
                   "--reject", "token_k2>0.5", "--max-lag", "2", "--anchor", "proximal", "--is-correction", "tis",
                   "--is-level", "sequence", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "drpo_report.json").read_text())
    jsonschema.validate(report, TRAIN_REPORT_SCHEMA)
    kept_rows = lag <= 2
    trained = rows.loss_mask[np.repeat(kept_rows, rows.response_lengths())]
    assert report["filters"]["staleness"] == {
        "max_lag": 2, "min_version": None, "current_version": 8, "rows_dropped": int((~kept_rows).sum()),
        "tokens_dropped": int(rows.loss_mask.sum() - trained.sum()), "tokens_masked": 0,
        "rows_kept": int(kept_rows.sum()), "rows_without_version": 0}
    rejection = report["filters"]["rejection"]
    assert rejection["criteria"] == ["seq_mean_k3>0.02", "token_k2>0.5"] and 0 < rejection["seq_frac"] < 1
    # Trained tokens: kept rows minus rejected tokens, once over the single pass.
    assert report["steps"][0]["tokens"] == int(trained.sum()) - rejection["tokens_rejected"]
    assert report["loss"]["reference_kl"] == {"model": str(toy / "model"), "coef": 0.5, "estimator": "k3"}
    assert report["loss"]["entropy_coef"] == 0.01 and report["loss"]["is_level"] == "sequence"
    first = report["steps"][0]["metrics"]
    # π = π_ref at the first step (same checkpoint): every KL estimate is 0 up to float rounding, the two passes'
    # log-probs within METRIC_ULPS; k3 ≈ (log r)²/2 is below the square of that.
    assert abs(first["kl/ref_k1_mean"]) <= METRIC_ULPS * EPS32 and first["entropy/mean"] > 0
    assert first["kl/ref_k3_mean"] <= (METRIC_ULPS * EPS32) ** 2
    assert "cispo/clip_frac" in first and report["final"]["metrics"]["kl/ref_k3_mean"] > 0  # the weights moved
