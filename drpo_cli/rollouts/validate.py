"""`drpo validate`: every problem of the rollout files at once (SPEC.md §3), batch by batch, vectorised over
whole batches (Python touches only offending rows); RolloutWriter checks each batch it writes with the same
`check_batch`. No torch.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from drpo_cli.base.errors import InputError
from drpo_cli.rollouts.files import RolloutFile, RolloutSource, Shard, read_canonical
from drpo_cli.rollouts.rules import EMPTY_RESPONSE, NULL_VALUE, ROW_RULES, length_problem, rule_breaks
from drpo_cli.rollouts.schema import (
    COLUMN_BY_NAME,
    REQUIRED,
    SCHEMA_VERSION,
    TOKEN_COLUMNS,
    Problem,
    type_name,
)

# ---- validation --------------------------------------------------------------------------------


class Problems(list):
    """The problems found, at most `limit` kept as Problem objects; `total` and `counts` count all."""

    def __init__(self, limit: int | None = None):
        super().__init__()
        self.limit = limit
        self.total = 0
        self.counts: Counter[str] = Counter()
        self.files = 0
        self.rows = 0
        self.tokens = 0

    def add(self, problem: Problem) -> None:
        self.total += 1
        self.counts[problem.kind] += 1
        if self.limit is None or len(self) < self.limit:
            self.append(problem)

    def add_rows(self, kind: str, path: str, column: str, rows: np.ndarray, offset: int,
                 sample_ids: pa.Array | None, expected: str | Callable[[int], str],
                 found: str | Callable[[int], str]) -> None:
        """One problem per offending row (local indices `rows` of a batch starting at file row `offset`)."""
        self.total += len(rows)
        self.counts[kind] += len(rows)
        room = len(rows) if self.limit is None else max(self.limit - len(self), 0)
        for i in rows[:room].tolist():
            sid = None if sample_ids is None else sample_ids[i].as_py()
            self.append(Problem(kind, path, column, offset + i,
                                expected(i) if callable(expected) else expected,
                                found(i) if callable(found) else found, sid))

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {kind}" for kind, n in self.counts.most_common())
        return f"{self.total} problem{'s' if self.total != 1 else ''} ({kinds})"


def validate_rollouts(source: RolloutSource, limit: int | None = None, *, shard: Shard | None = None,
                      exchange: Callable[[object], list] | None = None) -> Problems:
    """Check every file, batch by batch, and report every problem at once (SPEC.md §3).

    `limit` bounds how many Problem objects are kept (None: all); `total`/`counts` still count
    everything. The checks are vectorised over whole batches; Python only touches offending rows.
    Under torchrun each rank checks its `shard`'s rows and `exchange` (an all-gather of one object
    per rank) merges them, so every rank returns the same problems a single process finds, in file
    and row order; duplicate ids are found across all ranks' rows.
    """
    out = Problems(limit)
    for problem in source.problems:
        out.add(problem)
    ids = IdHashes()
    rows = Problems(limit)  # row-level problems (this rank's, under a shard)
    pieces = [0]
    for rf in source.files:
        out.files += 1
        for problem in rf.problems:
            out.add(problem)
        check_file(rf, source.column_map, out)
        try:
            for offset, num_rows, batch, cast_problems, _ in read_canonical(rf, None, shard, pieces):
                if batch is None:  # another rank's piece
                    continue
                for problem in cast_problems:
                    rows.add(problem)
                check_batch(rf.path, offset, batch, rows, ids)
                rows.rows += num_rows
        except InputError as err:
            rows.add(Problem("unreadable", rf.path, None, None, "a complete, readable file", err.message))
    share = (list(rows), rows.total, rows.counts, rows.rows, rows.tokens, ids.parts)
    shares = [share] if exchange is None else exchange(share)
    order = {rf.path: i for i, rf in enumerate(source.files)}
    found = sorted({(p.kind, p.file, p.column, p.row, p.expected, p.found, p.sample_id): p
                    for share in shares for p in share[0]}.values(),  # an unreadable file: once
                   key=lambda p: (order.get(p.file, -1), -1 if p.row is None else p.row))
    # Counts of every problem found, less the kept ones (added back one by one below, once each).
    out.total += sum(share[1] - len(share[0]) for share in shares)
    for share in shares:
        out.counts.update(share[2])
        out.counts.subtract(Counter(p.kind for p in share[0]))
    for problem in found:
        out.add(problem)
    out.counts = +out.counts
    out.rows = sum(share[3] for share in shares)
    out.tokens = sum(share[4] for share in shares)
    ids.parts = [part for share in shares for part in share[5]]
    ids.report_duplicates(source, out)
    return out


def file_problems(source: RolloutSource) -> Problems:
    """The checks that read no rows: unopenable files and columns, required columns, an advantage
    source, drpo.* metadata (what validate_rollouts reports before its row pass)."""
    out = Problems()
    for problem in source.problems:
        out.add(problem)
    for rf in source.files:
        for problem in rf.problems:
            out.add(problem)
        check_file(rf, source.column_map, out)
    return out


def check_file(rf: RolloutFile, column_map: dict[str, str], out: Problems) -> None:
    """Schema-level checks: required columns, an advantage source, drpo.* metadata."""
    present = rf.present
    for name in REQUIRED:
        if name not in present:
            logged = [k for k, v in column_map.items() if v == name]
            hint = f" (--column maps '{logged[0]}' to it, but there is no column '{logged[0]}')" if logged else ""
            out.add(Problem("missing-column", rf.path, name, None,
                            f"a column '{name}' ({type_name(COLUMN_BY_NAME[name].arrow_type)}){hint}",
                            f"no such column (file has: {_names(rf.schema)})"))
    if "advantages" in present or "advantage" in present:
        pass
    elif "reward" in present and "group_id" not in present:
        out.add(Problem("reward-without-group", rf.path, "group_id", None,
                        "a group_id column next to reward (advantages are group-relative)", "reward alone"))
    elif not {"reward", "group_id"} <= present:
        out.add(Problem("advantage-source", rf.path, "advantages", None,
                        "one advantage source: advantages, advantage, or reward + group_id", "none of them"))
    version = rf.metadata.get("drpo.schema_version")
    if version is not None and version != SCHEMA_VERSION:
        out.add(Problem("metadata", rf.path, None, None, f'metadata drpo.schema_version "{SCHEMA_VERSION}"',
                        f'"{version}"'))
    kind = rf.metadata.get("drpo.logprobs")
    if kind is not None and kind not in ("processed", "raw"):
        out.add(Problem("metadata", rf.path, None, None, 'metadata drpo.logprobs "processed" or "raw"', f'"{kind}"'))
    temp = rf.metadata.get("drpo.temperature")
    if temp is not None and not _positive_float(temp):
        out.add(Problem("metadata", rf.path, None, None, "metadata drpo.temperature a finite number > 0",
                        f'"{temp}"'))


def _positive_float(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value) and value > 0


def _names(schema: pa.Schema) -> str:
    names = ", ".join(schema.names[:12]) or "no columns"
    return names + (", ..." if len(schema.names) > 12 else "")


_LIST_COLUMNS = ("prompt_ids", "response_ids") + TOKEN_COLUMNS


def check_batch(path: str, offset: int, b: pa.RecordBatch, out: Problems, ids: IdHashes) -> None:
    """Row- and token-level checks of one canonical batch.

    The row rules come from one walk (rules.rule_breaks) and are listed where they always were: a per-token
    rule without loss_mask (token ids) with its column's nulls, the per-row rules after the list lengths,
    the masked per-token rules (on the rows whose tokens line up) last."""
    n = b.num_rows
    names = set(b.schema.names)
    sids = b.column("sample_id") if "sample_id" in names else None

    def report(kind, column, rows, expected, found):
        if len(rows):
            out.add_rows(kind, path, column, rows, offset, sids, expected, found)

    # Nulls and list lengths. `bad` rows are left out of the masked rules, which need every per-token
    # column aligned with the response.
    bad = np.zeros(n, dtype=bool)  # (n,)
    lengths: dict[str, np.ndarray] = {}
    null_rows: dict[str, np.ndarray] = {}
    null_entries: dict[str, np.ndarray] = {}
    for name in b.schema.names:
        arr = b.column(name)
        null_rows[name] = _np(arr.is_null()) if arr.null_count else np.zeros(n, dtype=bool)
        if name not in _LIST_COLUMNS:
            continue
        bad |= null_rows[name]
        lengths[name] = _np(arr.value_lengths().fill_null(0)).astype(np.int64)  # (n,)
        flat = arr.flatten()
        if flat.null_count:
            null_entries[name] = np.unique(_row_of(np.flatnonzero(_np(flat.is_null())), _offsets(lengths[name])))
            bad[null_entries[name]] = True
    ref = next((c for c in ("response_ids",) + TOKEN_COLUMNS if c in lengths), None)
    mismatched: dict[str, np.ndarray] = {}
    if ref is not None:
        for name in TOKEN_COLUMNS:
            if name != ref and name in lengths:
                mismatched[name] = (lengths[name] != lengths[ref]) & ~null_rows[name] & ~null_rows[ref]
                bad |= mismatched[name]
    breaks = {br.column: br for br in rule_breaks(b, aligned=~bad)}

    def report_break(name):
        br = breaks.get(name)
        if br is None:
            return
        if br.tokens is None:
            found = (lambda i: str(br.values[br.at(i)])) if name == "policy_version" else \
                (lambda i: f"{br.values[br.at(i)]:.6g}")
        elif br.rule.masked:
            found = lambda i: f"{br.values[br.at(i)]:.6g} at token {br.tokens[br.at(i)]}"
        else:
            found = lambda i: f"{br.values[br.at(i)]} at token {br.tokens[br.at(i)]}"
        report(br.rule.kind, name, br.rows, br.rule.expected, found)

    for name in b.schema.names:
        report("null", name, np.flatnonzero(null_rows[name]), *NULL_VALUE)
        if name in null_entries:
            report("null", name, null_entries[name], "no null entries", "a null entry")
        if name in _LIST_COLUMNS and name in ROW_RULES and not ROW_RULES[name].masked:
            report_break(name)

    if ref is not None:
        ref_len = lengths[ref]
        if ref == "response_ids":
            out.tokens += int(ref_len.sum())
            report("empty-response", ref, np.flatnonzero((ref_len == 0) & ~null_rows[ref]), *EMPTY_RESPONSE)
        for name, mismatch in mismatched.items():
            report("length-mismatch", name, np.flatnonzero(mismatch),
                   lambda i, r=ref: length_problem(r, ref_len[i], 0)[0],
                   lambda i, c=name: length_problem(ref, 0, lengths[c][i])[1])

    for name in ROW_RULES:
        if name not in _LIST_COLUMNS:
            report_break(name)
    if sids is not None:
        ids.add(sids)
    if "routed_experts" in names and {"prompt_ids", "response_ids"} <= set(lengths):
        _check_routing(b.column("routed_experts"), lengths["prompt_ids"] + lengths["response_ids"] - 1,
                       null_rows["prompt_ids"] | null_rows["response_ids"] | null_rows["routed_experts"], report)
    for name, rule in ROW_RULES.items():
        if rule.masked:
            report_break(name)


def _check_routing(arr: pa.Array, positions: np.ndarray, skip: np.ndarray, report) -> None:
    """routed_experts: prompt + response − 1 positions; each empty or the same number of layers,
    each layer the same number k of ids >= 0, in the whole batch (the checkpoint's config is checked
    against them when a model is loaded)."""
    n_pos = _np(arr.value_lengths().fill_null(0)).astype(np.int64)  # (n,)
    report("length-mismatch", "routed_experts", np.flatnonzero((n_pos != positions) & ~skip),
           lambda i: f"length {positions[i]} (prompt + response - 1 positions)", lambda i: f"length {n_pos[i]}")
    layers = arr.flatten()  # one list of layers per position
    n_layers = _np(layers.value_lengths().fill_null(0)).astype(np.int64)  # (S,)
    sets = layers.flatten()  # one list of ids per (position, layer)
    k = _np(sets.value_lengths().fill_null(0)).astype(np.int64)  # (S·L,)
    ids = _np(sets.flatten().fill_null(-1)).astype(np.int64)
    pos_row = _row_of(np.arange(len(n_layers)), _offsets(n_pos))  # (S,)
    logged = n_layers[n_layers > 0]
    want_l = int(logged[0]) if logged.size else 0
    bad_l = np.unique(pos_row[(n_layers != 0) & (n_layers != want_l)])
    report("routing-shape", "routed_experts", bad_l, f"{want_l} layers (as the batch's first logged position) "
           "or none at every position", "another number of layers")
    want_k = int(k[0]) if k.size else 0
    set_row = np.repeat(pos_row, n_layers)  # (S·L,)
    bad_k = np.setdiff1d(np.unique(set_row[(k != want_k) | (k == 0)]), bad_l)
    report("routing-shape", "routed_experts", bad_k, f"{want_k} expert ids per layer (as the batch's first)",
           "another number")
    neg = np.unique(np.repeat(set_row, k)[ids < 0])
    report("negative-id", "routed_experts", neg, "expert ids >= 0", "a negative or null id")


def _np(arr: pa.Array) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    offs = np.zeros(len(lengths) + 1, dtype=np.int64)  # (n+1,)
    np.cumsum(lengths, out=offs[1:])
    return offs


def _row_of(token_index: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Row of each flat token index, given CSR offsets."""
    return np.searchsorted(offsets, token_index, side="right") - 1


# ---- duplicate sample ids ----------------------------------------------------------------------

_MUL = np.uint64(0x9E3779B97F4A7C15)
_LEN = np.uint64(0xC2B2AE3D27D4EB4F)


def hash_strings(arr: pa.Array) -> np.ndarray:
    """(n,) uint64 polynomial hash of each string, vectorised over the Arrow buffers (no per-row Python)."""
    arr = arr.fill_null("") if arr.null_count else arr
    n = len(arr)
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    _, off_buf, data_buf = arr.buffers()
    offs = np.frombuffer(off_buf, dtype=np.int32, count=n + 1, offset=arr.offset * 4).astype(np.int64)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.empty(0, np.uint8)
    data = data[offs[0] : offs[-1]].astype(np.uint64)  # (C,) bytes of all strings
    rel = offs - offs[0]
    lens = np.diff(rel)  # (n,)
    pos = np.arange(len(data), dtype=np.int64) - np.repeat(rel[:-1], lens)  # (C,) byte position in its string
    powers = np.cumprod(np.full(max(int(lens.max()), 1), _MUL, dtype=np.uint64))  # wraps mod 2^64
    cum = np.zeros(len(data) + 1, dtype=np.uint64)
    np.cumsum((data + np.uint64(1)) * powers[pos], out=cum[1:])
    h = (cum[rel[1:]] - cum[rel[:-1]]) ^ (lens.astype(np.uint64) * _LEN)  # (n,)
    # splitmix64 finaliser: spreads the bits so that sorting finds equal ids only.
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


class IdHashes:
    """8 bytes per row: finds duplicate sample ids across all files, then names them in a second pass."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []

    def add(self, sample_ids: pa.Array) -> None:
        self.parts.append(hash_strings(sample_ids.drop_null()))

    def report_duplicates(self, source: RolloutSource, out: Problems) -> None:
        if not self.parts:
            return
        h = np.sort(np.concatenate(self.parts))
        dup = np.unique(h[1:][h[1:] == h[:-1]])
        if len(dup) == 0:
            return
        first_seen: dict[str, tuple[str, int]] = {}
        for rf in source.files:
            if "sample_id" not in rf.fields:
                continue
            try:
                for offset, _, batch, _, _ in read_canonical(rf, {"sample_id"}):
                    if "sample_id" not in batch.schema.names:
                        continue
                    sids = batch.column("sample_id")
                    for i in np.flatnonzero(np.isin(hash_strings(sids), dup)).tolist():
                        value = sids[i].as_py()
                        if value is None:
                            continue
                        if value in first_seen:
                            f, r = first_seen[value]
                            out.add(Problem("duplicate-sample-id", rf.path, "sample_id", offset + i,
                                            "a unique sample_id", f"the same id as {f} row {r}", value))
                        else:
                            first_seen[value] = (rf.path, offset + i)
            except InputError:
                continue  # already reported as unreadable
