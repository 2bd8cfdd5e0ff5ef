"""`drpo inspect`: the staleness and trust-region audit of logged rollouts (SPEC.md §2).

Data-only mode streams canonical record batches and reduces each one with numpy over the flat list
values and offsets (no per-row Python), so memory is bounded by one batch and any file size works.
`DataAudit` holds only sums, extrema, histograms and the per-row values some statistics need at
the end (sample ids; reward and group for group-relative advantages); `merge_` and `all_reduce_`
combine shards: counts, extrema and histograms exactly, float64 sums to rounding. Model mode
(inspect_model.py) adds the per-token diagnostics.

The module is not called `inspect` so that no script run from this directory can shadow the
standard library's `inspect`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from drpo_cli import __version__
from drpo_cli.audit.columns import DATA_COLUMNS, VERSION_COLUMNS, extra_columns
from drpo_cli.base.errors import InputError
from drpo_cli.base.outputs import atomic_file, claimed, write_together
from drpo_cli.base.value_table import ValueTable, breakdown_type_problem
from drpo_cli.config import InspectConfig
from drpo_cli.reports.report_format import (
    INSPECT_REPORT_SCHEMA,
    clean_number,
    evaluate_gates,
    finite_or_null,
    report_json,
    validate_report,
    write_report,
)
from drpo_cli.rollouts.files import RolloutSource, SourceBatch, open_rollouts
from drpo_cli.rollouts.rows import (
    Context,
    context_problem,
    file_temperature,
    kept_response,
    stale_tokens,
    staleness_counts,
    staleness_report,
    too_stale,
    version_range,
)
from drpo_cli.rollouts.rules import (
    EMPTY_RESPONSE,
    NULL_VALUE,
    ROW_RULES,
    RuleBreak,
    length_problem,
    rule_breaks,
)
from drpo_cli.rollouts.schema import REQUIRED, Problem
from drpo_cli.rollouts.validate import file_problems

RARE_MU = 0.01  # "rare sampled token": μ ≤ 0.01 (SPEC.md §2)
LOG_RARE_MU = math.log(RARE_MU)
# Per-row sums of the data audit's --by breakdown (each value's rows): rows, trained tokens, response tokens,
# Σ −log μ, rare tokens and zero-advantage tokens (trained), Σ |A| (trained), Σ reward, rows with a reward.
DATA_BY_FEATURES = ("rows", "tokens", "response_tokens", "neg_logmu", "rare", "zero_adv", "adv_abs", "reward",
                    "rewarded")
Progress = Callable[..., None]  # (phase, advance, total | None), e.g. the CLI's progress bar


def _list_parts(arr: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(offsets (n+1,) from 0, flat values of exactly these rows) of a possibly sliced list array.

    `ListArray.values` ignores a slice's offset (files.py slices large batches zero-copy), so the
    values are cut to the offsets' range here; nothing is copied.
    """
    off = arr.offsets.to_numpy().astype(np.int64)  # (n+1,)
    return off - off[0], arr.values.slice(int(off[0]), int(off[-1] - off[0]))


def _row_sums(per_token: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(n,) sum of a per-token array over each row's range; exact for empty rows (unlike reduceat)."""
    cs = np.zeros(len(per_token) + 1, dtype=np.float64 if per_token.dtype.kind == "f" else np.int64)
    np.cumsum(per_token, out=cs[1:])
    return cs[offsets[1:]] - cs[offsets[:-1]]


def _grow_add(hist: np.ndarray, values: np.ndarray) -> np.ndarray:
    """hist + bincount(values), growing hist as needed."""
    counts = np.bincount(values)
    if len(counts) > len(hist):
        hist = np.concatenate([hist, np.zeros(len(counts) - len(hist), dtype=np.int64)])
    hist[: len(counts)] += counts
    return hist


@dataclass
class Moments:
    """Weighted count, sum, sum of squares, |sum|, min and max: mergeable; the sums are float64, so a
    merge in another order moves only their last bits (count, min and max are exact)."""

    n: float = 0.0
    s: float = 0.0
    s2: float = 0.0
    sabs: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf

    def add(self, x: np.ndarray, w: np.ndarray | None = None) -> None:
        if x.size == 0:
            return
        x64 = x.astype(np.float64, copy=False)
        if w is None:
            self.n += x.size
            self.s += float(x64.sum())
            self.s2 += float(np.dot(x64, x64))
            self.sabs += float(np.abs(x64).sum())
            self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        else:
            keep = w > 0
            if not keep.any():
                return
            self.n += float(w.sum())
            self.s += float(np.dot(w, x64))
            self.s2 += float(np.dot(w, x64 * x64))
            self.sabs += float(np.dot(w, np.abs(x64)))
            self.lo, self.hi = min(self.lo, float(x[keep].min())), max(self.hi, float(x[keep].max()))

    def stats(self) -> dict:
        if self.n == 0:
            return {"count": 0, "mean": None, "std": None, "min": None, "max": None, "abs_mean": None}
        mean = self.s / self.n
        var = max(self.s2 / self.n - mean * mean, 0.0)
        return {"count": int(self.n), "mean": mean, "std": math.sqrt(var), "min": self.lo, "max": self.hi,
                "abs_mean": self.sabs / self.n}


def length_stats(hist: np.ndarray) -> dict:
    """count, mean, min, max and exact p50/p90/p99 of integer lengths from their histogram."""
    n = int(hist.sum())
    if n == 0:
        return {"count": 0, "mean": None, "min": None, "max": None, "p50": None, "p90": None, "p99": None}
    values = np.arange(len(hist))
    cdf = np.cumsum(hist)
    nz = np.flatnonzero(hist)

    def q(p: float) -> int:  # smallest length whose CDF reaches p·n ("lower" quantile)
        return int(np.searchsorted(cdf, max(math.ceil(p * n), 1)))

    return {"count": n, "mean": float(np.dot(values, hist)) / n, "min": int(nz[0]), "max": int(nz[-1]),
            "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


def stat(op: str, default: float = 0):
    """A DataAudit number and how shards combine it: "sum" or "max". The other ops, declared with the
    same metadata key: "moments" (Moments: sums, then min / max), "hist" (a length histogram, summed bin
    by bin), "counter" ({key: count}, summed)."""
    return field(default=default, metadata={"merge": op})


def _length_hist() -> np.ndarray:
    return np.zeros(1, dtype=np.int64)


@dataclass
class DataAudit:
    """Streaming data-only audit (SPEC.md §2): mergeable statistics over masked tokens."""

    # Each statistic is declared once with the way shards combine (all_reduce_): its metadata's "merge".
    rows: int = stat("sum")
    response_tokens: int = stat("sum")
    masked_tokens: int = stat("sum")
    prompt_tokens: int = stat("sum")
    rare_tokens: int = stat("sum")
    neg_logmu_sum: float = stat("sum", 0.0)
    zero_adv_tokens: int = stat("sum")
    zero_adv_rows: int = stat("sum")
    token_id_max: int = stat("max", -1)
    adv: Moments = field(default_factory=Moments, metadata={"merge": "moments"})
    reward: Moments = field(default_factory=Moments, metadata={"merge": "moments"})
    response_len_hist: np.ndarray = field(default_factory=_length_hist, metadata={"merge": "hist"})
    prompt_len_hist: np.ndarray = field(default_factory=_length_hist, metadata={"merge": "hist"})
    # row's oldest trained token's version (-1 unknown) -> rows; token's policy version -> masked tokens
    version_rows: Counter = field(default_factory=Counter, metadata={"merge": "counter"})
    version_tokens: Counter = field(default_factory=Counter, metadata={"merge": "counter"})
    temperature_rows: Counter = field(default_factory=Counter, metadata={"merge": "counter"})
    sample_ids: list[pa.Array] = field(default_factory=list)  # chunks, only for the duplicate check
    # reward + group_id: per-row values kept until the group means are known.
    group_ids: list[pa.Array] = field(default_factory=list)
    group_rewards: list[np.ndarray] = field(default_factory=list)
    group_tokens: list[np.ndarray] = field(default_factory=list)
    adv_sources: set = field(default_factory=set)  # advantage source of each file, SPEC.md §3
    dropped_rows: int = stat("sum")  # left out by --max-lag / --min-version
    dropped_tokens: int = stat("sum")  # their trained tokens
    stale_masked_tokens: int = stat("sum")  # too-stale trained tokens of kept rows, out of the loss mask
    # --truncate (rollouts.fit_context): rows longer than the model's context and what the model pass leaves out
    truncated_rows: int = stat("sum")
    truncation_dropped_rows: int = stat("sum")
    truncated_tokens: int = stat("sum")
    truncated_trained_tokens: int = stat("sum")
    reduced_duplicates: dict | None = None  # duplicate ids over all ranks (set by all_reduce_)
    # --by: {column: the batch column to read} and a DATA_BY_FEATURES table per column, merged by value.
    by_read: dict = field(default_factory=dict)
    by: dict = field(default_factory=dict, metadata={"merge": "table"})
    group_codes: list[dict] = field(default_factory=list)  # reward + group_id: each row's --by codes, until then

    def break_down(self, read: dict[str, str]) -> DataAudit:
        """Break the audit down by the values of these columns ({--by name: batch column}), before any update."""
        self.by_read = dict(read)
        self.by = {name: ValueTable(len(DATA_BY_FEATURES)) for name in read}
        return self

    def drop_stale(self, sb: SourceBatch, current: int | None, max_lag: int | None,
                   min_version: int | None) -> SourceBatch | None:
        """The batch without the rows --max-lag / --min-version leave out and with its too-stale trained
        tokens out of loss_mask (rollouts.stale_tokens; None: no row is left); counts both."""
        b = sb.batch
        if "policy_version" not in b.schema.names and "token_policy_versions" not in b.schema.names:
            return sb
        off, _ = _list_parts(b.column("response_ids"))  # (n+1,)
        per_token = "token_policy_versions" in b.schema.names
        if per_token:
            check_rows(sb, off, VERSION_COLUMNS)
        else:  # the rows' versions first: a batch with none too stale goes on to update() unchanged
            raise_first_break(sb, ("policy_version",))
        drop = None if per_token else too_stale(_row_versions(sb), current, max_lag=max_lag, min_version=min_version)
        if drop is not None and not drop.any():
            return sb
        if not per_token:
            check_batch(sb, off, np.diff(off))
        mask = _loss_mask(sb, off)  # (T,)
        if drop is None:
            tv, _, newest = _versions(sb, off, mask)
            drop, masked = stale_tokens(tv, mask, newest, current, max_lag=max_lag, min_version=min_version)
        else:  # every token has its row's version: whole rows go, none is masked (stale_tokens, cheaper)
            masked = np.zeros(0, dtype=bool)
        dropped_rows, dropped_tokens, masked_tokens, kept = staleness_counts(drop, masked, mask, off)
        self.dropped_rows += dropped_rows
        self.dropped_tokens += dropped_tokens
        self.stale_masked_tokens += masked_tokens
        if kept == 0:
            return None
        if masked_tokens:
            new_mask = pa.ListArray.from_arrays(pa.array(off, pa.int32()), pa.array(mask & ~masked))
            at = b.schema.get_field_index("loss_mask")
            field_ = pa.field("loss_mask", new_mask.type)
            b = b.set_column(at, field_, new_mask) if at >= 0 else b.append_column(field_, new_mask)
        if not dropped_rows:
            return SourceBatch(sb.path, sb.row_offset, b, sb.global_offset, source_rows=sb.source_rows, piece=sb.piece)
        keep = np.flatnonzero(~drop)
        return SourceBatch(sb.path, sb.row_offset, b.filter(pa.array(~drop)), sb.global_offset, source_rows=keep,
                           piece=sb.piece)

    def fit_context(self, sb: SourceBatch, context: Context, truncate: bool) -> None:
        """Rows whose model input exceeds the context: the first is an InputError without --truncate (before
        any weight is loaded), else counted with the tokens the model pass will leave out."""
        b = sb.batch
        off, _ = _list_parts(b.column("response_ids"))  # (n+1,)
        check_batch(sb, off, np.diff(off))
        prompt, response = np.diff(_list_parts(b.column("prompt_ids"))[0]), np.diff(off)  # (n,), (n,)
        keep = kept_response(prompt, response, context.limit)  # (n,)
        over = np.flatnonzero(keep < response)
        if not over.size:
            return
        if not truncate:
            r = int(over[0])
            row = r if sb.source_rows is None else int(sb.source_rows[r])
            raise InputError(str(context_problem(sb.path, sb.row_offset + row, _sample_id(sb, r), int(prompt[r]),
                                                 int(response[r]), context)))
        mask = _loss_mask(sb, off)  # (T,)
        token_row = np.repeat(np.arange(len(keep)), response)  # (T,)
        beyond = np.arange(int(off[-1])) - off[token_row] >= keep[token_row]  # (T,)
        self.truncated_rows += int(((keep > 0) & (keep < response)).sum())
        self.truncation_dropped_rows += int((keep == 0).sum())
        self.truncated_tokens += int(beyond.sum())
        self.truncated_trained_tokens += int((beyond & mask).sum())

    def truncation(self, context: Context | None, truncate: bool) -> dict | None:
        """The report's `data.truncation` (train's `filters.truncation`): what --truncate leaves out."""
        if context is None or not truncate:
            return None
        return {"max_positions": context.limit, "rows_truncated": self.truncated_rows,
                "rows_dropped": self.truncation_dropped_rows, "tokens_dropped": self.truncated_tokens,
                "trained_tokens_dropped": self.truncated_trained_tokens}

    def update(self, sb: SourceBatch, default_temperature: float) -> tuple[int, int]:
        """Add one canonical record batch; returns (rows, masked tokens) for progress."""
        b = sb.batch
        cols = set(b.schema.names)
        n = b.num_rows
        off, ids = _list_parts(b.column("response_ids"))  # (n+1,), (T,)
        lengths = np.diff(off)  # (n,)
        source = advantage_source(cols)
        check_rows(sb, off, audited_columns(source),
                   {"advantage": math.nan, "reward": math.nan, "temperature": default_temperature})
        logmu = _list_parts(b.column("behavior_logprobs"))[1].fill_null(math.nan).to_numpy(zero_copy_only=False)
        mask = None  # (T,) bool
        if "loss_mask" in cols:
            mask = _list_parts(b.column("loss_mask"))[1].fill_null(False).to_numpy(zero_copy_only=False)
        row_masked = lengths if mask is None else _row_sums(mask, off)  # (n,) masked tokens per row
        lm = logmu if mask is None else logmu[mask]  # (M,) masked behavior log-probs
        ids_np = ids.to_numpy(zero_copy_only=False)  # (T,) int64
        p_off = _list_parts(b.column("prompt_ids"))[0]

        self.rows += n
        self.response_tokens += int(off[-1])
        m_total = int(row_masked.sum())
        self.masked_tokens += m_total
        self.prompt_tokens += int(p_off[-1])
        self.rare_tokens += int(np.count_nonzero(lm <= LOG_RARE_MU))
        self.neg_logmu_sum -= float(lm.sum(dtype=np.float64))
        if ids_np.size:
            self.token_id_max = max(self.token_id_max, int(ids_np.max()))
        self.response_len_hist = _grow_add(self.response_len_hist, lengths)
        self.prompt_len_hist = _grow_add(self.prompt_len_hist, np.diff(p_off))

        codes = {name: table.codes(b.column(self.by_read[name])) for name, table in self.by.items()}  # (n,) each
        if codes:
            trained = np.ones(len(logmu), dtype=bool) if mask is None else mask  # (T,)
            per_row = np.zeros((n, len(DATA_BY_FEATURES)))
            per_row[:, 0], per_row[:, 1], per_row[:, 2] = 1.0, row_masked, lengths
            per_row[:, 3] = _row_sums(np.where(trained, -logmu.astype(np.float64), 0.0), off)
            per_row[:, 4] = _row_sums(trained & (logmu <= LOG_RARE_MU), off)
            for name, table in self.by.items():
                table.add(codes[name], per_row)
        self._update_advantage(sb, source, lengths, mask, row_masked, codes)
        # Lags per token: a row counts at its oldest trained token's version, each trained token at its own.
        if "token_policy_versions" in cols:
            tv, oldest, _ = _versions(sb, off, np.ones(len(logmu), dtype=bool) if mask is None else mask)  # (T,), (n,)
            self.version_rows.update(_value_counts(oldest))
            self.version_tokens.update(_value_counts(tv if mask is None else tv[mask]))
        else:  # every token at its row's version: counted per row
            uniq, inverse = np.unique(_row_versions(sb), return_inverse=True)
            self.version_rows.update(dict(zip(uniq.tolist(), np.bincount(inverse).tolist())))
            self.version_tokens.update(dict(zip(uniq.tolist(), np.bincount(
                inverse, weights=row_masked).astype(np.int64).tolist())))
        temps = (b.column("temperature").fill_null(default_temperature).to_numpy(zero_copy_only=False)
                 if "temperature" in cols else np.full(n, default_temperature, dtype=np.float32))
        t_uniq, t_counts = np.unique(temps, return_counts=True)
        self.temperature_rows.update(dict(zip(t_uniq.tolist(), t_counts.tolist())))
        if "sample_id" in cols:
            self.sample_ids.append(pa.concat_arrays([b.column("sample_id").drop_null()]))  # own copy
        return n, m_total

    def _update_advantage(self, sb, source, lengths, mask, row_masked, codes: dict) -> None:
        b = sb.batch
        self.adv_sources.add(source)
        if source == "advantages":
            adv = _list_parts(b.column("advantages"))[1].fill_null(math.nan).to_numpy(zero_copy_only=False)  # (T,)
            am = adv if mask is None else adv[mask]  # (M,)
            self.adv.add(am)
            zero = am == 0  # (M,)
            self.zero_adv_tokens += int(np.count_nonzero(zero))
            m_off = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(row_masked, out=m_off[1:])
            self.zero_adv_rows += int(np.count_nonzero(_row_sums(~zero, m_off) == 0))
            self._add_by(codes, {5: _row_sums(zero, m_off), 6: _row_sums(np.abs(am.astype(np.float64)), m_off)})
            return
        if source == "advantage":
            values = _scalar(sb, "advantage")  # (n,)
            self._add_row_advantages(values, row_masked, codes)
            return
        reward = _scalar(sb, "reward")  # (n,)
        group = b.column("group_id")
        self.reward.add(reward)
        self.group_ids.append(pa.concat_arrays([group]))
        self.group_rewards.append(reward)
        self.group_tokens.append(np.asarray(row_masked, dtype=np.int64))
        self.group_codes.append(codes)
        self._add_by(codes, {7: reward.astype(np.float64), 8: np.ones(len(reward))})

    def _add_row_advantages(self, values: np.ndarray, row_masked: np.ndarray, codes: dict) -> None:
        """Per-sequence advantages (n,), broadcast over each row's masked tokens (n,); `codes` their --by values."""
        w = row_masked.astype(np.float64)
        self.adv.add(values, w)
        zero = values == 0
        self.zero_adv_tokens += int(row_masked[zero].sum())
        self.zero_adv_rows += int(np.count_nonzero(zero | (row_masked == 0)))
        self._add_by(codes, {5: np.where(zero, w, 0.0), 6: np.abs(values.astype(np.float64)) * w})

    def _add_by(self, codes: dict, columns: dict[int, np.ndarray]) -> None:
        """Add per-row values (n,) to the DATA_BY_FEATURES columns given ({index: values}) of every --by table."""
        for name, table in self.by.items():
            per_row = np.zeros((len(codes[name]), len(DATA_BY_FEATURES)))
            for j, values in columns.items():
                per_row[:, j] = values
            table.add(codes[name], per_row)

    def finish_groups(self, exchange=None) -> None:
        """reward + group_id: A = R − mean of R over the group (SPEC.md §1), then the token statistics.

        With `exchange` (an all-gather under torchrun; every rank calls it) group sums are over all ranks.
        """
        if not self.group_ids and exchange is None:
            return
        table = pa.table({"g": pa.chunked_array(self.group_ids, pa.string()),
                          "r": np.concatenate(self.group_rewards) if self.group_rewards else np.zeros(0)})
        means = table.group_by("g").aggregate([("r", "count"), ("r", "sum")])  # columns r_count, r_sum, g
        if exchange is not None:  # a group may span ranks: add every rank's partial sums
            means = pa.concat_tables(exchange(means)).group_by("g").aggregate([("r_count", "sum"), ("r_sum", "sum")])
            means = pa.table({"g": means.column("g"), "r_count": means.column("r_count_sum"),
                              "r_sum": means.column("r_sum_sum")})
        if not self.group_ids:
            return
        at = pc.index_in(table.column("g"), value_set=means.column("g")).to_numpy()  # (N,)
        mean_of_row = (means.column("r_sum").to_numpy() / means.column("r_count").to_numpy())[at]  # (N,)
        rewards = table.column("r").to_numpy()
        codes = {name: np.concatenate([c[name] for c in self.group_codes]) for name in self.by}
        self._add_row_advantages((rewards - mean_of_row).astype(np.float32), np.concatenate(self.group_tokens), codes)
        self.group_ids, self.group_rewards, self.group_tokens, self.group_codes = [], [], [], []

    @classmethod
    def statistics(cls, op: str) -> list[str]:
        """The names of the statistics that combine with `op`, in declaration order."""
        return [f.name for f in fields(cls) if f.metadata.get("merge") == op]

    def flat(self, op: str) -> list[float]:
        """The values that combine by "sum" or by "max": the numbers of that op, then each Moments' part
        (its four sums; −min and max, so that every part combines by max)."""
        values = [float(getattr(self, name)) for name in self.statistics(op)]
        for m in (getattr(self, name) for name in self.statistics("moments")):
            values += [m.n, m.s, m.s2, m.sabs] if op == "sum" else [-m.lo, m.hi]
        return values

    def set_flat(self, op: str, values: list[float]) -> None:
        """The inverse of flat(op): the combined values back into the statistics."""
        names = self.statistics(op)
        for name, v in zip(names, values):
            setattr(self, name, type(getattr(self, name))(v))
        rest = iter(values[len(names):])
        for m in (getattr(self, name) for name in self.statistics("moments")):
            if op == "sum":
                m.n, m.s, m.s2, m.sabs = next(rest), next(rest), next(rest), next(rest)
            else:
                m.lo, m.hi = -next(rest), next(rest)

    def all_reduce_(self) -> None:
        """Sum this rank's audit with every other rank's in place (one call; no-op in one process).

        Exact whatever the split of rows: group means are taken over every rank's rows of the group
        (call it before finish_groups), and duplicate sample ids are found across ranks. Every
        statistic combines by the op it is declared with (`stat`).
        """
        from drpo_cli.model.distributed import is_distributed

        if not is_distributed():
            return
        import torch

        from drpo_cli.model.distributed import all_reduce_max, all_reduce_sum, exchange

        self.finish_groups(exchange)
        self.reduced_duplicates = self._duplicates_across(exchange)
        self.sample_ids = []
        for op, reduce in (("sum", all_reduce_sum), ("max", all_reduce_max)):
            self.set_flat(op, reduce(torch.tensor(self.flat(op), dtype=torch.float64)).tolist())
        hists = self.statistics("hist")
        sizes = all_reduce_max(torch.tensor([len(getattr(self, name)) for name in hists], dtype=torch.int64))
        for name, size in zip(hists, sizes.tolist()):
            h = torch.zeros(size, dtype=torch.int64)
            own = getattr(self, name)
            h[: len(own)] = torch.from_numpy(own)
            setattr(self, name, all_reduce_sum(h).numpy())
        for name in self.statistics("counter"):
            setattr(self, name, Counter(_all_reduce_counter(dict(getattr(self, name)))))
        for table in self.by.values():
            table.merge(exchange)

    def _duplicates_across(self, exchange, examples: int = 5) -> dict:
        """duplicates() over every rank's ids: 8-byte hashes go to every rank, then only the ids whose
        hash repeats (the candidates) are gathered and counted exactly."""
        from drpo_cli.rollouts.validate import hash_strings

        ids = pa.chunked_array(self.sample_ids, type=pa.string()).combine_chunks()
        mine = hash_strings(ids)  # (n,)
        every = np.sort(np.concatenate(exchange(mine)))
        repeated = np.unique(every[1:][every[1:] == every[:-1]])
        candidates = ids.filter(pa.array(np.isin(mine, repeated))) if repeated.size else pa.array([], pa.string())
        gathered = pa.concat_arrays(exchange(candidates))
        return DataAudit(sample_ids=[gathered]).duplicates(examples)

    def duplicates(self, examples: int = 5) -> dict:
        """Rows whose sample_id repeats an earlier row's, distinct repeated ids, the first few ids in sort order."""
        if self.reduced_duplicates is not None:
            return self.reduced_duplicates
        if not self.sample_ids:
            return {"rows": 0, "ids": 0, "examples": []}
        counts = pc.value_counts(pa.chunked_array(self.sample_ids, type=pa.string()))
        c = counts.field("counts").to_numpy()
        repeated = np.flatnonzero(c > 1)
        values = counts.field("values")
        return {"rows": int((c[repeated] - 1).sum()), "ids": int(repeated.size),
                "examples": sorted(values.take(pa.array(repeated)).to_pylist())[:examples]}

    def lag_section(self, current_version: int | None, source: str) -> dict:
        known = sorted(v for v in set(self.version_rows) | set(self.version_tokens) if v >= 0)
        if current_version is None and known:
            current_version, source = known[-1], "data-max"
        hist = [{"lag": current_version - v, "rows": int(self.version_rows[v]), "tokens": int(self.version_tokens[v])}
                for v in reversed(known)] if current_version is not None else []
        return {"current_version": current_version, "version_source": source if current_version is not None
                else "unknown", "rows_without_version": int(self.version_rows.get(-1, 0)), "histogram": hist}

    def section(self, current_version: int | None, version_source: str) -> dict:
        """The report's `data` section."""
        self.finish_groups()
        m = self.masked_tokens
        adv = {k: clean_number(v) for k, v in self.adv.stats().items()}
        reward = None
        if self.reward.n:
            reward = {k: clean_number(v) for k, v in self.reward.stats().items()}
        return {
            "rows": self.rows, "response_tokens": self.response_tokens, "masked_tokens": m,
            "prompt_tokens": self.prompt_tokens,
            "response_length": length_stats(self.response_len_hist),
            "prompt_length": length_stats(self.prompt_len_hist),
            "behavior": {"neg_logmu_mean": self.neg_logmu_sum / m if m else None,
                         "rare_frac": self.rare_tokens / m if m else None, "rare_threshold": RARE_MU},
            "advantage": {"source": self.adv_sources.pop() if len(self.adv_sources) == 1 else "mixed", "stats": adv, "zero_frac": self.zero_adv_tokens / m if m else None,
                          "zero_rows": self.zero_adv_rows},
            "reward": reward,
            "lag": self.lag_section(current_version, version_source),
            "duplicate_sample_ids": self.duplicates(),
            "token_id_max": self.token_id_max if self.token_id_max >= 0 else None,
            "temperatures": [{"temperature": float(str(np.float32(t))), "rows": int(c)}
                             for t, c in sorted(self.temperature_rows.items())],
            "by": {name: [_by_record(value, sums) for value, sums in table.items()] for name, table in self.by.items()},
        }

    def staleness_filter(self, cfg: InspectConfig, current: int | None) -> dict:
        """The report's `data.staleness_filter` (train's `filters.staleness`): what --max-lag / --min-version left out."""
        return staleness_report(cfg.max_lag, cfg.min_version, current,
                                [self.dropped_rows, self.dropped_tokens, self.stale_masked_tokens, self.rows,
                                 int(self.version_rows.get(-1, 0))])


def _by_record(value, sums: np.ndarray) -> dict:
    """One value's entry of `data.by.COLUMN` from its DATA_BY_FEATURES sums."""
    rows, tokens, response, neg_logmu, rare, zero_adv, adv_abs, reward, rewarded = (float(x) for x in sums)

    def per(x: float, n: float) -> float | None:
        return x / n if n > 0 else None

    return {"value": value, "rows": int(rows), "tokens": int(tokens), "response_len_mean": per(response, rows),
            "neg_logmu_mean": per(neg_logmu, tokens), "rare_token_frac": per(rare, tokens),
            "zero_adv_frac": per(zero_adv, tokens), "adv_abs_mean": per(adv_abs, tokens),
            "reward_mean": per(reward, rewarded)}


def data_metrics(section: dict) -> dict:
    """The data/* metrics of the report (SPEC.md §2 data-only audit), from the data section."""
    m = section["masked_tokens"]
    lag = section["lag"]
    stale = sum(h["tokens"] for h in lag["histogram"] if h["lag"] > 0)
    return {
        "data/rows": section["rows"],
        "data/tokens": m,
        "data/response_tokens": section["response_tokens"],
        "data/zero_adv_frac": section["advantage"]["zero_frac"] or 0.0,
        "data/rare_token_frac": section["behavior"]["rare_frac"] or 0.0,
        "data/neg_logmu_mean": section["behavior"]["neg_logmu_mean"] or 0.0,
        "data/adv_abs_mean": section["advantage"]["stats"]["abs_mean"] or 0.0,
        "data/response_len_mean": section["response_length"]["mean"] or 0.0,
        "data/response_len_max": section["response_length"]["max"] or 0,
        "data/duplicate_ids": section["duplicate_sample_ids"]["rows"],
        "data/stale_frac": stale / m if m else 0.0,
        "data/lag_max": max((h["lag"] for h in lag["histogram"]), default=0),
    }


# ---- input checks (vectorised; the first problem becomes one InputError line) --------------------


def _sample_id(sb: SourceBatch, r: int) -> str | None:
    b = sb.batch
    if "sample_id" in b.schema.names:
        return b.column("sample_id")[r].as_py()
    return str(sb.global_offset + (r if sb.source_rows is None else int(sb.source_rows[r])))


def _raise_row(sb: SourceBatch, column: str, r: int, expected: str, found) -> None:
    row = r if sb.source_rows is None else int(sb.source_rows[r])  # the file's row, also after a filter
    raise InputError(str(Problem("value", sb.path, column, sb.row_offset + row, expected, str(found),
                                 _sample_id(sb, r))))


def check_batch(sb: SourceBatch, off: np.ndarray, lengths: np.ndarray) -> None:
    b = sb.batch
    for name in REQUIRED:
        col = b.column(name)
        if col.null_count:
            _raise_row(sb, name, int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0]), *NULL_VALUE)
    if lengths.size and lengths.min() < 1:
        _raise_row(sb, "response_ids", int(np.argmin(lengths)), *EMPTY_RESPONSE)
    if b.column("response_ids").values.null_count:
        ids = _list_parts(b.column("response_ids"))[1]
        flat = int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
        _raise_row(sb, "response_ids", int(np.searchsorted(off, flat, "right") - 1), "no null entries",
                   "a null entry")


def audited_columns(source: str) -> list[str]:
    """The columns whose row rules the audit holds a batch to: all but the advantage columns the file's
    advantage source leaves unread (advantage_source)."""
    unread = {"advantages", "advantage", "reward"} - set(source.split("+"))
    return [c for c in ROW_RULES if c not in unread]


def check_rows(sb: SourceBatch, off: np.ndarray, columns, nulls: dict[str, float] | None = None) -> None:
    """The audit's checks of `columns` in one batch, raising the first problem as one line: nulls and empty
    responses (check_batch), then column by column in ROW_RULES' order its length (a per-token column's)
    and its rule (rules.rule_breaks, the walk drpo validate lists every break of); loss_mask's length
    right after behavior_logprobs', which its rule reads it with."""
    b = sb.batch
    names = set(b.schema.names)
    lengths = np.diff(off)  # (n,)
    check_batch(sb, off, lengths)
    for name in ("behavior_logprobs", "loss_mask"):
        if name in names and (name in columns or name == "loss_mask"):
            _check_same_lengths(sb, name, _list_parts(b.column(name))[0], lengths)
    breaks = {br.column: br for br in rule_breaks(b, nulls=nulls, columns=columns)}
    for name in ROW_RULES:
        if name not in columns:
            continue
        if name in ("advantages", "token_policy_versions", "proximal_logprobs") and name in names:
            _check_same_lengths(sb, name, _list_parts(b.column(name))[0], lengths)
        if name in breaks:
            _raise_break(sb, breaks[name])
        if name == "reward" and b.column("group_id").null_count:
            group = b.column("group_id")
            _raise_row(sb, "group_id", int(np.flatnonzero(group.is_null().to_numpy(zero_copy_only=False))[0]),
                       "a group id with every reward", "null")


def raise_first_break(sb: SourceBatch, columns) -> None:
    """Raise for the first value of `columns` that breaks its rule (rules.rule_breaks), if any."""
    br = next(rule_breaks(sb.batch, columns=columns), None)
    if br is not None:
        _raise_break(sb, br)


def _raise_break(sb: SourceBatch, br: RuleBreak) -> None:
    """Raise for the first row of a rule break: its first offending token, or its value (a null, named so)."""
    r = int(br.rows[0])
    if br.tokens is not None:
        _raise_row(sb, br.column, r, f"{br.rule.expected} (token {int(br.tokens[0])})", br.values[0])
    if sb.batch.column(br.column)[r].as_py() is None:
        _raise_row(sb, br.column, r, *NULL_VALUE)
    _raise_row(sb, br.column, r, br.rule.expected, br.values[0])


def _loss_mask(sb: SourceBatch, off: np.ndarray) -> np.ndarray:
    """(T,) bool loss_mask of the batch (all 1 without the column), its lengths checked."""
    b = sb.batch
    if "loss_mask" not in b.schema.names:
        return np.ones(int(off[-1]), dtype=bool)
    m_off, m_vals = _list_parts(b.column("loss_mask"))
    _check_same_lengths(sb, "loss_mask", m_off, np.diff(off))
    return m_vals.fill_null(False).to_numpy(zero_copy_only=False)


def _value_counts(values: np.ndarray) -> dict[int, int]:
    """{value: count} of an int64 array (a bincount over its range when small: versions are few)."""
    if values.size == 0:
        return {}
    lo, hi = int(values.min()), int(values.max())
    if hi - lo >= 1 << 20:
        uniq, counts = np.unique(values, return_counts=True)
        return dict(zip(uniq.tolist(), counts.tolist()))
    counts = np.bincount(values - lo)
    present = np.flatnonzero(counts)
    return dict(zip((present + lo).tolist(), counts[present].tolist()))


def _row_versions(sb: SourceBatch) -> np.ndarray:
    """(n,) policy_version of each row of the batch, −1 unknown (null or no column)."""
    b = sb.batch
    pv = (b.column("policy_version").fill_null(-1).to_numpy() if "policy_version" in b.schema.names
          else np.full(b.num_rows, -1, dtype=np.int64))  # (n,)
    return pv


def _versions(sb: SourceBatch, off: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token versions (T,), oldest (n,), newest (n,) trained token's version) of the batch (rollouts.version_range):
    token_policy_versions where the file has it, else each row's policy_version (check_rows checks them first)."""
    b = sb.batch
    pv = _row_versions(sb)  # (n,)
    if "token_policy_versions" not in b.schema.names:
        tv = np.repeat(pv, np.diff(off))
    else:
        v_vals = _list_parts(b.column("token_policy_versions"))[1]
        tv = v_vals.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)  # (T,)
    oldest, newest = version_range(tv, mask, off, pv)
    return tv, oldest, newest


def _check_same_lengths(sb: SourceBatch, column: str, other_off: np.ndarray, lengths: np.ndarray) -> None:
    col = sb.batch.column(column)
    if col.null_count:  # a null list: named as such, not as a list of length 0
        _raise_row(sb, column, int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0]), *NULL_VALUE)
    other = np.diff(other_off)
    if not np.array_equal(other, lengths):
        r = int(np.flatnonzero(other != lengths)[0])
        _raise_row(sb, column, r, *length_problem("response_ids", lengths[r], other[r]))


def _scalar(sb: SourceBatch, column: str) -> np.ndarray:
    return sb.batch.column(column).fill_null(math.nan).to_numpy(zero_copy_only=False)  # (n,) (check_rows: finite)


def _all_reduce_counter(counts: dict) -> dict:
    """Sum {key: count} dicts over ranks (keys gathered first)."""
    import torch.distributed as dist

    from drpo_cli.model.distributed import world_size

    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, counts)
    total: Counter = Counter()
    for c in gathered:
        total.update(c)
    return dict(total)


# ---- orchestration ---------------------------------------------------------------------------------


def advantage_source(columns) -> str | None:
    """Which advantage source a file's canonical columns give, in load_rows' order (SPEC.md §3)."""
    if "advantages" in columns:
        return "advantages"
    if "advantage" in columns:
        return "advantage"
    if "reward" in columns and "group_id" in columns:
        return "reward+group_id"
    return None


def check_source(source: RolloutSource) -> None:
    """Schema-level checks before streaming (validate.file_problems): InputError listing them all."""
    problems = file_problems(source)
    if problems:
        raise InputError(str(problems[0]), details=[str(p) for p in problems[1:]])


def resolve_by(source: RolloutSource, names) -> dict[str, str]:
    """{--by name: the batch column holding it}: a schema column (or one renamed to it with --column) by its
    canonical name, any other column of the files as logged. InputError (one line: file, column, expected,
    found) when a file lacks it or it is not a string or integer column, before any work."""
    from drpo_cli.rollouts.schema import COLUMN_BY_NAME

    read = {}
    for name in names:
        canonical = source.column_map.get(name, name)
        for rf in source.files:
            if canonical in COLUMN_BY_NAME:
                found = COLUMN_BY_NAME[canonical].arrow_type if canonical in rf.present else None
            else:
                index = rf.schema.get_field_index(name)  # −1 when missing (or named twice)
                found = rf.schema.field(index).type if index >= 0 else None
            expected = "a string or integer column to break the audit down by (--by)"
            if found is None:
                raise InputError(f"{rf.path}: column {name}: expected {expected}, found no such column "
                                 f"(columns: {', '.join(rf.schema.names)})")
            problem = breakdown_type_problem(found)
            if problem is not None:
                raise InputError(f"{rf.path}: column {name}: expected {expected}, found {problem}")
        read[name] = canonical if canonical in COLUMN_BY_NAME else name
    return read


def filter_version(source: RolloutSource, cfg: InspectConfig) -> int | None:
    """The current version --max-lag counts from, known before streaming: --current-version, else the
    checkpoint's recorded version, else the newest policy_version in the data (one pass over that column)."""
    if cfg.max_lag is None:
        return cfg.current_version
    if cfg.current_version is not None:
        return cfg.current_version
    if cfg.model is not None:
        from drpo_cli.model.checkpoint import read_policy_version

        version = read_policy_version(cfg.model)
        if version is not None:
            return version
    newest = -1
    for sb in source.iter_batches(VERSION_COLUMNS):
        names = sb.batch.schema.names
        if "token_policy_versions" in names:  # the newest trained token (the audit's checks come later)
            off, _ = _list_parts(sb.batch.column("token_policy_versions"))
            try:
                raise_first_break(sb, VERSION_COLUMNS)
                _, _, top = _versions(sb, off, _loss_mask(sb, off))
            except InputError:
                continue  # the audit names the problem
            newest = max(newest, int(top.max(initial=-1)))
        elif "policy_version" in names:
            top = pc.max(sb.batch.column("policy_version")).as_py()
            newest = max(newest, -1 if top is None else int(top))
    return newest if newest >= 0 else None


def audit_data(source: RolloutSource, cfg: InspectConfig, progress: Progress | None = None,
               current: int | None = None, shard=None, by: dict[str, str] | None = None,
               context: Context | None = None) -> DataAudit:
    """Stream every record batch through a DataAudit (bounded memory), minus the rows the stale-row filters drop.

    With the model's `context` every kept row's length is checked against it (DataAudit.fit_context).

    Under torchrun (`shard`: this rank's pieces, schema.Shard) each rank audits its share and the
    shares are merged exactly; a bad row found by one rank stops every rank with its error.
    """
    check_source(source)
    by = by or {}
    audit = DataAudit().break_down(by)
    temps = {rf.path: file_temperature(rf.metadata, cfg.temperature) for rf in source.files}
    filtering = cfg.max_lag is not None or cfg.min_version is not None
    error = None
    try:
        for sb in source.iter_batches(DATA_COLUMNS, shard=shard, extra=extra_columns(by)):
            if filtering and (sb := audit.drop_stale(sb, current, cfg.max_lag, cfg.min_version)) is None:
                continue
            if context is not None:
                audit.fit_context(sb, context, cfg.truncate)
            _, tokens = audit.update(sb, temps[sb.path])
            if progress is not None:
                progress("reading rollouts (tokens)", tokens, None)
    except InputError as err:
        if shard is None:
            raise
        error = err
    if shard is None:
        audit.finish_groups()
        return audit
    from drpo_cli.model.distributed import agree

    agree(error, "auditing the rollouts")
    audit.all_reduce_()
    return audit


def run_inspect(cfg: InspectConfig, progress: Progress | None = None, per_token_path: str | None = None) -> dict:
    """The whole audit; returns the report dict (validated against its JSON Schema).

    Writes nothing but `per_token_path` (the caller's temporary file) in model mode.
    """
    start = time.perf_counter()
    source = open_rollouts(list(cfg.rollouts), cfg.column_map())
    by = resolve_by(source, cfg.by)  # a missing or unusable --by column is refused before any work
    against = None
    if cfg.against:  # unmatched rows or other tokens are refused before any work too
        from drpo_cli.audit.inspect_against import Against

        against = Against(source, cfg)
    context = None
    if cfg.model is not None:  # a broken model directory is found in seconds, before the data pass
        from drpo_cli.model.checkpoint import check_model, model_context

        context = model_context(check_model(cfg.model, cfg.allow_unsafe_weights), cfg.model)
    shard = _join_ranks(cfg, source)
    filter_current = filter_version(source, cfg)
    audit = audit_data(source, cfg, progress, filter_current, shard, by, context)
    if audit.rows == 0 and audit.dropped_rows:
        raise InputError(f"--max-lag {cfg.max_lag} / --min-version {cfg.min_version}: every one of the "
                         f"{audit.dropped_rows} rows is too stale (current version {filter_current}); nothing is left")
    notes: list[str] = []
    model_section, model_metrics, against_section = None, {}, None
    current, version_source = cfg.current_version, "--current-version"
    if cfg.model is not None:
        from drpo_cli.audit.inspect_model import audit_model

        model_section, model_metrics, current, version_source, model_notes = audit_model(
            cfg, source, progress, per_token_path, shard, by, against, context)
        against_section = model_section.pop("against")
        notes += model_notes
        if model_section.get("logging_checks"):
            model_section["logging_checks"]["findings"].append(logprobs_kind_note(source.metadata))
    elif against is not None:
        from drpo_cli.audit.inspect_against import compare_without_model

        against_section = compare_without_model(cfg, source, against, shard)
    if against_section is not None and against_section["temperature_differs"]:
        notes.append(f"--against: {against_section['temperature_differs']} row(s) were sampled at another temperature "
                     f"in {', '.join(cfg.against)} than in {', '.join(cfg.rollouts)}: their log-probs are of other "
                     "distributions, so B vs A mixes the temperature's effect with the samplers' mismatch")
    data = audit.section(current, version_source)
    data["staleness_filter"] = audit.staleness_filter(cfg, filter_current)
    data["truncation"] = audit.truncation(context, cfg.truncate)
    notes = data_notes(data, source.metadata) + notes
    metrics = {k: clean_number(v) for k, v in {**data_metrics(data), **model_metrics}.items()}
    report = {
        "report": "drpo-inspect",
        "report_version": 1,
        "drpo_version": __version__,
        "mode": "model" if cfg.model is not None else "data",
        "inputs": {"rollouts": list(cfg.rollouts), "model": cfg.model, "columns": cfg.column_map()},
        "settings": {"tr_delta": cfg.tr_delta, "deltas": list(cfg.deltas), "chosen_delta": cfg.chosen_delta(),
                     "temperature": cfg.temperature, "current_version": cfg.current_version, "top": cfg.top,
                     "device": cfg.device, "dtype": cfg.dtype, "micro_batch_tokens": cfg.micro_batch_tokens,
                     "reject": list(cfg.reject), "max_lag": cfg.max_lag, "min_version": cfg.min_version,
                     "is_veto": cfg.is_veto, "correction": cfg.correction, "is_correction": cfg.is_correction,
                     "is_cap": cfg.is_cap, "is_band": cfg.is_band and list(cfg.is_band), "is_level": cfg.is_level,
                     "is_batch_norm": cfg.is_batch_norm, "reject_mode": cfg.reject_mode, "by": list(cfg.by),
                     "worst_by": cfg.worst_by, "against": list(cfg.against),
                     "seconds": round(time.perf_counter() - start, 3)},
        "metrics": metrics,
        "data": data,
        "model": model_section,
        "against": against_section,
        "notes": notes,
        "gates": evaluate_gates(metrics, cfg.gates()),
    }
    report = finite_or_null(report)  # what the console, the page and the JSON all show
    validate_report(report, INSPECT_REPORT_SCHEMA)
    return report


def _join_ranks(cfg: InspectConfig, source: RolloutSource):
    """Under torchrun: join the process group (the model's device in model mode, else gloo on the
    CPU) and return this rank's share of the rows (files.Shard); None in one process."""
    from drpo_cli.base.launch import launched

    if not launched():
        return None
    import torch

    from drpo_cli.model import distributed
    from drpo_cli.model.logprobs import pick_device

    distributed.init(pick_device(cfg.device) if cfg.model is not None else torch.device("cpu"))
    return distributed.data_shard(source)


def inspect_and_write(cfg: InspectConfig, progress: Progress | None = None) -> dict:
    """Run the audit, then write --per-token, --json and --html atomically (outputs.py), nothing on error.

    Gates are evaluated in the report; raising on a failed gate is the caller's job, after this
    returns, so the report is always written first.
    """
    with claimed(*cfg.paths()):
        return _inspect_and_write(cfg, progress)


def _inspect_and_write(cfg: InspectConfig, progress: Progress | None) -> dict:
    with contextlib.ExitStack() as together:  # every output renamed in at the end, or none (outputs.write_together)
        tmp = together.enter_context(atomic_file(cfg.per_token, "arrow", overwrite=cfg.overwrite)) if cfg.per_token else None
        report = run_inspect(cfg, progress, None if tmp is None else str(tmp))
        files = []
        if cfg.json_out not in (None, "-"):
            files.append(("--json", cfg.json_out, report_json(report), "json"))
        if cfg.html is not None:
            from drpo_cli.reports.html_pages import inspect_page

            files.append(("--html", cfg.html, inspect_page(report), "html"))
        write_together(files, overwrite=cfg.overwrite, stack=together)
    if cfg.json_out == "-":
        write_report(report, "-", overwrite=False)
    return report


def logprobs_kind_note(metadata: dict[str, str]) -> str:
    """What the file says about its log-probs (drpo.logprobs, SPEC.md §3), in one sentence."""
    kind = metadata.get("drpo.logprobs")
    if kind == "raw":
        return ("drpo.logprobs = raw: the sampler logged log-probs before temperature / top-k / top-p, which "
                "are not the sampled distribution at T != 1 or with truncation (vLLM: "
                "logprobs_mode=processed_logprobs)")
    if kind == "processed":
        return "drpo.logprobs = processed: the sampler logged the distribution it sampled from"
    return ("drpo.logprobs is not recorded: make sure the sampler logged processed log-probs (vLLM V1 logs raw "
            "ones unless logprobs_mode=processed_logprobs)")


def data_notes(data: dict, metadata: dict[str, str]) -> list[str]:
    """Plain-language observations about the data alone."""
    notes = []
    dup = data["duplicate_sample_ids"]
    if dup["rows"]:
        notes.append(f"{dup['ids']} sample_id(s) repeat on {dup['rows']} row(s), e.g. {', '.join(dup['examples'][:3])}")
    lag = data["lag"]
    if lag["rows_without_version"]:
        notes.append(f"{lag['rows_without_version']} row(s) have no policy_version; their staleness is unknown")
    if any(h["lag"] < 0 for h in lag["histogram"]):
        notes.append(f"some rows come from a policy newer than the current version {lag['current_version']} "
                     "(negative lag): check --current-version")
    if data["advantage"]["zero_frac"] and data["advantage"]["zero_frac"] > 0.5:
        notes.append(f"{data['advantage']['zero_frac']:.0%} of the tokens have zero advantage and carry no gradient")
    notes.append(logprobs_kind_note(metadata))
    truncation = {k: v for k, v in metadata.items() if k in ("drpo.top_p", "drpo.top_k") and _cuts(k, v)}
    if truncation:
        notes.append("the sampler truncated its distribution (" + ", ".join(f"{k}={v}" for k, v in truncation.items())
                     + "); logged log-probs may be renormalised over the kept tokens")
    return notes


def _cuts(key: str, value: str) -> bool:
    """Whether metadata drpo.top_p / drpo.top_k = `value` truncates the distribution (an unreadable value may)."""
    from drpo_cli.rollouts.writer import truncates

    try:
        return truncates(float(value), None) if key == "drpo.top_p" else truncates(None, int(float(value)))
    except ValueError:
        return True
