"""The input checks of inspect's streaming data audit: the first problem of a canonical
record batch as one InputError line, in the order the audit has always named them; the row rules come from
rules.rule_breaks, the walk `drpo validate` lists every break of. No torch.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from drpo_cli.audit.columns import DATA_COLUMNS
from drpo_cli.base.errors import InputError
from drpo_cli.rollouts.files import SourceBatch
from drpo_cli.rollouts.rows import version_range
from drpo_cli.rollouts.rules import (
    EMPTY_RESPONSE,
    NULL_VALUE,
    ROW_RULES,
    RuleBreak,
    length_problem,
    rule_breaks,
)
from drpo_cli.rollouts.schema import REQUIRED, TOKEN_COLUMNS, Problem


def list_parts(arr: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(offsets (n+1,) from 0, flat values of exactly these rows) of a possibly sliced list array.

    `ListArray.values` ignores a slice's offset (files.py slices large batches zero-copy), so the
    values are cut to the offsets' range here; nothing is copied.
    """
    off = arr.offsets.to_numpy().astype(np.int64)  # (n+1,)
    return off - off[0], arr.values.slice(int(off[0]), int(off[-1] - off[0]))


def sample_id(sb: SourceBatch, r: int) -> str | None:
    b = sb.batch
    if "sample_id" in b.schema.names:
        return b.column("sample_id")[r].as_py()
    return str(sb.global_offset + (r if sb.source_rows is None else int(sb.source_rows[r])))


def _raise_row(sb: SourceBatch, column: str, r: int, expected: str, found) -> None:
    row = r if sb.source_rows is None else int(sb.source_rows[r])  # the file's row, also after a filter
    raise InputError(str(Problem("value", sb.path, column, sb.row_offset + row, expected, str(found),
                                 sample_id(sb, r))))


def check_batch(sb: SourceBatch, off: np.ndarray, lengths: np.ndarray) -> None:
    b = sb.batch
    for name in REQUIRED:
        col = b.column(name)
        if col.null_count:
            _raise_row(sb, name, int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0]), *NULL_VALUE)
    if lengths.size and lengths.min() < 1:
        _raise_row(sb, "response_ids", int(np.argmin(lengths)), *EMPTY_RESPONSE)
    if b.column("response_ids").values.null_count:
        ids = list_parts(b.column("response_ids"))[1]
        flat = int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
        _raise_row(sb, "response_ids", int(np.searchsorted(off, flat, "right") - 1), "no null entries",
                   "a null entry")


def audited_columns(source: str) -> list[str]:
    """The columns whose row rules the data audit holds a batch to: those it reads (columns.DATA_COLUMNS),
    less the advantage columns the file's advantage source leaves unread (advantage_source)."""
    unread = {"advantages", "advantage", "reward"} - set(source.split("+"))
    return [c for c in ROW_RULES if c in DATA_COLUMNS and c not in unread]


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
            _check_same_lengths(sb, name, list_parts(b.column(name))[0], lengths)
    breaks = {br.column: br for br in rule_breaks(b, nulls=nulls, columns=columns)}
    for name in ROW_RULES:
        if name not in columns:
            continue
        if name in TOKEN_COLUMNS and name != "behavior_logprobs" and name in names:
            _check_same_lengths(sb, name, list_parts(b.column(name))[0], lengths)
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


def loss_mask(sb: SourceBatch, off: np.ndarray) -> np.ndarray:
    """(T,) bool loss_mask of the batch (all 1 without the column), its lengths checked."""
    b = sb.batch
    if "loss_mask" not in b.schema.names:
        return np.ones(int(off[-1]), dtype=bool)
    m_off, m_vals = list_parts(b.column("loss_mask"))
    _check_same_lengths(sb, "loss_mask", m_off, np.diff(off))
    return m_vals.fill_null(False).to_numpy(zero_copy_only=False)


def value_counts(values: np.ndarray) -> dict[int, int]:
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


def row_versions(sb: SourceBatch) -> np.ndarray:
    """(n,) policy_version of each row of the batch, −1 unknown (null or no column)."""
    b = sb.batch
    pv = (b.column("policy_version").fill_null(-1).to_numpy() if "policy_version" in b.schema.names
          else np.full(b.num_rows, -1, dtype=np.int64))  # (n,)
    return pv


def versions(sb: SourceBatch, off: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token versions (T,), oldest (n,), newest (n,) trained token's version) of the batch (rollouts.version_range):
    token_policy_versions where the file has it, else each row's policy_version (check_rows checks them first)."""
    b = sb.batch
    pv = row_versions(sb)  # (n,)
    if "token_policy_versions" not in b.schema.names:
        tv = np.repeat(pv, np.diff(off))
    else:
        v_vals = list_parts(b.column("token_policy_versions"))[1]
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


def scalar_values(sb: SourceBatch, column: str) -> np.ndarray:
    return sb.batch.column(column).fill_null(math.nan).to_numpy(zero_copy_only=False)  # (n,) (check_rows: finite)




def advantage_source(columns) -> str | None:
    """Which advantage source a file's canonical columns give, in load_rows' order (SPEC.md §3)."""
    if "advantages" in columns:
        return "advantages"
    if "advantage" in columns:
        return "advantage"
    if "reward" in columns and "group_id" in columns:
        return "reward+group_id"
    return None
