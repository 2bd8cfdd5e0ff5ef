"""The update loop of `drpo train` (SPEC.md §1): for each pass a seeded shuffle into `--minibatches`
mini-batches, one optimizer step each. A step plans token-budget micro-batches, computes the aggregation
denominators over the WHOLE mini-batch (all micro-batches, all ranks) before the first forward, and
accumulates gradients, so the gradient does not depend on the micro-batch size. The shuffle of pass e is
a pure function of (seed, e) and the learning rate of step s one of s, so the step counter is all the
"scheduler" there is and a resumed run reaches the same weights.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from drpo_cli.base import hooks
from drpo_cli.config import TrainConfig
from drpo_cli.model import distributed, moe
from drpo_cli.model.batching import plan_micro_batches
from drpo_cli.model.head import reused_buffers
from drpo_cli.model.logprobs import fused_token_loss, token_logprobs
from drpo_cli.objectives.aggregation import aggregation_denominator, token_coefficients
from drpo_cli.objectives.catalog import BATCH_LOSSES, SEQUENCE_LOSSES
from drpo_cli.objectives.corrections import batch_normalize, reference_kl, weight_mean, weight_sum_parts
from drpo_cli.objectives.divergence import Diagnostics
from drpo_cli.objectives.filters import m2po_keep, opsm_keep
from drpo_cli.objectives.losses import token_loss
from drpo_cli.objectives.ratio_clipped import covariance_selection
from drpo_cli.reports.report_format import clean_number, fmt
from drpo_cli.rollouts.rows import RolloutRows
from drpo_cli.training.report import Board, flat_metrics
from drpo_cli.training.signals import StepInterrupted, interrupted, interruptible


@dataclass(frozen=True)
class StepTokens:
    """The per-token tensors (T,) of this rank's rows that every step reads."""

    anchor: torch.Tensor  # the log-probs the ratio is taken against (μ, or π_old with --anchor proximal)
    rho: torch.Tensor  # behavior-correction weights (0 where rejected with --reject-mode zero)
    behavior: torch.Tensor  # μ, 0 where loss_mask is 0
    advantages: torch.Tensor  # 0 where loss_mask is 0
    mask: torch.Tensor  # bool, the trained tokens (minus rejected ones with --reject-mode mask)
    flags: dict  # {"trained", "reject", "veto", "catastrophic"}: bools for the per-step fractions
    old: torch.Tensor | None = None  # π_old, when a loss or the anchor needs it
    ref_logp: torch.Tensor | None = None  # π_ref, with --ref-model


def run_steps(model, optimizer, rows: RolloutRows, cfg: TrainConfig, tok: StepTokens, *, local_of: np.ndarray,
              n_rows: int, start: int, steps: list[dict], scaler, autocast, device, stop, sharded: bool,
              state_dir: Path, board: Board | None) -> tuple[int, str | None]:
    """Run optimizer steps `start` .. epochs × minibatches − 1, appending each step's record to `steps`.

    Returns (the last step run, the parameter an update made non-finite, else None: the run stops after
    that step). A signal stops the current step within seconds (interruptible: between passes, and in one
    process between decoder layers), drops its gradients and raises Interrupted once a resumable state is
    saved at its start; under torchrun the ranks agree before every pass and after every step.
    `local_of` (N,) maps a row's index among all `n_rows` kept rows to this rank's copy (−1: another rank's).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    total_steps = cfg.epochs * cfg.minibatches
    diverged = None
    step = start - 1
    progress = _progress(cfg, total_steps, start)
    stop.defer = True
    with progress, interruptible(model, stop, sharded) as check_stop:
        task = progress.add_task("train", total=total_steps, completed=start, loss="–", tps="–", outside="–")
        for step in range(start, total_steps):
            epoch, k = divmod(step, cfg.minibatches)
            perm = np.random.default_rng([cfg.seed, epoch]).permutation(n_rows)
            mini = local_of[np.array_split(perm, cfg.minibatches)[k]]
            local = mini[mini >= 0]  # the mini-batch's rows this rank holds
            lr = cfg.lr * _warmup(step, cfg.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t_step = time.perf_counter()

            step_rho, corrections = _step_corrections(cfg, rows, local, tok.rho, tok.mask, tok.flags, device)
            scale = _loss_scale(scaler, device)
            if scaler is not None:
                corrections["amp/loss_scale"] = scale
            stop.step = step
            try:
                loss, diag, tokens = accumulate_gradients(model, rows, local, cfg, anchor=tok.anchor, rho=step_rho,
                                                          behavior=tok.behavior, advantages=tok.advantages,
                                                          mask=tok.mask, autocast=autocast, ref_logp=tok.ref_logp,
                                                          scale=scale, old_logp=tok.old, step=step,
                                                          interrupt=check_stop)
            except StepInterrupted:
                optimizer.zero_grad(set_to_none=True)  # the step's partial gradients: it reruns on --resume
                raise interrupted(state_dir, cfg, model, optimizer, step, steps, scaler, total_steps,
                                  f"during step {step + 1}") from None
            finally:
                stop.step = None
            if scaler is not None:
                scaler.unscale_(optimizer)  # the gradients back to their true size before the norm and clip
            # The global norm: FSDP2 gradients are DTensors, whose norm is reduced over ranks.
            grad_norm = distributed.full_value(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            skipped = not (torch.isfinite(loss) and torch.isfinite(grad_norm))
            if not skipped:  # a non-finite step is counted, never applied
                optimizer.step()
                # An update can overflow finite weights (an absurd --lr): every later step would be NaN.
                diverged = _non_finite_weight(model)
            if scaler is not None:
                scaler.update()  # halved after an overflow (a skipped step), doubled after 2,000 clean ones
            optimizer.zero_grad(set_to_none=True)

            seconds = time.perf_counter() - t_step
            metrics = {**flat_metrics(diag.summary()), **corrections, **moe.step_metrics(model)}
            steps.append({"step": step, "epoch": epoch, "minibatch": k, "loss": clean_number(loss.item()),
                          "grad_norm": clean_number(grad_norm.item()), "lr": lr, "tokens": tokens,
                          "skipped": skipped, "seconds": seconds, "metrics": metrics})
            progress.update(task, advance=1, loss=fmt(loss.item()), tps=f"{tokens / max(seconds, 1e-9):,.0f}",
                            outside=fmt(metrics.get("tr/outside_frac")))
            if board is not None:
                board.step(steps[-1])
            if diverged is not None:
                break  # the checkpoint and report are still written; the run then exits 1
            for _ in range(hooks.interrupt_signals(step)):
                signal.raise_signal(signal.SIGTERM)
            stop.requested = distributed.any_rank(stop.requested)
            if stop.requested and step + 1 < total_steps:
                raise interrupted(state_dir, cfg, model, optimizer, step + 1, steps, scaler, total_steps,
                                  f"after step {step + 1}")
    return step, diverged


def accumulate_gradients(model, rows: RolloutRows, row_idx: np.ndarray, cfg: TrainConfig, *, anchor, rho, behavior,
                         advantages, mask, autocast=None, ref_logp=None, old_logp=None,
                         step: int = 0, scale: float = 1.0, interrupt=None) -> tuple[torch.Tensor, Diagnostics, int]:
    """Backward of one optimizer step's loss over rows `row_idx`, micro-batch by micro-batch.

    The aggregation denominator is summed over every micro-batch (and rank) first, so the
    accumulated gradient equals that of the whole mini-batch in one piece, for any
    micro_batch_tokens. Each token's loss is c_t·(ρ_t·loss_t + β·KL_t − c_ent·H_t): the reference
    KL and the entropy bonus share the aggregation coefficients c_t, not the behavior weight ρ.
    Step-wide statistics (SPEC.md §1): the M2PO mask (--m2po-threshold, on μ and π_old) and the
    clip-cov / kl-cov selection (on π at this step's weights, from a first inference sweep) are
    computed over the step's tokens of every rank in global order before any gradient pass; OPSM
    (--opsm-delta) is per sequence, inside the loss. `scale` (fp16's loss scale)
    multiplies every c_t, so the gradients, formed in the head's forward from the per-token upstream
    gradient, are scaled before any cast to fp16; the loss is returned unscaled. `interrupt()` runs
    before every pass (under torchrun a collective: every rank runs as many passes) and raises
    StepInterrupted when a signal asks to stop. Returns (global loss, global diagnostics, global trained tokens).
    """
    device = distributed.model_device(model)
    hp = cfg.loss_hparams()
    # OPSM and sequence-level losses need the micro-batch's whole sequences at once.
    whole = cfg.loss in SEQUENCE_LOSSES or cfg.opsm_delta is not None
    beta = cfg.resolved_kl_coef()
    micro = plan_micro_batches(rows, row_idx, cfg.micro_batch_tokens)
    diag = Diagnostics(cfg.tr_delta, {cfg.loss: hp}, opsm_delta=cfg.opsm_delta, m2po_threshold=cfg.m2po_threshold)
    step_idx = torch.cat([mb.token_index for mb in micro]) if micro else torch.zeros(0, dtype=torch.int64)  # (S,)
    if cfg.m2po_threshold is not None:  # the step's largest (log μ − log π_old)² leave the loss mask
        kept = step_wide(lambda b, o, v: m2po_keep(b, o, v, cfg.m2po_threshold), rows, step_idx,
                          behavior[step_idx], old_logp[step_idx], mask[step_idx])
        before = mask[step_idx]
        dropped = before & ~kept
        diag.add_counts({"m2po/masked_frac": (float(dropped.sum()), float(before.sum())),
                         "m2po/dropped_pos_adv_frac": (float((dropped & (advantages[step_idx] > 0)).sum()),
                                                       float(dropped.sum()))})
        mask = mask.clone()
        mask[step_idx] = before & kept
    selected = None  # (T,) bool: the step's clip-cov / kl-cov tokens
    if cfg.loss in BATCH_LOSSES:
        logp_now = _sweep_logprobs(model, micro, cfg, device, autocast, interrupt)  # (S,) π at this step's weights
        sel = step_wide(lambda lp, mu, a, v: covariance_selection(cfg.loss, lp, mu, a, v, seed=cfg.seed * 1_000_003 + step,
                                                                   **hp),
                         rows, step_idx, logp_now, anchor[step_idx], advantages[step_idx], mask[step_idx])
        selected = torch.zeros_like(mask)
        selected[step_idx] = sel
    denom = torch.zeros((), dtype=torch.float64)
    for mb in micro:
        denom += aggregation_denominator(cfg.agg, mask[mb.token_index], mb.seq_index)
    denom = distributed.all_reduce_sum(denom.to(device))

    total = torch.zeros((), dtype=torch.float32, device=device)
    tokens = torch.zeros((), dtype=torch.int64, device=device)
    # A rank with fewer micro-batches runs zero-weight passes (exact zero gradients) so that every
    # FSDP rank runs the same number; counted before any pass, so that every rank makes that
    # collective at the same point (a rank with no rows would otherwise meet another's first pass).
    fillers = distributed.filler_passes(len(micro))
    with reused_buffers():  # the step's micro-batches share chunk buffers, freed before the optimizer step
        for mb in micro:
            if interrupt is not None:
                interrupt()
            idx = mb.token_index  # (M,) on the CPU, like the per-token arrays it indexes
            mb = mb.to(device)
            m, a, mu = mask[idx].to(device), advantages[idx].to(device), anchor[idx].to(device)  # (M,)
            # Per-token weight of the step loss: mask × global 1/denominator (aggregation) [× ρ (correction)].
            agg = token_coefficients(cfg.agg, m, mb.seq_index, denom, horizon=cfg.horizon) * scale  # (M,)
            coef = agg * rho[idx].to(device)
            ref = ref_logp[idx].to(device) if ref_logp is not None else None  # (M,)
            sel = selected[idx].to(device) if selected is not None else None  # (M,)
            beh = behavior[idx].to(device)  # (M,)

            def loss_fn(logp, sl, coef=coef, agg=agg, mu=mu, a=a, m=m, seq=mb.seq_index, ref=ref, sel=sel, beh=beh):
                # A scalar sum over the tokens `sl` (all of them for a sequence-level loss or OPSM).
                per_token = token_loss(cfg.loss, logp, mu[sl], a[sl], mask=m[sl], seq_index=seq[sl],
                                       selected=None if sel is None else sel[sl], **hp)
                if cfg.opsm_delta is not None:  # A < 0 tokens of sequences too far from μ (π now) drop out
                    per_token = per_token * opsm_keep(logp, beh[sl], a[sl], seq[sl], m[sl], cfg.opsm_delta)
                loss = (coef[sl] * per_token).sum()
                if ref is not None and beta > 0:
                    safe = torch.where(m[sl], logp, ref[sl])  # masked tokens: KL 0, gradient 0
                    loss = loss + beta * (agg[sl] * reference_kl(cfg.kl_estimator, safe, ref[sl])).sum()
                return loss

            ent_weight = -cfg.entropy_coef * agg if cfg.entropy_coef > 0 else None  # (M,) bonus: −c·H_t
            loss, logp, ent = fused_token_loss(model, mb, loss_fn, chunk_tokens=cfg.chunk_tokens, dtype=autocast,
                                               entropy_weight=ent_weight, whole=whole)
            loss.backward()
            total += loss.detach()
            tokens += m.sum()
            diag.update(logp, beh, a, m, entropy=ent, seq_index=mb.seq_index, ref_logp=ref, selected=sel)
            moe.count_trained(model, mb, m)  # with --replay-routing: the router's own top-k ≠ the logged one
        for filler in fillers:
            if interrupt is not None:
                interrupt()
            zero, _, _ = fused_token_loss(model, filler.to(device), lambda logp, sl: logp.sum() * 0.0,
                                          chunk_tokens=cfg.chunk_tokens, dtype=autocast)
            zero.backward()
    distributed.all_reduce_sum(total)
    distributed.all_reduce_sum(tokens)
    diag.all_reduce_()
    return total / scale, diag, int(tokens.item())


def _sweep_logprobs(model, micro, cfg: TrainConfig, device, autocast, interrupt=None) -> torch.Tensor:
    """π of the step's tokens (S,) at the current weights, no gradient, micro-batch by micro-batch (with FSDP's fillers)."""
    out = [torch.zeros(0)]
    with torch.no_grad():  # not inference_mode: FSDP2's gathered buffers must serve the gradient passes next
        for i, mb in enumerate(micro + distributed.filler_passes(len(micro))):
            if interrupt is not None:
                interrupt()
            lp, _ = token_logprobs(model, mb.to(device), chunk_tokens=cfg.chunk_tokens, dtype=autocast)
            if i < len(micro):
                out.append(lp.float().cpu())
    return torch.cat(out)


def step_wide(select, rows: RolloutRows, token_idx: torch.Tensor, *columns: torch.Tensor) -> torch.Tensor:
    """`select(*columns)` over the step's tokens of every rank in global order; this rank's share of its bool result.

    Global order is (row in the files, position in the response), so the result depends neither on
    how the step is cut into micro-batches nor on how its rows are spread over ranks.
    """
    idx = token_idx.numpy()
    key = rows.global_row[rows.token_row()[idx]].astype(np.int64) * (1 << 32) + rows.token_position()[idx]
    shares = distributed.exchange((key, *(c.detach().cpu().numpy() for c in columns)))
    all_keys = np.concatenate([share[0] for share in shares])
    order = np.argsort(all_keys, kind="stable")
    merged = [torch.from_numpy(np.concatenate([share[j] for share in shares])[order]) for j in range(1, len(columns) + 1)]
    result = select(*merged).numpy()  # (N_global,) in global order
    return torch.from_numpy(result[np.searchsorted(all_keys[order], key)])


def _step_corrections(cfg: TrainConfig, rows: RolloutRows, local: np.ndarray, rho: torch.Tensor, mask: torch.Tensor,
                      flags: dict, device) -> tuple[torch.Tensor, dict]:
    """(behavior weights for this step, its correction metrics), over the step's rows on every rank.

    Fractions are of the step's trained tokens and sequences before rejection: `reject/*` (--reject),
    `veto/token_frac` (tokens with ρ below the veto threshold), `veto/seq_frac` (sequences vetoed).
    --is-batch-norm: the weights divided by their mean over the step's trained tokens (sequences at a
    sequence --is-level), summed exactly (corrections.weight_sum_parts), so for the same weights the factor
    `is/batch_norm_factor` does not depend on micro-batch size or world size.
    """
    if len(flags) == 1 and not cfg.is_batch_norm:  # no rejection, no veto, no normalisation
        return rho, {}
    token_row = rows.token_row()  # (T,)
    here = np.isin(token_row, local)  # (T,) this step's tokens on this rank
    trained = flags["trained"].numpy() & here
    counts = [trained.sum(), np.unique(token_row[trained]).size]
    for name in ("reject", "veto"):
        if name in flags:
            removed = trained & ~flags[name].numpy()
            cause = flags["catastrophic"].numpy() & here if name == "veto" else removed
            counts += [cause.sum(), np.unique(token_row[removed]).size]
    totals = distributed.all_reduce_sum(torch.tensor(np.array(counts, dtype=np.float64), device=device)).cpu().tolist()
    metrics, (n_tok, n_seq), rest = {}, totals[:2], totals[2:]
    for name in ("reject", "veto"):
        if name in flags:
            metrics[f"{name}/token_frac"] = rest[0] / n_tok if n_tok else None
            metrics[f"{name}/seq_frac"] = rest[1] / n_seq if n_seq else None
            rest = rest[2:]
    if not cfg.is_batch_norm:
        return rho, metrics
    sel = torch.from_numpy(here)
    level = "token" if cfg.is_level == "token" else "sequence"
    parts = weight_sum_parts(rho[sel], mask[sel], torch.from_numpy(token_row)[sel], level)
    normalized, metrics["is/batch_norm_factor"] = batch_normalize(
        rho, weight_mean(distributed.all_reduce_sum(parts.to(device)).cpu()))
    return normalized, metrics


def _non_finite_weight(model) -> str | None:
    """The name of a parameter holding NaN or ±inf after an update (any rank's shard), else None.

    One max-norm per parameter (no full-size temporary); under torchrun a collective.
    """
    from torch.distributed.tensor import DTensor

    named = [(n, t) for n, p in model.named_parameters() if p.requires_grad
             for t in [p.to_local() if isinstance(p, DTensor) else p] if t.numel()]
    norms = torch.stack([torch.linalg.vector_norm(p.detach(), ord=float("inf")).float() for _, p in named]) \
        if named else torch.zeros(0)
    bad = [n for (n, _), ok in zip(named, torch.isfinite(norms).tolist()) if not ok]
    if not distributed.any_rank(bool(bad)):
        return None
    return next(name for names in distributed.exchange(bad[:1]) for name in names)


def _loss_scale(scaler, device) -> float:
    """The GradScaler's current scale (1 without one); its first call sets the initial 2^16."""
    if scaler is None:
        return 1.0
    return float(scaler.scale(torch.ones((), device=device)).item())


def _warmup(step: int, warmup_steps: int) -> float:
    """Linear warmup: step s (0-based) runs at (s + 1) / W of the learning rate for s < W."""
    return 1.0 if step >= warmup_steps else (step + 1) / warmup_steps


def _progress(cfg: TrainConfig, total: int, start: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  tok/s {task.fields[tps]}  outside {task.fields[outside]}"),
        TimeRemainingColumn(), console=Console(stderr=True),
        disable=cfg.quiet or not sys.stderr.isatty() or distributed.rank() != 0, transient=False,
    )
