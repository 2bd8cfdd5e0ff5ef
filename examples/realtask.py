"""One-digit additions for a real chat model (SmolLM2-135M-Instruct), with an exact reward.

The prompt is the chat template around "What is A + B? Reply with the number only." for digits
A, B in 0..9. The reward is 1 when the reply, stripped of surrounding white space, is exactly the
sum's digits; 0.25 when the reply is longer but its last number is the sum (right, in the wrong
format, e.g. "3 + 4 = 7"); else 0. SmolLM2-135M-Instruct mostly answers in sentences at
temperature 1 (reward about 0.1 at the start), so the reward takes many rounds to saturate.

The sampler is a plain loop with a KV cache (the prompts' common prefix computed once) and a
seeded `torch.Generator` (no top-p / top-k)
that logs the true log-prob of each sampled token at the sampling temperature,
log_softmax(logits / T) in float32 — the processed log-probs an inference engine should log.
A response ends at the first end-of-turn token (kept and trained on) or at `max_new_tokens`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
import toytask  # the schema-v1 table and Arrow writer, shared with the toy

QUESTION = "What is {a} + {b}? Reply with the number only."
MAX_NEW_TOKENS = 8
WRONG_FORMAT = 0.25  # the reward of a right sum inside a longer reply


def make_problems(num: int, seed: int) -> list[tuple[int, int]]:
    """`num` seeded digit pairs (A, B)."""
    rng = np.random.default_rng(seed)
    return [(int(a), int(b)) for a, b in rng.integers(0, 10, size=(num, 2))]


def prompt_ids(tokenizer, a: int, b: int) -> list[int]:
    """The chat-templated prompt, ending with the assistant turn's header."""
    messages = [{"role": "user", "content": QUESTION.format(a=a, b=b)}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def score(text: str, problem: tuple[int, int]) -> float:
    """1.0 for exactly the sum (white space stripped), WRONG_FORMAT when the last number is the sum, else 0."""
    answer = str(problem[0] + problem[1])
    text = text.strip()
    if text == answer:
        return 1.0
    numbers = re.findall(r"\d+", text)
    return WRONG_FORMAT if numbers and numbers[-1] == answer else 0.0


def score_first(text: str, problem: tuple[int, int]) -> float:
    """1.0 when the first number of the reply other than A and B is the sum ("3 + 4 = 7", "It is 7."),
    else 0: examples/real/run.py's rule, which SmolLM2-135M-Instruct learns within a few rounds at T = 1
    (replies in sentences count; the exact-format rule of score() plateaus while replies run long)."""
    numbers = [int(m) for m in re.findall(r"\d+", text) if int(m) not in problem]
    return float(bool(numbers) and numbers[0] == problem[0] + problem[1])


SCORES = {"exact": score, "first": score_first}


def reward(tokenizer, problem: tuple[int, int], response_ids: Sequence[int], rule=score) -> float:
    """rule() (score or score_first) of the decoded reply, end-of-turn dropped."""
    return rule(tokenizer.decode(list(response_ids), skip_special_tokens=True), problem)


@torch.no_grad()
def sample(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, eos_id: int,
           generator: torch.Generator) -> tuple[list[list[int]], list[list[float]]]:
    """Sample every prompt (all the same length) to its first `eos_id` or `max_new_tokens`.

    Returns per row the response tokens (EOS included when sampled) and their log-probs.
    """
    seq = torch.tensor(prompts, dtype=torch.long)  # (B, P)
    # The prompts' common prefix (the chat template's system turn, the question's words) runs once
    # with batch 1; its keys and values are repeated for the B rows, which then run only their tails.
    same = (seq == seq[:1]).all(dim=0)  # (P,)
    prefix = min(int(same.long().cumprod(0).sum()), seq.shape[1] - 1)
    cache = None
    if prefix > 0:
        cache = model(input_ids=seq[:1, :prefix], use_cache=True, logits_to_keep=1)["cache"]
        cache.batch_repeat_interleave(len(prompts))
    tail = torch.arange(prefix, seq.shape[1]).expand(len(prompts), -1)  # (B, P - prefix) positions
    out = model(input_ids=seq[:, prefix:], cache=cache, position_ids=tail, use_cache=True,
                logits_to_keep=1)  # the head on the last position only
    cache = out["cache"]  # (B, P) keys and values of every layer
    logits = out.logits[:, -1].float()  # (B, V)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    tokens, logps = [], []
    for t in range(max_new_tokens):
        logp = torch.log_softmax(logits / temperature, dim=-1)  # (B, V)
        tok = torch.multinomial(logp.exp(), 1, generator=generator)  # (B, 1)
        tokens.append(tok[:, 0])
        logps.append(logp.gather(1, tok)[:, 0])
        done |= tok[:, 0] == eos_id
        if bool(done.all()) or t + 1 == max_new_tokens:
            break
        position = torch.full((len(prompts), 1), seq.shape[1] + t, dtype=torch.long)
        out = model(input_ids=tok, cache=cache, position_ids=position, use_cache=True)
        cache = out["cache"]
        logits = out.logits[:, -1].float()
    toks = torch.stack(tokens, dim=1).tolist()  # (B, L)
    lps = torch.stack(logps, dim=1).tolist()
    rows_t, rows_l = [], []
    for ts, ls in zip(toks, lps):
        n = ts.index(eos_id) + 1 if eos_id in ts else len(ts)
        rows_t.append(ts[:n])
        rows_l.append(ls[:n])
    return rows_t, rows_l


def _by_length(prompts: list[list[int]]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    return groups


def sample_rollouts(model, tokenizer, problems: Sequence[tuple[int, int]], samples_per_prompt: int,
                    temperature: float, policy_version: int, seed: int,
                    max_new_tokens: int = MAX_NEW_TOKENS, rule=score):
    """A group of `samples_per_prompt` responses per problem as a schema-v1 table (toytask.to_table)."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = [prompt_ids(tokenizer, a, b) for a, b in problems]
    rep = [i for i in range(len(prompts)) for _ in range(samples_per_prompt)]
    generator = torch.Generator().manual_seed(seed)
    responses: list = [None] * len(rep)
    logps: list = [None] * len(rep)
    rep_prompts = [prompts[i] for i in rep]
    for idx in _by_length(rep_prompts).values():  # equal-length prompts need no padding
        ts, ls = sample(model, [rep_prompts[i] for i in idx], max_new_tokens, temperature, eos, generator)
        for i, t, lp in zip(idx, ts, ls):
            responses[i], logps[i] = t, lp
    rows: dict[str, list] = {k: [] for k in toytask.COLUMN_TYPES}
    for j, g in enumerate(rep):
        rows["prompt_ids"].append(prompts[g])
        rows["response_ids"].append(responses[j])
        rows["behavior_logprobs"].append(logps[j])
        rows["reward"].append(reward(tokenizer, problems[g], responses[j], rule))
        rows["group_id"].append(g)
        rows["sample_id"].append(f"g{g:02d}-s{j % samples_per_prompt}")
        rows["policy_version"].append(policy_version)
        rows["temperature"].append(temperature)
    return toytask.to_table(rows, temperature)


@torch.no_grad()
def evaluate(model, tokenizer, *, samples_per_prompt: int = 1, temperature: float = 1.0, seed: int = 0,
             max_new_tokens: int = MAX_NEW_TOKENS, rule=score) -> float:
    """Mean reward over all 100 digit pairs (the whole task), `samples_per_prompt` seeded samples each."""
    problems = [(a, b) for a in range(10) for b in range(10)]
    table = sample_rollouts(model, tokenizer, problems, samples_per_prompt, temperature, 0, seed, max_new_tokens,
                            rule)
    return float(table.column("reward").to_numpy().mean())
