"""The row rules of schema v1 (SPEC.md §3): one table, `ROW_RULES`, and one walk of it over a record batch,
`rule_breaks()`. `drpo validate` and RolloutWriter list every break (validate.check_batch); the streaming
audits of inspect and train raise the first (audit/data_audit.py). No torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class RowRule:
    """One rule on rollout values: which values break it, and the message."""

    kind: str  # the problem kind drpo validate counts under
    expected: str
    bad: Callable[[np.ndarray], np.ndarray]  # values -> bool mask of the values that break the rule
    masked: bool = False  # per-token values held to it only where loss_mask is 1
    null: float = 0.0  # what a null value reads as here (nulls are the null checks' to report)


def _not_logprob(v: np.ndarray) -> np.ndarray:
    return ~(np.isfinite(v) & (v <= 0))


def _not_finite(v: np.ndarray) -> np.ndarray:
    return ~np.isfinite(v)


def _negative(v: np.ndarray) -> np.ndarray:
    return v < 0


def _not_temperature(v: np.ndarray) -> np.ndarray:
    return ~(np.isfinite(v) & (v > 0))


# In the order they are walked: the streaming audit names the first break in this order.
ROW_RULES: dict[str, RowRule] = {
    "behavior_logprobs": RowRule("logprob", "finite log-probs <= 0 where loss_mask is 1", _not_logprob, True,
                                 math.nan),
    "proximal_logprobs": RowRule("logprob", "finite log-probs <= 0 where loss_mask is 1", _not_logprob, True,
                                 math.nan),
    "response_ids": RowRule("negative-id", "token ids >= 0", _negative),
    "prompt_ids": RowRule("negative-id", "token ids >= 0", _negative),
    "advantages": RowRule("non-finite", "finite advantages where loss_mask is 1", _not_finite, True, math.nan),
    "advantage": RowRule("non-finite", "a finite number", _not_finite),
    "reward": RowRule("non-finite", "a finite number", _not_finite),
    "policy_version": RowRule("negative-version", "policy versions >= 0 (or null/-1 for unknown)",
                              lambda v: v < -1, null=-1),
    "token_policy_versions": RowRule("negative-version", "policy versions >= 0 where loss_mask is 1", _negative,
                                     True, -1),
    "temperature": RowRule("temperature", "a finite temperature > 0", _not_temperature, null=1.0),
}
NULL_VALUE = ("a value", "null")  # (expected, found) of a null where a value is required
EMPTY_RESPONSE = ("at least one response token", "an empty list")


def length_problem(reference: str, want: int, found: int) -> tuple[str, str]:
    """(expected, found) of a per-token column whose length is not its reference column's."""
    return f"length {want} (as {reference})", f"length {found}"


@dataclass(frozen=True)
class RuleBreak:
    """The rows of one record batch whose values break one column's rule."""

    column: str
    rule: RowRule
    rows: np.ndarray  # (k,) the batch's rows breaking it, ascending
    values: np.ndarray  # (k,) each row's first offending value
    tokens: np.ndarray | None  # (k,) that value's token within its row; None for a per-row column

    def at(self, row: int) -> int:
        """Index into rows/values/tokens of the batch row `row` (one of `rows`)."""
        return int(np.searchsorted(self.rows, row))


def rule_breaks(batch: pa.RecordBatch, aligned: np.ndarray | None = None, nulls: Mapping[str, float] | None = None,
                columns: Iterable[str] | None = None) -> Iterator[RuleBreak]:
    """Walk ROW_RULES in its order over the batch's columns (only `columns`, when given): one RuleBreak per
    column with breaking values, none for a column without.

    A masked rule reads loss_mask (all 1 without it) and so needs each row's tokens lined up with it:
    it sees only the rows `aligned` (n,) bool marks (None: every row) whose column is as long as their
    loss_mask. `nulls` overrides what a null reads as ({column: value}, else RowRule.null). Vectorised
    over the batch; only the breaking rows come back.
    """
    names = set(batch.schema.names)
    only = None if columns is None else set(columns)
    nulls = nulls or {}
    rows_in = np.arange(batch.num_rows) if aligned is None else np.flatnonzero(aligned)  # (n',)
    held = batch if aligned is None or len(rows_in) == batch.num_rows else batch.take(pa.array(rows_in))
    mask = None  # (T',) bool loss_mask over the aligned rows, read once
    mask_lengths = _lengths(held.column("loss_mask")) if "loss_mask" in names else None  # (n',)
    for name, rule in ROW_RULES.items():
        if name not in names or (only is not None and name not in only):
            continue
        fill = nulls.get(name, rule.null)
        arr = batch.column(name)
        if not pa.types.is_list(arr.type):  # per row
            values = _np(arr.fill_null(fill) if arr.null_count else arr)  # (n,)
            rows = np.flatnonzero(rule.bad(values))
            if len(rows):
                yield RuleBreak(name, rule, rows, values[rows], None)
            continue
        row_ids, row_mask = np.arange(batch.num_rows), None  # (n,); (T,) bool
        if rule.masked:
            arr, row_ids = held.column(name), rows_in
            if mask_lengths is not None:
                lined = _lengths(arr) == mask_lengths  # (n',)
                if lined.all():
                    mask = _np(held.column("loss_mask").flatten().fill_null(False)) if mask is None else mask
                    row_mask = mask
                else:  # rows whose tokens do not line up with their loss_mask: the length check's to name
                    keep = pa.array(np.flatnonzero(lined))
                    arr, row_ids = arr.take(keep), rows_in[lined]
                    row_mask = _np(held.column("loss_mask").take(keep).flatten().fill_null(False))
        flat = arr.flatten()
        values = _np(flat.fill_null(fill) if flat.null_count else flat)  # (T,)
        offsets = np.zeros(len(arr) + 1, dtype=np.int64)  # (n+1,)
        np.cumsum(_lengths(arr), out=offsets[1:])
        bad = rule.bad(values)  # (T,)
        if row_mask is not None:
            bad &= row_mask
        tok = np.flatnonzero(bad)
        if not len(tok):
            continue
        local, first = np.unique(np.searchsorted(offsets, tok, side="right") - 1, return_index=True)
        tok = tok[first]  # each row's first breaking token
        yield RuleBreak(name, rule, row_ids[local], values[tok], tok - offsets[local])


def _lengths(arr: pa.Array) -> np.ndarray:
    return _np(arr.value_lengths().fill_null(0)).astype(np.int64)  # (n,)


def _np(arr: pa.Array) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False)
