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
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from drpo_cli.adapters.common import (
    UNSET_VERSION,
    Row,
    Text,
    _get,
    _ids,
    _logprob,
    bad,
    same_prompt,
    token_versions,
)

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
        meta = _get(item, "meta_info")
        if not isinstance(meta, Mapping):
            raise bad(f"{at}meta_info", "the response's meta_info object", meta)
        tokens, values = _output(item, meta, at, truncated)
        prompt = same_prompt(prompt_ids, _prompt_ids(item, meta, at), f"{at}prompt_token_ids")
        if prompt is None:
            raise bad(f"{at}meta_info.input_token_logprobs", "the prompt's ids (request return_prompt_token_ids=true, "
                      "or logprob_start_len=0 for input_token_logprobs), or pass prompt_ids", None)
        rid = str(_get(meta, "id") or k)
        row = {"prompt_ids": prompt, "response_ids": tokens, "behavior_logprobs": values,
               "group_id": groups.setdefault(tuple(prompt), rid), "sample_id": rid}
        versions = meta_versions(meta, len(tokens), f"{at}meta_info", version_map)
        if versions is not None:
            row["token_policy_versions"] = versions
        yield row


def untruncated(truncated: bool | None) -> str:
    """What a refusal expects when only the pre-truncation log-probs are there."""
    if truncated:
        return "the sampled distribution's log-probs (top-k/top-p/min-p truncated it)"
    return "the sampled distribution's log-probs, or truncated=False when the sampler used no top-k/top-p/min-p"


def has_sampling_logprobs(item: Any) -> bool:
    meta = _get(item, "meta_info")
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
        tokens.append(_ids([triple[1]], f"{field}[{t}][1]")[0])
        logged.append(triple[0])
    output_ids = _get(item, "output_ids")
    if output_ids is not None and _ids(output_ids, f"{at}output_ids") != tokens:
        raise bad(f"{at}output_ids", f"the token ids of {field}", Text("other ids"))
    sampling = meta.get("output_token_sampling_logprobs")
    if sampling is not None:
        return tokens, sampling_logprobs(sampling, meta.get("output_token_sampling_mask"), tokens, at)
    if truncated is not False:
        raise bad(f"{at}meta_info.output_token_sampling_logprobs", f"{untruncated(truncated)}: {SAMPLING_MASK_FIX}", None)
    return tokens, [_logprob(v, f"{field}[{t}][0]") for t, v in enumerate(logged)]


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
        out.append(_logprob(value, f"{field}[{t}]"))
    return out


def _prompt_ids(item: Any, meta: Mapping, at: str) -> list[int] | None:
    if _get(item, "prompt_token_ids") is not None:
        return _get(item, "prompt_token_ids")
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
        return [_get(s, "version") for s in spans]
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
