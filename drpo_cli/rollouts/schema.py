"""Rollout schema v1 (SPEC.md §3): defined once here, read from Arrow IPC or Parquet. No torch.

`COLUMNS` is the single source of truth; `schemas/rollout-v1.json` is `schema_document()` written
out, and a test keeps the two equal. `open_rollouts()` finds and opens files, `iter_batches()`
streams record batches cast to the canonical types, and `validate_rollouts()` reports every
problem at once. Files are read one record batch at a time, so memory stays
bounded by the batch size, not the file size.
"""

from __future__ import annotations

import json
import math
import mmap
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from drpo_cli.base.errors import ConfigError, InputError

SCHEMA_VERSION = "1"
ROLLOUT_SUFFIXES = (".arrow", ".feather", ".ipc", ".parquet")
# Rows per streamed batch, and list values (tokens, over every per-token column) per streamed batch:
# together they bound the working memory of casts and checks (a larger record batch written by the
# producer, even one of a whole table, is processed in zero-copy slices within both).
BATCH_ROWS = 4096
BATCH_VALUES = 1 << 22


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    arrow_type: pa.DataType  # canonical type every accepted variant is cast to
    required: str  # "yes", "no" or "one advantage source"
    description: str
    accepts: str  # the logged types that are cast to arrow_type


_LIST_IDS = "list or large_list of any integer type (int32, int64, ...)"
_LIST_FLOATS = "list or large_list of float16/float32/float64 (or integers)"
_ADV = "one advantage source"

COLUMNS: tuple[ColumnSpec, ...] = (
    ColumnSpec("prompt_ids", pa.list_(pa.int64()), "yes",
               "prompt token ids (context only, never trained)", _LIST_IDS),
    ColumnSpec("response_ids", pa.list_(pa.int64()), "yes",
               "sampled token ids, at least one", _LIST_IDS),
    ColumnSpec("behavior_logprobs", pa.list_(pa.float32()), "yes",
               "entry i = the sampler's log-prob of response_ids[i] given the prompt and response_ids[:i]; "
               "same length as response_ids; finite and <= 0 wherever loss_mask is 1 (ignored where it is 0)",
               _LIST_FLOATS),
    ColumnSpec("advantages", pa.list_(pa.float32()), _ADV,
               "per-token advantage, same length as response_ids", _LIST_FLOATS),
    ColumnSpec("advantage", pa.float32(), _ADV,
               "per-sequence advantage, broadcast to every response token", "any float or integer type"),
    ColumnSpec("reward", pa.float32(), _ADV,
               "sequence reward; with group_id, drpo computes A = R - mean of R over the group",
               "any float or integer type"),
    ColumnSpec("group_id", pa.string(), _ADV,
               "group of samples drawn for the same prompt (required with reward)",
               "string, large_string, string_view, dictionary<string> or any integer type"),
    ColumnSpec("loss_mask", pa.list_(pa.bool_()), "no",
               "1 = train on this token (default all 1); same length as response_ids",
               "list or large_list of bool or any integer type (non-zero = 1)"),
    ColumnSpec("sample_id", pa.string(), "no",
               "stable id shown in reports, unique across all files (default: row number)",
               "string, large_string, string_view, dictionary<string> or any integer type"),
    ColumnSpec("policy_version", pa.int64(), "no",
               "trainer step of the sampling policy, for staleness (default: unknown, -1)", "any integer type"),
    ColumnSpec("token_policy_versions", pa.list_(pa.int64()), "no",
               "trainer step of the policy that sampled each response token (engines that update weights "
               "mid-response); same length as response_ids; integers >= 0 wherever loss_mask is 1 (ignored "
               "where it is 0); when given, it decides every lag and stale filter instead of policy_version",
               _LIST_IDS),
    ColumnSpec("proximal_logprobs", pa.list_(pa.float32()), "no",
               "pi_old log-probs recomputed by a trainer; same length as response_ids", _LIST_FLOATS),
    ColumnSpec("temperature", pa.float32(), "no",
               "sampling temperature of this row (else drpo.temperature metadata, else --temperature, else 1.0)",
               "any float or integer type"),
    ColumnSpec("routed_experts", pa.list_(pa.list_(pa.list_(pa.int16()))), "no",
               "mixture of experts: per position the sampler ran forward on (prompt + response - 1 of them), "
               "per MoE layer, the k expert ids it chose; an empty entry = not logged (SPEC.md §3)",
               "list, large_list or fixed_size_list, three deep, of any integer type (uint8 is enough up to 256 "
               "experts)"),
)
COLUMN_BY_NAME = {c.name: c for c in COLUMNS}
REQUIRED = tuple(c.name for c in COLUMNS if c.required == "yes")
# Per-token columns that must have exactly one entry per response token.
TOKEN_COLUMNS = ("behavior_logprobs", "advantages", "loss_mask", "proximal_logprobs", "token_policy_versions")


@dataclass(frozen=True)
class RowRule:
    """One rule on rollout values, the single definition `drpo validate` (every problem) and the audits of
    inspect and train (the first problem, as they stream) both apply: which values break it, and the message."""

    kind: str  # the problem kind drpo validate counts under
    expected: str
    bad: Callable[[np.ndarray], np.ndarray]  # values -> bool mask of the values that break the rule
    masked: bool = False  # per-token values held to it only where loss_mask is 1


def _not_logprob(v: np.ndarray) -> np.ndarray:
    return ~(np.isfinite(v) & (v <= 0))


def _not_finite(v: np.ndarray) -> np.ndarray:
    return ~np.isfinite(v)


def _negative(v: np.ndarray) -> np.ndarray:
    return v < 0


def _not_temperature(v: np.ndarray) -> np.ndarray:
    return ~(np.isfinite(v) & (v > 0))


ROW_RULES: dict[str, RowRule] = {
    "behavior_logprobs": RowRule("logprob", "finite log-probs <= 0 where loss_mask is 1", _not_logprob, True),
    "proximal_logprobs": RowRule("logprob", "finite log-probs <= 0 where loss_mask is 1", _not_logprob, True),
    "advantages": RowRule("non-finite", "finite advantages where loss_mask is 1", _not_finite, True),
    "token_policy_versions": RowRule("negative-version", "policy versions >= 0 where loss_mask is 1", _negative,
                                     True),
    "policy_version": RowRule("negative-version", "policy versions >= 0 (or null/-1 for unknown)",
                              lambda v: v < -1),
    "advantage": RowRule("non-finite", "a finite number", _not_finite),
    "reward": RowRule("non-finite", "a finite number", _not_finite),
    "temperature": RowRule("temperature", "a finite temperature > 0", _not_temperature),
    "prompt_ids": RowRule("negative-id", "token ids >= 0", _negative),
    "response_ids": RowRule("negative-id", "token ids >= 0", _negative),
}
NULL_VALUE = ("a value", "null")  # (expected, found) of a null where a value is required
EMPTY_RESPONSE = ("at least one response token", "an empty list")


def length_problem(reference: str, want: int, found: int) -> tuple[str, str]:
    """(expected, found) of a per-token column whose length is not its reference column's."""
    return f"length {want} (as {reference})", f"length {found}"
METADATA_KEYS = {
    "drpo.schema_version": 'schema version of the file, "1"',
    "drpo.temperature": "sampling temperature of every row without a temperature column",
    "drpo.top_p": "nucleus sampling threshold used by the sampler (reported by inspect)",
    "drpo.top_k": "top-k used by the sampler (reported by inspect)",
    "drpo.logprobs": 'which log-probs the sampler logged: "processed" (of the distribution it sampled from, after '
                     'temperature / top-k / top-p) or "raw" (of the model before them; vLLM V1\'s default)',
    "drpo.sampler": 'free text naming the sampler, e.g. "vllm 0.11"',
}


def schema_document() -> dict:
    """Machine-readable schema v1, written to schemas/rollout-v1.json."""
    return {
        "name": "drpo rollout schema",
        "version": SCHEMA_VERSION,
        "formats": ["arrow-ipc-file", "arrow-ipc-stream", "parquet"],
        "file_suffixes_in_directories": list(ROLLOUT_SUFFIXES),
        "row": "one sampled response",
        "columns": [
            {"name": c.name, "type": type_name(c.arrow_type), "required": c.required,
             "accepts": c.accepts, "description": c.description}
            for c in COLUMNS
        ],
        "advantage_sources": [
            "advantages (per token)", "advantage (per sequence)", "reward + group_id (group-relative)"
        ],
        "metadata": dict(METADATA_KEYS),
    }


def schema_json() -> str:
    return json.dumps(schema_document(), indent=2) + "\n"


def column_map_problems(items: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """`["logged=canonical", ...]` from `--column` options -> ({logged: canonical}, every problem)."""
    mapping: dict[str, str] = {}
    problems: list[str] = []
    for item in items:
        logged, sep, canonical = (part.strip() for part in item.partition("="))
        if not sep or not logged or not canonical:
            problems.append(f"--column {item!r}: expected LOGGED=CANONICAL, e.g. --column logprobs=behavior_logprobs")
        elif canonical not in COLUMN_BY_NAME:
            problems.append(
                f"--column {item!r}: {canonical!r} is not a schema v1 column (one of {', '.join(COLUMN_BY_NAME)})"
            )
        elif logged in mapping:
            problems.append(f"--column {item!r}: {logged!r} is mapped twice")
        else:
            mapping[logged] = canonical
    return mapping, problems


def parse_column_map(items: Iterable[str]) -> dict[str, str]:
    """{logged: canonical} from `--column` options; ConfigError on the first problem."""
    mapping, problems = column_map_problems(items)
    if problems:
        raise ConfigError(problems[0])
    return mapping


# ---- accepted types ----------------------------------------------------------------------------


_SHORT_NAMES = {"float": "float32", "double": "float64", "halffloat": "float16", "large_string": "large_string"}


def type_name(t: pa.DataType) -> str:
    """Readable type: list<int64>, large_list<float64>, ... (Arrow's own str() says list<item: double>)."""
    if _is_list(t):
        kind = "large_list" if pa.types.is_large_list(t) else "list"
        return f"{kind}<{type_name(t.value_type)}>"
    if pa.types.is_dictionary(t):
        return f"dictionary<{type_name(t.value_type)}>"
    return _SHORT_NAMES.get(str(t), str(t))


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def accepts(canonical: pa.DataType, found: pa.DataType) -> bool:
    """Whether a logged type can be cast losslessly enough to the canonical type."""
    if pa.types.is_dictionary(found):
        found = found.value_type
    if pa.types.is_list(canonical):
        return _is_list(found) and accepts(canonical.value_type, found.value_type)
    if pa.types.is_int64(canonical) or pa.types.is_int16(canonical):
        return pa.types.is_integer(found)
    if pa.types.is_float32(canonical):
        return pa.types.is_floating(found) or pa.types.is_integer(found)
    if pa.types.is_boolean(canonical):
        return pa.types.is_boolean(found) or pa.types.is_integer(found)
    if pa.types.is_string(canonical):
        return _is_string(found) or pa.types.is_integer(found)
    return False


# ---- problems ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, rendered as one line by str()."""

    kind: str  # e.g. "missing-column", "length-mismatch", "logprob" (see validate.py)
    file: str
    column: str | None
    row: int | None  # row index within `file`
    expected: str
    found: str
    sample_id: str | None = None

    def __str__(self) -> str:
        where = [self.file]
        if self.column is not None:
            where.append(f"column '{self.column}'")
        if self.row is not None:
            sid = f" (sample_id '{self.sample_id}')" if self.sample_id is not None else ""
            where.append(f"row {self.row}{sid}")
        return f"{', '.join(where)}: expected {self.expected}, found {self.found}"


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
                    total += sum(item[1] for item in _read_canonical(rf, set()))
            except (OSError, pa.ArrowException) as err:
                raise InputError(f"{rf.path}: cannot read its row count (truncated or corrupt file): "
                                 f"{_one_line(err)}") from err
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
            for row_offset, num_rows, batch, cast_problems, piece in _read_canonical(rf, wanted, shard, pieces,
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
                                "a readable Arrow IPC or Parquet file", _one_line(err)))
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


def _one_line(err: BaseException) -> str:
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
    if pa.types.is_dictionary(arr.type) or not _is_list(arr.type):
        return np.zeros(n, dtype=np.int64)
    bounds = None  # (n+1,) the rows' bounds in the current child
    while _is_list(arr.type):
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
    if not _is_list(arr.type):
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


def _read_canonical(rf: RolloutFile, wanted: set[str] | None, shard: Shard | None = None,
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
                    batch, problems = _canonical(rf.path, names, sub, offset)
                    yield offset, sub.num_rows, batch, problems, piece
                    offset += sub.num_rows
                    release()  # the caller is done with the slice
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"{rf.path}: cannot read past row {offset} (truncated or corrupt file): "
                         f"{_one_line(err)}") from err


def _canonical(path: str, names: list[str], raw: pa.RecordBatch, offset: int
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
                                    _one_line(err)))
    if not arrays:  # no wanted column: an empty projection that still counts the rows
        return raw.select([]), problems
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields)), problems


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
            for offset, num_rows, batch, cast_problems, _ in _read_canonical(rf, None, shard, pieces):
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
    """Row- and token-level checks of one canonical batch."""
    n = b.num_rows
    names = set(b.schema.names)
    sids = b.column("sample_id") if "sample_id" in names else None

    def report(kind, column, rows, expected, found):
        if len(rows):
            out.add_rows(kind, path, column, rows, offset, sids, expected, found)

    # Nulls and list lengths. `bad` rows are left out of the token-value checks below, which
    # need every per-token column aligned with the response.
    bad = np.zeros(n, dtype=bool)  # (n,)
    lengths: dict[str, np.ndarray] = {}
    null_rows: dict[str, np.ndarray] = {}
    for name in b.schema.names:
        arr = b.column(name)
        null_rows[name] = _np(arr.is_null()) if arr.null_count else np.zeros(n, dtype=bool)
        report("null", name, np.flatnonzero(null_rows[name]), *NULL_VALUE)
        if name not in _LIST_COLUMNS:
            continue
        bad |= null_rows[name]
        lengths[name] = _np(arr.value_lengths().fill_null(0)).astype(np.int64)  # (n,)
        flat = arr.flatten()
        if flat.null_count:
            rows = _row_of(np.flatnonzero(_np(flat.is_null())), _offsets(lengths[name]))
            report("null", name, np.unique(rows), "no null entries", "a null entry")
            bad[rows] = True
        if name in ("prompt_ids", "response_ids"):
            neg = np.flatnonzero(ROW_RULES[name].bad(_np(flat.fill_null(0))))
            if len(neg):
                offs = _offsets(lengths[name])
                rows, first = np.unique(_row_of(neg, offs), return_index=True)
                at = dict(zip(rows.tolist(), neg[first].tolist()))
                report(ROW_RULES[name].kind, name, rows, ROW_RULES[name].expected,
                       lambda i, f=flat, o=offs, at=at: f"{f[at[i]].as_py()} at token {at[i] - o[i]}")

    ref = next((c for c in ("response_ids",) + TOKEN_COLUMNS if c in lengths), None)
    if ref is not None:
        ref_len = lengths[ref]
        if ref == "response_ids":
            out.tokens += int(ref_len.sum())
            report("empty-response", ref, np.flatnonzero((ref_len == 0) & ~null_rows[ref]), *EMPTY_RESPONSE)
        for name in TOKEN_COLUMNS:
            if name == ref or name not in lengths:
                continue
            mismatch = (lengths[name] != ref_len) & ~null_rows[name] & ~null_rows[ref]
            rows = np.flatnonzero(mismatch)
            report("length-mismatch", name, rows, lambda i, r=ref: length_problem(r, ref_len[i], 0)[0],
                   lambda i, c=name: length_problem(ref, 0, lengths[c][i])[1])
            bad |= mismatch

    for name in ("advantage", "reward"):
        if name in names:
            v = _np(b.column(name).fill_null(0.0))
            rule = ROW_RULES[name]
            report(rule.kind, name, np.flatnonzero(rule.bad(v)), rule.expected, lambda i, v=v: f"{v[i]:.6g}")
    if "policy_version" in names:
        v = _np(b.column("policy_version").fill_null(-1))
        rule = ROW_RULES["policy_version"]
        report(rule.kind, "policy_version", np.flatnonzero(rule.bad(v)), rule.expected, lambda i, v=v: str(v[i]))
    if "temperature" in names:
        t = _np(b.column("temperature").fill_null(1.0))
        rule = ROW_RULES["temperature"]
        report(rule.kind, "temperature", np.flatnonzero(rule.bad(t)), rule.expected, lambda i: f"{t[i]:.6g}")
    if sids is not None:
        ids.add(sids)
    if "routed_experts" in names and {"prompt_ids", "response_ids"} <= set(lengths):
        _check_routing(b.column("routed_experts"), lengths["prompt_ids"] + lengths["response_ids"] - 1,
                       null_rows["prompt_ids"] | null_rows["response_ids"] | null_rows["routed_experts"], report)

    good = np.flatnonzero(~bad)
    if len(good) == 0:
        return
    g = b if len(good) == n else b.take(pa.array(good))  # aligned rows only
    gnames = [c for c in _LIST_COLUMNS if c in names]
    parts = {c: (_np(g.column(c).flatten()), _offsets(_np(g.column(c).value_lengths()).astype(np.int64)))
             for c in gnames}

    def report_tokens(kind, column, bad_tok, expected):
        if not bad_tok.any():
            return
        values, offs = parts[column]
        tok = np.flatnonzero(bad_tok)
        rows, first = np.unique(_row_of(tok, offs), return_index=True)
        first_tok = tok[first]
        at = dict(zip(rows.tolist(), first_tok.tolist()))
        report(kind, column, good[rows], expected,
               lambda i: f"{values[at[_local(good, i)]]:.6g} at token {at[_local(good, i)] - offs[_local(good, i)]}")

    mask = parts["loss_mask"][0] if "loss_mask" in parts else None  # (T,) bool
    for name in ("behavior_logprobs", "proximal_logprobs", "advantages", "token_policy_versions"):
        if name in parts:
            rule = ROW_RULES[name]
            bad_tok = rule.bad(parts[name][0])
            report_tokens(rule.kind, name, bad_tok if mask is None else bad_tok & mask, rule.expected)


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


def _local(good: np.ndarray, batch_row: int) -> int:
    return int(np.searchsorted(good, batch_row))


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
                for offset, _, batch, _, _ in _read_canonical(rf, {"sample_id"}):
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
