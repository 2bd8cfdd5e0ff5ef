"""`drpo inspect --model`: per-token diagnostics of the current model against the logged sampler (SPEC.md §2).

Rows are loaded (and validated) once, grouped into token-budget micro-batches, and their log-probs
computed by the log-prob engine under inference_mode; each micro-batch feeds the mergeable
Diagnostics accumulator, the per-sequence scores and (optionally) the per-token Arrow writer, so
memory holds the rows plus one micro-batch. The logging-bug checks read the log-probs of fresh
(lag 0) rows at a few more temperatures from the same chunk logits and compare them with the logged ones.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pyarrow as pa
import torch

from drpo_cli.config import LOSS_HPARAMS, InspectConfig
from drpo_cli.data import plan_micro_batches
from drpo_cli.divergence import Diagnostics, token_diagnostics
from drpo_cli.outputs import ARROW_MARKER_KEY
from drpo_cli.picture import MuPiHistogram, worst_tokens
from drpo_cli.rollouts import RolloutRows, check_vocabulary, current_version, staleness_filter

WHAT_IF_DELTAS = (0.1, 0.2, 0.5, 12.5)  # DRPO δ sweep shown when --delta is not given (SPEC.md §1)
FIT_TOKENS = 256  # fresh tokens (evenly spread) whose log-probs the logging checks read at other temperatures
TEMPERATURE_FACTORS = (0.8, 0.9, 1.1, 1.25)  # around the logged temperature; T = 1 is always tried
OFFSET_NATS = 0.02  # |mean log r| on fresh tokens above this (and > 4 standard errors) is flagged
PER_TOKEN_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("position", pa.int32()), ("token_id", pa.int64()), ("loss_mask", pa.bool_()),
    ("logp", pa.float32()), ("behavior_logp", pa.float32()), ("advantage", pa.float32()),
    ("ratio", pa.float32()), ("delta", pa.float32()), ("logr", pa.float32()), ("k3", pa.float32()),
    ("entropy", pa.float32()), ("outside", pa.bool_()), ("harmful", pa.bool_()), ("lag", pa.int64()),
], metadata={ARROW_MARKER_KEY: b"per-token"})  # marks the file as drpo's (outputs.py: --overwrite may replace it)
_DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp32": "float32"}
_SEQ_FEATURES = ("tokens", "harmful", "outside", "abs_delta", "max_abs_delta", "k3")


def audit_model(cfg: InspectConfig, source, progress=None, per_token_path: str | None = None):
    """Per-token diagnostics; returns (model section, metrics, current version, version source, notes)."""
    from drpo_cli import distributed
    from drpo_cli.checkpoint import load_model
    from drpo_cli.logprobs import pick_device
    from drpo_cli.rollouts import load_rows

    start = time.perf_counter()
    rows = load_rows(source, temperature=cfg.temperature)
    # Under torchrun: FSDP2 shards the model and each rank audits its share of the rows.
    device = distributed.init(pick_device(cfg.device))
    sharded = distributed.launched()
    if sharded:  # built on the meta device, each rank reads its shards only; the weights keep the loaded dtype
        model, info = distributed.load_sharded_model(cfg.model, device, dtype=_DTYPES[cfg.dtype],
                                                     allow_unsafe=cfg.allow_unsafe_weights)
    else:
        model, info = load_model(cfg.model, device=str(device), dtype=_DTYPES[cfg.dtype],
                                 allow_unsafe=cfg.allow_unsafe_weights)
    check_vocabulary(rows, info.vocab_size, cfg.model)
    current, version_source = current_version(cfg.current_version, info.policy_version, rows.policy_version)
    rows, _ = staleness_filter(rows, current, max_lag=cfg.max_lag, min_version=cfg.min_version)  # as the data audit
    known = rows.policy_version >= 0
    row_lag = np.where(known, (current if current is not None else 0) - rows.policy_version, -1)  # (N,)
    notes = []
    if current is not None and (row_lag[known] < 0).any():
        notes.append(f"{int((row_lag[known] < 0).sum())} row(s) have a policy_version above the current version "
                     f"{current}; their lag is counted as unknown")
    losses = {name: dict(hp) for name, hp in LOSS_HPARAMS.items()}
    losses["drpo"] = {"delta": cfg.chosen_delta()}
    deltas = cfg.deltas or WHAT_IF_DELTAS
    diag = Diagnostics(cfg.tr_delta, losses, drpo_deltas=deltas, reject=cfg.reject_criteria())
    seq = np.zeros((rows.num_rows, len(_SEQ_FEATURES)), dtype=np.float64)  # (N, F) per-sequence sums / max
    token_lag = row_lag[rows.token_row()]  # (T,)
    position = rows.token_position()  # (T,)
    micro_batches = plan_micro_batches(rows, distributed.shard_rows(np.arange(rows.num_rows)), cfg.micro_batch_tokens)
    # Ranks with fewer micro-batches run filler passes (results dropped): FSDP needs equal counts.
    fillers = distributed.filler_passes(rows, len(micro_batches), cfg.micro_batch_tokens)
    # Per-token rows: every rank builds its record batches, rank 0 gathers and writes them.
    writer = _PerTokenWriter(per_token_path, rows) if per_token_path or cfg.per_token is not None else None
    local_tokens = sum(mb.num_tokens for mb in micro_batches)
    check = LoggingCheck.plan(rows, row_lag)  # logging-bug checks, fed by the same passes
    picture = MuPiHistogram()
    logp_all = np.zeros(rows.num_tokens, dtype=np.float32)  # (T,) for the worst sequences' tokens
    try:
        with torch.inference_mode():
            for filler in fillers:
                _logprobs(model, filler, device, cfg)
                if writer is not None:
                    writer.gather(None)
            for mb in micro_batches:
                logp, entropy = _logprobs(model, mb, device, cfg, check)  # (M,), (M,)
                idx = mb.token_index.numpy()  # (M,) flat token indices
                mu = torch.from_numpy(rows.behavior_logprobs[idx])  # (M,)
                adv = torch.from_numpy(rows.advantages[idx])  # (M,)
                mask = torch.from_numpy(rows.loss_mask[idx])  # (M,)
                lag = torch.from_numpy(token_lag[idx])  # (M,)
                diag.update(logp, mu, adv, mask, lag=lag, position=torch.from_numpy(position[idx]), entropy=entropy,
                            seq_index=mb.seq_index)
                picture.update(logp.numpy(), mu.numpy(), adv.numpy(), mask.numpy())
                logp_all[idx] = logp.numpy()
                t = token_diagnostics(logp.double(), mu.double(), adv.double(), tr_delta=cfg.tr_delta)
                _add_sequences(seq, mb.rows.numpy()[mb.seq_index.numpy()], mask.numpy(), t)
                if writer is not None:
                    writer.gather(writer.batch(idx, logp, entropy, t, token_lag[idx], position[idx]))
                if progress is not None:
                    progress("per-token log-probs (tokens)", mb.num_tokens, local_tokens)
    finally:
        if writer is not None:
            writer.close()
    summary = diag.all_reduce_().summary()
    checks = check.result() if check is not None else None
    _all_reduce_sequences(seq)
    picture.all_reduce_()
    if distributed.is_distributed():  # each token was computed by one rank
        logp_all = distributed.all_reduce_sum(torch.from_numpy(logp_all)).numpy()
    positions = distributed.all_reduce_sum(torch.tensor(
        [len(micro_batches), sum(mb.positions for mb in micro_batches),
         sum(mb.real_positions for mb in micro_batches)], dtype=torch.int64)).tolist()  # over all ranks
    notes += summary["notes"]
    metrics = {k: v for k, v in summary.items()
               if not isinstance(v, (dict, list)) and not k.startswith("data/")}
    for key in ("reject/token_frac", "reject/seq_frac"):  # stable names: null without --reject
        metrics.setdefault(key, None)
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
        "losses": _loss_effects(summary, losses),
        "drpo_what_if": [{"delta": w["delta"], "reachable": w["boundary_reachable"],
                          **{k: v for k, v in w.items() if k not in ("delta", "boundary_reachable")}}
                         for w in summary["what_if"]["drpo"]],
        "worst_sequences": worst_sequences(seq, rows, row_lag, cfg.top),
        "mu_pi_histogram": picture.to_dict(),
        "worst_tokens": worst_tokens(rows, worst_rows(seq, cfg.top), logp_all),
        "logging_checks": checks,
    }
    if checks is not None:
        notes += checks["findings"] if (checks["offset_suspected"] or checks["temperature_suspected"]) else []
    return section, metrics, current, version_source, notes


def _logprobs(model, mb, device, cfg: InspectConfig, check: LoggingCheck | None = None):
    """(logp (M,), entropy (M,)) on the CPU; feeds `check` the same chunk logits at its temperatures."""
    from drpo_cli.logprobs import token_logprobs_at

    select = check.select(mb) if check is not None else torch.zeros(0, dtype=torch.bool)
    temps = check.extra_temperatures if check is not None and bool(select.any()) else ()
    logp, entropy, extra = token_logprobs_at(model, mb.to(device), temps, select, chunk_tokens=cfg.chunk_tokens,
                                             with_entropy=True)
    logp, entropy = logp.float().cpu(), entropy.float().cpu()  # (M,), (M,)
    if check is not None:
        check.update(mb, logp, extra.cpu() if temps else None)
    return logp, entropy


def _all_reduce_sequences(seq: np.ndarray) -> None:
    """Combine the ranks' per-row sums (and the max |Δ| column) in place; ranks hold disjoint rows."""
    from drpo_cli import distributed

    if distributed.is_distributed():
        t = torch.from_numpy(seq)  # (N, F), shares memory with seq
        t[:, 4] = distributed.all_reduce_max(t[:, 4].contiguous())
        sums = [j for j in range(seq.shape[1]) if j != 4]
        t[:, sums] = distributed.all_reduce_sum(t[:, sums].contiguous())


def _add_sequences(seq: np.ndarray, token_rows: np.ndarray, mask: np.ndarray, t: dict) -> None:
    """Per-row sums (tokens, harmful, outside, |Δ|, k3) and max |Δ| over masked tokens, in place."""
    r = token_rows[mask]  # (m,)
    abs_d = t["delta"].abs().numpy()[mask]
    for j, values in ((0, np.ones(r.size)), (1, t["harmful"].numpy()[mask]), (2, t["outside"].numpy()[mask]),
                      (3, abs_d), (5, t["k3"].numpy()[mask])):
        np.add.at(seq[:, j], r, values)
    np.maximum.at(seq[:, 4], r, abs_d)


def worst_rows(seq: np.ndarray, top: int) -> np.ndarray:
    """The `top` rows by harmful share, then max |Δ| (rows without masked tokens are left out)."""
    n = seq[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        harmful = np.where(n > 0, seq[:, 1] / n, 0.0)
    candidates = np.flatnonzero(n > 0)
    return candidates[np.lexsort((-seq[candidates, 4], -harmful[candidates]))][:top]


def worst_sequences(seq: np.ndarray, rows: RolloutRows, row_lag: np.ndarray, top: int) -> list[dict]:
    """Per-sequence figures of `worst_rows`."""
    n, order = seq[:, 0], worst_rows(seq, top)
    with np.errstate(invalid="ignore", divide="ignore"):
        harmful = np.where(n > 0, seq[:, 1] / n, 0.0)
    return [{"sample_id": rows.sample_ids[i], "tokens": int(n[i]), "harmful_frac": float(harmful[i]),
             "outside_frac": float(seq[i, 2] / n[i]), "delta_abs_mean": float(seq[i, 3] / n[i]),
             "delta_abs_max": float(seq[i, 4]), "k3_mean": float(seq[i, 5] / n[i]),
             "lag": int(row_lag[i]) if row_lag[i] >= 0 else None} for i in order]


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
    """What each loss would do to these tokens at the hyper-parameters used (SPEC.md §2)."""
    effects = {
        "pg-is": {},
        "ppo-clip": {"clipped": summary.get("ppo_clip/clip_frac")},
        "spo": {"corrective (w<0)": summary.get("weight/spo_corrective_frac"),
                "attenuated (w<0.5)": summary.get("weight/spo_attenuated_frac")},
        "dppo-tv": {"masked": summary.get("dppo_tv/mask_frac")},
        "dppo-kl": {"masked": summary.get("dppo_kl/mask_frac")},
        "drpo": {"corrective (w<0)": summary.get("weight/drpo_corrective_frac"),
                 "attenuated (w<0.5)": summary.get("weight/drpo_attenuated_frac")},
        "gspo": {"clipped": summary.get("gspo/clip_frac"), "clipped sequences": summary.get("gspo/seq_clip_frac")},
        "cispo": {"weight clipped": summary.get("cispo/clip_frac")},
    }
    return [{"loss": name, "hparams": dict(hp), "fractions": effects[name]} for name, hp in losses.items()]


class _PerTokenWriter:
    """Streams per-token rows to an Arrow IPC file, one record batch per micro-batch.

    Without a path (torchrun ranks other than 0) it only builds the batches that `gather` sends to
    rank 0, which writes every rank's batch of a pass, in rank order.
    """

    def __init__(self, path: str | None, rows: RolloutRows):
        self.rows = rows
        self.sample_ids = pa.array(rows.sample_ids, pa.string())
        self.token_row = rows.token_row()
        self.sink = pa.OSFile(path, "wb") if path else None
        self.writer = pa.ipc.new_file(self.sink, PER_TOKEN_SCHEMA) if path else None

    def gather(self, batch: pa.RecordBatch | None) -> None:
        """Collective under torchrun (every rank, every pass, None for a filler pass)."""
        from drpo_cli.distributed import gather_to_rank0

        for b in gather_to_rank0(batch) or ():
            if b is not None and self.writer is not None:
                self.writer.write_batch(b)

    def batch(self, idx, logp, entropy, t, lag, position) -> pa.RecordBatch:
        r = self.rows
        columns = [
            self.sample_ids.take(pa.array(self.token_row[idx])), position.astype(np.int32), r.response_ids[idx],
            r.loss_mask[idx], logp.numpy(), r.behavior_logprobs[idx], r.advantages[idx],
            t["ratio"].float().numpy(), t["delta"].float().numpy(), t["logr"].float().numpy(),
            t["k3"].float().numpy(), entropy.numpy(), t["outside"].numpy(), t["harmful"].numpy(), lag,
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
    `logprobs.token_logprobs_at`), so the check adds no pass. `update` takes each micro-batch's
    share; sums are global under torchrun. The findings say "suggests", never "is".
    """

    def __init__(self, rows: RolloutRows, fresh: np.ndarray, scope: str, logged_t: float):
        self.rows, self.scope, self.logged_t = rows, scope, logged_t
        self.candidates = sorted({round(logged_t * f, 4) for f in (1.0, *TEMPERATURE_FACTORS)} | {1.0})
        # The row's own temperature is the main pass's; every other candidate is an extra log-sum-exp.
        self.own = next((c for c in self.candidates if np.float32(c) == np.float32(logged_t)), None)
        self.extra_temperatures = tuple(c for c in self.candidates if c != self.own)
        row_fresh = np.zeros(rows.num_rows, dtype=bool)  # (N,)
        row_fresh[fresh] = True
        self.checked = row_fresh[rows.token_row()] & rows.loss_mask  # (T,) offset check: every fresh token
        tokens = np.flatnonzero(self.checked)
        self.fitted = np.zeros_like(self.checked)  # (T,) temperature fit: an even spread of FIT_TOKENS
        self.fitted[tokens[np.unique(np.linspace(0, tokens.size - 1, min(tokens.size, FIT_TOKENS)).round()
                                     .astype(np.int64))] if tokens.size else tokens] = True
        self.num_rows = int(fresh.size)
        self.fit_sums = np.zeros((len(self.candidates), 3), dtype=np.float64)  # tokens, Σ log r, Σ |log r|
        self.logr: list[np.ndarray] = []  # log r of checked tokens at the logged temperature

    @classmethod
    def plan(cls, rows: RolloutRows, row_lag: np.ndarray) -> LoggingCheck | None:
        """The fresh rows checked (the logged temperature's), or None when no row is known to be fresh."""
        fresh = np.flatnonzero(row_lag == 0)
        scope = "lag-0 rows"
        if fresh.size == 0 and (row_lag >= 0).any():
            return None
        if fresh.size == 0:  # staleness unknown everywhere: the check still says something, with a caveat
            fresh, scope = np.arange(rows.num_rows), "all rows (staleness unknown: valid only if the model sampled them)"
        temps = rows.temperature[fresh]
        values, counts = np.unique(temps, return_counts=True)
        logged_t = float(values[np.argmax(counts)])
        return cls(rows, fresh[temps == logged_t], scope, logged_t)

    def select(self, mb) -> torch.Tensor:
        """(M,) bool: this micro-batch's tokens of the temperature fit (the extra log-sum-exps)."""
        return torch.from_numpy(self.fitted[mb.token_index.numpy()])

    def update(self, mb, logp: torch.Tensor, extra: torch.Tensor | None) -> None:
        """Add a micro-batch: logp (M,) at the rows' temperature, extra (K, M) at the other candidates."""
        idx = mb.token_index.numpy()
        logr = logp.double().numpy() - self.rows.behavior_logprobs[idx].astype(np.float64)  # (M,)
        self.logr.append(logr[self.checked[idx]])
        fit = self.fitted[idx]
        if not fit.any():
            return
        extras = iter(extra.double().numpy()[:, fit] - self.rows.behavior_logprobs[idx[fit]].astype(np.float64))
        for j, temp in enumerate(self.candidates):
            x = logr[fit] if temp == self.own else next(extras)
            self.fit_sums[j] += (x.size, x.sum(), np.abs(x).sum())

    def result(self) -> dict:
        """The report's `logging_checks` section (global sums under torchrun: a collective)."""
        from drpo_cli import distributed

        sums = distributed.all_reduce_sum(torch.from_numpy(self.fit_sums)).numpy()
        fit = [{"temperature": temp, "abs_logr_mean": float(s[2] / s[0]) if s[0] else None,
                "logr_mean": float(s[1] / s[0]) if s[0] else None} for temp, s in zip(self.candidates, sums)]
        local = np.concatenate(self.logr) if self.logr else np.zeros(0)
        n, total = distributed.all_reduce_sum(torch.tensor([local.size, local.sum()], dtype=torch.float64)).tolist()
        n = int(n)
        mean = total / n if n else None
        # Two-pass spread around the global mean (log r on fresh rows is ≈ 0 ± 1e-7: no Σx² cancellation).
        squares = float(distributed.all_reduce_sum(torch.tensor([((local - (mean or 0.0)) ** 2).sum()],
                                                                dtype=torch.float64))[0])
        sem = math.sqrt(squares / (n - 1) / n) if n > 1 else None
        out = _findings(self.scope, self.num_rows, self.logged_t, self.candidates, fit, n, mean, sem)
        out["fit_tokens"] = int(sums[0, 0])
        return out


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
