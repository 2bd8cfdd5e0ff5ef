"""Each rank reads only its share of the rows (files.Shard), with the merges of one process; model-mode
inspect streams record batches with the results of holding every row.

Ranks are simulated in one process by threads whose `exchange` is an all-gather through a barrier
(what distributed.exchange does across processes), so the exact merges are checked without
torchrun; tests/test_distributed.py runs the same paths under torchrun.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pyarrow as pa
import pytest
from conftest import assert_reordered, assert_trained_alike, write_rollout_table
from ranks import assert_same_json, one_process, ranks_like_one, torchrun, without_per_batch_whatifs
from test_distributed import INSPECT_ARGS, toy  # noqa: F401 - toy: the fixture, the example's first rows

from drpo_cli.rollouts import files
from drpo_cli.rollouts.files import Shard, open_rollouts
from drpo_cli.rollouts.rows import load_rows
from drpo_cli.rollouts.validate import validate_rollouts


class Group:
    """`world` threads, each a rank; exchange(rank)(obj) returns every rank's obj in rank order."""

    def __init__(self, world: int):
        self.world, self.slots, self.barrier = world, [None] * world, threading.Barrier(world)

    def exchange(self, rank: int):
        def gather(obj):
            self.slots[rank] = obj
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()  # every rank has read before the next call overwrites
            return out
        return gather

    def run(self, fn) -> list:
        """fn(rank, exchange) on every rank at once; the results (or raised errors) in rank order."""
        results: list = [None] * self.world

        def one(rank):
            try:
                results[rank] = fn(rank, self.exchange(rank))
            except Exception as err:  # noqa: BLE001 - handed back to the test
                results[rank] = err
                self.barrier.abort()

        threads = [threading.Thread(target=one, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return results


def rows_of(n: int, start: int = 0, *, groups: int = 4, bad: dict | None = None, dup: dict | None = None) -> dict:
    rng = np.random.default_rng(start)
    lengths = rng.integers(1, 6, n)
    cols = {
        "prompt_ids": [[1, 2 + i % 3] for i in range(n)],
        "response_ids": [list(rng.integers(0, 30, k)) for k in lengths],
        "behavior_logprobs": [list(-rng.exponential(1.0, k)) for k in lengths],
        "reward": list(rng.integers(0, 3, n).astype(float)),
        "group_id": [f"g{(start + i) % groups}" for i in range(n)],  # groups span batches, files and ranks
        "sample_id": [f"s{start + i}" for i in range(n)],
        "policy_version": [int(v) for v in rng.integers(0, 3, n)],
    }
    for i, value in (bad or {}).items():
        cols["behavior_logprobs"][i] = [value] * int(lengths[i])
    for i, sid in (dup or {}).items():
        cols["sample_id"][i] = sid
    return cols


@pytest.fixture
def two_files(tmp_path):
    """Two files; the first holds three record batches (10, 7, 5 rows)."""
    path_a = tmp_path / "a.arrow"
    table = pa.table(rows_of(22))
    with pa.OSFile(str(path_a), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        for lo, hi in ((0, 10), (10, 17), (17, 22)):
            w.write_table(table.slice(lo, hi - lo))
    path_b = write_rollout_table(pa.table(rows_of(9, 22)), tmp_path / "b.arrow")
    return [str(path_a), str(path_b)]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_partition_the_rows_into_balanced_disjoint_shares(two_files, world):
    source = open_rollouts(two_files)
    total = source.count_rows()
    assert total == 31
    shares = []
    for rank in range(world):
        shard = Shard.of(rank, world, total)
        shares.append([sb.global_offset + i for sb in source.iter_batches(["sample_id"], shard=shard)
                       for i in range(sb.batch.num_rows)])
    every = sorted(r for share in shares for r in share)
    assert every == list(range(total))  # each row on exactly one rank
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 2 * Shard.of(0, world, total).piece_rows  # nearly equal shares
    ids = [sid for sb in source.iter_batches(["sample_id"]) for sid in sb.batch.column("sample_id").to_pylist()]
    for rank, share in enumerate(shares):  # the global offsets name the right rows
        got = [sid for sb in source.iter_batches(["sample_id"], shard=Shard.of(rank, world, total))
               for sid in sb.batch.column("sample_id").to_pylist()]
        assert got == [ids[r] for r in share]


def test_sharded_validation_finds_what_one_process_finds(tmp_path):
    # Bad log-probs in rows 3 and 27, a duplicate id across what become different ranks' pieces.
    path = write_rollout_table(pa.table(rows_of(31, bad={3: 0.5, 27: float("nan")}, dup={29: "s2"})), tmp_path / "r.arrow")
    source = open_rollouts(path)
    one = validate_rollouts(source, limit=50)
    assert one.total == 3 and one.counts["duplicate-sample-id"] == 1
    for world in (2, 3):
        results = Group(world).run(lambda rank, xch, w=world: validate_rollouts(
            source, limit=50, shard=Shard.of(rank, w, 31), exchange=xch))
        for problems in results:
            assert [str(p) for p in problems] == [str(p) for p in one]
            assert (problems.total, dict(problems.counts), problems.rows) == (one.total, dict(one.counts), one.rows)


@pytest.mark.parametrize("adv_norm", ["none", "std"])
def test_sharded_load_holds_a_share_with_global_group_advantages(two_files, adv_norm):
    whole = load_rows(two_files, adv_norm=adv_norm)
    world = 3
    source = open_rollouts(two_files)
    shares = Group(world).run(lambda rank, xch: load_rows(source, adv_norm=adv_norm, exchange=xch,
                                                          shard=Shard.of(rank, world, 31)))
    assert all(0 < s.num_rows < whole.num_rows for s in shares)  # each rank holds only a part
    order = np.argsort(np.concatenate([s.global_row for s in shares]))
    joined = {name: np.concatenate([getattr(s, name) for s in shares]) for name in ("global_row", "policy_version")}
    assert (joined["global_row"][order] == np.arange(whole.num_rows)).all()
    assert (joined["policy_version"][order] == whole.policy_version).all()
    for s in shares:  # every token of a share equals the one-process row's, advantages included
        for j, g in enumerate(s.global_row):
            lo, hi = s.response_offsets[j], s.response_offsets[j + 1]
            wlo, whi = whole.response_offsets[g], whole.response_offsets[g + 1]
            assert s.sample_ids[j] == whole.sample_ids[g]
            assert (s.response_ids[lo:hi] == whole.response_ids[wlo:whi]).all()
            # group sums in float64 in another order, then one rounding to float32: within one ε32 (and the
            # float64 rounding, far below it) of the advantages' scale
            assert_reordered(s.advantages[lo:hi], whole.advantages[wlo:whi], 2,
                             scale=np.abs(whole.advantages).max(), msg=s.sample_ids[j])
    assert np.abs(whole.advantages).sum() > 0


def test_streamed_model_inspect_equals_holding_every_row(toy, tmp_path, monkeypatch):  # noqa: F811
    common = [str(toy / "rollouts.arrow"), "--model", str(toy / "model"), *INSPECT_ARGS]
    one_process("inspect", *common, "--json", str(tmp_path / "whole.json"))
    monkeypatch.setattr(files, "BATCH_ROWS", 5)  # 13 streamed batches instead of one
    one_process("inspect", *common, "--json", str(tmp_path / "streamed.json"))
    whole, streamed = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("whole", "streamed"))
    assert whole["model"]["tokens"] == streamed["model"]["tokens"] > 0
    assert whole["model"]["logging_checks"]["fit_tokens"] == streamed["model"]["logging_checks"]["fit_tokens"] > 0
    assert len(whole["model"]["worst_sequences"]) > 0
    assert_same_json(without_per_batch_whatifs(whole), without_per_batch_whatifs(streamed))


@pytest.mark.multiproc
def test_two_ranks_data_only_inspect_like_one_with_groups_and_duplicates_across_ranks(tmp_path):
    path = write_rollout_table(pa.table(rows_of(40, dup={33: "s1", 35: "s1", 38: "s4"})), tmp_path / "r.arrow")
    common = [str(path), "--quiet"]
    ranks_like_one(tmp_path, "inspect", *common)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "ranks"))
    assert one["data"]["duplicate_sample_ids"] == {"rows": 3, "ids": 2, "examples": ["s1", "s4"]}
    assert one["data"]["advantage"]["stats"]["abs_mean"] > 0
    assert_same_json(one, two)


@pytest.mark.multiproc
def test_a_bad_row_in_one_ranks_share_stops_every_rank_with_its_line(tmp_path):
    path = write_rollout_table(pa.table(rows_of(40, bad={37: 0.25})), tmp_path / "r.arrow")
    run = torchrun("inspect", str(path), "--quiet", "--json", str(tmp_path / "out.json"))
    assert run.returncode != 0
    errors = sorted(line for line in run.stderr.splitlines() if line.startswith("error: "))
    expected = f"{path}, column 'behavior_logprobs', row 37 (sample_id 's37'): expected finite log-probs <= 0"
    assert len(errors) == 2 and all(expected in e for e in errors), run.stderr[-3000:]
    assert {e.split("] ", 1)[1] for e in errors} == {errors[0].split("] ", 1)[1]}  # the same line on both ranks
    assert not (tmp_path / "out.json").exists()


@pytest.mark.multiproc
def test_fewer_rows_than_ranks_a_rank_holding_nothing_trains_and_inspects_like_one_process(toy, tmp_path):  # noqa: F811
    # One row, two ranks: rank 1's share is empty. It still runs every FSDP pass (fillers), counted
    # before any pass so both ranks meet each collective in the same order.
    from safetensors.torch import load_file

    table = pa.ipc.open_file(str(toy / "rollouts.arrow")).read_all().slice(0, 1)
    path = write_rollout_table(table, tmp_path / "one.arrow")
    common = ["-r", str(path), "-m", str(toy / "model"), "--quiet", "--device", "cpu", "--lr", "1e-3"]
    ranks_like_one(tmp_path, "train", *common)
    one, two = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("one", "ranks"))
    assert one.keys() == two.keys()
    assert_trained_alike(one, two, lr=1e-3, steps=1)
    reports = [json.loads((tmp_path / n / "drpo_report.json").read_text()) for n in ("one", "ranks")]
    assert reports[0]["input"]["rows"] == reports[1]["input"]["rows"] == 1
    assert_same_json(reports[0]["final"], reports[1]["final"])

    inspect = [str(path), "--model", str(toy / "model"), *INSPECT_ARGS]
    ranks_like_one(tmp_path, "inspect", *inspect)
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "ranks"))
    assert a["model"]["tokens"] == b["model"]["tokens"] > 0
    assert_same_json(a, b)
