"""Hugging Face transformers `generate` (transformers 5): behavior log-probs recomputed from the raw logits."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from drpo_cli.rollouts.adapters.common import Row, Text, bad, value_of


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

    logits = value_of(output, "logits")
    if logits is None:
        raise bad("logits", "per-step raw logits (generate with output_logits=True, return_dict_in_generate=True)",
                  None)
    sequences = value_of(output, "sequences")
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
