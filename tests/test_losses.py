"""Losses of SPEC.md §1: hand-computed values, the registry contract, autograd vs the analytic
gradient weight, DRPO's per-token optimum, hyper-parameter validation and numerical safety."""

from __future__ import annotations

import math

import pytest
import torch

from drpo_cli.base.errors import ConfigError
from drpo_cli.objectives import catalog, corrections, sequence
from drpo_cli.objectives import losses as L

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
    ("gspo", {}),
    ("gspo", {"eps_low": 0.2, "eps_high": 0.28}),
    ("cispo", {}),
    ("cispo", {"eps_low": 0.2, "eps_high": 0.28}),
]


def seq_of(x: torch.Tensor, size: int = 4) -> torch.Tensor:
    """Sequence labels for any shape: consecutive groups of `size` tokens (rows of 2-D inputs split too)."""
    return (torch.arange(x.numel()) // size).reshape(x.shape)


def random_tokens(shape, seed, spread=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = torch.log(torch.rand(shape, generator=g, dtype=dtype).clamp(min=1e-6))
    anchor = (logp + spread * torch.randn(shape, generator=g, dtype=dtype)).clamp(max=0.0)
    adv = torch.randn(shape, generator=g, dtype=dtype)
    adv[..., 0] = 0.0  # some zero advantages
    return logp, anchor, adv


def test_registry_names_and_defaults():
    assert catalog.LOSS_NAMES == ("pg-is", "ppo-clip", "spo", "dppo-tv", "dppo-kl", "drpo", "gspo", "cispo", "sapo",
                            "gmpo", "topr", "kimi15", "dppo-tv-sq", "vespo", "clip-cov", "kl-cov")
    assert catalog.SEQUENCE_LOSSES == ("gspo", "gmpo", "vespo")
    assert catalog.BATCH_LOSSES == ("clip-cov", "kl-cov")
    assert catalog.DEFAULTS["gspo"] == {"eps_low": 3e-4, "eps_high": 4e-4}
    assert catalog.DEFAULTS["cispo"] == {"eps_low": None, "eps_high": 4.0}
    assert catalog.DEFAULTS["ppo-clip"] == {"eps_low": 0.2, "eps_high": 0.28, "dual_clip": None}
    assert catalog.DEFAULTS["spo"] == {"eps": 0.2}
    assert catalog.DEFAULTS["dppo-tv"] == {"delta": 0.15, "ratio_cap": 20.0}
    assert catalog.DEFAULTS["dppo-kl"] == {"delta": 0.05, "ratio_cap": 20.0}
    assert catalog.DEFAULTS["drpo"] == {"delta": 12.5}
    assert all(set(d) <= set(catalog.HPARAM_NAMES) for d in catalog.DEFAULTS.values())


@pytest.mark.parametrize("name", catalog.LOSS_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contract_shape_finite_grad_and_pg_at_pi_equals_mu(name, dtype):
    logp, anchor, adv = random_tokens((3, 7), seed=1, dtype=dtype)
    seq = seq_of(logp, 7)  # one sequence per row
    logp.requires_grad_()
    loss = L.token_loss(name, logp, anchor, adv, seq_index=seq)
    assert loss.shape == logp.shape and loss.dtype == dtype
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert logp.grad is not None and torch.isfinite(logp.grad).all() and logp.grad.abs().sum() > 0
    # π = μ: every loss is plain PG, gradient −A (r = 1, w = 1), value −A (REINFORCE-form losses such as
    # cispo: −A·logπ). The advantage is constant per sequence, as sequence-level losses assume; no token
    # is covariance-selected (a clip-cov selection zeroes tokens whatever π).
    adv = adv[:, :1].expand(3, 7).clone()
    same = logp.detach().clone().requires_grad_()
    none = torch.zeros_like(adv, dtype=torch.bool) if name in catalog.BATCH_LOSSES else None
    at_mu = L.token_loss(name, same, same.detach(), adv, seq_index=seq, selected=none)
    at_mu.sum().backward()
    torch.testing.assert_close(at_mu, -adv * same.detach() if catalog.LOSSES[name].reinforce else -adv)
    torch.testing.assert_close(same.grad, -adv)
    w = L.gradient_weight(name, same, same, adv, seq_index=seq, selected=none)
    torch.testing.assert_close(w[adv != 0], torch.ones_like(adv)[adv != 0])  # gmpo: w = 0 where A = 0


@pytest.mark.parametrize("name", catalog.LOSS_NAMES)
def test_anchor_and_advantages_are_detached(name):
    logp, anchor, adv = random_tokens((20,), seed=2)
    anchor.requires_grad_()
    adv.requires_grad_()
    L.token_loss(name, logp.requires_grad_(), anchor, adv, seq_index=seq_of(logp)).sum().backward()
    assert anchor.grad is None and adv.grad is None


@pytest.mark.parametrize("name,hp", [c for c in HP_CASES if c[0] not in catalog.SEQUENCE_LOSSES])
@pytest.mark.parametrize("spread", [0.05, 1.0, 4.0])
def test_autograd_equals_minus_a_r_w(name, hp, spread):
    logp, anchor, adv = random_tokens((400,), seed=3, spread=spread)
    logp.requires_grad_()
    L.token_loss(name, logp, anchor, adv, **hp).sum().backward()
    r = torch.exp(logp.detach() - anchor)
    w = L.gradient_weight(name, logp, anchor, adv, **hp)
    assert not w.requires_grad
    torch.testing.assert_close(logp.grad, -adv * r * w, rtol=1e-9, atol=1e-12)


def naive_gspo(logp, anchor, adv, seq, valid, eps_low=3e-4, eps_high=4e-4):
    """GSPO with Python loops over sequences: (per-token loss, d(Σ loss)/d logπ by the SPEC.md formula)."""
    loss, grad = torch.zeros_like(logp), torch.zeros_like(logp)
    for i in seq.unique().tolist():
        toks = [t for t in range(len(logp)) if seq[t] == i and valid[t]]
        if not toks:
            continue
        s = math.exp(sum(float(logp[t] - anchor[t]) for t in toks) / len(toks))
        share = 0.0
        for t in toks:
            a = float(adv[t])
            loss[t] = max(-a * s, -a * min(max(s, 1 - eps_low), 1 + eps_high))
            clipped = (a > 0 and s > 1 + eps_high) or (a < 0 and s < 1 - eps_low)
            share += a * (0.0 if clipped else 1.0)
        for t in toks:  # every token of the sequence gets −(s/n)·Σ_t A_t·w_t
            grad[t] = -s / len(toks) * share
    return loss, grad


@pytest.mark.parametrize("hp", [{}, {"eps_low": 0.05, "eps_high": 0.1}, {"eps_low": 0.5, "eps_high": 2.0}])
@pytest.mark.parametrize("spread", [0.01, 0.3, 1.0])
def test_gspo_autograd_equals_naive_reference_and_gradient_weight(hp, spread):
    logp, anchor, adv = random_tokens((60,), seed=11, spread=spread)
    seq = torch.repeat_interleave(torch.arange(8), torch.tensor([1, 3, 5, 7, 9, 10, 12, 13]))
    adv = torch.where(seq % 3 == 0, adv, adv[seq])  # per-token advantages in some sequences, constant in others
    valid = torch.rand(60, generator=torch.Generator().manual_seed(5)) > 0.2
    x = logp.clone().requires_grad_()
    loss = L.token_loss("gspo", x, anchor, adv, mask=valid, seq_index=seq, **hp)
    loss.sum().backward()
    ref_loss, ref_grad = naive_gspo(logp, anchor, adv, seq, valid, **{**catalog.DEFAULTS["gspo"], **hp})
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-9, atol=1e-12)
    # The analytic weights of SPEC.md: d(Σ loss)/d logπ_u = −(s_i/n_i)·Σ_{t∈i} A_t·w_t.
    w = L.gradient_weight("gspo", logp, anchor, adv, mask=valid, seq_index=seq, **hp)
    s = torch.exp(sequence.sequence_reduce(logp - anchor, seq, valid, "mean"))
    n = sequence.sequence_reduce(torch.ones_like(logp), seq, valid, "sum")
    expected = -s / n.clamp(min=1) * sequence.sequence_reduce(adv * w, seq, valid, "sum")
    torch.testing.assert_close(x.grad, torch.where(valid, expected, torch.zeros_like(expected)), rtol=1e-9,
                               atol=1e-12)
    if spread >= 0.3 and not hp:
        assert 0 < ((w == 0) & valid).sum() < valid.sum()  # both branches exercised


def test_gspo_hand_computed():
    # One sequence of two tokens: log r = ln 1.5 and ln(1/1.5) → s = 1; then log r = ln 2, 0 → s = √2.
    one = L.token_loss("gspo", t(LN(0.6), LN(0.4)), t(LN(0.4), LN(0.6)), t(2.0, 2.0), seq_index=torch.tensor([0, 0]))
    torch.testing.assert_close(one, t(-2.0, -2.0))  # −A·s = −2, inside the clip
    x = t(LN(0.8), LN(0.5)).requires_grad_()
    two = L.token_loss("gspo", x, t(LN(0.4), LN(0.5)), t(1.0, 1.0), seq_index=torch.tensor([0, 0]), eps_high=0.5)
    torch.testing.assert_close(two, t(-math.sqrt(2), -math.sqrt(2)))  # s = √2 < 1.5: −A·s
    two.sum().backward()
    # Σ loss = −2·s; d/d logπ_t = −2·s/2 = −√2 for each token.
    torch.testing.assert_close(x.grad, t(-math.sqrt(2), -math.sqrt(2)))
    x.grad = None
    clipped = L.token_loss("gspo", x, t(LN(0.4), LN(0.5)), t(1.0, 1.0), seq_index=torch.tensor([0, 0]))
    torch.testing.assert_close(clipped, t(-1.0004, -1.0004))  # s = √2 > 1 + 4e-4: −A·(1 + ε_high)
    clipped.sum().backward()
    torch.testing.assert_close(x.grad, t(0.0, 0.0))
    with pytest.raises(ValueError, match="gspo is sequence-level: pass seq_index"):
        L.token_loss("gspo", t(-1.0), t(-1.0), t(1.0))


def test_cispo_hand_computed():
    # π=0.6, μ=0.4 → r = 1.5 ≤ 5: loss = −1.5·A·logπ, gradient −1.5·A; r = 60 (μ=0.01) is capped at 5.
    x = t(LN(0.6), LN(0.6)).requires_grad_()
    loss = L.token_loss("cispo", x, t(LN(0.4), LN(0.01)), t(2.0, -1.0))
    torch.testing.assert_close(loss, t(-1.5 * 2 * LN(0.6), -5.0 * -1.0 * LN(0.6)))
    loss.sum().backward()
    torch.testing.assert_close(x.grad, t(-3.0, 5.0))
    # A lower bound when asked: r = 0.5 with ε_low 0.2 → weight 0.8.
    torch.testing.assert_close(L.gradient_weight("cispo", t(LN(0.2)), t(LN(0.4)), t(1.0), eps_low=0.2), t(1.6))
    assert catalog.validate_hparams("cispo", {"eps_low": None}) == []
    assert catalog.validate_hparams("ppo-clip", {"eps_low": None}) == ["ppo-clip: eps_low must be a finite number, got None"]


def test_eps_low_one_is_no_lower_clip():
    # ε_low = 1 puts the lower bound at r = 0, which no ratio reaches: CISPO's default (off), exactly.
    logp, anchor, adv = random_tokens((300,), seed=9)
    assert catalog.validate_hparams("cispo", {"eps_low": 1.0}) == []
    assert bool((logp < anchor).any())  # some r < 1, where a lower bound would act
    x_off, x_one = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    off = L.token_loss("cispo", x_off, anchor, adv)
    one = L.token_loss("cispo", x_one, anchor, adv, eps_low=1.0)
    torch.testing.assert_close(one, off, rtol=0, atol=0)
    one.sum().backward()
    off.sum().backward()
    torch.testing.assert_close(x_one.grad, x_off.grad, rtol=0, atol=0)


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
    problems = catalog.validate_hparams("ppo-clip", {"eps_low": 1.5, "eps_high": -1, "dual_clip": 0.5, "eps": 1})
    assert problems == [
        "ppo-clip: eps_low must be in (0, 1] (1: lower bound 0, no lower clip), got 1.5",
        "ppo-clip: eps_high must be > 0, got -1",
        "ppo-clip: dual_clip must be > 1 (or None for off), got 0.5",
        "ppo-clip: unknown hyper-parameter 'eps' (accepted: eps_low, eps_high, dual_clip)",
    ]
    with pytest.raises(ConfigError) as err:
        catalog.resolve_hparams("ppo-clip", {"eps_low": 1.5, "eps_high": -1})
    assert err.value.details == problems[:2] and "2 problems" in err.value.message
    assert catalog.validate_hparams("pg-is", {"eps": 0.1}) == [
        "pg-is: unknown hyper-parameter 'eps' (accepted: none)"
    ]
    assert catalog.validate_hparams("spo", {"eps": True}) == ["spo: eps must be a finite number, got True"]
    assert catalog.validate_hparams("spo", {"eps": float("nan")}) == ["spo: eps must be a finite number, got nan"]
    assert catalog.validate_hparams("dppo-tv", {"ratio_cap": 0.5}) == ["dppo-tv: ratio_cap must be >= 1, got 0.5"]
    assert catalog.validate_hparams("ppo-clip", {"dual_clip": None}) == []
    assert catalog.resolve_hparams("drpo", {"delta": 1}) == {"delta": 1.0}


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
        loss = L.token_loss(name, x, anchor, adv, seq_index=seq_of(x, 3), **hp)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
        assert torch.isfinite(L.gradient_weight(name, x, anchor, adv, seq_index=seq_of(x, 3), **hp)).all()
        if a == 0.0:
            assert (loss == 0).all() and (x.grad == 0).all()


@pytest.mark.parametrize("name", catalog.LOSS_NAMES)
def test_masked_nan_contributes_nothing(name):
    logp, anchor, adv = random_tokens((10,), seed=6)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    for x in (logp, anchor, adv):
        x[~mask] = float("nan")
    logp.requires_grad_()
    seq = seq_of(logp, 3)
    loss = L.token_loss(name, logp, anchor, adv, mask=mask, seq_index=seq)
    assert (loss[~mask] == 0).all() and torch.isfinite(loss).all()
    loss.sum().backward()
    assert (logp.grad[~mask] == 0).all() and torch.isfinite(logp.grad).all()
    # Kept positions are untouched by the mask.
    clean = L.token_loss(name, logp.detach()[mask], anchor[mask], adv[mask], seq_index=seq[mask])
    torch.testing.assert_close(loss.detach()[mask], clean)
    w = L.gradient_weight(name, logp, anchor, adv, mask=mask, seq_index=seq)
    assert (w[~mask] == 0).all() and torch.isfinite(w).all()


# ---- behavior correction ---------------------------------------------------------------------------


def test_behavior_weight_values():
    # ρ = π_old/μ: 0.3/0.1 = 3, 0.15/0.1 = 1.5, 0.025/0.1 = 0.25, 0.2/0.1 = 2 (upper band edge)
    prox, beh = t(LN(0.3), LN(0.15), LN(0.025), LN(0.2)), torch.full((4,), LN(0.1), dtype=torch.float64)
    prox.requires_grad_()
    torch.testing.assert_close(corrections.behavior_weight("none", prox, beh), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(corrections.behavior_weight("tis", prox, beh), t(2.0, 1.5, 0.25, 2.0))  # min(ρ, 2)
    torch.testing.assert_close(corrections.behavior_weight("tis", prox, beh, cap=1.2), t(1.2, 1.2, 0.25, 1.2))
    torch.testing.assert_close(corrections.behavior_weight("mis", prox, beh), t(0.0, 1.5, 0.0, 2.0))  # ρ in [0.5, 2]
    torch.testing.assert_close(corrections.behavior_weight("mis", prox, beh, band=(0.2, 1.0)), t(0.0, 0.0, 0.25, 0.0))
    assert not corrections.behavior_weight("tis", prox, beh).requires_grad
    mask = torch.tensor([True, False, True, True])
    nan_prox = prox.detach().clone()
    nan_prox[1] = float("nan")
    torch.testing.assert_close(corrections.behavior_weight("tis", nan_prox, beh, mask=mask), t(2.0, 0.0, 0.25, 2.0))


def test_behavior_weight_validation():
    with pytest.raises(ConfigError, match="unknown behavior correction 'cis'"):
        corrections.behavior_weight("cis", t(0.0), t(0.0))
    assert corrections.validate_behavior("tis", cap=0.0) == ["behavior correction cap must be a number > 0, got 0.0"]
    assert corrections.validate_behavior("mis", band=(2.0, 0.5)) == [
        "behavior correction band must satisfy 0 <= lo < hi, got (2.0, 0.5)"
    ]


def test_behavior_weight_sequence_and_geometric_levels():
    # Sequence 0: ρ = 3, 0.5 → product 1.5, geometric √1.5; sequence 1: ρ = 4 (one token); token 2 masked.
    prox = t(LN(0.3), LN(0.05), LN(0.9), LN(0.4))
    beh = t(LN(0.1), LN(0.1), LN(0.1), LN(0.1))
    seq, mask = torch.tensor([0, 0, 0, 1]), torch.tensor([True, True, False, True])
    seq_w = corrections.behavior_weight("tis", prox, beh, cap=10.0, mask=mask, level="sequence", seq_index=seq)
    torch.testing.assert_close(seq_w, t(1.5, 1.5, 0.0, 4.0))
    geo = corrections.behavior_weight("tis", prox, beh, cap=2.0, mask=mask, level="geometric", seq_index=seq)
    torch.testing.assert_close(geo, t(math.sqrt(1.5), math.sqrt(1.5), 0.0, 2.0))  # 4 capped at 2
    mis = corrections.behavior_weight("mis", prox, beh, mask=mask, level="sequence", seq_index=seq)
    torch.testing.assert_close(mis, t(1.5, 1.5, 0.0, 0.0))  # 4 outside [0.5, 2]: sequence dropped
    assert corrections.validate_behavior("tis", level="seq") == [
        "unknown IS level 'seq' (choose one of: token, sequence, geometric)"
    ]


def test_rejection_mask_hand_computed():
    # log ρ per token: ln 2, 0, ln 0.5 (sequence 0) and 0, 0 (sequence 1); token 3 masked out.
    prox = t(LN(0.2), LN(0.1), LN(0.05), LN(0.3), LN(0.3))
    beh = t(LN(0.1), LN(0.1), LN(0.1), LN(0.3), LN(0.3))
    seq, mask = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([True, True, True, False, True])
    k3 = [(2 - 1) - LN(2), 0.0, (0.5 - 1) - LN(0.5)]  # 0.3069, 0, 0.1931
    keep = corrections.rejection_mask([("token", "k3", ">", 0.25)], prox, beh, mask, seq)
    assert keep.tolist() == [False, True, True, False, True]
    keep = corrections.rejection_mask([("seq_mean", "k3", ">", sum(k3) / 3 - 1e-6)], prox, beh, mask, seq)
    assert keep.tolist() == [False, False, False, False, True]
    keep = corrections.rejection_mask([("seq_mean", "k3", ">", sum(k3) / 3 + 1e-6)], prox, beh, mask, seq)
    assert keep.tolist() == [True, True, True, False, True]
    # k1 = −log ρ: token 0 has k1 = −ln 2 < −0.5; seq_sum k1 of sequence 0 = 0; seq_max k2 = ½ ln²2 = 0.24
    assert corrections.rejection_mask([("token", "k1", "<", -0.5)], prox, beh, mask, seq).tolist() == [
        False, True, True, False, True]
    assert corrections.rejection_mask([("seq_sum", "k1", ">", 1e-9)], prox, beh, mask, seq).tolist() == [
        True, True, True, False, True]
    assert corrections.rejection_mask([("seq_max", "k2", ">", 0.2)], prox, beh, mask, seq).tolist() == [
        False, False, False, False, True]
    both = [("seq_max", "k2", ">", 0.3), ("token", "k3", ">", 0.25)]  # any criterion rejects
    assert corrections.rejection_mask(both, prox, beh, mask, seq).tolist() == [False, True, True, False, True]


def test_reference_kl_values_and_gradients():
    # π = 0.5, π_ref = 0.25: x = ln 0.5; k1 = ln 2, k2 = ½ ln²2, k3 = 0.5 − ln 0.5 − 1 = ln 2 − 0.5.
    x = t(LN(0.5)).requires_grad_()
    ref = t(LN(0.25))
    assert float(corrections.reference_kl("k1", x, ref).detach()) == pytest.approx(LN(2))
    assert float(corrections.reference_kl("k2", x, ref).detach()) == pytest.approx(0.5 * LN(2) ** 2)
    k3 = corrections.reference_kl("k3", x, ref)
    assert float(k3.detach()) == pytest.approx(LN(2) - 0.5)
    k3.backward()
    assert float(x.grad) == pytest.approx(1 - 0.25 / 0.5)  # d k3/d logπ = 1 − π_ref/π
    with pytest.raises(ConfigError, match="unknown KL estimator 'k4'"):
        corrections.reference_kl("k4", x, ref)


def test_sequence_reduce():
    x = t(1.0, 2.0, 3.0, 4.0, 5.0)
    seq, valid = torch.tensor([7, 7, 7, 2, 2]), torch.tensor([True, False, True, True, True])
    torch.testing.assert_close(sequence.sequence_reduce(x, seq, valid, "sum"), t(4.0, 4.0, 4.0, 9.0, 9.0))
    torch.testing.assert_close(sequence.sequence_reduce(x, seq, valid, "mean"), t(2.0, 2.0, 2.0, 4.5, 4.5))
    torch.testing.assert_close(sequence.sequence_reduce(x, seq, valid, "amax"), t(3.0, 3.0, 3.0, 5.0, 5.0))
