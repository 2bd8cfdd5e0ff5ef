"""Adapters: the outputs samplers actually return -> schema-v1 row dicts for RolloutWriter.

Pure functions, no heavy imports (torch is imported inside `hf_rows` only). Each yields dicts with
`prompt_ids`, `response_ids`, `behavior_logprobs`, `group_id` (one id per prompt / request) and
`sample_id`; the caller adds a reward (or advantages) and writes them:

    with RolloutWriter("r.arrow", temperature=0.7, sampler="vllm 0.11") as w:
        for row in vllm_rows(llm.generate(prompts, params)):
            w.write(**row, reward=score(row))

Field names follow, and the test fixtures are recorded in the shapes of: vLLM 0.11 (offline
`RequestOutput` / `CompletionOutput`, logprobs a list of {token_id: Logprob} per position, and the
OpenAI-compatible server's `return_token_ids` / `return_tokens_as_token_ids`), SGLang 0.5 (native
`/generate` with `return_logprob`, `meta_info.output_token_logprobs` = [logprob, token_id, text]
triples) and transformers 5 (`generate(..., output_logits=True, return_dict_in_generate=True)`).

Every malformed input raises InputError `field 'x': expected ..., found ...`; `drpo convert`
prefixes it with FILE:LINE.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from drpo_cli.errors import InputError
from drpo_cli.routing import routed_experts_from_vllm

Row = dict[str, Any]


class Text(str):
    """A description of what was found (printed as is), rather than the value itself (printed as repr)."""


def bad(field: str, expected: str, found: Any) -> InputError:
    text = found if isinstance(found, Text) else _short(found)
    return InputError(f"field '{field}': expected {expected}, found {text}")


def _short(value: Any) -> str:
    text = "null" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """obj.name or obj[name]: adapters take engine objects and their JSON dumps alike."""
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _ids(value: Any, field: str) -> list[int]:
    if value is None or isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise bad(field, "a list of token ids", value)
    out = []
    for i, v in enumerate(value.tolist() if hasattr(value, "tolist") else value):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise bad(f"{field}[{i}]", "a token id (integer >= 0)", v)
        out.append(v)
    return out


def _logprob(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(field, "a log-prob (a number <= 0)", value)
    value = float(value)
    if not math.isfinite(value) or value > 0:
        raise bad(field, "a finite log-prob <= 0", value)
    return value


# ---- vLLM offline: LLM.generate -> list[RequestOutput] ------------------------------------------


def vllm_rows(outputs: Any) -> Iterator[Row]:
    """Rows from vLLM `RequestOutput`s (one, or a list) sampled with `SamplingParams(logprobs=0)`.

    Each `outputs[i]` (a CompletionOutput) is one row: `token_ids` and, per position, the Logprob
    of the sampled token from `logprobs[t][token_ids[t]]`. group_id is the request_id.
    Log-probs are what the engine's `logprobs_mode` made them: pass `logprobs="processed"` to the
    writer only with `LLM(..., logprobs_mode="processed_logprobs")` (V1 defaults to raw).
    """
    if _get(outputs, "outputs") is not None:
        outputs = [outputs]
    for n, request in enumerate(outputs):
        rid = _get(request, "request_id")
        rid = str(n) if rid is None else str(rid)
        prompt = _ids(_get(request, "prompt_token_ids"), "prompt_token_ids")
        completions = _get(request, "outputs")
        if not completions:
            raise bad("outputs", "at least one CompletionOutput", completions)
        for i, completion in enumerate(completions):
            where = f"outputs[{i}]"
            tokens = _ids(_get(completion, "token_ids"), f"{where}.token_ids")
            logprobs = _get(completion, "logprobs")
            if logprobs is None:
                raise bad(f"{where}.logprobs", "per-token log-probs (sample with SamplingParams(logprobs=0))", None)
            if len(logprobs) != len(tokens):
                raise bad(f"{where}.logprobs", f"{len(tokens)} entries (one per token_ids entry)",
                          Text(f"{len(logprobs)}"))
            values = [_logprob(_sampled(logprobs[t], tok, f"{where}.logprobs[{t}]"), f"{where}.logprobs[{t}]")
                      for t, tok in enumerate(tokens)]
            index = _get(completion, "index", i)
            routed = routed_experts_from_vllm(completion, len(prompt))  # MoE: enable_return_routed_experts
            yield {"prompt_ids": prompt, "response_ids": tokens, "behavior_logprobs": values,
                   "group_id": rid, "sample_id": f"{rid}/{index}", **({} if routed is None else {"routed_experts": routed})}


def _sampled(position: Any, token: int, field: str) -> float:
    """The sampled token's log-prob from one position's {token_id: Logprob | {logprob: x} | x}."""
    if not isinstance(position, Mapping) and not hasattr(position, "get"):
        raise bad(field, "a mapping token_id -> Logprob", position)
    entry = position.get(token)
    if entry is None:
        entry = position.get(str(token))  # JSON dumps turn the int keys into strings
    if entry is None:
        raise bad(field, f"an entry for the sampled token {token}", Text(f"keys {sorted(position)[:5]}"))
    return entry if isinstance(entry, (int, float)) else _get(entry, "logprob")


# ---- OpenAI-compatible completions and chat (vLLM, SGLang servers) --------------------------------


def openai_rows(response: Any, prompt_ids: Iterable[int] | None = None) -> Iterator[Row]:
    """Rows from an OpenAI-compatible `/v1/completions` or `/v1/chat/completions` response.

    Asked with `logprobs` (completions: `logprobs=0`; chat: `logprobs=true`) and token ids:
    vLLM's `return_token_ids=true` adds `choices[i].token_ids` and `prompt_token_ids`;
    `return_tokens_as_token_ids=true` spells each logged token "token_id:N". Without the server's
    prompt ids pass `prompt_ids` (the ids you sent). group_id is the response id.
    """
    if hasattr(response, "model_dump"):  # the openai client's pydantic objects
        response = response.model_dump()
    rid = str(_get(response, "id") or "0")
    choices = _get(response, "choices")
    if not choices:
        raise bad("choices", "a non-empty list", choices)
    for i, choice in enumerate(choices):
        where = f"choices[{i}]"
        logprobs = _get(choice, "logprobs")
        if not logprobs:
            raise bad(f"{where}.logprobs", "per-token log-probs (request logprobs)", logprobs)
        content = _get(logprobs, "content")
        if content is not None:  # chat: [{token, logprob, bytes, top_logprobs}]
            tokens = [_get(c, "token") for c in content]
            values = [_logprob(_get(c, "logprob"), f"{where}.logprobs.content[{t}].logprob")
                      for t, c in enumerate(content)]
            token_field = f"{where}.logprobs.content[*].token"
        else:  # completions: parallel lists tokens / token_logprobs
            tokens = _get(logprobs, "tokens") or []
            raw = _get(logprobs, "token_logprobs")
            if raw is None:
                raise bad(f"{where}.logprobs.token_logprobs", "a list of log-probs", None)
            values = [_logprob(v, f"{where}.logprobs.token_logprobs[{t}]") for t, v in enumerate(raw)]
            token_field = f"{where}.logprobs.tokens"
        ids = _get(choice, "token_ids")
        if ids is not None:
            response_ids = _ids(ids, f"{where}.token_ids")
        else:
            response_ids = [_token_id(tok, f"{token_field}[{t}]") for t, tok in enumerate(tokens)]
        if len(response_ids) != len(values):
            raise bad(f"{where}.logprobs", f"{len(response_ids)} log-probs (one per response token)",
                      Text(f"{len(values)}"))
        prompt = prompt_ids if prompt_ids is not None else _get(choice, "prompt_token_ids")
        if prompt is None:
            prompt = _get(response, "prompt_token_ids")
        if prompt is None:
            raise bad("prompt_token_ids", "the prompt's token ids (request return_token_ids=true, "
                      "or pass prompt_ids)", None)
        yield {"prompt_ids": _ids(prompt, "prompt_token_ids"), "response_ids": response_ids,
               "behavior_logprobs": values, "group_id": rid, "sample_id": f"{rid}/{_get(choice, 'index', i)}"}


def _token_id(token: Any, field: str) -> int:
    """'token_id:123' (vLLM's return_tokens_as_token_ids) -> 123."""
    if isinstance(token, str) and token.startswith("token_id:") and token[9:].isdigit():
        return int(token[9:])
    raise bad(field, "'token_id:N' (request return_tokens_as_token_ids=true, or return_token_ids=true)", token)


# ---- SGLang native /generate ------------------------------------------------------------------------


def sglang_rows(response: Any, prompt_ids: Iterable[int] | None = None) -> Iterator[Row]:
    """Rows from SGLang `/generate` (or `Engine.generate`) output, one dict or a list, with `return_logprob`.

    Response tokens and log-probs come from `meta_info.output_token_logprobs` ([logprob, token_id,
    text] per token). Prompt ids: `prompt_ids`, else `meta_info.input_token_logprobs` (ask with
    `logprob_start_len=0`; the first entry's log-prob is null). group_id: the index of the first
    item with the same prompt ids (a batch with `n` samples per prompt groups them).
    """
    items = response if isinstance(response, list) else [response]
    groups: dict[tuple[int, ...], int] = {}
    for n, item in enumerate(items):
        meta = _get(item, "meta_info")
        if meta is None:
            raise bad("meta_info", "the response's meta_info object", None)
        triples = _get(meta, "output_token_logprobs")
        if not triples:
            raise bad("meta_info.output_token_logprobs", "[logprob, token_id, text] per token (request "
                      "return_logprob=true)", triples)
        values, tokens = [], []
        for t, triple in enumerate(triples):
            field = f"meta_info.output_token_logprobs[{t}]"
            if not isinstance(triple, (list, tuple)) or len(triple) < 2:
                raise bad(field, "[logprob, token_id, text]", triple)
            values.append(_logprob(triple[0], f"{field}[0]"))
            tokens.append(_ids([triple[1]], f"{field}[1]")[0])
        prompt = prompt_ids
        if prompt is None:
            inputs = _get(meta, "input_token_logprobs")
            if not inputs:
                raise bad("meta_info.input_token_logprobs", "the prompt's [logprob, token_id, text] triples "
                          "(request logprob_start_len=0), or pass prompt_ids", inputs)
            prompt = [triple[1] if isinstance(triple, (list, tuple)) and len(triple) >= 2 else triple
                      for triple in inputs]
        prompt = _ids(prompt, "prompt_ids")
        rid = str(_get(meta, "id") or n)
        group = groups.setdefault(tuple(prompt), n)
        yield {"prompt_ids": prompt, "response_ids": tokens, "behavior_logprobs": values,
               "group_id": str(group), "sample_id": rid}


# ---- Hugging Face transformers generate ---------------------------------------------------------------


def hf_rows(output: Any, input_ids: Any, *, attention_mask: Any = None, temperature: float = 1.0,
            top_k: int | None = 50, top_p: float | None = 1.0,
            eos_token_id: int | Iterable[int] | None = None) -> Iterator[Row]:
    """Rows from `model.generate(input_ids, ..., do_sample=True, output_logits=True, return_dict_in_generate=True)`.

    Behavior log-probs are recomputed from the raw logits with the sampler's own processors, in
    transformers' order (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper), so pass the
    same temperature / top_k / top_p you gave generate. The defaults are transformers' own when
    generate is given none of them (temperature 1, top_k 50, top_p 1). A response is cut after
    its first EOS (the EOS is kept: it was sampled); the padding after it is never logged.
    Left-padded prompts are stripped with `attention_mask`. `num_return_sequences=n` rows are
    grouped by prompt (group_id = prompt index).
    """
    import torch
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = _get(output, "logits")
    if logits is None:
        raise bad("logits", "per-step raw logits (generate with output_logits=True, return_dict_in_generate=True)",
                  None)
    sequences = _get(output, "sequences")
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    batch, prompt_len = input_ids.shape
    rows, steps = sequences.shape[0], len(logits)
    if rows % batch or sequences.shape[1] != prompt_len + steps:
        raise bad("sequences", f"(k * {batch}, {prompt_len} + {steps}) ids", Text(f"shape {tuple(sequences.shape)}"))
    per_prompt = rows // batch
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else torch.as_tensor(attention_mask).bool()

    processors = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k is not None and top_k != 0:
        processors.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))

    response = sequences[:, prompt_len:]  # (N, S)
    logp = torch.empty(response.shape, dtype=torch.float32)  # (N, S)
    with torch.no_grad():
        for t in range(steps):
            scores = processors(sequences[:, : prompt_len + t], logits[t].float())  # (N, V)
            logp[:, t] = torch.log_softmax(scores, dim=-1).gather(1, response[:, t : t + 1])[:, 0]
    eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    for r in range(rows):
        p = r // per_prompt
        tokens = response[r].tolist()
        # Without an EOS the row ran to max_new_tokens; generate pads only after a row's EOS.
        end = next((t + 1 for t, tok in enumerate(tokens) if tok in eos), len(tokens))
        yield {"prompt_ids": input_ids[p][mask[p]].tolist(), "response_ids": tokens[:end],
               "behavior_logprobs": logp[r, :end].tolist(), "group_id": str(p), "sample_id": f"{p}/{r % per_prompt}"}


ADAPTERS = {"vllm": vllm_rows, "openai": openai_rows, "sglang": sglang_rows}
