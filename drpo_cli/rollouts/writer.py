"""`RolloutWriter`: samplers append rows, drpo writes a checked schema-v1 Arrow file. No torch.

    with RolloutWriter("rollouts.arrow", temperature=0.7, logprobs="processed", sampler="vllm 0.11") as w:
        w.write(prompt_ids=p, response_ids=r, behavior_logprobs=lp, reward=1.0, group_id="q17")

Rows are buffered `batch_rows` at a time; each full buffer is checked with the same checks and
messages as `drpo validate` (validate.check_batch) and appended to the file as one Arrow record
batch, so memory is bounded by the batch, not the file. The file is written under a temporary name
next to the output and renamed into place by a clean close: an exception inside the `with`, or a
bad row, leaves no output behind.

The log-prob kind (SPEC.md §3, `drpo.logprobs`) is checked up front: `raw` log-probs (the model's
distribution before temperature / top-k / top-p, vLLM V1's default) at T != 1 or with truncation
give every token a wrong behavior probability, and are refused unless `allow_raw_logprobs=True`; so are
raw log-probs with min-p, or with no temperature known (none given and no temperature column).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from drpo_cli.base.errors import ConfigError, InputError
from drpo_cli.base.outputs import ARROW_MARKER_KEY, Output, atomic_file, check_paths
from drpo_cli.rollouts.files import RolloutFile
from drpo_cli.rollouts.schema import COLUMN_BY_NAME, COLUMNS, REQUIRED, SCHEMA_VERSION, Problem
from drpo_cli.rollouts.validate import IdHashes, Problems, check_batch, check_file

LOGPROB_KINDS = ("processed", "raw")
# How to make each sampler log the distribution it sampled from (quoted by the refusals).
RAW_FIX = ('vLLM: LLM(..., logprobs_mode="processed_logprobs") or vllm serve --logprobs-mode processed_logprobs; '
           "SGLang: unset SGLANG_RETURN_ORIGINAL_LOGPROB (its default logs after temperature)")
# Under truncation SGLang's logged log-probs are before top-k/top-p/min-p whatever the setting.
TRUNCATION_FIX = ('vLLM: LLM(..., logprobs_mode="processed_logprobs") or vllm serve --logprobs-mode '
                  "processed_logprobs; SGLang: request return_sampling_mask=true (meta_info."
                  "output_token_sampling_logprobs)")
# Raw log-probs are also before penalties, logit bias, bad words and allowed_token_ids (vllm/v1/sample/sampler.py).
RAW_ALSO = "raw log-probs are also before repetition/frequency/presence penalties and logit bias"


def truncates(top_p: float | None, top_k: int | None, min_p: float | None = None) -> bool:
    """Whether top-p / top-k / min-p cut the distribution (None, top_p >= 1, top_k <= 0, min_p <= 0 mean off)."""
    return (top_p is not None and top_p < 1.0) or (top_k is not None and top_k > 0) or \
        (min_p is not None and min_p > 0.0)


def check_logprobs_kind(kind: str, temperature: float | None, top_p: float | None = None,
                        top_k: int | None = None, *, min_p: float | None = None, allow_raw: bool = False) -> None:
    """ConfigError unless `kind` is a known log-prob kind and, when raw, equal to the sampled distribution.

    A temperature of None is checked later, against the rows (RolloutWriter: a per-row temperature column or
    none at all, which is refused: vLLM's server takes T from the model's generation_config.json when a
    request gives none, so an unsaid T is an unknown one).
    """
    if kind not in LOGPROB_KINDS:
        hint = (" (logits are not log-probs: log processed_logprobs)" if str(kind).endswith("_logits") else
                f" (vLLM's {kind} is {kind.split('_')[0]})" if kind in ("processed_logprobs", "raw_logprobs") else "")
        raise ConfigError(f"logprobs: expected one of {', '.join(LOGPROB_KINDS)}, found {kind!r}{hint}")
    if kind != "raw" or allow_raw:
        return
    if temperature is not None and temperature != 1.0:
        raise ConfigError(
            f"raw log-probs at temperature {temperature:g} are not the sampler's distribution (it sampled from "
            f"softmax(logits / {temperature:g})): log processed log-probs ({RAW_FIX}), or override with "
            "allow_raw_logprobs / --allow-raw-logprobs")
    if truncates(top_p, top_k, min_p):
        cut = " ".join(f"{k}={v}" for k, v in (("top_p", top_p), ("top_k", top_k), ("min_p", min_p)) if v is not None)
        raise ConfigError(
            f"raw log-probs with {cut} are not the sampler's (truncated) distribution: "
            f"log processed log-probs ({TRUNCATION_FIX}), or override with allow_raw_logprobs / --allow-raw-logprobs")


def sampling_metadata(temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                      logprobs: str = "processed", sampler: str | None = None) -> dict[str, str]:
    """The drpo.* file metadata of SPEC.md §3 (unset values are left out)."""
    meta = {"drpo.schema_version": SCHEMA_VERSION, "drpo.logprobs": logprobs,
            ARROW_MARKER_KEY.decode(): "rollouts"}  # outputs.py: marks a file drpo wrote
    if temperature is not None:
        if not (math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"temperature: expected a finite number > 0, found {temperature!r}")
        meta["drpo.temperature"] = repr(float(temperature))
    if top_p is not None:
        meta["drpo.top_p"] = repr(float(top_p))
    if top_k is not None:
        meta["drpo.top_k"] = str(int(top_k))
    if sampler:
        meta["drpo.sampler"] = str(sampler)
    return meta


class RolloutWriter:
    """Append rollout rows; a clean close renames a checked Arrow IPC file into place.

    The columns are those of the first row (the required three plus any optional schema-v1 column);
    every later row must have the same ones. `write()` takes lists, tuples or anything with
    `.tolist()` (numpy arrays, torch tensors) for the per-token columns.
    """

    def __init__(self, path: str | os.PathLike, *, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, logprobs: str = "processed", sampler: str | None = None,
                 allow_raw_logprobs: bool = False, overwrite: bool = False, batch_rows: int = 1024,
                 flag: str = "RolloutWriter path", min_p: float | None = None):
        check_logprobs_kind(logprobs, temperature, top_p, top_k, min_p=min_p, allow_raw=allow_raw_logprobs)
        if batch_rows < 1:
            raise ConfigError(f"batch_rows: expected an integer >= 1, found {batch_rows}")
        self.path = Path(path)
        self.metadata = sampling_metadata(temperature, top_p, top_k, logprobs, sampler)
        self.raw = logprobs == "raw" and not allow_raw_logprobs
        self.overwrite, self.batch_rows = overwrite, batch_rows
        check_paths([], [Output(flag, self.path, "arrow")], overwrite=overwrite)  # outputs.py's one rule
        self.rows = 0  # rows accepted (checked and written)
        self._columns: list[str] | None = None
        self._buffer: dict[str, list] = {}
        self._ids: set[str] = set()
        self._publish = contextlib.ExitStack()  # holds outputs.atomic_file once the first batch is written
        self._sink = self._writer = None
        self._closed = False

    # ---- context manager ----
    def __enter__(self):  # -> RolloutWriter
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ---- rows ----
    def write(self, prompt_ids: Iterable[int], response_ids: Iterable[int], behavior_logprobs: Iterable[float],
              **optional: Any) -> None:
        """Append one row (prompt_ids, response_ids, behavior_logprobs and optional schema-v1 columns)."""
        self.write_row({"prompt_ids": prompt_ids, "response_ids": response_ids,
                        "behavior_logprobs": behavior_logprobs, **optional})

    def write_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            self.write_row(row)

    def write_row(self, row: Mapping[str, Any]) -> None:
        if self._closed:
            raise InputError(f"{self.path}: the writer is closed")
        index = self.rows + len(next(iter(self._buffer.values()), []))
        if self._columns is None:
            unknown = [k for k in row if k not in COLUMN_BY_NAME]
            if unknown:
                self.abort()
                raise InputError(f"{self.path}, row {index}: expected schema v1 columns "
                                 f"({', '.join(COLUMN_BY_NAME)}), found {', '.join(map(repr, unknown))}")
            self._columns = [c.name for c in COLUMNS if c.name in row]
            self._buffer = {c: [] for c in self._columns}
        elif set(row) != set(self._columns):
            self.abort()
            raise InputError(f"{self.path}, row {index}: expected the columns of row 0 ({', '.join(self._columns)}), "
                             f"found {', '.join(sorted(row))}")
        for name in self._columns:
            value = row[name]
            self._buffer[name].append(value.tolist() if hasattr(value, "tolist") else value)
        if len(self._buffer[self._columns[0]]) >= self.batch_rows:
            self.flush()

    def flush(self) -> None:
        """Check the buffered rows and append them to the file as one record batch."""
        if not self._columns or not self._buffer[self._columns[0]]:
            return
        try:
            batch = self._batch()
            self._check(batch)
            if self._writer is None:
                self._open(batch.schema)
            self._writer.write_batch(batch)
        except BaseException:
            self.abort()
            raise
        self.rows += batch.num_rows
        self._buffer = {c: [] for c in self._columns}

    def close(self) -> Path:
        """Write what is buffered, finish the file and rename it into place; returns the output path."""
        if self._closed:
            return self.path
        self.flush()
        if self._writer is None:
            self.abort()
            raise InputError(f"{self.path}: no rows were written (expected at least one rollout row)")
        try:
            self._writer.close()
            self._sink.close()
            self._publish.close()  # atomic_file: last check, umask mode, rename into place
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Drop everything written so far; no output is left."""
        self._closed = True
        for closer in (self._writer, self._sink):
            if closer is not None:
                try:
                    closer.close()
                except (OSError, pa.ArrowException):
                    pass
        self._writer = self._sink = None
        failed = RuntimeError("rollout writing aborted")
        self._publish.__exit__(type(failed), failed, None)  # atomic_file removes its temporary file

    # ---- internals ----
    def _batch(self) -> pa.RecordBatch:
        arrays, fields = [], []
        for name in self._columns:
            target = COLUMN_BY_NAME[name].arrow_type
            values = self._buffer[name]
            if pa.types.is_string(target):
                values = [None if v is None else str(v) for v in values]
            try:
                arrays.append(pa.array(values, type=target))
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                raise InputError(self._type_problem(name, target, values)) from None
            fields.append(pa.field(name, target))
        return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))

    def _type_problem(self, name: str, target: pa.DataType, values: list) -> str:
        from drpo_cli.rollouts.schema import type_name

        for i, v in enumerate(values):
            try:
                pa.array([v], type=target)
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                found = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
                return str(Problem("type", str(self.path), name, self.rows + i,
                                   f"a value of type {type_name(target)}", found))
        return f"{self.path}: column '{name}': values do not fit {type_name(target)}"

    def _check(self, batch: pa.RecordBatch) -> None:
        out = Problems(limit=20)
        if self._writer is None:  # file-level checks once: required columns, an advantage source
            rf = RolloutFile(str(self.path), "ipc-file", batch.schema, self.metadata,
                             {n: i for i, n in enumerate(batch.schema.names)}, set(batch.schema.names))
            check_file(rf, {}, out)
            if self.raw and "drpo.temperature" not in self.metadata and "temperature" not in batch.schema.names:
                out.add(Problem("raw-logprobs", str(self.path), "temperature", self.rows,
                                "a temperature (temperature= / --temperature, or a temperature column) with raw "
                                "log-probs", "none: raw log-probs equal the sampled distribution only at T = 1 "
                                "(vLLM's server takes T from generation_config.json when a request gives none); "
                                f"log processed log-probs ({RAW_FIX}); {RAW_ALSO}"))
        check_batch(str(self.path), self.rows, batch, out, IdHashes())
        if "sample_id" in batch.schema.names:
            for i, sid in enumerate(batch.column("sample_id").to_pylist()):
                if sid in self._ids:
                    out.add(Problem("duplicate-sample-id", str(self.path), "sample_id", self.rows + i,
                                    "a unique sample_id", "an id written before", sid))
                self._ids.add(sid)
        if self.raw and "temperature" in batch.schema.names:
            for i, t in enumerate(batch.column("temperature").to_pylist()):
                if t is not None and t != 1.0:
                    try:
                        check_logprobs_kind("raw", t)
                    except ConfigError as err:
                        out.add(Problem("raw-logprobs", str(self.path), "temperature", self.rows + i,
                                        "temperature 1 with raw log-probs", f"{t:g}: {err.message}"))
                    break
        if out.total:
            more = out.total - len(out)
            raise InputError(f"invalid rollout rows: {out[0]}",
                             details=[str(p) for p in out[1:]] + ([f"... and {more} more"] if more else []))

    def _open(self, schema: pa.Schema) -> None:
        tmp = self._publish.enter_context(atomic_file(self.path, "arrow", overwrite=self.overwrite))
        self._sink = pa.OSFile(str(tmp), "wb")
        self._writer = pa.ipc.new_file(self._sink, schema.with_metadata(self.metadata))


__all__ = ["LOGPROB_KINDS", "REQUIRED", "RolloutWriter", "check_logprobs_kind", "sampling_metadata", "truncates"]
