"""TRL's log-prob path (GRPOTrainer) and the naive one, on plain token lists: no drpo import.

`rows` is anything with `num_rows`, `prompt(i)` and `response(i)` (int64 arrays): drpo's
RolloutRows in the in-process benchmark, `ArrowRows` in the whole-process one.
"""

from __future__ import annotations

import numpy as np
import torch


class ArrowRows:
    """The prompt and response token ids of a rollout table, as the benchmarks' paths read them."""

    def __init__(self, table):
        self.prompts = [np.asarray(p, dtype=np.int64) for p in table.column("prompt_ids").to_pylist()]
        self.responses = [np.asarray(r, dtype=np.int64) for r in table.column("response_ids").to_pylist()]
        self.num_rows = len(self.prompts)

    def prompt(self, i: int) -> np.ndarray:
        return self.prompts[i]

    def response(self, i: int) -> np.ndarray:
        return self.responses[i]


def trl_batch(rows):
    """GRPOTrainer's layout: prompts left-padded, completions right-padded, concatenated."""
    n = rows.num_rows
    p_len = max(len(rows.prompt(i)) for i in range(n))
    c_len = max(len(rows.response(i)) for i in range(n))
    prompt_ids = torch.zeros(n, p_len, dtype=torch.long)
    prompt_mask = torch.zeros(n, p_len, dtype=torch.long)
    comp_ids = torch.zeros(n, c_len, dtype=torch.long)
    comp_mask = torch.zeros(n, c_len, dtype=torch.long)
    for i in range(n):
        p, r = torch.from_numpy(rows.prompt(i)), torch.from_numpy(rows.response(i))
        prompt_ids[i, p_len - len(p):], prompt_mask[i, p_len - len(p):] = p, 1
        comp_ids[i, :len(r)], comp_mask[i, :len(r)] = r, 1
    return (torch.cat([prompt_ids, comp_ids], 1), torch.cat([prompt_mask, comp_mask], 1), comp_ids, comp_mask)


def trl_logps(model, batch, temperature: float = 1.0) -> torch.Tensor:
    """GRPOTrainer._get_per_token_logps: logits_to_keep, temperature, selective_log_softmax."""
    from trl.trainer.utils import selective_log_softmax

    input_ids, attention_mask, comp_ids, _ = batch
    logits_to_keep = comp_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep + 1).logits
    logits = logits[:, :-1, :]  # (B, C, V): the last one predicts nothing
    logits = logits[:, -logits_to_keep:] / temperature
    return selective_log_softmax(logits, comp_ids)  # (B, C); padded completion positions are masked by callers


def naive_logps(model, rows) -> torch.Tensor:
    """Pad to the longest row (right), full logits of every position, float32 log_softmax, gather."""
    n = rows.num_rows
    seqs = [np.concatenate([rows.prompt(i), rows.response(i)[:-1]]) for i in range(n)]
    L = max(len(s) for s in seqs)
    ids = torch.zeros(n, L, dtype=torch.long)
    mask = torch.zeros(n, L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.from_numpy(s), 1
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)  # (B, L, V)
    out = []
    for i in range(n):
        p, r = len(rows.prompt(i)), rows.response(i)
        out.append(logp[i, p - 1:p - 1 + len(r)].gather(1, torch.from_numpy(r)[:, None])[:, 0])
    return torch.cat(out)
