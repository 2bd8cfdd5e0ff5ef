"""OpenAI-compatible `/v1/completions` and `/v1/chat/completions` responses of vLLM 0.33 and SGLang 0.5.23.

Shapes (objects from the `openai` client, or their JSON):
- vLLM: vllm/entrypoints/openai/completion/protocol.py CompletionResponseChoice (`token_ids`,
  `prompt_token_ids` with `return_token_ids=true`; `weight_versions` with `return_weight_versions=true`),
  chat_completion/protocol.py ChatCompletionResponse (`prompt_token_ids` on the response, `token_ids` on each
  choice) and `return_tokens_as_token_ids=true` spelling each logged token "token_id:N".
- SGLang: sglang/srt/entrypoints/openai/protocol.py CompletionResponseChoice (`token_ids`, `prompt_token_ids`
  with `return_token_ids=true`), ChatCompletionResponseChoice (`response_token_ids`, `prompt_token_ids`;
  `meta_info` with `return_meta_info=true`) and the response's `metadata` (serving_chat.py /
  serving_completions.py: build_endpoint_weight_version_metadata of the *first* request's meta_info).
"""

from __future__ import annotations

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
from drpo_cli.adapters.sglang import (
    SAMPLING_MASK_FIX,
    labelled,
    meta_versions,
    sampling_logprobs,
    untruncated,
)

HINTS = {  # per engine: how to ask for what is missing
    "vllm": {"ids": "vLLM: request return_token_ids=true (choices[i].token_ids) or return_tokens_as_token_ids=true",
             "prompt": "vLLM: request return_token_ids=true, or pass the prompt ids you sent",
             "logprobs": "vLLM: request logprobs (completions: logprobs=0; chat: logprobs=true); a chat response "
                         "with include_reasoning=false has its log-probs and token ids nulled: request "
                         "include_reasoning=true"},
    "sglang": {"ids": "SGLang: request return_token_ids=true (completions: choices[i].token_ids; chat: "
                      "choices[i].response_token_ids)",
               "prompt": "SGLang: request return_token_ids=true (chat: or return_prompt_token_ids=true), or pass "
                         "the prompt ids you sent",
               "logprobs": "SGLang: request logprobs (completions: logprobs=0; chat: logprobs=true)"},
}


def engine_of(response: Mapping[str, Any]) -> str | None:
    """Which server wrote the response: fields only one of them writes (None when neither shows)."""
    choices = _get(response, "choices") or []
    first = choices[0] if choices and isinstance(choices[0], Mapping) else {}
    if isinstance(_get(response, "metadata"), Mapping) and "weight_version" in response["metadata"] \
            or any(k in first for k in ("matched_stop", "response_token_ids", "meta_info")):
        return "sglang"
    if any(k in first for k in ("stop_reason", "weight_versions", "routed_experts")) \
            or any(k in response for k in ("prompt_logprobs", "kv_transfer_params")):
        return "vllm"
    return None


def hint(engine: str | None, what: str) -> str:
    return HINTS[engine][what] if engine else f"{HINTS['vllm'][what]}; {HINTS['sglang'][what]}"


def openai_rows(response: Any, prompt_ids: Iterable[int] | None = None, *, truncated: bool | None = None,
                version_map: Mapping[str, int] | None = None) -> Iterator[Row]:
    """Rows from an OpenAI-compatible completions or chat response (vLLM or SGLang server).

    Ask for log-probs (completions: `logprobs=0`; chat: `logprobs=true`) and token ids (see HINTS). Without
    the server's prompt ids pass `prompt_ids`, the ids of the one prompt you sent. A completions request
    with several prompts carries one response id and choice indexes that run across all prompts, so
    group_id is the response id plus the prompt: `ID` for a one-prompt response, `ID/pK` for the K-th
    distinct prompt otherwise. Weight versions (vLLM `choices[i].weight_versions`; SGLang `metadata` or
    `choices[i].meta_info`) fill `token_policy_versions`. SGLang's `logprobs` are taken before top-k/top-p/
    min-p: its rows need `choices[i].meta_info.output_token_sampling_logprobs` (chat with
    `return_meta_info=true, return_sampling_mask=true`), or `truncated=False` (no truncation), as in
    `sglang_rows`; vLLM's need nothing more.
    """
    if hasattr(response, "model_dump"):  # the openai client's objects; its extra fields (token_ids, ...) stay
        response = response.model_dump(warnings=False)  # SGLang's metadata is not the Dict[str, str] it declares
    if not isinstance(response, Mapping):
        raise bad("(response)", "an OpenAI-compatible response object", Text(type(response).__name__))
    engine = engine_of(response)
    rid = str(_get(response, "id") or "0")
    choices = _get(response, "choices")
    if not choices:
        raise bad("choices", "a non-empty list", choices)
    rows, prompts = [], {}
    for i, choice in enumerate(choices):
        row = _choice_row(response, choice, i, engine, prompt_ids, version_map, truncated)
        prompts.setdefault(tuple(row["prompt_ids"]), len(prompts))
        row["sample_id"] = f"{rid}/{_get(choice, 'index', i)}"
        rows.append(row)
    for row in rows:
        row["group_id"] = rid if len(prompts) == 1 else f"{rid}/p{prompts[tuple(row['prompt_ids'])]}"
        yield {k: row[k] for k in ("prompt_ids", "response_ids", "behavior_logprobs", "group_id", "sample_id",
                                   "token_policy_versions") if k in row}


def _choice_row(response: Mapping, choice: Any, i: int, engine: str | None, prompt_ids: Iterable[int] | None,
                version_map: Mapping[str, int] | None, truncated: bool | None) -> Row:
    where = f"choices[{i}]"
    logprobs = _get(choice, "logprobs")
    if not logprobs:
        raise bad(f"{where}.logprobs", f"per-token log-probs ({hint(engine, 'logprobs')})", logprobs)
    content = _get(logprobs, "content")
    if content is not None:  # chat: [{token, logprob, bytes, top_logprobs}]
        tokens = [_get(c, "token") for c in content]
        values = []
        for t, c in enumerate(content):
            values.append(_logprob(_get(c, "logprob"), f"{where}.logprobs.content[{t}].logprob"))
            check_normalized([_get(x, "logprob") for x in _get(c, "top_logprobs") or []],
                             f"{where}.logprobs.content[{t}].top_logprobs")
        token_field = f"{where}.logprobs.content[*].token"
    else:  # completions: parallel lists tokens / token_logprobs / top_logprobs
        tokens = _get(logprobs, "tokens") or []
        raw = _get(logprobs, "token_logprobs")
        if raw is None:
            raise bad(f"{where}.logprobs.token_logprobs", "a list of log-probs", None)
        values = [_logprob(v, f"{where}.logprobs.token_logprobs[{t}]") for t, v in enumerate(raw)]
        for t, top in enumerate(_get(logprobs, "top_logprobs") or []):
            if isinstance(top, Mapping):
                check_normalized(top.values(), f"{where}.logprobs.top_logprobs[{t}]")
        token_field = f"{where}.logprobs.tokens"
    ids = _get(choice, "token_ids")
    ids_field = f"{where}.token_ids"
    if ids is None and _get(choice, "response_token_ids") is not None:  # SGLang chat
        ids, ids_field = _get(choice, "response_token_ids"), f"{where}.response_token_ids"
    if ids is not None:
        response_ids = _ids(ids, ids_field)
    else:
        response_ids = [_token_id(tok, f"{token_field}[{t}]", engine) for t, tok in enumerate(tokens)]
    if len(response_ids) != len(values):
        raise bad(f"{where}.logprobs", f"{len(response_ids)} log-probs (one per response token)",
                  Text(f"{len(values)}"))
    if engine == "sglang":
        values = _sglang_behavior(choice, values, response_ids, where, truncated)
    logged = _get(choice, "prompt_token_ids")
    field = f"{where}.prompt_token_ids"
    if logged is None and (content is not None and engine != "sglang"):  # vLLM chat: on the response
        logged, field = _get(response, "prompt_token_ids"), "prompt_token_ids"
    prompt = same_prompt(prompt_ids, logged, field)
    if prompt is None:
        raise bad(field, f"the prompt's token ids ({hint(engine, 'prompt')})", None)
    row = {"prompt_ids": prompt, "response_ids": response_ids, "behavior_logprobs": values}
    versions = _versions(response, choice, i, len(response_ids), engine, version_map)
    if versions is not None:
        row["token_policy_versions"] = versions
    return row


def _sglang_behavior(choice: Any, values: list[float], ids: list[int], where: str, truncated: bool | None) -> list[float]:
    """SGLang: the sampled distribution's log-probs from choices[i].meta_info, else the logged ones if untruncated."""
    meta = _get(choice, "meta_info")
    if isinstance(meta, Mapping) and meta.get("output_token_sampling_logprobs") is not None:
        return sampling_logprobs(meta["output_token_sampling_logprobs"], meta.get("output_token_sampling_mask"), ids,
                                 f"{where}.")
    if truncated is False:
        return values
    raise bad(f"{where}.meta_info.output_token_sampling_logprobs", f"{untruncated(truncated)} (SGLang chat: request "
              f"return_meta_info=true and return_sampling_mask=true; /generate: {SAMPLING_MASK_FIX})", None)


def _versions(response: Mapping, choice: Any, i: int, n: int, engine: str | None,
              version_map: Mapping[str, int] | None) -> list[int] | None:
    where = f"choices[{i}]"
    if _get(choice, "weight_versions") is not None:  # vLLM, return_weight_versions=true
        return token_versions(_get(choice, "weight_versions"), n, f"{where}.weight_versions", version_map)
    meta = _get(choice, "meta_info")
    if isinstance(meta, Mapping):  # SGLang chat, return_meta_info=true: this choice's own request
        return meta_versions(meta, n, f"{where}.meta_info", version_map)
    metadata = _get(response, "metadata")
    if engine != "sglang" or not isinstance(metadata, Mapping):
        return None
    if len(_get(response, "choices")) == 1:
        return meta_versions(metadata, n, "metadata", version_map)
    if labelled(metadata, version_map):  # named weights, but the metadata is the first request's only
        raise bad("metadata.weight_versions", "each choice's weight versions (SGLang's metadata describes "
                  "choices[0] only: request return_meta_info=true for choices[i].meta_info, or n=1 per request)",
                  Text(f"one set for {len(_get(response, 'choices'))} choices"))
    return None


def _token_id(token: Any, field: str, engine: str | None) -> int:
    """'token_id:123' (vLLM's return_tokens_as_token_ids) -> 123."""
    if isinstance(token, str) and token.startswith("token_id:") and token[9:].isdigit():
        return int(token[9:])
    raise bad(field, f"'token_id:N', or token ids next to the text ({hint(engine, 'ids')})", token)
