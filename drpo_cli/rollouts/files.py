"""Opening and streaming rollout files (SPEC.md §3): Arrow IPC (file or stream) or Parquet, read one record
batch at a time and cast once to the schema's canonical types, so memory stays bounded by the batch
size, not the file size; `Shard` gives each rank under torchrun its share of the rows. No torch.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from drpo_cli.base.errors import ConfigError, InputError
from drpo_cli.rollouts.schema import (
    COLUMN_BY_NAME,
    ROLLOUT_SUFFIXES,
    Problem,
    accepts,
    is_list,
    type_name,
)

# Rows per streamed batch, and list values (tokens, over every per-token column) per streamed batch:
# together they bound the working memory of casts and checks (a larger record batch written by the
# producer, even one of a whole table, is processed in zero-copy slices within both).
BATCH_ROWS = 4096
BATCH_VALUES = 1 << 22


# ---- opening files -----------------------------------------------------------------------------


@dataclass
class RolloutFile:
    """One opened file: its format, raw schema and which raw field feeds each canonical column."""

    path: str
    format: str  # "ipc-file", "ipc-stream" or "parquet"
    schema: pa.Schema
    metadata: dict[str, str]
    fields: dict[str, int]  # canonical name -> index of the raw field (accepted type only)
    present: set[str] = field(default_factory=set)  # canonical names found, whatever their type
    problems: list[Problem] = field(default_factory=list)  # schema-level problems of this file


@dataclass(frozen=True)
class Shard:
    """One process's share of the rows under torchrun: the files' rows, in order, are cut into pieces
    of at most `piece_rows` consecutive rows (never across a record batch), numbered 0, 1, ... across
    all files; piece p belongs to rank p % world. Each rank converts and holds only its pieces."""

    rank: int
    world: int
    piece_rows: int = BATCH_ROWS

    def owns(self, piece: int) -> bool:
        return piece % self.world == self.rank

    @classmethod
    def of(cls, rank: int, world: int, total_rows: int) -> Shard:
        """About 8 pieces per rank (at most BATCH_ROWS rows each), so ranks get nearly equal shares."""
        return cls(rank, world, max(1, min(BATCH_ROWS, -(-total_rows // (8 * world)))))


@dataclass(frozen=True)
class SourceBatch:
    path: str
    row_offset: int  # index of the batch's first row within `path`
    batch: pa.RecordBatch  # canonical names and types (only the schema columns the file has)
    global_offset: int = 0  # index of the batch's first row across all files, in order
    source_rows: np.ndarray | None = None  # (n,) rows' indices in the unfiltered batch, when rows were left out
    piece: int = 0  # the Shard piece holding the rows (a piece may come as several batches)


@dataclass
class RolloutSource:
    """Opened rollout files, in order. `problems` holds files that could not be opened."""

    files: list[RolloutFile]
    problems: list[Problem]
    column_map: dict[str, str]

    @property
    def metadata(self) -> dict[str, str]:
        """`drpo.*` metadata shared by every file (keys whose value differs between files are left out)."""
        if not self.files:
            return {}
        common = {k: v for k, v in self.files[0].metadata.items() if k.startswith("drpo.")}
        for f in self.files[1:]:
            common = {k: v for k, v in common.items() if f.metadata.get(k) == v}
        return common

    def columns(self) -> set[str]:
        """Canonical columns present (with an accepted type) in at least one file."""
        return {name for f in self.files for name in f.fields}

    def count_rows(self) -> int:
        """Rows over all files, from the files' footers (Arrow IPC file, Parquet) or one pass over one column."""
        total = 0
        for rf in self.files:
            try:
                if rf.format == "parquet":
                    total += pq.ParquetFile(rf.path).metadata.num_rows
                elif rf.format == "ipc-file":
                    with pa.OSFile(rf.path) as fh:
                        total += pa.ipc.open_file(fh).count_rows()
                else:
                    total += sum(item[1] for item in read_canonical(rf, set()))
            except (OSError, pa.ArrowException) as err:
                raise InputError(f"{rf.path}: cannot read its row count (truncated or corrupt file): "
                                 f"{one_line(err)}") from err
        return total

    def iter_batches(self, columns: Iterable[str] | None = None, shard: Shard | None = None,
                     extra: Iterable[str] = ()) -> Iterator[SourceBatch]:
        """Stream every file's record batches with canonical names and types.

        `columns` restricts to those canonical columns (missing ones are simply absent); `shard`
        to this rank's pieces (the others are skipped before any cast or copy); `extra` adds columns
        outside the schema by their logged name, as they are (dictionaries decoded), e.g. `--by env`.
        Raises InputError if a file could not be opened, is truncated, or holds values that
        cannot be cast (run validate_rollouts first for the full list of problems).
        """
        if self.problems:
            raise InputError(f"{len(self.problems)} rollout file(s) could not be read: {self.problems[0]}",
                             details=[str(p) for p in self.problems[1:]])
        wanted = None if columns is None else set(columns)
        global_offset = 0
        pieces = [0]  # running piece number across files (a shard's ownership)
        for rf in self.files:
            rows = 0
            for row_offset, num_rows, batch, cast_problems, piece in read_canonical(rf, wanted, shard, pieces,
                                                                                      tuple(extra)):
                rows = row_offset + num_rows
                if batch is None:  # another rank's piece
                    continue
                if cast_problems:
                    raise InputError(str(cast_problems[0]), details=[str(p) for p in cast_problems[1:]])
                yield SourceBatch(rf.path, row_offset, batch, global_offset + row_offset, piece=piece)
            global_offset += rows


def open_rollouts(paths: str | Path | Iterable[str | Path], column_map: dict[str, str] | None = None,
                  *, strict: bool = True) -> RolloutSource:
    """Expand directories (sorted *.arrow, *.feather, *.ipc, *.parquet) and open every file.

    strict=True raises InputError naming every file that cannot be read; strict=False records
    them in `source.problems` instead (for `drpo validate`, which reports everything at once).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    column_map = dict(column_map or {})
    for canonical in column_map.values():
        if canonical not in COLUMN_BY_NAME:
            raise ConfigError(f"column map target {canonical!r} is not a schema v1 column")
    files: list[RolloutFile] = []
    problems: list[Problem] = []
    expanded = _expand(paths, problems)
    if not expanded and not problems:
        raise InputError("no rollout files given: pass files or directories of *.arrow / *.parquet files")
    for path in expanded:
        rf = _open_file(path, column_map, problems)
        if rf is not None:
            files.append(rf)
    if strict and problems:
        raise InputError(f"cannot read rollouts: {problems[0]}", details=[str(p) for p in problems[1:]])
    return RolloutSource(files, problems, column_map)


def _expand(paths: Iterable[str | Path], problems: list[Problem]) -> list[str]:
    out: list[str] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in ROLLOUT_SUFFIXES)
            if not found:
                problems.append(Problem("no-rollout-files", str(p), None, None,
                                        "a directory holding *.arrow, *.feather, *.ipc or *.parquet files",
                                        "no such file"))
            out.extend(str(q) for q in found)
        elif p.is_file():
            out.append(str(p))
        else:
            problems.append(Problem("unreadable", str(p), None, None, "an existing file or directory",
                                    "no such path"))
    return out


def _detect_format(path: str) -> str | None:
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:6] == b"ARROW1":
        return "ipc-file"
    if head[:4] == b"PAR1":
        return "parquet"
    if head[:4] == b"\xff\xff\xff\xff":  # continuation marker that starts every IPC stream message
        return "ipc-stream"
    return None


def _read_schema(path: str, fmt: str) -> pa.Schema:
    if fmt == "parquet":
        return pq.ParquetFile(path).schema_arrow
    opener = pa.ipc.open_file if fmt == "ipc-file" else pa.ipc.open_stream
    with pa.OSFile(path) as fh:
        return opener(fh).schema


def _open_file(path: str, column_map: dict[str, str], problems: list[Problem]) -> RolloutFile | None:
    try:
        fmt = _detect_format(path)
        if fmt is None:
            problems.append(Problem("unreadable", path, None, None,
                                    "an Arrow IPC (file or stream) or Parquet file", "other content"))
            return None
        schema = _read_schema(path, fmt)
    except (OSError, pa.ArrowException) as err:
        problems.append(Problem("unreadable", path, None, None,
                                "a readable Arrow IPC or Parquet file", one_line(err)))
        return None
    metadata = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in (schema.metadata or {}).items()}
    rf = RolloutFile(path, fmt, schema, metadata, {})
    # A remapped logged column present in this file takes precedence over a raw column already
    # named like its target.
    targets = {column_map[f.name] for f in schema if f.name in column_map}
    seen: dict[str, int] = {}
    for index, fld in enumerate(schema):
        canonical = column_map.get(fld.name, None if fld.name in targets else fld.name)
        if canonical not in COLUMN_BY_NAME:
            continue
        if canonical in seen:
            rf.problems.append(Problem("duplicate-column", path, canonical, None, "one column of this name",
                                       f"{len([f for f in schema if f.name == fld.name]) or 2} columns"))
            rf.fields.pop(canonical, None)
            continue
        seen[canonical] = index
        rf.present.add(canonical)
        spec = COLUMN_BY_NAME[canonical]
        if accepts(spec.arrow_type, fld.type):
            rf.fields[canonical] = index
        else:
            label = canonical if canonical == fld.name else f"{canonical} (logged as '{fld.name}')"
            rf.problems.append(Problem("type", path, label, None, spec.accepts, type_name(fld.type)))
    return rf


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}"


# ---- reading batches ---------------------------------------------------------------------------


def _raw_batches(rf: RolloutFile, indices: list[int]) -> Iterator[tuple[pa.RecordBatch, Callable[[], None]]]:
    """(raw record batch holding only the fields `indices` (in that order), release) per record batch.

    Arrow IPC files are memory-mapped: a record batch is then a view of the file (nothing is read
    until a slice of it is used), so a producer's one huge batch costs no memory by itself, and
    `release()` hands the pages read so far back to the page cache, so that the resident memory
    stays that of the slice at work, not of the file. Parquet has no such view: its batches are
    decoded, BATCH_VALUES list values' worth at a time (release does nothing).
    """
    if rf.format == "parquet":
        pf = pq.ParquetFile(rf.path, pre_buffer=False, buffer_size=1 << 20)  # column chunks streamed, not held
        names = [rf.schema.field(i).name for i in indices]
        for batch in pf.iter_batches(batch_size=_parquet_batch_rows(pf, names), columns=names):
            yield batch, _nothing
        return
    with open(rf.path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)  # kept alive by the buffers that view it

    def release() -> None:  # the pages stay in the page cache; a later access maps them again
        if hasattr(mapped, "madvise"):
            mapped.madvise(mmap.MADV_DONTNEED)

    # Columns are selected from the mapped batch: IpcReadOptions(included_fields=...) would copy them.
    source = pa.BufferReader(pa.py_buffer(mapped))
    if rf.format == "ipc-file":
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i).select(indices), release
    else:
        for batch in pa.ipc.open_stream(source):
            yield batch.select(indices), release


def _nothing() -> None:
    pass


def _parquet_batch_rows(pf: pq.ParquetFile, names: list[str]) -> int:
    """Rows per decoded Parquet batch: BATCH_ROWS, fewer where the row groups' rows average more than
    BATCH_VALUES / BATCH_ROWS list values (from the footer: leaf values per column chunk)."""
    meta, wanted = pf.metadata, set(names)
    leaves = [j for j in range(meta.num_columns) if meta.schema.column(j).path.split(".")[0] in wanted]
    per_row = max((sum(meta.row_group(g).column(j).num_values for j in leaves) / meta.row_group(g).num_rows
                   for g in range(meta.num_row_groups) if meta.row_group(g).num_rows), default=0.0)
    return max(1, min(BATCH_ROWS, int(BATCH_VALUES // max(per_row, 1.0))))


def list_values(arr: pa.Array) -> np.ndarray:
    """(n,) values each row of a column holds at its innermost level (tokens of a list column, ids of
    routed_experts' lists of lists), read from the offsets alone; 0 for a scalar column."""
    n = len(arr)
    if pa.types.is_dictionary(arr.type) or not is_list(arr.type):
        return np.zeros(n, dtype=np.int64)
    bounds = None  # (n+1,) the rows' bounds in the current child
    while is_list(arr.type):
        if pa.types.is_fixed_size_list(arr.type):
            own = (arr.offset + np.arange(len(arr) + 1, dtype=np.int64)) * arr.type.list_size
        else:
            own = arr.offsets.to_numpy().astype(np.int64)  # into `arr.values`, which ignores arr's offset
        bounds = own if bounds is None else own[bounds]
        arr = arr.values
    return np.diff(bounds)


def _own_values(arr: pa.Array) -> pa.Array:
    """A sliced list array rebuilt (zero-copy) over only its own rows' values, at every level.

    Arrow's list cast converts the child values from the start of the child up to the slice's last
    row, so casting the k-th slice of a huge record batch would cost k slices: quadratic in the batch.
    """
    if not is_list(arr.type):
        return arr
    n, mask = len(arr), (arr.is_null() if arr.null_count else None)
    if pa.types.is_fixed_size_list(arr.type):
        size = arr.type.list_size
        values = _own_values(arr.values.slice(arr.offset * size, n * size))
        return pa.FixedSizeListArray.from_arrays(values, type=arr.type, mask=mask)
    offsets = arr.offsets.to_numpy()  # (n+1,) into arr.values
    values = _own_values(arr.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0])))
    return type(arr).from_arrays(pa.array(offsets - offsets[0]), values, type=arr.type, mask=mask)


def value_slices(batch: pa.RecordBatch, budget: int) -> Iterator[pa.RecordBatch]:
    """`batch` as consecutive zero-copy row slices of at most `budget` list values each (a row holding
    more is a slice of its own), so that casting and checking a slice is bounded by tokens, not rows."""
    weights = sum((list_values(col) for col in batch.columns), np.zeros(batch.num_rows, dtype=np.int64))
    total = np.cumsum(weights)  # (n,)
    if batch.num_rows == 0 or total[-1] <= budget:
        yield batch
        return
    start = 0
    while start < batch.num_rows:
        before = total[start - 1] if start else 0
        stop = max(int(np.searchsorted(total, before + budget, side="right")), start + 1)
        yield batch.slice(start, stop - start)
        start = stop


def read_canonical(rf: RolloutFile, wanted: set[str] | None, shard: Shard | None = None,
                    pieces: list[int] | None = None, extra: tuple[str, ...] = ()
                    ) -> Iterator[tuple[int, int, pa.RecordBatch | None, list[Problem], int]]:
    """(row offset in file, rows, canonical batch, cast problems, piece) per batch of at most BATCH_ROWS rows
    and BATCH_VALUES list values (value_slices: a producer's record batch may hold any number of tokens).

    The row count is separate because a batch without any wanted column has no columns at all.
    Pieces (at most BATCH_ROWS, or the shard's piece_rows, consecutive rows of one record batch) are
    numbered across files by `pieces[0]`; a piece may come as several slices. With a `shard`,
    another rank's piece comes as (offset, rows, None, [], piece): counted, never cast.
    Raises InputError for a file that turns out truncated or corrupt while streaming.
    """
    step = BATCH_ROWS if shard is None else shard.piece_rows
    index = {n: i for n, i in rf.fields.items() if wanted is None or n in wanted}
    index.update({n: rf.schema.get_field_index(n) for n in extra if n not in index})
    names = [n for n in index if index[n] >= 0]  # an extra column the file lacks is absent, as a canonical one
    # IPC projection returns fields in file order; Parquet in the requested order: sort to match.
    names.sort(key=lambda n: index[n])
    indices = [index[n] for n in names]
    offset = 0
    pieces = [0] if pieces is None else pieces
    if len(rf.schema) == 0:
        return
    # With no wanted column present, still read the first field so that row counts stay right.
    batches = _raw_batches(rf, indices or [0])
    try:
        for raw, release in batches:
            for start in range(0, max(raw.num_rows, 1), step):
                part = raw.slice(start, step)
                if part.num_rows == 0:
                    continue
                piece = pieces[0]
                pieces[0] += 1
                if shard is not None and not shard.owns(piece):
                    yield offset, part.num_rows, None, [], piece
                    offset += part.num_rows
                    continue
                for sub in value_slices(part if names else part.select([]), BATCH_VALUES):
                    batch, problems = canonical_batch(rf.path, names, sub, offset)
                    yield offset, sub.num_rows, batch, problems, piece
                    offset += sub.num_rows
                    release()  # the caller is done with the slice
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"{rf.path}: cannot read past row {offset} (truncated or corrupt file): "
                         f"{one_line(err)}") from err


def canonical_batch(path: str, names: list[str], raw: pa.RecordBatch, offset: int
               ) -> tuple[pa.RecordBatch, list[Problem]]:
    """Rename and cast once to the canonical types; a column whose values do not fit is dropped."""
    arrays, fields, problems = [], [], []
    for name, column in zip(names, raw.columns):
        if name not in COLUMN_BY_NAME:  # an extra column: passed on as logged
            arrays.append(column.dictionary_decode() if pa.types.is_dictionary(column.type) else column)
            fields.append(pa.field(name, arrays[-1].type))
            continue
        target = COLUMN_BY_NAME[name].arrow_type
        try:
            if pa.types.is_dictionary(column.type):
                column = column.dictionary_decode()
            arrays.append(column if column.type == target else _own_values(column).cast(target))
            fields.append(pa.field(name, target))
        except pa.ArrowException as err:
            problems.append(Problem("type", path, name, None,
                                    f"values that fit {type_name(target)} (batch from row {offset})",
                                    one_line(err)))
    if not arrays:  # no wanted column: an empty projection that still counts the rows
        return raw.select([]), problems
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields)), problems
