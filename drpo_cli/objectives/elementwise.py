"""Elementwise functions of two log-probabilities of the sampled token: the shared pieces of the
losses (the family modules) and the diagnostics (divergence.py), which both import this module.

Every function takes log-probabilities (any shape, values in (−∞, 0]) and returns a tensor of the
same shape. None produces NaN or ±inf for finite inputs: the log-ratio is clamped to ±LOGR_CLAMP,
Δ and Binary-KL are computed from log-space forms that stay exact when π or μ approach 0 or 1.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from drpo_cli.base.lazy import lazy

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy("torch")

LOGR_CLAMP = 20.0  # |log r| cap: r stays in [e^-20, e^20] ≈ [2e-9, 4.9e8], finite in float32


def log_ratio(logp: Tensor, anchor_logp: Tensor, clamp: float = LOGR_CLAMP) -> Tensor:
    """log r = clamp(logπ − logμ, −clamp, clamp). The clamp keeps r finite; beyond it d r/d logπ = 0."""
    return (logp - anchor_logp).clamp(-clamp, clamp)


def ratio(logp: Tensor, anchor_logp: Tensor) -> Tensor:
    """r = exp(clamped log r), the importance ratio π/μ of SPEC.md §1."""
    return torch.exp(log_ratio(logp, anchor_logp))


def prob_delta(logp: Tensor, anchor_logp: Tensor) -> Tensor:
    """Δ = π − μ, the absolute probability shift of the sampled token (differentiable in logp).

    Written as μ·expm1(d) for d = logπ − logμ ≤ 0 and −π·expm1(−d) for d > 0: each branch only
    exponentiates a non-positive number, so it is exact for tiny probabilities (where exp(logπ)
    − exp(logμ) would be fine too) and for probabilities near 1 (where it would cancel), and it
    never overflows, whatever the gap.
    """
    d = logp - anchor_logp
    down = torch.exp(anchor_logp) * torch.expm1(d.clamp(max=0.0))  # π < μ: μ·(π/μ − 1)
    up = -torch.exp(logp) * torch.expm1(-d.clamp(min=0.0))  # π > μ: π·(1 − μ/π)
    return torch.where(d > 0, up, down)


def binary_tv(logp: Tensor, anchor_logp: Tensor) -> Tensor:
    """Binary total variation |Δ| = |π − μ| between Bernoulli(π) and Bernoulli(μ) (DPPO)."""
    return prob_delta(logp, anchor_logp).abs()


def _log1m_exp(logx: Tensor) -> Tensor:
    """log(1 − e^logx) for logx ≤ 0, floored at log(tiny) of the dtype so it is never −inf.

    Two forms by the usual rule (Mächler 2012): log(−expm1(x)) near 0, log1p(−exp(x)) below −ln 2.
    """
    logx = logx.clamp(max=0.0)
    near_one = torch.log(-torch.expm1(logx))
    far = torch.log1p(-torch.exp(logx))
    floor = math.log(torch.finfo(logx.dtype).tiny)
    return torch.where(logx > -math.log(2.0), near_one, far).clamp(min=floor)


def binary_kl(logp: Tensor, anchor_logp: Tensor) -> Tensor:
    """Binary KL D = μ·log(μ/π) + (1−μ)·log((1−μ)/(1−π)) = KL(Bernoulli(μ) ‖ Bernoulli(π)) (DPPO).

    Finite for every π, μ in [0, 1]: 1 − p comes from −expm1(log p) (exact near 1), its log is
    floored at the dtype's smallest normal, and log-probs are floored at −1e4 so 0·log 0 terms
    vanish. Rounding below zero is clamped to 0. Not meant to be differentiated.
    """
    logp = logp.clamp(min=-1e4, max=0.0)
    anchor_logp = anchor_logp.clamp(min=-1e4, max=0.0)
    mu = torch.exp(anchor_logp)
    one_minus_mu = -torch.expm1(anchor_logp)
    hit = mu * (anchor_logp - logp)  # (…,) μ·log(μ/π)
    miss = one_minus_mu * (_log1m_exp(anchor_logp) - _log1m_exp(logp))  # (…,) (1−μ)·log((1−μ)/(1−π))
    return (hit + miss).clamp(min=0.0)


def k1(logp: Tensor, anchor_logp: Tensor) -> Tensor:
    """k1 = −log r, unbiased estimator of KL(μ‖π) from samples of μ (Schulman, "Approximating KL")."""
    return -log_ratio(logp, anchor_logp)


def k2(logp: Tensor, anchor_logp: Tensor) -> Tensor:
    """k2 = ½·(log r)², low-variance biased estimator of KL(μ‖π)."""
    return 0.5 * log_ratio(logp, anchor_logp).square()


def k3(logp: Tensor, anchor_logp: Tensor) -> Tensor:
    """k3 = (r − 1) − log r ≥ 0, unbiased and non-negative; expm1 keeps it exact near r = 1."""
    logr = log_ratio(logp, anchor_logp)
    return torch.expm1(logr) - logr


def kl_reverse(logp: Tensor, anchor_logp: Tensor) -> Tensor:
    """r·log r: its mean over samples of μ estimates KL(π‖μ) = E_μ[r·log r] (unbiased; log r clamped)."""
    logr = log_ratio(logp, anchor_logp)
    return torch.exp(logr) * logr


def reverse_k3(logp: Tensor, anchor_logp: Tensor) -> Tensor:
    """k3 of the reversed ratio, 1/r − 1 + log r ≥ 0 (NeMo-RL's policy_kl_error): not importance-weighted, so
    over samples of μ it is a biased estimate of KL(π‖μ); kl_reverse is the unbiased one."""
    logr = log_ratio(logp, anchor_logp)
    return torch.expm1(-logr) + logr


def js_estimate(logp: Tensor, anchor_logp: Tensor) -> Tensor:
    """NeMo-RL's per-token Jensen-Shannon estimate: ½·k3(π/m) + ½·k3(μ/m), m = (π + μ)/2, k3(x) = x − 1 − log x.

    With d = log π − log μ the two k3 terms' linear parts cancel and the sum is log((1 + e^d)/2) − d/2 =
    log cosh(d/2), even in d; it is computed as log1p(½·expm1(−|d|)) + |d|/2, which never overflows (no clamp
    needed: the estimate grows like |d|/2) and keeps its relative precision near d = 0, where it is ≈ d²/8.
    """
    a = (logp - anchor_logp).abs()
    return torch.log1p(0.5 * torch.expm1(-a)) + 0.5 * a
