"""Off-policy corrections usable with every loss (SPEC.md §1): the behavior weight ρ of the decoupled
(proximal-anchor) mode, rejection by divergence, the veto, batch self-normalised IS weights (summed
exactly), and the reference-model KL penalty. All detached but the KL penalty; the choices the options
offer are declared here, without torch, for config.py and the report schemas.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from drpo_cli.base.errors import ConfigError
from drpo_cli.base.lazy import lazy
from drpo_cli.objectives.elementwise import LOGR_CLAMP, k1, k2, k3, log_ratio
from drpo_cli.objectives.registry import is_number
from drpo_cli.objectives.sequence import sequence_reduce

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy("torch")

ANCHORS = ("behavior", "proximal")
IS_CORRECTIONS = ("none", "tis", "mis", "is")  # behavior weights of the decoupled (proximal-anchor) mode
BEHAVIOR_KINDS = IS_CORRECTIONS
IS_LEVELS = ("token", "sequence", "geometric")
IS_CAP = 2.0  # tis cap when none is given
IS_BAND = (0.5, 2.0)  # mis kept band when none is given
REJECT_LEVELS = ("token", "seq_sum", "seq_mean", "seq_max")
KL_ESTIMATORS = ("k1", "k2", "k3")
CORRECTIONS = ("none", "seq-mask-tis")  # named compositions of --is-* and --reject (config.expand_correction)
SEQ_MASK_TIS_BAND = (0.999, 1.002)  # NeMo-RL's recommended bounds (examples/configs/prorlv2_1_moe.v2.yaml)
REJECT_MODES = ("mask", "zero")

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
    if not is_number(cap) or cap <= 0:
        problems.append(f"behavior correction cap must be a number > 0, got {cap!r}")
    lo, hi = band
    if not (is_number(lo) and is_number(hi) and 0 <= lo < hi):
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
