"""load_rows: CSR arrays against a naive per-row reference, advantage sources, temperature and id
defaults, group statistics in one streaming pass."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from conftest import valid_rollout_table, write_rollout_table

from drpo_cli.base.errors import ConfigError, InputError
from drpo_cli.rollouts import files
from drpo_cli.rollouts.rows import group_advantage_table, load_rows

F32 = pa.list_(pa.float32())


def test_csr_arrays_match_the_rows(valid_rollout_path):
    rows = load_rows(valid_rollout_path)
    table = valid_rollout_table().to_pylist()
    assert rows.num_rows == 4 and rows.num_tokens == 8
    for i, row in enumerate(table):
        assert rows.prompt(i).tolist() == row["prompt_ids"]
        assert rows.response(i).tolist() == row["response_ids"]
        sl = slice(rows.response_offsets[i], rows.response_offsets[i + 1])
        assert rows.behavior_logprobs[sl].tolist() == row["behavior_logprobs"]  # values exact in float32
        assert rows.loss_mask[sl].tolist() == row["loss_mask"]
    assert rows.response_offsets.tolist() == [0, 3, 4, 6, 8]
    assert rows.prompt_offsets.tolist() == [0, 2, 4, 5, 6]
    assert rows.sample_ids == ["s0", "s1", "s2", "s3"]
    assert rows.policy_version.tolist() == [3, 3, 2, 1]
    assert rows.source_file == [str(valid_rollout_path)] * 4 and rows.source_row.tolist() == [0, 1, 2, 3]
    assert rows.proximal_logprobs is None
    assert rows.response_ids.dtype == np.int64 and rows.behavior_logprobs.dtype == np.float32
    assert rows.advantages.dtype == np.float32 and rows.loss_mask.dtype == bool


def test_group_relative_advantages(valid_rollout_path):
    # g0 rewards (1, 0): mean 0.5 -> A = +0.5, -0.5; g1 rewards (2, 4): mean 3 -> A = -1, +1.
    # Broadcast over response lengths 3, 1, 2, 2.
    rows = load_rows(valid_rollout_path)
    assert rows.advantages.tolist() == [0.5, 0.5, 0.5, -0.5, -1.0, -1.0, 1.0, 1.0]
    # std: population std of g0 = 0.5, of g1 = 1 -> A / (std + 1e-6)
    rows = load_rows(valid_rollout_path, adv_norm="std")
    a0, a1 = 0.5 / (0.5 + 1e-6), 1.0 / (1.0 + 1e-6)
    expected = np.array([a0, a0, a0, -a0, -a1, -a1, a1, a1], dtype=np.float32)
    np.testing.assert_array_equal(rows.advantages, expected)


def test_equal_rewards_give_zero_advantage(tmp_path):
    path = write_rollout_table(valid_rollout_table(reward=([2.0, 2.0, 1.0, 1.0], pa.float32())), tmp_path / "r.arrow")
    for norm in ("none", "std"):
        assert not load_rows(path, adv_norm=norm).advantages.any()


def test_per_token_then_per_sequence_advantages_take_precedence(tmp_path):
    adv = [[1.0, 2.0, 3.0], [4.0], [5.0, 6.0], [7.0, 8.0]]
    path = write_rollout_table(valid_rollout_table(advantages=(adv, F32), advantage=([9, 9, 9, 9], pa.float32())),
                               tmp_path / "a.arrow")
    assert load_rows(path).advantages.tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    path = write_rollout_table(valid_rollout_table(advantage=([0.5, -1.0, 2.0, 0.0], pa.float64())),
                               tmp_path / "b.arrow")
    assert load_rows(path).advantages.tolist() == [0.5, 0.5, 0.5, -1.0, 2.0, 2.0, 0.0, 0.0]


def test_groups_span_files_and_mix_with_other_sources(tmp_path):
    # File a: per-sequence advantages. File b: rewards (5, 1) in group "g0" -> mean 3 -> +2, -2.
    a = write_rollout_table(valid_rollout_table(advantage=([1.0, 1.0, 1.0, 1.0], pa.float32())), tmp_path / "a.arrow")
    b_table = valid_rollout_table(reward=([5.0, 1.0, 0.0, 0.0], pa.float32()),
                                  sample_id=(["b0", "b1", "b2", "b3"], pa.string()))
    b = write_rollout_table(b_table, tmp_path / "b.arrow", fmt="stream")
    rows = load_rows([a, b])
    # file a's rewards do not join the groups: it has per-sequence advantages
    assert rows.advantages.tolist() == [1.0] * 8 + [2.0, 2.0, 2.0, -2.0, 0.0, 0.0, 0.0, 0.0]
    assert rows.source_file == [str(a)] * 4 + [str(b)] * 4
    assert rows.source_row.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


def test_temperature_precedence(tmp_path):
    table = valid_rollout_table()
    meta = write_rollout_table(table, tmp_path / "meta.arrow", metadata={"drpo.temperature": "0.7"})
    plain = write_rollout_table(table.drop_columns("sample_id"), tmp_path / "plain.arrow")
    column = write_rollout_table(valid_rollout_table(sample_id=(["c0", "c1", "c2", "c3"], pa.string()),
                                                     temperature=([0.5, 0.6, 0.8, 0.9], pa.float64())),
                                 tmp_path / "column.arrow", metadata={"drpo.temperature": "0.7"})
    rows = load_rows([meta, plain, column], temperature=1.3)
    expected = [0.7] * 4 + [1.3] * 4 + [0.5, 0.6, 0.8, 0.9]  # metadata, argument, column
    np.testing.assert_array_equal(rows.temperature, np.array(expected, dtype=np.float32))
    np.testing.assert_array_equal(load_rows(plain).temperature, np.ones(4, dtype=np.float32))


def test_defaults_for_sample_id_and_policy_version(tmp_path):
    table = valid_rollout_table(sample_id=None, policy_version=None)
    a = write_rollout_table(table, tmp_path / "a.arrow")
    b = write_rollout_table(table, tmp_path / "b.parquet", fmt="parquet")
    rows = load_rows([a, b])
    assert rows.sample_ids == [str(i) for i in range(8)]  # row numbers across files, in order
    assert rows.policy_version.tolist() == [-1] * 8


def test_proximal_logprobs_loaded_and_required_in_all_files(tmp_path):
    prox = [[-0.25, -0.5, -1.0], [-2.0], [-0.125, -0.75], [-3.0, -0.5]]
    a = write_rollout_table(valid_rollout_table(proximal_logprobs=(prox, F32)), tmp_path / "a.arrow")
    assert load_rows(a).proximal_logprobs.tolist() == [x for r in prox for x in r]
    b = write_rollout_table(valid_rollout_table(sample_id=(["b0", "b1", "b2", "b3"], pa.string())),
                            tmp_path / "b.arrow")
    with pytest.raises(InputError, match="proximal_logprobs"):
        load_rows([a, b])


def test_invalid_input_raises_with_every_problem(tmp_path):
    table = valid_rollout_table(group_id=None, response_ids=([[5, 6, 7], [8], [-9, 10], [11, 12]],
                                                             pa.list_(pa.int64())))
    path = write_rollout_table(table, tmp_path / "bad.arrow")
    with pytest.raises(InputError) as err:
        load_rows(path)
    assert "2 problems" in err.value.message
    lines = [err.value.message, *err.value.details]
    assert any("column 'group_id'" in line for line in lines)
    assert any("column 'response_ids', row 2" in line for line in lines)


def test_bad_options_raise_config_error(valid_rollout_path):
    with pytest.raises(ConfigError, match="adv-norm"):
        load_rows(valid_rollout_path, adv_norm="rank")
    with pytest.raises(ConfigError, match="temperature"):
        load_rows(valid_rollout_path, temperature=0.0)


def test_select_after_load_matches_rows(valid_rollout_path):
    rows = load_rows(valid_rollout_path)
    sub = rows.select(np.array([2, 0]))
    assert sub.sample_ids == ["s2", "s0"]
    assert sub.response_ids.tolist() == [9, 10, 5, 6, 7]
    assert sub.advantages.tolist() == [-1.0, -1.0, 0.5, 0.5, 0.5]


def test_group_advantage_table_matches_naive_reference(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "BATCH_ROWS", 3)  # groups straddle batches and files
    rng = np.random.default_rng(0)
    paths, rewards, groups = [], [], []
    for f in range(3):
        n = 7
        r = rng.integers(0, 4, n).astype(np.float32)
        g = rng.integers(0, 4, n)
        table = pa.table({"reward": r, "group_id": g, "response_ids": pa.array([[1]] * n, pa.list_(pa.int64()))})
        paths.append(write_rollout_table(table, tmp_path / f"{f}.arrow", fmt="stream"))
        rewards.extend(r.tolist())
        groups.extend(str(x) for x in g)
    got = group_advantage_table(paths).to_pylist()
    assert sorted(row["group_id"] for row in got) == sorted(set(groups))
    for row in got:
        r = np.array([x for x, g in zip(rewards, groups) if g == row["group_id"]], dtype=np.float64)
        assert row["count"] == len(r)
        assert row["reward_mean"] == pytest.approx(r.mean(), abs=1e-12)
        assert row["reward_std"] == pytest.approx(r.std(), abs=1e-7)  # population std (ddof 0)
