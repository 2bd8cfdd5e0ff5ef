"""Corrections usable with every loss (SPEC.md §1): the veto, batch self-normalised IS weights, seq-mask-tis.

Hand values, parity with naive re-implementations of the references (slime's veto, verl's / slime's
batch normalisation, NeMo-RL's seq-mask-tis), the preset equal to the options it stands for, and the
normalisation factor independent of how a step is split.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import FAST_TRAIN, METRIC_ULPS, assert_reordered, assert_trained_alike
from typer.testing import CliRunner

from drpo_cli.cli import app
from drpo_cli.config import SEQ_MASK_TIS_BAND, TrainConfig, expand_correction
from drpo_cli.objectives.aggregation import aggregate, aggregation_denominator
from drpo_cli.objectives.catalog import LOSS_NAMES
from drpo_cli.objectives.corrections import (
    batch_normalize,
    behavior_weight,
    rejection_mask,
    veto_mask,
    weight_mean,
    weight_sum_parts,
)
from drpo_cli.objectives.losses import token_loss

FAST = FAST_TRAIN


def _random_case(seed: int, n_seq: int = 12, length: int = 9):
    g = torch.Generator().manual_seed(seed)
    seq = torch.arange(n_seq).repeat_interleave(length)  # (N,)
    beh = -torch.rand(seq.numel(), generator=g, dtype=torch.float64) * 4  # (N,) log μ
    prox = (beh + 0.6 * torch.randn(seq.numel(), generator=g, dtype=torch.float64)).clamp(max=0.0)  # log π_old
    mask = torch.rand(seq.numel(), generator=g) > 0.15
    return prox.float(), beh.float(), mask, seq


# ---- the veto (slime's calculate_veto_mask) -----------------------------------------------------------


def test_veto_drops_every_token_of_a_sequence_with_one_catastrophic_token():
    log = math.log
    # Sequence 0: a token at ρ = 1e-5 < 1e-4 drops it whole. Sequence 1: ρ = 2e-4, kept. Sequence 2: the
    # catastrophic token is masked out (a tool-output token), so it cannot veto.
    prox = torch.tensor([-1.0, -1.0 + log(1e-5), -0.5, -2.0 + log(2e-4), -0.3, -1.0 + log(1e-6), -0.2])
    beh = torch.tensor([-1.0, -1.0, -0.5, -2.0, -0.3, -1.0, -0.2])
    mask = torch.tensor([True, True, True, True, True, False, True])
    seq = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    kept, bad = veto_mask(1e-4, prox, beh, mask, seq)
    assert kept.tolist() == [False, False, False, True, True, False, True]  # masked tokens are never kept
    assert bad.tolist() == [False, True, False, False, False, False, False]


@pytest.mark.parametrize("threshold", [1e-4, 0.3, 0.5])
def test_veto_equals_its_rejection_criterion_and_a_naive_loop(threshold):
    prox, beh, mask, seq = _random_case(0)
    kept, bad = veto_mask(threshold, prox, beh, mask, seq)
    same = rejection_mask([("seq_max", "k1", ">", -math.log(threshold))], prox, beh, mask, seq)
    assert torch.equal(kept, same)
    for s in seq.unique():  # slime: per sequence, any(log ρ < log threshold over the loss mask)
        on = (seq == s) & mask
        vetoed = bool(((prox - beh)[on] < math.log(threshold)).any())
        assert kept[on].tolist() == [not vetoed] * int(on.sum())
    assert 0 < kept.sum() < mask.sum() or threshold == 1e-4
    assert torch.equal(bad, mask & (prox - beh < math.log(threshold)))


# ---- batch self-normalisation -------------------------------------------------------------------------


def test_weight_mean_is_the_exact_mean_of_the_float32_weights():
    w = torch.tensor([0.5, 1.0, 3.0, 1e-30, 2.5, 7.0], dtype=torch.float32)
    mask = torch.tensor([True, True, True, True, False, True])
    seq = torch.tensor([0, 0, 1, 2, 2, 3])
    assert weight_mean(weight_sum_parts(w, mask, seq, "token")) == float(
        sum(Fraction(float(x)) for x in w[mask]) / 5)
    # One weight per sequence with a trained token (every token of a sequence carries the same one).
    same = torch.tensor([2.0, 2.0, 3.0, 0.25, 0.25, 7.0])
    assert weight_mean(weight_sum_parts(same, mask, seq, "sequence")) == (2 + 3 + 0.25 + 7) / 4
    assert weight_mean(weight_sum_parts(w, torch.zeros(6, dtype=torch.bool), seq, "token")) is None


def test_weight_parts_add_up_over_any_split_to_the_same_bits():
    g = torch.Generator().manual_seed(3)
    w = torch.exp(torch.randn(5000, generator=g) * 6).float()  # (N,) weights over 2^-30 .. 2^30
    mask, seq = torch.rand(5000, generator=g) > 0.1, torch.arange(5000) // 7
    whole = weight_mean(weight_sum_parts(w, mask, seq, "token"))
    exact = float(sum(Fraction(float(x)) for x in w[mask]) / int(mask.sum()))
    assert whole == exact
    for cuts in ([2500], [7, 700, 4000], list(range(0, 5000, 13))[1:]):
        parts = sum(weight_sum_parts(w[a:b], mask[a:b], seq[a:b], "token")
                    for a, b in zip([0, *cuts], [*cuts, 5000]))
        assert weight_mean(parts) == whole  # bit for bit, unlike a float sum in another order


def test_batch_normalize_follows_verl_and_leaves_a_vanishing_mean_alone():
    w = torch.tensor([0.5, 1.5, 2.0])
    normalized, factor = batch_normalize(w, 4 / 3)
    assert factor == 4 / 3 and torch.allclose(normalized, torch.tensor([0.375, 1.125, 1.5]))
    for mean in (1e-9, 0.0, None):
        same, factor = batch_normalize(w, mean)
        assert factor == 1.0 and torch.equal(same, w)


def test_is_kind_is_the_untruncated_ratio():
    prox, beh, mask, _ = _random_case(1)
    w = behavior_weight("is", prox, beh, mask=mask)
    expected = torch.where(mask, torch.exp((prox - beh).clamp(-20, 20)), torch.zeros_like(prox))
    torch.testing.assert_close(w, expected)
    assert w.max() > 2.0  # not truncated at tis's cap


# ---- seq-mask-tis (NeMo-RL's ClippedPGLossFn, truncated_importance_sampling_type "seq-mask-tis") ----------


def _nemo_seq_mask_tis(logp, prox, beh, adv, mask, seq, lo, hi, eps=0.2):
    """NeMo-RL's token-level loss with seq-mask-tis, written the reference's way: the geometric mean of
    ρ over each sequence's trained tokens, sequences outside [lo, hi] get IS weight 0, the others the raw
    token ρ; PPO-clip on π/π_old; masked_mean over the trained tokens (masked sequences still count)."""
    log_is = prox - beh
    weights = torch.zeros_like(logp)
    for s in seq.unique():
        on = (seq == s) & mask
        geo = torch.exp(log_is[on].double().mean())
        kept = float(lo <= geo <= hi)
        weights[seq == s] = torch.exp(log_is[seq == s]) * kept
    ratio = torch.exp(logp - prox)
    clip_loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps))
    return (weights * clip_loss * mask).sum() / mask.sum()


def test_seq_mask_tis_composition_equals_nemo_rl_values_and_gradients():
    prox, beh, mask, seq = _random_case(2, n_seq=16)
    # Logged μ close to π_old on half the sequences, so that the band keeps some and masks others.
    near = (seq % 2 == 0)
    beh = torch.where(near, prox - 0.0004 * torch.sin(torch.arange(prox.numel()).float()), beh)
    g = torch.Generator().manual_seed(5)
    logp = (prox + 0.3 * torch.randn(prox.numel(), generator=g)).clamp(max=0.0).requires_grad_(True)
    adv = torch.randn(prox.numel(), generator=g)
    lo, hi = SEQ_MASK_TIS_BAND

    cfg = expand_correction(TrainConfig(rollouts=("x",), model="m", anchor="proximal", correction="seq-mask-tis"))
    assert (cfg.is_correction, cfg.is_level, cfg.reject_mode, cfg.correction) == ("is", "token", "zero", "none")
    rho = behavior_weight(cfg.is_correction, prox, beh, mask=mask, level=cfg.is_level, seq_index=seq)
    kept = rejection_mask(cfg.reject_criteria(), prox, beh, mask, seq)
    rho = rho * kept  # --reject-mode zero: weight 0, still in the denominators
    assert 0 < kept.sum() < mask.sum()
    per_token = rho * token_loss("ppo-clip", logp, prox, adv, mask=mask, eps_low=0.2, eps_high=0.2)
    ours = aggregate(per_token, mask, seq, "token-mean", aggregation_denominator("token-mean", mask, seq))
    (g_ours,) = torch.autograd.grad(ours, logp)
    ref = _nemo_seq_mask_tis(logp, prox, beh, adv, mask, seq, lo, hi)
    (g_ref,) = torch.autograd.grad(ref, logp)
    # The same float32 terms summed in another order (≤ log2 n < 8 roundings of the terms' mean |ρ·loss|);
    # each token's gradient is a product of a few rounded factors (c, ρ, A, r), no sum: within 4 ε of itself.
    terms = (per_token.detach().abs() * mask).sum() / mask.sum()
    assert_reordered(ours, ref, 8, scale=terms, msg="loss")
    assert_reordered(g_ours, g_ref, 4, scale=g_ref.abs(), msg="gradient")


def test_seq_mask_tis_band_is_the_geometric_mean_of_rho():
    # ρ = (1.0005, 0.9995) → geometric mean 0.99999987: inside; (1.003, 1.001): 1.002 > hi... just outside.
    beh = torch.zeros(4) - 1.0
    prox = beh + torch.log(torch.tensor([1.0005, 0.9995, 1.003, 1.0015]))
    seq, mask = torch.tensor([0, 0, 1, 1]), torch.ones(4, dtype=torch.bool)
    cfg = expand_correction(TrainConfig(rollouts=("x",), model="m", anchor="proximal", correction="seq-mask-tis"))
    kept = rejection_mask(cfg.reject_criteria(), prox, beh, mask, seq)
    assert kept.tolist() == [True, True, False, False]  # sqrt(1.003 · 1.0015) = 1.00225 > 1.002


def test_preset_expands_to_the_options_and_is_idempotent():
    cfg = TrainConfig(rollouts=("x",), model="m", anchor="proximal", correction="seq-mask-tis", is_band=(0.9, 1.1),
                      reject=("token_k2>3",))
    run = expand_correction(cfg)
    assert run.reject == ("token_k2>3", f"seq_mean_k1>{-math.log(0.9)!r}", f"seq_mean_k1<{-math.log(1.1)!r}")
    assert run.is_band is None and expand_correction(run) == run
    assert expand_correction(TrainConfig(rollouts=("x",), model="m")).reject_mode == "mask"
    zero_lo = expand_correction(TrainConfig(rollouts=("x",), model="m", anchor="proximal",
                                            correction="seq-mask-tis", is_band=(0.0, 1.5)))
    assert zero_lo.reject == (f"seq_mean_k1<{-math.log(1.5)!r}",)


@pytest.mark.parametrize("options,problem", [
    ({"is_veto": 0.0}, "--is-veto must be in (0, 1)"),
    ({"is_veto": 1.5}, "--is-veto must be in (0, 1)"),
    ({"correction": "seq-mask-tis"}, "--correction seq-mask-tis needs --anchor proximal"),
    ({"correction": "bogus"}, "--correction 'bogus': expected one of none, seq-mask-tis"),
    ({"correction": "seq-mask-tis", "anchor": "proximal", "is_correction": "tis"}, "sets --is-correction is"),
    ({"correction": "seq-mask-tis", "anchor": "proximal", "reject_mode": "mask"}, "(--reject-mode zero), not mask"),
    ({"is_batch_norm": True}, "--is-batch-norm needs --is-correction"),
    ({"reject_mode": "drop"}, "--reject-mode 'drop': expected one of mask, zero"),
    ({"is_band": (0.5, 2.0)}, "--is-band applies only to --is-correction mis and --correction seq-mask-tis"),
    ({"is_correction": "is"}, "--is-correction is needs --anchor proximal"),
])
def test_bad_correction_options_are_named(options, problem):
    problems = TrainConfig(rollouts=("x",), model="m", **options).validate()
    assert any(problem in p for p in problems), problems


# ---- train: every loss, per-step metrics, the preset equal to its options, split invariance -----------


def _train(toy, out, *args):
    argv = ["train", "-r", str(toy / "rollouts.arrow"), "-m", str(toy / "model"), "--out", str(out), *args]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    return json.loads((out / "drpo_report.json").read_text())


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_seq_mask_tis_preset_trains_the_same_weights_as_its_options(toy, tmp_path):
    common = ["--anchor", "proximal", "--minibatches", "2", *FAST]
    a = _train(toy, tmp_path / "preset", *common, "--correction", "seq-mask-tis", "--is-band", "0.9", "1.1")
    b = _train(toy, tmp_path / "options", *common, "--is-correction", "is", "--reject-mode", "zero",
               "--reject", f"seq_mean_k1>{-math.log(0.9)!r}", "--reject", f"seq_mean_k1<{-math.log(1.1)!r}")
    wa, wb = _weights(tmp_path / "preset"), _weights(tmp_path / "options")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [s["metrics"] for s in a["steps"]] == [s["metrics"] for s in b["steps"]]
    assert a["loss"]["correction"] == "seq-mask-tis" and b["loss"]["correction"] == "none"
    assert 0 < a["filters"]["rejection"]["seq_frac"] < 1
    # Zero mode: the masked sequences' tokens stay in the step's token count (the denominators).
    assert sum(s["tokens"] for s in a["steps"]) == a["input"]["trained_tokens"]


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_every_loss_trains_with_veto_and_batch_normalised_weights(toy, tmp_path, loss):
    report = _train(toy, tmp_path / "out", "--loss", loss, "--anchor", "proximal", "--is-correction", "tis",
                    "--is-batch-norm", "--is-veto", "0.3", *FAST)
    (step,) = report["steps"]
    assert not step["skipped"]
    veto = report["filters"]["veto"]
    assert veto["criteria"] == ["rho<0.3"] and 0 < veto["seq_frac"] < 1
    # One step over every row: its fractions are the run's.
    assert step["metrics"]["veto/seq_frac"] == pytest.approx(veto["seq_frac"])
    assert step["tokens"] == report["input"]["trained_tokens"] - veto["tokens_rejected"]  # mask mode
    assert 0 < step["metrics"]["is/batch_norm_factor"] < 2


def test_veto_with_the_behavior_anchor_and_reject_fractions_per_step(toy, tmp_path):
    report = _train(toy, tmp_path / "out", "--is-veto", "0.3", "--reject", "seq_mean_k3>0.05", "--minibatches", "2",
                    *FAST)
    assert report["loss"]["anchor"] == "behavior"
    steps = report["steps"]
    assert all(0 < s["metrics"]["veto/seq_frac"] < 1 and 0 < s["metrics"]["reject/seq_frac"] < 1 for s in steps)
    vetoed = report["filters"]["veto"]["sequences_rejected"]
    seqs = report["input"]["rows"]
    # The per-step sequence fractions, weighted by the steps' row counts (96 each), give the run's.
    assert sum(s["metrics"]["veto/seq_frac"] for s in steps) * (seqs / 2) == pytest.approx(vetoed)


def test_batch_normalised_weights_have_mean_one_over_the_step_for_any_micro_batch_size(toy):
    from drpo_cli.objectives.corrections import behavior_weight as bw
    from drpo_cli.rollouts.rows import load_rows
    from drpo_cli.training.loop import _step_corrections

    rows = load_rows(str(toy / "rollouts.arrow"))
    t = torch.from_numpy
    g = torch.Generator().manual_seed(0)
    beh = t(rows.behavior_logprobs)
    old = (beh + 0.5 * torch.randn(rows.num_tokens, generator=g)).clamp(max=0.0)  # (T,)
    mask, row = t(rows.loss_mask), t(rows.token_row())
    for level in ("token", "geometric"):
        rho = bw("tis", old, beh, mask=mask, level=level, seq_index=row)
        cfg = TrainConfig(rollouts=("x",), model="m", anchor="proximal", is_correction="tis", is_level=level,
                          is_batch_norm=True)
        local = np.arange(0, rows.num_rows, 2)  # a step's rows
        normalized, metrics = _step_corrections(cfg, rows, local, rho, mask, {"trained": mask}, torch.device("cpu"))
        on = t(np.isin(rows.token_row(), local)) & mask
        if level == "token":
            exact = sum(Fraction(float(x)) for x in rho[on]) / int(on.sum())
            assert metrics["is/batch_norm_factor"] == float(exact)
            # each normalised weight is ρ/m rounded to float32 (m too: two roundings of ε/2): mean 1 within ε32
            assert_reordered(normalized[on].double().mean().item(), 1.0, 1, scale=1.0, msg="mean weight")
        else:
            per_seq = {int(r): float(rho[on & (row == r)][0]) for r in row[on].unique()}
            assert metrics["is/batch_norm_factor"] == pytest.approx(sum(per_seq.values()) / len(per_seq), rel=1e-12)
            means = [float(normalized[on & (row == r)][0]) for r in per_seq]
            assert_reordered(np.mean(means), 1.0, 1, scale=1.0, msg="mean sequence weight")  # as at token level
        # Row order within the step changes nothing (the sum is exact).
        _, again = _step_corrections(cfg, rows, local[::-1].copy(), rho, mask, {"trained": mask}, torch.device("cpu"))
        assert again == metrics


def test_batch_norm_factor_and_weights_do_not_depend_on_micro_batch_tokens(toy, tmp_path):
    args = ["--anchor", "proximal", "--is-correction", "tis", "--is-level", "geometric", "--is-batch-norm",
            "--minibatches", "2", "--quiet", "--lr", "1e-3"]
    a = _train(toy, tmp_path / "a", *args, "--micro-batch-tokens", "64")
    b = _train(toy, tmp_path / "b", *args, "--micro-batch-tokens", "4096")
    fa = [s["metrics"]["is/batch_norm_factor"] for s in a["steps"]]
    fb = [s["metrics"]["is/batch_norm_factor"] for s in b["steps"]]
    assert all(f != 1.0 for f in fa)
    # The mean of the weights is exact, but π_old, which the weights come from, is computed through other
    # micro-batch shapes: equal within the weights' rounding (METRIC_ULPS), not bit for bit.
    assert_reordered(fa, fb, METRIC_ULPS, scale=np.maximum(1.0, np.abs(fb)), msg="is/batch_norm_factor")
    assert_trained_alike(_weights(tmp_path / "a"), _weights(tmp_path / "b"), lr=1e-3, steps=2)


def test_inspect_correction_options_are_checked(toy):
    from drpo_cli.config import InspectConfig

    def problems(**options):
        return InspectConfig(rollouts=(str(toy / "rollouts.arrow"),), model=str(toy / "model"), **options).validate()

    assert problems(is_veto=0.3, correction="seq-mask-tis", is_band=(0.9, 1.1), is_batch_norm=True) == []
    assert problems(is_correction="tis") == [
        "--is-correction, --is-cap and --is-level shape the weight --is-batch-norm reports: add it"]
    assert problems(is_batch_norm=True) == ["--is-batch-norm needs --is-correction is, tis or mis (or --correction)"]
    assert problems(is_veto=2.0) == [
        "--is-veto must be in (0, 1) (a ratio π_old/μ below which the sequence is dropped), got 2.0"]
    no_model = InspectConfig(rollouts=(str(toy / "rollouts.arrow"),), is_veto=0.3).validate()
    assert no_model == ["--is-veto, --correction, --is-correction and --is-batch-norm need --model"]
