"""Probability-space losses (SPEC.md §1): dppo-tv, dppo-kl, drpo and prime-rl's dppo-tv-sq, whose trust
region is on Δ = π − μ (or the Binary-KL) instead of the ratio; each registered at its definition.

Conventions as in ratio_clipped.py: `logp` = logπ, `anchor` = logμ and `adv` = A detached, masked
positions neutralised; the weight functions give w with d loss/d logπ = −A·r·w.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from drpo_cli.base.lazy import lazy
from drpo_cli.objectives.elementwise import binary_kl, log_ratio, prob_delta
from drpo_cli.objectives.ratio_clipped import tau
from drpo_cli.objectives.registry import AT_LEAST_ONE, POSITIVE, LossDoc, Setting, register_loss

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy("torch")


def delta(default: float) -> Setting:
    """δ: the trust region's half-width in probability (or Binary-KL)."""
    return Setting(default, POSITIVE, "δ of {}.", order=1)


def ratio_cap(default: float) -> Setting:
    return Setting(default, AT_LEAST_ONE, "Ratio cap C of {}.", order=6)


# ---- DPPO: a binary mask on the trust region --------------------------------------------------------


def _tv_keep(logp: Tensor, anchor: Tensor, adv: Tensor, delta: float) -> Tensor:
    """DPPO Binary-TV mask M: 0 where Δ left the region [−δ, δ] in the advantage's direction."""
    d = prob_delta(logp, anchor)
    return ~(((adv > 0) & (d > delta)) | ((adv < 0) & (d < -delta)))


def _kl_keep(logp: Tensor, anchor: Tensor, adv: Tensor, delta: float) -> Tensor:
    """DPPO Binary-KL mask M: 0 where D > δ and r moved in the advantage's direction."""
    logr = log_ratio(logp, anchor)
    toward = ((adv > 0) & (logr > 0)) | ((adv < 0) & (logr < 0))
    return ~(toward & (binary_kl(logp, anchor) > delta))


def _dppo(logp: Tensor, anchor: Tensor, adv: Tensor, keep: Tensor, ratio_cap: float) -> Tensor:
    """Value −M·A·r; gradient −M·A·min(r, C)·∇logπ (the truncated ratio is a detached coefficient)."""
    r = torch.exp(log_ratio(logp, anchor)).detach()
    # Straight-through: the value is r, the gradient is min(r, C)·∇logπ.
    surrogate = r + r.clamp(max=ratio_cap) * (logp - logp.detach())
    return -torch.where(keep, adv, torch.zeros_like(adv)) * surrogate


def _w_dppo(keep: Tensor, logp: Tensor, anchor: Tensor, ratio_cap: float) -> Tensor:
    r = torch.exp(log_ratio(logp, anchor))  # > 0 always, thanks to the clamp
    return keep.to(logp.dtype) * r.clamp(max=ratio_cap) / r


def _w_dppo_tv(logp, anchor, adv, *, delta, ratio_cap):
    return _w_dppo(_tv_keep(logp, anchor, adv, delta), logp, anchor, ratio_cap)


@register_loss("dppo-tv", rank=4, weight=_w_dppo_tv, settings={"delta": delta(0.15), "ratio_cap": ratio_cap(20.0)},
               metrics={"masked": "dppo_tv/mask_frac", "A > 0 among masked": "dppo_tv/dropped_pos_adv_frac"},
               zeroing="dppo_tv/mask_frac",
               doc=LossDoc(
    paper='DPPO, Binary-TV region, arXiv 2602.04879',
    loss='`−M·A·r`, gradient `−M·A·min(r, C)·∇logπ`',
    weight='`M·min(r, C)/r`, i.e. M ∈ {0, 1} when r ≤ C; M = 0 where (A>0 ∧ Δ>δ) or (A<0 ∧ Δ<−δ)',
    defaults='`delta` 0.15, `ratio_cap` 20',
    use=('A hard trust region in probability space for stale rollouts: tokens whose probability already '
         "moved more than δ in the advantage's direction are masked."),
    spec_loss='`−M·A·r`, gradient taken through `min(r, C)` detached times `logπ`',
    spec_weight='M_t ∈ {0,1}; M=0 where (A>0 ∧ Δ>δ) or (A<0 ∧ Δ<−δ)',
    spec_defaults='δ 0.15, C 20',
    source='DPPO Binary-TV (arXiv 2602.04879)'))
def dppo_tv(logp: Tensor, anchor: Tensor, adv: Tensor, *, delta: float, ratio_cap: float) -> Tensor:
    """DPPO Binary-TV: loss = −M·A·r, M = 0 where (A>0 ∧ Δ>δ) or (A<0 ∧ Δ<−δ); w = M·min(r, C)/r.

    DPPO (arXiv 2602.04879), trust region in probability space. Relative to PPO-clip: the test is
    on Δ = π − μ instead of on the ratio, so rare tokens may move far in ratio while frequent
    tokens stay near μ; outside the region the token is masked (w = 0) rather than clipped, and
    the ratio in the gradient is truncated at C (w = C/r when r > C).
    """
    keep = _tv_keep(logp.detach(), anchor, adv, delta)
    return _dppo(logp, anchor, adv, keep, ratio_cap)


def _w_dppo_kl(logp, anchor, adv, *, delta, ratio_cap):
    return _w_dppo(_kl_keep(logp, anchor, adv, delta), logp, anchor, ratio_cap)


@register_loss("dppo-kl", rank=5, weight=_w_dppo_kl, settings={"delta": delta(0.05), "ratio_cap": ratio_cap(20.0)},
               metrics={"masked": "dppo_kl/mask_frac", "A > 0 among masked": "dppo_kl/dropped_pos_adv_frac"},
               zeroing="dppo_kl/mask_frac",
               doc=LossDoc(
    paper='DPPO, Binary-KL region, arXiv 2602.04879',
    loss='as `dppo-tv`',
    weight=('as `dppo-tv` with M = 0 where (A>0 ∧ r>1 ∧ D>δ) or (A<0 ∧ r<1 ∧ D>δ), `D = μ·log(μ/π) + '
            '(1−μ)·log((1−μ)/(1−π))`'),
    defaults='`delta` 0.05, `ratio_cap` 20',
    use='The same region measured by the Bernoulli KL, which is stricter than TV near μ ≈ 0 or 1.',
    spec_loss='as dppo-tv with D_t = μ·log(μ/π) + (1−μ)·log((1−μ)/(1−π))',
    spec_weight='M=0 where (A>0 ∧ r>1 ∧ D>δ) or (A<0 ∧ r<1 ∧ D>δ)',
    spec_defaults='δ 0.05, C 20',
    source='DPPO Binary-KL'))
def dppo_kl(logp: Tensor, anchor: Tensor, adv: Tensor, *, delta: float, ratio_cap: float) -> Tensor:
    """DPPO Binary-KL: as dppo-tv with M = 0 where (A>0 ∧ r>1 ∧ D>δ) or (A<0 ∧ r<1 ∧ D>δ).

    DPPO (arXiv 2602.04879) with D = μ·log(μ/π) + (1−μ)·log((1−μ)/(1−π)), the KL between the
    Bernoulli distributions "sample this token or not". Relative to PPO-clip: the same changes as
    dppo-tv, with this KL instead of the TV distance as the region.
    """
    keep = _kl_keep(logp.detach(), anchor, adv, delta)
    return _dppo(logp, anchor, adv, keep, ratio_cap)


# ---- DRPO: a smooth penalty instead of the mask -----------------------------------------------------


def _w_drpo(logp, anchor, adv, *, delta):
    return 1.0 - torch.sign(adv) * prob_delta(logp, anchor) / delta


@register_loss("drpo", rank=6, weight=_w_drpo, settings={"delta": delta(12.5)}, weight_stats=True,
               metrics={"corrective (w<0)": "weight/drpo_corrective_frac",
                        "attenuated (w<0.5)": "weight/drpo_attenuated_frac"},
               doc=LossDoc(
    paper='DRPO, arXiv 2606.09821 Eq. 8',
    loss='`−A·r + abs(A)·μ·(r−1)²/(2δ)` = `−A·r + abs(A)·Δ²/(2δμ)`',
    weight='`1 − sign(A)·Δ/δ`, always in `[1−1/δ, 1+1/δ]`',
    defaults="`delta` 12.5 (the paper's setting)",
    use=("Stale or mismatched rollouts where you want DPPO's probability-space region without its hard "
         'mask: a smooth pull toward the boundary μ + sign(A)·δ, corrective beyond it. Tune δ (sweep e.g.'
         ' 0.1–12.5; `drpo inspect` reports a what-if sweep).'),
    spec_loss='`−A·r + abs(A)·μ·(r−1)² / (2δ)`  (= `−A·r + abs(A)·Δ²/(2δμ)`)',
    spec_weight='`1 − sign(A)·Δ/δ`, always in `[1−1/δ, 1+1/δ]`',
    spec_defaults="δ 12.5 (the paper's setting)",
    source='DRPO, arXiv 2606.09821, Eq. 8'))
def drpo(logp: Tensor, anchor: Tensor, adv: Tensor, *, delta: float) -> Tensor:
    """DRPO: loss = −A·r + |A|·μ·(r−1)²/(2δ) = −A·r + |A|·Δ²/(2δμ); w = 1 − sign(A)·Δ/δ.

    DRPO (arXiv 2606.09821, Eq. 8). Relative to PPO-clip: a smooth penalty in probability space
    replaces the clip. The per-token optimum is π* = μ + sign(A)·δ (DPPO's Binary-TV boundary):
    w is 0 there and negative beyond (a corrective pull back toward μ), and since |Δ| ≤ 1 it stays
    in [1 − 1/δ, 1 + 1/δ] (so for δ ≥ 1 the boundary is unreachable). r is neither truncated nor
    detached; only log r is clamped to ±20. μ·(r−1) is computed as μ·expm1(log r), exact near r = 1,
    and never overflows (μ·r ≤ 1).
    """
    logr = log_ratio(logp, anchor)
    shift = torch.exp(anchor) * torch.expm1(logr)  # (…,) μ·(r−1) = Δ inside the clamp
    return -adv * torch.exp(logr) + adv.abs() * shift * torch.expm1(logr) / (2.0 * delta)


# ---- prime-rl: the Binary-TV mask with a squared-log-ratio pull --------------------------------------


def _tv_sq_keep(logp: Tensor, anchor: Tensor, adv: Tensor, delta_low: float, delta_high: float) -> Tensor:
    d = prob_delta(logp, anchor)
    return ~(((adv > 0) & (d > delta_high)) | ((adv < 0) & (d < -delta_low)))


def _w_dppo_tv_sq(logp, anchor, adv, *, delta_low, delta_high, tau):
    return _tv_sq_keep(logp, anchor, adv, delta_low, delta_high).to(logp.dtype)


def _g_dppo_tv_sq(logp, anchor, adv, *, delta_low, delta_high, tau):
    return 2.0 * tau * log_ratio(logp, anchor)


@register_loss(
    "dppo-tv-sq", rank=13, weight=_w_dppo_tv_sq, penalty=_g_dppo_tv_sq,
    settings={"delta_low": Setting(0.2, POSITIVE, "Binary-TV threshold for A < 0 of {}.", order=10),
              "delta_high": Setting(0.2, POSITIVE, "Binary-TV threshold for A > 0 of {}.", order=11),
              "tau": tau(1e-3)},
    metrics={"masked": "dppo_tv_sq/mask_frac", "A > 0 among masked": "dppo_tv_sq/dropped_pos_adv_frac"},
    zeroing="dppo_tv_sq/mask_frac",
    doc=LossDoc(
    paper="prime-rl's default loss (DPPO Binary-TV + squared log ratio)",
    loss='`−M·A·r + τ·(log r)²`, M = 0 where (A>0 ∧ Δ>δ_high) or (A<0 ∧ Δ<−δ_low)',
    weight='`M`, plus the A-free gradient `2τ·log r`',
    defaults='`delta_low` 0.2, `delta_high` 0.2, `tau` 1e-3',
    use=("Compare with a prime-rl run. dppo-tv's probability-space mask with direction-specific "
         'thresholds and a weak pull toward μ that also acts on masked tokens; the full ratio carries the'
         ' gradient (no cap).'),
    spec_loss='`−M·A·r + τ·(log r)²`, M = 0 where (A>0 ∧ Δ>δ_high) or (A<0 ∧ Δ<−δ_low)',
    spec_weight='`M`, plus the penalty gradient `2τ·log r` (on every trained token, masked ones too)',
    spec_defaults='δ_low 0.2, δ_high 0.2, τ 1e-3',
    source=('prime-rl `src/prime_rl/trainer/rl/loss.py::default_loss_fn`, `DefaultLossConfig` (559b447; '
            'its adv_tau 1 not exposed)')))
def dppo_tv_sq(logp: Tensor, anchor: Tensor, adv: Tensor, *, delta_low: float, delta_high: float,
               tau: float) -> Tensor:
    """prime-rl's default loss: loss = −M·A·r + τ·(log r)², M the Binary-TV mask; w = M, penalty 2τ·log r.

    prime-rl's default_loss_fn (src/prime_rl/trainer/rl/loss.py, DefaultLossConfig: dppo_mask_low 0.2,
    dppo_mask_high 0.2, kl_tau 1e-3, adv_tau 1): M = 0 where (A > 0 ∧ Δ > δ_high) or (A < 0 ∧ Δ < −δ_low).
    Relative to dppo-tv: the full ratio carries the gradient (no cap C, no detach), the thresholds may
    differ by direction, and a squared log ratio (no ½, unlike kimi15) pulls every trained token back
    toward μ, masked ones included.
    """
    keep = _tv_sq_keep(logp.detach(), anchor, adv, delta_low, delta_high)
    logr = log_ratio(logp, anchor)
    return -torch.where(keep, adv, torch.zeros_like(adv)) * torch.exp(logr) + tau * logr.square()
