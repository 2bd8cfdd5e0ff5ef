"""`drpo inspect` without a model: the streaming data audit, the report schema, gates, the CLI, bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import valid_rollout_table, write_rollout_table
from typer.testing import CliRunner

from drpo_cli.audit.inspect_data import run_inspect
from drpo_cli.base.errors import ConfigError, InputError
from drpo_cli.cli import app
from drpo_cli.config import InspectConfig
from drpo_cli.objectives.metrics import INSPECT_DATA_METRICS, resolve_metric
from drpo_cli.reports.report_format import INSPECT_REPORT_SCHEMA, validate_report

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def audit(path, **kw) -> dict:
    return run_inspect(InspectConfig(rollouts=(str(path),), **kw).check())


def test_schema_file_equals_the_schema_in_code():
    assert json.loads((ROOT / "schemas/inspect-report.schema.json").read_text(encoding="utf-8")) == INSPECT_REPORT_SCHEMA


def test_data_audit_hand_computed(valid_rollout_path):
    r = audit(valid_rollout_path)
    m = r["metrics"]
    # conftest table: 4 rows, responses of 3, 1, 2, 2 tokens; row 0's last token has loss_mask 0 -> 7 tokens.
    assert m["data/rows"] == 4 and m["data/response_tokens"] == 8 and m["data/tokens"] == 7
    assert r["data"]["prompt_tokens"] == 2 + 2 + 1 + 1
    # −log μ over masked tokens: 0.5 + 1 + 2 + 0.125 + 0.75 + 3 + 0.5 = 7.875 -> /7 = 1.125; none has μ ≤ 0.01.
    assert m["data/neg_logmu_mean"] == pytest.approx(1.125)
    assert m["data/rare_token_frac"] == 0.0
    # Group advantages: g0 rewards (1, 0) -> A = ±0.5; g1 (2, 4) -> A = ∓1. Tokens: 2×0.5, 1×0.5, 2×1, 2×1.
    assert m["data/adv_abs_mean"] == pytest.approx(5.5 / 7)
    assert r["data"]["advantage"]["stats"]["mean"] == pytest.approx((2 * 0.5 - 0.5 - 2 + 2) / 7)
    assert r["data"]["advantage"]["source"] == "reward+group_id"
    assert m["data/zero_adv_frac"] == 0.0
    # Versions (3, 3, 2, 1), current = data max 3: lags 0, 0, 1, 2 over 2+1, 2, 2 masked tokens.
    lag = r["data"]["lag"]
    assert (lag["current_version"], lag["version_source"]) == (3, "data-max")
    assert [(h["lag"], h["rows"], h["tokens"]) for h in lag["histogram"]] == [(0, 2, 3), (1, 1, 2), (2, 1, 2)]
    assert m["data/stale_frac"] == pytest.approx(4 / 7) and m["data/lag_max"] == 2
    assert m["data/response_len_mean"] == 2.0 and m["data/response_len_max"] == 3
    assert r["data"]["response_length"] | {"mean": 0} == {"count": 4, "mean": 0, "min": 1, "max": 3, "p50": 2,
                                                        "p90": 3, "p99": 3}
    assert m["data/duplicate_ids"] == 0 and r["mode"] == "data" and r["model"] is None
    validate_report(r, INSPECT_REPORT_SCHEMA)


def test_rare_tokens_zero_advantage_duplicates_and_current_version(tmp_path):
    table = valid_rollout_table(
        behavior_logprobs=([[-0.5, -1.0, -9.0], [-2.0], [-0.125, -0.75], [-5.0, -0.5]], pa.list_(pa.float32())),
        reward=([1.0, 1.0, 2.0, 4.0], pa.float32()),  # g0 rewards equal: A = 0 on rows 0 and 1
        sample_id=(["s0", "s0", "s2", "s0"], pa.string()),
    )
    r = audit(write_rollout_table(table, tmp_path / "r.arrow"), current_version=5)
    m = r["metrics"]
    # −9.0 is masked out; −5.0 ≤ log 0.01 ≈ −4.605 is the one rare token of 7.
    assert m["data/rare_token_frac"] == pytest.approx(1 / 7)
    assert m["data/neg_logmu_mean"] == pytest.approx((7.875 + 2.0) / 7)
    assert m["data/zero_adv_frac"] == pytest.approx(3 / 7) and r["data"]["advantage"]["zero_rows"] == 2
    # "s0" three times: two extra rows, one repeated id.
    assert r["data"]["duplicate_sample_ids"] == {"rows": 2, "ids": 1, "examples": ["s0"]}
    assert m["data/duplicate_ids"] == 2
    assert [h["lag"] for h in r["data"]["lag"]["histogram"]] == [2, 3, 4]
    assert r["data"]["lag"]["version_source"] == "--current-version"


def test_per_token_and_per_sequence_advantages(tmp_path):
    per_seq = valid_rollout_table(reward=None, group_id=None, advantage=([0.5, 0.0, -1.0, 2.0], pa.float32()))
    r = audit(write_rollout_table(per_seq, tmp_path / "seq.arrow"))
    # Masked tokens 2, 1, 2, 2: |A| sum 2·0.5 + 0 + 2·1 + 2·2 = 7 over 7 tokens; row 1 is zero.
    assert r["metrics"]["data/adv_abs_mean"] == pytest.approx(1.0)
    assert r["metrics"]["data/zero_adv_frac"] == pytest.approx(1 / 7)
    per_token = valid_rollout_table(reward=None, group_id=None, advantages=(
        [[1.0, 0.0, float("nan")], [0.0], [-2.0, 0.0], [3.0, 1.0]], pa.list_(pa.float32())))
    r = audit(write_rollout_table(per_token, tmp_path / "tok.arrow"))
    # NaN sits under loss_mask 0 and is ignored; zeros: 3 of 7; row 1 has only a zero.
    assert r["metrics"]["data/zero_adv_frac"] == pytest.approx(3 / 7)
    assert r["data"]["advantage"]["zero_rows"] == 1
    assert r["metrics"]["data/adv_abs_mean"] == pytest.approx((1 + 0 + 0 + 2 + 0 + 3 + 1) / 7)


def test_streaming_is_independent_of_batching_and_format(tmp_path, valid_rollout_path):
    table = valid_rollout_table()
    big = pa.concat_tables([table] * 50)  # 200 rows; ids repeat, which only the duplicate check sees
    one = audit(write_rollout_table(big, tmp_path / "a.arrow"))
    small_batches = audit(write_rollout_table(big, tmp_path / "b.arrow", fmt="stream", max_chunksize=3))
    parquet = audit(write_rollout_table(big, tmp_path / "c.parquet", fmt="parquet"))
    for other in (small_batches, parquet):
        # Sums in another batching, compared exactly: the table's values are dyadic (−0.5, 0.25, ±1, ...),
        # so every float64 partial sum is exact in any order.
        assert other["metrics"] == one["metrics"]
        assert other["data"]["lag"] == one["data"]["lag"]
    single = audit(valid_rollout_path)["metrics"]
    assert one["metrics"]["data/tokens"] == 50 * single["data/tokens"]
    assert one["metrics"]["data/neg_logmu_mean"] == pytest.approx(single["data/neg_logmu_mean"])


def test_resolve_metric_names():
    assert resolve_metric("harmful", True) == "tr/harmful_frac"
    assert resolve_metric("tr/harmful_frac", True) == "tr/harmful_frac"
    assert resolve_metric("zero_adv", False) == "data/zero_adv_frac"
    with pytest.raises(ConfigError, match="needs --model"):
        resolve_metric("tr/harmful_frac", False)
    with pytest.raises(ConfigError, match="unknown metric; valid names: data/rows"):
        resolve_metric("nope", True)


def _cli(*args):
    return runner.invoke(app, ["inspect", *map(str, args)])


def test_cli_json_to_stdout_is_the_only_output(valid_rollout_path):
    res = _cli(valid_rollout_path, "--json", "-")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert set(INSPECT_DATA_METRICS) <= set(report["metrics"])
    validate_report(report, INSPECT_REPORT_SCHEMA)


def test_cli_human_output(valid_rollout_path):
    res = _cli(valid_rollout_path)
    assert res.exit_code == 0, res.output
    assert "Staleness lag" in res.stdout and "lag 0 │" in res.stdout


def test_gate_pass_and_fail_write_the_report(tmp_path, valid_rollout_path):
    out = tmp_path / "report.json"
    res = _cli(valid_rollout_path, "--json", out, "--fail-above", "data/stale_frac=0.6", "-q")
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["gates"] == [
        {"metric": "data/stale_frac", "threshold": 0.6, "value": pytest.approx(4 / 7), "passed": True}]
    out.unlink()
    res = _cli(valid_rollout_path, "--json", out, "--fail-above", "stale=0.5", "--fail-above", "data/rows=10", "-q")
    assert res.exit_code == 3
    assert res.stderr.strip().splitlines() == [
        f"error: gate failed: data/stale_frac = {4 / 7} > 0.5"]
    gates = json.loads(out.read_text())["gates"]
    assert [g["passed"] for g in gates] == [False, True]


def _one_error_line(res, *needles):
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_unknown_gate_metric_lists_valid_names(valid_rollout_path, tmp_path):
    out = tmp_path / "r.json"
    line = _one_error_line(_cli(valid_rollout_path, "--json", out, "--fail-above", "bogus=1"), "bogus")
    assert all(name in line for name in INSPECT_DATA_METRICS)
    _one_error_line(_cli(valid_rollout_path, "--json", out, "--fail-above", "harmful=0.1"), "needs --model")
    assert not out.exists()


BAD_TABLES = {
    "missing response_ids": ({"response_ids": None}, "response_ids"),
    "no advantage source": ({"reward": None, "group_id": None}, "advantage source"),
    "reward without group_id": ({"group_id": None}, "column 'group_id': expected a group_id column next to reward"),
    "positive log-prob": ({"behavior_logprobs": ([[-0.5, 0.5, -0.25], [-2.0], [-0.125, -0.75], [-3.0, -0.5]],
                                                  pa.list_(pa.float32()))}, "row 0"),
    "NaN log-prob": ({"behavior_logprobs": ([[-0.5, -1.0, -0.25], [-2.0], [-0.125, float("nan")], [-3.0, -0.5]],
                                             pa.list_(pa.float32()))}, "row 2"),
    "length mismatch": ({"behavior_logprobs": ([[-0.5, -1.0], [-2.0], [-0.125, -0.75], [-3.0, -0.5]],
                                                pa.list_(pa.float32()))}, "behavior_logprobs"),
    "empty response": ({"response_ids": ([[5, 6, 7], [], [9, 10], [11, 12]], pa.list_(pa.int64())),
                            "behavior_logprobs": ([[-0.5, -1.0, -0.25], [], [-0.125, -0.75], [-3.0, -0.5]],
                                               pa.list_(pa.float32())),
                            "loss_mask": ([[True, True, False], [], [True, True], [True, True]], pa.list_(pa.bool_()))},
                       "row 1"),
    "wrong type": ({"behavior_logprobs": ([["a"], ["b"], ["c"], ["d"]], pa.list_(pa.string()))}, "behavior_logprobs"),
    "negative token id": ({"response_ids": ([[5, 6, 7], [8], [-9, 10], [11, 12]], pa.list_(pa.int64()))}, "row 2"),
    "non-finite reward": ({"reward": ([1.0, float("inf"), 2.0, 4.0], pa.float32())}, "reward"),
    "zero temperature": ({"temperature": ([0.9, 0.0, 0.9, 0.9], pa.float32())}, "temperature"),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_bad_rollouts_exit_2_with_one_line_and_write_nothing(tmp_path, case):
    replace, needle = BAD_TABLES[case]
    path = write_rollout_table(valid_rollout_table(**replace), tmp_path / "bad.arrow")
    out = tmp_path / "report.json"
    _one_error_line(_cli(path, "--json", out), str(path), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.arrow"]


def test_bad_files_and_options_exit_2(tmp_path, valid_rollout_path):
    garbage = tmp_path / "garbage.arrow"
    garbage.write_bytes(b"not an arrow file at all")
    _one_error_line(_cli(garbage), "garbage.arrow")
    truncated = tmp_path / "truncated.arrow"
    truncated.write_bytes(valid_rollout_path.read_bytes()[:200])
    _one_error_line(_cli(truncated), "truncated.arrow")
    _one_error_line(_cli(tmp_path / "missing.arrow"), "no such file")
    _one_error_line(_cli(valid_rollout_path, "--column", "nonsense"), "--column")
    _one_error_line(_cli(valid_rollout_path, "--delta", "0.1,x"), "--delta")
    _one_error_line(_cli(valid_rollout_path, "--delta", "-1"), "--delta")
    _one_error_line(_cli(valid_rollout_path, "--temperature", "-1"), "--temperature")
    _one_error_line(_cli(valid_rollout_path, "--per-token", tmp_path / "t.arrow"), "--per-token needs --model")
    _one_error_line(_cli(valid_rollout_path, "--json", valid_rollout_path), "is the input rollouts")
    _one_error_line(_cli(valid_rollout_path, "--model", tmp_path), "config.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.arrow", "rollouts.arrow", "truncated.arrow"]


def test_config_lists_every_problem():
    problems = InspectConfig(rollouts=(), tr_delta=2.0, top=-1, fail_above=("x",), device="tpu").validate()
    assert len(problems) == 5, problems
    with pytest.raises(ConfigError, match="5 problems"):
        InspectConfig(rollouts=(), tr_delta=2.0, top=-1, fail_above=("x",), device="tpu").check()


def test_inspect_reads_a_renamed_column_through_the_column_map(tmp_path):
    table = valid_rollout_table().rename_columns(
        ["prompt_ids", "response_ids", "logprobs", "loss_mask", "reward", "group_id", "sample_id", "policy_version"])
    path = write_rollout_table(table, tmp_path / "renamed.arrow")
    with pytest.raises(InputError):
        audit(path)
    r = audit(path, columns=("logprobs=behavior_logprobs",))
    assert r["metrics"]["data/tokens"] == 7 and r["inputs"]["columns"] == {"logprobs": "behavior_logprobs"}
    assert math.isclose(r["metrics"]["data/neg_logmu_mean"], 1.125)
    assert np.isfinite(r["settings"]["seconds"])


def test_data_audit_merge_equals_one_pass(tmp_path):
    from drpo_cli.audit.data_audit import DataAudit
    from drpo_cli.rollouts.files import open_rollouts

    big = pa.concat_tables([valid_rollout_table()] * 5)
    path = write_rollout_table(big, tmp_path / "r.arrow", fmt="stream", max_chunksize=3)  # 7 batches
    batches = list(open_rollouts(str(path)).iter_batches())
    whole, first, second = DataAudit(), DataAudit(), DataAudit()
    for i, sb in enumerate(batches):
        whole.update(sb, 1.0)
        (first if i % 2 else second).update(sb, 1.0)
    combine_as_all_reduce(first, second)
    first.all_reduce_()  # one process: a no-op
    # exact: the valid table's values are dyadic, so float64 sums in any order are exact
    assert first.section(None, "unknown") == whole.section(None, "unknown")


def combine_as_all_reduce(a, b) -> None:
    """Fold audit `b` into `a` with the ops its statistics are declared with (what all_reduce_ does across
    ranks), plus the per-row group values finish_groups exchanges."""
    from collections import Counter

    for op, combine in (("sum", lambda x, y: x + y), ("max", max)):
        a.set_flat(op, [combine(x, y) for x, y in zip(a.flat(op), b.flat(op))])
    for name in a.statistics("hist"):
        x, y = getattr(a, name), getattr(b, name)
        h = np.zeros(max(len(x), len(y)), dtype=np.int64)
        h[: len(x)] += x
        h[: len(y)] += y
        setattr(a, name, h)
    for name in a.statistics("counter"):
        counts = Counter(getattr(a, name))
        counts.update(getattr(b, name))  # (not `+`: it would drop keys counted 0)
        setattr(a, name, counts)
    a.adv_sources |= b.adv_sources
    for name in ("sample_ids", "group_ids", "group_rewards", "group_tokens"):
        getattr(a, name).extend(getattr(b, name))


def test_every_data_audit_field_is_a_declared_statistic_or_exchanged_rows():
    from dataclasses import fields as dc_fields

    from drpo_cli.audit.data_audit import DataAudit

    declared = {f.name for f in dc_fields(DataAudit) if "merge" in f.metadata}
    per_row = {"sample_ids", "group_ids", "group_rewards", "group_tokens", "group_codes", "adv_sources",
               "reduced_duplicates", "by_read"}  # by_read: the --by columns read, a setting
    assert declared | per_row == {f.name for f in dc_fields(DataAudit)} and not declared & per_row
    assert len(DataAudit().flat("sum")) == len(DataAudit.statistics("sum")) + 4 * 2  # two Moments, four sums each


def test_data_only_stale_row_filter_and_exact_error_rows(tmp_path):
    table = pa.ipc.open_file(str(ROOT / "examples/toy/rollouts.arrow")).read_all()
    versions = np.array(table.column("policy_version").to_pylist())
    lengths = np.array([len(x) for x in table.column("response_ids").to_pylist()])
    path = write_rollout_table(table, tmp_path / "r.arrow", max_chunksize=50)
    report = audit(path, max_lag=2, min_version=7)  # current version: the data's newest, 8
    keep = (8 - versions <= 2) & (versions >= 7)
    assert report["data"]["staleness_filter"] == {
        "max_lag": 2, "min_version": 7, "current_version": 8, "rows_dropped": int((~keep).sum()),
        "tokens_dropped": int(lengths[~keep].sum()), "tokens_masked": 0, "rows_kept": int(keep.sum()),
        "rows_without_version": 0}
    assert report["metrics"]["data/rows"] == keep.sum() and report["metrics"]["data/tokens"] == lengths[keep].sum()
    assert report["metrics"]["data/lag_max"] <= 1
    # A bad value in a kept row after dropped rows is still reported at its row in the file.
    bad_row = int(np.flatnonzero(keep)[-1])
    rewards = table.column("reward").to_pylist()
    rewards[bad_row] = float("nan")
    bad = table.set_column(table.schema.get_field_index("reward"), "reward", pa.array(rewards, pa.float32()))
    write_rollout_table(bad, tmp_path / "bad.arrow", max_chunksize=50)
    with pytest.raises(InputError, match=rf"column 'reward', row {bad_row} "):
        audit(tmp_path / "bad.arrow", max_lag=2, min_version=7)
    with pytest.raises(InputError, match="every one of the 192 rows is too stale"):
        audit(path, min_version=9)


@pytest.mark.parametrize(("meta", "note"), [
    ({"drpo.top_p": "1.0", "drpo.top_k": "0"}, None),  # values that mean no truncation
    ({"drpo.top_p": "1.0", "drpo.top_k": "-1"}, None),  # vLLM's "off" for top-k
    ({"drpo.top_p": "0.9", "drpo.top_k": "0"}, "(drpo.top_p=0.9)"),
    ({"drpo.top_p": "1.0", "drpo.top_k": "50"}, "(drpo.top_k=50)"),
    ({"drpo.top_p": "0.95", "drpo.top_k": "20"}, "(drpo.top_p=0.95, drpo.top_k=20)"),
])
def test_truncation_note_only_for_values_that_truncate(tmp_path, meta, note):
    path = write_rollout_table(valid_rollout_table(), tmp_path / "r.arrow", metadata=meta)
    said = [n for n in audit(path)["notes"] if n.startswith("the sampler truncated its distribution")]
    assert said == ([] if note is None else [(f"the sampler truncated its distribution {note}; logged log-probs "
                                              "may be renormalised over the kept tokens")])
