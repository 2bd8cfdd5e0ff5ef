"""Trust-region policy-gradient losses (SPEC.md §1) as pure per-token tensor functions.

Notation, per response token: `logp` = logπ (the only differentiable input), `anchor_logp` = logμ
(behavior log-prob by default), `advantages` = A; r = exp(clamp(logπ − logμ, ±20)), Δ = π − μ.
Every loss has the per-token gradient  d loss/d logπ = −A·r·w  with the gradient weight w of
SPEC.md's table; `gradient_weight` returns that w analytically (detached), for diagnostics and
tests. Where |logπ − logμ| > 20 the clamp stops the gradient (w is still reported).

Which loss is separate from how tokens are averaged: `token_loss` returns unreduced per-token
losses, `aggregate` / `token_coefficients` turn them into the step loss with global denominators.

Sequence-level losses (GSPO) see each token's sequence (`seq_index`): their per-token loss is the
loss of its sequence, so they need whole sequences, which every micro-batch holds (batching.py never
splits a row). Their gradient contract is stated per sequence (gradient_weight's docstring).
Batch-level losses (Clip-Cov, KL-Cov) take `selected`, tokens picked by a statistic over the whole
optimizer step (losses_extra.covariance_selection). The later objectives (SAPO, GMPO, TOPR, the
squared-log-ratio family, VESPO, Clip-Cov / KL-Cov) and the OPSM / M2PO filters live in
losses_extra.py and are registered here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from drpo_cli.base.errors import ConfigError
from drpo_cli.objectives import losses_extra as X
from drpo_cli.objectives.elementwise import LOGR_CLAMP, binary_kl, k1, k2, k3, log_ratio, prob_delta
from drpo_cli.objectives.loss_options import (
    AGG_MODES,
    DEFAULT_HORIZON,
    IS_BAND,
    IS_CAP,
    IS_LEVELS,
    KL_ESTIMATORS,
    LOSS_HPARAMS,
)
from drpo_cli.objectives.loss_options import HPARAM_NAMES as HP_NAMES  # noqa: F401 -- the registry's names for callers
from drpo_cli.objectives.loss_options import IS_CORRECTIONS as BEHAVIOR_KINDS

# ---- the losses: (logp, anchor, adv, **hp) -> per-token loss; anchor and adv already detached ----


def pg_is(logp: Tensor, anchor: Tensor, adv: Tensor) -> Tensor:
    """Plain importance-sampled policy gradient: loss = −A·r, w = 1.

    The unclipped surrogate of PPO (arXiv 1707.06347, Eq. 6, L^CPI). Relative to PPO-clip: no
    clipping at all, so every token keeps its full gradient however far π has drifted.
    """
    return -adv * torch.exp(log_ratio(logp, anchor))


def ppo_clip(
    logp: Tensor, anchor: Tensor, adv: Tensor, *, eps_low: float, eps_high: float, dual_clip: float | None
) -> Tensor:
    """PPO-clip: loss = max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high)); dual-clip: min(that, −A·c) for A<0.

    PPO (arXiv 1707.06347, Eq. 7, L^CLIP) with DAPO's asymmetric "clip-higher" bounds (arXiv
    2503.14476) and the optional dual clip of Ye et al. (arXiv 1912.09729), which caps the loss of
    negative-advantage tokens whose ratio exploded. w = 0 where clipped in the harmful direction
    (A>0 ∧ r>1+ε_high, A<0 ∧ r<1−ε_low, or A<0 ∧ r>c), else 1. This is the reference loss.
    """
    r = torch.exp(log_ratio(logp, anchor))
    loss = torch.maximum(-adv * r, -adv * r.clamp(1.0 - eps_low, 1.0 + eps_high))
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return loss


def spo(logp: Tensor, anchor: Tensor, adv: Tensor, *, eps: float) -> Tensor:
    """SPO: loss = −A·r + |A|·(r−1)²/(2ε), w = 1 − sign(A·(r−1))·|r−1|/ε.

    Simple Policy Optimization (arXiv 2401.16025, its objective with penalty |A|/(2ε)·(r−1)²).
    Relative to PPO-clip: the hard clip becomes a quadratic penalty in the ratio, so the gradient
    fades to 0 at r = 1 ± ε in the advantage's direction and turns corrective beyond. Because the
    penalty is in r, not in probability, rare tokens (small μ) are pushed back hardest.
    """
    r = torch.exp(log_ratio(logp, anchor))
    return -adv * r + adv.abs() * (r - 1.0).square() / (2.0 * eps)


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


def dppo_tv(logp: Tensor, anchor: Tensor, adv: Tensor, *, delta: float, ratio_cap: float) -> Tensor:
    """DPPO Binary-TV: loss = −M·A·r, M = 0 where (A>0 ∧ Δ>δ) or (A<0 ∧ Δ<−δ); w = M·min(r, C)/r.

    DPPO (arXiv 2602.04879), trust region in probability space. Relative to PPO-clip: the test is
    on Δ = π − μ instead of on the ratio, so rare tokens may move far in ratio while frequent
    tokens stay near μ; outside the region the token is masked (w = 0) rather than clipped, and
    the ratio in the gradient is truncated at C (w = C/r when r > C).
    """
    keep = _tv_keep(logp.detach(), anchor, adv, delta)
    return _dppo(logp, anchor, adv, keep, ratio_cap)


def dppo_kl(logp: Tensor, anchor: Tensor, adv: Tensor, *, delta: float, ratio_cap: float) -> Tensor:
    """DPPO Binary-KL: as dppo-tv with M = 0 where (A>0 ∧ r>1 ∧ D>δ) or (A<0 ∧ r<1 ∧ D>δ).

    DPPO (arXiv 2602.04879) with D = μ·log(μ/π) + (1−μ)·log((1−μ)/(1−π)), the KL between the
    Bernoulli distributions "sample this token or not". Relative to PPO-clip: the same changes as
    dppo-tv, with this KL instead of the TV distance as the region.
    """
    keep = _kl_keep(logp.detach(), anchor, adv, delta)
    return _dppo(logp, anchor, adv, keep, ratio_cap)


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


def _log_seq_ratio(logp: Tensor, anchor: Tensor, seq: Tensor, valid: Tensor) -> Tensor:
    """log s per token: the mean of its sequence's (clamped) log r over trained tokens, clamped to ±20."""
    return sequence_reduce(log_ratio(logp, anchor), seq, valid, "mean").clamp(-LOGR_CLAMP, LOGR_CLAMP)


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


def cispo(logp: Tensor, anchor: Tensor, adv: Tensor, *, eps_low: float | None, eps_high: float) -> Tensor:
    """CISPO: loss = −sg(clip(r, 1−ε_low, 1+ε_high))·A·logπ; w = clip(r)/r.

    Clipped IS-weight Policy Optimization (MiniMax-M1, arXiv 2506.13585, §3.1), as in verl's
    compute_policy_loss_cispo and TRL's loss_type="cispo". Relative to PPO-clip: the IS weight is
    clipped and detached instead of the surrogate, so no token ever loses its gradient (REINFORCE
    with a bounded weight). The paper sets no lower bound (ε_low None here); ε_high = 4 caps the
    weight at 5, the ε_max = 5 TRL recommends after ScaleRL (arXiv 2510.13786). The value is the
    REINFORCE form −w·A·logπ (not −A·r), as in both references.
    """
    r = torch.exp(log_ratio(logp, anchor)).detach()
    lo = 0.0 if eps_low is None else 1.0 - eps_low
    return -r.clamp(lo, 1.0 + eps_high) * adv * logp


# ---- analytic gradient weights w (SPEC.md §1 table): d loss/d logπ = −A·r·w -----------------------


def _w_pg_is(logp: Tensor, anchor: Tensor, adv: Tensor) -> Tensor:
    return torch.ones_like(logp)


def _w_ppo_clip(logp, anchor, adv, *, eps_low, eps_high, dual_clip):
    r = torch.exp(log_ratio(logp, anchor))
    clipped = ((adv > 0) & (r > 1.0 + eps_high)) | ((adv < 0) & (r < 1.0 - eps_low))
    if dual_clip is not None:
        clipped = clipped | ((adv < 0) & (r > dual_clip))
    return (~clipped).to(logp.dtype)


def _w_spo(logp, anchor, adv, *, eps):
    r = torch.exp(log_ratio(logp, anchor))
    return 1.0 - torch.sign(adv) * (r - 1.0) / eps  # sign(A·(r−1))·|r−1| = sign(A)·(r−1)


def _w_dppo(keep: Tensor, logp: Tensor, anchor: Tensor, ratio_cap: float) -> Tensor:
    r = torch.exp(log_ratio(logp, anchor))  # > 0 always, thanks to the clamp
    return keep.to(logp.dtype) * r.clamp(max=ratio_cap) / r


def _w_dppo_tv(logp, anchor, adv, *, delta, ratio_cap):
    return _w_dppo(_tv_keep(logp, anchor, adv, delta), logp, anchor, ratio_cap)


def _w_dppo_kl(logp, anchor, adv, *, delta, ratio_cap):
    return _w_dppo(_kl_keep(logp, anchor, adv, delta), logp, anchor, ratio_cap)


def _w_drpo(logp, anchor, adv, *, delta):
    return 1.0 - torch.sign(adv) * prob_delta(logp, anchor) / delta


def _w_gspo(logp, anchor, adv, *, seq, valid, eps_low, eps_high):
    # Per sequence: 0 where s_i is clipped in the harmful direction (as ppo-clip per token), else 1.
    s = torch.exp(_log_seq_ratio(logp, anchor, seq, valid))
    clipped = ((adv > 0) & (s > 1.0 + eps_high)) | ((adv < 0) & (s < 1.0 - eps_low))
    return (~clipped).to(logp.dtype)


def _gspo_ratio(logp, anchor, adv, seq, valid, **hp):
    return torch.exp(_log_seq_ratio(logp, anchor, seq, valid))


def _w_cispo(logp, anchor, adv, *, eps_low, eps_high):
    r = torch.exp(log_ratio(logp, anchor))
    lo = 0.0 if eps_low is None else 1.0 - eps_low
    return r.clamp(lo, 1.0 + eps_high) / r


# ---- registry ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    """One registered loss: the per-token loss, its analytic gradient weight, its default hyper-parameters.

    `level` "sequence": both functions also take `seq` (each token's sequence label) and `valid`
    (the trained tokens), keyword-only; "batch": they take `selected` (losses_extra.covariance_selection).
    `contract` says how w gives d(Σ_t loss_t)/d logπ_u (loss_gradient): "token" −A_u·r_u·w_u (+ the
    A-free `penalty` gradient g_u where there is one), "sequence" −(s_i/n_i)·Σ_{t∈i} A_t·w_t (GSPO),
    "geometric" −(s_i/n_i)·(Σ_{t∈i} A_t)·w_u (GMPO); `seq_ratio` gives s_i. `reinforce`: the value is
    in REINFORCE form (−c·A·logπ with a detached c, e.g. cispo), so at π = μ it is −A·logπ, not −A.
    """

    loss: Callable[..., Tensor]
    weight: Callable[..., Tensor]
    defaults: Mapping[str, float | None]
    level: str = "token"
    contract: str = "token"
    penalty: Callable[..., Tensor] | None = None
    seq_ratio: Callable[..., Tensor] | None = None
    reinforce: bool = False


D = LOSS_HPARAMS  # each loss's defaults (loss_options.py)
LOSSES: dict[str, LossSpec] = {
    "pg-is": LossSpec(pg_is, _w_pg_is, D["pg-is"]),
    "ppo-clip": LossSpec(ppo_clip, _w_ppo_clip, D["ppo-clip"]),
    "spo": LossSpec(spo, _w_spo, D["spo"]),
    "dppo-tv": LossSpec(dppo_tv, _w_dppo_tv, D["dppo-tv"]),
    "dppo-kl": LossSpec(dppo_kl, _w_dppo_kl, D["dppo-kl"]),
    "drpo": LossSpec(drpo, _w_drpo, D["drpo"]),
    "gspo": LossSpec(gspo, _w_gspo, D["gspo"], level="sequence", contract="sequence", seq_ratio=_gspo_ratio),
    "cispo": LossSpec(cispo, _w_cispo, D["cispo"], reinforce=True),
    # The later objectives (losses_extra.py; SPEC.md §1 cites each reference implementation).
    "sapo": LossSpec(X.sapo, X._w_sapo, D["sapo"]),
    "gmpo": LossSpec(X.gmpo, X._w_gmpo, D["gmpo"], level="sequence", contract="geometric", seq_ratio=X.gmpo_ratio),
    "topr": LossSpec(X.topr, X._w_topr, D["topr"], reinforce=True),
    "kimi15": LossSpec(X.kimi15, X._w_reinforce, D["kimi15"], penalty=X._g_kimi15, reinforce=True),
    "dppo-tv-sq": LossSpec(X.dppo_tv_sq, X._w_dppo_tv_sq, D["dppo-tv-sq"], penalty=X._g_dppo_tv_sq),
    "vespo": LossSpec(X.vespo, X._w_vespo, D["vespo"], level="sequence", reinforce=True),
    "clip-cov": LossSpec(X.clip_cov, X._w_clip_cov, D["clip-cov"], level="batch"),
    "kl-cov": LossSpec(X.kl_cov, X._w_ones, D["kl-cov"], level="batch", penalty=X._g_kl_cov),
}
SEQUENCE_LOSSES = tuple(name for name, spec in LOSSES.items() if spec.level == "sequence")
BATCH_LOSSES = tuple(name for name, spec in LOSSES.items() if spec.level == "batch")
LOSS_NAMES = tuple(LOSSES)
DEFAULTS: dict[str, dict[str, float | None]] = {name: dict(spec.defaults) for name, spec in LOSSES.items()}

# Allowed range of each hyper-parameter: (predicate, what the message says it must be).
_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "delta": (lambda v: v > 0, "> 0"),
    "eps": (lambda v: v > 0, "> 0"),
    "eps_low": (lambda v: 0 < v <= 1, "in (0, 1] (1: lower bound 0, no lower clip)"),
    "eps_high": (lambda v: v > 0, "> 0"),
    "dual_clip": (lambda v: v > 1, "> 1 (or None for off)"),
    "ratio_cap": (lambda v: v >= 1, ">= 1"),
    "tau_pos": (lambda v: v > 0, "> 0"),
    "tau_neg": (lambda v: v > 0, "> 0"),
    "tau": (lambda v: v >= 0, ">= 0"),
    "delta_low": (lambda v: v > 0, "> 0"),
    "delta_high": (lambda v: v > 0, "> 0"),
    "k_pos": (lambda v: v >= 0, ">= 0"),
    "k_neg": (lambda v: v >= 0, ">= 0"),
    "lambda_pos": (lambda v: v > 0, "> 0"),
    "lambda_neg": (lambda v: v > 0, "> 0"),
    "cov_ratio": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "cov_lb": (lambda v: True, "a number"),
    "cov_ub": (lambda v: True, "a number"),
    "cov_kl_coef": (lambda v: v >= 0, ">= 0"),
}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_hparams(name: str, hp: Mapping[str, object]) -> list[str]:
    """Every problem with loss `name` and hyper-parameters `hp` (empty list = valid), one line each."""
    if name not in LOSSES:
        return [f"unknown loss {name!r} (choose one of: {', '.join(LOSS_NAMES)})"]
    accepted = LOSSES[name].defaults
    problems = []
    for key, value in hp.items():
        if key not in accepted:
            allowed = ", ".join(accepted) if accepted else "none"
            problems.append(f"{name}: unknown hyper-parameter {key!r} (accepted: {allowed})")
        elif value is None and accepted[key] is None:  # a bound that is off by default may be turned off
            continue
        elif not _is_number(value):
            problems.append(f"{name}: {key} must be a finite number, got {value!r}")
        elif not _RANGES[key][0](value):
            problems.append(f"{name}: {key} must be {_RANGES[key][1]}, got {value!r}")
    return problems


def resolve_hparams(name: str, hp: Mapping[str, object] | None = None) -> dict[str, float | None]:
    """Defaults of loss `name` updated with `hp`; raises ConfigError listing every problem."""
    hp = dict(hp or {})
    problems = validate_hparams(name, hp)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems with the {name} hyper-parameters", details=problems)
    resolved = dict(LOSSES[name].defaults)
    resolved.update({k: (None if v is None else float(v)) for k, v in hp.items()})
    return resolved


def _prepare(logp: Tensor, anchor_logp: Tensor, advantages: Tensor, mask: Tensor | None):
    """Detach the constants and neutralise masked positions before any math (NaN there stays out)."""
    if not (logp.shape == anchor_logp.shape == advantages.shape):
        raise ValueError(
            f"shape mismatch: logp {tuple(logp.shape)}, anchor_logp {tuple(anchor_logp.shape)}, "
            f"advantages {tuple(advantages.shape)}"
        )
    anchor, adv = anchor_logp.detach(), advantages.detach()
    if mask is not None:
        # logπ = logμ = 0 and A = 0 make every loss exactly 0 with a finite (zero) gradient.
        logp = torch.where(mask, logp, torch.zeros_like(logp))
        anchor = torch.where(mask, anchor, torch.zeros_like(anchor))
        adv = torch.where(mask, adv, torch.zeros_like(adv))
    return logp, anchor, adv


def _sequence_args(name: str, logp: Tensor, anchor: Tensor, adv: Tensor, mask: Tensor | None,
                   seq_index: Tensor | None, selected: Tensor | None, hp: Mapping) -> dict:
    """`seq` and `valid` for a sequence-level loss, `selected` for a batch-level one (nothing otherwise).

    A batch-level loss without `selected` takes the tokens given as the whole batch (as verl does per
    micro-batch), with seed 0; train passes the step's selection instead.
    """
    level = LOSSES[name].level
    valid = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask.bool()
    if level == "batch":
        if selected is None:
            selected = X.covariance_selection(name, logp, anchor, adv, valid, **hp)
        elif selected.shape != logp.shape:
            raise ValueError(f"{name}: selected must have the shape of logp {tuple(logp.shape)}")
        return {"selected": selected.bool() & valid}
    if level != "sequence":
        return {}
    if seq_index is None or seq_index.shape != logp.shape:
        raise ValueError(f"{name} is sequence-level: pass seq_index, one sequence label per token "
                         f"(shape {tuple(logp.shape)})")
    return {"seq": seq_index, "valid": valid}


def token_loss(
    name: str,
    logp: Tensor,
    anchor_logp: Tensor,
    advantages: Tensor,
    *,
    mask: Tensor | None = None,
    seq_index: Tensor | None = None,
    selected: Tensor | None = None,
    **hp,
) -> Tensor:
    """Unreduced per-token loss of loss `name` (same shape as `logp`, any shape); minimise it.

    `anchor_logp` (logμ) and `advantages` (A) are detached. Hyper-parameters by keyword (`delta`,
    `eps`, `eps_low`, `eps_high`, `dual_clip`, `ratio_cap`, ... HP_NAMES), defaults from DEFAULTS[name];
    unknown names or out-of-range values raise ConfigError. With `mask`, positions where it is False are
    replaced before any math and give exactly 0 loss and 0 gradient, even if they hold NaN.
    Sequence-level losses (SEQUENCE_LOSSES) need `seq_index` (each token's sequence label, whole
    sequences only); token-level losses ignore it. Batch-level losses (BATCH_LOSSES) take `selected`
    (the step's covariance selection); without it the tokens given are the batch.
    """
    resolved = resolve_hparams(name, hp)
    logp, anchor, adv = _prepare(logp, anchor_logp, advantages, mask)
    extra = _sequence_args(name, logp.detach(), anchor, adv, mask, seq_index, selected, resolved)
    loss = LOSSES[name].loss(logp, anchor, adv, **extra, **resolved)
    if mask is not None:
        loss = torch.where(mask, loss, torch.zeros_like(loss))
    return loss


def gradient_weight(
    name: str,
    logp: Tensor,
    anchor_logp: Tensor,
    advantages: Tensor,
    *,
    mask: Tensor | None = None,
    seq_index: Tensor | None = None,
    selected: Tensor | None = None,
    **hp,
) -> Tensor:
    """The analytic gradient weight w of SPEC.md §1 (detached): d loss/d logπ = −A·r·w.

    Exact wherever |logπ − logμ| < 20 (beyond, the clamp stops the gradient but w is still
    reported, so diagnostics classify far-out tokens correctly). Masked positions get w = 0.
    Sequence-level losses: w_t is the token's share of its sequence's gradient, the contract being
    d(Σ_t loss_t)/d logπ_u = −(s_i/n_i)·Σ_{t∈i} A_t·w_t for every trained token u of sequence i
    (n_i trained tokens, s_i the sequence ratio); for gspo w_t ∈ {0, 1} (0: s_i clipped in A_t's
    harmful direction). Every loss's contract (LossSpec.contract) is applied by loss_gradient.
    """
    resolved = resolve_hparams(name, hp)
    with torch.no_grad():
        logp, anchor, adv = _prepare(logp.detach(), anchor_logp, advantages, mask)
        extra = _sequence_args(name, logp, anchor, adv, mask, seq_index, selected, resolved)
        w = LOSSES[name].weight(logp, anchor, adv, **extra, **resolved)
        if mask is not None:
            w = torch.where(mask, w, torch.zeros_like(w))
    return w


def loss_gradient(
    name: str,
    logp: Tensor,
    anchor_logp: Tensor,
    advantages: Tensor,
    *,
    mask: Tensor | None = None,
    seq_index: Tensor | None = None,
    selected: Tensor | None = None,
    **hp,
) -> Tensor:
    """d(Σ_t loss_t)/d logπ_u from the analytic weights by the loss's contract (detached; 0 where masked).

    "token": −A_u·r_u·w_u + g_u (g: the A-free penalty's gradient, kimi15 / dppo-tv-sq / kl-cov);
    "sequence" (gspo): −(s_i/n_i)·Σ_{t∈i} A_t·w_t; "geometric" (gmpo): −(s_i/n_i)·(Σ_{t∈i} A_t)·w_u.
    What the contract test compares autograd with, for every registry entry.
    """
    spec = LOSSES[name]
    w = gradient_weight(name, logp, anchor_logp, advantages, mask=mask, seq_index=seq_index, selected=selected,
                        **hp)
    resolved = resolve_hparams(name, hp)
    with torch.no_grad():
        logp, anchor, adv = _prepare(logp.detach(), anchor_logp, advantages, mask)
        extra = _sequence_args(name, logp, anchor, adv, mask, seq_index, selected, resolved)
        if spec.contract == "token":
            grad = -adv * torch.exp(log_ratio(logp, anchor)) * w
            if spec.penalty is not None:
                grad = grad + spec.penalty(logp, anchor, adv, **{k: v for k, v in extra.items() if k == "selected"},
                                           **resolved)
        else:
            seq, valid = extra["seq"], extra["valid"]
            s = spec.seq_ratio(logp, anchor, adv, seq, valid, **resolved)
            n = sequence_reduce(torch.ones_like(logp), seq, valid, "sum").clamp(min=1.0)
            if spec.contract == "sequence":
                grad = -s / n * sequence_reduce(adv * w, seq, valid, "sum")
            else:
                grad = -s / n * sequence_reduce(adv, seq, valid, "sum") * w
        if mask is not None:
            grad = torch.where(mask, grad, torch.zeros_like(grad))
    return grad


# ---- token aggregation (global denominators) --------------------------------------------------------


def validate_aggregation(mode: str, horizon: float = DEFAULT_HORIZON) -> list[str]:
    """Every problem with an aggregation mode and horizon (empty list = valid)."""
    problems = []
    if mode not in AGG_MODES:
        problems.append(f"unknown aggregation {mode!r} (choose one of: {', '.join(AGG_MODES)})")
    if not _is_number(horizon) or horizon <= 0:
        problems.append(f"aggregation horizon must be a number > 0, got {horizon!r}")
    return problems


def _check_aggregation(mode: str, horizon: float) -> None:
    problems = validate_aggregation(mode, horizon)
    if problems:
        raise ConfigError(problems[0], details=problems[1:])


def aggregation_denominator(mode: str, mask: Tensor, seq_index: Tensor) -> Tensor:
    """This micro-batch's additive share of the step's denominator (0-d int64 tensor).

    token-mean counts trained tokens; the seq-mean modes count sequences with at least one
    trained token. Sum the shares of every micro-batch and rank of the optimizer step (e.g.
    all_reduce SUM) and pass the total as `denom` to `token_coefficients` / `aggregate`.
    Assumption: a sequence is never split across micro-batches or ranks (its tokens all sit in
    one micro-batch), so sequence counts add up and per-sequence token counts are local.
    """
    _check_aggregation(mode, DEFAULT_HORIZON)
    mask = mask.bool()
    if mode == "token-mean":
        return mask.sum()
    return torch.tensor(torch.unique(seq_index[mask]).numel(), device=mask.device)


def token_coefficients(
    mode: str,
    mask: Tensor,
    seq_index: Tensor,
    denom: Tensor | int,
    horizon: float = DEFAULT_HORIZON,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Per-token coefficients c (same shape as `mask`, 0 where masked): step loss = Σ_t c_t·loss_t.

    With S sequences and N tokens trained in the whole step (`denom`), n_s trained tokens in
    sequence s and horizon H:
      token-mean               c = 1/N
      seq-mean-token-mean      c = 1/(S·n_s)
      seq-mean-token-sum       c = 1/S
      seq-mean-token-sum-norm  c = 1/(S·H)
    Because `denom` is global, c of a token does not depend on how the step is split, so the
    sum over micro-batches equals the full-batch value for any split up to float summation order
    (each token's c and its gradient c·∂loss are the full-batch ones bit for bit).
    A step with no trained token (denom = 0) gets c = 0.
    """
    _check_aggregation(mode, horizon)
    mask = mask.bool()
    denom = torch.as_tensor(denom, dtype=torch.float64, device=mask.device)
    scale = torch.ones(mask.shape, dtype=torch.float64, device=mask.device)  # (…,)
    if mode == "seq-mean-token-mean":
        # n_s of each token's sequence; the whole sequence is in this micro-batch (see above).
        _, inverse = torch.unique(seq_index.reshape(-1), return_inverse=True)  # (N,)
        n_s = torch.bincount(inverse, weights=mask.reshape(-1).double())  # (S_local,)
        scale = n_s[inverse].reshape(mask.shape).clamp(min=1.0)
    elif mode == "seq-mean-token-sum-norm":
        scale = scale * float(horizon)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    coef = torch.where(mask & (denom > 0), 1.0 / (safe * scale), torch.zeros_like(scale))
    return coef.to(dtype)


def aggregate(
    token_losses: Tensor,
    mask: Tensor,
    seq_index: Tensor,
    mode: str,
    denom: Tensor | int,
    horizon: float = DEFAULT_HORIZON,
) -> Tensor:
    """This micro-batch's share of the step loss: Σ_t c_t·loss_t over trained tokens (0-d tensor).

    Masked positions are selected out with torch.where, so their values never reach the sum.
    If they may hold NaN, also pass `mask` to `token_loss`, which keeps them out of the gradient.
    """
    coef = token_coefficients(mode, mask, seq_index, denom, horizon, dtype=token_losses.dtype)
    kept = torch.where(mask.bool(), token_losses, torch.zeros_like(token_losses))
    return (coef * kept).sum()


# ---- behavior correction for the decoupled (proximal-anchor) mode --------------------------------------


def validate_behavior(
    kind: str, cap: float = IS_CAP, band: tuple[float, float] = IS_BAND, level: str = "token"
) -> list[str]:
    """Every problem with a behavior-correction setting (empty list = valid)."""
    problems = []
    if kind not in BEHAVIOR_KINDS:
        problems.append(f"unknown behavior correction {kind!r} (choose one of: {', '.join(BEHAVIOR_KINDS)})")
    if level not in IS_LEVELS:
        problems.append(f"unknown IS level {level!r} (choose one of: {', '.join(IS_LEVELS)})")
    if not _is_number(cap) or cap <= 0:
        problems.append(f"behavior correction cap must be a number > 0, got {cap!r}")
    lo, hi = band
    if not (_is_number(lo) and _is_number(hi) and 0 <= lo < hi):
        problems.append(f"behavior correction band must satisfy 0 <= lo < hi, got {band!r}")
    return problems


def behavior_weight(
    kind: str,
    proximal_logp: Tensor,
    behavior_logp: Tensor,
    cap: float = IS_CAP,
    band: tuple[float, float] = IS_BAND,
    *,
    mask: Tensor | None = None,
    level: str = "token",
    seq_index: Tensor | None = None,
) -> Tensor:
    """Detached per-token weight ρ-correction multiplying each token's loss, ρ = π_old/μ (SPEC.md §1).

    `none`: 1. `tis` (truncated IS): min(ρ, cap). `mis` (masked IS): ρ where lo ≤ ρ ≤ hi, else 0
    (the token is dropped). `is`: ρ itself, not truncated. `level` says which ρ (verl's rollout correction, rollout_corr_helper.py
    compute_rollout_correction_weights): "token" ρ_t; "sequence" the product over the sequence's
    trained tokens, exp(Σ log ρ_t); "geometric" their geometric mean, exp(mean log ρ_t) (length-
    normalised, as GSPO's ratio). Sequence levels give every token of a sequence the same weight and
    need `seq_index`. Each log ρ is clamped to ±20 like log r. Masked positions get 0.
    """
    problems = validate_behavior(kind, cap, band, level)
    if problems:
        raise ConfigError(problems[0], details=problems[1:])
    with torch.no_grad():
        prox, beh = proximal_logp.detach(), behavior_logp.detach()
        valid = torch.ones_like(prox, dtype=torch.bool) if mask is None else mask.bool()
        prox = torch.where(valid, prox, torch.zeros_like(prox))
        beh = torch.where(valid, beh, torch.zeros_like(beh))
        log_rho = log_ratio(prox, beh)
        if level != "token":
            if seq_index is None:
                raise ValueError(f"behavior_weight level {level!r} needs seq_index")
            reduce = "sum" if level == "sequence" else "mean"
            log_rho = sequence_reduce(log_rho, seq_index, valid, reduce).clamp(-LOGR_CLAMP, LOGR_CLAMP)
        rho = torch.exp(log_rho)
        if kind == "none":
            weight = torch.ones_like(rho)
        elif kind == "is":  # plain IS, not truncated (seq-mask-tis keeps it on its surviving sequences)
            weight = rho
        elif kind == "tis":
            weight = rho.clamp(max=cap)
        else:
            weight = torch.where((rho >= band[0]) & (rho <= band[1]), rho, torch.zeros_like(rho))
        weight = torch.where(valid, weight, torch.zeros_like(weight))
    return weight


# ---- rejection of tokens / sequences by divergence (verl's rollout rejection sampling) -----------------

REJECT_ESTIMATORS = {"k1": k1, "k2": k2, "k3": k3}


def rejection_mask(
    criteria, proximal_logp: Tensor, behavior_logp: Tensor, mask: Tensor, seq_index: Tensor
) -> Tensor:
    """Trained tokens kept after every rejection criterion (bool, same shape); detached.

    `criteria`: (level, estimator, op, threshold) tuples (config.parse_reject), e.g.
    ("seq_mean", "k3", ">", 0.01) rejects every token of a sequence whose mean k3 exceeds 0.01.
    The estimators are those of KL(μ‖π_old) from samples of μ, with log ρ = log π_old − log μ:
    k1 = −log ρ, k2 = ½·log²ρ, k3 = (ρ − 1) − log ρ (divergence.py). Levels: "token" rejects the
    token, "seq_sum" / "seq_mean" / "seq_max" reduce over the sequence's trained tokens and reject the
    whole sequence. A token is kept when no criterion rejects it. As verl's
    compute_rollout_rejection_mask (rollout_corr_helper.py), with the threshold's direction explicit.
    """
    with torch.no_grad():
        valid = mask.bool()
        prox = torch.where(valid, proximal_logp.detach(), torch.zeros_like(proximal_logp))
        beh = torch.where(valid, behavior_logp.detach(), torch.zeros_like(behavior_logp))
        keep = valid.clone()
        for level, estimator, op, threshold in criteria:
            stat = REJECT_ESTIMATORS[estimator](prox, beh)  # (…,) per token
            if level != "token":
                stat = sequence_reduce(stat.double(), seq_index, valid, level.removeprefix("seq_").replace(
                    "max", "amax"))
            keep &= ~(stat > threshold if op == ">" else stat < threshold)
    return keep


# ---- reference-model KL penalty -------------------------------------------------------------------


def reference_kl(estimator: str, logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token estimate of KL(π‖π_ref), differentiable in logp (π_ref detached); same shape.

    With x = clamp(log π_ref − log π, ±20): k1 = −x = log π − log π_ref, k2 = ½·x², k3 = eˣ − x − 1 ≥ 0
    (Schulman, "Approximating KL divergence"; verl's kl_penalty, TRL's GRPO per_token_kl = k3).
    d k3/d logπ = 1 − π_ref/π. These are the divergence.py estimators with the roles of the two
    log-probs swapped (samples of π, not of μ).
    """
    if estimator not in REJECT_ESTIMATORS:
        raise ConfigError(f"unknown KL estimator {estimator!r} (choose one of: {', '.join(KL_ESTIMATORS)})")
    return REJECT_ESTIMATORS[estimator](ref_logp.detach(), logp)


# ---- veto and batch self-normalised IS weights (corrections usable with every loss) ---------------


def veto_mask(threshold: float, proximal_logp: Tensor, behavior_logp: Tensor, mask: Tensor,
              seq_index: Tensor) -> tuple[Tensor, Tensor]:
    """(kept, catastrophic): the trained tokens the veto keeps, and the tokens that trigger it; detached bools.

    A sequence is dropped whole when any of its trained tokens has ρ_t = π_old/μ < threshold (slime's
    `calculate_veto_mask`, examples/train_infer_mismatch_helper/mis.py, `rs_veto_threshold` 1e-4 there;
    verl's former `rollout_token_veto_threshold`). Compared as log ρ_t < log threshold on the raw,
    unclamped log ratio, as slime does. The same as the rejection criterion seq_max_k1 > −log threshold.
    """
    with torch.no_grad():
        valid = mask.bool()
        log_rho = torch.where(valid, proximal_logp.detach() - behavior_logp.detach(), torch.zeros_like(proximal_logp))
        bad = valid & (log_rho < math.log(threshold))  # (…,)
        hit = sequence_reduce(bad.double(), seq_index, valid, "amax") > 0  # (…,) its sequence has a bad token
    return valid & ~hit, bad


FLOAT32_MANTISSA = 24  # bits: a float32 mantissa times 2^24 is an integer
_EXP_MIN, _EXP_MAX = -150, 129  # torch.frexp exponents of float32 values (subnormals included)


def weight_sum_parts(weight: Tensor, mask: Tensor, seq_index: Tensor, level: str) -> Tensor:
    """This micro-batch's (or rank's) exact additive share of Σ w and of the count, as an int64 vector.

    `level` "token": over the trained tokens; "sequence" / "geometric": one weight per sequence with a
    trained token (every token of a sequence carries the same weight). The float32 weights are summed
    exactly: each is m·2^(e−24) with an integer m < 2^24 (torch.frexp), and the m are added per binary
    exponent e in int64. The vector (one slot per float32 exponent, then the count) adds up over
    micro-batches and ranks (all_reduce SUM) without rounding, so the factor `weight_mean(parts)` of the
    same weights is bit-identical for any micro-batch size, row order or world size.
    """
    with torch.no_grad():
        valid = mask.bool().reshape(-1)
        w = weight.detach().reshape(-1).float()
        if level == "token":
            values = w[valid]
        else:
            _, inv = torch.unique(seq_index.reshape(-1)[valid], return_inverse=True)  # (N,) in [0, S)
            count = int(inv.max()) + 1 if inv.numel() else 0
            values = torch.zeros(count, dtype=w.dtype, device=w.device).scatter_reduce(
                0, inv, w[valid], reduce="amax", include_self=False)  # (S,)
        mantissa, exponent = torch.frexp(values)  # values = mantissa · 2^exponent, 0.5 ≤ |mantissa| < 1
        slots = _EXP_MAX - _EXP_MIN + 1
        ints = (mantissa.double() * 2.0 ** FLOAT32_MANTISSA).long()  # exact
        parts = torch.zeros(slots + 1, dtype=torch.int64, device=w.device)
        parts.index_add_(0, (exponent.long() - _EXP_MIN).clamp(0, slots - 1), ints)
        parts[slots] = values.numel()
    return parts


def weight_mean(parts: Tensor) -> float | None:
    """Σ w / count of `weight_sum_parts` (summed over the step), correctly rounded; None without a weight."""
    from fractions import Fraction

    values = [int(v) for v in parts.cpu().tolist()]
    count = values.pop()
    if count == 0:
        return None
    total = sum(Fraction(m) * Fraction(2) ** (i + _EXP_MIN - FLOAT32_MANTISSA) for i, m in enumerate(values) if m)
    return float(total / count)


def batch_normalize(weight: Tensor, mean: float | None) -> tuple[Tensor, float]:
    """(w / mean, factor): IS weights self-normalised to mean 1 over the batch the mean was taken over.

    As verl's `rollout_is_batch_normalize` (rollout_corr_helper.py, compute_rollout_correction_weights)
    and slime's `tis_batch_normalize`: the weights are left as they are (factor 1) when the mean is
    ≤ 1e-8 or there is no weight.
    """
    factor = mean if mean is not None and mean > 1e-8 else 1.0
    return weight / factor, factor
