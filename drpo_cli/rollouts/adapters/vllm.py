"""vLLM offline: `LLM.generate` -> list[RequestOutput] (vllm/outputs.py, vLLM 0.33.0), objects or JSON dumps.

Streamed outputs (`AsyncLLM.generate`, `SamplingParams(output_kind=...)`): an output of an unfinished request
(`finished: false`), a completion without `finish_reason`, or one whose `cumulative_logprob` is not the sum of
its log-probs (a `RequestOutputKind.DELTA` piece holds only its new tokens; the sum runs over all) is refused;
`assemble_stream` joins DELTA outputs (vllm/v1/engine/output_processor.py RequestState._new_completion_output).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from drpo_cli.rollouts.adapters.common import (
    Row,
    Text,
    as_logprob,
    as_token_ids,
    bad,
    check_normalized,
    same_prompt,
    token_versions,
    value_of,
)
from drpo_cli.rollouts.adapters.streams import Streams, assemble, fragment
from drpo_cli.rollouts.routing import routed_experts_from_vllm

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
    if value_of(outputs, "outputs") is not None:
        outputs = [outputs]
    prefix = f"{run}/" if run else ""
    for n, request in enumerate(outputs):
        rid = value_of(request, "request_id")
        rid = prefix + (str(n) if rid is None else str(rid))
        if value_of(request, "finished", True) is False:
            raise fragment("finished", "a finished request (true)", "false", "an output streamed before the request "
                           "ended (one RequestOutputKind.DELTA piece, or a CUMULATIVE output: only its last is whole)")
        prompt = same_prompt(prompt_ids, value_of(request, "prompt_token_ids"), "prompt_token_ids")
        if prompt is None:
            raise bad("prompt_token_ids", "the prompt's token ids", None)
        completions = value_of(request, "outputs")
        if not completions:
            raise bad("outputs", "at least one CompletionOutput", completions)
        for i, completion in enumerate(completions):
            where = f"outputs[{i}]"
            tokens = as_token_ids(value_of(completion, "token_ids"), f"{where}.token_ids")
            positions = _positions(value_of(completion, "logprobs"), tokens, f"{where}.logprobs")
            if value_of(completion, "finish_reason", "") is None:
                raise fragment(f"{where}.finish_reason", "why the output ended (stop, length, ...)", "null",
                               "an output streamed before it ended")
            values = [as_logprob(_sampled(positions[t], tok, f"{where}.logprobs[{t}]"), f"{where}.logprobs[{t}]")
                      for t, tok in enumerate(tokens)]
            _check_cumulative(value_of(completion, "cumulative_logprob"), values, where)
            _check_mask(value_of(completion, "sampling_mask"), tokens, f"{where}.sampling_mask",
                        positions if processed else None)
            row = {"prompt_ids": prompt, "response_ids": tokens, "behavior_logprobs": values,
                   "group_id": rid, "sample_id": f"{rid}/{value_of(completion, 'index', i)}"}
            versions = token_versions(value_of(completion, "weight_versions"), len(tokens), f"{where}.weight_versions",
                                      version_map)
            if versions is not None:
                row["token_policy_versions"] = versions
            routed = routed_experts_from_vllm(completion, len(prompt))  # MoE: enable_return_routed_experts
            if routed is not None:
                row["routed_experts"] = routed
            yield row


def _check_cumulative(cumulative: Any, values: list[float], where: str) -> None:
    """vLLM sums the sampled log-probs of every token so far (vllm/v1/engine/logprobs.py): a whole output's
    sum is its cumulative_logprob; a DELTA piece's is not (unless every earlier token had log-prob 0)."""
    if not _finite(cumulative):
        return
    total = sum(values)
    if not _same_sum(total, cumulative, len(values)):
        raise fragment(f"{where}.cumulative_logprob", f"the sum of the output's log-probs ({total:.6g})",
                       f"{cumulative:.6g}", "the output holds only the last tokens of a RequestOutputKind.DELTA "
                       "stream")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _same_sum(total: float, cumulative: float, n: int) -> bool:
    """Equal up to a logger's rounding (1e-6 per token); the engine's own sum is exact."""
    return abs(total - cumulative) <= 1e-6 * max(1, n)


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
        check_normalized((v if isinstance(v, (int, float)) else value_of(v, "logprob") for v in position.values()),
                         f"{field}[{t}]")
    return logprobs


def _flat_positions(flat: Mapping[str, Any], field: str) -> list[dict[int, float]]:
    """A FlatLogprobs dump -> one {token_id: logprob} per position (vllm/logprobs.py FlatLogprobs.__getitem__)."""
    starts, ends = as_token_ids(flat["start_indices"], f"{field}.start_indices"), as_token_ids(flat["end_indices"], f"{field}.end_indices")
    ids, values = as_token_ids(flat["token_ids"], f"{field}.token_ids"), flat["logprobs"]
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
    return entry if isinstance(entry, (int, float)) else value_of(entry, "logprob")


def _check_mask(mask: Any, tokens: list[int], field: str, processed_logprobs: Any = None) -> None:
    """SamplingMask.token_ids[t]: the tokens top-k/top-p/min-p kept at t (vllm/outputs.py SamplingMask).

    processed_logprobs (given when the caller records them as processed): vLLM's processed_logprobs are
    log-softmax over the kept support (vllm/v1/sample/ops/topk_topp_sampler.py), -inf outside it.
    """
    if mask is None:
        return
    support = value_of(mask, "token_ids")
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
            value = entry if isinstance(entry, (int, float)) else value_of(entry, "logprob")
            if int(key) not in kept and isinstance(value, (int, float)) and math.isfinite(value):
                logged = field.replace("sampling_mask", "logprobs")
                raise bad(f"{logged}[{t}]", f"processed log-probs (-inf outside {field}.token_ids[{t}])",
                          Text(f"token {key} outside it at {value:g}: these are raw log-probs (record --logprobs "
                               "raw, or log with logprobs_mode=processed_logprobs)"))



# ---- streams ----------------------------------------------------------------------------------------------


class VllmStreams(Streams):
    """`RequestOutputKind.DELTA` outputs, one stream per (request_id, output index).

    A DELTA output holds the tokens new since the last one: `token_ids`, their `logprobs` and
    `sampling_mask` rows; `cumulative_logprob` runs over all tokens so far; `weight_versions` (spans over the
    whole output) and `routed_experts` (every position) come with the final output only
    (vllm/v1/engine/output_processor.py _new_completion_output). The pieces are joined in order, each checked
    against the running sum of log-probs (a missing or repeated piece shows), and the final one gives
    `finish_reason`, `stop_reason` and the spans.
    """

    final_event = "its final output (finish_reason set)"

    def describe(self, key: Any) -> str:
        return f"request {key[0]!r} output {key[1]}"

    def response_key(self, key: Any) -> Any:
        return key[0]

    def pieces(self, data: Any) -> list:
        outputs = value_of(data, "outputs")
        if not isinstance(outputs, (list, tuple)):
            raise bad("outputs", "a RequestOutput's list of CompletionOutputs", outputs)
        rid = str(value_of(data, "request_id"))
        return [((rid, value_of(c, "index", i)), (data, c, i)) for i, c in enumerate(outputs)]

    def start(self, key: Any, piece: Any) -> dict:
        prompt = value_of(piece[0], "prompt_token_ids")
        state = {"key": key, "prompt": None if prompt is None else as_token_ids(prompt, "prompt_token_ids"), "tokens": [],
                 "logprobs": [], "mask": None, "routed": [], "text": [], "sum": 0.0, "final": piece}
        return self.extend(state, piece)

    def extend(self, state: dict, piece: Any) -> dict:
        data, completion, i = piece
        where = f"outputs[{i}]"
        prompt = value_of(data, "prompt_token_ids")
        if prompt is not None and state["prompt"] is not None and as_token_ids(prompt, "prompt_token_ids") != state["prompt"]:
            raise bad("prompt_token_ids", "the prompt ids of the request's first output", Text("other ids"))
        tokens = as_token_ids(value_of(completion, "token_ids"), f"{where}.token_ids")
        logprobs = _positions(value_of(completion, "logprobs"), tokens, f"{where}.logprobs")
        positions = [logprobs[t] for t in range(len(tokens))]
        values = [as_logprob(_sampled(p, tok, f"{where}.logprobs[{t}]"), f"{where}.logprobs[{t}]")
                  for t, (p, tok) in enumerate(zip(positions, tokens))]
        _check_running_sum(state, tokens, values, value_of(completion, "cumulative_logprob"), where)
        state["tokens"] += tokens
        state["logprobs"] += positions
        state["text"].append(value_of(completion, "text") or "")
        mask = value_of(completion, "sampling_mask")
        if mask is not None:
            state["mask"] = (state["mask"] or []) + list(value_of(mask, "token_ids") or [])
        routed = value_of(completion, "routed_experts")
        if routed is not None:
            state["routed"] += routed.tolist() if hasattr(routed, "tolist") else list(routed)
        state["final"] = piece
        return state

    def last(self, piece: Any) -> bool:
        return value_of(piece[1], "finish_reason") is not None

    def whole(self, state: dict) -> dict:
        _, completion, _ = state["final"]
        out = {"index": state["key"][1], "text": "".join(state["text"]), "token_ids": state["tokens"],
               "cumulative_logprob": value_of(completion, "cumulative_logprob"), "logprobs": state["logprobs"],
               "routed_experts": state["routed"] or None, "finish_reason": value_of(completion, "finish_reason"),
               "stop_reason": value_of(completion, "stop_reason"),
               "sampling_mask": None if state["mask"] is None else {"token_ids": state["mask"]},
               "weight_versions": value_of(completion, "weight_versions")}
        return {"request_id": state["key"][0], "prompt_token_ids": state["prompt"], "outputs": [out],
                "finished": True}


def _check_running_sum(state: dict, tokens: list[int], values: list[float], cumulative: Any, where: str) -> None:
    if not _finite(cumulative):
        return
    total, n = state["sum"] + sum(values), len(state["tokens"]) + len(tokens)
    if not _same_sum(total, cumulative, n):
        so_far = state["tokens"]
        if so_far and tokens[: len(so_far)] == so_far and _same_sum(sum(values), cumulative, len(tokens)):
            raise bad(f"{where}.cumulative_logprob", f"the sum of the log-probs streamed so far ({total:.6g})", Text(
                f"{cumulative:.6g}, the sum of this output's alone: a RequestOutputKind.CUMULATIVE stream (each "
                "output holds every token so far): its final output is the whole response: convert it alone, "
                "without --stream"))
        raise bad(f"{where}.cumulative_logprob", f"the sum of the log-probs streamed so far ({total:.6g})", Text(
            f"{cumulative:.6g}: outputs of this stream are missing from the log, or out of order"))
    state["sum"] = total


def assemble_stream(outputs: Iterable[Any]) -> Iterator[dict]:
    """Whole RequestOutputs from streamed `RequestOutputKind.DELTA` ones, one per (request_id, output index).

    `outputs`: what `AsyncLLM.generate(..., SamplingParams(output_kind=RequestOutputKind.DELTA, logprobs=0))`
    yields (objects), or their JSON dumps, in order; requests may interleave. Each output's whole response
    is yielded when its final piece arrives, for `vllm_rows`:

        async for out in engine.generate(prompt, params, request_id):
            outputs.append(out)
        rows = [row for whole in assemble_stream(outputs) for row in vllm_rows(whole)]

    An output whose final piece never comes is refused at the end (InputError naming it).
    """
    return assemble(VllmStreams(), outputs)
