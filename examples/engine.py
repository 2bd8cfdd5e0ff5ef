"""llama.cpp as the sampler of SmolLM2-135M-Instruct: a checkpoint's GGUF, and rollouts drawn from it.

`gguf_for(checkpoint, kind, path)` writes the checkpoint as a GGUF of type F32 / F16 / Q8_0
(examples/real/to_gguf.py) unless already there; `load(path, kind)` opens it with llama-cpp-python
(F32: float32 KV cache too, so the engine computes what the trainer does; other types: llama.cpp's
default float16 KV cache, as a deployed engine runs); `sample_rollouts` draws a group of responses per
one-digit-addition problem with drpo_cli.rollouts.llamacpp.llamacpp_sample (processed log-probs, the
end-of-turn token included) into a schema-v1 table (examples/realtask.py's prompts and rewards).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "real"))
import realtask
import to_gguf
import toytask

KINDS = to_gguf.TYPES


def engine_build() -> str:
    """The engine that samples, as results name it (e.g. "llama-cpp-python 0.3.36")."""
    import llama_cpp

    return f"llama-cpp-python {llama_cpp.__version__}"


def gguf_for(checkpoint: str | Path, kind: str, path: str | Path) -> Path:
    """`checkpoint` as a GGUF of type `kind` at `path` (written once; an existing file is reused)."""
    path = Path(path)
    return path if path.is_file() else to_gguf.export(checkpoint, path, kind)


def load(path: str | Path, kind: str, threads: int = 1, n_ctx: int = 512):
    """A llama-cpp-python Llama on `path`; float32 KV cache for F32, llama.cpp's default (f16) otherwise."""
    from llama_cpp import GGML_TYPE_F32, Llama

    kv = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if kind == "F32" else {}
    # n_batch = 1: llama-cpp-python 0.3.36's CPU build crashed (SIGSEGV in llama_decode) evaluating a
    # multi-token batch on a Q8_0 GGUF on this machine (AVX-512 / AMX); one token per decode works.
    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=1,
                 n_ubatch=1, verbose=False, seed=0, **kv)


def sample_rollouts(llm, tokenizer, problems: Sequence[tuple[int, int]], samples_per_prompt: int,
                    temperature: float, policy_version: int, seed: int, max_new_tokens: int,
                    rule=realtask.score):
    """`samples_per_prompt` responses per problem from llama.cpp as a schema-v1 table (toytask.to_table)."""
    from drpo_cli.rollouts.llamacpp import llamacpp_sample

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = [realtask.prompt_ids(tokenizer, a, b) for a, b in problems]
    rows: dict[str, list] = {k: [] for k in toytask.COLUMN_TYPES}
    for row in llamacpp_sample(llm, prompts, n=samples_per_prompt, temperature=temperature,
                               max_tokens=max_new_tokens, seed=seed, eos=eos):
        g = int(row["group_id"])
        rows["prompt_ids"].append(list(row["prompt_ids"]))
        rows["response_ids"].append(row["response_ids"])
        rows["behavior_logprobs"].append(row["behavior_logprobs"])
        rows["reward"].append(realtask.reward(tokenizer, problems[g], row["response_ids"], rule))
        rows["group_id"].append(g)
        rows["sample_id"].append(f"g{g:02d}-s{row['sample_id'].split('/')[1]}")
        rows["policy_version"].append(policy_version)
        rows["temperature"].append(temperature)
    return toytask.to_table(rows, temperature)
