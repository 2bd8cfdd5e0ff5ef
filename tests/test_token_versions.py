"""Per-token policy versions (schema v1 `token_policy_versions`): hand-computed lag histograms, masked
tokens and dropped rows in the data-only audit and in train's loader; model-mode inspect and train with
`--max-lag` equal the same runs on a file whose too-stale tokens have loss_mask 0 (SPEC.md §1, §2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import TOY, assert_trained_alike, require_toy, write_rollout_table
from test_inspect_model import naive, table  # noqa: F401 - the toy's naive recompute
from typer.testing import CliRunner

from drpo_cli.audit.inspect_data import run_inspect
from drpo_cli.base.errors import InputError
from drpo_cli.cli import app
from drpo_cli.config import InspectConfig
from drpo_cli.rollouts.rows import load_rows, staleness_filter, version_range

I64, F32, BOOL = pa.list_(pa.int64()), pa.list_(pa.float32()), pa.list_(pa.bool_())

# Five rows of one file. Trained tokens (loss_mask 1) and their versions:
#   r0: 5 5 6 7    r1: 3 3 (its third token, version 4, is untrained)    r2: 7 7
#   r3: 6 6 (its first token is untrained, version -1: ignored)          r4: 2 3
VERSIONS = [[5, 5, 6, 7], [3, 3, 4], [7, 7], [-1, 6, 6], [2, 3]]
MASKS = [[1, 1, 1, 1], [1, 1, 0], [1, 1], [0, 1, 1], [1, 1]]


def per_token_table() -> pa.Table:
    lengths = [len(v) for v in VERSIONS]
    return pa.table({
        "prompt_ids": pa.array([[1, 2]] * 5, I64),
        "response_ids": pa.array([[3 + t for t in range(k)] for k in lengths], I64),
        "behavior_logprobs": pa.array([[-0.5] * k for k in lengths], F32),
        "loss_mask": pa.array([[bool(x) for x in m] for m in MASKS], BOOL),
        "advantage": pa.array([1.0, -1.0, 0.5, 2.0, -0.5], pa.float32()),
        "sample_id": pa.array([f"r{i}" for i in range(5)]),
        "policy_version": pa.array([5, 3, 7, 6, 2], pa.int64()),  # not checked against the tokens' versions
        "token_policy_versions": pa.array(VERSIONS, I64),
    })


def row_level_table() -> pa.Table:
    """Two rows without token_policy_versions (versions 7 and 4): today's row-level behaviour."""
    return pa.table({
        "prompt_ids": pa.array([[1], [1]], I64),
        "response_ids": pa.array([[3, 4], [5]], I64),
        "behavior_logprobs": pa.array([[-0.5, -0.5], [-0.5]], F32),
        "advantage": pa.array([1.0, 1.0], pa.float32()),
        "sample_id": pa.array(["p0", "p1"]),
        "policy_version": pa.array([7, 4], pa.int64()),
    })


@pytest.fixture
def files(tmp_path) -> list[str]:
    return [str(write_rollout_table(per_token_table(), tmp_path / "a.arrow")),
            str(write_rollout_table(row_level_table(), tmp_path / "b.arrow"))]


def audit(paths, **kw) -> dict:
    return run_inspect(InspectConfig(rollouts=tuple(map(str, paths)), **kw).check())


def hist(report: dict) -> list[tuple[int, int, int]]:
    return [(h["lag"], h["rows"], h["tokens"]) for h in report["data"]["lag"]["histogram"]]


def test_version_range_is_the_oldest_and_newest_trained_token():
    tv = np.array([5, 5, 6, 7, 3, 3, 4, 9, 9])
    trained = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0], dtype=bool)
    offsets = np.array([0, 4, 7, 7, 9])  # row 2 is empty, row 3 has no trained token
    oldest, newest = version_range(tv, trained, offsets, np.array([1, 2, -1, 8]))
    assert oldest.tolist() == [5, 3, -1, 8] and newest.tolist() == [7, 3, -1, 8]


def test_data_only_lag_histogram_is_per_token(files):
    # Current version: the newest trained token, 7. Tokens count at their own lag; rows at their
    # oldest trained token's. Per-token file: lags 2 2 1 0 | 4 4 | 0 0 | 1 1 | 5 4; row file: 0 0 | 3.
    report = audit(files)
    assert report["data"]["lag"]["current_version"] == 7
    assert hist(report) == [(0, 2, 5), (1, 1, 3), (2, 1, 2), (3, 1, 1), (4, 1, 3), (5, 1, 1)]
    m = report["metrics"]
    assert m["data/tokens"] == 15 and m["data/stale_frac"] == pytest.approx(10 / 15) and m["data/lag_max"] == 5
    assert report["data"]["staleness_filter"]["tokens_masked"] == 0


@pytest.mark.parametrize("flags, counts, kept_hist", [
    # lag > 1 (version < 6): r0 loses its two version-5 tokens; r1 (3 3) and r4 (2 3) have none left
    # and drop, with their 2 + 2 trained tokens; the row-level row of version 4 drops with its token.
    ({"max_lag": 1}, (3, 5, 2, 4), [(0, 2, 5), (1, 2, 3)]),
    # version < 6 again, through --min-version (and a --max-lag that alone leaves out nothing).
    ({"min_version": 6, "max_lag": 9}, (3, 5, 2, 4), [(0, 2, 5), (1, 2, 3)]),
    # lag > 4 (version < 3): only r4's version-2 token goes; r4 stays with its version-3 token.
    ({"max_lag": 4}, (0, 0, 1, 7), [(0, 2, 5), (1, 1, 3), (2, 1, 2), (3, 1, 1), (4, 2, 3)]),
])
def test_stale_filters_mask_tokens_and_drop_rows_left_without_any(files, flags, counts, kept_hist):
    report = audit(files, **flags)
    f = report["data"]["staleness_filter"]
    assert (f["rows_dropped"], f["tokens_dropped"], f["tokens_masked"], f["rows_kept"]) == counts
    assert f["current_version"] == 7 and f["rows_without_version"] == 0
    assert hist(report) == kept_hist
    assert report["data"]["rows"] == counts[3]
    assert report["data"]["masked_tokens"] == 15 - counts[1] - counts[2]

    # Train's loader: the same rows and counts, the too-stale tokens out of loss_mask.
    rows, staleness = staleness_filter(load_rows(files), 7, max_lag=flags.get("max_lag"),
                                       min_version=flags.get("min_version"))
    assert staleness == f
    threshold = max(7 - flags["max_lag"], flags.get("min_version") or 0)
    want = {}
    for i, (v, m) in enumerate(zip(VERSIONS + [[7, 7], [4]], MASKS + [[1, 1], [1]])):
        kept = [int(bool(x) and not (0 <= y < threshold)) for x, y in zip(m, v)]
        if any(kept) or not any(m):
            want[(["r0", "r1", "r2", "r3", "r4", "p0", "p1"])[i]] = kept
    assert rows.sample_ids == list(want)
    got = [rows.loss_mask[rows.response_offsets[i]:rows.response_offsets[i + 1]].astype(int).tolist()
           for i in range(rows.num_rows)]
    assert got == list(want.values())


def test_rows_without_a_trained_token_keep_the_row_level_rule(tmp_path):
    # r1 trains nothing: its row version (policy_version 3) decides, as for a file without the column.
    masks = [[1, 1, 1, 1], [0, 0, 0], [1, 1], [0, 1, 1], [1, 1]]
    rollouts = per_token_table().set_column(3, "loss_mask", pa.array([[bool(x) for x in m] for m in masks], BOOL))
    path = write_rollout_table(rollouts, tmp_path / "a.arrow")
    f = audit([path], max_lag=3)["data"]["staleness_filter"]  # version < 4: r1 (version 3) and r4 (2 3) drop
    assert (f["rows_dropped"], f["tokens_dropped"], f["tokens_masked"], f["rows_kept"]) == (2, 2, 0, 3)


def test_bad_token_versions_are_one_line_errors(tmp_path):
    versions = [list(v) for v in VERSIONS]
    versions[2][1] = -3
    path = write_rollout_table(per_token_table().set_column(7, "token_policy_versions", pa.array(versions, I64)),
                               tmp_path / "bad.arrow")
    result = CliRunner().invoke(app, ["inspect", str(path), "-q"])
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: {path}, column 'token_policy_versions', row 2 (sample_id 'r2'): expected policy versions >= 0 "
        "where loss_mask is 1 (token 1), found -3")
    with pytest.raises(InputError, match=r"row 2 \(sample_id 'r2'\): expected policy versions >= 0 where loss_mask "
                                         r"is 1, found -3 at token 1"):
        load_rows([str(path)])  # what train reads through


def test_tokens_newer_than_the_current_version_show_a_negative_lag_and_a_note(files):
    report = audit(files, current_version=6)
    assert (-1, 2, 5) in hist(report)  # rows r2, p0; tokens: r2's two tokens, r0's and the row-level row's: version 7
    assert any("negative lag" in n for n in report["notes"])
    assert json.loads(json.dumps(report)) == report


# ---- with a model: the bundled example (examples/toy, checkpoint version 8) ------------------------

CURRENT = 8
RUN_DETAILS = {"seconds", "micro_batches", "padding_frac", "device", "rollouts"}


def toy_versions(rollouts: pa.Table) -> list[list[int]]:
    """Each row's first half of tokens sampled by its policy_version v, the rest by v + 1 (at most 8)."""
    out = []
    for v, ids in zip(rollouts.column("policy_version").to_pylist(), rollouts.column("response_ids").to_pylist()):
        half = len(ids) // 2
        out.append([min(v + (t >= half), CURRENT) for t in range(len(ids))])
    return out


def toy_table(rows: int | None = None) -> pa.Table:
    """The example's rows with token_policy_versions and its group-relative advantages as a per-row
    `advantage` (so that leaving rows out of a file changes no other row's advantage)."""
    rollouts = pa.ipc.open_file(str(TOY / "rollouts.arrow")).read_all()
    rollouts = rollouts if rows is None else rollouts.slice(0, rows)
    reward = np.array(rollouts.column("reward").to_pylist(), dtype=np.float64)
    group = np.array(rollouts.column("group_id").to_pylist())
    advantage = reward - np.array([reward[group == g].mean() for g in group])
    rollouts = rollouts.drop_columns(["reward", "group_id"]).append_column("advantage",
                                                                           pa.array(advantage, pa.float32()))
    return rollouts.append_column("token_policy_versions", pa.array(toy_versions(rollouts), I64))


def stale_masked_table(rollouts: pa.Table, threshold: int) -> pa.Table:
    """`rollouts` with loss_mask 0 on tokens of a version below `threshold`, rows left with none removed."""
    versions = rollouts.column("token_policy_versions").to_pylist()
    masks = [[v >= threshold for v in row] for row in versions]
    keep = [i for i, m in enumerate(masks) if any(m)]
    return rollouts.append_column("loss_mask", pa.array(masks, BOOL)).take(pa.array(keep))


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory) -> dict[str, Path]:
    require_toy()
    d = tmp_path_factory.mktemp("versions")
    rollouts = toy_table()
    # --max-lag 3 at version 8 leaves out versions below 5.
    return {"versions": write_rollout_table(rollouts, d / "versions.arrow"),
            "masked": write_rollout_table(stale_masked_table(rollouts, 5), d / "masked.arrow")}


def strip(x, skip=RUN_DETAILS):
    if isinstance(x, dict):
        return {k: strip(v, skip) for k, v in x.items() if k not in skip}
    if isinstance(x, list):
        return [strip(v, skip) for v in x]
    return x


def test_model_inspect_lags_are_per_token(toy_files, tmp_path, table, naive):  # noqa: F811
    from drpo_cli.audit.inspect_data import inspect_and_write

    cfg = InspectConfig(rollouts=(str(toy_files["versions"]),), model=str(TOY / "model"), device="cpu", quiet=True,
                        micro_batch_tokens=64, per_token=str(tmp_path / "t.arrow")).check()
    report = inspect_and_write(cfg)
    version = np.concatenate([np.array(v) for v in toy_versions(table)])  # (T,) in table order
    lag = CURRENT - version
    tokens = pa.ipc.open_file(str(tmp_path / "t.arrow")).read_all()
    order = np.lexsort((tokens.column("position").to_numpy(), tokens.column("sample_id").to_numpy(zero_copy_only=False)))
    t = tokens.take(pa.array(order))
    ref = np.lexsort((np.arange(len(naive["row"])) - np.searchsorted(naive["row"], naive["row"]), naive["sample_id"]))
    np.testing.assert_array_equal(t.column("lag").to_numpy(), lag[ref])
    np.testing.assert_array_equal(t.column("policy_version").to_numpy(), version[ref])
    # Breakdown by lag, per token: the token counts and harmful shares of the hand lags.
    delta = np.exp(naive["logp"]) - np.exp(naive["mu"])
    harmful = ((naive["adv"] > 0) & (delta > 0.2)) | ((naive["adv"] < 0) & (delta < -0.2))
    by_lag = {b["key"]: b for b in report["model"]["by_lag"]}
    keys = {x: str(x) if x < 8 else "8+" for x in np.unique(lag).tolist()}  # "8+" holds lag 8 alone here
    assert sorted(by_lag) == sorted(keys.values())
    for x in np.unique(lag):
        b = by_lag[keys[x]]
        assert b["tokens"] == (lag == x).sum()
        assert b["harmful_frac"] == pytest.approx(harmful[lag == x].mean(), abs=1e-9)
    # The data-only histogram counts the same tokens at the same lags.
    assert {h["lag"]: h["tokens"] for h in report["data"]["lag"]["histogram"]} == \
        {int(x): int((lag == x).sum()) for x in np.unique(lag)}


def test_model_inspect_with_max_lag_equals_the_file_with_those_tokens_masked(toy_files, tmp_path, table):  # noqa: F811
    from drpo_cli.audit.inspect_data import inspect_and_write

    def run(name: str, **kw) -> tuple[dict, pa.Table]:
        cfg = InspectConfig(rollouts=(str(toy_files[name]),), model=str(TOY / "model"), device="cpu", quiet=True,
                            micro_batch_tokens=64, top=4, per_token=str(tmp_path / f"{name}.arrow"), **kw).check()
        report = inspect_and_write(cfg)
        order = [("sample_id", "ascending"), ("position", "ascending")]
        return report, pa.ipc.open_file(str(tmp_path / f"{name}.arrow")).read_all().sort_by(order)

    filtered, t1 = run("versions", max_lag=3)
    masked, t2 = run("masked")
    # Hand counts: version-0 rows (versions 0 and 1) drop with every token; version-4 rows lose their
    # version-4 half; every other token stays.
    pv = np.array(table.column("policy_version").to_pylist())
    lengths = np.array([len(x) for x in table.column("response_ids").to_pylist()])
    f = filtered["data"]["staleness_filter"]
    assert f == {"max_lag": 3, "min_version": None, "current_version": CURRENT, "rows_dropped": int((pv == 0).sum()),
                 "tokens_dropped": int(lengths[pv == 0].sum()), "tokens_masked": int((lengths[pv == 4] // 2).sum()),
                 "rows_kept": int((pv != 0).sum()), "rows_without_version": 0}
    assert f["tokens_masked"] > 0
    assert filtered["model"]["tokens"] == lengths.sum() - f["tokens_dropped"] - f["tokens_masked"]
    # The same rows in the same order with the same loss masks (the filter drops exactly the rows the masked
    # file leaves out): the same micro-batches, the same arithmetic, so equal bit for bit.
    assert strip(filtered["model"]) == strip(masked["model"])
    assert filtered["metrics"] == masked["metrics"]
    assert strip(filtered["data"], {"staleness_filter"}) == strip(masked["data"], {"staleness_filter"})
    assert t1.equals(t2)  # per-token output: the masked tokens with loss_mask false


def test_train_with_max_lag_equals_the_file_with_those_tokens_masked(toy_files, tmp_path):
    from safetensors.torch import load_file

    args = ["-m", str(TOY / "model"), "--quiet", "--lr", "1e-3", "--micro-batch-tokens", "512", "--minibatches", "2"]
    for name, extra in (("versions", ["--max-lag", "3"]), ("masked", [])):
        result = CliRunner().invoke(app, ["train", "-r", str(toy_files[name]), "--out", str(tmp_path / name), *args,
                                          *extra])
        assert result.exit_code == 0, result.output
    r1, r2 = (json.loads((tmp_path / n / "drpo_report.json").read_text()) for n in ("versions", "masked"))
    assert r1["filters"]["staleness"]["tokens_masked"] > 0
    # The same rows, order and loss masks: the same mini-batches and micro-batches, so bit for bit.
    assert [s["tokens"] for s in r1["steps"]] == [s["tokens"] for s in r2["steps"]]
    assert [(s["loss"], s["grad_norm"]) for s in r1["steps"]] == [(s["loss"], s["grad_norm"]) for s in r2["steps"]]
    assert strip(r1["steps"]) == strip(r2["steps"]) and strip(r1["final"]) == strip(r2["final"])
    assert r1["input"]["trained_tokens"] == r2["input"]["trained_tokens"]
    w1, w2 = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("versions", "masked"))
    assert all(np.array_equal(w1[k].numpy(), w2[k].numpy()) for k in w1)


# ---- shares under torchrun ----------------------------------------------------------------------------


def test_sharded_load_and_filter_equal_one_process(tmp_path):
    from test_shards import Group

    from drpo_cli.rollouts.files import Shard, open_rollouts

    rollouts = toy_table(rows=40)
    path = write_rollout_table(rollouts, tmp_path / "r.arrow", max_chunksize=16)
    whole, counts = staleness_filter(load_rows([str(path)]), CURRENT, max_lag=3, min_version=None)
    assert counts["tokens_masked"] > 0 and counts["rows_dropped"] > 0
    source = open_rollouts(path)
    for world in (2, 3):
        shares = Group(world).run(lambda rank, xch, w=world: staleness_filter(
            load_rows(source, shard=Shard.of(rank, w, 40), exchange=xch), CURRENT, max_lag=3, min_version=None,
            exchange=xch))
        assert all(c == counts for _, c in shares)  # global counts on every rank
        by_row = {g: (s, j) for s, _ in shares for j, g in enumerate(s.global_row)}
        assert sorted(by_row) == whole.global_row.tolist()
        for i, g in enumerate(whole.global_row):
            s, j = by_row[g]
            assert (s.loss_mask[s.response_offsets[j]:s.response_offsets[j + 1]]
                    == whole.loss_mask[whole.response_offsets[i]:whole.response_offsets[i + 1]]).all()


@pytest.mark.multiproc
def test_two_ranks_train_and_inspect_with_token_versions_like_one(tmp_path):
    from ranks import assert_same_json, ranks_like_one, without_per_batch_whatifs
    from safetensors.torch import load_file
    from test_distributed import INSPECT_ARGS, TRAIN_ARGS

    require_toy()
    path = write_rollout_table(toy_table(rows=64), tmp_path / "r.arrow")
    common = ["-r", str(path), "-m", str(TOY / "model"), *TRAIN_ARGS, "--max-lag", "3"]
    ranks_like_one(tmp_path, "train", *common)
    one, two = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("one", "ranks"))
    assert_trained_alike(one, two, lr=1e-3, steps=2)  # TRAIN_ARGS: --lr 1e-3, --minibatches 2
    r1, r2 = (json.loads((tmp_path / n / "drpo_report.json").read_text()) for n in ("one", "ranks"))
    assert r1["filters"]["staleness"]["tokens_masked"] > 0 and r1["filters"]["staleness"]["rows_dropped"] > 0
    for section in ("steps", "final", "input", "filters"):
        assert_same_json(r1[section], r2[section], section)

    inspect = [str(path), "--model", str(TOY / "model"), *INSPECT_ARGS, "--max-lag", "3"]
    ranks_like_one(tmp_path, "inspect", *inspect, per_token=True)
    j1, j2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "ranks"))
    assert j1["data"]["staleness_filter"]["tokens_masked"] > 0
    assert_same_json(without_per_batch_whatifs(j1), without_per_batch_whatifs(j2))  # two ranks audit other batches
    order = [("sample_id", "ascending"), ("position", "ascending")]
    t1, t2 = (pa.ipc.open_file(str(tmp_path / f"{n}.arrow")).read_all().sort_by(order) for n in ("one", "ranks"))
    assert t1.column("lag").equals(t2.column("lag")) and t1.column("loss_mask").equals(t2.column("loss_mask"))
