"""A toy task with a verifiable reward, a word-level tokenizer and a tiny Llama policy.

The prompt is `<bos> key: K` for a key letter K in a..h; the response is a fixed number of
letters from a..p. The reward is the fraction of response tokens equal to K, so the optimum
copies the key into every position: a 2-layer model learns it in a few dozen policy-gradient
steps. Everything here runs offline on a CPU in well under a second.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "key:"]
LETTERS = [chr(c) for c in range(ord("a"), ord("p") + 1)]  # 16 response letters
KEYS = LETTERS[:8]  # the prompt's key is one of a..h
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + LETTERS)}
BOS, KEY_MARK = VOCAB["<bos>"], VOCAB["key:"]
LETTER_IDS = torch.tensor([VOCAB[c] for c in LETTERS])  # (16,)
SCHEMA_VERSION = "1"


# ---- tokenizer and model ---------------------------------------------------------------------------


def build_tokenizer():
    """A word-level PreTrainedTokenizerFast over VOCAB, built offline with the `tokenizers` library."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=64,
    )


def build_model(seed: int = 0):
    """A tiny Llama causal LM (about 75k parameters) with seeded random weights and tied embeddings.

    Llama rather than Qwen2: transformers 5 gives every `qwen2` directory the Qwen2 byte-level
    tokenizer class, which would ignore this word-level tokenizer.json under AutoTokenizer.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=BOS,
        eos_token_id=VOCAB["<eos>"],
        pad_token_id=VOCAB["<pad>"],
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


# ---- task -------------------------------------------------------------------------------------------


def make_prompts(num_prompts: int, seed: int) -> list[list[int]]:
    """`num_prompts` prompts `<bos> key: K`, keys cycling through a..h in a seeded order."""
    rng = np.random.default_rng(seed)
    keys = [KEYS[i % len(KEYS)] for i in rng.permutation(num_prompts)]
    return [[BOS, KEY_MARK, VOCAB[k]] for k in keys]


def reward(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> float:
    """Fraction of response tokens equal to the key (the last prompt token)."""
    key = int(prompt_ids[-1])
    response = [int(t) for t in response_ids]
    return sum(t == key for t in response) / len(response)


@torch.no_grad()
def sample(
    model, prompts: Sequence[Sequence[int]], response_len: int, temperature: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `response_len` tokens per prompt (all prompts the same length, no padding).

    A plain loop that reruns the whole prefix each step (the model is tiny): no sampler
    heuristics, no top-p/top-k. Returns the tokens and their true log-probs at the sampling
    temperature, log_softmax(logits / T) in float32 — what an inference engine should log.
    """
    seq = torch.tensor(prompts, dtype=torch.long)  # (B, P)
    logps = []
    for _ in range(response_len):
        logits = model(input_ids=seq).logits[:, -1].float()  # (B, V)
        logp = torch.log_softmax(logits / temperature, dim=-1)  # (B, V)
        tok = torch.multinomial(logp.exp(), 1, generator=generator)  # (B, 1)
        logps.append(logp.gather(1, tok))
        seq = torch.cat([seq, tok], dim=1)
    return seq[:, len(prompts[0]) :], torch.cat(logps, dim=1)  # (B, L), (B, L)


def sample_rollouts(
    model,
    prompts: Sequence[Sequence[int]],
    samples_per_prompt: int,
    temperature: float,
    policy_version: int,
    seed: int,
    *,
    response_len: int | Sequence[int] = 10,
    group_offset: int = 0,
) -> pa.Table:
    """Sample a group of responses per prompt and return them as a schema-v1 table.

    `response_len` is one length for all prompts or one per prompt (a group shares its length).
    Group ids are `group_offset + prompt index`; sample ids are `g{group}-s{sample}`.
    """
    lengths = [response_len] * len(prompts) if isinstance(response_len, int) else list(response_len)
    generator = torch.Generator().manual_seed(seed)
    rep = [list(p) for p in prompts for _ in range(samples_per_prompt)]
    # Causal model: sampling everyone to the longest length and cutting each row to its own
    # length gives exactly the tokens and log-probs a shorter loop would have produced.
    tokens, logps = sample(model, rep, max(lengths), temperature, generator)
    rows: dict[str, list] = {k: [] for k in COLUMN_TYPES}
    for i, prompt in enumerate(rep):
        g, s = divmod(i, samples_per_prompt)
        n = lengths[g]
        response = tokens[i, :n].tolist()
        rows["prompt_ids"].append(prompt)
        rows["response_ids"].append(response)
        rows["behavior_logprobs"].append(logps[i, :n].tolist())
        rows["reward"].append(reward(prompt, response))
        rows["group_id"].append(group_offset + g)
        rows["sample_id"].append(f"g{group_offset + g:02d}-s{s}")
        rows["policy_version"].append(policy_version)
        rows["temperature"].append(temperature)
    return to_table(rows, temperature)


COLUMN_TYPES = {
    "prompt_ids": pa.list_(pa.int32()),
    "response_ids": pa.list_(pa.int32()),
    "behavior_logprobs": pa.list_(pa.float32()),
    "reward": pa.float32(),
    "group_id": pa.int64(),
    "sample_id": pa.string(),
    "policy_version": pa.int64(),
    "temperature": pa.float32(),
}


def to_table(rows: dict[str, list], temperature: float) -> pa.Table:
    """Columns -> a pyarrow Table with the schema-v1 file metadata."""
    schema = pa.schema(
        [pa.field(name, typ) for name, typ in COLUMN_TYPES.items()],
        metadata={"drpo.schema_version": SCHEMA_VERSION, "drpo.temperature": repr(float(temperature))},
    )
    return pa.Table.from_pydict(rows, schema=schema)


def write_arrow(table: pa.Table, path: str | os.PathLike) -> None:
    """Write an Arrow IPC file (file format, uncompressed, deterministic bytes)."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


@torch.no_grad()
def evaluate(
    model,
    *,
    num_prompts: int = 64,
    samples_per_prompt: int = 4,
    temperature: float = 1.0,
    response_len: int = 10,
    seed: int = 0,
) -> float:
    """Mean reward of sampled responses on `num_prompts` seeded prompts."""
    prompts = make_prompts(num_prompts, seed)
    rep = [p for p in prompts for _ in range(samples_per_prompt)]
    tokens, _ = sample(model, rep, response_len, temperature, torch.Generator().manual_seed(seed))
    keys = torch.tensor([p[-1] for p in rep])[:, None]  # (B, 1)
    return float((tokens == keys).float().mean())
