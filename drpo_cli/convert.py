"""`drpo convert`: JSONL dumps (one response per line) -> one schema-v1 Arrow file. No torch.

Lines are read one at a time and written through RolloutWriter in record batches, so memory is
bounded. Every bad line is reported (`FILE:LINE: field 'x': expected ..., found ...`), and when
any line is bad no output file is left.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drpo_cli.adapters import ADAPTERS, Row, Text, _ids, bad
from drpo_cli.errors import ConfigError, InputError
from drpo_cli.llamacpp import llamacpp_server_rows
from drpo_cli.outputs import Output, output_problems
from drpo_cli.schema import COLUMN_BY_NAME, TOKEN_COLUMNS, column_map_problems
from drpo_cli.writer import RolloutWriter, check_logprobs_kind

FORMATS = ("jsonl", "vllm", "openai", "sglang", "llamacpp")
# llama-server /completion: a result (or the array of one request's results) with the prompt ids sent.
_FORMAT_ADAPTERS = {**ADAPTERS, "llamacpp": llamacpp_server_rows}
# Engines whose log-prob kind depends on a server setting the dump does not record.
_KIND_REQUIRED = {"vllm": "vLLM V1 logs raw log-probs unless logprobs_mode=processed_logprobs",
                  "openai": "a vLLM server logs raw log-probs unless --logprobs-mode processed_logprobs"}
MAX_LISTED = 50  # problems printed; the rest are counted


@dataclass(frozen=True)
class ConvertConfig:
    inputs: tuple[str, ...]
    out: str
    format: str = "jsonl"
    columns: tuple[str, ...] = ()  # --column SRC=CANONICAL
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    logprobs: str | None = None  # processed | raw; None: the format's default
    sampler: str | None = None
    allow_raw_logprobs: bool = False
    overwrite: bool = False

    def check(self) -> ConvertConfig:
        """Every option problem at once (ConfigError), before any line is read."""
        problems = []
        if not self.inputs:
            problems.append("no input files: pass one or more JSONL files")
        if self.format not in FORMATS:
            problems.append(f"--format: expected one of {', '.join(FORMATS)}, found {self.format!r}")
        _, column_problems = column_map_problems(self.columns)
        problems += column_problems
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature > 0):
            problems.append(f"--temperature: expected a finite number > 0, found {self.temperature}")
        if self.logprobs is None and self.format in _KIND_REQUIRED:
            problems.append(f"--format {self.format}: pass --logprobs processed or raw ({_KIND_REQUIRED[self.format]})")
        kind = self.logprobs or "processed"
        try:
            check_logprobs_kind(kind, self.temperature, self.top_p, self.top_k, allow_raw=self.allow_raw_logprobs)
        except ConfigError as err:
            problems.append(err.message.replace("allow_raw_logprobs / ", ""))
        problems += output_problems([("INPUT", p) for p in self.inputs], [Output("--out", self.out, "arrow")],
                                    overwrite=self.overwrite)
        if problems:
            raise ConfigError(problems[0], details=problems[1:])
        return self


def convert(cfg: ConvertConfig) -> tuple[Path, int, int]:
    """Write cfg.out from every input line; returns (output path, lines read, rows written)."""
    cfg.check()
    mapping, _ = column_map_problems(cfg.columns)
    problems: list[str] = []
    total_bad = 0
    lines = 0
    writer = RolloutWriter(cfg.out, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                           logprobs=cfg.logprobs or "processed", sampler=cfg.sampler,
                           allow_raw_logprobs=cfg.allow_raw_logprobs, overwrite=cfg.overwrite, flag="--out")
    columns: set[str] | None = None
    try:
        for path, number, text in _lines(cfg.inputs):
            lines += 1
            try:
                rows = list(_rows(json_line(text), cfg.format, mapping))
                for row in rows:
                    check_row(row)
                    if columns is None:
                        columns = set(row)
                    elif set(row) != columns:
                        raise InputError(f"fields {', '.join(sorted(row))}: expected the fields of the first "
                                         f"row ({', '.join(sorted(columns))})")
            except InputError as err:
                total_bad += 1
                if len(problems) < MAX_LISTED:
                    problems.append(f"{path}:{number}: {err.message}")
                continue
            if not total_bad:  # once a line is bad nothing will be kept: stop writing
                writer.write_rows(rows)
        if not lines:
            raise InputError(f"{', '.join(cfg.inputs)}: expected JSON lines, found an empty input")
        if total_bad:
            more = total_bad - len(problems)
            raise InputError(f"{total_bad} bad line{'s' if total_bad != 1 else ''}; no output written: {problems[0]}",
                             details=problems[1:] + ([f"... and {more} more"] if more else []))
        out = writer.close()
    except BaseException:
        writer.abort()
        raise
    return out, lines, writer.rows


def _lines(inputs: tuple[str, ...]) -> Iterator[tuple[str, int, str]]:
    for name in inputs:
        path = Path(name)
        if not path.is_file():
            raise InputError(f"{name}: expected a JSONL file, found {'a directory' if path.is_dir() else 'no such file'}")
        with open(path, encoding="utf-8", errors="replace") as fh:
            for number, text in enumerate(fh, start=1):
                if text.strip():
                    yield name, number, text


def json_line(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"expected a JSON object, found invalid JSON ({err.msg} at column {err.colno})") from None


def _rows(obj: Any, fmt: str, mapping: dict[str, str]) -> Iterator[Row]:
    if fmt not in ("sglang", "llamacpp") or not isinstance(obj, list):
        if not isinstance(obj, Mapping):
            raise bad("(line)", "a JSON object", Text(type(obj).__name__))
        obj = {mapping.get(k, k): v for k, v in obj.items()}
    if fmt == "jsonl":
        yield {k: v for k, v in obj.items() if k in COLUMN_BY_NAME}
        return
    # Schema-v1 scalar fields next to an engine response (e.g. "reward") apply to each of its rows.
    extras = {k: v for k, v in obj.items() if k in COLUMN_BY_NAME and k not in ("prompt_ids",)} \
        if isinstance(obj, Mapping) else {}
    for row in _FORMAT_ADAPTERS[fmt](obj):
        yield {**row, **extras}


def check_row(row: Row) -> None:
    """The row checks of `drpo validate`, per line: InputError naming the first bad field."""
    for name in ("prompt_ids", "response_ids", "behavior_logprobs"):
        if name not in row:
            raise bad(name, "a field of schema v1 (rename with --column SRC=" + name + ")", Text("no such field"))
    _ids(row["prompt_ids"], "prompt_ids")
    response = _ids(row["response_ids"], "response_ids")
    if not response:
        raise bad("response_ids", "at least one response token", Text("an empty list"))
    for name in TOKEN_COLUMNS:
        if name in row:
            value = row[name]
            if not isinstance(value, list):
                raise bad(name, "a list", value)
            if len(value) != len(response):
                raise bad(name, f"length {len(response)} (as response_ids)", Text(f"length {len(value)}"))
    mask = row.get("loss_mask") or [1] * len(response)
    for name in ("behavior_logprobs", "proximal_logprobs"):
        for t, v in enumerate(row.get(name) or []):
            if not mask[t]:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise bad(f"{name}[{t}]", "a log-prob (a number <= 0)", v)
            if not math.isfinite(v) or v > 0:
                raise bad(f"{name}[{t}]", "a finite log-prob <= 0", v)
    for name in ("reward", "advantage", "temperature"):
        v = row.get(name)
        if name in row and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise bad(name, "a finite number", v)
    if "temperature" in row and row["temperature"] <= 0:
        raise bad("temperature", "a temperature > 0", row["temperature"])
