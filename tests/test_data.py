"""Token-budget micro-batching: packing rule, index bookkeeping, padding accounting."""

from __future__ import annotations

import pytest
import torch
from toy import make_rows

from drpo_cli.base.errors import ConfigError, InputError
from drpo_cli.model.batching import padding_fraction, plan_micro_batches

# Input lengths (prompt + response − 1): row0 2+3−1=4, row1 1+1−1=1, row2 3+5−1=7, row3 2+2−1=3.
ROWS = make_rows(
    prompts=[[1, 2], [3], [4, 5, 6], [7, 8]],
    responses=[[10, 11, 12], [13], [14, 15, 16, 17, 18], [19, 20]],
    temperatures=[0.7, 1.0, 1.3, 1.0],
)


def test_greedy_packing_by_budget():
    # Longest first: row2 (7), row0 (4), row3 (3), row1 (1).
    # Budget 8: [row2] (2×7=14 > 8), then [row0] + row3 → 2×4=8 ≤ 8, + row1 → 3×4=12 > 8, so [row1].
    mbs = plan_micro_batches(ROWS, [0, 1, 2, 3], 8)
    assert [mb.rows.tolist() for mb in mbs] == [[2], [0, 3], [1]]
    assert [tuple(mb.input_ids.shape) for mb in mbs] == [(1, 7), (2, 4), (1, 1)]
    # Padding: mb1 has 4+3=7 real of 8 positions; overall 7+7+1=15 real of 7+8+1=16.
    assert mbs[1].padding_fraction == pytest.approx(1 / 8)
    assert padding_fraction(mbs) == pytest.approx(1 / 16)


def test_row_longer_than_budget_gets_its_own_batch_and_all_rows_fit_big_budget():
    mbs = plan_micro_batches(ROWS, [0, 1, 2, 3], 3)
    assert [mb.rows.tolist() for mb in mbs] == [[2], [0], [3], [1]]
    # Budget 28 = 4 rows × 7: everything in one batch.
    (mb,) = plan_micro_batches(ROWS, [0, 1, 2, 3], 28)
    assert mb.rows.tolist() == [2, 0, 3, 1]
    assert mb.padding_fraction == pytest.approx(1 - 15 / 28)


@pytest.mark.parametrize("side", ["right", "left"])
def test_indices_point_at_the_right_tokens(side):
    (mb,) = plan_micro_batches(ROWS, [0, 2], 100, padding_side=side)
    b, seq_len = mb.input_ids.shape
    assert (b, seq_len) == (2, 7)  # rows 2 (7) and 0 (4)
    flat_ids = mb.input_ids.reshape(-1)
    # Every target equals the token right after its source position in the same row.
    # (Each row's final response token is not an input, so it has no successor position to check.)
    ends = torch.from_numpy(ROWS.response_offsets)[mb.rows[mb.seq_index] + 1]  # (M,)
    keep = mb.token_index + 1 < ends
    assert keep.sum().item() == 8 - 2
    assert torch.equal(flat_ids[mb.src_index[keep] + 1], mb.target_ids[keep])
    # token_index gathers the same tokens from the flat arrays.
    assert torch.equal(torch.from_numpy(ROWS.response_ids)[mb.token_index], mb.target_ids)
    # Response offsets are [0, 3, 4, 9, 11]: row2 holds flat tokens 4..8, row0 holds 0..2.
    assert mb.token_index.tolist() == [4, 5, 6, 7, 8, 0, 1, 2]
    assert mb.seq_index.tolist() == [0] * 5 + [1] * 3
    assert mb.temperature.tolist() == pytest.approx([1.3] * 5 + [0.7] * 3)
    # Source positions are real (unpadded) tokens, and positions count from each row's first token.
    assert mb.attention_mask.reshape(-1)[mb.src_index].all()
    row0 = mb.position_ids[1][mb.attention_mask[1] == 1]
    assert row0.tolist() == [0, 1, 2, 3]
    if side == "left":
        assert mb.attention_mask[1].tolist() == [0, 0, 0, 1, 1, 1, 1]
        # row0: prompt [1, 2], first target 10 predicted from position 3 + 2 − 1 = 4 → flat 7 + 4 = 11.
        assert mb.src_index[5].item() == 11
    else:
        assert mb.attention_mask[1].tolist() == [1, 1, 1, 1, 0, 0, 0]
        assert mb.src_index[5].item() == 7 + 1


def test_deterministic_and_order_independent():
    a = plan_micro_batches(ROWS, [3, 1, 0, 2], 8)
    b = plan_micro_batches(ROWS, [0, 1, 2, 3], 8)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.src_index, y.src_index)


def test_to_moves_tensors_and_keeps_counts():
    (mb,) = plan_micro_batches(ROWS, [1], 10)
    moved = mb.to("cpu")
    assert moved.real_positions == mb.real_positions == 1
    assert moved.num_tokens == 1 and torch.equal(moved.target_ids, torch.tensor([13]))


def test_bad_budget_padding_side_row_index_or_empty_prompt_is_refused():
    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        plan_micro_batches(ROWS, [0], 0)
    with pytest.raises(ConfigError, match="padding_side"):
        plan_micro_batches(ROWS, [0], 8, padding_side="middle")
    with pytest.raises(InputError, match="row_indices"):
        plan_micro_batches(ROWS, [4], 8)
    rows = make_rows([[], [1]], [[2], [3]])
    with pytest.raises(InputError, match=r"mem.arrow: column prompt_ids, row 0 \(sample_id s0\)"):
        plan_micro_batches(rows, [0, 1], 8)
