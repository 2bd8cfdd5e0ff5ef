"""Sequence-level losses (SPEC.md §1): gspo, gmpo and vespo, whose ratio (or weight) is one per sequence,
and `sequence_reduce`, the per-sequence sum / mean / max they and the corrections share.

A sequence-level loss sees each token's sequence (`seq`, any integer labels) and the trained tokens
(`valid`); its per-token loss is the loss of its sequence, so it needs whole sequences, which every
micro-batch holds (batching.py never splits a row). Its gradient contract is stated per sequence
(registry.LossSpec.contract). Conventions otherwise as in ratio_clipped.py.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from drpo_cli.base.lazy import lazy
from drpo_cli.objectives.counts import fraction, seq_fraction
from drpo_cli.objectives.elementwise import LOGR_CLAMP, log_ratio
from drpo_cli.objectives.ratio_clipped import eps_high, eps_low
from drpo_cli.objectives.registry import NON_NEGATIVE, POSITIVE, LossDoc, Setting, register_loss

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy("torch")

VESPO_LOG_W_FLOOR = math.log(1e-8)  # TRL's lower clamp of the sequence log-weight


def sequence_reduce(x: Tensor, seq_index: Tensor, valid: Tensor, reduce: str = "mean") -> Tensor:
    """Per token, the sum / mean / max of `x` over the valid tokens of its sequence (same shape as x).

    Differentiable for "sum" and "mean" (index_add); a sequence without valid tokens gives 0.
    `seq_index` labels sequences by any integers; tokens with equal labels form one sequence.
    """
    flat, valid = x.reshape(-1), valid.reshape(-1).bool()
    _, inv = torch.unique(seq_index.reshape(-1), return_inverse=True)  # (N,) in [0, S)
    num = int(inv.max()) + 1 if inv.numel() else 0
    if reduce == "amax":
        out = torch.full((num,), -math.inf, dtype=x.dtype, device=x.device)
        out = out.scatter_reduce(0, inv[valid], flat[valid], reduce="amax")
        out = torch.where(torch.isinf(out), torch.zeros_like(out), out)
    else:
        kept = torch.where(valid, flat, torch.zeros_like(flat))
        out = torch.zeros(num, dtype=x.dtype, device=x.device).index_add(0, inv, kept)  # (S,)
        if reduce == "mean":
            n = torch.zeros(num, dtype=x.dtype, device=x.device).index_add(0, inv, valid.to(x.dtype))
            out = out / n.clamp(min=1.0)
        elif reduce != "sum":
            raise ValueError(f"reduce must be 'sum', 'mean' or 'amax', got {reduce!r}")
    return out[inv].reshape(x.shape)


# ---- GSPO ------------------------------------------------------------------------------------------


def _log_seq_ratio(logp: Tensor, anchor: Tensor, seq: Tensor, valid: Tensor) -> Tensor:
    """log s per token: the mean of its sequence's (clamped) log r over trained tokens, clamped to ±20."""
    return sequence_reduce(log_ratio(logp, anchor), seq, valid, "mean").clamp(-LOGR_CLAMP, LOGR_CLAMP)


def _w_gspo(logp, anchor, adv, *, seq, valid, eps_low, eps_high):
    # Per sequence: 0 where s_i is clipped in the harmful direction (as ppo-clip per token), else 1.
    s = torch.exp(_log_seq_ratio(logp, anchor, seq, valid))
    clipped = ((adv > 0) & (s > 1.0 + eps_high)) | ((adv < 0) & (s < 1.0 - eps_low))
    return (~clipped).to(logp.dtype)


def _gspo_ratio(logp, anchor, adv, seq, valid, **hp):
    return torch.exp(_log_seq_ratio(logp, anchor, seq, valid))


@register_loss(
    "gspo", rank=7, weight=_w_gspo, settings={"eps_low": eps_low(3e-4), "eps_high": eps_high(4e-4)},
    level="sequence", contract="sequence", seq_ratio=_gspo_ratio,
    metrics={"clipped": "gspo/clip_frac", "clipped sequences": "gspo/seq_clip_frac",
             "A > 0 among clipped": "gspo/dropped_pos_adv_frac"},
    doc=LossDoc(
    paper='GSPO, arXiv 2507.18071 Eq. 5 (sequence-level)',
    loss=('per sequence i, on each of its trained tokens: `max(−A·s_i, −A·clip(s_i, 1−ε_low, 1+ε_high))`,'
          ' `s_i = exp(mean_{t∈i} log r_t)`'),
    weight=("`w_t = 0` where s_i is clipped in A_t's harmful direction, else 1, with `d(Σ_t loss_t)/d "
            'logπ_u = −(s_i/n_i)·Σ_{t∈i} A_t·w_t` for each token u of i'),
    defaults='`eps_low` 3e-4, `eps_high` 4e-4',
    use=('Compare with a GSPO run (verl, TRL). One ratio and one clip per sequence: no token of a '
         "sequence is treated differently. Use `--agg seq-mean-token-mean`, GSPO's own averaging. Tiny ε:"
         ' on stale rollouts most sequences are clipped (`gspo/seq_clip_frac`).'),
    spec_loss=('per sequence i, on each of its trained tokens: `max(−A·s_i, −A·clip(s_i, 1−ε_low, '
               '1+ε_high))`, `s_i = exp(mean_{t∈i} log r_t)` (log s clamped to ±20)'),
    spec_weight=('sequence-level: `d(Σ_t loss_t)/d logπ_u = −(s_i/n_i)·Σ_{t∈i} A_t·w_t` for every token u'
                 " of i (n_i trained tokens), `w_t = 0` where s_i is clipped in A_t's harmful direction "
                 '(A>0 ∧ s>1+ε_high, A<0 ∧ s<1−ε_low), else 1'),
    spec_defaults='ε_low 3e-4, ε_high 4e-4',
    source=('GSPO, arXiv 2507.18071 Eq. 5; verl `compute_policy_loss_gspo`; TRL GRPO '
            '`importance_sampling_level="sequence"`')))
def gspo(
    logp: Tensor, anchor: Tensor, adv: Tensor, *, seq: Tensor, valid: Tensor, eps_low: float, eps_high: float
) -> Tensor:
    """GSPO: per sequence i, loss = max(−A·s_i, −A·clip(s_i, 1−ε_low, 1+ε_high)) on each of its tokens.

    Group Sequence Policy Optimization (arXiv 2507.18071, its objective Eq. 5): the sequence ratio
    s_i = (π(y_i)/μ(y_i))^(1/|y_i|) = exp(mean over the sequence's trained tokens of log r), clipped per
    sequence; defaults ε_low = 3e-4, ε_high = 4e-4 (the clipping ranges of the paper's
    experiments, and verl's examples/gspo_trainer). Relative to PPO-clip: one ratio and one clip decision per sequence, not per
    token, and the gradient reaches every token of the sequence through s_i (d s_i/d logπ_t = s_i/|y_i|),
    as in TRL's GRPOTrainer with importance_sampling_level="sequence". Every token carries its
    sequence's value, so with --agg seq-mean-token-mean (GSPO's own averaging, forced by verl's
    compute_policy_loss_gspo) the step loss is GSPO's mean over sequences. With an advantage constant
    over the sequence (the paper's setting) the gradient equals verl's GSPO-token form.
    """
    s = torch.exp(_log_seq_ratio(logp, anchor, seq, valid))  # (…,) s_i of each token's sequence
    return torch.maximum(-adv * s, -adv * s.clamp(1.0 - eps_low, 1.0 + eps_high))


# ---- GMPO ------------------------------------------------------------------------------------------


def _gmpo_clip(logp: Tensor, anchor: Tensor, adv: Tensor, eps_low: float, eps_high: float):
    """(sign-aware clipped log r, kept): the clip applies only in the advantage's direction."""
    x = log_ratio(logp, anchor)
    sgn = torch.sign(adv)
    x_min = sgn * torch.minimum(sgn * x, sgn * x.clamp(-eps_low, eps_high))
    kept = ~(((adv > 0) & (x > eps_high)) | ((adv < 0) & (x < -eps_low))) & (adv != 0)
    return x_min, kept


def _w_gmpo(logp, anchor, adv, *, seq, valid, eps_low, eps_high):
    return _gmpo_clip(logp, anchor, adv, eps_low, eps_high)[1].to(logp.dtype)


def gmpo_ratio(logp: Tensor, anchor: Tensor, adv: Tensor, seq: Tensor, valid: Tensor, eps_low: float,
               eps_high: float) -> Tensor:
    """s_i of each token's sequence (detached), for the sequence contract of the gradient."""
    return torch.exp(sequence_reduce(_gmpo_clip(logp, anchor, adv, eps_low, eps_high)[0], seq, valid,
                                     "mean")).detach()


def _gmpo_effects(hp, logp, anchor, adv, seq, selected):
    """Tokens whose log r is clipped in their advantage's direction (w = 0, A ≠ 0), and sequences holding one."""
    if seq is None:
        return {}
    hit = ~_gmpo_clip(logp, anchor, adv, hp["eps_low"], hp["eps_high"])[1] & (adv != 0)
    return {"gmpo/clip_frac": fraction(hit, logp.numel()), "gmpo/seq_clip_frac": seq_fraction(hit, seq)}


@register_loss(
    "gmpo", rank=10, weight=_w_gmpo, settings={"eps_low": eps_low(0.4), "eps_high": eps_high(0.4)},
    level="sequence", contract="geometric", seq_ratio=gmpo_ratio,
    metrics={"clipped": "gmpo/clip_frac", "clipped sequences": "gmpo/seq_clip_frac"}, effects=_gmpo_effects,
    effect_metrics=("gmpo/clip_frac", "gmpo/seq_clip_frac"), doc=LossDoc(
    paper='GMPO, arXiv 2507.20673 (sequence-level)',
    loss=('per sequence: `−Ā_i·exp(mean_{t∈i} x_t)`, x_t = log r_t clipped to [−ε_low, ε_high] only in '
          "A_t's direction"),
    weight=("`w_u` ∈ {0, 1} (0: u's log r clipped in its advantage's direction, or A_u = 0), with `d(Σ_t "
            'loss_t)/d logπ_u = −(s_i/n_i)·(Σ_{t∈i} A_t)·w_u`'),
    defaults='`eps_low` 0.4, `eps_high` 0.4 (log-ratio bounds)',
    use=('Long responses whose token ratios have outliers: the geometric mean lets one extreme token move'
         ' the sequence ratio only by its n-th root, and clipping is per token, so the rest keep '
         "learning. Use `--agg seq-mean-token-mean` (verl's mean over sequences)."),
    spec_loss=('per sequence i, on each of its trained tokens: `−Ā_i·exp(mean_{t∈i} x_t)`, `x_t = '
               'sgn(A_t)·min(sgn(A_t)·log r_t, sgn(A_t)·clip(log r_t, −ε_low, ε_high))`, Ā_i = mean_{t∈i}'
               ' A_t'),
    spec_weight=('sequence-level: `d(Σ_t loss_t)/d logπ_u = −(s_i/n_i)·(Σ_{t∈i} A_t)·w_u`, s_i = exp(mean'
                 " x), `w_u = 0` where log r_u is clipped in A_u's direction (A>0 ∧ log r>ε_high, A<0 ∧ "
                 'log r<−ε_low) or A_u = 0, else 1'),
    spec_defaults="ε_low 0.4, ε_high 0.4 (log-ratio clip, the paper's (e^−0.4, e^0.4))",
    source='GMPO, arXiv 2507.20673; verl `core_algos.py::compute_policy_loss_geo_mean` (b178a3c)'))
def gmpo(
    logp: Tensor, anchor: Tensor, adv: Tensor, *, seq: Tensor, valid: Tensor, eps_low: float, eps_high: float
) -> Tensor:
    """GMPO: per sequence i, loss = −Ā_i·exp(mean_{t∈i} x_t) on each of its tokens.

    Geometric-Mean Policy Optimization (arXiv 2507.20673), as verl's compute_policy_loss_geo_mean:
    x_t = sgn(A_t)·min(sgn(A_t)·log r_t, sgn(A_t)·clip(log r_t, −ε_low, ε_high)), Ā_i the mean advantage
    over the sequence's trained tokens; ε_low = ε_high = 0.4 (the paper's clip range (e^−0.4, e^0.4)).
    Relative to PPO-clip: the ratio is the geometric mean of the token ratios (clipped per token in log
    space, only in the advantage's direction), so one outlier token moves the sequence ratio by its n-th
    root. A token with A_t = 0 contributes log r 0 and no gradient (sgn = 0), as in verl. Every token
    carries its sequence's value: with --agg seq-mean-token-mean the step loss is verl's mean over
    sequences. Gradient: d(Σ_{t∈i} loss_t)/d logπ_u = −(s_i/n_i)·(Σ_{t∈i} A_t)·w_u, w_u = 1 unless u's log
    ratio is clipped in its advantage's direction (or A_u = 0).
    """
    x_min, _ = _gmpo_clip(logp, anchor, adv, eps_low, eps_high)
    s = torch.exp(sequence_reduce(x_min, seq, valid, "mean"))  # (…,) x_min ∈ [−20, 20], so no overflow
    return -sequence_reduce(adv, seq, valid, "mean") * s


# ---- VESPO -----------------------------------------------------------------------------------------


def vespo_phi(logp: Tensor, anchor: Tensor, adv: Tensor, seq: Tensor, valid: Tensor, *, k_pos: float,
              lambda_pos: float, k_neg: float, lambda_neg: float) -> Tensor:
    """φ(w) = e^λ·w^k·e^(−λw) per token (detached), w = exp(Σ_{t∈i} log r_t) of its sequence.

    As TRL's GRPOTrainer.get_gamma_weights: per-token log r clamped to ±20, summed over the sequence's
    trained tokens, then clamped to [log 1e-8, 20]; k, λ by the sign of A (A ≥ 0: k_pos, λ_pos);
    computed in log space, NaN/inf mapped to 0.
    """
    with torch.no_grad():
        log_w = sequence_reduce(log_ratio(logp.detach(), anchor), seq, valid, "sum").clamp(VESPO_LOG_W_FLOOR,
                                                                                           LOGR_CLAMP)
        nonneg = adv >= 0
        k = torch.where(nonneg, torch.full_like(adv, k_pos), torch.full_like(adv, k_neg))
        lam = torch.where(nonneg, torch.full_like(adv, lambda_pos), torch.full_like(adv, lambda_neg)).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _w_vespo(logp, anchor, adv, *, seq, valid, **hp):
    return vespo_phi(logp, anchor, adv, seq, valid, **hp) / torch.exp(log_ratio(logp, anchor))


def _vespo_effects(hp, logp, anchor, adv, seq, selected):
    """Tokens and sequences with φ < 0.5."""
    if seq is None:
        return {}
    phi = vespo_phi(logp, anchor, adv, seq, torch.ones_like(logp, dtype=torch.bool), **hp)
    return {"vespo/attenuated_frac": fraction(phi < 0.5, logp.numel()),
            "vespo/seq_attenuated_frac": seq_fraction(phi < 0.5, seq)}


@register_loss(
    "vespo", rank=14, weight=_w_vespo, level="sequence", reinforce=True,
    settings={"k_pos": Setting(2.0, NON_NEGATIVE, "Power k where A ≥ 0 of {}.", order=12),
              "lambda_pos": Setting(3.0, POSITIVE, "Decay λ where A ≥ 0 of {}.", order=13),
              "k_neg": Setting(3.0, NON_NEGATIVE, "Power k where A < 0 of {}.", order=14),
              "lambda_neg": Setting(2.0, POSITIVE, "Decay λ where A < 0 of {}.", order=15)},
    metrics={"attenuated (φ<0.5)": "vespo/attenuated_frac",
             "attenuated sequences": "vespo/seq_attenuated_frac"},
    effects=_vespo_effects,
    effect_metrics=("vespo/attenuated_frac", "vespo/seq_attenuated_frac"), doc=LossDoc(
    paper='VESPO, arXiv 2602.10693 (sequence-level weight)',
    loss='`−φ(w_i)·A·logπ`, `φ(w) = e^λ·w^k·e^(−λw)`, w_i = Π_{t∈i} r_t (log clamped to [log 1e-8, 20])',
    weight='`φ(w_i)/r_t`',
    defaults='`k_pos` 2, `lambda_pos` 3, `k_neg` 3, `lambda_neg` 2',
    use=('Compare with a TRL VESPO run. A smooth sequence-level trust region: a REINFORCE gradient scaled'
         ' by a detached weight that is 1 on-policy, peaks at w = k/λ and decays exponentially for '
         'sequences whose likelihood ratio exploded.'),
    spec_loss=('`−φ(w_i)·A·logπ`, `φ(w) = e^λ·w^k·e^(−λw)` (detached), `log w_i = clamp(Σ_{t∈i} log r_t, '
               'log 1e-8, 20)`; k, λ = k_pos, λ_pos where A ≥ 0, else k_neg, λ_neg'),
    spec_weight='`φ(w_i)/r_t` (token form: `d loss_t/d logπ_t = −φ·A`)',
    spec_defaults='k_pos 2, λ_pos 3, k_neg 3, λ_neg 2',
    source='VESPO, arXiv 2602.10693; TRL `grpo_trainer.py::get_gamma_weights`, `loss_type="vespo"` (f2cd577)'))
def vespo(logp: Tensor, anchor: Tensor, adv: Tensor, *, seq: Tensor, valid: Tensor, k_pos: float,
          lambda_pos: float, k_neg: float, lambda_neg: float) -> Tensor:
    """VESPO: loss = −φ(w_i)·A·logπ, φ(w) = e^λ·w^k·e^(−λw) of the sequence IS weight; w_t = φ/r_t.

    Variational Sequence-Level Soft Policy Optimization (arXiv 2602.10693), as TRL's loss_type="vespo"
    (get_gamma_weights; k_pos 2, λ_pos 3, k_neg 3, λ_neg 2). φ(1) = 1 and φ peaks at w = k/λ, then decays
    exponentially: a smooth sequence-level trust region instead of a clip. Relative to PPO-clip: one
    detached weight per sequence (the product, not the geometric mean, of its token ratios) scales a
    REINFORCE gradient. TRL folds its vLLM correction π_old/μ into w; with drpo's default behavior anchor
    r = π/μ already is that product.
    """
    phi = vespo_phi(logp, anchor, adv, seq, valid, k_pos=k_pos, lambda_pos=lambda_pos, k_neg=k_neg,
                    lambda_neg=lambda_neg)
    return -phi * adv * logp
