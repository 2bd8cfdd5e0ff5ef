"""Step filters usable with any loss (SPEC.md §1): OPSM and M2PO, and the fractions of tokens they would
drop (diagnostics). Both need whole sequences or the whole optimizer step; all detached.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from drpo_cli.base.lazy import lazy
from drpo_cli.objectives.counts import fraction, seq_fraction
from drpo_cli.objectives.sequence import sequence_reduce

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy("torch")

# Each filter's fractions; `…/dropped_pos_adv_frac` is the share of what it drops that had A > 0.
FILTER_METRICS = {"opsm": ("opsm/token_drop_frac", "opsm/seq_drop_frac", "opsm/dropped_pos_adv_frac"),
                  "m2po": ("m2po/masked_frac", "m2po/dropped_pos_adv_frac")}


def opsm_keep(logp: Tensor, behavior_logp: Tensor, adv: Tensor, seq: Tensor, valid: Tensor, delta: float) -> Tensor:
    """Off-Policy Sequence Mask: tokens kept (bool, detached) = valid ∧ (A ≥ 0 ∨ mean_{t∈i} log(μ/π) ≤ δ).

    DeepSeek-V3.2 (arXiv 2512.02556, Eq. 9), as TRL's GRPOTrainer.get_off_policy_mask
    (off_policy_mask_threshold): a sequence whose mean log(μ/π) over its trained tokens exceeds δ is
    dropped where its advantage is negative. μ is the sampler's (behavior) log-prob, π the current one,
    so it needs whole sequences and is recomputed at every update. With a per-token advantage the test
    is per token (TRL's broadcast does the same).
    """
    with torch.no_grad():
        kl = sequence_reduce(behavior_logp.detach() - logp.detach(), seq, valid, "mean")  # (…,)
        return valid.bool() & ((adv >= 0) | (kl <= delta))


def m2po_keep(behavior_logp: Tensor, old_logp: Tensor, valid: Tensor, threshold: float) -> Tensor:
    """M2PO: tokens kept (bool, detached) after masking the largest m2 = (log μ − log π_old)².

    As AReaL's _apply_m2po_masking / _get_m2po_loss_mask (areal/trainer/ppo/actor.py): the valid tokens
    sorted by m2, largest first (ties: earlier token first); the k largest are masked, k the first
    index where the mean m2 of the rest falls below `threshold` (all but one when none does). AReaL
    applies it per micro-batch; drpo passes the optimizer step's tokens in global order (train.py), so
    the mask depends neither on the micro-batch size nor on the world size.
    """
    with torch.no_grad():
        flat_valid = valid.reshape(-1).bool()
        keep = flat_valid.clone()
        idx = torch.nonzero(flat_valid).squeeze(1)
        if idx.numel() == 0:
            return keep.reshape(valid.shape)
        m2 = (behavior_logp.detach().reshape(-1)[idx].double() - old_logp.detach().reshape(-1)[idx].double()).square()
        sorted_m2, order = torch.sort(m2, descending=True, stable=True)
        n = sorted_m2.numel()
        rest_mean = sorted_m2.flip(0).cumsum(0).flip(0) / torch.arange(n, 0, -1, dtype=torch.float64)
        below = torch.nonzero(rest_mean < threshold)
        k = int(below[0]) if below.numel() else n - 1
        keep[idx[order[:k]]] = False
        return keep.reshape(valid.shape)


def filter_counts(logp: Tensor, behavior: Tensor, adv: Tensor, seq: Tensor | None, *, opsm_delta: float | None,
                  m2po_threshold: float | None, old_logp: Tensor | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """{metric: (hits, total)} of the OPSM / M2PO filters on flat valid tokens (π_old = `old_logp`, else π)."""
    out: dict[str, tuple[Tensor, Tensor]] = {}
    every = torch.ones_like(logp, dtype=torch.bool)
    if opsm_delta is not None and seq is not None:
        dropped = ~opsm_keep(logp, behavior, adv, seq, every, opsm_delta)
        out["opsm/token_drop_frac"], out["opsm/seq_drop_frac"] = fraction(dropped, logp.numel()), seq_fraction(dropped, seq)
        out["opsm/dropped_pos_adv_frac"] = dropped_positive(dropped, adv)
    if m2po_threshold is not None:
        masked = ~m2po_keep(behavior, logp if old_logp is None else old_logp, every, m2po_threshold)
        out["m2po/masked_frac"] = fraction(masked, logp.numel())
        out["m2po/dropped_pos_adv_frac"] = dropped_positive(masked, adv)
    return out


def dropped_positive(dropped: Tensor, adv: Tensor) -> tuple[Tensor, Tensor]:
    """(dropped tokens with A > 0, dropped tokens): a mask that drops mostly good samples shows (NeMo-RL
    `masked_correct_pct`, prime-rl `masked_advantage_positive`)."""
    return fraction(dropped & (adv > 0), dropped.sum())
