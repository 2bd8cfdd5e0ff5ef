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

Streams (`stream=true`): a chunk is refused as a response (`object` "*.chunk", a `delta`, `finish_reason`
null, a completions `text_offset` past the start, `usage.completion_tokens` above its tokens);
`assemble_stream` joins the chunks of each choice into the response the request would have returned
unstreamed (vllm/entrypoints/openai/chat_completion/serving.py chat_completion_stream_generator,
completion/serving.py completion_stream_generator; sglang/srt/entrypoints/openai/serving_completions.py
_generate_completion_stream).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from drpo_cli.base.errors import InputError
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
from drpo_cli.rollouts.adapters.sglang import (
    SAMPLING_MASK_FIX,
    labelled,
    meta_versions,
    sampling_logprobs,
    untruncated,
)
from drpo_cli.rollouts.adapters.streams import DONE, Streams, event_object, fragment, payload

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
    choices = value_of(response, "choices") or []
    first = choices[0] if choices and isinstance(choices[0], Mapping) else {}
    if isinstance(value_of(response, "metadata"), Mapping) and "weight_version" in response["metadata"] \
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
    rid = str(value_of(response, "id") or "0")
    choices = value_of(response, "choices")
    check_whole(response, choices if isinstance(choices, list) else [])
    if not choices:
        raise bad("choices", "a non-empty list", choices)
    rows, prompts = [], {}
    for i, choice in enumerate(choices):
        row = _choice_row(response, choice, i, engine, prompt_ids, version_map, truncated)
        prompts.setdefault(tuple(row["prompt_ids"]), len(prompts))
        row["sample_id"] = f"{rid}/{value_of(choice, 'index', i)}"
        rows.append(row)
    for row in rows:
        row["group_id"] = rid if len(prompts) == 1 else f"{rid}/p{prompts[tuple(row['prompt_ids'])]}"
        yield {k: row[k] for k in ("prompt_ids", "response_ids", "behavior_logprobs", "group_id", "sample_id",
                                   "token_policy_versions") if k in row}


def _choice_row(response: Mapping, choice: Any, i: int, engine: str | None, prompt_ids: Iterable[int] | None,
                version_map: Mapping[str, int] | None, truncated: bool | None) -> Row:
    where = f"choices[{i}]"
    logprobs = value_of(choice, "logprobs")
    if not logprobs:
        raise bad(f"{where}.logprobs", f"per-token log-probs ({hint(engine, 'logprobs')})", logprobs)
    content = value_of(logprobs, "content")
    if content is not None:  # chat: [{token, logprob, bytes, top_logprobs}]
        tokens = [value_of(c, "token") for c in content]
        values = []
        for t, c in enumerate(content):
            values.append(as_logprob(value_of(c, "logprob"), f"{where}.logprobs.content[{t}].logprob"))
            check_normalized([value_of(x, "logprob") for x in value_of(c, "top_logprobs") or []],
                             f"{where}.logprobs.content[{t}].top_logprobs")
        token_field = f"{where}.logprobs.content[*].token"
    else:  # completions: parallel lists tokens / token_logprobs / top_logprobs
        tokens = value_of(logprobs, "tokens") or []
        raw = value_of(logprobs, "token_logprobs")
        if raw is None:
            raise bad(f"{where}.logprobs.token_logprobs", "a list of log-probs", None)
        values = [as_logprob(v, f"{where}.logprobs.token_logprobs[{t}]") for t, v in enumerate(raw)]
        for t, top in enumerate(value_of(logprobs, "top_logprobs") or []):
            if isinstance(top, Mapping):
                check_normalized(top.values(), f"{where}.logprobs.top_logprobs[{t}]")
        token_field = f"{where}.logprobs.tokens"
    ids = value_of(choice, "token_ids")
    ids_field = f"{where}.token_ids"
    if ids is None and value_of(choice, "response_token_ids") is not None:  # SGLang chat
        ids, ids_field = value_of(choice, "response_token_ids"), f"{where}.response_token_ids"
    if ids is not None:
        response_ids = as_token_ids(ids, ids_field)
    else:
        response_ids = [_token_id(tok, f"{token_field}[{t}]", engine) for t, tok in enumerate(tokens)]
    if len(response_ids) != len(values):
        raise bad(f"{where}.logprobs", f"{len(response_ids)} log-probs (one per response token)",
                  Text(f"{len(values)}"))
    if engine == "sglang":
        values = _sglang_behavior(choice, values, response_ids, where, truncated)
    logged = value_of(choice, "prompt_token_ids")
    field = f"{where}.prompt_token_ids"
    if logged is None and (content is not None and engine != "sglang"):  # vLLM chat: on the response
        logged, field = value_of(response, "prompt_token_ids"), "prompt_token_ids"
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
    meta = value_of(choice, "meta_info")
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
    if value_of(choice, "weight_versions") is not None:  # vLLM, return_weight_versions=true
        return token_versions(value_of(choice, "weight_versions"), n, f"{where}.weight_versions", version_map)
    meta = value_of(choice, "meta_info")
    if isinstance(meta, Mapping):  # SGLang chat, return_meta_info=true: this choice's own request
        return meta_versions(meta, n, f"{where}.meta_info", version_map)
    metadata = value_of(response, "metadata")
    if engine != "sglang" or not isinstance(metadata, Mapping):
        return None
    if len(value_of(response, "choices")) == 1:
        return meta_versions(metadata, n, "metadata", version_map)
    if labelled(metadata, version_map):  # named weights, but the metadata is the first request's only
        raise bad("metadata.weight_versions", "each choice's weight versions (SGLang's metadata describes "
                  "choices[0] only: request return_meta_info=true for choices[i].meta_info, or n=1 per request)",
                  Text(f"one set for {len(value_of(response, 'choices'))} choices"))
    return None


def _token_id(token: Any, field: str, engine: str | None) -> int:
    """'token_id:123' (vLLM's return_tokens_as_token_ids) -> 123."""
    if isinstance(token, str) and token.startswith("token_id:") and token[9:].isdigit():
        return int(token[9:])
    raise bad(field, f"'token_id:N', or token ids next to the text ({hint(engine, 'ids')})", token)


# ---- streams ----------------------------------------------------------------------------------------------


def check_whole(response: Mapping, choices: list) -> None:
    """Refuse a piece of a stream, or an echoed prompt, passed as a whole response, by what it says of itself."""
    what = "one chunk of a streamed response"
    obj = response.get("object")
    if isinstance(obj, str) and obj.endswith(".chunk"):
        raise fragment("object", f"a whole response ({obj.removesuffix('.chunk')!r})", repr(obj), what)
    if not choices and response.get("usage") is not None:
        raise fragment("choices", "a non-empty list", "[] next to a usage", "the usage chunk that ends a stream")
    for i, choice in enumerate(choices):
        if not isinstance(choice, Mapping):
            continue
        where = f"choices[{i}]"
        if "delta" in choice and "message" not in choice:
            raise fragment(f"{where}.delta", "a message (a whole chat response)", "a delta", what)
        if "finish_reason" in choice and choice["finish_reason"] is None:
            raise fragment(f"{where}.finish_reason", "why the choice ended (stop, length, ...)", "null",
                           "a chunk sent before its choice ended")
        offsets = value_of(choice.get("logprobs"), "text_offset")
        if isinstance(offsets, list) and offsets and isinstance(offsets[0], int) and offsets[0] > 0:
            raise fragment(f"{where}.logprobs.text_offset[0]", "0 (a response's first token starts its text)",
                           str(offsets[0]), "a chunk from inside a streamed completion")
    usage, counted = response.get("usage"), token_count(choices)
    done = usage.get("completion_tokens") if isinstance(usage, Mapping) else None
    if isinstance(done, int) and counted is not None and done > counted:
        raise fragment("usage.completion_tokens", f"at most {counted} (the tokens of the response's choices)",
                       str(done), "the choices hold only some of the response's tokens")
    for i, choice in enumerate(choices):
        first = value_of(value_of(choice, "logprobs"), "token_logprobs")
        if isinstance(first, list) and first and first[0] is None:
            raise bad(f"choices[{i}].logprobs.token_logprobs[0]", "the log-prob of the response's first token",
                      Text("null: the choice echoes the prompt (echo=true: a prompt's first token has no log-prob, "
                           "and its tokens are not the response's): request echo=false"))


def token_count(choices: list) -> int | None:
    """The response tokens of all choices, or None when a choice does not show them."""
    total = 0
    for choice in choices:
        ids = value_of(choice, "token_ids")
        ids = value_of(choice, "response_token_ids") if ids is None else ids
        logprobs = value_of(choice, "logprobs")
        listed = ids if ids is not None else value_of(logprobs, "content") or value_of(logprobs, "tokens")
        if not isinstance(listed, list):
            return None
        total += len(listed)
    return total


class OpenAIStreams(Streams):
    """Chunks of vLLM's / SGLang's OpenAI-compatible streams, one stream per (response id, choice index).

    Each choice's chunks are joined in order: its token ids, log-prob entries (chat `content`; completions
    `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) and text; the prompt ids of its first chunk
    (chat: on the response; completions: on the choice); `finish_reason`, `stop_reason` and
    `weight_versions` (whole-output spans) of its final chunk. Checked: each chunk's `usage` (continuous
    usage stats) against the tokens so far, vLLM's `text_offset` against where the previous chunk ended, and
    vLLM's trailing usage chunk (`choices: []`) against the tokens of the response's choices.
    """

    final_event = "its final chunk (finish_reason set)"

    def __init__(self) -> None:
        super().__init__()
        self.totals: dict[str, int] = {}  # vLLM response id -> tokens of its ended choices, until its usage chunk

    def describe(self, key: Any) -> str:
        return f"stream {key[0]!r} choice {key[1]}"

    def response_key(self, key: Any) -> Any:
        return key[0]

    def pieces(self, data: Any) -> list:
        data = event_object(data, "a stream chunk")
        choices = data.get("choices")
        if not isinstance(choices, list):
            raise bad("choices", "a list of choices", choices)
        rid = str(data.get("id") or "0")
        if not choices:  # the trailing usage chunk, or SGLang's sglext chunk
            self._usage(rid, data.get("usage"))
            return []
        out = []
        for i, choice in enumerate(choices):
            if not isinstance(choice, Mapping):
                raise bad(f"choices[{i}]", "a choice object", Text(type(choice).__name__))
            out.append(((rid, choice.get("index", i)), (data, choice, i)))
        return out

    def start(self, key: Any, piece: Any) -> dict:
        data, choice, _ = piece
        state = {"key": key, "chat": _is_chat(data, choice), "engine": None, "prompt": None, "ids": [], "n": 0,
                 "text": [], "content": [], "tokens": [], "token_logprobs": [], "top_logprobs": [],
                 "text_offset": [], "next_offset": 0, "final": piece}
        return self.extend(state, piece)

    def extend(self, state: dict, piece: Any) -> dict:
        data, choice, i = piece
        where = f"choices[{i}]"
        if _is_chat(data, choice) != state["chat"]:
            raise bad("object", "the kind of the stream's first chunk (chat or completions)", data.get("object"))
        state["engine"] = state["engine"] or engine_of(data)
        state["final"] = piece
        self._prompt(state, data.get("prompt_token_ids") if state["chat"] else choice.get("prompt_token_ids"),
                     "prompt_token_ids" if state["chat"] else f"{where}.prompt_token_ids")
        logprobs = choice.get("logprobs")
        if state["chat"] and logprobs is None and "token_ids" not in choice and choice.get("finish_reason") is None:
            return state  # vLLM's first chunk of a choice (its role) or the echoed last message: no token
        if state["chat"] and state["engine"] == "sglang":
            raise bad(f"{where}.logprobs", "token ids next to the streamed tokens", Text(
                "none: SGLang's chat stream carries no token ids (it refuses return_token_ids with stream=true): "
                "stream /v1/completions with return_token_ids=true, or /generate, or ask chat unstreamed"))
        if not isinstance(logprobs, Mapping):
            raise bad(f"{where}.logprobs", f"per-token log-probs ({hint(state['engine'], 'logprobs')})", logprobs)
        new = _chat_chunk(state, logprobs, where) if state["chat"] else _completion_chunk(state, logprobs, where)
        ids = choice.get("token_ids")
        if ids is None:
            state["ids"] = None if new else state["ids"]  # without ids the "token_id:N" strings must do
        else:
            ids = as_token_ids(ids, f"{where}.token_ids")
            if len(ids) != new:
                raise bad(f"{where}.token_ids", f"{new} ids (one per log-prob of the chunk)", Text(f"{len(ids)}"))
            if state["ids"] is not None:
                state["ids"].extend(ids)
        state["n"] += new
        delta = choice.get("delta")
        text = (delta.get("content") if isinstance(delta, dict) else None) if state["chat"] else choice.get("text")
        state["text"].append(text or "")
        usage = data.get("usage")
        done = usage.get("completion_tokens") if isinstance(usage, Mapping) else None
        if isinstance(done, int) and done != state["n"]:
            raise bad("usage.completion_tokens", f"{state['n']} (the tokens streamed so far for choice "
                      f"{state['key'][1]})", Text(f"{done}: chunks of this stream are missing from the log"))
        return state

    def last(self, piece: Any) -> bool:
        return piece[1].get("finish_reason") is not None

    def whole(self, state: dict) -> dict:
        data, choice, _ = state["final"]
        kept = {k: v for k, v in choice.items() if k not in ("delta", "text", "logprobs", "token_ids",
                                                            "prompt_token_ids")}
        response = {k: v for k, v in data.items() if k not in ("choices", "usage", "prompt_token_ids", "prompt_text")}
        text = "".join(state["text"])
        if state["chat"]:
            out = {**kept, "message": {"role": "assistant", "content": text},
                   "logprobs": {"content": [{"token": token, "logprob": lp, "top_logprobs": top or []}
                                            for token, lp, top in state["content"]]}, "token_ids": state["ids"]}
            response.update(object="chat.completion", prompt_token_ids=state["prompt"])
        else:
            out = {**kept, "text": text, "logprobs": {k: state[k] for k in ("text_offset", "token_logprobs", "tokens",
                                                                              "top_logprobs")},
                   "token_ids": state["ids"], "prompt_token_ids": state["prompt"]}
            response["object"] = "text_completion"
        if state["engine"] == "vllm":  # SGLang streams each choice under its own id: no per-response total
            rid = state["key"][0]
            self.totals[rid] = self.totals.get(rid, 0) + state["n"]
        return {**response, "choices": [out]}

    def left_open(self) -> list:
        self.totals.clear()
        return super().left_open()

    def _prompt(self, state: dict, ids: Any, field: str) -> None:
        if ids is None:
            return
        ids = as_token_ids(ids, field)
        if state["prompt"] is None:
            state["prompt"] = ids
        elif ids != state["prompt"]:
            raise bad(field, "the prompt ids of the stream's first chunk", Text("other ids"))

    def _usage(self, rid: str, usage: Any) -> None:
        done = usage.get("completion_tokens") if isinstance(usage, Mapping) else None
        total = self.totals.pop(rid, None)
        if isinstance(done, int) and total is not None and done != total and rid not in self.refused:
            raise bad("usage.completion_tokens", f"{total} (the tokens streamed in the choices of {rid!r})",
                      Text(f"{done}: chunks of this response are missing from the log"))


def _is_chat(data: Mapping, choice: Mapping) -> bool:
    return "delta" in choice or str(data.get("object", "")).startswith("chat")


def _chat_chunk(state: dict, logprobs: Mapping, where: str) -> int:
    content = logprobs.get("content")
    if not isinstance(content, list):
        raise bad(f"{where}.logprobs.content", "a list of per-token log-probs", content)
    # Held until the stream ends: what openai_rows reads of each entry; a top list of one entry checks nothing.
    state["content"] += [(value_of(c, "token"), value_of(c, "logprob"), _few(value_of(c, "top_logprobs"))) for c in content]
    return len(content)


def _few(top: Any) -> Any:
    """A position's candidates as held: None for one or none (nothing to check against), else as they are."""
    return top if isinstance(top, (list, Mapping)) and len(top) > 1 else None


def _completion_chunk(state: dict, logprobs: Mapping, where: str) -> int:
    field = f"{where}.logprobs"
    values, tokens, offsets = (logprobs.get(k) for k in ("token_logprobs", "tokens", "text_offset"))
    if not isinstance(values, list) or not isinstance(tokens, list) or len(tokens) != len(values):
        raise bad(field, "token_logprobs and tokens, one per token of the chunk", Text(
            f"lengths {len(values) if isinstance(values, list) else None}, {len(tokens) if isinstance(tokens, list) else None}"))
    if not state["n"] and values and values[0] is None:
        raise bad(f"{field}.token_logprobs[0]", "the log-prob of the response's first token", Text(
            "null: the stream echoes the prompt (echo=true: a prompt's first token has no log-prob, and its tokens "
            "are not the response's): request echo=false"))
    offsets = offsets if isinstance(offsets, list) and len(offsets) == len(values) else [-1] * len(values)
    if offsets and offsets[0] >= 0:  # vLLM counts offsets across chunks; SGLang writes -1
        if offsets[0] != state["next_offset"]:
            raise bad(f"{field}.text_offset[0]", f"{state['next_offset']} (where the stream's previous chunk ended)",
                      Text(f"{offsets[0]}: chunks of this stream are missing from the log, or out of order"))
        state["next_offset"] = offsets[-1] + len(str(tokens[-1]))
    top = logprobs.get("top_logprobs")
    state["top_logprobs"] += [_few(x) for x in top] if isinstance(top, list) and len(top) == len(values) else \
        [None] * len(values)
    state["token_logprobs"].extend(values)
    state["tokens"].extend(tokens)
    state["text_offset"].extend(offsets)
    return len(values)


def assemble_stream(events: Iterable[Any]) -> Iterator[dict]:
    """Whole responses from the chunks of OpenAI-compatible streams, one per response id, all its choices in it.

    `events`: the openai client's stream (`client.chat.completions.create(..., stream=True)`), its chunks'
    JSON, or the SSE lines (`data: {...}`, `data: [DONE]`), in the order they came; streams may
    interleave. A response is yielded, in the unstreamed shape, for `openai_rows`, once each of its choices
    has ended (finish_reason set) and the response has: its usage chunk, `[DONE]`, or the end of `events`
    (the client's stream ends at `[DONE]`), so its choices group as they would unstreamed:

        stream = client.completions.create(..., stream=True, extra_body={"return_token_ids": True})
        for response in assemble_stream(stream):
            rows = list(openai_rows(response))

    Memory: the open choices' tokens so far, and the ended choices of responses not yet ended. A choice whose
    final chunk never comes is refused at the end (InputError naming it).
    """
    streams, ended = OpenAIStreams(), {}
    for event in events:
        data = payload(event)
        _, done = streams.feed(data)
        for key, response in done:
            ended.setdefault(key[0], []).append(response)
        if data is DONE or isinstance(data, Mapping) and data.get("choices") == [] and data.get("usage"):
            rids = list(ended) if data is DONE else [str(data.get("id") or "0")]
            yield from (_joined(ended.pop(rid)) for rid in rids if rid in ended and not _opens(streams, rid))
    problems = [message for _, message in streams.left_open()]
    if problems:
        raise InputError(problems[0], details=problems[1:])
    yield from (_joined(choices) for choices in ended.values())


def _opens(streams: OpenAIStreams, rid: str) -> bool:
    return any(key[0] == rid for key in streams.open)


def _joined(responses: list[dict]) -> dict:
    """One response holding the choices that were joined one by one, in index order."""
    choices = sorted((r["choices"][0] for r in responses), key=lambda c: c.get("index", 0))
    return {**responses[0], "choices": choices}
