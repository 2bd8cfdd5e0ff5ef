"""Run a registered loss by name (SPEC.md §1): its per-token loss, its analytic gradient weight, and the
gradient that weight implies, as pure tensor functions.

Notation, per response token: `logp` = logπ (the only differentiable input), `anchor_logp` = logμ
(behavior log-prob by default), `advantages` = A; r = exp(clamp(logπ − logμ, ±20)), Δ = π − μ.
Every loss has the per-token gradient  d loss/d logπ = −A·r·w  with the gradient weight w of
SPEC.md's table; `gradient_weight` returns that w analytically (detached), for diagnostics and
tests. Where |logπ − logμ| > 20 the clamp stops the gradient (w is still reported).

The losses themselves live in their family modules (ratio_clipped, probability, sequence, soft), each
registered with its settings (registry.py, catalog.py). Which loss is separate from how tokens are
averaged: `token_loss` returns unreduced per-token losses, aggregation.py turns them into the step loss.
Sequence-level losses (SEQUENCE_LOSSES) see each token's sequence (`seq_index`); batch-level losses
(BATCH_LOSSES) take `selected`, tokens picked by a statistic over the whole optimizer step
(ratio_clipped.covariance_selection).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from drpo_cli.base.lazy import lazy
from drpo_cli.objectives.catalog import LOSSES, resolve_hparams
from drpo_cli.objectives.elementwise import log_ratio
from drpo_cli.objectives.ratio_clipped import covariance_selection
from drpo_cli.objectives.sequence import sequence_reduce

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy("torch")


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
            selected = covariance_selection(name, logp, anchor, adv, valid, **hp)
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
    `eps`, `eps_low`, `eps_high`, `dual_clip`, `ratio_cap`, ... catalog.HPARAM_NAMES), defaults from the registry;
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


def effect_counts(name: str, hp: dict, logp: Tensor, anchor: Tensor, adv: Tensor, seq: Tensor | None,
                  selected: Tensor | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """{metric: (hits, total)} of loss `name` on flat valid tokens (detached); {} for losses without effects.

    Each loss's `effects` (registry.LossSpec) says what it counts: gmpo's clipped tokens and sequences,
    topr's truncated weights, kimi15's corrective gradients, vespo's attenuated sequences, clip-cov's /
    kl-cov's selection (`selected`, else over these tokens). Sequence metrics need `seq` (skipped without it).
    """
    effects = LOSSES[name].effects
    return {} if effects is None else effects(hp, logp, anchor, adv, seq, selected)
