"""`drpo convert`: JSONL dumps (one response per line) -> one schema-v1 Arrow file. No torch.

Lines are read one at a time and written through RolloutWriter in record batches, so memory is
bounded. Every bad line is reported (`FILE:LINE: field 'x': expected ..., found ...`), and when
any line is bad no output file is left.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drpo_cli.adapters import ADAPTERS, Row, Text, _ids, bad
from drpo_cli.adapters.common import parse_version_map
from drpo_cli.adapters.sglang import has_sampling_logprobs
from drpo_cli.errors import ConfigError, InputError
from drpo_cli.llamacpp import llamacpp_server_rows
from drpo_cli.outputs import Output, claimed, output_problems
from drpo_cli.schema import COLUMN_BY_NAME, TOKEN_COLUMNS, column_map_problems
from drpo_cli.writer import RolloutWriter, check_logprobs_kind, truncates

FORMATS = ("jsonl", "vllm", "openai", "sglang", "llamacpp")
# Engines whose log-prob kind depends on a server setting the dump does not record.
_KIND_REQUIRED = {"vllm": "vLLM logs raw log-probs unless logprobs_mode=processed_logprobs",
                  "openai": "a vLLM server logs raw log-probs unless --logprobs-mode processed_logprobs; SGLang "
                            "raw ones with SGLANG_RETURN_ORIGINAL_LOGPROB=1",
                  "sglang": "SGLang logs raw log-probs with SGLANG_RETURN_ORIGINAL_LOGPROB=1, processed ones "
                            "(after temperature) otherwise"}
# Per-token fields an engine adapter reads from the response itself: the same name next to it is ambiguous.
_FROM_RESPONSE = ("response_ids", "behavior_logprobs", "token_policy_versions")
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
    min_p: float | None = None
    logprobs: str | None = None  # processed | raw; None: the format's default
    sampler: str | None = None
    allow_raw_logprobs: bool = False
    overwrite: bool = False
    version_map: tuple[str, ...] = ()  # --version-map LABEL=N
    run_prefix: tuple[str, ...] = ()  # --run-prefix: one for every input, or one per input (in order)

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
        problems += parse_version_map(self.version_map)[1]
        if len(self.run_prefix) > 1 and len(self.run_prefix) != len(self.inputs):
            problems.append(f"--run-prefix: expected one prefix, or one per input ({len(self.inputs)}), found "
                            f"{len(self.run_prefix)}")
        if (self.version_map or self.run_prefix) and self.format == "jsonl":
            problems.append("--version-map / --run-prefix: expected an engine --format (vllm, openai, sglang), found "
                            "jsonl")
        try:
            check_logprobs_kind(kind, self.temperature, self.top_p, self.top_k, min_p=self.min_p,
                                allow_raw=self.allow_raw_logprobs)
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
    with claimed([("INPUT", p) for p in cfg.inputs], [Output("--out", cfg.out, "arrow")]):
        return _convert(cfg)


def _convert(cfg: ConvertConfig) -> tuple[Path, int, int]:
    mapping, _ = column_map_problems(cfg.columns)
    problems: list[str] = []
    total_bad = 0
    lines = 0
    writer = RolloutWriter(cfg.out, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                           logprobs=cfg.logprobs or "processed", sampler=cfg.sampler,
                           allow_raw_logprobs=cfg.allow_raw_logprobs, overwrite=cfg.overwrite, flag="--out")
    columns: set[str] | None = None
    seen: dict[str, str] = {}  # sample_id -> the line that wrote it (engine ids repeat across runs)
    try:
        prefixes = dict(zip(cfg.inputs, cfg.run_prefix * len(cfg.inputs) if len(cfg.run_prefix) == 1
                            else cfg.run_prefix))
        for path, number, text in _lines(cfg.inputs):
            lines += 1
            try:
                rows = list(_rows(json_line(text), cfg, mapping, f"{path}:{number}", prefixes.get(path)))
                for row in rows:
                    check_row(row)
                    if columns is None:
                        columns = set(row)
                    elif set(row) != columns:
                        raise InputError(f"fields {', '.join(sorted(row))}: expected the fields of the first "
                                         f"row ({', '.join(sorted(columns))}){_versions_hint(row, columns)}")
                    sid = row.get("sample_id")
                    if cfg.format != "jsonl" and sid is not None:
                        if str(sid) in seen:
                            raise bad("sample_id", f"an id not written before (it was on {seen[str(sid)]}; engine "
                                      "ids repeat across runs: give each input its own --run-prefix)", sid)
                        seen[str(sid)] = f"{path}:{number}"
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


def _rows(obj: Any, cfg: ConvertConfig, mapping: dict[str, str], line: str, run: str | None = None) -> Iterator[Row]:
    """One line's rows. Engine formats: schema-v1 fields next to a response (or on each item of a list
    line) apply to its rows; groups never span lines (group_id FILE:LINE, FILE:LINE/K for the K-th prompt of
    a line) unless the line names its own group_id."""
    fmt = cfg.format
    if fmt == "jsonl" or not isinstance(obj, list):
        if not isinstance(obj, Mapping):
            raise bad("(line)", "a JSON object" + (" or a list of them" if fmt != "jsonl" else ""),
                      Text(type(obj).__name__))
        if fmt == "jsonl":
            yield {k: v for k, v in {mapping.get(k, k): v for k, v in obj.items()}.items() if k in COLUMN_BY_NAME}
            return
    items = obj if isinstance(obj, list) else [obj]
    if fmt == "llamacpp":  # one request's results: the adapter copies the fields next to each into its row
        items = [{mapping.get(key, key): v for key, v in item.items()} if isinstance(item, Mapping) else item
                 for item in items]
        named = any(isinstance(item, Mapping) and "group_id" in item for item in items)
        yield from _line_groups(llamacpp_server_rows(items if isinstance(obj, list) else items[0]), line, run,
                                named)
        return
    fields = []
    for k, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise bad(f"[{k}]", "a JSON object", Text(type(item).__name__))
        item = {mapping.get(key, key): v for key, v in item.items()}
        at = f"[{k}]." if isinstance(obj, list) else ""
        for name in _FROM_RESPONSE:
            if name in item:
                raise bad(f"{at}{name}", "no such field next to an engine response (the adapter reads it from the "
                          "response)", Text("one"))
        fields.append((item, {key: v for key, v in item.items() if key in COLUMN_BY_NAME}))
    kwargs: dict[str, Any] = {"version_map": parse_version_map(cfg.version_map)[0]}
    if fmt in ("sglang", "openai"):
        kwargs["truncated"] = truncates(cfg.top_p, cfg.top_k, cfg.min_p)
    if fmt == "vllm":
        kwargs["processed"] = cfg.logprobs == "processed"
    pairs = []
    for k, (item, extras) in enumerate(fields):
        at = f"[{k}]." if isinstance(obj, list) else ""
        if fmt == "sglang" and cfg.logprobs == "raw" and has_sampling_logprobs(item):
            raise bad(f"{at}meta_info.output_token_sampling_logprobs", "no log-probs of the sampled distribution "
                      "with --logprobs raw (they are processed: pass --logprobs processed)", Text("them"))
        try:
            pairs += [(row, extras) for row in ADAPTERS[fmt](item, prompt_ids=extras.get("prompt_ids"), **kwargs)]
        except InputError as err:  # name the item of a list line
            if not at or not err.message.startswith("field '"):
                raise
            rest = err.message.removeprefix("field '")
            raise InputError(f"field '{at}{rest}") from None
    rows = _line_groups([row for row, _ in pairs], line, run, named=False)
    for row, (_, extras) in zip(rows, pairs):
        yield {**row, **{k: v for k, v in extras.items() if k != "prompt_ids"}}


def _line_groups(rows: Iterable[Row], line: str, run: str | None, named: bool) -> list[Row]:
    """A line's rows of one prompt are one group (FILE:LINE, FILE:LINE/K for its K-th prompt) unless the
    line named its groups; `run` prefixes the sample ids."""
    rows = list(rows)
    groups: dict[tuple[int, ...], int] = {}
    for row in rows:
        groups.setdefault(tuple(row["prompt_ids"]), len(groups))
    out = []
    for row in rows:
        if not named:
            row = {**row, "group_id": line if len(groups) == 1 else f"{line}/{groups[tuple(row['prompt_ids'])]}"}
        if run:
            row = {**row, "sample_id": f"{run}/{row['sample_id']}"}
        out.append(row)
    return out


def _versions_hint(row: Row, columns: set[str]) -> str:
    if "token_policy_versions" not in set(row) ^ columns:
        return ""
    return ("; rows sampled before the first named weights carry the engine's label 'default' and no versions: "
            "map it with --version-map default=N")


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
    for t, v in enumerate(row.get("token_policy_versions") or []):
        if mask[t] and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise bad(f"token_policy_versions[{t}]", "a policy version (integer >= 0)", v)
    for name in ("reward", "advantage", "temperature"):
        v = row.get(name)
        if name in row and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise bad(name, "a finite number", v)
    if "temperature" in row and row["temperature"] <= 0:
        raise bad("temperature", "a temperature > 0", row["temperature"])
