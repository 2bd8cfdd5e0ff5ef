"""What every engine adapter shares: the error wording, id / log-prob checks, weight-version spans."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from drpo_cli.base.errors import InputError

Row = dict[str, Any]

# The OpenAI shapes' floor for a log-prob: vLLM's server writes max(logprob, -9999.0), so -inf (a token the
# sampler could not have drawn) and a missing entry (ChatCompletionLogProb.logprob's default) read -9999.0
# (vllm/entrypoints/openai/completion/serving.py, chat_completion/serving.py and protocol.py). SGLang clamps
# -inf to float32's lowest value (sglang/srt/layers/sampler.py, target_logprobs.clamp_). A sampled token
# never has a log-prob this low, so such a value is a clamp, never a measurement.
CLAMP_FLOOR = -9999.0
# The label both engines report when the trainer never named the weights: vLLM's EngineCore
# (vllm/v1/engine/core.py, _weight_version = "default") and SGLang's --weight-version default
# (sglang/srt/arg_groups/fields/serving.py).
UNSET_VERSION = "default"


class Text(str):
    """A description of what was found (printed as is), rather than the value itself (printed as repr)."""


def bad(field: str, expected: str, found: Any) -> InputError:
    text = found if isinstance(found, Text) else _short(found)
    return InputError(f"field '{field}': expected {expected}, found {text}")


def _short(value: Any) -> str:
    text = "null" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def value_of(obj: Any, name: str, default: Any = None) -> Any:
    """obj.name or obj[name]: adapters take engine objects and their JSON dumps alike."""
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def as_token_ids(value: Any, field: str) -> list[int]:
    if value is None or isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise bad(field, "a list of token ids", value)
    out = []
    for i, v in enumerate(value.tolist() if hasattr(value, "tolist") else value):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise bad(f"{field}[{i}]", "a token id (integer >= 0)", v)
        out.append(v)
    return out


def as_logprob(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(field, "a log-prob (a number <= 0)", value)
    value = float(value)
    if not math.isfinite(value) or value > 0:
        raise bad(field, "a finite log-prob <= 0", value)
    if value <= CLAMP_FLOOR:
        raise bad(field, f"a log-prob > {CLAMP_FLOOR:g} (the engine writes {CLAMP_FLOOR:g} or lower for -inf and "
                  "for a missing entry: this token's log-prob was not logged)", value)
    return value


def check_normalized(entries: Iterable[Any], field: str) -> None:
    """Log-probs of one position's distinct tokens sum to at most 1 in probability; logits need not.

    vLLM's logprobs_mode raw_logits / processed_logits puts logits in the log-prob fields (vllm/v1/sample/
    sampler.py): negative logits pass every per-value check, but not this one once a position lists a few.
    """
    values = [float(v) for v in entries if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(values) > 1 and sum(math.exp(min(v, 50.0)) for v in values) > 1.0 + 1e-3:
        raise bad(field, "log-probs (their probabilities sum to at most 1)",
                  Text(f"values whose exp sums to {sum(math.exp(min(v, 50.0)) for v in values):.3g} (logits? vLLM: "
                       "serve with --logprobs-mode processed_logprobs, not *_logits)"))


def same_prompt(given: Iterable[int] | None, logged: Any, field: str) -> list[int] | None:
    """The prompt ids the caller gave, checked against those the engine logged (either may be missing)."""
    given = None if given is None else as_token_ids(given, "prompt_ids")
    if logged is None:
        return given
    logged = as_token_ids(logged, field)
    if given is not None and given != logged:
        raise bad("prompt_ids", f"the ids the engine logged in {field} ({_short(logged)})", given)
    return logged


def token_versions(spans: Any, n: int, field: str, version_map: Mapping[str, int] | None, *,
                   one_label: bool = False) -> list[int] | None:
    """Per-token policy versions from weight-version spans [{version, start, end}] over n output tokens.

    None when the engine reported no spans, or only its unset label "default" that the map does not name (the
    weights were never labelled: there is nothing to record). A label is an integer ("12") or a key of
    version_map; any other label is refused, naming the fix. one_label: field names a single label (SGLang's
    meta_info.weight_version) rather than a list of spans.
    """
    if spans is None:
        return None
    version_map = version_map or {}
    if not isinstance(spans, (list, tuple)):
        raise bad(field, "a list of {version, start, end} spans", spans)
    labels, out = [], []
    for k, span in enumerate(spans):
        where = f"{field}[{k}]"
        if isinstance(span, (list, tuple)) and len(span) == 3:  # msgspec array_like WeightVersionSpan (SGLang)
            version, start, end = span
        else:
            version, start, end = value_of(span, "version"), value_of(span, "start"), value_of(span, "end")
        if not isinstance(version, str) or not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end)):
            raise bad(where, "{version: str, start: int, end: int}", span)
        if start != len(out) or end < start or end > n:
            raise bad(where, f"a span starting at {len(out)} and ending by {n} (spans cover the output tokens in "
                      "order)", Text(f"[{start}, {end})"))
        labels.append(version)
        out.extend([version] * (end - start))
    if len(out) != n:
        raise bad(field, f"spans covering all {n} output tokens", Text(f"spans covering {len(out)}"))
    if all(label == UNSET_VERSION for label in labels) and UNSET_VERSION not in version_map:
        return None
    numbers = {}
    for k, label in enumerate(labels):
        if label in version_map:
            numbers[label] = int(version_map[label])
        elif label.isascii() and label.isdigit():
            numbers[label] = int(label)
        else:
            raise bad(field if one_label else f"{field}[{k}].version", "an integer label >= 0 or one named in the version map (Python: "
                      f"version_map={{{label!r}: N}}; drpo convert: --version-map {label}=N)", label)
    return [numbers[label] for label in out]


def parse_version_map(items: Iterable[str]) -> tuple[dict[str, int], list[str]]:
    """--version-map LABEL=N (repeatable) -> ({label: N}, problems)."""
    mapping: dict[str, int] = {}
    problems = []
    for item in items:
        label, sep, number = item.rpartition("=")
        if not sep or not label or not (number.isascii() and number.isdigit()):
            problems.append(f"--version-map: expected LABEL=N with an integer N >= 0, found {item!r}")
        elif label in mapping and mapping[label] != int(number):
            problems.append(f"--version-map: label {label!r} given twice ({mapping[label]} and {number})")
        else:
            mapping[label] = int(number)
    return mapping, problems
