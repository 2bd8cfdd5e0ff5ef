"""`drpo train`: off-policy update passes over logged rollouts (SPEC.md §1, §4).

Read top to bottom: resolve the output, load rows and model, fix the anchor log-probs, then for
each pass a seeded shuffle into `--minibatches` mini-batches, one optimizer step each. A step
plans token-budget micro-batches, computes the aggregation denominators over the WHOLE mini-batch
(all micro-batches, all ranks) before the first forward, and accumulates gradients, so the
gradient does not depend on the micro-batch size. A closing audit measures the final weights
against μ; the checkpoint and OUT/drpo_report.json are written in one atomic rename.

Interrupts. SIGINT/SIGTERM set a flag; the current optimizer step stops within seconds (checked
before every forward pass, and in one process before every decoder layer), its gradients dropped,
then the resumable state goes to `OUT.partial-state/` (model + optimizer + step counter + report
so far + RNG) and the run exits 130. `--resume` reloads it and reaches the same final weights as
an uninterrupted run: the shuffle of pass e is a pure function of (seed, e) and the learning rate
of step s is a pure function of s, so the step counter is all the "scheduler" there is. A second
signal aborts at once. Its test hooks (DRPO_INTERRUPT_AFTER_STEP, DRPO_INTERRUPT_IN_STEP) are
documented in hooks.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from rich.console import Console

from drpo_cli import __version__
from drpo_cli.base import hooks, launch, outputs
from drpo_cli.base.errors import Aborted, ConfigError, DrpoError, InputError, Interrupted, ReportError
from drpo_cli.config import TrainConfig, expand_correction
from drpo_cli.model import distributed, moe
from drpo_cli.model.batching import plan_micro_batches
from drpo_cli.model.checkpoint import (
    CheckpointWriter,
    check_free_space,
    check_model,
    default_out_dir,
    load_model,
    model_context,
    output_nbytes,
    read_policy_version,
    report_nbytes,
    save_checkpoint,
    saved_format,
)
from drpo_cli.model.head import reused_buffers
from drpo_cli.model.histograms import MuPiHistogram, worst_tokens
from drpo_cli.model.logprobs import fused_token_loss, pick_device, token_logprobs
from drpo_cli.objectives.divergence import Diagnostics, sequence_scores, token_diagnostics
from drpo_cli.objectives.losses import (
    BATCH_LOSSES,
    SEQUENCE_LOSSES,
    aggregation_denominator,
    batch_normalize,
    behavior_weight,
    reference_kl,
    rejection_mask,
    token_coefficients,
    token_loss,
    veto_mask,
    weight_mean,
    weight_sum_parts,
)
from drpo_cli.objectives.losses_extra import covariance_selection, m2po_keep, opsm_keep
from drpo_cli.reports.report_format import (
    TRAIN_REPORT_VERSION,
    clean_number,
    finite_or_null,
    fmt,
    print_train_summary,
    train_report_json,
)
from drpo_cli.rollouts.files import open_rollouts
from drpo_cli.rollouts.rows import (
    Context,
    RolloutRows,
    check_vocabulary,
    current_version,
    fit_context,
    load_rows,
    staleness_filter,
)
from drpo_cli.training.resume import load_state, save_state

REPORT_NAME = "drpo_report.json"
PAGE_NAME = "report.html"
WORST_SAMPLES = 10
LOW_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    policy_version: int
    report: dict


def train(cfg: TrainConfig, *, console: Console | None = None) -> TrainResult:
    """Run `drpo train` for a validated config; returns where the checkpoint went and the report."""
    out_dir = outputs.real(cfg.out or default_out_dir(cfg.model, read_policy_version(cfg.model)))
    # The outputs locked for the whole run, files no more readable than the inputs; then, caught up to
    # the final rename, a signal after the last step lets the run finish.
    with outputs.claimed(*cfg.paths(out_dir), lock=launch.leads()), _signals_request_stop() as stop:
        outputs.check_paths(*cfg.paths(out_dir), overwrite=cfg.overwrite)  # validate() saw only an explicit --out
        # The checkpoint's temporary directory, made now: an --out that cannot be written fails before any work.
        tmp = _output_temp_dir(out_dir) if launch.leads() else None
        try:
            return _train(cfg, out_dir, tmp, stop, console or Console())
        except KeyboardInterrupt:  # nothing saved by this run; a resumed run's earlier state may still be there
            state = outputs.state_dir(out_dir)
            if cfg.resume and state.is_dir() and outputs.foreign(state, "state") is None:
                raise Interrupted(f"interrupted again before a new state was saved; the earlier state at {state} is "
                                  "kept: rerun the same command with --resume to continue from it") from None
            raise
        finally:
            if tmp is not None:
                outputs.discard(tmp)  # gone already once the checkpoint was renamed into place


def _output_temp_dir(out_dir: Path) -> Path:
    try:
        return outputs.new_temp_dir(out_dir)
    except OSError as err:
        raise ConfigError(f"--out {out_dir}: cannot create its temporary directory in {out_dir.parent} "
                          f"({err.strerror or err})") from None


def _train(cfg: TrainConfig, out_dir: Path, out_tmp: Path | None, stop, console: Console) -> TrainResult:
    t0 = time.perf_counter()
    preset, cfg = cfg.correction, expand_correction(cfg)  # --correction spelled out as the options it stands for
    hp = cfg.loss_hparams()

    # ---- output location: refused before anything is loaded ----
    in_version = read_policy_version(cfg.model)
    out_version = (in_version or 0) + 1
    state_dir = outputs.state_dir(out_dir)
    if cfg.resume and not state_dir.is_dir():
        raise ConfigError(f"--resume: no interrupted run at {state_dir}")
    if not cfg.resume and os.path.lexists(state_dir):
        why = outputs.foreign(state_dir, "state")
        raise ConfigError(f"{state_dir}: an interrupted run's state; pass --resume to continue it or delete it"
                          if why is None else f"{state_dir}: {why}; train keeps an interrupted run's state "
                          "there: move it or choose another --out")
    # The model directories checked (headers, config.json against the weights) before any row is read;
    # its context is what every row must fit (or be cut to, with --truncate) before the weights are loaded.
    context = model_context(check_model(cfg.model, cfg.allow_unsafe_weights), cfg.model)
    if cfg.ref_model:
        check_model(cfg.ref_model, cfg.allow_unsafe_weights)
    # LoRA: peft imported and the adapter's config read before anything is loaded.
    lora_config = _lora_config(cfg)
    adapter_only = lora_config is not None and not cfg.merge
    # A full disk is found now, not after the last step (the output keeps the source's dtype).
    out_bytes = output_nbytes(cfg.model, _source_dtype(cfg.model), steps=cfg.epochs * cfg.minibatches)
    if not adapter_only:  # an adapter's size is known once it is built (below)
        check_free_space(out_dir, out_bytes)

    # Mixture of experts: --replay-routing needs the routed_experts column and an architecture moe.py routes.
    routing_spec = moe.plan_routing(cfg.model, open_rollouts(cfg.rollouts, cfg.column_map()).columns(),
                                    replay=True, allow_unsafe=cfg.allow_unsafe_weights)[0] if cfg.replay_routing else None

    # Under torchrun: join the process group; FSDP2 shards the model, rows are split by rank.
    device = distributed.init(pick_device(cfg.device))
    sharded = distributed.launched()
    if cfg.cpu_offload and not sharded:
        raise ConfigError("--cpu-offload: needs FSDP; run under torchrun or with --nproc N (N ≥ 1)")
    # Mixed precision on CPU (torch's CPU autocast) and CUDA alike; fp32 master weights throughout.
    autocast = LOW_DTYPES.get(cfg.dtype, torch.bfloat16 if cfg.dtype == "auto" and device.type == "cuda" else None)
    # fp16's 5 exponent bits: the loss is scaled so that small gradients do not flush to zero.
    scaler = torch.amp.GradScaler(device.type) if autocast is torch.float16 else None
    torch.manual_seed(cfg.seed)

    # ---- rows (minus the too stale ones), reference log-probs, model ----
    # Under torchrun each rank loads only its share of the rows (files.Shard); `local_of` maps a
    # row's index among all kept rows to this rank's copy of it (−1: another rank's).
    rows, staleness, truncation, local_of, totals = _load_share(cfg, in_version, context)
    if totals["rows"] < cfg.minibatches:
        raise ConfigError(f"--minibatches {cfg.minibatches}: more than the {totals['rows']} rollout rows")
    # The reference model's log-probs, in one inference pass before the policy is loaded: one model at a time.
    ref_logp = _reference_logprobs(cfg, rows, device, sharded, autocast) if cfg.ref_model else None  # (T,)
    # fp32 master weights; bf16 / fp16 only inside autocast (and FSDP2's gathered parameters).
    prepare = None if lora_config is None else (lambda m: _add_lora(m, cfg, lora_config))
    if sharded:  # built on the meta device, each rank reads its shards only; bf16 compute / fp32 reduce on CUDA
        model, info = distributed.load_sharded_model(cfg.model, device, allow_unsafe=cfg.allow_unsafe_weights,
                                                     param_dtype=autocast, cpu_offload=cfg.cpu_offload,
                                                     prepare=prepare)
    else:
        model, info = load_model(cfg.model, device=str(device), dtype="float32", allow_unsafe=cfg.allow_unsafe_weights)
        if prepare is not None:
            values = prepare(model)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in values:
                        p.copy_(values[name])
    _check_vocabulary(rows, info.vocab_size, cfg.model)
    rows = _check_routing(rows, routing_spec, cfg.model)  # without replay the column is dropped
    if routing_spec is not None:
        moe.install(model, routing_spec, replay=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # global numel for DTensors
    for _ in range(hooks.interrupt_signals("load")):
        signal.raise_signal(signal.SIGTERM)
    if adapter_only:
        out_bytes = 2 * 4 * trainable + report_nbytes(cfg.epochs * cfg.minibatches)  # one shard: scratch + file
        check_free_space(out_dir, out_bytes)
    mask = torch.from_numpy(rows.loss_mask)  # (T,) bool
    # Values where loss_mask is 0 are unspecified (SPEC.md §3): zero them so 0-weighted tokens stay finite.
    behavior = torch.from_numpy(np.where(rows.loss_mask, rows.behavior_logprobs, 0.0).astype(np.float32))  # (T,)
    advantages = torch.from_numpy(np.where(rows.loss_mask, rows.advantages, 0.0).astype(np.float32))  # (T,)
    token_row = torch.from_numpy(rows.token_row())  # (T,) each token's sequence

    # ---- π_old (proximal column, or recomputed once from the starting checkpoint, before the first update):
    # the proximal anchor with its behavior-correction weight ρ = π_old/μ, and the rejection criteria ----
    anchor, rho = behavior, torch.ones_like(behavior)  # (T,), (T,)
    old = None
    if cfg.needs_old_logprobs():
        if rows.proximal_logprobs is not None:
            old = torch.from_numpy(np.where(rows.loss_mask, rows.proximal_logprobs, 0.0).astype(np.float32))
        else:
            old = _logprobs_of(model, rows, cfg, autocast, with_entropy=False)[0]
    if cfg.anchor == "proximal":
        anchor = old
        rho = behavior_weight(cfg.is_correction, anchor, behavior, cap=cfg.resolved_is_cap(),
                              band=cfg.resolved_is_band(), mask=mask, level=cfg.is_level, seq_index=token_row)
    rejection = veto = None
    # Rejection and veto: the tokens leave the loss mask (--reject-mode mask) or keep it with weight 0 (zero).
    flags = {"trained": mask}  # (T,) bools for the per-step fractions
    if cfg.reject:
        flags["reject"] = rejection_mask(cfg.reject_criteria(), old, behavior, mask, token_row)  # (T,) bool
        rejection = _rejection_counts(cfg.reject, rows, mask, flags["reject"])
    if cfg.is_veto is not None:
        flags["veto"], flags["catastrophic"] = veto_mask(cfg.is_veto, old, behavior, mask, token_row)  # (T,), (T,)
        veto = _rejection_counts([f"rho<{cfg.is_veto!r}"], rows, mask, flags["veto"])
    kept = flags.get("reject", mask) & flags.get("veto", mask)
    if cfg.reject_mode == "zero":
        rho = rho * kept
    else:
        mask = kept

    # ---- optimizer, resumable state ----
    if cfg.grad_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # needed by gradient checkpointing; dropout stays off: π must be the policy μ approximated
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _adamw(params, cfg)
    steps: list[dict] = []
    start = 0
    if cfg.resume:
        start, steps = load_state(state_dir, cfg, model, optimizer, scaler)

    total_steps = cfg.epochs * cfg.minibatches
    diverged = None  # the parameter an update made non-finite (the run stops after that step)
    progress = _progress(cfg, total_steps, start)
    # Rounds of a pipeline (policy version v -> v + 1) continue one TensorBoard curve.
    board = _tensorboard(cfg, base_step=(in_version or 0) * total_steps)
    # From here on a signal stops the current step within seconds (_interruptible: between passes, and in
    # one process between decoder layers), drops its gradients and saves a resumable state at its start.
    # Under torchrun the ranks agree before every pass and after every step (the flag is max-reduced).
    stop.defer = True
    with progress, _interruptible(model, stop, sharded) as check_stop:
        task = progress.add_task("train", total=total_steps, completed=start, loss="–", tps="–", outside="–")
        for step in range(start, total_steps):
            epoch, k = divmod(step, cfg.minibatches)
            perm = np.random.default_rng([cfg.seed, epoch]).permutation(totals["rows"])
            mini = local_of[np.array_split(perm, cfg.minibatches)[k]]
            local = mini[mini >= 0]  # the mini-batch's rows this rank holds
            lr = cfg.lr * _warmup(step, cfg.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t_step = time.perf_counter()

            step_rho, corrections = _step_corrections(cfg, rows, local, rho, mask, flags, device)
            scale = _loss_scale(scaler, device)
            if scaler is not None:
                corrections["amp/loss_scale"] = scale
            stop.step = step
            try:
                loss, diag, tokens = accumulate_gradients(model, rows, local, cfg, anchor=anchor, rho=step_rho,
                                                          behavior=behavior, advantages=advantages, mask=mask,
                                                          autocast=autocast, ref_logp=ref_logp, scale=scale,
                                                          old_logp=old, step=step, interrupt=check_stop)
            except StepInterrupted:
                optimizer.zero_grad(set_to_none=True)  # the step's partial gradients: it reruns on --resume
                raise _interrupted(state_dir, cfg, model, optimizer, step, steps, scaler, total_steps,
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
            metrics = {**_flat_metrics(diag.summary()), **corrections, **moe.step_metrics(model)}
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
                raise _interrupted(state_dir, cfg, model, optimizer, step + 1, steps, scaler, total_steps,
                                   f"after step {step + 1}")

    # ---- closing audit: the final weights against μ on the trained rollouts ----
    optimizer = None  # its moments (two weight copies) are not needed past the last step
    model.eval()
    final, notes = _closing_audit(model, rows, cfg, autocast, behavior, advantages, mask, ref_logp)
    first = steps[0]["metrics"] if steps else {}
    final["change_from_first_step"] = {
        k: (None if v is None or first.get(k) is None else v - first[k])
        for k, v in final["metrics"].items() if not k.startswith("data/")  # data/* describe the rows, not π
    }

    report = {
        "report": "drpo-train", "report_version": TRAIN_REPORT_VERSION, "drpo_version": __version__,
        "config": cfg.to_dict(),
        "input": {"model": os.path.abspath(cfg.model), "policy_version": in_version,
                  "rollouts": [os.path.abspath(p) for p in cfg.rollouts], "rows": totals["rows"],
                  "tokens": totals["tokens"], "trained_tokens": totals["trained_tokens"],
                  "vocab_size": info.vocab_size, "adapter": cfg.adapter and os.path.abspath(cfg.adapter),
                  "trainable_parameters": trainable},
        "output": {"dir": str(out_dir), "policy_version": out_version},
        "loss": {"name": cfg.loss, "hparams": hp, "anchor": cfg.anchor, "is_correction": cfg.is_correction,
                 "is_level": cfg.is_level, "agg": cfg.agg,
                 "reference_kl": ({"model": os.path.abspath(cfg.ref_model), "coef": cfg.resolved_kl_coef(),
                                   "estimator": cfg.kl_estimator} if cfg.ref_model else None),
                 "entropy_coef": cfg.entropy_coef, "correction": preset, "reject_mode": cfg.reject_mode,
                 "is_veto": cfg.is_veto, "is_batch_norm": cfg.is_batch_norm},
        "filters": {"staleness": staleness, "rejection": rejection, "veto": veto, "truncation": truncation},
        "notes": notes,
        "steps": steps,
        "skipped_steps": sum(s["skipped"] for s in steps),
        "diverged": None if diverged is None else {"step": step, "parameter": diverged},
        "final": final,
        "seconds": time.perf_counter() - t0,
    }
    report = finite_or_null(report)
    files, unwritten = _report_files(report)
    _save_output(model, cfg, out_dir, out_tmp, out_version, files, out_bytes, lora_config)  # the weights, whatever else fails
    if distributed.rank() == 0:  # one remover: every rank's shards are in it
        outputs.remove_output(state_dir, "state")  # only drpo's own state; anything else stays
    if board is not None:
        try:
            board.close(final["metrics"], total_steps - 1)
        except Exception as err:  # noqa: BLE001 - the checkpoint is written; said below
            unwritten.append(f"--tensorboard {cfg.tensorboard} ({distributed.one_line(err)})")
    if unwritten:
        raise ReportError(f"wrote {out_dir} (policy version {out_version}) but could not write "
                          + "; ".join(unwritten))
    if diverged is not None:
        raise DrpoError(f"wrote {out_dir} (policy version {out_version}) but training diverged: the update of step "
                        f"{step} made {diverged} non-finite, so the run stopped there and drpo will refuse these "
                        f"weights; lower --lr ({cfg.lr:g}) or --max-grad-norm ({cfg.max_grad_norm:g})")
    if not cfg.quiet and distributed.rank() == 0:
        print_train_summary(report, console)
    return TrainResult(out_dir=out_dir, policy_version=out_version, report=report)


def _report_files(report: dict) -> tuple[dict[str, str], list[str]]:
    """({name: text}, [what could not be made]) of the report and its page for the checkpoint directory.

    Each is made on its own; one that fails is left out and named, so that it never costs the weights.
    """
    from drpo_cli.reports.html_pages import train_page

    files, unwritten = {}, []
    for name, make in ((REPORT_NAME, train_report_json), (PAGE_NAME, train_page)):
        try:
            files[name] = make(report)
        except Exception as err:  # noqa: BLE001 - reported once the checkpoint is written
            unwritten.append(f"{name} ({distributed.one_line(err)})")
    return files, unwritten


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
        kept = _step_wide(lambda b, o, v: m2po_keep(b, o, v, cfg.m2po_threshold), rows, step_idx,
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
        sel = _step_wide(lambda lp, mu, a, v: covariance_selection(cfg.loss, lp, mu, a, v, seed=cfg.seed * 1_000_003 + step,
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


def _step_wide(select, rows: RolloutRows, token_idx: torch.Tensor, *columns: torch.Tensor) -> torch.Tensor:
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


def _reference_logprobs(cfg: TrainConfig, rows: RolloutRows, device, sharded: bool, autocast) -> torch.Tensor:
    """log π_ref (T,) of every response token, in one inference pass; the reference model is freed after."""
    if sharded:  # one weight copy per node, as for the policy
        ref, info = distributed.load_sharded_model(cfg.ref_model, device, allow_unsafe=cfg.allow_unsafe_weights,
                                                   param_dtype=autocast)
    else:
        ref, info = load_model(cfg.ref_model, device=str(device), dtype="float32", allow_unsafe=cfg.allow_unsafe_weights)
    _check_vocabulary(rows, info.vocab_size, cfg.ref_model)
    logp = _logprobs_of(ref, rows, cfg, autocast, with_entropy=False)[0]
    del ref
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return logp


def _rejection_counts(criteria, rows: RolloutRows, mask: torch.Tensor, kept: torch.Tensor) -> dict:
    """Tokens and sequences the --reject criteria (or the veto) remove (report `filters.rejection` / `.veto`)."""
    row = rows.token_row()
    trained_rows = np.unique(row[mask.numpy()])
    rejected = mask.numpy() & ~kept.numpy()
    local = [int(mask.sum()), int(trained_rows.size), int(np.unique(row[rejected]).size), int(rejected.sum())]
    n_tokens, n_seq, seq_rejected, tokens_rejected = (sum(x) for x in zip(*distributed.exchange(local)))
    return {"criteria": list(criteria), "tokens_rejected": tokens_rejected,
            "token_frac": tokens_rejected / n_tokens if n_tokens else None,
            "sequences_rejected": seq_rejected, "seq_frac": seq_rejected / n_seq if n_seq else None}


def _step_corrections(cfg: TrainConfig, rows: RolloutRows, local: np.ndarray, rho: torch.Tensor, mask: torch.Tensor,
                      flags: dict, device) -> tuple[torch.Tensor, dict]:
    """(behavior weights for this step, its correction metrics), over the step's rows on every rank.

    Fractions are of the step's trained tokens and sequences before rejection: `reject/*` (--reject),
    `veto/token_frac` (tokens with ρ below the veto threshold), `veto/seq_frac` (sequences vetoed).
    --is-batch-norm: the weights divided by their mean over the step's trained tokens (sequences at a
    sequence --is-level), summed exactly (losses.weight_sum_parts), so for the same weights the factor
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


def _load_share(cfg: TrainConfig, in_version: int | None, context: Context | None
                ) -> tuple[RolloutRows, dict, dict | None, np.ndarray, dict]:
    """(this rank's rows minus the too stale ones, within the model's context, staleness counts, truncation
    counts (rollouts.fit_context; None without --truncate), local_of, global totals).

    In one process the rows are all of them and local_of is the identity. Under torchrun each rank
    loads its share (files.Shard) and local_of (N,) maps each kept row's index among all N kept rows,
    in file order, to this rank's copy (−1 where another rank holds it), so every rank draws the
    same mini-batches as one process and trains the rows of them it holds.
    """
    source = open_rollouts(cfg.rollouts, cfg.column_map())
    xch = distributed.exchange if distributed.is_distributed() else None
    rows = load_rows(source, adv_norm=cfg.adv_norm, temperature=cfg.temperature,
                     shard=distributed.data_shard(source), exchange=xch)
    newest = rows.version_range()[1].max(initial=-1)  # the newest trained token's version
    if xch is not None:
        newest = max(xch(int(newest)))
    current, _ = current_version(None, in_version, np.array([newest], dtype=np.int64))
    rows, staleness = staleness_filter(rows, current, max_lag=cfg.max_lag, min_version=cfg.min_version,
                                       exchange=xch)
    rows, truncation = fit_context(rows, context, truncate=cfg.truncate, exchange=xch)  # a row too long: refused
    kept = rows.global_row if xch is None else np.concatenate(xch(rows.global_row))  # increasing: file order
    kept = np.sort(kept)
    local_of = np.full(kept.size, -1, dtype=np.int64)
    local_of[np.searchsorted(kept, rows.global_row)] = np.arange(rows.num_rows)
    mine = [rows.num_rows, rows.num_tokens, int(rows.loss_mask.sum())]
    totals = dict(zip(("rows", "tokens", "trained_tokens"), (sum(x) for x in zip(*distributed.exchange(mine)))))
    return rows, staleness, truncation, local_of, totals


def _check_vocabulary(rows: RolloutRows, vocab_size: int, model_dir: str) -> None:
    """check_vocabulary on this rank's rows; under torchrun every rank raises the first bad row's error."""
    error = None
    try:
        check_vocabulary(rows, vocab_size, model_dir)
    except InputError as err:
        error = err
    distributed.agree(error, "checking token ids")


def _check_routing(rows: RolloutRows, spec, model_dir: str) -> RolloutRows:
    """moe.check_routing on this rank's rows; under torchrun every rank raises the first bad row's error."""
    error = None
    try:
        rows = moe.check_routing(rows, spec, model_dir)
    except InputError as err:
        error = err
    distributed.agree(error, "checking routed_experts")
    return rows


def _adamw(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all parameters, CPU and CUDA) where every parameter allows it.

    The same update as the per-tensor loop up to float rounding, 6× faster on CPU for a 78 M-parameter
    model (0.05 s vs 0.31 s a step); sharded (DTensor) or other-device parameters keep the default.
    """
    fused = all(type(p) is torch.nn.Parameter and p.device.type in ("cpu", "cuda") and p.is_floating_point()
                for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


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


def _logprobs_of(model, rows: RolloutRows, cfg: TrainConfig, autocast, *, with_entropy: bool):
    """(logp (T,), entropy (T,) | None) of every response token of `rows` under `model`, inference mode.

    Under torchrun `rows` are this rank's share; ranks with fewer micro-batches run filler passes,
    as FSDP needs the same number of passes on every rank.
    """
    device = distributed.model_device(model)
    logp = torch.zeros(rows.num_tokens, dtype=torch.float32)
    ent = torch.zeros(rows.num_tokens, dtype=torch.float32) if with_entropy else None
    micro = plan_micro_batches(rows, np.arange(rows.num_rows), cfg.micro_batch_tokens)
    passes = micro + distributed.filler_passes(len(micro))
    with torch.inference_mode(), reused_buffers():
        for i, mb in enumerate(passes):
            lp, en = token_logprobs(model.eval(), mb.to(device), chunk_tokens=cfg.chunk_tokens,
                                    with_entropy=with_entropy, dtype=autocast)
            if i >= len(micro):  # a filler pass: results dropped
                continue
            logp[mb.token_index] = lp.float().cpu()
            if ent is not None:
                ent[mb.token_index] = en.float().cpu()
    return logp, ent


def _closing_audit(model, rows: RolloutRows, cfg: TrainConfig, autocast, behavior, advantages, mask, ref_logp=None):
    """(SPEC.md §2 metrics of the final weights against μ and the worst samples by harmful fraction, notes)."""
    logp, ent = _logprobs_of(model, rows, cfg, autocast, with_entropy=True)  # (T,), (T,)
    diag = Diagnostics(cfg.tr_delta, {cfg.loss: cfg.loss_hparams()}, opsm_delta=cfg.opsm_delta)
    selected = None  # clip-cov / kl-cov: the selection over every rank's tokens, as in a step
    if cfg.loss in BATCH_LOSSES:
        every = torch.arange(rows.num_tokens)
        selected = _step_wide(lambda lp, mu, a, v: covariance_selection(cfg.loss, lp, mu, a, v, seed=cfg.seed,
                                                                        **cfg.loss_hparams()),
                              rows, every, logp, behavior, advantages, mask)
    diag.update(logp, behavior, advantages, mask, entropy=ent, seq_index=torch.from_numpy(rows.token_row()),
                ref_logp=ref_logp, selected=selected)
    summary = diag.all_reduce_().summary()  # each rank holds its rows' tokens

    # Per-sample fractions with the --tr-delta yardstick (SPEC.md §2 "outside" / "harmful").
    d = token_diagnostics(logp, behavior, advantages, tr_delta=cfg.tr_delta)  # each (T,)
    row, n = torch.from_numpy(rows.token_row()), rows.num_rows  # (T,)
    harm_frac = sequence_scores(d["harmful"], row, n, mask=mask, reduce="mean")  # (N,)
    out_frac = sequence_scores(d["outside"], row, n, mask=mask, reduce="mean")  # (N,)
    dmax = sequence_scores(d["delta"].abs(), row, n, mask=mask, reduce="amax")  # (N,)
    count = sequence_scores(torch.ones_like(logp), row, n, mask=mask)  # (N,)
    # Worst first: harmful fraction, then outside fraction, then max |Δ|, then row order (over all ranks).
    order = np.lexsort((rows.global_row, -dmax.numpy(), -out_frac.numpy(), -harm_frac.numpy()))
    shown = [int(i) for i in order[:WORST_SAMPLES] if out_frac[i] > 0]
    tokens = worst_tokens(rows, shown, logp.numpy())
    mine = [((-float(harm_frac[i]), -float(out_frac[i]), -float(dmax[i]), int(rows.global_row[i])),
             {"sample_id": rows.sample_ids[i], "harmful_frac": float(harm_frac[i]),
              "outside_frac": float(out_frac[i]), "delta_abs_max": float(dmax[i]), "tokens": int(count[i])}, tok)
            for i, tok in zip(shown, tokens)]
    best = sorted((c for share in distributed.exchange(mine) for c in share), key=lambda c: c[0])[:WORST_SAMPLES]
    picture = MuPiHistogram()
    picture.update(logp.numpy(), behavior.numpy(), advantages.numpy(), mask.numpy())
    picture.all_reduce_()
    return {"metrics": _flat_metrics(summary), "worst_samples": [c[1] for c in best],
            "mu_pi_histogram": picture.to_dict(), "worst_tokens": [c[2] for c in best]}, summary["notes"]


def _flat_metrics(summary: dict) -> dict[str, float | int | None]:
    """The namespaced scalar metrics of a Diagnostics summary (breakdowns and histograms left out)."""
    return {k: clean_number(v) for k, v in summary.items() if "/" in k and (v is None or isinstance(v, (int, float)))}


# ---- output -----------------------------------------------------------------------------------


class _Board:
    """TensorBoard scalars of every step at global step `base_step + step` (rank 0 only)."""

    def __init__(self, log_dir: str, base_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer, self.base = SummaryWriter(log_dir=log_dir), base_step

    def step(self, record: dict) -> None:
        at = self.base + record["step"]
        for name in ("loss", "grad_norm", "lr", "tokens"):
            if record[name] is not None:
                self.writer.add_scalar(f"train/{name}", record[name], at)
        for name, value in record["metrics"].items():
            if value is not None:
                self.writer.add_scalar(name, value, at)
        self.writer.flush()  # watchable while the run goes on

    def close(self, final_metrics: dict, last_step: int) -> None:
        """The closing audit's metrics (final weights vs μ) under `final/`, at the last step."""
        for name, value in final_metrics.items():
            if value is not None:
                self.writer.add_scalar(f"final/{name}", value, self.base + last_step)
        self.writer.close()


def _tensorboard(cfg: TrainConfig, *, base_step: int) -> _Board | None:
    if cfg.tensorboard is None or distributed.rank() != 0:
        return None
    try:
        return _Board(cfg.tensorboard, base_step)
    except ImportError as err:
        raise ConfigError(f"--tensorboard needs the tensorboard package ({err}): pip install 'drpo[tensorboard]'") from None


def _save_output(model, cfg: TrainConfig, out_dir: Path, out_tmp: Path | None, version: int, files: dict[str, str],
                 expected_bytes: int, lora_config) -> None:
    """Checkpoint (or adapter), report and page appear together, in one atomic rename (--overwrite: an atomic swap, outputs.py).

    A sharded model is gathered tensor by tensor and written by rank 0 once every rank succeeded.
    With LoRA: the adapter alone in peft's format, or (--merge) full weights W + (alpha / r)·B A.
    """
    kw = {"source_dir": cfg.model, "policy_version": version, "training_config": cfg.to_dict(),
          "overwrite": cfg.overwrite, "extra_files": files, "expected_bytes": expected_bytes, "tmp_dir": out_tmp}
    sharded = distributed.is_sharded(model)
    keep = transform = convert = None
    if lora_config is not None:
        from drpo_cli.model import lora

        if cfg.merge:
            scale = lora.scalings(model)
            transform = lambda stream: lora.merged(stream, scale)
        else:
            kw["adapter_config"] = lora.config_json(lora_config, os.path.abspath(cfg.model))
            keep, convert = lora.is_lora, (lambda name, t: [(lora.disk_name(name), t)])
    if not (lora_config is not None and not cfg.merge):
        kw["dtype"] = _source_dtype(cfg.model)  # the output keeps the input's weight dtype (training ran in fp32)
    if sharded:
        distributed.save_full_checkpoint(model, out_dir=out_dir, keep=keep, transform=transform, convert=convert, **kw)
    elif lora_config is None:
        save_checkpoint(model, out_dir=out_dir, **kw)
    else:
        stream = ((n, t) for n, t in model.state_dict().items() if keep is None or keep(n))
        convert = convert or saved_format(model)
        with CheckpointWriter(out_dir, config=model.config, **kw) as writer:
            for name, tensor in (transform(stream) if transform else stream):
                for key, value in convert(name, tensor):
                    writer.add(key, value)
            writer.commit()


def _lora_config(cfg: TrainConfig):
    """peft's LoraConfig for this run (new, or the --adapter's own), or None without LoRA."""
    if not cfg.uses_lora():
        return None
    from drpo_cli.model import lora

    if cfg.adapter is not None:
        return lora.read_config(cfg.adapter)
    return lora.new_config(cfg.lora_r, cfg.resolved_lora_alpha(), cfg.lora_targets)


def _add_lora(model, cfg: TrainConfig, lora_config) -> dict[str, torch.Tensor]:
    """LoRA layers injected, everything else frozen; returns the adapter's starting values (full tensors)."""
    from drpo_cli.model import lora

    lora.add_adapter(model, lora_config)
    return lora.read_adapter(cfg.adapter, model) if cfg.adapter else lora.initial_values(model, cfg.seed)


def _source_dtype(model_dir: str) -> str | None:
    """The input checkpoint's weight dtype, so the output keeps it (training ran in fp32)."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in ("float32", "bfloat16", "float16") else None


# ---- interrupts ----------------------------------------------------------


@contextlib.contextmanager
def _signals_request_stop():
    """Yields a flag that SIGINT/SIGTERM set once `stop.defer` is on (checked at step boundaries).

    Before that (loading: nothing to save) and on a second signal, the signal aborts at once.
    """
    stop = SimpleNamespace(requested=False, defer=False, step=None)  # step: the optimizer step in progress

    def handle(signum, frame):
        if stop.requested or not stop.defer:
            raise KeyboardInterrupt
        stop.requested = True

    saved = {}
    if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
        for sig in (signal.SIGINT, signal.SIGTERM):
            saved[sig] = signal.signal(sig, handle)
    try:
        yield stop
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


class StepInterrupted(Exception):
    """A signal stopped an optimizer step in its middle (its gradients are dropped; it reruns on --resume)."""


@contextlib.contextmanager
def _interruptible(model, stop, sharded: bool):
    """Yields the check accumulate_gradients runs before every pass: StepInterrupted once a signal set
    `stop.requested`, so that a long step stops in seconds (the pass at work, not the whole step).

    Under torchrun the check is a collective (any rank's flag), so every rank stops before the same
    pass; in one process each decoder layer also checks before its forward (a pre-hook), so a long
    forward stops between layers. The hook also serves DRPO_INTERRUPT_IN_STEP (hooks.py).
    """
    def check() -> None:
        if distributed.any_rank(stop.requested) if sharded else stop.requested:
            raise StepInterrupted

    def before_layer(module, args) -> None:
        if stop.step is None:
            return  # the π_old, reference and closing passes: a signal there acts as before
        if hooks.interrupt_in_step(stop.step) and not stop.requested:
            signal.raise_signal(signal.SIGTERM)  # the test hook: a signal inside the step's forward
        if stop.requested and not sharded:  # under FSDP every rank must stop before the same pass: check()
            raise StepInterrupted

    try:
        layers = distributed.decoder_layers(model)
    except ConfigError:  # an architecture without declared blocks: the checks between passes remain
        layers = []
    handles = [layer.register_forward_pre_hook(before_layer) for layer in layers]
    try:
        yield check
    finally:
        for handle in handles:
            handle.remove()


def _interrupted(state_dir: Path, cfg: TrainConfig, model, optimizer, next_step: int, steps: list[dict], scaler,
                 total_steps: int, when: str) -> DrpoError:
    """Save the resumable state (the next step to run: `next_step`) and return the error that says so:
    Interrupted (exit 130), or Aborted (exit 4) when the state could not be saved (e.g. a full disk)."""
    try:
        save_state(state_dir, cfg, model, optimizer, next_step, steps, scaler)
    except Exception as err:  # noqa: BLE001 - said in one line, nothing half-written (save_state cleans up)
        return Aborted(f"interrupted {when} of {total_steps}, but the resumable state could not be saved to "
                       f"{state_dir} ({distributed.one_line(err)}): nothing was kept; rerun the command")
    return Interrupted(f"interrupted {when} of {total_steps}; state saved to {state_dir}; rerun the same command "
                       "with --resume to continue")


# ---- progress ---------------------------------------------------------------------------------


def _progress(cfg: TrainConfig, total: int, start: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  tok/s {task.fields[tps]}  outside {task.fields[outside]}"),
        TimeRemainingColumn(), console=Console(stderr=True),
        disable=cfg.quiet or not sys.stderr.isatty() or distributed.rank() != 0, transient=False,
    )
