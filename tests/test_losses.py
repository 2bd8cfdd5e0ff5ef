"""Losses of SPEC.md §1: hand-computed values, the registry contract, autograd vs the analytic
gradient weight, DRPO's per-token optimum, hyper-parameter validation and numerical safety."""

from __future__ import annotations

import math

import pytest
import torch

from drpo_cli import losses as L
from drpo_cli.errors import ConfigError

LN = math.log


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def loss_of(name: str, pi: float, mu: float, adv: float, **hp) -> float:
    return float(L.token_loss(name, t(LN(pi)), t(LN(mu)), t(adv), **hp)[0])


# ---- hand-computed values -------------------------------------------------------------------------
# Two tokens used throughout: π=0.6, μ=0.4 → r = 1.5, Δ = 0.2;  π=0.5, μ=0.4 → r = 1.25, Δ = 0.1.


def test_pg_is_values():
    assert loss_of("pg-is", 0.6, 0.4, 2.0) == pytest.approx(-3.0)  # −A·r = −2·1.5
    assert loss_of("pg-is", 0.6, 0.4, -1.0) == pytest.approx(1.5)  # −(−1)·1.5


def test_ppo_clip_values():
    # A=2, r=1.5 > 1+0.28: max(−3, −2·1.28 = −2.56) = −2.56
    assert loss_of("ppo-clip", 0.6, 0.4, 2.0) == pytest.approx(-2.56)
    # A=2, r=1.25 inside: max(−2.5, −2.5) = −2.5
    assert loss_of("ppo-clip", 0.5, 0.4, 2.0) == pytest.approx(-2.5)
    # A=−1, r=1.5: max(1.5, 1.28) = 1.5 (no clip in the helpful direction)
    assert loss_of("ppo-clip", 0.6, 0.4, -1.0) == pytest.approx(1.5)
    # A=−1, r=0.5 < 1−0.2 (π=0.2, μ=0.4): max(0.5, 0.8) = 0.8
    assert loss_of("ppo-clip", 0.2, 0.4, -1.0) == pytest.approx(0.8)
    # A=−1, r=4 (π=0.8, μ=0.2): max(4, 1.28) = 4; dual clip c=3: min(4, −A·c = 3) = 3
    assert loss_of("ppo-clip", 0.8, 0.2, -1.0) == pytest.approx(4.0)
    assert loss_of("ppo-clip", 0.8, 0.2, -1.0, dual_clip=3.0) == pytest.approx(3.0)
    # dual clip never touches A > 0: A=1, r=4: max(−4, −1.28) = −1.28
    assert loss_of("ppo-clip", 0.8, 0.2, 1.0, dual_clip=3.0) == pytest.approx(-1.28)
    # asymmetric bounds are both honoured: eps_high=0.6 → A=2, r=1.5 inside: −3
    assert loss_of("ppo-clip", 0.6, 0.4, 2.0, eps_high=0.6) == pytest.approx(-3.0)


def test_spo_values():
    # A=2, r=1.5, ε=0.2: −3 + 2·0.5²/(0.4) = −3 + 1.25 = −1.75
    assert loss_of("spo", 0.6, 0.4, 2.0) == pytest.approx(-1.75)
    # A=−1: 1.5 + 1·0.25/0.4 = 2.125
    assert loss_of("spo", 0.6, 0.4, -1.0) == pytest.approx(2.125)


def test_dppo_tv_values():
    # Δ = 0.2 > δ = 0.15 with A > 0: masked → 0
    assert loss_of("dppo-tv", 0.6, 0.4, 2.0) == 0.0
    # same token with A < 0 is moving back: kept, −A·r = 1.5
    assert loss_of("dppo-tv", 0.6, 0.4, -1.0) == pytest.approx(1.5)
    # Δ = 0.1 inside: −2·1.25 = −2.5
    assert loss_of("dppo-tv", 0.5, 0.4, 2.0) == pytest.approx(-2.5)
    # Δ = −0.2 (π=0.2, μ=0.4), A < 0: masked
    assert loss_of("dppo-tv", 0.2, 0.4, -1.0) == 0.0


def test_dppo_kl_values():
    # π=0.6, μ=0.4: D = 0.4·ln(0.4/0.6) + 0.6·ln(0.6/0.4) = 0.2·ln 1.5 = 0.08109 > 0.05, A>0, r>1: masked
    assert loss_of("dppo-kl", 0.6, 0.4, 2.0) == 0.0
    # π=0.5, μ=0.4: D = 0.4·ln 0.8 + 0.6·ln 1.2 = −0.08926 + 0.10939 = 0.02014 < 0.05: −2.5
    assert loss_of("dppo-kl", 0.5, 0.4, 2.0) == pytest.approx(-2.5)
    # D = 0.08109 > δ but A < 0 and r > 1 (moving back): kept, 1.5
    assert loss_of("dppo-kl", 0.6, 0.4, -1.0) == pytest.approx(1.5)
    # δ = 0.1 > 0.08109: kept, −3
    assert loss_of("dppo-kl", 0.6, 0.4, 2.0, delta=0.1) == pytest.approx(-3.0)


def test_dppo_value_is_ratio_and_gradient_uses_capped_ratio():
    # π=0.6, μ=0.01 → r = 60 > C = 20, Δ = 0.59 but A < 0 with r > 1 keeps the token.
    logp = t(LN(0.6)).requires_grad_()
    loss = L.token_loss("dppo-tv", logp, t(LN(0.01)), t(-1.0))
    assert float(loss.detach()) == pytest.approx(60.0)  # value −A·r = 60
    loss.sum().backward()
    assert float(logp.grad) == pytest.approx(20.0)  # gradient −A·min(r, C) = 20


def test_drpo_values():
    # δ=0.5, A=2, r=1.5, μ=0.4: −3 + 2·0.4·0.5²/(2·0.5) = −3 + 0.2 = −2.8 (= −3 + 2·0.2²/(2·0.5·0.4))
    assert loss_of("drpo", 0.6, 0.4, 2.0, delta=0.5) == pytest.approx(-2.8)
    # default δ = 12.5: −3 + 2·0.4·0.25/25 = −3 + 0.008 = −2.992
    assert loss_of("drpo", 0.6, 0.4, 2.0) == pytest.approx(-2.992)
    # A=−1, δ=0.5: 1.5 + 1·0.4·0.25/1 = 1.6
    assert loss_of("drpo", 0.6, 0.4, -1.0, delta=0.5) == pytest.approx(1.6)


def test_hand_computed_gradients():
    def grad(name, pi, mu, adv, **hp):
        logp = t(LN(pi)).requires_grad_()
        L.token_loss(name, logp, t(LN(mu)), t(adv), **hp).sum().backward()
        return float(logp.grad)

    # DRPO δ=0.5, Δ=0.2, A=2: w = 1 − 0.2/0.5 = 0.6 → −A·r·w = −2·1.5·0.6 = −1.8
    assert grad("drpo", 0.6, 0.4, 2.0, delta=0.5) == pytest.approx(-1.8)
    # SPO ε=0.2, A=2, r=1.5: w = 1 − 0.5/0.2 = −1.5 → −2·1.5·(−1.5) = 4.5
    assert grad("spo", 0.6, 0.4, 2.0) == pytest.approx(4.5)
    # PPO clipped (A=2, r=1.5 > 1.28): 0;  unclipped helpful side (A=−1, r=1.5): −A·r = 1.5
    assert grad("ppo-clip", 0.6, 0.4, 2.0) == 0.0
    assert grad("ppo-clip", 0.6, 0.4, -1.0) == pytest.approx(1.5)


# ---- the registry contract ------------------------------------------------------------------------

HP_CASES = [
    ("pg-is", {}),
    ("ppo-clip", {}),
    ("ppo-clip", {"dual_clip": 3.0, "eps_low": 0.1, "eps_high": 0.4}),
    ("spo", {}),
    ("spo", {"eps": 0.05}),
    ("dppo-tv", {}),
    ("dppo-tv", {"delta": 0.05, "ratio_cap": 2.0}),
    ("dppo-kl", {}),
    ("dppo-kl", {"delta": 0.01, "ratio_cap": 1.5}),
    ("drpo", {}),
    ("drpo", {"delta": 0.1}),
    ("drpo", {"delta": 0.02}),
]


def random_tokens(shape, seed, spread=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = torch.log(torch.rand(shape, generator=g, dtype=dtype).clamp(min=1e-6))
    anchor = (logp + spread * torch.randn(shape, generator=g, dtype=dtype)).clamp(max=0.0)
    adv = torch.randn(shape, generator=g, dtype=dtype)
    adv[..., 0] = 0.0  # some zero advantages
    return logp, anchor, adv


def test_registry_names_and_defaults():
    assert L.LOSS_NAMES == ("pg-is", "ppo-clip", "spo", "dppo-tv", "dppo-kl", "drpo")
    assert L.DEFAULTS["ppo-clip"] == {"eps_low": 0.2, "eps_high": 0.28, "dual_clip": None}
    assert L.DEFAULTS["spo"] == {"eps": 0.2}
    assert L.DEFAULTS["dppo-tv"] == {"delta": 0.15, "ratio_cap": 20.0}
    assert L.DEFAULTS["dppo-kl"] == {"delta": 0.05, "ratio_cap": 20.0}
    assert L.DEFAULTS["drpo"] == {"delta": 12.5}
    assert all(set(d) <= set(L.HP_NAMES) for d in L.DEFAULTS.values())


def test_torch_free_config_tables_match():
    # config.py validates options before torch is imported, so it keeps its own copy of these tables.
    from drpo_cli import config

    assert config.LOSS_HPARAMS == L.DEFAULTS
    assert config.HPARAM_NAMES == L.HP_NAMES
    assert config.AGG_MODES == L.AGG_MODES
    assert config.IS_CORRECTIONS == L.BEHAVIOR_KINDS


@pytest.mark.parametrize("name", L.LOSS_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contract_shape_finite_grad_and_pg_at_pi_equals_mu(name, dtype):
    logp, anchor, adv = random_tokens((3, 7), seed=1, dtype=dtype)
    logp.requires_grad_()
    loss = L.token_loss(name, logp, anchor, adv)
    assert loss.shape == logp.shape and loss.dtype == dtype
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert logp.grad is not None and torch.isfinite(logp.grad).all() and logp.grad.abs().sum() > 0
    # π = μ: every loss is plain PG, value −A and gradient −A (r = 1, w = 1).
    same = logp.detach().clone().requires_grad_()
    at_mu = L.token_loss(name, same, same.detach(), adv)
    at_mu.sum().backward()
    torch.testing.assert_close(at_mu, -adv)
    torch.testing.assert_close(same.grad, -adv)
    torch.testing.assert_close(L.gradient_weight(name, same, same, adv), torch.ones_like(adv))


@pytest.mark.parametrize("name", L.LOSS_NAMES)
def test_anchor_and_advantages_are_detached(name):
    logp, anchor, adv = random_tokens((20,), seed=2)
    anchor.requires_grad_()
    adv.requires_grad_()
    L.token_loss(name, logp.requires_grad_(), anchor, adv).sum().backward()
    assert anchor.grad is None and adv.grad is None


@pytest.mark.parametrize("name,hp", HP_CASES)
@pytest.mark.parametrize("spread", [0.05, 1.0, 4.0])
def test_autograd_equals_minus_a_r_w(name, hp, spread):
    logp, anchor, adv = random_tokens((400,), seed=3, spread=spread)
    logp.requires_grad_()
    L.token_loss(name, logp, anchor, adv, **hp).sum().backward()
    r = torch.exp(logp.detach() - anchor)
    w = L.gradient_weight(name, logp, anchor, adv, **hp)
    assert not w.requires_grad
    torch.testing.assert_close(logp.grad, -adv * r * w, rtol=1e-9, atol=1e-12)


def test_weights_match_spec_table_directly():
    logp, anchor, adv = random_tokens((500,), seed=4)
    pi, mu, r = logp.exp(), anchor.exp(), torch.exp(logp - anchor)
    sign = torch.sign(adv)
    torch.testing.assert_close(
        L.gradient_weight("drpo", logp, anchor, adv, delta=0.1), 1 - sign * (pi - mu) / 0.1
    )
    torch.testing.assert_close(L.gradient_weight("spo", logp, anchor, adv), 1 - sign * (r - 1) / 0.2)
    clipped = ((adv > 0) & (r > 1.28)) | ((adv < 0) & (r < 0.8))
    torch.testing.assert_close(L.gradient_weight("ppo-clip", logp, anchor, adv), (~clipped).double())
    masked = ((adv > 0) & (pi - mu > 0.15)) | ((adv < 0) & (pi - mu < -0.15))
    expected = (~masked).double() * r.clamp(max=20.0) / r
    torch.testing.assert_close(L.gradient_weight("dppo-tv", logp, anchor, adv), expected)
    assert 0 < clipped.sum() < 500 and 0 < masked.sum() < 500  # both branches exercised


def test_drpo_weight_zero_at_boundary_and_negative_beyond():
    # μ = 0.3, δ = 0.2: π = 0.5 is the boundary for A > 0; μ = 0.5, π = 0.3 for A < 0.
    cases = [  # (π, μ, A, expected w)
        (0.5, 0.3, 1.0, 0.0),  # w = 1 − 0.2/0.2
        (0.3, 0.5, -1.0, 0.0),  # w = 1 − (−1)(−0.2)/0.2
        (0.7, 0.3, 1.0, -1.0),  # beyond: 1 − 0.4/0.2
        (0.1, 0.5, -1.0, -1.0),  # beyond: 1 − 0.4/0.2
        (0.3, 0.5, 1.0, 2.0),  # moving back toward μ: 1 + 0.2/0.2 > 1
    ]
    for pi, mu, adv, expected in cases:
        logp = t(LN(pi)).requires_grad_()
        w = L.gradient_weight("drpo", logp, t(LN(mu)), t(adv), delta=0.2)
        assert float(w) == pytest.approx(expected, abs=1e-12)
        L.token_loss("drpo", logp, t(LN(mu)), t(adv), delta=0.2).sum().backward()
        assert float(logp.grad) == pytest.approx(-adv * pi / mu * expected, abs=1e-12)


@pytest.mark.parametrize("delta", [1.0, 2.0, 12.5])
def test_drpo_weight_bounded_when_delta_at_least_one(delta):
    logp, anchor, adv = random_tokens((2000,), seed=5, spread=6.0)
    logp[:4], anchor[:4] = t(0.0, -30.0, 0.0, -30.0), t(-30.0, 0.0, -30.0, 0.0)  # |Δ| ≈ 1
    adv[:4] = t(1.0, 1.0, -1.0, -1.0)
    w = L.gradient_weight("drpo", logp, anchor, adv, delta=delta)
    assert (w >= 1 - 1 / delta - 1e-12).all() and (w <= 1 + 1 / delta + 1e-12).all()


@pytest.mark.parametrize("mu", [0.05, 0.3, 0.5, 0.85])
@pytest.mark.parametrize("adv", [1.3, -0.7])
@pytest.mark.parametrize("delta", [0.1, 0.2])
def test_drpo_per_token_optimum_is_mu_plus_sign_a_delta(mu, adv, delta):
    pis = torch.linspace(1e-6, 1 - 1e-6, 100_001, dtype=torch.float64)  # grid step 1e-5
    loss = L.token_loss(
        "drpo", pis.log(), torch.full_like(pis, LN(mu)), torch.full_like(pis, adv), delta=delta
    )
    best = float(pis[loss.argmin()])
    expected = min(max(mu + math.copysign(delta, adv), 0.0), 1.0)  # projected onto [0, 1]
    assert best == pytest.approx(expected, abs=2e-5)


def test_drpo_optimum_analytic_stationary_point():
    # d loss/d logπ vanishes exactly at π* = μ + sign(A)·δ (w = 0 there), for many μ, A.
    mu = torch.linspace(0.05, 0.6, 12, dtype=torch.float64)
    adv = torch.where(torch.arange(12) % 2 == 0, 1.0, -1.0).double() * 1.7
    delta = 0.04
    logp = (mu + torch.sign(adv) * delta).log().requires_grad_()
    L.token_loss("drpo", logp, mu.log(), adv, delta=delta).sum().backward()
    torch.testing.assert_close(logp.grad, torch.zeros_like(mu), atol=1e-12, rtol=0)


# ---- validation -------------------------------------------------------------------------------------


def test_validation_messages():
    with pytest.raises(ConfigError, match=r"^drpo: delta must be > 0, got -1$"):
        L.token_loss("drpo", t(-1.0), t(-1.0), t(1.0), delta=-1)
    with pytest.raises(ConfigError, match=r"unknown loss 'grpo' \(choose one of: pg-is, ppo-clip"):
        L.token_loss("grpo", t(-1.0), t(-1.0), t(1.0))
    with pytest.raises(ConfigError, match=r"ppo-clip: unknown hyper-parameter 'delta' \(accepted: eps_low"):
        L.token_loss("ppo-clip", t(-1.0), t(-1.0), t(1.0), delta=0.1)
    problems = L.validate_hparams("ppo-clip", {"eps_low": 1.5, "eps_high": -1, "dual_clip": 0.5, "eps": 1})
    assert problems == [
        "ppo-clip: eps_low must be in (0, 1), got 1.5",
        "ppo-clip: eps_high must be > 0, got -1",
        "ppo-clip: dual_clip must be > 1 (or None for off), got 0.5",
        "ppo-clip: unknown hyper-parameter 'eps' (accepted: eps_low, eps_high, dual_clip)",
    ]
    with pytest.raises(ConfigError) as err:
        L.resolve_hparams("ppo-clip", {"eps_low": 1.5, "eps_high": -1})
    assert err.value.details == problems[:2] and "2 problems" in err.value.message
    assert L.validate_hparams("pg-is", {"eps": 0.1}) == [
        "pg-is: unknown hyper-parameter 'eps' (accepted: none)"
    ]
    assert L.validate_hparams("spo", {"eps": True}) == ["spo: eps must be a finite number, got True"]
    assert L.validate_hparams("spo", {"eps": float("nan")}) == ["spo: eps must be a finite number, got nan"]
    assert L.validate_hparams("dppo-tv", {"ratio_cap": 0.5}) == ["dppo-tv: ratio_cap must be >= 1, got 0.5"]
    assert L.validate_hparams("ppo-clip", {"dual_clip": None}) == []
    assert L.resolve_hparams("drpo", {"delta": 1}) == {"delta": 1.0}


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="shape mismatch"):
        L.token_loss("pg-is", torch.zeros(3), torch.zeros(3), torch.zeros(2, 3))


# ---- numerical safety -----------------------------------------------------------------------------

EXTREME = t(0.0, -1e-12, -1e-7, -0.5, -20.0, -25.0, -80.0, -1e3, -1e4)


@pytest.mark.parametrize("name,hp", HP_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_inputs_stay_finite(name, hp, dtype):
    logp, anchor = torch.meshgrid(EXTREME.to(dtype), EXTREME.to(dtype), indexing="ij")
    logp, anchor = logp.reshape(-1), anchor.reshape(-1)
    for a in (1e3, -1e3, 0.0):
        x = logp.clone().requires_grad_()
        adv = torch.full_like(x, a)
        loss = L.token_loss(name, x, anchor, adv, **hp)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
        assert torch.isfinite(L.gradient_weight(name, x, anchor, adv, **hp)).all()
        if a == 0.0:
            assert (loss == 0).all() and (x.grad == 0).all()


@pytest.mark.parametrize("name", L.LOSS_NAMES)
def test_masked_nan_contributes_nothing(name):
    logp, anchor, adv = random_tokens((10,), seed=6)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    for x in (logp, anchor, adv):
        x[~mask] = float("nan")
    logp.requires_grad_()
    loss = L.token_loss(name, logp, anchor, adv, mask=mask)
    assert (loss[~mask] == 0).all() and torch.isfinite(loss).all()
    loss.sum().backward()
    assert (logp.grad[~mask] == 0).all() and torch.isfinite(logp.grad).all()
    # Kept positions are untouched by the mask.
    clean = L.token_loss(name, logp.detach()[mask], anchor[mask], adv[mask])
    torch.testing.assert_close(loss.detach()[mask], clean)
    w = L.gradient_weight(name, logp, anchor, adv, mask=mask)
    assert (w[~mask] == 0).all() and torch.isfinite(w).all()


# ---- behavior correction ---------------------------------------------------------------------------


def test_behavior_weight_values():
    # ρ = π_old/μ: 0.3/0.1 = 3, 0.15/0.1 = 1.5, 0.025/0.1 = 0.25, 0.2/0.1 = 2 (upper band edge)
    prox, beh = t(LN(0.3), LN(0.15), LN(0.025), LN(0.2)), torch.full((4,), LN(0.1), dtype=torch.float64)
    prox.requires_grad_()
    torch.testing.assert_close(L.behavior_weight("none", prox, beh), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(L.behavior_weight("tis", prox, beh), t(2.0, 1.5, 0.25, 2.0))  # min(ρ, 2)
    torch.testing.assert_close(L.behavior_weight("tis", prox, beh, cap=1.2), t(1.2, 1.2, 0.25, 1.2))
    torch.testing.assert_close(L.behavior_weight("mis", prox, beh), t(0.0, 1.5, 0.0, 2.0))  # ρ in [0.5, 2]
    torch.testing.assert_close(L.behavior_weight("mis", prox, beh, band=(0.2, 1.0)), t(0.0, 0.0, 0.25, 0.0))
    assert not L.behavior_weight("tis", prox, beh).requires_grad
    mask = torch.tensor([True, False, True, True])
    nan_prox = prox.detach().clone()
    nan_prox[1] = float("nan")
    torch.testing.assert_close(L.behavior_weight("tis", nan_prox, beh, mask=mask), t(2.0, 0.0, 0.25, 2.0))


def test_behavior_weight_validation():
    with pytest.raises(ConfigError, match="unknown behavior correction 'is'"):
        L.behavior_weight("is", t(0.0), t(0.0))
    assert L.validate_behavior("tis", cap=0.0) == ["behavior correction cap must be a number > 0, got 0.0"]
    assert L.validate_behavior("mis", band=(2.0, 0.5)) == [
        "behavior correction band must satisfy 0 <= lo < hi, got (2.0, 0.5)"
    ]
