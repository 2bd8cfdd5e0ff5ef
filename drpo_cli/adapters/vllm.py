"""vLLM offline: `LLM.generate` -> list[RequestOutput] (vllm/outputs.py, vLLM 0.33.0), objects or JSON dumps."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from drpo_cli.adapters.common import (
    Row,
    Text,
    _get,
    _ids,
    _logprob,
    bad,
    check_normalized,
    same_prompt,
    token_versions,
)
from drpo_cli.routing import routed_experts_from_vllm

# vllm/logprobs.py FlatLogprobs, the column form of SampleLogprobs (LLM(..., flat_logprobs=True)): position t
# holds token_ids/logprobs[start_indices[t]:end_indices[t]]. A JSON dump (dataclasses.asdict) is a dict.
FLAT_FIELDS = ("start_indices", "end_indices", "token_ids", "logprobs")


def vllm_rows(outputs: Any, *, run: str | None = None, prompt_ids: Iterable[int] | None = None,
              version_map: Mapping[str, int] | None = None, processed: bool | None = None) -> Iterator[Row]:
    """Rows from vLLM `RequestOutput`s (one, or a list) sampled with `SamplingParams(logprobs=0)`.

    Each `outputs[i]` (a CompletionOutput) is one row: `token_ids` and, per position, the Logprob of the
    sampled token from `logprobs[t][token_ids[t]]` (a list of {token_id: Logprob}, or FlatLogprobs).
    group_id is the request_id, which `LLM.generate` counts per process ("0", "1", ...;
    vllm/entrypoints/common/offline.py): pass `run` (e.g. "run-7") to prefix it when rows of several runs
    meet. With `return_sampling_mask=True` each sampled token is checked against its kept support
    (`sampling_mask.token_ids[t]`), and with `processed=True` (what the caller will record) a listed token
    outside it must have log-prob -inf: a finite one shows raw log-probs. `weight_versions` spans fill `token_policy_versions` (see
    common.token_versions). Log-probs are what `logprobs_mode` made them: record "processed" only with
    `LLM(..., logprobs_mode="processed_logprobs")` (the default is raw_logprobs).
    """
    if _get(outputs, "outputs") is not None:
        outputs = [outputs]
    prefix = f"{run}/" if run else ""
    for n, request in enumerate(outputs):
        rid = _get(request, "request_id")
        rid = prefix + (str(n) if rid is None else str(rid))
        prompt = same_prompt(prompt_ids, _get(request, "prompt_token_ids"), "prompt_token_ids")
        if prompt is None:
            raise bad("prompt_token_ids", "the prompt's token ids", None)
        completions = _get(request, "outputs")
        if not completions:
            raise bad("outputs", "at least one CompletionOutput", completions)
        for i, completion in enumerate(completions):
            where = f"outputs[{i}]"
            tokens = _ids(_get(completion, "token_ids"), f"{where}.token_ids")
            positions = _positions(_get(completion, "logprobs"), tokens, f"{where}.logprobs")
            values = [_logprob(_sampled(positions[t], tok, f"{where}.logprobs[{t}]"), f"{where}.logprobs[{t}]")
                      for t, tok in enumerate(tokens)]
            _check_mask(_get(completion, "sampling_mask"), tokens, f"{where}.sampling_mask",
                        positions if processed else None)
            row = {"prompt_ids": prompt, "response_ids": tokens, "behavior_logprobs": values,
                   "group_id": rid, "sample_id": f"{rid}/{_get(completion, 'index', i)}"}
            versions = token_versions(_get(completion, "weight_versions"), len(tokens), f"{where}.weight_versions",
                                      version_map)
            if versions is not None:
                row["token_policy_versions"] = versions
            routed = routed_experts_from_vllm(completion, len(prompt))  # MoE: enable_return_routed_experts
            if routed is not None:
                row["routed_experts"] = routed
            yield row


def _positions(logprobs: Any, tokens: list[int], field: str) -> Any:
    """One {token_id: Logprob} per output token, from the list, a FlatLogprobs, or its JSON dump."""
    if logprobs is None:
        raise bad(field, "per-token log-probs (sample with SamplingParams(logprobs=0))", None)
    if isinstance(logprobs, Mapping):
        if not all(k in logprobs for k in FLAT_FIELDS):
            raise bad(field, "a list of {token_id: Logprob} per position, or FlatLogprobs "
                      f"({', '.join(FLAT_FIELDS)})", Text(f"an object with keys {sorted(logprobs)[:6]}"))
        logprobs = _flat_positions(logprobs, field)
    if len(logprobs) != len(tokens):
        raise bad(field, f"{len(tokens)} positions (one per token_ids entry)", Text(f"{len(logprobs)}"))
    for t in range(len(tokens)):
        position = logprobs[t]
        if not isinstance(position, Mapping) and not hasattr(position, "get"):
            raise bad(f"{field}[{t}]", "a mapping token_id -> Logprob", position)
        check_normalized((v if isinstance(v, (int, float)) else _get(v, "logprob") for v in position.values()),
                         f"{field}[{t}]")
    return logprobs


def _flat_positions(flat: Mapping[str, Any], field: str) -> list[dict[int, float]]:
    """A FlatLogprobs dump -> one {token_id: logprob} per position (vllm/logprobs.py FlatLogprobs.__getitem__)."""
    starts, ends = _ids(flat["start_indices"], f"{field}.start_indices"), _ids(flat["end_indices"], f"{field}.end_indices")
    ids, values = _ids(flat["token_ids"], f"{field}.token_ids"), flat["logprobs"]
    if len(starts) != len(ends) or not isinstance(values, list) or len(values) != len(ids):
        raise bad(field, "start_indices and end_indices of one length, token_ids and logprobs of one length",
                  Text(f"lengths {len(starts)}, {len(ends)}, {len(ids)}, "
                       f"{len(values) if isinstance(values, list) else type(values).__name__}"))
    positions = []
    for t, (s, e) in enumerate(zip(starts, ends)):
        if not s <= e <= len(ids):
            raise bad(f"{field}.end_indices[{t}]", f"a range [start, end) inside the {len(ids)} entries",
                      Text(f"[{s}, {e})"))
        positions.append(dict(zip(ids[s:e], values[s:e])))
    return positions


def _sampled(position: Any, token: int, field: str) -> Any:
    """The sampled token's log-prob from one position's {token_id: Logprob | {logprob: x} | x}."""
    entry = position.get(token)
    if entry is None:
        entry = position.get(str(token))  # JSON dumps turn the int keys into strings
    if entry is None:
        raise bad(field, f"an entry for the sampled token {token}", Text(f"keys {sorted(position)[:5]}"))
    return entry if isinstance(entry, (int, float)) else _get(entry, "logprob")


def _check_mask(mask: Any, tokens: list[int], field: str, processed_logprobs: Any = None) -> None:
    """SamplingMask.token_ids[t]: the tokens top-k/top-p/min-p kept at t (vllm/outputs.py SamplingMask).

    processed_logprobs (given when the caller records them as processed): vLLM's processed_logprobs are
    log-softmax over the kept support (vllm/v1/sample/ops/topk_topp_sampler.py), -inf outside it.
    """
    if mask is None:
        return
    support = _get(mask, "token_ids")
    if not isinstance(support, (list, tuple)) or len(support) != len(tokens):
        raise bad(f"{field}.token_ids", f"{len(tokens)} kept-token lists (one per output token)",
                  Text(f"{len(support) if isinstance(support, (list, tuple)) else type(support).__name__}"))
    for t, (kept, tok) in enumerate(zip(support, tokens)):
        if tok not in kept:
            raise bad(f"{field}.token_ids[{t}]", f"a support holding the sampled token {tok}",
                      Text(f"{len(kept)} tokens without it"))
    if processed_logprobs is None:
        return
    for t, (kept, position) in enumerate(zip(support, processed_logprobs)):
        for key, entry in position.items():
            value = entry if isinstance(entry, (int, float)) else _get(entry, "logprob")
            if int(key) not in kept and isinstance(value, (int, float)) and math.isfinite(value):
                logged = field.replace("sampling_mask", "logprobs")
                raise bad(f"{logged}[{t}]", f"processed log-probs (-inf outside {field}.token_ids[{t}])",
                          Text(f"token {key} outside it at {value:g}: these are raw log-probs (record --logprobs "
                               "raw, or log with logprobs_mode=processed_logprobs)"))

