"""`drpo inspect --model`: per-token diagnostics of the current model against the logged sampler (SPEC.md §2).

The rows (validated by the data audit that runs first) stream record batch by record batch: each
batch is grouped into token-budget micro-batches whose log-probs the log-prob engine computes under
inference_mode, and each micro-batch feeds the mergeable Diagnostics accumulator, the μ–π picture,
the batch's per-sequence scores (kept only for the `--top` worst) and optionally the per-token Arrow
writer, so memory is one batch plus a few numbers per row, flat in the file size. The logging-bug
checks read the log-probs of fresh (lag 0) rows at a few more temperatures from the same chunk
logits and compare them with the logged ones. Under torchrun each rank streams its share.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from drpo_cli.audit.columns import MODEL_COLUMNS, PLAN_COLUMNS, extra_columns
from drpo_cli.base.errors import InputError
from drpo_cli.base.outputs import ARROW_MARKER_KEY
from drpo_cli.config import LOSS_HPARAMS, InspectConfig, expand_correction
from drpo_cli.model.batching import filler_batch, plan_micro_batches
from drpo_cli.model.head import reused_buffers
from drpo_cli.model.histograms import MuPiHistogram, worst_tokens
from drpo_cli.objectives.catalog import LOSSES
from drpo_cli.objectives.divergence import Diagnostics, token_diagnostics
from drpo_cli.objectives.elementwise import LOGR_CLAMP
from drpo_cli.rollouts.rows import RolloutRows, check_vocabulary, current_version, fit_context

WHAT_IF_DELTAS = (0.1, 0.2, 0.5, 12.5)  # DRPO δ sweep shown when --delta is not given (SPEC.md §1)
FIT_TOKENS = 256  # fresh tokens (evenly spread) whose log-probs the logging checks read at other temperatures
TEMPERATURE_FACTORS = (0.8, 0.9, 1.1, 1.25)  # around the logged temperature; T = 1 is always tried
OFFSET_NATS = 0.02  # |mean log r| on fresh tokens above this (and > 4 standard errors) is flagged
PER_TOKEN_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("position", pa.int32()), ("token_id", pa.int64()), ("loss_mask", pa.bool_()),
    ("logp", pa.float32()), ("behavior_logp", pa.float32()), ("advantage", pa.float32()),
    ("ratio", pa.float32()), ("delta", pa.float32()), ("logr", pa.float32()), ("k3", pa.float32()),
    ("entropy", pa.float32()), ("outside", pa.bool_()), ("harmful", pa.bool_()), ("lag", pa.int64()),
    ("policy_version", pa.int64()),
], metadata={ARROW_MARKER_KEY: b"per-token"})  # marks the file as drpo's (outputs.py: --overwrite may replace it)
_DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Per-row sums over trained tokens that every worst sequence is shown with (max_abs_delta: the largest |Δ|),
# and `extra`: the one per-token value its --worst-by metric needs beyond them (WORST_BY_SCORES), if any.
_SEQ_FEATURES = ("tokens", "harmful", "outside", "abs_delta", "max_abs_delta", "k3", "extra")
_F = {name: j for j, name in enumerate(_SEQ_FEATURES)}


def _mean(seq: np.ndarray, feature: str) -> np.ndarray:
    """(n,) the feature's mean over each row's trained tokens (rows without one: 0)."""
    return seq[:, _F[feature]] / np.maximum(seq[:, 0], 1.0)


# The per-token values a --worst-by metric may need, from Diagnostics.update's masked tokens `t` (float64);
# `log_c` = log of the catastrophic threshold.
_TOKEN_VALUES = {
    "logr": lambda t, log_c: t["logr"],
    "kl_reverse": lambda t, log_c: t["kl_reverse"],
    "reverse_k3": lambda t, log_c: t["reverse_k3"],
    "mult_error": lambda t, log_c: torch.maximum(t["ratio"], t["ratio"].reciprocal()),  # exp(|log r|)
    "js": lambda t, log_c: t["js"],
    "ratio_sq": lambda t, log_c: t["ratio"].square(),
    "log_gap": lambda t, log_c: t["behavior_logp"] - t["logp"],  # log μ − log π, unclamped as verl's log-ppl
    "abs_logr": lambda t, log_c: t["logr"].abs(),
    "catastrophic": lambda t, log_c: ((t["logp"] - t["behavior_logp"]) < log_c).double(),
}
# config.WORST_BY's metrics over one sequence: (the per-token value kept in `extra`, or None; "sum" or "max" of
# it per row; the score from the row sums (n, F) -> (n,), larger is worse).
WORST_BY_SCORES = {
    "tr/harmful_frac": (None, "sum", lambda q: _mean(q, "harmful")),
    "tr/outside_frac": (None, "sum", lambda q: _mean(q, "outside")),
    "delta/abs_mean": (None, "sum", lambda q: _mean(q, "abs_delta")),
    "delta/abs_max": (None, "sum", lambda q: q[:, _F["max_abs_delta"]]),
    "kl/k3_mean": (None, "sum", lambda q: _mean(q, "k3")),
    "kl/k1_mean": ("logr", "sum", lambda q: -_mean(q, "extra")),
    "kl/reverse_mean": ("kl_reverse", "sum", lambda q: _mean(q, "extra")),
    "kl/reverse_k3_mean": ("reverse_k3", "sum", lambda q: _mean(q, "extra")),
    "kl/js_mean": ("js", "sum", lambda q: _mean(q, "extra")),
    "chi2/token": ("ratio_sq", "sum", lambda q: _mean(q, "extra") - 1.0),
    # R² − 1 with R = exp(Σ_t log r_t), log R clamped as Diagnostics' is/ess_seq and chi2/seq
    "chi2/seq": ("logr", "sum", lambda q: np.expm1(2.0 * np.clip(q[:, _F["extra"]], -LOGR_CLAMP, LOGR_CLAMP))),
    "prob/mult_error_mean": ("mult_error", "sum", lambda q: _mean(q, "extra")),
    "ppl/log_diff_mean": ("log_gap", "sum", lambda q: _mean(q, "extra")),
    "ppl/log_abs_diff_mean": ("log_gap", "sum", lambda q: np.abs(_mean(q, "extra"))),
    "ppl/ratio_mean": ("log_gap", "sum", lambda q: np.exp(_mean(q, "extra"))),
    "logr/abs_mean": ("abs_logr", "sum", lambda q: _mean(q, "extra")),
    "logr/abs_max": ("abs_logr", "max", lambda q: q[:, _F["extra"]]),
    "is/catastrophic_token_frac": ("catastrophic", "sum", lambda q: _mean(q, "extra")),
}


def audit_model(cfg: InspectConfig, source, progress=None, per_token_path: str | None = None, shard=None,
                by: dict[str, str] | None = None, against=None, context=None):
    """Per-token diagnostics; returns (model section, metrics, current version, version source, notes).

    `context` (rollouts.Context): the model's, checked by the data audit; with --truncate each batch's
    longer rows are cut to it here (rollouts.fit_context). The row plan counts their tokens before the
    cut: the progress total and the logging checks' spread are then over a few more tokens than run.

    Streams: one light pass reads every row's version, temperature and trained-token count (what the
    staleness filter and the logging checks need up front), then record batch by record batch the
    rows go through the engine and into mergeable accumulators; memory holds one batch, the per-row
    plan (a few numbers per row) and the `--top` worst sequences. Under torchrun (`shard`) each rank
    streams only its share and every rank runs the same number of passes (FSDP needs it).
    """
    from drpo_cli.model import distributed, moe
    from drpo_cli.model.checkpoint import load_model
    from drpo_cli.model.logprobs import pick_device
    from drpo_cli.rollouts.files import RolloutSource, Shard
    from drpo_cli.rollouts.rows import (
        file_temperature,
        group_advantage_table,
        rows_of_batch,
        staleness_filter,
        too_stale,
    )

    start = time.perf_counter()
    spec, routing_note = moe.plan_routing(cfg.model, source.columns(), replay=cfg.replay_routing,
                                          allow_unsafe=cfg.allow_unsafe_weights)  # refused before any work
    device = distributed.init(pick_device(cfg.device))
    sharded = distributed.launched()
    if sharded:  # built on the meta device, each rank reads its shards only; the weights keep the loaded dtype
        model, info = distributed.load_sharded_model(cfg.model, device, dtype=_DTYPES[cfg.dtype],
                                                     allow_unsafe=cfg.allow_unsafe_weights, inference=True)
    else:
        model, info = load_model(cfg.model, device=str(device), dtype=_DTYPES[cfg.dtype],
                                 allow_unsafe=cfg.allow_unsafe_weights)
    routing = None if spec is None else moe.MismatchCount(spec)
    if spec is not None:
        moe.install(model, spec, replay=cfg.replay_routing)
    layout = shard or Shard(0, 1)
    plan = _RowPlan.read(source, layout.piece_rows, cfg.temperature)
    current, version_source = current_version(cfg.current_version, info.policy_version, plan.newest)
    filtering = cfg.max_lag is not None or cfg.min_version is not None
    # (N,) as the data audit: a row drops when its newest trained token is too stale (rollouts.stale_tokens).
    keep = ~too_stale(plan.newest, current, max_lag=cfg.max_lag, min_version=cfg.min_version)
    plan_lag = _lag(plan.oldest, current)  # (N,) oldest trained token's lag
    notes = [routing_note] if routing_note else []
    newer = keep & (plan.newest > current) if current is not None else np.zeros(0, dtype=bool)
    if newer.any():
        notes.append(f"{int(newer.sum())} row(s) have a policy_version (of the row or of some tokens) above the "
                     f"current version {current}; their lag is counted as unknown")
    losses = {name: dict(hp) for name, hp in LOSS_HPARAMS.items()}
    losses["drpo"] = {"delta": cfg.chosen_delta()}
    deltas = cfg.deltas or WHAT_IF_DELTAS
    run = expand_correction(cfg)  # --correction spelled out: its rejection criteria, its weight
    diag = Diagnostics(cfg.tr_delta, losses, drpo_deltas=deltas, reject=run.reject_criteria(), veto=run.is_veto,
                       weight=run.behavior_weight_args() if run.is_batch_norm else None, reject_mode=run.reject_mode,
                       opsm_delta=cfg.resolved_opsm_delta(), m2po_threshold=cfg.resolved_m2po_threshold(),
                       catastrophic=run.is_veto, by=tuple(by or ()))
    # Fed by the same passes. Fresh rows: every trained token at lag 0 (none newer, so none masked by the filters).
    check_lag = np.where((plan_lag == 0) & (plan.newest != plan.oldest), 1, plan_lag)  # (N,)
    check = LoggingCheck.plan(check_lag, plan.temperature, plan.trained, keep)
    picture = MuPiHistogram()
    worst = _Worst(cfg.top, cfg.worst_by)
    comparisons = None
    if against is not None:  # --against: model vs A, model vs B and B vs A, fed by the same passes
        from drpo_cli.audit.inspect_against import Comparisons

        comparisons = Comparisons(cfg, against, with_model=True)
    writer = _PerTokenWriter(per_token_path) if per_token_path or cfg.per_token is not None else None
    owned = plan.piece % layout.world == layout.rank  # (N,) this rank's rows
    local_tokens = int(plan.tokens[owned & keep].sum())
    # Group means over the rows whose advantage is reward-based (files without advantages / advantage), as load_rows.
    reward_files = [rf for rf in source.files if "advantages" not in rf.fields and "advantage" not in rf.fields]
    groups = group_advantage_table(RolloutSource(reward_files, [], source.column_map)) if reward_files else None
    temps = {rf.path: file_temperature(rf.metadata, cfg.temperature) for rf in source.files}
    counts = np.zeros(3, dtype=np.int64)  # micro-batches, positions, real positions (this rank)

    def micro_batches():
        """This rank's micro-batches, batch by batch; a batch's rows are scored once all its passes ran."""
        for sb in source.iter_batches(MODEL_COLUMNS, shard=shard, extra=extra_columns(by or {})):
            rows = rows_of_batch(sb, temps[sb.path], groups)
            codes = {name: diag.by_codes(name, sb.batch.column(column)) for name, column in (by or {}).items()}
            kept = keep[rows.global_row]  # (n,)
            rows = rows if kept.all() else rows.select(np.flatnonzero(kept))
            if rows.num_rows == 0:
                continue
            if filtering:  # the kept rows' too-stale tokens leave the loss mask
                rows, _ = staleness_filter(rows, current, max_lag=cfg.max_lag, min_version=cfg.min_version)
            rows, _ = fit_context(rows, context, truncate=cfg.truncate)  # counted by the data audit
            if rows.num_rows == 0:
                continue
            check_vocabulary(rows, info.vocab_size, cfg.model)
            rows = moe.check_routing(rows, spec, cfg.model)
            chunk = _Chunk(rows, current, check, cfg.worst_by, diag.catastrophic)
            chunk.by = {name: c[rows.global_row - sb.global_offset] for name, c in codes.items()}  # (n,) per row
            chunk.against = against.behavior_of(rows) if against is not None else None  # B's (T,) log-probs, mask
            for mb in plan_micro_batches(rows, np.arange(rows.num_rows), cfg.micro_batch_tokens):
                yield chunk, mb
            diag.close_rows()  # the batch's rows are whole
            if comparisons is not None:
                comparisons.close_rows()
            worst.add(chunk)

    passes = micro_batches()
    try:
        with torch.inference_mode(), reused_buffers():  # one set of chunk buffers for the whole pass
            while True:
                error, item = None, None
                try:
                    item = next(passes, None)
                except InputError as err:
                    error = err
                if not distributed.agree_any(error, "auditing the rollouts", item is not None):  # one collective
                    break
                if item is None:  # this rank is done, others are not: a pass whose results are dropped
                    _logprobs(model, filler_batch(), device, cfg)
                    if writer is not None:
                        writer.gather(None)
                    continue
                chunk, mb = item
                logp, entropy = _logprobs(model, mb, device, cfg, chunk.check)  # (M,), (M,)
                rows, idx = chunk.rows, mb.token_index.numpy()  # (M,) token indices within the batch
                mu = torch.from_numpy(rows.behavior_logprobs[idx])  # (M,)
                adv = torch.from_numpy(rows.advantages[idx])  # (M,)
                mask = torch.from_numpy(rows.loss_mask[idx])  # (M,)
                if routing is not None:
                    routing.add(model, mb, mask)
                lag = torch.from_numpy(chunk.token_lag[idx])  # (M,)
                position = chunk.position[idx]
                token_row = rows.token_row()[idx]  # (M,)
                trained = diag.update(logp, mu, adv, mask, lag=lag, position=torch.from_numpy(position),
                                      entropy=entropy, seq_index=mb.seq_index,
                                      old_logp=logp,  # M2PO what-if: π_old = the audited model
                                      row=torch.from_numpy(rows.global_row[token_row]),
                                      by={name: torch.from_numpy(c[token_row]) for name, c in chunk.by.items()})
                if comparisons is not None:
                    comparisons.update(rows, idx, *chunk.against, logp=logp, seq_index=mb.seq_index)
                picture.update(logp.numpy(), mu.numpy(), adv.numpy(), mask.numpy())
                chunk.add(mb, logp.numpy(), mask.numpy(), trained)  # the trained tokens' diagnostics, reused
                counts += (1, mb.positions, mb.real_positions)
                if writer is not None:  # every response token's diagnostics, trained or not
                    t = token_diagnostics(logp.double(), mu.double(), adv.double(), tr_delta=cfg.tr_delta)
                    writer.gather(writer.batch(rows, idx, logp, entropy, t, chunk, position))
                if progress is not None:
                    progress("per-token log-probs (tokens)", mb.num_tokens, local_tokens)
    finally:
        passes.close()
        if writer is not None:
            writer.close()
    summary = diag.all_reduce_().summary()
    against_section = comparisons.section() if comparisons is not None else None
    checks = check.result() if check is not None else None
    picture.all_reduce_()
    top = worst.all_ranks()
    positions = distributed.all_reduce_sum(torch.from_numpy(counts)).tolist()  # over all ranks
    notes += summary["notes"]
    metrics = {k: v for k, v in summary.items()
               if not isinstance(v, (dict, list)) and not k.startswith("data/")}
    for key in ("reject/token_frac", "reject/seq_frac", "veto/token_frac", "veto/seq_frac", "is/batch_norm_factor",
                "reject/dropped_pos_adv_frac", "veto/dropped_pos_adv_frac",
                "entropy/mean"):  # stable names: null without --reject / --is-veto / --is-batch-norm (entropy/mean:
        metrics.setdefault(key, None)  # without a trained token)
    routing_section = None
    if routing is not None:
        frac, routing_section = routing.result(distributed.all_reduce_sum(torch.from_numpy(routing.counts)).numpy(),
                                               replayed=cfg.replay_routing)
        metrics["moe/routing_mismatch_frac"] = frac
    section = {
        "checkpoint": {"path": str(cfg.model), "policy_version": info.policy_version, "vocab_size": info.vocab_size},
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "tokens": int(summary["data/tokens"]),
        "micro_batches": positions[0],
        "padding_frac": 1.0 - positions[2] / max(positions[1], 1),
        "seconds": round(time.perf_counter() - start, 3),
        "distributions": _distributions(summary),
        "by_lag": _records(summary["breakdowns"]["lag"]),
        "by_mu_bucket": _records(summary["breakdowns"]["mu"], "μ "),
        "by_position": _records(summary["breakdowns"]["position"]),
        "by": summary["breakdowns"]["by"],
        "worst_by": cfg.worst_by,
        "losses": _loss_effects(summary, losses) + _filter_effects(summary, cfg),
        "drpo_what_if": [{"delta": w["delta"], "reachable": w["boundary_reachable"],
                          **{k: v for k, v in w.items() if k not in ("delta", "boundary_reachable")}}
                         for w in summary["what_if"]["drpo"]],
        "worst_sequences": [c["sequence"] for c in top],
        "mu_pi_histogram": picture.to_dict(),
        "worst_tokens": [c["tokens"] for c in top],
        "logging_checks": checks,
        "routing": routing_section,
    }
    if checks is not None:
        notes += checks["findings"] if (checks["offset_suspected"] or checks["temperature_suspected"]) else []
    section["against"] = against_section  # moved to the report's top level by run_inspect
    return section, metrics, current, version_source, notes


@dataclass
class _RowPlan:
    """What the streamed model pass needs of every row before it starts: (N,) arrays in file order."""

    oldest: np.ndarray  # int64, version of the oldest trained token (rollouts.version_range), −1 unknown
    newest: np.ndarray  # int64, version of the newest trained token, −1 unknown
    temperature: np.ndarray  # float32
    trained: np.ndarray  # int64, loss_mask tokens
    tokens: np.ndarray  # int64, response tokens
    piece: np.ndarray  # int64, the Shard piece holding the row

    @classmethod
    def read(cls, source, piece_rows: int, temperature: float | None) -> _RowPlan:
        from drpo_cli.rollouts.files import Shard
        from drpo_cli.rollouts.rows import file_temperature, version_range

        parts: dict[str, list] = {k: [] for k in ("oldest", "newest", "temperature", "trained", "tokens", "piece",
                                                  "start")}
        for sb in source.iter_batches(PLAN_COLUMNS, shard=Shard(0, 1, piece_rows)):
            b, n = sb.batch, sb.batch.num_rows
            names = b.schema.names
            version = (b.column("policy_version").fill_null(-1).to_numpy().astype(np.int64)
                       if "policy_version" in names else np.full(n, -1, dtype=np.int64))  # (n,)
            if "token_policy_versions" in names:  # validated by the data audit: as long as the response
                tokens = b.column("token_policy_versions")
                offsets = tokens.offsets.to_numpy().astype(np.int64)  # (n+1,)
                offsets = offsets - offsets[0]
                mask = (b.column("loss_mask").flatten().fill_null(False).to_numpy(zero_copy_only=False)
                        if "loss_mask" in names else np.ones(int(offsets[-1]), dtype=bool))  # (T,)
                oldest, newest = version_range(tokens.flatten().fill_null(-1).to_numpy(zero_copy_only=False), mask,
                                               offsets, version)
            else:
                oldest = newest = version
            parts["oldest"].append(oldest)
            parts["newest"].append(newest)
            default = file_temperature(next(rf.metadata for rf in source.files if rf.path == sb.path), temperature)
            parts["temperature"].append(b.column("temperature").fill_null(default).to_numpy(zero_copy_only=False)
                                        .astype(np.float32) if "temperature" in names
                                        else np.full(n, default, dtype=np.float32))
            if "loss_mask" in names:
                mask = b.column("loss_mask")
                lengths = np.diff(mask.offsets.to_numpy())  # (n,)
                flat = mask.flatten().fill_null(False).to_numpy(zero_copy_only=False)  # (T,)
                ends = np.cumsum(lengths)
                csum = np.concatenate([[0], np.cumsum(flat, dtype=np.int64)])
                parts["trained"].append(csum[ends] - csum[ends - lengths])
                parts["tokens"].append(lengths.astype(np.int64))
            else:
                parts["trained"].append(None)
                parts["tokens"].append(None)
            parts["piece"].append(np.full(n, sb.piece, dtype=np.int64))
            parts["start"].append(sb.global_offset)
        missing = [i for i, x in enumerate(parts["tokens"]) if x is None]
        if missing:  # files without loss_mask: every response token is trained; read their lengths
            lengths = np.concatenate([np.diff(sb.batch.column("response_ids").offsets.to_numpy()).astype(np.int64)
                                      for sb in source.iter_batches(("response_ids",))])  # (N,) in file order
            for i in missing:
                start = parts["start"][i]
                parts["trained"][i] = parts["tokens"][i] = lengths[start : start + len(parts["piece"][i])]
        del parts["start"]
        cat = {k: np.concatenate(v) if v else np.zeros(0, dtype=np.int64) for k, v in parts.items()}
        return cls(**cat)


class _Chunk:
    """One streamed record batch's rows: per-token lag and position, the log-probs and the per-row sums of
    _SEQ_FEATURES over trained tokens (`worst_by`'s extra value among them) as its passes run."""

    def __init__(self, rows: RolloutRows, current: int | None, check: LoggingCheck | None, worst_by: str,
                 catastrophic: float):
        self.rows = rows
        self.extra, self.extra_reduce, _ = WORST_BY_SCORES[worst_by]
        self.log_catastrophic = math.log(catastrophic)
        self.by: dict[str, np.ndarray] = {}  # --by column -> (n,) each row's value code
        self.token_version = rows.token_versions()  # (T,) −1 unknown
        self.token_lag = _lag(self.token_version, current)  # (T,)
        self.row_lag = _lag(rows.version_range()[0], current)  # (n,) its oldest trained token's
        self.position = rows.token_position()  # (T,)
        self.logp = np.zeros(rows.num_tokens, dtype=np.float32)  # (T,)
        self.seq = np.zeros((rows.num_rows, len(_SEQ_FEATURES)), dtype=np.float64)  # (n, F)
        self.check = check.chunk(rows) if check is not None else None

    def add(self, mb, logp: np.ndarray, mask: np.ndarray, t: dict) -> None:
        """A micro-batch: logp (M,) of its tokens, mask (M,), `t` its trained tokens' diagnostics (Diagnostics.update)."""
        self.logp[mb.token_index.numpy()] = logp
        mask = mask & np.isfinite(logp)  # as Diagnostics.update: a diverged model's tokens are left out
        r = mb.rows.numpy()[mb.seq_index.numpy()][mask]  # (m,) each trained token's row in the batch
        seq, n = self.seq, len(self.seq)
        abs_d = t["delta"].abs().numpy()
        for name, values in (("tokens", np.ones(r.size)), ("harmful", t["harmful"].numpy()),
                             ("outside", t["outside"].numpy()), ("abs_delta", abs_d), ("k3", t["k3"].numpy())):
            seq[:, _F[name]] += np.bincount(r, weights=values, minlength=n)
        np.maximum.at(seq[:, _F["max_abs_delta"]], r, abs_d)
        if self.extra is not None:
            values = _TOKEN_VALUES[self.extra](t, self.log_catastrophic).numpy()
            if self.extra_reduce == "max":
                np.maximum.at(seq[:, _F["extra"]], r, values)
            else:
                seq[:, _F["extra"]] += np.bincount(r, weights=values, minlength=n)


def _lag(version: np.ndarray, current: int | None) -> np.ndarray:
    """current − version where the version is known, else −1 (negative lags count as unknown downstream)."""
    return np.where(version >= 0, (current if current is not None else 0) - version, -1)


class _Worst:
    """The `top` worst sequences seen so far by `--worst-by` (worst_rows' order; ties by row order across the file)."""

    def __init__(self, top: int, by: str = "tr/harmful_frac"):
        self.top, self.score, self.kept = top, WORST_BY_SCORES[by][2], []

    def add(self, chunk: _Chunk) -> None:
        rows, seq = chunk.rows, chunk.seq
        score = self.score(seq)  # (n,)
        means = {name: _mean(seq, name) for name in ("harmful", "outside", "abs_delta", "k3")}  # (n,) each
        order = worst_rows(seq, self.top, score)
        for i, tokens in zip(order, worst_tokens(rows, order, chunk.logp)):
            lag = chunk.row_lag[i]
            self.kept.append({
                "key": (-float(score[i]), -float(seq[i, _F["max_abs_delta"]]), int(rows.global_row[i])),
                "sequence": {"sample_id": rows.sample_ids[i], "tokens": int(seq[i, _F["tokens"]]),
                             "score": float(score[i]), "harmful_frac": float(means["harmful"][i]),
                             "outside_frac": float(means["outside"][i]), "delta_abs_mean": float(means["abs_delta"][i]),
                             "delta_abs_max": float(seq[i, _F["max_abs_delta"]]), "k3_mean": float(means["k3"][i]),
                             "lag": int(lag) if lag >= 0 else None},
                "tokens": tokens})
        self.kept = sorted(self.kept, key=lambda c: c["key"])[: self.top]

    def all_ranks(self) -> list[dict]:
        from drpo_cli.model.distributed import exchange

        return sorted((c for share in exchange(self.kept) for c in share), key=lambda c: c["key"])[: self.top]


def _logprobs(model, mb, device, cfg: InspectConfig, check: LoggingCheck | None = None):
    """(logp (M,), entropy (M,)) on the CPU; feeds `check` the same chunk logits at its temperatures."""
    from drpo_cli.model.logprobs import token_logprobs_at

    select = check.select(mb) if check is not None else torch.zeros(0, dtype=torch.bool)
    temps = check.extra_temperatures if check is not None and bool(select.any()) else ()
    logp, entropy, extra = token_logprobs_at(model, mb.to(device), temps, select, chunk_tokens=cfg.chunk_tokens,
                                             with_entropy=True)
    logp, entropy = logp.float().cpu(), entropy.float().cpu()  # (M,), (M,)
    if check is not None:
        check.update(mb, logp, extra.cpu() if temps else None)
    return logp, entropy


def worst_rows(seq: np.ndarray, top: int, score: np.ndarray | None = None) -> np.ndarray:
    """The `top` rows by `score` (default: harmful share), then max |Δ| (rows without masked tokens left out)."""
    score = _mean(seq, "harmful") if score is None else score
    candidates = np.flatnonzero(seq[:, 0] > 0)
    return candidates[np.lexsort((-seq[candidates, _F["max_abs_delta"]], -score[candidates]))][:top]


def _records(breakdown: dict, prefix: str = "") -> list[dict]:
    return [{"key": prefix + label, **values} for label, values in breakdown.items()]


def _distributions(summary: dict) -> dict:
    def pick(prefix: str, keys: dict) -> dict:
        return {label: summary.get(prefix + key) for label, key in keys.items()}

    q = {"mean": "mean", "p50": "p50", "p90": "p90", "p99": "p99", "p99.9": "p999", "max": "max"}
    return {
        "|Δ| = |π − μ|": pick("delta/abs_", q),
        "r = π/μ": pick("ratio/", q),
        "DRPO weight w": pick("weight/drpo_", {"mean": "mean", "p50": "p50", "p90": "p90", "p99": "p99",
                                               "max": "max"}),
    }


def _loss_effects(summary: dict, losses: dict) -> list[dict]:
    """What each loss would do to these tokens at the hyper-parameters used (SPEC.md §2): its metrics
    (registry.LossSpec.metrics) under their labels."""
    return [{"loss": name, "hparams": dict(hp),
             "fractions": {label: summary.get(metric) for label, metric in LOSSES[name].metrics.items()}}
            for name, hp in losses.items()]


def _filter_effects(summary: dict, cfg: InspectConfig) -> list[dict]:
    """What the OPSM and M2PO filters (usable with any loss) would drop, as rows of the losses table."""
    return [{"loss": "opsm (filter)", "hparams": {"opsm_delta": cfg.resolved_opsm_delta()},
             "fractions": {"dropped": summary.get("opsm/token_drop_frac"),
                           "dropped sequences": summary.get("opsm/seq_drop_frac"), **_positive("dropped", summary, "opsm")}},
            {"loss": "m2po (filter)", "hparams": {"m2po_threshold": cfg.resolved_m2po_threshold()},
             "fractions": {"masked": summary.get("m2po/masked_frac"), **_positive("masked", summary, "m2po")}}]


def _positive(verb: str, summary: dict, ns: str) -> dict:
    """The share with A > 0 of what a mask drops ({ns}/dropped_pos_adv_frac), as a losses-table fraction."""
    return {f"A > 0 among {verb}": summary.get(f"{ns}/dropped_pos_adv_frac")}


class _PerTokenWriter:
    """Streams per-token rows to an Arrow IPC file, one record batch per micro-batch.

    Without a path (torchrun ranks other than 0) it only builds the batches that `gather` sends to
    rank 0, which writes every rank's batch of a pass, in rank order.
    """

    def __init__(self, path: str | None):
        self.sink = pa.OSFile(path, "wb") if path else None
        self.writer = pa.ipc.new_file(self.sink, PER_TOKEN_SCHEMA) if path else None

    def gather(self, batch: pa.RecordBatch | None) -> None:
        """Collective under torchrun (every rank, every pass, None for a filler pass)."""
        from drpo_cli.model.distributed import gather_to_rank0

        for b in gather_to_rank0(batch) or ():
            if b is not None and self.writer is not None:
                self.writer.write_batch(b)

    def batch(self, r: RolloutRows, idx, logp, entropy, t, chunk: _Chunk, position) -> pa.RecordBatch:
        """The per-token rows of tokens `idx` of the streamed batch `r`."""
        sample_ids = pa.array(r.sample_ids, pa.string()).take(pa.array(r.token_row()[idx]))
        columns = [
            sample_ids, position.astype(np.int32), r.response_ids[idx],
            r.loss_mask[idx], logp.numpy(), r.behavior_logprobs[idx], r.advantages[idx],
            t["ratio"].float().numpy(), t["delta"].float().numpy(), t["logr"].float().numpy(),
            t["k3"].float().numpy(), entropy.numpy(), t["outside"].numpy(), t["harmful"].numpy(), chunk.token_lag[idx],
            chunk.token_version[idx],
        ]
        arrays = [c if isinstance(c, pa.Array) else pa.array(c, type=f.type) for c, f in zip(columns, PER_TOKEN_SCHEMA)]
        return pa.RecordBatch.from_arrays(arrays, schema=PER_TOKEN_SCHEMA)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.sink.close()


# ---- logging-bug checks (SPEC.md §2) ------------------------------------------------------------------


class LoggingCheck:
    """Evidence of a sampler that logged log-probs before temperature or after top-p/top-k truncation.

    On fresh rows (lag 0: the current model is the sampler, so log r should be ≈ 0 up to numerics),
    measures the mean log r with its standard error over every fresh token (free: the audit's own
    log-probs), and, on up to FIT_TOKENS of them spread evenly, the log-probs at a few temperatures
    around the logged one (and at T = 1) to see which fits the logged log-probs best (smallest mean
    |log r|). Those come from the audit's own chunk logits (one more log-sum-exp per temperature:
    `logprobs.token_logprobs_at`), so the check adds no pass. Planned from every row's version,
    temperature and trained-token count (so the spread is over the whole file while it streams);
    `chunk(rows)` feeds one streamed batch; sums are global under torchrun. The findings say
    "suggests", never "is".
    """

    def __init__(self, checked_rows: np.ndarray, scope: str, logged_t: float, trained: np.ndarray):
        self.scope, self.logged_t = scope, logged_t
        self.candidates = sorted({round(logged_t * f, 4) for f in (1.0, *TEMPERATURE_FACTORS)} | {1.0})
        # The row's own temperature is the main pass's; every other candidate is an extra log-sum-exp.
        self.own = next((c for c in self.candidates if np.float32(c) == np.float32(logged_t)), None)
        self.extra_temperatures = tuple(c for c in self.candidates if c != self.own)
        self.row_checked = checked_rows  # (N,) bool: the offset check reads every trained token of these rows
        counts = np.where(checked_rows, trained, 0)  # (N,)
        self.first = np.cumsum(counts) - counts  # (N,) ordinal of each row's first checked token
        total = int(counts.sum())
        # The temperature fit: an even spread of FIT_TOKENS over the checked tokens, by ordinal.
        self.fit_ordinals = (np.unique(np.linspace(0, total - 1, min(total, FIT_TOKENS)).round().astype(np.int64))
                             if total else np.zeros(0, dtype=np.int64))
        self.num_rows = int(checked_rows.sum())
        self.fit_sums = np.zeros((len(self.candidates), 3), dtype=np.float64)  # tokens, Σ log r, Σ |log r|
        self.moments = (0, 0.0, 0.0)  # log r of checked tokens at the logged temperature: n, mean, M2

    @classmethod
    def plan(cls, row_lag: np.ndarray, temperature: np.ndarray, trained: np.ndarray,
             keep: np.ndarray) -> LoggingCheck | None:
        """Over every row (N,): the fresh kept rows of the logged temperature, or None when no row is known to be fresh."""
        fresh = keep & (row_lag == 0)
        scope = "lag-0 rows"
        if not fresh.any() and (row_lag[keep] >= 0).any():
            return None
        if not fresh.any():  # staleness unknown everywhere: the check still says something, with a caveat
            fresh, scope = keep.copy(), "all rows (staleness unknown: valid only if the model sampled them)"
        values, counts = np.unique(temperature[fresh], return_counts=True)
        logged_t = float(values[np.argmax(counts)])
        return cls(fresh & (temperature == np.float32(logged_t)), scope, logged_t, trained)

    def chunk(self, rows: RolloutRows) -> _ChunkCheck:
        return _ChunkCheck(self, rows)

    def add_logr(self, x: np.ndarray) -> None:
        """Merge a block's log r into the running (n, mean, M2) (Chan et al.: exact up to rounding)."""
        if x.size == 0:
            return
        mean = float(x.mean())
        self.moments = _merge_moments(self.moments, (x.size, mean, float(((x - mean) ** 2).sum())))

    def result(self) -> dict:
        """The report's `logging_checks` section (global sums under torchrun: a collective)."""
        from drpo_cli.model import distributed

        sums = distributed.all_reduce_sum(torch.from_numpy(self.fit_sums)).numpy()
        fit = [{"temperature": temp, "abs_logr_mean": float(s[2] / s[0]) if s[0] else None,
                "logr_mean": float(s[1] / s[0]) if s[0] else None} for temp, s in zip(self.candidates, sums)]
        n, mean, m2 = 0, 0.0, 0.0
        for share in distributed.exchange(self.moments):  # rank order: the same on every rank
            n, mean, m2 = _merge_moments((n, mean, m2), share)
        mean = mean if n else None
        sem = math.sqrt(m2 / (n - 1) / n) if n > 1 else None
        out = _findings(self.scope, self.num_rows, self.logged_t, self.candidates, fit, n, mean, sem)
        out["fit_tokens"] = int(sums[0, 0])
        return out


def _merge_moments(a: tuple, b: tuple) -> tuple:
    """(n, mean, M2) of the union of two blocks (Chan, Golub & LeVeque's pairwise update)."""
    (na, ma, qa), (nb, mb, qb) = a, b
    n = na + nb
    if n == 0:
        return 0, 0.0, 0.0
    d = mb - ma
    return n, ma + d * nb / n, qa + qb + d * d * na * nb / n


class _ChunkCheck:
    """The logging checks' share of one streamed batch: which tokens are checked and fitted."""

    def __init__(self, check: LoggingCheck, rows: RolloutRows):
        self.check, self.behavior = check, rows.behavior_logprobs
        self.extra_temperatures = check.extra_temperatures
        g, token_row, mask = rows.global_row, rows.token_row(), rows.loss_mask
        before = np.cumsum(mask, dtype=np.int64) - mask  # (T,) trained tokens before each, over the batch
        within = before - before[rows.response_offsets[:-1]][token_row] if rows.num_tokens else before  # in its row
        self.checked = check.row_checked[g][token_row] & mask  # (T,)
        self.fitted = self.checked & np.isin(check.first[g][token_row] + within, check.fit_ordinals)  # (T,)

    def select(self, mb) -> torch.Tensor:
        """(M,) bool: this micro-batch's tokens of the temperature fit (the extra log-sum-exps)."""
        return torch.from_numpy(self.fitted[mb.token_index.numpy()])

    def update(self, mb, logp: torch.Tensor, extra: torch.Tensor | None) -> None:
        """Add a micro-batch: logp (M,) at the rows' temperature, extra (K, M) at the other candidates."""
        idx = mb.token_index.numpy()
        logr = logp.double().numpy() - self.behavior[idx].astype(np.float64)  # (M,)
        self.check.add_logr(logr[self.checked[idx]])
        fit = self.fitted[idx]
        if not fit.any():
            return
        extras = iter(extra.double().numpy()[:, fit] - self.behavior[idx[fit]].astype(np.float64))
        for j, temp in enumerate(self.check.candidates):
            x = logr[fit] if temp == self.check.own else next(extras)
            self.check.fit_sums[j] += (x.size, x.sum(), np.abs(x).sum())


def _findings(scope, num_rows, logged_t, candidates, fit, n, mean, sem) -> dict:
    scored = [f for f in fit if f["abs_logr_mean"] is not None]
    best = min(scored, key=lambda f: f["abs_logr_mean"]) if scored else None
    at_logged = next((f for f in fit if f["temperature"] == round(logged_t, 4)), None)
    offset = mean is not None and sem is not None and abs(mean) > OFFSET_NATS and abs(mean) > 4 * sem
    temp_better = (best is not None and at_logged is not None and best["temperature"] != at_logged["temperature"]
                   and best["abs_logr_mean"] < 0.5 * at_logged["abs_logr_mean"]
                   and at_logged["abs_logr_mean"] - best["abs_logr_mean"] > 0.01)
    findings = []
    if offset:
        direction = ("higher than the model's, as when a sampler logs log-probs renormalised after top-p/top-k "
                     "truncation" if mean < 0 else "lower than the model's")
        findings.append(f"on {scope} the mean log r is {mean:+.4f} ± {sem:.4f} nats over {n} tokens (expected ≈ 0 "
                        f"when the current model sampled them): the logged log-probs are systematically {direction}; "
                        "this suggests a logging mismatch, or that these rows were not sampled by this checkpoint")
    if temp_better:
        findings.append(f"recomputing at T={best['temperature']:g} fits the logged log-probs better than the logged "
                        f"T={logged_t:g} (mean |log r| {best['abs_logr_mean']:.4f} vs {at_logged['abs_logr_mean']:.4f})"
                        + (": this suggests the sampler logged log-probs before applying temperature"
                           if best["temperature"] == 1.0 else ": this suggests a temperature mismatch in logging"))
    if not findings:
        findings.append(f"no sign of a logging bug on {scope}: mean log r {mean:+.4f} over {n} tokens, and the logged "
                        f"temperature T={logged_t:g} fits best among {', '.join(f'{c:g}' for c in candidates)}"
                        if mean is not None and not temp_better and best is not None
                        and best["temperature"] == round(logged_t, 4)
                        else f"no clear evidence of a logging bug on {scope} ({n} tokens)")
    return {"scope": scope, "rows": num_rows, "tokens": n, "logr_mean": mean, "logr_sem": sem,
            "offset_suspected": bool(offset), "logged_temperature": logged_t, "temperature_fit": fit,
            "best_temperature": best["temperature"] if best else None, "temperature_suspected": bool(temp_better),
            "findings": findings}
