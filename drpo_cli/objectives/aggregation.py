"""How per-token losses become the step loss (SPEC.md §1): `--agg`'s modes, with denominators global
over the optimizer step, so that micro-batch size and world size change results only by float rounding.

Which loss is separate from how tokens are averaged: losses.token_loss returns unreduced per-token
losses, `aggregate` / `token_coefficients` turn them into the step loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from drpo_cli.base.errors import ConfigError
from drpo_cli.base.lazy import lazy
from drpo_cli.objectives.registry import is_number

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy("torch")

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
DEFAULT_HORIZON = 8192  # H of seq-mean-token-sum-norm

def validate_aggregation(mode: str, horizon: float = DEFAULT_HORIZON) -> list[str]:
    """Every problem with an aggregation mode and horizon (empty list = valid)."""
    problems = []
    if mode not in AGG_MODES:
        problems.append(f"unknown aggregation {mode!r} (choose one of: {', '.join(AGG_MODES)})")
    if not is_number(horizon) or horizon <= 0:
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
    dtype: torch.dtype | None = None,
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
    dtype = torch.float32 if dtype is None else dtype
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


