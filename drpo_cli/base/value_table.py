"""Sums of a few features per value of a column (`drpo inspect --by COLUMN`): memory O(values), not O(rows).

A `ValueTable` maps each value of a string or integer column (null included, as None) to a row of
float64 sums. Each record batch adds its rows by value (`codes` turns the batch's column into row
numbers, growing the table for new values); tables of several ranks merge by value (`merge`), so the
result equals one table fed every row whatever the split. Values come out sorted (strings in natural order, None last), the
same order on every rank and for any world size. No torch: the data audit and the per-token
diagnostics both use it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pyarrow as pa

_DIGITS = re.compile(r"(\d+)")  # split() puts the runs of digits at the odd positions


def _is_breakdown_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)


def breakdown_type_problem(t: pa.DataType) -> str | None:
    """Why a column of type `t` cannot be broken down by (None when it can): strings and integers only."""
    if _is_breakdown_type(t):
        return None
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return f"a list column ({t})"
    return str(t)


class ValueTable:
    """(values, width) float64 sums, one row per distinct value, in order of first appearance."""

    def __init__(self, width: int):
        self.width = width
        self.index: dict = {}  # value -> row of `sums`
        self.sums = np.zeros((0, width), dtype=np.float64)

    def codes(self, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """(n,) int64 row of each entry's value, adding the values not seen yet (null -> None)."""
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode()
        encoded = column.dictionary_encode()
        keys = [self._row(v) for v in encoded.dictionary.to_pylist()]  # the batch's distinct values only
        if column.null_count:
            keys.append(self._row(None))
        lookup = np.asarray(keys, dtype=np.int64)
        idx = encoded.indices.fill_null(len(keys) - 1).to_numpy(zero_copy_only=False).astype(np.int64)
        return lookup[idx] if lookup.size else np.zeros(0, dtype=np.int64)

    def _row(self, value) -> int:
        row = self.index.get(value)
        if row is None:
            row = self.index[value] = len(self.index)
        return row

    def add(self, codes: np.ndarray, features: np.ndarray) -> None:
        """Add (n, width) features of entries whose values are `codes` (n,)."""
        grow = len(self.index) - self.sums.shape[0]
        if grow > 0:
            self.sums = np.concatenate([self.sums, np.zeros((grow, self.width))])
        if codes.size:
            for j in range(self.width):
                self.sums[:, j] += np.bincount(codes, weights=features[:, j], minlength=self.sums.shape[0])

    def merge(self, exchange: Callable[[object], list]) -> None:
        """Sum every rank's table into this one by value (`exchange`: an all-gather of one object, rank order)."""
        shares = exchange((list(self.index), self.sums))
        self.index, self.sums = {}, np.zeros((0, self.width))
        for values, sums in shares:
            rows = np.asarray([self._row(v) for v in values], dtype=np.int64)
            self.add(rows, sums)

    def items(self) -> list[tuple[object, np.ndarray]]:
        """(value, sums) for every value, sorted by value with None last."""
        self.add(np.zeros(0, dtype=np.int64), np.zeros((0, self.width)))  # rows for values seen but not added
        return [(v, self.sums[i]) for v, i in sorted(self.index.items(), key=_order)]


def _order(item: tuple) -> tuple:
    """Sort key: integers, then strings, then None (a column may be integer in one file, string in another).

    Strings in natural order, their runs of digits compared as numbers ("g2" before "g10"; "2" before "10", as
    group_id, a string column in drpo's schema, usually holds integers)."""
    value = item[0]
    if isinstance(value, str):
        return (False, True, tuple(int(p) if k % 2 else p for k, p in enumerate(_DIGITS.split(value))), value)
    return (value is None, False, 0 if value is None else value)
