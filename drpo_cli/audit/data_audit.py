"""`DataAudit`: the data-only audit of `drpo inspect` (SPEC.md §2), streamed one canonical record batch at a time.

Each batch is reduced with numpy over the flat list values and offsets (no per-row Python), so memory is
bounded by one batch and any file size works. The audit holds only sums, extrema, histograms and the
per-row values some statistics need at the end (sample ids; reward and group for group-relative
advantages); `all_reduce_` combines ranks' shares: counts, extrema and histograms exactly, float64 sums to
rounding. Each batch is checked first (checks.py), its first problem one InputError line.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from drpo_cli.audit.checks import (
    advantage_source,
    audited_columns,
    check_batch,
    check_rows,
    list_parts,
    loss_mask,
    raise_first_break,
    row_versions,
    sample_id,
    scalar_values,
    value_counts,
    versions,
)
from drpo_cli.audit.columns import VERSION_COLUMNS
from drpo_cli.base.errors import InputError
from drpo_cli.base.value_table import ValueTable
from drpo_cli.config import InspectConfig
from drpo_cli.reports.report_format import clean_number
from drpo_cli.rollouts.files import SourceBatch
from drpo_cli.rollouts.rows import (
    Context,
    context_problem,
    kept_response,
    stale_tokens,
    staleness_counts,
    staleness_report,
    too_stale,
)

RARE_MU = 0.01  # "rare sampled token": μ ≤ 0.01 (SPEC.md §2)
LOG_RARE_MU = math.log(RARE_MU)
# Per-row sums of the data audit's --by breakdown (each value's rows): rows, trained tokens, response tokens,
# Σ −log μ, rare tokens and zero-advantage tokens (trained), Σ |A| (trained), Σ reward, rows with a reward.
DATA_BY_FEATURES = ("rows", "tokens", "response_tokens", "neg_logmu", "rare", "zero_adv", "adv_abs", "reward",
                    "rewarded")


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
        off, _ = list_parts(b.column("response_ids"))  # (n+1,)
        per_token = "token_policy_versions" in b.schema.names
        if per_token:
            check_rows(sb, off, VERSION_COLUMNS)
        else:  # the rows' versions first: a batch with none too stale goes on to update() unchanged
            raise_first_break(sb, ("policy_version",))
        drop = None if per_token else too_stale(row_versions(sb), current, max_lag=max_lag, min_version=min_version)
        if drop is not None and not drop.any():
            return sb
        if not per_token:
            check_batch(sb, off, np.diff(off))
        mask = loss_mask(sb, off)  # (T,)
        if drop is None:
            tv, _, newest = versions(sb, off, mask)
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
        off, _ = list_parts(b.column("response_ids"))  # (n+1,)
        check_batch(sb, off, np.diff(off))
        prompt, response = np.diff(list_parts(b.column("prompt_ids"))[0]), np.diff(off)  # (n,), (n,)
        keep = kept_response(prompt, response, context.limit)  # (n,)
        over = np.flatnonzero(keep < response)
        if not over.size:
            return
        if not truncate:
            r = int(over[0])
            row = r if sb.source_rows is None else int(sb.source_rows[r])
            raise InputError(str(context_problem(sb.path, sb.row_offset + row, sample_id(sb, r), int(prompt[r]),
                                                 int(response[r]), context)))
        mask = loss_mask(sb, off)  # (T,)
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
        off, ids = list_parts(b.column("response_ids"))  # (n+1,), (T,)
        lengths = np.diff(off)  # (n,)
        source = advantage_source(cols)
        check_rows(sb, off, audited_columns(source),
                   {"advantage": math.nan, "reward": math.nan, "temperature": default_temperature})
        logmu = list_parts(b.column("behavior_logprobs"))[1].fill_null(math.nan).to_numpy(zero_copy_only=False)
        mask = None  # (T,) bool
        if "loss_mask" in cols:
            mask = list_parts(b.column("loss_mask"))[1].fill_null(False).to_numpy(zero_copy_only=False)
        row_masked = lengths if mask is None else _row_sums(mask, off)  # (n,) masked tokens per row
        lm = logmu if mask is None else logmu[mask]  # (M,) masked behavior log-probs
        ids_np = ids.to_numpy(zero_copy_only=False)  # (T,) int64
        p_off = list_parts(b.column("prompt_ids"))[0]

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
            tv, oldest, _ = versions(sb, off, np.ones(len(logmu), dtype=bool) if mask is None else mask)  # (T,), (n,)
            self.version_rows.update(value_counts(oldest))
            self.version_tokens.update(value_counts(tv if mask is None else tv[mask]))
        else:  # every token at its row's version: counted per row
            uniq, inverse = np.unique(row_versions(sb), return_inverse=True)
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
            adv = list_parts(b.column("advantages"))[1].fill_null(math.nan).to_numpy(zero_copy_only=False)  # (T,)
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
            values = scalar_values(sb, "advantage")  # (n,)
            self._add_row_advantages(values, row_masked, codes)
            return
        reward = scalar_values(sb, "reward")  # (n,)
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
