"""The bundled example: its documented shape, true behavior log-probs, reward, and reproducibility."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import EPS32, LOGP_ULPS, assert_reordered, assert_trained_alike

from drpo_cli.model.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "examples" / "toy"
sys.path.insert(0, str(ROOT / "examples"))
import make_example
import toytask


@pytest.fixture(scope="module")
def table() -> pa.Table:
    with pa.OSFile(str(TOY / "rollouts.arrow")) as f:  # Arrow IPC *file* format
        return pa.ipc.open_file(f).read_all()


@pytest.fixture(scope="module")
def model():
    return load_model(TOY / "model")


def naive_logprobs(model, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of each response token from one full forward pass (all T x V logits)."""
    seq = torch.tensor([prompt + response])  # (1, P + R)
    with torch.no_grad():
        logits = model(input_ids=seq).logits[0].float()  # (P + R, V)
    logp = torch.log_softmax(logits / temperature, dim=-1)[
        len(prompt) - 1 : -1
    ]  # (R, V): position i predicts i+1
    return logp.gather(1, torch.tensor(response)[:, None])[:, 0]  # (R,)


def test_files_are_small():
    assert (TOY / "rollouts.arrow").stat().st_size < 1_000_000
    assert sum(p.stat().st_size for p in (TOY / "model").iterdir()) < 1_000_000


def test_documented_shape(table, model):
    _, info = model
    assert info.policy_version == make_example.CURRENT_VERSION == 8
    assert table.num_rows == 24 * 8
    assert table.schema.metadata[b"drpo.schema_version"] == b"1"
    assert float(table.schema.metadata[b"drpo.temperature"]) == make_example.TEMPERATURE
    rows = table.to_pylist()
    groups: dict[int, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group_id"], []).append(r)
    assert sorted(groups) == list(range(24)) and all(len(g) == 8 for g in groups.values())
    # One policy version and one prompt and response length per group; groups cycle through the lags,
    # so 24 groups give lags 0, 1, 2, 4 five times each and lag 8 four times (x 8 rows each).
    for g in groups.values():
        assert len({r["policy_version"] for r in g}) == 1
        assert len({tuple(r["prompt_ids"]) for r in g}) == 1
        assert len({len(r["response_ids"]) for r in g}) == 1
    lags, counts = np.unique([8 - r["policy_version"] for r in rows], return_counts=True)
    assert lags.tolist() == [0, 1, 2, 4, 8] and counts.tolist() == [40, 40, 40, 40, 32]
    assert len({r["sample_id"] for r in rows}) == len(rows)
    vocab = info.vocab_size
    for r in rows:
        assert r["prompt_ids"][:2] == [toytask.BOS, toytask.KEY_MARK]
        assert 6 <= len(r["response_ids"]) <= 12 and len(r["behavior_logprobs"]) == len(r["response_ids"])
        assert all(0 <= t < vocab for t in r["prompt_ids"] + r["response_ids"])
        assert all(np.isfinite(x) and x <= 0 for x in r["behavior_logprobs"])
        assert r["temperature"] == pytest.approx(make_example.TEMPERATURE)
        assert r["reward"] == pytest.approx(toytask.reward(r["prompt_ids"], r["response_ids"]))


def test_behavior_logprobs_are_true_logprobs_at_lag0(table, model):
    current, _ = model
    rows = [r for r in table.to_pylist() if r["policy_version"] == 8]
    assert len(rows) == 40
    for r in rows:
        expected = naive_logprobs(current, r["prompt_ids"], r["response_ids"], r["temperature"])
        # The sampler's batched forward (examples/toytask.py, on whichever CPU built the committed file) against
        # one full forward here: other shapes and kernels, so equal to rounding (LOGP_ULPS).
        assert_reordered(torch.tensor(r["behavior_logprobs"]), expected, LOGP_ULPS, scale=1 + expected.abs(),
                         msg=r["sample_id"])


def test_behavior_logprobs_match_rebuilt_older_versions(table, model):
    """Every stale row's log-probs come from the documented older version (rebuilt from the saved one)."""
    current, _ = model
    initial = toytask.build_model(seed=make_example.SEED)
    rows = table.to_pylist()
    for lag in (1, 2, 4, 8):
        old = make_example.older_version(current, initial, lag)
        lag_rows = [r for r in rows if r["policy_version"] == 8 - lag]
        for r in lag_rows:
            expected = naive_logprobs(old, r["prompt_ids"], r["response_ids"], r["temperature"])
            assert_reordered(torch.tensor(r["behavior_logprobs"]), expected, LOGP_ULPS, scale=1 + expected.abs(),
                             msg=r["sample_id"])  # as at lag 0
        # Staleness shows: the current model's log-probs move away from the logged ones as the lag grows.
        if lag == 8:
            drift = [
                (
                    naive_logprobs(current, r["prompt_ids"], r["response_ids"], r["temperature"])
                    - torch.tensor(r["behavior_logprobs"])
                )
                .abs()
                .max()
                .item()
                for r in lag_rows
            ]
            assert max(drift) > 0.1


def test_toy_reward_is_the_share_of_tokens_matching_the_key():
    a, b = toytask.VOCAB["a"], toytask.VOCAB["b"]
    prompt = [toytask.BOS, toytask.KEY_MARK, a]
    assert toytask.reward(prompt, [a, a, b, a]) == 3 / 4
    assert toytask.reward(prompt, [b] * 5) == 0.0


def test_sampler_is_seeded_and_evaluate_in_range(model):
    current, _ = model
    prompts = toytask.make_prompts(4, seed=3)
    t1 = toytask.sample_rollouts(
        current, prompts, 2, 0.9, policy_version=8, seed=5, response_len=[4, 5, 6, 7]
    )
    t2 = toytask.sample_rollouts(
        current, prompts, 2, 0.9, policy_version=8, seed=5, response_len=[4, 5, 6, 7]
    )
    assert t1.equals(t2)
    assert [len(x) for x in t1.column("response_ids").to_pylist()] == [4, 4, 5, 5, 6, 6, 7, 7]
    mean = toytask.evaluate(current, num_prompts=16, samples_per_prompt=2, seed=0)
    assert 0.0 <= mean <= 1.0


def test_tokenizer_roundtrip():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOY / "model")
    ids = [toytask.BOS, toytask.KEY_MARK, toytask.VOCAB["c"], toytask.VOCAB["c"]]
    assert tok("<bos> key: c c", add_special_tokens=False).input_ids == ids
    assert tok.decode(ids) == "<bos> key: c c"


def test_example_validates():
    from drpo_cli.rollouts import files, validate

    source = files.open_rollouts([TOY / "rollouts.arrow"])
    assert validate.validate_rollouts(source) == []


def digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_make_example_is_deterministic(tmp_path):
    make_example.main(["--out", str(tmp_path / "a")])
    make_example.main(["--out", str(tmp_path / "b")])
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


@pytest.mark.slow
def test_committed_example_is_current(tmp_path, table):
    """Regenerating reproduces the committed files: byte for byte except the float numerics, which a
    CPU's kernels may round differently; the sampled ids equal. The model is 60 Adam steps at lr 1e-2
    (make_example.warm_start): its weights within ADAM_DRIFT of the committed ones, and the log-probs
    of the stale samplers built from it move with them (measured: at most 5.1× the largest weight
    difference, with AVX2 and baseline kernels), bounded at 16× plus the kernels' own LOGP_ULPS."""
    make_example.main(["--out", str(tmp_path)])
    ours, committed = digest(tmp_path), digest(TOY)
    assert ours.keys() == committed.keys()
    numeric = {"model/model.safetensors", "rollouts.arrow"}

    def content(root, name):  # config files name the transformers version that wrote them: the installed one
        if not name.endswith(".json"):
            return (ours if root == tmp_path else committed)[name]
        doc = json.loads((root / name).read_text(encoding="utf-8"))
        if isinstance(doc, dict):
            doc.pop("transformers_version", None)
        return doc

    for name in ours.keys() - numeric:
        assert content(tmp_path, name) == content(TOY, name), name
    from safetensors.torch import load_file

    new, old = load_file(str(tmp_path / "model" / "model.safetensors")), load_file(str(TOY / "model" / "model.safetensors"))
    assert new.keys() == old.keys()
    assert_trained_alike(new, old, lr=1e-2, steps=60)
    moved = max((new[k] - old[k]).abs().max().item() for k in old)
    with pa.OSFile(str(tmp_path / "rollouts.arrow")) as f:
        rebuilt = pa.ipc.open_file(f).read_all()
    original = table
    assert rebuilt.schema == original.schema and rebuilt.schema.metadata == original.schema.metadata
    for name in original.column_names:
        if name in ("behavior_logprobs", "proximal_logprobs"):
            a = np.concatenate(rebuilt[name].to_pylist())
            b = np.concatenate(original[name].to_pylist())
            assert (np.abs(a - b) <= LOGP_ULPS * EPS32 * (1 + np.abs(b)) + 16 * moved).all(), name
        else:
            assert rebuilt[name].to_pylist() == original[name].to_pylist(), name
