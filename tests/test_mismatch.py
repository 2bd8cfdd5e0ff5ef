"""The sampler precisions of the staleness × mismatch experiment (examples/mismatch.py) and the real task's reward."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import mismatch
import realtask
import toytask


def test_round_through_hand_computed():
    # Per tensor, amax 448 = float8_e4m3fn's largest finite value, so the scale is 1. Near 0.3 the format
    # has 0.25 · (1 + k/8): 0.28125 and 0.3125; 0.3 is nearer 0.3125. 1.0 and -448 are exact.
    x = torch.tensor([1.0, 0.3, -448.0])
    assert mismatch.round_through(x, "e4m3").tolist() == [1.0, 0.3125, -448.0]
    # The same values scaled by 1/64: the scale absorbs it, so the rounded values scale too.
    assert mismatch.round_through(x / 64, "e4m3").tolist() == pytest.approx([1 / 64, 0.3125 / 64, -7.0])
    # int4: amax 0.7 -> scale 0.1; -0.36 / 0.1 = -3.6 -> -4; 0.12 -> 1.2 -> 1.
    assert mismatch.round_through(torch.tensor([0.7, -0.36, 0.12]), "int4").tolist() == pytest.approx([0.7, -0.4, 0.1])
    # Per channel (rows): each row has its own scale, so a small row keeps its resolution.
    w = torch.tensor([[0.7, 0.12], [0.007, -0.0036]])
    assert mismatch.round_through(w, "int4", dim=1).flatten().tolist() == pytest.approx([0.7, 0.1, 0.007, -0.004])
    # bf16 keeps 8 significant bits: 1 + 2^-9 rounds to 1.
    assert mismatch.round_through(torch.tensor([1 + 2**-9, 3.0]), "bf16").tolist() == [1.0, 3.0]


def test_sampler_copy_rounds_linear_weights_and_inputs_and_leaves_the_model_alone():
    model = toytask.build_model(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert mismatch.sampler_copy(model, "none") is model
    sampler = mismatch.sampler_copy(model, "fp8-w8a8")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the trainer's model is untouched
    q_proj, q_copy = model.model.layers[0].self_attn.q_proj, sampler.model.layers[0].self_attn.q_proj
    assert torch.equal(q_copy.weight, mismatch.round_through(q_proj.weight, "e4m3"))
    assert not torch.equal(q_copy.weight, q_proj.weight)
    # The tied embedding / output head stays in fp32.
    assert torch.equal(sampler.get_output_embeddings().weight, model.get_output_embeddings().weight)
    # Inputs are rounded per token (last dimension) before the rounded weight is applied.
    x = torch.randn(3, 64)
    expected = torch.nn.functional.linear(mismatch.round_through(x, "e4m3", dim=-1), q_copy.weight)
    assert torch.equal(q_copy(x), expected)
    # Per-channel levels use one scale per output row.
    channel = mismatch.sampler_copy(model, "fp8-channel").model.layers[0].self_attn.q_proj.weight
    assert torch.equal(channel, mismatch.round_through(q_proj.weight, "e4m3", dim=1))


def test_levels_grow_in_size_on_the_toy_model():
    # Deterministic log-prob gap between the trainer and each sampler at the same tokens.
    model = toytask.build_model(seed=1)
    seq = torch.randint(5, 21, (8, 12))
    ref = torch.log_softmax(model(input_ids=seq).logits, -1)
    gap = {}
    torch.set_grad_enabled(False)
    for level in ("none", "bf16", "fp8-tensor", "int4-w4a8"):
        out = torch.log_softmax(mismatch.sampler_copy(model, level)(input_ids=seq).logits, -1)
        gap[level] = float((out - ref).abs().mean())
    assert gap["none"] == 0.0
    torch.set_grad_enabled(True)
    assert 0 < gap["bf16"] < gap["fp8-tensor"] < gap["int4-w4a8"]


def test_describe_names_each_level():
    assert mismatch.describe(mismatch.LEVELS["fp8-w8a8"]) == (
        "weights float8_e4m3fn (per tensor), Linear inputs float8_e4m3fn (per token)")
    assert mismatch.describe(mismatch.LEVELS["bf16"]) == "weights bf16, Linear inputs bf16"


@pytest.mark.parametrize(("text", "expected"), [
    ("7", 1.0), (" 7\n", 1.0), ("3 + 4 = 7", 0.25), ("The answer is 7.", 0.25), ("07", 0.0), ("8", 0.0),
    ("7 apples, or 8", 0.0), ("", 0.0), ("seven", 0.0),
])
def test_real_task_score(text, expected):
    assert realtask.score(text, (3, 4)) == expected


def test_real_task_problems_are_seeded_digit_pairs():
    problems = realtask.make_problems(50, seed=4)
    assert problems == realtask.make_problems(50, seed=4)
    assert all(0 <= a <= 9 and 0 <= b <= 9 for a, b in problems)
    assert len(set(problems)) > 20
