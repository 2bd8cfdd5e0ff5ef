"""RolloutRows -> token-budget micro-batches of tensors (SPEC.md §5, second point).

Each row's model input is `prompt + response[:-1]`: the output at position p predicts the token at
p + 1, so the last response token never needs to be an input. Rows are sorted by that length and
packed greedily while `rows × longest ≤ micro_batch_tokens`, which keeps padding small on skewed
length distributions (a pad-to-longest batch of lengths 16 … 4,096 is mostly padding).

Response tokens are carried flat (M of them per micro-batch), in the order of RolloutRows' flat
token arrays within each row, so callers gather behavior log-probs, advantages and loss masks with
`token_index`, and the log-prob engine gathers hidden states with `src_index`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from drpo_cli.base.errors import ConfigError, InputError
from drpo_cli.rollouts.rows import RolloutRows

PADDING_SIDES = ("right", "left")


@dataclass(frozen=True)
class MicroBatch:
    input_ids: torch.Tensor  # (B, L) int64, pad id 0 (never attended, never predicted from)
    attention_mask: torch.Tensor  # (B, L) int64, 1 = real token
    position_ids: torch.Tensor  # (B, L) int64, 0-based within each row (so left padding is exact)
    target_ids: torch.Tensor  # (M,) int64, the logged response tokens
    src_index: torch.Tensor  # (M,) int64, flat index into (B·L) of the position predicting each target
    temperature: torch.Tensor  # (M,) float32, the row's sampling temperature
    token_index: torch.Tensor  # (M,) int64, index into RolloutRows' flat token arrays
    seq_index: torch.Tensor  # (M,) int64, row within this micro-batch (0..B-1)
    rows: torch.Tensor  # (B,) int64, row indices into RolloutRows
    real_positions: int  # non-padding positions, sum of input lengths
    routed_experts: torch.Tensor | None = None  # (B, L, n_layers, k) int16 logged expert ids, −1 = none (moe.py)

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """M: response tokens whose log-prob this micro-batch yields."""
        return int(self.target_ids.shape[0])

    @property
    def positions(self) -> int:
        """B·L: positions the model body computes, padding included."""
        return int(self.input_ids.numel())

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_positions / max(self.positions, 1)

    def to(self, device: torch.device | str) -> MicroBatch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)


def filler_batch() -> MicroBatch:
    """A one-row micro-batch predicting token 0 from token 0: the pass a rank without work runs so
    that every FSDP rank runs the same number of passes (its results are dropped)."""
    one = torch.ones((1, 1), dtype=torch.int64)
    zero = torch.zeros(1, dtype=torch.int64)
    return MicroBatch(input_ids=one * 0, attention_mask=one, position_ids=one * 0, target_ids=zero, src_index=zero,
                      temperature=torch.ones(1), token_index=zero, seq_index=zero, rows=zero, real_positions=1)


def padding_fraction(batches: list[MicroBatch]) -> float:
    """Overall share of computed positions that are padding, over several micro-batches."""
    total = sum(mb.positions for mb in batches)
    real = sum(mb.real_positions for mb in batches)
    return 1.0 - real / max(total, 1)


def input_lengths(rows: RolloutRows, row_indices: np.ndarray) -> np.ndarray:
    """(n,) model input length of each row: prompt + response − 1."""
    idx = np.asarray(row_indices, dtype=np.int64)
    return rows.prompt_lengths()[idx] + rows.response_lengths()[idx] - 1


def plan_micro_batches(
    rows: RolloutRows,
    row_indices: np.ndarray | list[int],
    micro_batch_tokens: int,
    *,
    padding_side: str = "right",
) -> list[MicroBatch]:
    """Length-sorted greedy packing under a token budget; deterministic for given inputs.

    Rows are taken longest first (ties by row index), so the largest micro-batch comes first and
    an out-of-memory budget fails at once. A row is added while `(rows + 1) × longest ≤ budget`;
    a single row longer than the budget gets a micro-batch of its own.
    """
    if micro_batch_tokens < 1:
        raise ConfigError(f"micro_batch_tokens: expected an integer ≥ 1, found {micro_batch_tokens}")
    if padding_side not in PADDING_SIDES:
        raise ConfigError(f"padding_side: expected one of {PADDING_SIDES}, found {padding_side!r}")
    idx = np.asarray(row_indices, dtype=np.int64)
    _check_rows(rows, idx)
    lengths = input_lengths(rows, idx)  # (n,)
    order = np.lexsort((idx, -lengths))  # longest first, then by row index
    groups: list[list[int]] = []
    longest = 0
    for k in order:
        if groups and (len(groups[-1]) + 1) * longest <= micro_batch_tokens:
            groups[-1].append(int(idx[k]))
        else:
            groups.append([int(idx[k])])
            longest = int(lengths[k])  # sorted descending: the first row is the longest
    return [_build(rows, np.array(g, dtype=np.int64), padding_side) for g in groups]


def _check_rows(rows: RolloutRows, idx: np.ndarray) -> None:
    if idx.size and (idx.min() < 0 or idx.max() >= rows.num_rows):
        raise InputError(
            f"row_indices: expected values in [0, {rows.num_rows}), found {idx.min()}..{idx.max()}"
        )
    # Without a prompt token nothing predicts the first response token.
    empty = idx[rows.prompt_lengths()[idx] == 0]
    if empty.size:
        i = int(empty[0])
        raise InputError(
            f"{rows.source_file[i]}: column prompt_ids, row {int(rows.source_row[i])} "
            f"(sample_id {rows.sample_ids[i]}): expected ≥ 1 prompt token, found 0"
        )


def _build(rows: RolloutRows, group: np.ndarray, padding_side: str) -> MicroBatch:
    """Tensors of one micro-batch of rows `group` (in that order)."""
    p_len = rows.prompt_lengths()[group]  # (B,)
    r_len = rows.response_lengths()[group]  # (B,)
    n_in = p_len + r_len - 1  # (B,)
    b, seq_len = len(group), int(n_in.max())
    ids = np.zeros((b, seq_len), dtype=np.int64)  # (B, L)
    mask = np.zeros((b, seq_len), dtype=np.int64)  # (B, L)
    pos = np.zeros((b, seq_len), dtype=np.int64)  # (B, L)
    src, tok, seq = [], [], []
    for j, i in enumerate(group):
        start = seq_len - n_in[j] if padding_side == "left" else 0
        resp = rows.response(i)
        ids[j, start : start + n_in[j]] = np.concatenate([rows.prompt(i), resp[:-1]])
        mask[j, start : start + n_in[j]] = 1
        pos[j, start : start + n_in[j]] = np.arange(n_in[j])
        # Response token t (0-based) sits at input position P + t; position P + t − 1 predicts it.
        src.append(j * seq_len + start + p_len[j] - 1 + np.arange(r_len[j]))
        tok.append(np.arange(rows.response_offsets[i], rows.response_offsets[i + 1]))
        seq.append(np.full(r_len[j], j))
    row_of_token = np.repeat(group, r_len)  # (M,)
    routing = None
    if rows.routed_experts is not None:  # each row's positions sit exactly where its input tokens sit
        routing = np.full((b, seq_len, *rows.routed_experts.shape[1:]), -1, dtype=np.int16)  # (B, L, n_layers, k)
        r_off = rows.routing_offsets()
        for j, i in enumerate(group):
            start = seq_len - n_in[j] if padding_side == "left" else 0
            routing[j, start : start + n_in[j]] = rows.routed_experts[r_off[i] : r_off[i + 1]]
    return MicroBatch(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        position_ids=torch.from_numpy(pos),
        target_ids=torch.from_numpy(rows.response_ids[np.concatenate(tok)].astype(np.int64)),
        src_index=torch.from_numpy(np.concatenate(src).astype(np.int64)),
        temperature=torch.from_numpy(rows.temperature[row_of_token].astype(np.float32)),
        token_index=torch.from_numpy(np.concatenate(tok).astype(np.int64)),
        seq_index=torch.from_numpy(np.concatenate(seq).astype(np.int64)),
        rows=torch.from_numpy(group.copy()),
        real_positions=int(n_in.sum()),
        routed_experts=None if routing is None else torch.from_numpy(routing),
    )
