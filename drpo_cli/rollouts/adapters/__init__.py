"""Adapters: the outputs samplers actually return -> schema-v1 row dicts for RolloutWriter.

Pure functions, no heavy imports (torch is imported inside `hf_rows` only). Each yields dicts with
`prompt_ids`, `response_ids`, `behavior_logprobs`, `group_id` (one id per prompt) and `sample_id`, plus
`token_policy_versions` where the engine reported named weight versions; the caller adds a reward (or
advantages) and writes them:

    with RolloutWriter("r.arrow", temperature=0.7, sampler="vllm 0.33") as w:
        for row in vllm_rows(llm.generate(prompts, params)):
            w.write(**row, reward=score(row))

One module per engine, field names read from (and test fixtures built in the shapes of) vLLM 0.33.0
(`vllm`: offline RequestOutput; `openai_compat`: its OpenAI-compatible server), SGLang 0.5.23 (`sglang`:
native /generate; `openai_compat`: its OpenAI-compatible server) and transformers 5 (`hf`). Every
malformed input raises InputError `field 'x': expected ..., found ...`; `drpo convert` prefixes it with
FILE:LINE.

Streamed responses: a piece of a stream passed as a response is refused, naming the field that shows it;
each engine module's `assemble_stream(events)` joins whole streams into the responses its adapter reads
(`streams` holds what they share).
"""

from __future__ import annotations

from drpo_cli.rollouts.adapters.common import Row, Text, as_logprob, as_token_ids, bad, value_of
from drpo_cli.rollouts.adapters.hf import hf_rows
from drpo_cli.rollouts.adapters.openai_compat import OpenAIStreams, openai_rows
from drpo_cli.rollouts.adapters.sglang import SglangStreams, sglang_rows
from drpo_cli.rollouts.adapters.streams import Streams
from drpo_cli.rollouts.adapters.vllm import VllmStreams, vllm_rows

ADAPTERS = {"vllm": vllm_rows, "openai": openai_rows, "sglang": sglang_rows}
STREAMS: dict[str, type[Streams]] = {"vllm": VllmStreams, "openai": OpenAIStreams, "sglang": SglangStreams}

__all__ = [
           "ADAPTERS",
           "STREAMS",
           "Row",
           "Streams",
           "Text",
           "as_logprob",
           "as_token_ids",
           "bad",
           "hf_rows",
           "openai_rows",
           "sglang_rows",
           "value_of",
           "vllm_rows",
]
