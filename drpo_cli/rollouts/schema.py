"""Rollout schema v1 (SPEC.md §3), defined once here: the columns and their types, the metadata keys, the
`Problem` every check reports. No torch.

`COLUMNS` is the single source of truth; `schemas/rollout-v1.json` is `schema_document()` written
out, and a test keeps the two equal. rules.py holds the rules on the values, files.py opens and streams
rollout files in these types and validate.py reports every problem at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa

from drpo_cli.base.errors import ConfigError

SCHEMA_VERSION = "1"
ROLLOUT_SUFFIXES = (".arrow", ".feather", ".ipc", ".parquet")


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
    if is_list(t):
        kind = "large_list" if pa.types.is_large_list(t) else "list"
        return f"{kind}<{type_name(t.value_type)}>"
    if pa.types.is_dictionary(t):
        return f"dictionary<{type_name(t.value_type)}>"
    return _SHORT_NAMES.get(str(t), str(t))


def is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def accepts(canonical: pa.DataType, found: pa.DataType) -> bool:
    """Whether a logged type can be cast losslessly enough to the canonical type."""
    if pa.types.is_dictionary(found):
        found = found.value_type
    if pa.types.is_list(canonical):
        return is_list(found) and accepts(canonical.value_type, found.value_type)
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
