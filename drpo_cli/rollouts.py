"""Canonical rollout rows in memory: flat CSR numpy arrays, ready for micro-batching. No torch.

Row i's response tokens are `response_ids[response_offsets[i]:response_offsets[i+1]]`; every
per-token array (behavior_logprobs, advantages, loss_mask, proximal_logprobs) shares those offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RolloutRows:
    prompt_ids: np.ndarray  # (P,) int64, all prompts concatenated
    prompt_offsets: np.ndarray  # (N+1,) int64
    response_ids: np.ndarray  # (T,) int64, all responses concatenated
    response_offsets: np.ndarray  # (N+1,) int64
    behavior_logprobs: np.ndarray  # (T,) float32, the sampler's log-probs (mu)
    advantages: np.ndarray  # (T,) float32, per token (broadcast / group-relative already applied)
    loss_mask: np.ndarray  # (T,) bool
    proximal_logprobs: np.ndarray | None  # (T,) float32 or None
    sample_ids: list[str]  # (N,)
    policy_version: np.ndarray  # (N,) int64, -1 where unknown
    temperature: np.ndarray  # (N,) float32
    source_file: list[str]  # (N,) file each row came from
    source_row: np.ndarray  # (N,) int64 row index within that file

    @property
    def num_rows(self) -> int:
        return len(self.sample_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.response_offsets[-1])

    def prompt(self, i: int) -> np.ndarray:
        return self.prompt_ids[self.prompt_offsets[i] : self.prompt_offsets[i + 1]]

    def response(self, i: int) -> np.ndarray:
        return self.response_ids[self.response_offsets[i] : self.response_offsets[i + 1]]

    def response_lengths(self) -> np.ndarray:
        return np.diff(self.response_offsets)  # (N,)

    def prompt_lengths(self) -> np.ndarray:
        return np.diff(self.prompt_offsets)  # (N,)

    def token_row(self) -> np.ndarray:
        """(T,) row index of every response token."""
        return np.repeat(np.arange(self.num_rows, dtype=np.int64), self.response_lengths())

    def token_position(self) -> np.ndarray:
        """(T,) index of every response token within its response."""
        starts = np.repeat(self.response_offsets[:-1], self.response_lengths())
        return np.arange(self.num_tokens, dtype=np.int64) - starts

    def select(self, indices: np.ndarray) -> RolloutRows:
        """A new RolloutRows holding rows `indices` in that order (copies)."""
        idx = np.asarray(indices, dtype=np.int64)
        p_off, p_take = _gather_ranges(self.prompt_offsets, idx)
        r_off, r_take = _gather_ranges(self.response_offsets, idx)
        return RolloutRows(
            prompt_ids=self.prompt_ids[p_take],
            prompt_offsets=p_off,
            response_ids=self.response_ids[r_take],
            response_offsets=r_off,
            behavior_logprobs=self.behavior_logprobs[r_take],
            advantages=self.advantages[r_take],
            loss_mask=self.loss_mask[r_take],
            proximal_logprobs=None if self.proximal_logprobs is None else self.proximal_logprobs[r_take],
            sample_ids=[self.sample_ids[i] for i in idx],
            policy_version=self.policy_version[idx],
            temperature=self.temperature[idx],
            source_file=[self.source_file[i] for i in idx],
            source_row=self.source_row[idx],
        )


def _gather_ranges(offsets: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """New offsets and the flat element indices of the ranges of rows `idx`."""
    starts, ends = offsets[idx], offsets[idx + 1]
    lengths = ends - starts
    new_offsets = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    take = np.arange(new_offsets[-1], dtype=np.int64) - np.repeat(new_offsets[:-1] - starts, lengths)
    return new_offsets, take
