"""`drpo convert`: JSONL dumps (one response per line) -> one schema-v1 Arrow file. No torch.

Lines are read one at a time and written through RolloutWriter in record batches, so memory is
bounded. Every bad line is reported (`FILE:LINE: field 'x': expected ..., found ...`), and when
any line is bad no output file is left.

With `--stream` each line is one event of a streamed response (an SSE `data:` line, or its JSON); the
engine module's `Streams` holds each open stream until its final event and hands back the whole response,
which the adapter reads as if unstreamed (`_StreamLines`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drpo_cli.base.errors import ConfigError, InputError
from drpo_cli.base.outputs import Output, claimed, output_problems
from drpo_cli.rollouts.adapters import ADAPTERS, STREAMS, Row, Text, as_token_ids, bad
from drpo_cli.rollouts.adapters.common import parse_version_map
from drpo_cli.rollouts.adapters.sglang import has_sampling_logprobs
from drpo_cli.rollouts.adapters.streams import Streams, payload
from drpo_cli.rollouts.llamacpp import LlamacppStreams, llamacpp_server_rows
from drpo_cli.rollouts.schema import COLUMN_BY_NAME, TOKEN_COLUMNS, column_map_problems
from drpo_cli.rollouts.writer import RolloutWriter, check_logprobs_kind, truncates

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
    stream: bool = False  # --stream: each line is one event of a streamed response

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
        if self.stream and self.format == "jsonl":
            problems.append("--stream: expected an engine --format (vllm, openai, sglang, llamacpp), found jsonl")
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
    check = _RowCheck(cfg.format, cfg.stream)
    try:
        prefixes = dict(zip(cfg.inputs, cfg.run_prefix * len(cfg.inputs) if len(cfg.run_prefix) == 1
                            else cfg.run_prefix))
        for path in cfg.inputs:
            streams = _StreamLines(cfg, mapping, path, prefixes.get(path)) if cfg.stream else None
            for number, text in _lines(path):
                lines += 1
                try:
                    rows = streams.feed(number, text) if streams else \
                        list(_rows(json_line(text), cfg, mapping, f"{path}:{number}", prefixes.get(path)))
                    check(rows, path, number)
                except InputError as err:
                    total_bad += 1
                    if len(problems) < MAX_LISTED:
                        problems.append(f"{path}:{number}: {err.message}")
                    continue
                if not total_bad:  # once a line is bad nothing will be kept: stop writing
                    writer.write_rows(rows)
            for problem in streams.close() if streams else []:
                total_bad += 1
                if len(problems) < MAX_LISTED:
                    problems.append(problem)
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


class _RowCheck:
    """Per line: drpo validate's row checks, one set of fields throughout, no engine sample id twice."""

    def __init__(self, fmt: str, stream: bool) -> None:
        self.fmt, self.stream = fmt, stream
        self.columns: set[str] | None = None
        self.seen: dict[str, tuple[str, int]] = {}  # sample_id -> the line that wrote it (engine ids repeat across runs)

    def __call__(self, rows: list[Row], path: str, number: int) -> None:
        for row in rows:
            check_row(row)
            if self.columns is None:
                self.columns = set(row)
            elif set(row) != self.columns:
                raise InputError(f"fields {', '.join(sorted(row))}: expected the fields of the first "
                                 f"row ({', '.join(sorted(self.columns))}){_versions_hint(row, self.columns)}")
            sid = row.get("sample_id")
            if self.fmt == "jsonl" or sid is None:
                continue
            if str(sid) in self.seen:
                first, line = self.seen[str(sid)]
                fix = ("engine ids repeat across runs: give each input its own --run-prefix" if first != path else
                       "in this same input: one response logged twice" if self.stream else
                       "in this same input: one response logged twice, or lines of one streamed response (pass "
                       "--stream; see docs/rollouts.md)")
                raise bad("sample_id", f"an id not written before (it was on {first}:{line}; {fix})", sid)
            self.seen[str(sid)] = (path, number)


def _lines(name: str) -> Iterator[tuple[int, str]]:
    path = Path(name)
    if not path.is_file():
        raise InputError(f"{name}: expected a JSONL file, found {'a directory' if path.is_dir() else 'no such file'}")
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, text in enumerate(fh, start=1):
            if text.strip():
                yield number, text


def json_line(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("data:"):
            raise InputError("expected a JSON object, found an SSE line ('data: ...'), one event of a streamed "
                             "response: pass --stream with the engine's --format; see docs/rollouts.md") from None
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
    pairs = []
    for k, (item, extras) in enumerate(fields):
        at = f"[{k}]." if isinstance(obj, list) else ""
        try:
            pairs += [(row, extras) for row in _adapter_rows(cfg, item, extras.get("prompt_ids"), at)]
        except InputError as err:  # name the item of a list line
            if not at or not err.message.startswith("field '") or err.message.startswith(f"field '{at}"):
                raise
            rest = err.message.removeprefix("field '")
            raise InputError(f"field '{at}{rest}") from None
    rows = _line_groups([row for row, _ in pairs], line, run, named=False)
    for row, (_, extras) in zip(rows, pairs):
        yield {**row, **{k: v for k, v in extras.items() if k != "prompt_ids"}}


def _adapter_rows(cfg: ConvertConfig, item: Any, prompt_ids: Any, at: str = "") -> list[Row]:
    """The rows of one engine response, read by its --format's adapter with the options that bear on it."""
    fmt = cfg.format
    if fmt == "llamacpp":
        return list(llamacpp_server_rows(item, prompt_ids))
    if fmt == "sglang" and cfg.logprobs == "raw" and has_sampling_logprobs(item):
        raise bad(f"{at}meta_info.output_token_sampling_logprobs", "no log-probs of the sampled distribution "
                  "with --logprobs raw (they are processed: pass --logprobs processed)", Text("them"))
    kwargs: dict[str, Any] = {"version_map": parse_version_map(cfg.version_map)[0]}
    if fmt in ("sglang", "openai"):
        kwargs["truncated"] = truncates(cfg.top_p, cfg.top_k, cfg.min_p)
    if fmt == "vllm":
        kwargs["processed"] = cfg.logprobs == "processed"
    return list(ADAPTERS[fmt](item, prompt_ids=prompt_ids, **kwargs))


class _StreamLines:
    """`--stream`: one input's lines as stream events; the rows of each stream when its final event comes.

    Held while a stream is open: what its engine's `Streams` keeps (its events' tokens, log-probs and ids so
    far), the line it began on and the schema-v1 fields given next to its events. Held per response until
    the input ends: the line of its first event and the hashes of its prompts (for group ids), beside the
    sample ids every format keeps for the repeated-id check.
    """

    def __init__(self, cfg: ConvertConfig, mapping: dict[str, str], path: str, run: str | None) -> None:
        self.cfg, self.mapping, self.path, self.run = cfg, mapping, path, run
        self.streams: Streams = LlamacppStreams() if cfg.format == "llamacpp" else STREAMS[cfg.format]()
        self.open: dict[Any, dict] = {}  # stream key -> {first, extras}
        self.groups: dict[Any, tuple[int, list[int]]] = {}  # response key -> (its first line, its prompts' hashes)

    def feed(self, number: int, text: str) -> list[Row]:
        data, extras = self._event(payload(text))
        keys, done = self.streams.feed(data) if data is not None else ([], [])
        if extras and not keys:
            raise bad(next(iter(extras)), "a field next to an event of a stream", Text("an event that continues "
                                                                                      "none"))
        for key in keys:
            info = self.open.setdefault(key, {"first": number, "extras": {}})
            for name, value in extras.items():
                if info["extras"].get(name, value) != value:
                    raise bad(name, f"the value given earlier for this stream ({info['extras'][name]!r})", value)
                info["extras"][name] = value
            self.groups.setdefault(self.streams.response_key(key), (number, []))
        rows = []
        for key, response in done:
            info = self.open.pop(key)
            try:
                rows += self._rows(key, response, info["extras"])
            except InputError as err:
                raise InputError(f"{self.streams.describe(key)} (lines {info['first']}-{number}): "
                                 f"{err.message}") from None
        return rows

    def close(self) -> list[str]:
        """The streams still open at the end of the input, one problem each at the line it began."""
        problems = [f"{self.path}:{self.open[key]['first']}: {message}" for key, message in self.streams.left_open()]
        self.open.clear()
        self.groups.clear()
        return problems

    def _event(self, data: Any) -> tuple[Any, Row]:
        """The engine's event, and the schema-v1 fields a logger put next to it."""
        if not isinstance(data, Mapping):
            return data, {}
        if self.mapping:
            data = {self.mapping.get(k, k): v for k, v in data.items()}
        named = [k for k in data if k in COLUMN_BY_NAME]  # a few keys per event: the common case is none
        if not named:
            return data, {}
        for name in _FROM_RESPONSE:
            if name in named:
                raise bad(name, "no such field next to an engine event (the adapter reads it from the stream)",
                          Text("one"))
        return {k: v for k, v in data.items() if k not in named}, {k: data[k] for k in named}

    def _rows(self, key: Any, response: Any, extras: Row) -> list[Row]:
        first, prompts = self.groups[self.streams.response_key(key)]
        out = []
        for row in _adapter_rows(self.cfg, response, extras.get("prompt_ids")):
            if "group_id" not in extras:  # FILE:LINE of the response's first event; /K for its K-th other prompt
                prompt = hash(tuple(row["prompt_ids"]))
                if prompt not in prompts:
                    prompts.append(prompt)
                k = prompts.index(prompt)
                row["group_id"] = f"{self.path}:{first}" + (f"/{k}" if k else "")
            if self.run and "sample_id" in row:
                row["sample_id"] = f"{self.run}/{row['sample_id']}"
            out.append({**row, **{k: v for k, v in extras.items() if k != "prompt_ids"}})
        return out


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
    as_token_ids(row["prompt_ids"], "prompt_ids")
    response = as_token_ids(row["response_ids"], "response_ids")
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
