"""SGLang native `/generate` (or `Engine.generate`) output, SGLang 0.5.23: one dict, or a list of them.

Each item is the dict sglang/srt/managers/tokenizer_manager.py builds per request (`text`, `output_ids`,
`meta_info`, and `prompt_token_ids` with `return_prompt_token_ids=true`); a request with n > 1 or several
prompts returns a list. In `meta_info` (same file, the loop that builds `meta_info`):
- `output_token_logprobs`: [logprob, token_id, text] per output token (`return_logprob=true`): log-softmax of
  logits / T, taken *before* top-k / top-p / min-p (sglang/srt/layers/sampler.py: `torch.log(probs)` before
  `_sample_from_probs` truncates), or of the raw logits with SGLANG_RETURN_ORIGINAL_LOGPROB=1;
- `output_token_sampling_logprobs` (`return_sampling_mask=true`): the log-prob of each sampled token under
  the distribution it was drawn from, after truncation; a float per token (`sampling_logprobs_mode`
  "selected", the default) or a list aligned with `output_token_sampling_mask[t]` ("support");
- `weight_version` (the label when the request finished) and `weight_versions`, [{version, start, end}]
  spans over the output tokens (sglang/srt/utils/weight_versions.py add_weight_versions_to_meta_info).

Streams (`"stream": true`): each event holds every token so far (the default) or, with
`--incremental-streaming-output`, only the new ones (tokenizer_manager.py _handle_batch_output); either way
`meta_info.completion_tokens` counts all tokens so far and `finish_reason` is null until the last event. Such a
piece is refused as a response; `assemble_stream` joins a stream's pieces.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from drpo_cli.rollouts.adapters.common import (
    UNSET_VERSION,
    Row,
    Text,
    as_logprob,
    as_token_ids,
    bad,
    same_prompt,
    token_versions,
    value_of,
)
from drpo_cli.rollouts.adapters.streams import Streams, assemble, fragment

SAMPLING_MASK_FIX = ("request return_sampling_mask=true, whose meta_info.output_token_sampling_logprobs are the "
                  "sampled distribution's; output_token_logprobs are taken before top-k/top-p/min-p")


def sglang_rows(response: Any, prompt_ids: Iterable[int] | None = None, *, truncated: bool | None = None,
                version_map: Mapping[str, int] | None = None) -> Iterator[Row]:
    """Rows from SGLang `/generate` output (one item or a list), requested with `return_logprob=true`.

    Behavior log-probs: `meta_info.output_token_sampling_logprobs` when present (`return_sampling_mask=true`),
    the true μ also under top-k/top-p/min-p. Otherwise `output_token_logprobs`, which are μ only without
    truncation: say `truncated=False` (the sampler used no top-k/top-p/min-p) to use them; with
    `truncated=True`, or unsaid, such an item is refused. Prompt ids: `prompt_ids`, else the item's
    `prompt_token_ids`, else `meta_info.input_token_logprobs` (ask with `logprob_start_len=0`). group_id:
    `meta_info.id` of the first item with the same prompt ids (n samples of one prompt share it);
    sample_id: the item's own `meta_info.id`.
    """
    items = response if isinstance(response, list) else [response]
    groups: dict[tuple[int, ...], str] = {}
    for k, item in enumerate(items):
        at = f"[{k}]." if isinstance(response, list) else ""
        meta = value_of(item, "meta_info")
        if not isinstance(meta, Mapping):
            raise bad(f"{at}meta_info", "the response's meta_info object", meta)
        check_whole(item, meta, at)
        tokens, values = _output(item, meta, at, truncated)
        prompt = same_prompt(prompt_ids, _prompt_ids(item, meta, at), f"{at}prompt_token_ids")
        if prompt is None:
            raise bad(f"{at}meta_info.input_token_logprobs", "the prompt's ids (request return_prompt_token_ids=true, "
                      "or logprob_start_len=0 for input_token_logprobs), or pass prompt_ids", None)
        rid = str(value_of(meta, "id") or k)
        row = {"prompt_ids": prompt, "response_ids": tokens, "behavior_logprobs": values,
               "group_id": groups.setdefault(tuple(prompt), rid), "sample_id": rid}
        versions = meta_versions(meta, len(tokens), f"{at}meta_info", version_map)
        if versions is not None:
            row["token_policy_versions"] = versions
        yield row


def check_whole(item: Any, meta: Mapping, at: str) -> None:
    """Refuse a piece of a stream passed as a whole response: unfinished, or fewer ids than tokens generated."""
    done, count = meta.get("completion_tokens"), len(_piece_ids(item, meta, at))
    incremental = (f"one piece of an incremental stream (--incremental-streaming-output: {done} tokens so far, "
                   f"{count} here)")
    if "finish_reason" in meta and meta["finish_reason"] is None:
        raise fragment(f"{at}meta_info.finish_reason", "why the request ended ({type: stop | length | abort})",
                       "null", incremental if isinstance(done, int) and done > count else
                       "an output streamed before the request ended (each holds every token so far: only the "
                       "last is whole)")
    if isinstance(done, int) and not isinstance(done, bool) and done > count:
        raise fragment(f"{at}meta_info.completion_tokens", f"{count} (one per output id)", str(done),
                       "the last " + incremental.removeprefix("one "))


def _piece_ids(item: Any, meta: Mapping, at: str) -> list[int]:
    """A piece's output ids: `output_ids`, else the ids of `output_token_logprobs`."""
    if value_of(item, "output_ids") is not None:
        return as_token_ids(value_of(item, "output_ids"), f"{at}output_ids")
    triples = meta.get("output_token_logprobs") or []
    return [t[1] if isinstance(t, (list, tuple)) and len(t) >= 2 else t for t in triples]


def untruncated(truncated: bool | None) -> str:
    """What a refusal expects when only the pre-truncation log-probs are there."""
    if truncated:
        return "the sampled distribution's log-probs (top-k/top-p/min-p truncated it)"
    return "the sampled distribution's log-probs, or truncated=False when the sampler used no top-k/top-p/min-p"


def has_sampling_logprobs(item: Any) -> bool:
    meta = value_of(item, "meta_info")
    return isinstance(meta, Mapping) and meta.get("output_token_sampling_logprobs") is not None


def _output(item: Any, meta: Mapping, at: str, truncated: bool | None) -> tuple[list[int], list[float]]:
    triples = meta.get("output_token_logprobs")
    field = f"{at}meta_info.output_token_logprobs"
    if not triples:
        raise bad(field, "[logprob, token_id, text] per token (request return_logprob=true)", triples)
    tokens, logged = [], []
    for t, triple in enumerate(triples):
        if not isinstance(triple, (list, tuple)) or len(triple) < 2:
            raise bad(f"{field}[{t}]", "[logprob, token_id, text]", triple)
        tokens.append(as_token_ids([triple[1]], f"{field}[{t}][1]")[0])
        logged.append(triple[0])
    output_ids = value_of(item, "output_ids")
    if output_ids is not None and as_token_ids(output_ids, f"{at}output_ids") != tokens:
        raise bad(f"{at}output_ids", f"the token ids of {field}", Text("other ids"))
    sampling = meta.get("output_token_sampling_logprobs")
    if sampling is not None:
        return tokens, sampling_logprobs(sampling, meta.get("output_token_sampling_mask"), tokens, at)
    if truncated is not False:
        raise bad(f"{at}meta_info.output_token_sampling_logprobs", f"{untruncated(truncated)}: {SAMPLING_MASK_FIX}", None)
    return tokens, [as_logprob(v, f"{field}[{t}][0]") for t, v in enumerate(logged)]


def sampling_logprobs(values: Any, masks: Any, tokens: list[int], at: str) -> list[float]:
    field = f"{at}meta_info.output_token_sampling_logprobs"
    if not isinstance(values, list) or len(values) != len(tokens):
        raise bad(field, f"{len(tokens)} entries (one per output token)",
                  Text(f"{len(values) if isinstance(values, list) else type(values).__name__}"))
    out = []
    for t, (value, tok) in enumerate(zip(values, tokens)):
        if isinstance(value, list):  # sampling_logprobs_mode="support": aligned with output_token_sampling_mask[t]
            kept = masks[t] if isinstance(masks, list) and t < len(masks) else None
            if not isinstance(kept, list) or len(kept) != len(value) or tok not in kept:
                raise bad(f"{at}meta_info.output_token_sampling_mask[{t}]",
                          f"the kept tokens, aligned with {field}[{t}] and holding the sampled token {tok}", kept)
            value = value[kept.index(tok)]
        out.append(as_logprob(value, f"{field}[{t}]"))
    return out


def _prompt_ids(item: Any, meta: Mapping, at: str) -> list[int] | None:
    if value_of(item, "prompt_token_ids") is not None:
        return value_of(item, "prompt_token_ids")
    inputs = meta.get("input_token_logprobs")
    if not inputs:
        return None
    ids = [triple[1] if isinstance(triple, (list, tuple)) and len(triple) >= 2 else triple for triple in inputs]
    total = meta.get("prompt_tokens")
    if isinstance(total, int) and total != len(ids):
        raise bad(f"{at}meta_info.input_token_logprobs", f"all {total} prompt tokens (request logprob_start_len=0, "
                  "or return_prompt_token_ids=true)", Text(f"{len(ids)}"))
    return ids


def meta_labels(meta: Mapping) -> list[str]:
    spans = meta.get("weight_versions")
    if isinstance(spans, list):
        return [value_of(s, "version") for s in spans]
    return [meta["weight_version"]] if meta.get("weight_version") is not None else []


def labelled(meta: Mapping, version_map: Mapping[str, int] | None) -> bool:
    """Whether the weights behind meta were named (anything but the unset label the map does not name)."""
    return any(label != UNSET_VERSION or UNSET_VERSION in (version_map or {}) for label in meta_labels(meta))


def meta_versions(meta: Mapping, n: int, field: str, version_map: Mapping[str, int] | None) -> list[int] | None:
    """token_policy_versions from a meta_info (or an OpenAI response's metadata): spans, else the one label."""
    if meta.get("weight_versions") is not None:
        return token_versions(meta["weight_versions"], n, f"{field}.weight_versions", version_map)
    label = meta.get("weight_version")
    if label is None:
        return None
    if not isinstance(label, str):
        raise bad(f"{field}.weight_version", "a version label (a string)", label)
    return token_versions([{"version": label, "start": 0, "end": n}], n, f"{field}.weight_version", version_map,
                          one_label=True)


# ---- streams ----------------------------------------------------------------------------------------------

# The per-token meta_info lists sliced to each piece of an incremental stream
# (tokenizer_manager.py _INCREMENTAL_STREAMING_META_INFO_KEYS).
PER_TOKEN = ("output_token_logprobs", "output_top_logprobs", "output_token_ids_logprobs",
             "output_token_sampling_mask", "output_token_sampling_logprobs")


class SglangStreams(Streams):
    """`/generate` stream events (`"stream": true`), one stream per request id (`meta_info.id`).

    `meta_info.completion_tokens` counts every token so far, so each piece says which kind of stream it is
    in: incremental (its ids are the new ones: completion_tokens = the ids so far + these) or cumulative
    (its ids are all so far, the earlier ones unchanged). Incremental pieces are joined in order
    (`output_ids`, `text` and the per-token meta_info lists); a cumulative piece replaces what came before.
    The final piece (finish_reason set) gives the rest of meta_info (weight versions spanning the whole
    output, finish_reason, prompt logprobs).
    """

    final_event = "its final piece (meta_info.finish_reason set)"

    def describe(self, key: Any) -> str:
        return f"request {key!r}"

    def pieces(self, data: Any) -> list:
        items = data if isinstance(data, list) else [data]
        out = []
        for k, item in enumerate(items):
            at = f"[{k}]." if isinstance(data, list) else ""
            meta = value_of(item, "meta_info")
            if not isinstance(meta, Mapping):
                raise bad(f"{at}meta_info", "the response's meta_info object", meta)
            out.append((str(meta.get("id")), (item, meta, at)))
        return out

    def start(self, key: Any, piece: Any) -> dict:
        return self.extend({"key": key, "ids": [], "text": [], "lists": {}, "mode": None, "final": piece}, piece)

    def extend(self, state: dict, piece: Any) -> dict:
        item, meta, at = piece
        ids, done, n = _piece_ids(item, meta, at), meta.get("completion_tokens"), len(state["ids"])
        if not isinstance(done, int) or isinstance(done, bool):
            raise bad(f"{at}meta_info.completion_tokens", "the number of tokens generated so far", done)
        lists = {k: meta[k] for k in PER_TOKEN if isinstance(meta.get(k), list)}
        if done == n + len(ids) and state["mode"] != "cumulative":
            state["mode"] = "incremental" if n else None
            state["ids"] += ids
            state["text"].append(value_of(item, "text") or "")
            for k, values in lists.items():
                state["lists"][k] = state["lists"].get(k, []) + list(values)
        elif done == len(ids) and ids[:n] == state["ids"] and state["mode"] != "incremental":
            state.update(mode="cumulative", ids=ids, text=[value_of(item, "text") or ""], lists=dict(lists))
        else:
            raise bad(f"{at}meta_info.completion_tokens", f"{n + len(ids)} (incremental: {n} ids so far + {len(ids)} "
                      f"here) or {len(ids)} (cumulative: these ids, starting with those so far)",
                      Text(f"{done}: pieces of this stream are missing from the log, or out of order"))
        state["final"] = piece
        return state

    def last(self, piece: Any) -> bool:
        return piece[1].get("finish_reason") is not None

    def whole(self, state: dict) -> dict:
        item, meta, _ = state["final"]
        meta = {**meta, **state["lists"]}
        for k, length in (("output_token_logprobs", "output_token_logprobs_length"),
                          ("output_token_sampling_mask", "output_token_sampling_mask_length")):
            if length in meta and k in state["lists"]:
                meta[length] = len(state["lists"][k])
        return {**item, "text": "".join(state["text"]), "output_ids": state["ids"], "meta_info": meta}


def assemble_stream(events: Iterable[Any]) -> Iterator[dict]:
    """Whole `/generate` items from a stream's events, one per request id (`meta_info.id`).

    `events`: the SSE lines of `/generate` with `"stream": true` (`data: {...}`, `data: [DONE]`), or their
    JSON, in order; the requests of a batch or of n > 1 interleave (each sample has its own id). Each item
    is yielded when its final event arrives, in the unstreamed shape, for `sglang_rows`; pass the items
    of one request as a list to group its samples by prompt, as the unstreamed list is:

        items = list(assemble_stream(lines_of_one_request))
        rows = list(sglang_rows(items))

    A request whose final event never comes is refused at the end (InputError naming it).
    """
    return assemble(SglangStreams(), events)
