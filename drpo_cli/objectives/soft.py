"""Soft-gated losses (SPEC.md §1): sapo, whose smooth gate on the ratio replaces the clip; registered at
its definition. Conventions as in ratio_clipped.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

from drpo_cli.base.lazy import lazy
from drpo_cli.objectives.elementwise import log_ratio
from drpo_cli.objectives.registry import POSITIVE, LossDoc, Setting, register_loss

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy("torch")


def _sapo_gate_arg(logp: Tensor, anchor: Tensor, adv: Tensor, tau_pos: float, tau_neg: float):
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))  # (…,)
    return tau, tau * torch.expm1(log_ratio(logp, anchor))  # τ, τ·(r − 1)


def _w_sapo(logp, anchor, adv, *, tau_pos, tau_neg):
    s = torch.sigmoid(_sapo_gate_arg(logp, anchor, adv, tau_pos, tau_neg)[1])
    return 4.0 * s * (1.0 - s)


@register_loss(
    "sapo", rank=9, weight=_w_sapo, weight_stats=True,
    metrics={"attenuated (w<0.5)": "weight/sapo_attenuated_frac"},
    settings={"tau_pos": Setting(1.0, POSITIVE, "Gate temperature where A > 0 of {}.", order=7),
              "tau_neg": Setting(1.05, POSITIVE, "Gate temperature where A ≤ 0 of {}.", order=8)},
    doc=LossDoc(
    paper='SAPO, arXiv 2511.20347',
    loss='`−(4/τ)·σ(τ·(r−1))·A`, τ = `tau_pos` where A>0, else `tau_neg`',
    weight='`4·σ·(1−σ)` ∈ (0, 1]',
    defaults='`tau_pos` 1.0, `tau_neg` 1.05',
    use=('Compare with a SAPO run (verl, TRL, AReaL), with `--agg seq-mean-token-mean` as they force. A '
         'soft ratio-space region: the weight decays smoothly on both sides of r = 1 (faster for A ≤ 0), '
         'never to 0 and never corrective, so stale tokens are damped rather than frozen.'),
    spec_loss='`−(4/τ)·σ(τ·(r−1))·A`, τ = τ_pos where A>0, else τ_neg',
    spec_weight='`4·σ·(1−σ)`, σ = σ(τ·(r−1)) (in (0, 1], 1 at r = 1)',
    spec_defaults='τ_pos 1.0, τ_neg 1.05',
    source=('SAPO, arXiv 2511.20347; verl `verl/trainer/ppo/core_algos.py::compute_policy_loss_sapo` '
            '(b178a3c), TRL `grpo_trainer.py::_compute_loss` `loss_type="sapo"` (f2cd577)')))
def sapo(logp: Tensor, anchor: Tensor, adv: Tensor, *, tau_pos: float, tau_neg: float) -> Tensor:
    """SAPO: loss = −(4/τ)·σ(τ·(r − 1))·A, τ = τ_pos where A > 0 else τ_neg; w = 4·σ·(1 − σ).

    Soft Adaptive Policy Optimization (arXiv 2511.20347), as verl's compute_policy_loss_sapo and TRL's
    loss_type="sapo" (defaults τ_pos 1.0, τ_neg 1.05). Relative to PPO-clip: a smooth gate replaces the
    hard clip; the weight is 1 at r = 1 and decays like a logistic bump on both sides, never to 0 and
    never below 0, faster for negative advantages (τ_neg > τ_pos). Both references force
    seq-mean-token-mean aggregation; here --agg chooses (docs/losses.md recommends theirs).
    """
    tau, x = _sapo_gate_arg(logp, anchor, adv, tau_pos, tau_neg)
    return -(4.0 / tau) * torch.sigmoid(x) * adv
