"""The later objectives and filters of SPEC.md §1 (drpo_cli/objectives/: the family modules, filters.py): hand-computed values,
autograd against the analytic gradient contract, and parity with a plain transliteration of each
reference implementation (verl, TRL, ROLL, prime-rl, AReaL) on padded (B, T) batches."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import GRAD_ULPS, assert_reordered

from drpo_cli.objectives import aggregation, catalog, filters, ratio_clipped
from drpo_cli.objectives import losses as L
from drpo_cli.objectives.divergence import Diagnostics

LN = math.log
NEW = ("sapo", "gmpo", "topr", "kimi15", "dppo-tv-sq", "vespo", "clip-cov", "kl-cov")


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def padded(seed: int, rows: int = 6, cols: int = 9, spread: float = 0.5, per_seq_adv: bool = True):
    """A (B, T) batch as the references see it: logp, old logp, advantages, response_mask (left-aligned)."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.log(torch.rand(rows, cols, generator=g, dtype=torch.float64).clamp(min=1e-4))
    old = (logp + spread * torch.randn(rows, cols, generator=g, dtype=torch.float64)).clamp(max=0.0)
    adv = torch.randn(rows, 1, generator=g, dtype=torch.float64).expand(rows, cols).clone()
    if not per_seq_adv:
        adv = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, cols + 1, (rows,), generator=g)
    mask = torch.arange(cols)[None, :] < lengths[:, None]  # (B, T)
    return logp, old, adv, mask


def seq_of(mask: torch.Tensor) -> torch.Tensor:
    return torch.arange(mask.shape[0])[:, None].expand_as(mask).clone()


def grad_of(name, logp, old, adv, mask, agg="token-mean", selected=None, **hp):
    """(per-token loss, d(aggregated loss)/d logπ) of drpo's loss on a (B, T) batch."""
    x = logp.clone().requires_grad_()
    seq = seq_of(mask)
    loss = L.token_loss(name, x, old, adv, mask=mask, seq_index=seq, selected=selected, **hp)
    denom = aggregation.aggregation_denominator(agg, mask, seq)
    aggregation.aggregate(loss, mask, seq, agg, denom).backward()
    return loss.detach(), x.grad


def masked_mean(x, mask, dim=None):  # verl_F.masked_mean
    return (x * mask).sum() / mask.sum() if dim is None else (x * mask).sum(dim) / mask.sum(dim)


# ---- hand-computed values ---------------------------------------------------------------------------
# π=0.6, μ=0.4 → r = 1.5, log r = ln 1.5; π=0.2, μ=0.4 → r = 0.5.


def test_sapo_hand_values():
    # A=2 (τ=1): −(4/1)·σ(0.5)·2 = −8·0.622459 = −4.979672; w = 4·σ(0.5)·σ(−0.5) = 0.940331
    x = t(LN(0.6)).requires_grad_()
    loss = L.token_loss("sapo", x, t(LN(0.4)), t(2.0))
    s = 1 / (1 + math.exp(-0.5))
    assert float(loss.detach()) == pytest.approx(-8 * s)
    loss.sum().backward()
    assert float(x.grad) == pytest.approx(-2 * 1.5 * 4 * s * (1 - s))  # −A·r·w
    # A=−1 (τ=1.05): −(4/1.05)·σ(1.05·0.5)·(−1)
    assert float(L.token_loss("sapo", t(LN(0.6)), t(LN(0.4)), t(-1.0))) == pytest.approx(
        4 / 1.05 / (1 + math.exp(-0.525)))
    # at r = 1 the gate gives −(4/τ)·½·A = −2A/τ; w = 1
    assert float(L.token_loss("sapo", t(-1.0), t(-1.0), t(1.0))) == pytest.approx(-2.0)
    assert float(L.gradient_weight("sapo", t(-1.0), t(-1.0), t(-3.0))) == pytest.approx(1.0)


def test_gmpo_hand_values():
    # One sequence, A = 1: log r = ln 1.5 = 0.405 > 0.4 → clipped to 0.4; log r = ln 0.5 = −0.693 kept
    # (below −0.4 but A > 0 keeps the smaller value). s = exp((0.4 − 0.693)/2), loss = −1·s on both tokens.
    x = t(LN(0.6), LN(0.2)).requires_grad_()
    seq = torch.tensor([0, 0])
    loss = L.token_loss("gmpo", x, t(LN(0.4), LN(0.4)), t(1.0, 1.0), seq_index=seq)
    s = math.exp((0.4 + LN(0.5)) / 2)
    torch.testing.assert_close(loss.detach(), t(-s, -s))
    loss.sum().backward()  # Σ loss = −2s; d/d logπ: 0 for the clipped token, −2s·½ for the other
    torch.testing.assert_close(x.grad, t(0.0, -s))
    # A = −1: the lower clip −0.4 applies to ln 0.5, ln 1.5 is kept: s = exp((0.405 − 0.4)/2)
    neg = L.token_loss("gmpo", t(LN(0.6), LN(0.2)), t(LN(0.4), LN(0.4)), t(-1.0, -1.0), seq_index=seq)
    torch.testing.assert_close(neg, t(1.0, 1.0) * math.exp((LN(1.5) - 0.4) / 2))


def test_topr_hand_values():
    x = t(LN(0.6), LN(0.6), LN(0.2)).requires_grad_()
    loss = L.token_loss("topr", x, t(LN(0.4), LN(0.4), LN(0.4)), t(2.0, -1.0, -1.0))
    # A > 0: −A·logπ; A < 0, r = 1.5: weight clipped to 1; A < 0, r = 0.5: weight 0.5
    torch.testing.assert_close(loss.detach(), t(-2 * LN(0.6), LN(0.6), 0.5 * LN(0.2)))
    loss.sum().backward()
    torch.testing.assert_close(x.grad, t(-2.0, 1.0, 0.5))
    torch.testing.assert_close(L.gradient_weight("topr", x, t(LN(0.4), LN(0.4), LN(0.4)), t(2.0, -1.0, -1.0)),
                               t(1 / 1.5, 1 / 1.5, 1.0))


def test_squared_log_ratio_hand_values():
    # kimi15 τ=0.1: −2·ln 0.6 + 0.05·ln²1.5; gradient −2 + 0.1·ln 1.5
    x = t(LN(0.6)).requires_grad_()
    loss = L.token_loss("kimi15", x, t(LN(0.4)), t(2.0))
    assert float(loss.detach()) == pytest.approx(-2 * LN(0.6) + 0.05 * LN(1.5) ** 2)
    loss.backward()
    assert float(x.grad) == pytest.approx(-2 + 0.1 * LN(1.5))
    # A = 0: only the pull back to μ acts (nothing else in drpo has a gradient at A = 0)
    x = t(LN(0.6)).requires_grad_()
    L.token_loss("kimi15", x, t(LN(0.4)), t(0.0)).backward()
    assert float(x.grad) == pytest.approx(0.1 * LN(1.5))
    # dppo-tv-sq: Δ = 0.2 ≤ 0.2 kept: −2·1.5 + 1e-3·ln²1.5; Δ = 0.3 (π=0.7) masked for A > 0: only the penalty
    assert float(L.token_loss("dppo-tv-sq", t(LN(0.6)), t(LN(0.4)), t(2.0))) == pytest.approx(-3 + 1e-3 * LN(1.5) ** 2)
    x = t(LN(0.7)).requires_grad_()
    loss = L.token_loss("dppo-tv-sq", x, t(LN(0.4)), t(2.0))
    assert float(loss.detach()) == pytest.approx(1e-3 * LN(1.75) ** 2)
    loss.backward()
    assert float(x.grad) == pytest.approx(2e-3 * LN(1.75))
    # the asymmetric thresholds: A < 0, Δ = −0.2 with δ_low 0.1 → masked
    assert float(L.token_loss("dppo-tv-sq", t(LN(0.2)), t(LN(0.4)), t(-1.0), delta_low=0.1, tau=0.0)) == 0.0


def test_vespo_hand_values():
    # One sequence, A = 1: log w = ln 1.5 + ln 0.5 = ln 0.75; φ = e^3·0.75²·e^(−2.25) = 0.75²·e^0.75
    x = t(LN(0.6), LN(0.2)).requires_grad_()
    loss = L.token_loss("vespo", x, t(LN(0.4), LN(0.4)), t(1.0, 1.0), seq_index=torch.tensor([0, 0]))
    phi = 0.75 ** 2 * math.exp(0.75)
    torch.testing.assert_close(loss.detach(), t(-phi * LN(0.6), -phi * LN(0.2)))
    loss.sum().backward()
    torch.testing.assert_close(x.grad, t(-phi, -phi))
    # A < 0 (k 3, λ 2): φ = e^2·0.75³·e^(−1.5)
    neg = L.gradient_weight("vespo", t(LN(0.6), LN(0.2)), t(LN(0.4), LN(0.4)), t(-1.0, -1.0),
                            seq_index=torch.tensor([0, 0]))
    torch.testing.assert_close(neg, t(1 / 1.5, 1 / 0.5) * 0.75 ** 3 * math.exp(0.5))


def test_covariance_hand_values():
    # Four tokens, A = (1, 1, −1, −1), logπ = (−1, −2, −1, −2): mean A 0, mean logπ −1.5,
    # cov = (0.5, −0.5, −0.5, 0.5). kl-cov with ratio 0.5 → k = 2: tokens 0 and 3 (ties: first first).
    logp, adv = t(-1.0, -2.0, -1.0, -2.0), t(1.0, 1.0, -1.0, -1.0)
    sel = ratio_clipped.covariance_selection("kl-cov", logp, logp, adv, torch.ones(4, dtype=torch.bool), cov_ratio=0.5,
                                 cov_kl_coef=0.1)
    assert sel.tolist() == [True, False, False, True]
    # clip-cov with bounds (0.1, 1): the same two are candidates; ratio 0.25 → one of them, seeded
    hp = {"eps_low": 0.2, "eps_high": 0.2, "cov_ratio": 0.25, "cov_lb": 0.1, "cov_ub": 1.0}
    picks = {tuple(ratio_clipped.covariance_selection("clip-cov", logp, logp, adv, torch.ones(4, dtype=torch.bool), seed=s,
                                          **hp).tolist()) for s in range(20)}
    assert picks == {(True, False, False, False), (False, False, False, True)}
    # kl-cov's penalty on a selected token: c·|log r|; gradient −A·r + c·sign(log r)
    x = t(LN(0.6)).requires_grad_()
    loss = L.token_loss("kl-cov", x, t(LN(0.4)), t(2.0), selected=torch.tensor([True]))
    assert float(loss.detach()) == pytest.approx(-3 + 0.1 * LN(1.5))
    loss.backward()
    assert float(x.grad) == pytest.approx(-3 + 0.1)
    # clip-cov zeroes a selected token's loss and gradient
    assert float(L.token_loss("clip-cov", t(LN(0.5)), t(LN(0.4)), t(2.0), selected=torch.tensor([True]))) == 0.0


def test_filters_hand_values():
    # OPSM: sequence 0 (A < 0) has mean log(μ/π) = (ln 2 + 0)/2 = 0.347; sequence 1 (A > 0) the same.
    logp, beh = t(LN(0.2), LN(0.5), LN(0.2), LN(0.5)), t(LN(0.4), LN(0.5), LN(0.4), LN(0.5))
    adv, seq, valid = t(-1.0, -1.0, 1.0, 1.0), torch.tensor([0, 0, 1, 1]), torch.ones(4, dtype=torch.bool)
    assert filters.opsm_keep(logp, beh, adv, seq, valid, 0.3).tolist() == [False, False, True, True]
    assert filters.opsm_keep(logp, beh, adv, seq, valid, 0.35).tolist() == [True, True, True, True]
    # M2PO: m2 = (0.9², 0.1², 0.5², 0) = (0.81, 0.01, 0.25, 0): means of the rest after masking 0, 1, 2 largest:
    # 0.2675, 0.0867, 0.005 → τ 0.1 masks the largest only; τ 0.05 the two largest; τ 1e-4 all but one.
    old = t(-1.0, -1.0, -1.0, -1.0)
    b = t(-1.9, -1.1, -1.5, -1.0)
    assert filters.m2po_keep(b, old, valid, 0.1).tolist() == [False, True, True, True]
    assert filters.m2po_keep(b, old, valid, 0.05).tolist() == [False, True, False, True]
    assert filters.m2po_keep(b, old, valid, 1e-4).tolist() == [False, False, False, True]


# ---- autograd vs the analytic contract of every new loss --------------------------------------------

HP_CASES = [
    ("sapo", {}), ("sapo", {"tau_pos": 3.0, "tau_neg": 0.5}),
    ("gmpo", {}), ("gmpo", {"eps_low": 0.1, "eps_high": 0.2}),
    ("topr", {}),
    ("kimi15", {}), ("kimi15", {"tau": 2.0}),
    ("dppo-tv-sq", {}), ("dppo-tv-sq", {"delta_low": 0.05, "delta_high": 0.1, "tau": 0.5}),
    ("vespo", {}), ("vespo", {"k_pos": 1.0, "lambda_pos": 0.5, "k_neg": 0.5, "lambda_neg": 1.0}),
    ("clip-cov", {"cov_ratio": 0.2, "cov_lb": -5.0, "cov_ub": 5.0}), ("clip-cov", {}),
    ("kl-cov", {"cov_ratio": 0.3}), ("kl-cov", {}),
]


@pytest.mark.parametrize("name,hp", HP_CASES)
@pytest.mark.parametrize("spread", [0.05, 0.5, 2.0])
@pytest.mark.parametrize("per_seq_adv", [True, False])
def test_autograd_equals_analytic_gradient(name, hp, spread, per_seq_adv):
    logp, old, adv, mask = padded(7, spread=spread, per_seq_adv=per_seq_adv)
    x = logp.clone().requires_grad_()
    seq = seq_of(mask)
    L.token_loss(name, x, old, adv, mask=mask, seq_index=seq, **hp).sum().backward()
    expected = L.loss_gradient(name, logp, old, adv, mask=mask, seq_index=seq, **hp)
    torch.testing.assert_close(x.grad, expected, rtol=1e-9, atol=1e-12)
    w = L.gradient_weight(name, logp, old, adv, mask=mask, seq_index=seq, **hp)
    assert not w.requires_grad and torch.isfinite(w).all()


def test_weights_exercise_their_branches():
    logp, old, adv, mask = padded(3, rows=12, spread=1.0, per_seq_adv=False)
    seq = seq_of(mask)
    for name, low in (("sapo", 0.5), ("gmpo", 0.5), ("topr", 1.0), ("dppo-tv-sq", 0.5)):
        w = L.gradient_weight(name, logp, old, adv, mask=mask, seq_index=seq)[mask]
        assert 0 < (w < low).sum() < mask.sum(), name


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_inputs_stay_finite(name, dtype):
    e = torch.tensor([0.0, -1e-7, -0.5, -20.0, -25.0, -80.0, -1e3], dtype=dtype)
    logp, anchor = (g.reshape(-1) for g in torch.meshgrid(e, e, indexing="ij"))
    seq = torch.arange(logp.numel()) // 3
    for a in (1e3, -1e3, 0.0):
        x = logp.clone().requires_grad_()
        adv = torch.full_like(x, a)
        loss = L.token_loss(name, x, anchor, adv, seq_index=seq)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
        assert torch.isfinite(L.gradient_weight(name, x, anchor, adv, seq_index=seq)).all()
        if a == 0.0 and catalog.LOSSES[name].penalty is None:
            assert (loss == 0).all() and (x.grad == 0).all()


def test_validation_of_new_hyper_parameters():
    assert catalog.validate_hparams("sapo", {"tau_pos": 0.0}) == ["sapo: tau_pos must be > 0, got 0.0"]
    assert catalog.validate_hparams("kl-cov", {"cov_ratio": 2.0}) == ["kl-cov: cov_ratio must be in (0, 1], got 2.0"]
    assert catalog.validate_hparams("vespo", {"lambda_neg": -1}) == ["vespo: lambda_neg must be > 0, got -1"]
    assert catalog.validate_hparams("topr", {"tau": 1}) == ["topr: unknown hyper-parameter 'tau' (accepted: none)"]
    from drpo_cli.config import TrainConfig

    problems = TrainConfig(rollouts=(), model="", loss="sapo", tau=0.1, cov_lb=6.0, opsm_delta=-1.0).validate()
    assert "--tau does not apply to --loss sapo (its options: --tau-pos, --tau-neg)" in problems
    assert "--cov-lb must be below --cov-ub, got 6.0 and 5.0" in problems
    assert "--opsm-delta must be >= 0, got -1.0" in problems


# ---- parity with the reference implementations, transliterated on padded (B, T) batches --------------


def verl_sapo(logp, old, adv, mask, tau_pos=1.0, tau_neg=1.05):
    """verl compute_policy_loss_sapo (loss_agg_mode forced to seq-mean-token-mean)."""
    ratio = torch.exp(torch.clamp(logp - old, min=-20.0, max=20.0))
    taus = torch.where(adv > 0, torch.tensor(tau_pos, dtype=adv.dtype), torch.tensor(tau_neg, dtype=adv.dtype))
    gates = torch.sigmoid(taus * (ratio - 1.0)) * (4.0 / taus)
    pg_losses = -gates * adv
    return (masked_mean(pg_losses, mask, dim=-1)).mean(), pg_losses


def verl_geo_mean(logp, old, adv, mask, clip_low=0.4, clip_high=0.4):
    """verl compute_policy_loss_geo_mean."""
    neg_kl = logp - old
    sgn = torch.sign(adv)
    clamp = torch.clamp(neg_kl, -clip_low, clip_high)
    kl_min = sgn * torch.min(sgn * neg_kl, sgn * clamp)
    n = mask.sum(dim=-1)
    ratio = torch.exp((kl_min * mask).sum(dim=-1) / (n + 1e-8))
    advantage = (adv * mask).sum(dim=-1) / (n + 1e-8)
    return torch.mean(-advantage * ratio), -advantage * ratio


def roll_topr(logp, old, adv, mask):
    """ROLL _compute_topr_loss, with the positive set chosen by the advantage sign."""
    ratio = (logp - old).exp()
    pos, neg = (adv > 0).double(), (adv <= 0).double()
    positive_loss = -adv * logp * pos
    negative_loss = -torch.clamp(ratio, min=0.0, max=1.0).detach() * adv * logp * neg
    per_token = positive_loss + negative_loss
    return (per_token * mask).sum() / mask.sum(), per_token


def roll_kimi15(logp, old, adv, mask, tau=0.1):
    per_token = -adv * logp + tau * 0.5 * (logp - old).pow(2)
    return (per_token * mask).sum() / mask.sum(), per_token


def prime_default(logp, inference, adv, mask, dppo_mask_low=0.2, dppo_mask_high=0.2, adv_tau=1.0, kl_tau=1e-3):
    """prime-rl default_loss_fn, per sample then summed and normalised by the token count."""
    log_ratio = logp - inference
    ratio = torch.exp(log_ratio)
    diff = torch.exp(logp) - torch.exp(inference)
    invalid = torch.where(adv > 0, diff > dppo_mask_high, diff < -dppo_mask_low)
    keep = mask & ~invalid
    per_token = -(keep * adv_tau * adv * ratio) + kl_tau * (mask * log_ratio**2)
    return per_token.sum() / mask.sum(), per_token


def trl_vespo(logp, old, adv, mask, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0):
    """TRL get_gamma_weights + loss_type="vespo" (normalised by the number of tokens)."""
    lower = math.log(1e-8)
    with torch.no_grad():
        seq_log_ratio = torch.sum(torch.clamp(logp - old, -20.0, 20.0) * mask, dim=-1, keepdim=True)
        log_w = torch.clamp(seq_log_ratio, lower, 20.0)
        a = adv  # (B, 1) in TRL's GRPO; a (B, T) advantage broadcasts the same way
        k = torch.where(a >= 0, k_pos, k_neg)
        lam = torch.where(a >= 0, lambda_pos, lambda_neg).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    per_token = -phi * adv * logp
    return (per_token * mask).sum() / mask.sum(), per_token


def verl_clip_cov(logp, old, adv, mask, seed, clip_cov_ratio=2e-4, lb=1.0, ub=5.0, clip_low=0.2, clip_high=0.2):
    """verl compute_policy_loss_clip_cov (its torch.randperm drawn from the global RNG seeded with `seed`)."""
    ratio = torch.exp(logp - old)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip_by_origin = (pg2 > pg1) & mask
    cov_all = (adv - masked_mean(adv, mask)) * (logp - masked_mean(logp.detach(), mask))
    cov_all[~mask] = -torch.inf
    cov_all[clip_by_origin] = -torch.inf
    clip_num = max(int(clip_cov_ratio * mask.sum().item()), 1)
    idx = torch.nonzero((cov_all < ub) & (cov_all > lb) & mask)
    corr = torch.ones_like(adv)
    if len(idx) > 0:
        torch.manual_seed(seed)
        idx = idx[torch.randperm(len(idx))[: min(clip_num, len(idx))]]
        corr[idx[:, 0], idx[:, 1]] = 0
    per_token = torch.maximum(pg1, pg2) * corr
    return (per_token * mask).sum() / mask.sum(), per_token


def verl_kl_cov(logp, old, adv, mask, kl_cov_ratio=2e-4, ppo_kl_coef=0.1):
    """verl compute_policy_loss_kl_cov."""
    neg_kl = logp - old
    pg1 = -adv * torch.exp(neg_kl)
    pg_kl = -adv * torch.exp(neg_kl) + ppo_kl_coef * neg_kl.abs()
    per_token = pg1.clone()
    valid_idx = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
    a, lp = adv[mask].detach().reshape(-1), logp[mask].detach().reshape(-1)
    cov = (a - a.mean()) * (lp - lp.mean())
    k = max(1, int(len(cov) * kl_cov_ratio))
    large = valid_idx[torch.topk(cov, k, largest=True).indices]
    rows, cols = large // adv.shape[1], large % adv.shape[1]
    per_token[rows, cols] = pg_kl[rows, cols]
    return (per_token * mask).sum() / mask.sum(), per_token


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name,reference,agg,hp", [
    ("sapo", verl_sapo, "seq-mean-token-mean", {}),
    ("sapo", lambda *a: verl_sapo(*a, tau_pos=2.0, tau_neg=0.7), "seq-mean-token-mean",
     {"tau_pos": 2.0, "tau_neg": 0.7}),
    ("gmpo", verl_geo_mean, "seq-mean-token-mean", {}),
    ("gmpo", lambda *a: verl_geo_mean(*a, clip_low=0.1, clip_high=0.3), "seq-mean-token-mean",
     {"eps_low": 0.1, "eps_high": 0.3}),
    ("topr", roll_topr, "token-mean", {}),
    ("kimi15", roll_kimi15, "token-mean", {}),
    ("dppo-tv-sq", prime_default, "token-mean", {}),
    ("dppo-tv-sq", lambda *a: prime_default(*a, dppo_mask_low=0.05, dppo_mask_high=0.1, kl_tau=0.3), "token-mean",
     {"delta_low": 0.05, "delta_high": 0.1, "tau": 0.3}),
    ("vespo", trl_vespo, "token-mean", {}),
    ("vespo", lambda *a: trl_vespo(*a, k_pos=1.0, lambda_pos=0.5), "token-mean",
     {"k_pos": 1.0, "lambda_pos": 0.5}),
    ("kl-cov", lambda *a: verl_kl_cov(*a, kl_cov_ratio=0.1), "token-mean", {"cov_ratio": 0.1}),
    ("kl-cov", verl_kl_cov, "token-mean", {}),
])
@pytest.mark.parametrize("per_seq_adv", [True, False])
def test_parity_with_reference(seed, name, reference, agg, hp, per_seq_adv):
    logp, old, adv, mask = padded(seed, spread=0.6, per_seq_adv=per_seq_adv)
    x = logp.clone().requires_grad_()
    ref_loss, ref_token = reference(x, old, adv, mask)
    ref_loss.backward()
    ours, grad = grad_of(name, logp, old, adv, mask, agg=agg, **hp)
    if name == "gmpo":  # verl's values are per sequence; drpo puts each on every token of it
        ref_token = ref_token[:, None].expand_as(mask)
    torch.testing.assert_close(torch.where(mask, ours, 0.0), torch.where(mask, ref_token.detach(), 0.0),
                               rtol=1e-7, atol=1e-10)
    rtol = 1e-6 if name == "gmpo" else 1e-9  # verl divides by n + 1e-8
    torch.testing.assert_close(grad, torch.where(mask, x.grad, 0.0), rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_clip_cov_parity_with_verl_including_its_random_choice(seed):
    logp, old, adv, mask = padded(seed, rows=8, cols=12, spread=0.3, per_seq_adv=False)
    adv = adv * 6  # covariances in (1, 5) exist
    hp = {"cov_ratio": 0.05, "cov_lb": 0.2, "cov_ub": 5.0}
    x = logp.clone().requires_grad_()
    ref_loss, ref_token = verl_clip_cov(x, old, adv, mask, seed=seed, clip_cov_ratio=0.05, lb=0.2)
    ref_loss.backward()
    sel = ratio_clipped.covariance_selection("clip-cov", logp, old, adv, mask, seed=seed, eps_low=0.2, eps_high=0.2, **hp)
    assert sel.sum() == max(int(0.05 * mask.sum()), 1)  # enough candidates: exactly k tokens chosen
    ours, grad = grad_of("clip-cov", logp, old, adv, mask, selected=sel, **hp)
    torch.testing.assert_close(torch.where(mask, ours, 0.0), torch.where(mask, ref_token.detach(), 0.0))
    torch.testing.assert_close(grad, torch.where(mask, x.grad, 0.0), rtol=1e-9, atol=1e-12)


def trl_off_policy_mask(adv, logp, sampling, mask, threshold):
    """TRL GRPOTrainer.get_off_policy_mask (advantages (B, 1))."""
    kl = sampling - logp.detach()
    avg = (kl * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return ((adv >= 0) | (avg <= threshold)).to(dtype=mask.dtype)


def areal_m2po(old_logp, prox_logp, loss_mask, m2_threshold):
    """AReaL _apply_m2po_masking + _get_m2po_loss_mask."""
    delta = old_logp - prox_logp
    m2 = delta * delta
    flat = loss_mask.view(-1)
    sel = m2.view(-1)[flat]
    sorted_m2, indices = torch.sort(sel, descending=True)
    restored = torch.argsort(indices)
    n = sorted_m2.numel()
    avg = sorted_m2.flip(0).cumsum(0).flip(0) / torch.arange(n, 0, -1, dtype=sorted_m2.dtype)
    below = torch.where(avg < m2_threshold)[0]
    num = below[0].item() if len(below) > 0 else n - 1
    keep_sorted = torch.ones_like(sorted_m2, dtype=torch.bool)
    keep_sorted[:num] = False
    full = torch.zeros_like(flat)
    full[flat] = keep_sorted[restored]
    return full.view_as(loss_mask)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threshold", [0.01, 0.1, 0.3])
def test_filters_parity_with_trl_and_areal(seed, threshold):
    logp, old, adv, mask = padded(seed, rows=10, spread=0.5)
    ours = filters.opsm_keep(logp, old, adv, seq_of(mask), mask, threshold)
    ref = trl_off_policy_mask(adv[:, :1], logp, old, mask.double(), threshold).bool().expand_as(mask) & mask
    assert torch.equal(ours, ref)
    assert torch.equal(filters.m2po_keep(old, logp, mask, threshold), areal_m2po(old, logp, mask, threshold))


# ---- diagnostics: the fraction each objective and filter reports --------------------------------------


def test_diagnostics_fractions_count_what_the_losses_do():
    logp, old, adv, mask = padded(9, rows=12, spread=0.8, per_seq_adv=False)
    seq = seq_of(mask)
    diag = Diagnostics(0.2, {name: {} for name in NEW}, opsm_delta=0.1, m2po_threshold=0.05)
    diag.update(logp, old, adv, mask, seq_index=seq, old_logp=logp)
    s = diag.summary()
    lp, mu, a, sq = logp[mask], old[mask], adv[mask], seq[mask]
    n = float(mask.sum())
    r = torch.exp(lp - mu)
    assert s["topr/truncated_frac"] == pytest.approx(float(((a < 0) & (r > 1)).sum()) / n)
    w_sapo = L.gradient_weight("sapo", lp, mu, a)
    assert s["weight/sapo_attenuated_frac"] == pytest.approx(float((w_sapo < 0.5).sum()) / n)
    w_gmpo = L.gradient_weight("gmpo", lp, mu, a, seq_index=sq)
    assert s["gmpo/clip_frac"] == pytest.approx(float(((w_gmpo == 0) & (a != 0)).sum()) / n)
    assert s["kimi15/corrective_frac"] == pytest.approx(float(((a != 0) & (a * (a - 0.1 * (lp - mu)) < 0)).sum()) / n)
    assert s["dppo_tv_sq/mask_frac"] == pytest.approx(float((L.gradient_weight("dppo-tv-sq", lp, mu, a) == 0).sum()) / n)
    assert s["kl_cov/selected_frac"] == pytest.approx(max(int(2e-4 * n), 1) / n)
    dropped = ~filters.opsm_keep(lp, mu, a, sq, torch.ones_like(a, dtype=torch.bool), 0.1)
    assert s["opsm/token_drop_frac"] == pytest.approx(float(dropped.sum()) / n)
    assert s["opsm/seq_drop_frac"] == pytest.approx(torch.unique(sq[dropped]).numel() / torch.unique(sq).numel())
    masked = ~filters.m2po_keep(mu, lp, torch.ones_like(a, dtype=torch.bool), 0.05)
    assert s["m2po/masked_frac"] == pytest.approx(float(masked.sum()) / n)
    assert 0 < s["topr/truncated_frac"] < 1 and 0 < s["gmpo/clip_frac"] < 1 and 0 < s["opsm/token_drop_frac"] < 1


# ---- train: the step-wide statistics do not depend on the micro-batch size; CLI end to end ------------

STEP_CASES = [
    ("sapo", "seq-mean-token-mean", {}),
    ("gmpo", "seq-mean-token-mean", {"eps_low": 0.05, "eps_high": 0.05}),
    ("vespo", "token-mean", {}),
    ("kimi15", "token-mean", {"tau": 1.0}),
    ("topr", "token-mean", {}),
    ("dppo-tv-sq", "token-mean", {"delta_low": 0.05, "delta_high": 0.05, "tau": 0.1}),
    ("kl-cov", "token-mean", {"cov_ratio": 0.05}),
    ("clip-cov", "token-mean", {"cov_ratio": 0.05, "cov_lb": -1.0}),
    ("ppo-clip", "token-mean", {"opsm_delta": 0.02}),
    ("ppo-clip", "token-mean", {"m2po_threshold": 0.002}),
]


def _naive_step_grads(model, rows, idx, cfg, old_logp, seed):
    """One pad-to-longest forward with full logits; the step-wide selection / masks over the step's tokens in
    row-then-position order, computed directly; the same aggregation."""
    from drpo_cli.model.batching import plan_micro_batches

    mb = plan_micro_batches(rows, idx, 10**9)[0]
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids).logits
    logits = logits.reshape(-1, logits.shape[-1])[mb.src_index].float() / mb.temperature[:, None]
    logp = torch.log_softmax(logits, -1).gather(1, mb.target_ids[:, None]).squeeze(1)  # (M,)
    tok = mb.token_index
    mask = torch.from_numpy(rows.loss_mask)[tok]
    mu = torch.from_numpy(rows.behavior_logprobs)[tok]
    adv = torch.from_numpy(rows.advantages)[tok]
    order = torch.argsort(tok)  # global order: row, then position
    back = torch.argsort(order)
    if cfg.m2po_threshold is not None:
        mask = mask & filters.m2po_keep(mu[order], old_logp[tok][order], mask[order], cfg.m2po_threshold)[back]
    selected = None
    if cfg.loss in catalog.BATCH_LOSSES:
        selected = ratio_clipped.covariance_selection(cfg.loss, logp.detach()[order], mu[order], adv[order], mask[order],
                                          seed=seed, **cfg.loss_hparams())[back]
    loss_t = L.token_loss(cfg.loss, logp, mu, adv, mask=mask, seq_index=mb.seq_index, selected=selected,
                          **cfg.loss_hparams())
    if cfg.opsm_delta is not None:
        loss_t = loss_t * filters.opsm_keep(logp, mu, adv, mb.seq_index, mask, cfg.opsm_delta)
    denom = aggregation.aggregation_denominator(cfg.agg, mask, mb.seq_index)
    aggregation.aggregate(loss_t, mask, mb.seq_index, cfg.agg, denom).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss,agg,extra", STEP_CASES)
def test_step_gradient_does_not_depend_on_micro_batch_tokens(toy, loss, agg, extra):
    import numpy as np

    from drpo_cli.config import TrainConfig
    from drpo_cli.model.checkpoint import load_model
    from drpo_cli.rollouts.rows import load_rows
    from drpo_cli.training.train import accumulate_gradients

    rows = load_rows(str(toy / "rollouts.arrow"))
    idx = np.arange(0, rows.num_rows, 3)
    model, _ = load_model(toy / "model")
    with torch.no_grad():  # π away from μ, so that the objectives' non-linear parts act
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    f = torch.from_numpy
    old = (f(rows.behavior_logprobs) + 0.1 * torch.randn(rows.num_tokens, generator=torch.Generator().manual_seed(3))
           ).clamp(max=0.0)
    inputs = {"anchor": f(rows.behavior_logprobs), "rho": torch.ones(rows.num_tokens),
              "behavior": f(rows.behavior_logprobs), "advantages": f(rows.advantages), "mask": f(rows.loss_mask)}
    grads, fracs = [], []
    for budget in (16, 100, 10**6):
        cfg = TrainConfig(rollouts=("x",), model="m", loss=loss, agg=agg, micro_batch_tokens=budget, chunk_tokens=7,
                          seed=4, **extra)
        model.zero_grad(set_to_none=True)
        _, diag, _ = accumulate_gradients(model, rows, idx, cfg, old_logp=old, step=2, **inputs)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        s = diag.summary()
        fracs.append({k: v for k, v in s.items() if k.split("/")[0] in ("m2po", "opsm", "kl_cov", "clip_cov")})
    model.zero_grad(set_to_none=True)
    reference = _naive_step_grads(model, rows, idx, cfg, old, seed=4 * 1_000_003 + 2)
    for g in grads:
        for k in reference:  # the same sums in another order: micro-batches, head chunks, one padded forward
            assert_reordered(g[k], reference[k], GRAD_ULPS, msg=k)
    # Counts of decisions on log-probs of other micro-batches: equal unless a token sits within their rounding
    # of a threshold or a tie.
    assert fracs[0] == fracs[1] == fracs[2]
    # The statistic acted, not all-or-nothing (OPSM drops only A < 0 tokens: the A > 0 share of its drops is 0).
    acted = {k: v for k, v in fracs[0].items() if k != "opsm/dropped_pos_adv_frac"}
    assert all(0 < v < 1 for v in acted.values()), fracs[0]
    if "opsm/dropped_pos_adv_frac" in fracs[0]:
        assert fracs[0]["opsm/dropped_pos_adv_frac"] == 0.0


@pytest.mark.parametrize("args,metric", [
    *((["--loss", name], metric) for name, metric in (
        ("sapo", "weight/sapo_attenuated_frac"), ("gmpo", "gmpo/clip_frac"), ("topr", "topr/truncated_frac"),
        ("kimi15", "kimi15/corrective_frac"), ("dppo-tv-sq", "dppo_tv_sq/mask_frac"),
        ("vespo", "vespo/attenuated_frac"), ("clip-cov", "clip_cov/selected_frac"),
        ("kl-cov", "kl_cov/selected_frac"))),
    (["--loss", "drpo", "--opsm-delta", "0.05"], "opsm/seq_drop_frac"),
    (["--loss", "cispo", "--m2po-threshold", "0.01"], "m2po/masked_frac"),
])
def test_train_cli_runs_and_reports_the_fraction(toy, tmp_path, args, metric):
    import json

    import jsonschema
    from typer.testing import CliRunner

    from drpo_cli.cli import app
    from drpo_cli.reports.report_format import TRAIN_REPORT_SCHEMA

    out = tmp_path / "out"
    argv = ["train", "-r", str(toy / "rollouts.arrow"), "-m", str(toy / "model"), "--out", str(out), *args,
            "--minibatches", "2", "--quiet", "--lr", "1e-3", "--micro-batch-tokens", "512"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "drpo_report.json").read_text())
    jsonschema.validate(report, TRAIN_REPORT_SCHEMA)
    values = [s["metrics"][metric] for s in report["steps"]]
    assert len(values) == 2 and all(v is not None and 0 <= v <= 1 for v in values)


def test_inspect_reports_every_new_fraction(toy, tmp_path):
    import json

    from typer.testing import CliRunner

    from drpo_cli.cli import app

    argv = ["inspect", str(toy / "rollouts.arrow"), "--model", str(toy / "model"), "--json", str(tmp_path / "r.json"),
            "--opsm-delta", "0.05", "--m2po-threshold", "0.01", "--quiet"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    metrics = report["metrics"]
    for metric in ("weight/sapo_attenuated_frac", "gmpo/clip_frac", "topr/truncated_frac", "kimi15/corrective_frac",
                   "dppo_tv_sq/mask_frac", "vespo/attenuated_frac", "clip_cov/selected_frac", "kl_cov/selected_frac",
                   "opsm/token_drop_frac", "opsm/seq_drop_frac", "m2po/masked_frac"):
        assert metrics[metric] is not None and 0 <= metrics[metric] <= 1, metric
    rows = {e["loss"]: e for e in report["model"]["losses"]}
    assert set(NEW) <= set(rows) and rows["opsm (filter)"]["hparams"] == {"opsm_delta": 0.05}
    assert rows["m2po (filter)"]["fractions"]["masked"] == metrics["m2po/masked_frac"]
    bad = CliRunner().invoke(app, ["inspect", str(toy / "rollouts.arrow"), "--opsm-delta", "0.1"])
    assert bad.exit_code == 2 and "--opsm-delta needs --model" in bad.output
