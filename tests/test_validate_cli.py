"""`drpo validate` / `drpo schema` through Typer's CliRunner: every invalid case exits 2 with one line
naming the file, column and row; valid input exits 0; malformed tables never give a traceback."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from conftest import valid_rollout_table, write_rollout_table
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from drpo_cli.base.errors import InputError
from drpo_cli.cli import app
from drpo_cli.rollouts.rows import load_rows
from drpo_cli.rollouts.schema import COLUMNS, schema_document

runner = CliRunner()
F32, I64 = pa.list_(pa.float32()), pa.list_(pa.int64())


def validate(*args: str):
    result = runner.invoke(app, ["validate", *map(str, args)])
    assert "Traceback" not in result.output
    return result


def problem_line(output: str, *fragments: str) -> str:
    """The one line of `output` holding every fragment (fails when there is none)."""
    lines = [line for line in output.splitlines() if all(f in line for f in fragments)]
    assert lines, f"no line with {fragments} in:\n{output}"
    return lines[0]


def test_valid_file_exits_0_with_summary(valid_rollout_path):
    result = validate(valid_rollout_path)
    assert result.exit_code == 0, result.output
    # 4 rows; response tokens 3 + 1 + 2 + 2 = 8
    assert "ok: 1 file(s), 4 rows, 8 response tokens" in result.output


# (replaced columns, column named in the message, row named or None, fragment of the message)
ROW_CASES = {
    "behavior_logprobs too long": (
        {"behavior_logprobs": ([[-0.5, -1.0, -0.25], [-2.0], [-0.125, -0.75, -1.0], [-3.0, -0.5]], F32)},
        "behavior_logprobs", 2, "expected length 2 (as response_ids), found length 3"),
    "loss_mask too short": (
        {"loss_mask": ([[True, True, False], [True], [True, True], [True]], pa.list_(pa.bool_()))},
        "loss_mask", 3, "found length 1"),
    "advantages length": (
        {"advantages": ([[0.0, 0.0, 0.0], [], [1.0, 1.0], [0.0, 0.0]], F32)}, "advantages", 1, "found length 0"),
    "proximal length": (
        {"proximal_logprobs": ([[-1.0, -1.0, -1.0], [-1.0], [-1.0, -1.0], [-1.0, -1.0, -1.0]], F32)},
        "proximal_logprobs", 3, "found length 3"),
    "empty response": (
        {"response_ids": ([[5, 6, 7], [], [9, 10], [11, 12]], I64),
         "behavior_logprobs": ([[-0.5, -1.0, -0.25], [], [-0.125, -0.75], [-3.0, -0.5]], F32),
         "loss_mask": ([[True, True, False], [], [True, True], [True, True]], pa.list_(pa.bool_()))},
        "response_ids", 1, "expected at least one response token"),
    "nan log-prob": (
        {"behavior_logprobs": ([[-0.5, -1.0, -0.25], [-2.0], [-0.125, math.nan], [-3.0, -0.5]], F32)},
        "behavior_logprobs", 2, "found nan at token 1"),
    "inf log-prob": (
        {"behavior_logprobs": ([[-0.5, -1.0, -0.25], [-math.inf], [-0.125, -0.75], [-3.0, -0.5]], F32)},
        "behavior_logprobs", 1, "found -inf at token 0"),
    "positive log-prob": (
        {"behavior_logprobs": ([[-0.5, -1.0, -0.25], [-2.0], [-0.125, -0.75], [-3.0, 0.5]], F32)},
        "behavior_logprobs", 3, "found 0.5 at token 1"),
    "positive proximal log-prob": (
        {"proximal_logprobs": ([[-0.5, -1.0, -0.25], [2.0], [-0.125, -0.75], [-3.0, -0.5]], F32)},
        "proximal_logprobs", 1, "found 2 at token 0"),
    "negative response id": (
        {"response_ids": ([[5, 6, 7], [8], [9, -10], [11, 12]], I64)}, "response_ids", 2, "found -10 at token 1"),
    "negative prompt id": (
        {"prompt_ids": ([[1, 2], [-1, 2], [3], [3]], I64)}, "prompt_ids", 1, "found -1 at token 0"),
    "duplicate sample id": (
        {"sample_id": (["s0", "s1", "s0", "s3"], pa.string())}, "sample_id", 2, "the same id as"),
    "null response": (
        {"response_ids": ([[5, 6, 7], None, [9, 10], [11, 12]], I64)}, "response_ids", 1, "found null"),
    "null token": (
        {"behavior_logprobs": ([[-0.5, None, -0.25], [-2.0], [-0.125, -0.75], [-3.0, -0.5]], F32)},
        "behavior_logprobs", 0, "found a null entry"),
    "nan reward": (
        {"reward": ([1.0, math.nan, 2.0, 4.0], pa.float32())}, "reward", 1, "expected a finite number, found nan"),
    "inf advantage": (
        {"advantage": ([1.0, 0.0, math.inf, 0.0], pa.float32())}, "advantage", 2, "found inf"),
    "zero temperature": (
        {"temperature": ([1.0, 1.0, 1.0, 0.0], pa.float32())}, "temperature", 3, "a finite temperature > 0"),
    "token versions length": (
        {"token_policy_versions": ([[3, 3, 3], [3], [2, 2, 2], [1, 1]], I64)},
        "token_policy_versions", 2, "expected length 2 (as response_ids), found length 3"),
    "negative token version": (
        {"token_policy_versions": ([[3, 3, 3], [3], [2, 2], [1, -1]], I64)},
        "token_policy_versions", 3, "expected policy versions >= 0 where loss_mask is 1, found -1 at token 1"),
    "null token version": (
        {"token_policy_versions": ([[3, 3, 3], None, [2, 2], [1, 1]], I64)},
        "token_policy_versions", 1, "expected a value, found null"),
}


def test_negative_token_version_where_loss_mask_is_0_is_ignored(tmp_path):
    # row 0, token 2 has loss_mask 0 (e.g. a tool-output token no policy sampled).
    versions = [[3, 3, -1], [3], [2, 2], [1, 2]]
    path = write_rollout_table(valid_rollout_table(token_policy_versions=(versions, I64)), tmp_path / "ok.arrow")
    assert validate(path).exit_code == 0


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_row_problem_exits_2_naming_column_and_row(tmp_path, case):
    replace, column, row, fragment = ROW_CASES[case]
    path = write_rollout_table(valid_rollout_table(**replace), tmp_path / "bad.arrow")
    result = validate(path)
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[0].startswith("error: invalid rollouts: 1 problem")
    line = problem_line(result.output, str(path), f"column '{column}'", f"row {row} ", fragment)
    assert f"(sample_id 's{row}')" in line or column == "sample_id"


def test_nan_log_prob_where_loss_mask_is_0_is_ignored(tmp_path):
    # row 0, token 2 has loss_mask 0: a tool-output token whose log-prob the sampler never produced.
    lp = [[-0.5, -1.0, math.nan], [-2.0], [-0.125, -0.75], [-3.0, -0.5]]
    path = write_rollout_table(valid_rollout_table(behavior_logprobs=(lp, F32)), tmp_path / "ok.arrow")
    assert validate(path).exit_code == 0


# (replaced columns, column named in the message, fragment)
SCHEMA_CASES = {
    "missing response_ids": ({"response_ids": None}, "response_ids", "no such column"),
    "missing prompt_ids": ({"prompt_ids": None}, "prompt_ids", "no such column"),
    "float token ids": (
        {"response_ids": ([[5.0, 6.0, 7.0], [8.0], [9.0, 10.0], [11.0, 12.0]], pa.list_(pa.float64()))},
        "response_ids", "found list<float64>"),
    "string log-probs": (
        {"behavior_logprobs": ([["a", "b", "c"], ["d"], ["e", "f"], ["g", "h"]], pa.list_(pa.string()))},
        "behavior_logprobs", "found list<string>"),
    "scalar reward as list": ({"reward": ([[1.0], [0.0], [2.0], [4.0]], F32)}, "reward", "found list<float32>"),
    "float token versions": (
        {"token_policy_versions": ([[3.0, 3.0, 3.0], [3.0], [2.0, 2.5], [1.0, 1.0]], pa.list_(pa.float64()))},
        "token_policy_versions", ("expected list or large_list of any integer type (int32, int64, ...), "
                                  "found list<float64>")),
    "scalar token versions": (
        {"token_policy_versions": ([3, 3, 2, 1], pa.int64())}, "token_policy_versions", "found int64"),
    "no advantage source": ({"reward": None, "group_id": None}, "advantages", "one advantage source"),
    "reward without group_id": ({"group_id": None}, "group_id", "found reward alone"),
}


@pytest.mark.parametrize("case", list(SCHEMA_CASES))
def test_schema_problem_exits_2_naming_column(tmp_path, case):
    replace, column, fragment = SCHEMA_CASES[case]
    path = write_rollout_table(valid_rollout_table(**replace), tmp_path / "bad.arrow")
    result = validate(path)
    assert result.exit_code == 2, result.output
    problem_line(result.output, str(path), f"column '{column}'", fragment)


def test_remapped_column_missing_from_file_is_named(tmp_path):
    path = write_rollout_table(valid_rollout_table(behavior_logprobs=None), tmp_path / "r.arrow")
    result = validate(path, "--column", "logprobs=behavior_logprobs")
    assert result.exit_code == 2
    problem_line(result.output, "column 'behavior_logprobs'", "--column maps 'logprobs'", "no such column")


def test_bad_metadata_exits_2(tmp_path):
    path = write_rollout_table(valid_rollout_table(), tmp_path / "m.arrow",
                               metadata={"drpo.schema_version": "2", "drpo.temperature": "hot"})
    result = validate(path)
    assert result.exit_code == 2
    problem_line(result.output, str(path), 'drpo.schema_version "1"', 'found "2"')
    problem_line(result.output, str(path), "drpo.temperature", 'found "hot"')


def test_duplicate_sample_ids_across_files(tmp_path):
    a = write_rollout_table(valid_rollout_table(), tmp_path / "a.arrow")
    b = write_rollout_table(valid_rollout_table(sample_id=(["x0", "x1", "s1", "x3"], pa.string())),
                            tmp_path / "b.parquet", fmt="parquet")
    result = validate(a, b)
    assert result.exit_code == 2
    problem_line(result.output, str(b), "column 'sample_id'", "row 2 (sample_id 's1')", f"same id as {a} row 1")


def _truncated(path, keep: float):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize("fmt", ["file", "stream", "parquet"])
def test_truncated_file_exits_2(tmp_path, fmt):
    table = valid_rollout_table()
    path = write_rollout_table(pa.concat_tables([table] * 50), tmp_path / "t.arrow", fmt=fmt, max_chunksize=8)
    result = validate(_truncated(path, 0.6))
    assert result.exit_code == 2, result.output
    problem_line(result.output, str(path), "expected a")


def _validate_peak_rss(path, cwd) -> tuple[int, int]:
    """(exit code, peak RSS in bytes) of `drpo validate PATH` in a process of its own (the only child of a
    fresh interpreter, so RUSAGE_CHILDREN is its peak alone)."""
    code = ("import resource, subprocess, sys; r = subprocess.run([sys.executable, '-m', 'drpo_cli', 'validate', "
            "sys.argv[1]], capture_output=True); print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True, text=True, cwd=cwd)
    rc, kib = out.stdout.split()
    return int(rc), int(kib) * 1024  # Linux reports KiB


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss units and mapped-page accounting are Linux's")
def test_one_huge_record_batch_validates_in_memory_bounded_by_tokens(tmp_path):
    # Issue 32, point 13: a table written with one write_table (here 512 rows × 65,536 tokens, 256 MB, one
    # record batch) was read whole and cast whole: 0.95 GB above an empty run, 24 GB at the size.
    # Memory-mapped and cast in slices of at most BATCH_VALUES list values, the peak above the empty run
    # stays within a few 8-byte copies of one slice, whatever the batch.
    from drpo_cli.rollouts.files import BATCH_VALUES

    rows, tokens = 512, 65_536
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * tokens)
    table = pa.table({
        "prompt_ids": pa.array([[1, 2]] * rows, pa.list_(pa.int32())),
        "response_ids": pa.ListArray.from_arrays(offsets, pa.array(np.full(rows * tokens, 7, np.int32))),
        "behavior_logprobs": pa.ListArray.from_arrays(offsets, pa.array(np.full(rows * tokens, -0.5, np.float32))),
        "reward": pa.array(np.arange(rows, dtype=np.float32)), "group_id": pa.array(np.arange(rows) // 4)})
    huge = write_rollout_table(table, tmp_path / "one.arrow")
    assert pa.ipc.open_file(str(huge)).num_record_batches == 1
    del table
    empty = write_rollout_table(valid_rollout_table(), tmp_path / "small.arrow")
    _, baseline = _validate_peak_rss(empty, tmp_path)  # the interpreter, pyarrow and drpo
    rc, peak = _validate_peak_rss(huge, tmp_path)
    assert rc == 0
    assert peak - baseline < 3 * 8 * BATCH_VALUES, (peak - baseline) / 2**20  # ~60 MB here; 100 MB allowed


def test_non_arrow_files_and_missing_paths_exit_2(tmp_path):
    text = tmp_path / "notes.arrow"
    text.write_text("prompt,response\n1,2\n")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    (empty / "readme.txt").write_text("no rollouts here")
    result = validate(text, empty, tmp_path / "nope.parquet")
    assert result.exit_code == 2
    assert "3 problems" in result.output
    problem_line(result.output, str(text), "an Arrow IPC (file or stream) or Parquet file")
    problem_line(result.output, str(empty), "a directory holding *.arrow")
    problem_line(result.output, "nope.parquet", "no such path")


def test_every_problem_is_reported_at_once_and_capped(tmp_path):
    table = valid_rollout_table(
        group_id=None,  # reward without group_id
        response_ids=([[5, 6, 7], [8], [-9, 10], [11, 12]], I64),  # negative id, row 2
        behavior_logprobs=([[-0.5, -1.0, -0.25], [0.5], [-0.125, -0.75], [-3.0]], F32),  # row 1 positive, row 3 length
    )
    path = write_rollout_table(table, tmp_path / "bad.arrow")
    result = validate(path)
    assert result.exit_code == 2
    assert "4 problems" in result.output.splitlines()[0]
    problem_line(result.output, "column 'group_id'")
    problem_line(result.output, "column 'response_ids'", "row 2")
    problem_line(result.output, "column 'behavior_logprobs'", "row 1", "found 0.5")
    problem_line(result.output, "column 'behavior_logprobs'", "row 3", "found length 1")
    capped = runner.invoke(app, ["validate", str(path), "--max-problems", "1"])
    assert capped.exit_code == 2
    assert "... and 3 more" in capped.output
    assert sum(line.startswith("  ") for line in capped.output.splitlines()) == 2  # 1 problem + the count


def test_bad_column_option_exits_2(valid_rollout_path):
    result = validate(valid_rollout_path, "--column", "logprobs")
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "LOGGED=CANONICAL" in result.output
    result = validate(valid_rollout_path, "--column", "logprobs=logits")
    assert result.exit_code == 2 and "not a schema v1 column" in result.output


def test_schema_command_table_and_json():
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    for c in COLUMNS:
        assert c.name in result.output
    result = runner.invoke(app, ["schema", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output) == schema_document()


def test_schema_and_validate_do_not_import_torch(valid_rollout_path):
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from drpo_cli.cli import app\n"
        "r = CliRunner()\n"
        "assert r.invoke(app, ['--help']).exit_code == 0\n"
        "assert r.invoke(app, ['schema']).exit_code == 0\n"
        f"assert r.invoke(app, ['validate', {str(valid_rollout_path)!r}]).exit_code == 0\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- hypothesis: malformed tables never give a traceback -----------------------------------------

_TYPES = [pa.list_(pa.int32()), pa.large_list(pa.int64()), pa.list_(pa.float64()), pa.list_(pa.float32()),
          pa.list_(pa.uint8()), pa.list_(pa.bool_()), pa.list_(pa.string()), pa.int64(), pa.float64(),
          pa.string(), pa.bool_(), pa.null(), pa.uint64()]
_NAMES = [c.name for c in COLUMNS] + ["extra"]
_FLOATS = st.sampled_from([0.0, -0.5, -1.0, 0.5, 2.0, math.nan, math.inf, -math.inf])


def _value(t: pa.DataType):
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return st.one_of(st.none(), st.lists(st.one_of(st.none(), _value(t.value_type)), max_size=3))
    if pa.types.is_integer(t):
        lo = 0 if pa.types.is_unsigned_integer(t) else -3
        hi = 2**64 - 1 if pa.types.is_uint64(t) else 5
        return st.sampled_from([lo, 0, 1, 2, hi])
    if pa.types.is_floating(t):
        return _FLOATS
    if pa.types.is_boolean(t):
        return st.booleans()
    if pa.types.is_string(t):
        return st.sampled_from(["a", "b", "", "g1"])
    return st.none()


@st.composite
def malformed_tables(draw):
    """Random column subsets, types, lengths and values; half start from the valid table and change
    a few columns, so that tables close to valid (and valid ones) are drawn too."""
    if draw(st.booleans()):
        valid = valid_rollout_table()
        n, columns = valid.num_rows, dict(zip(valid.column_names, valid.columns))
        names = draw(st.lists(st.sampled_from(_NAMES), unique=True, max_size=3))
        for name in draw(st.lists(st.sampled_from(valid.column_names), unique=True, max_size=2)):
            columns.pop(name)
    else:
        n, columns = draw(st.integers(0, 5)), {}
        names = draw(st.lists(st.sampled_from(_NAMES), unique=True, max_size=len(_NAMES)))
    for name in names:
        spec = next((c for c in COLUMNS if c.name == name), None)
        # Half the time keep the canonical type, so that value-level checks are reached too.
        t = spec.arrow_type if spec is not None and draw(st.booleans()) else draw(st.sampled_from(_TYPES))
        columns[name] = pa.array(draw(st.lists(_value(t), min_size=n, max_size=n)), type=t)
    fmt = draw(st.sampled_from(["file", "stream", "parquet"]))
    return pa.table(columns) if columns else pa.table({"x": pa.array([], pa.int64())}), fmt


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(malformed_tables())
def test_malformed_tables_never_give_a_traceback(tmp_path, table_fmt):
    table, fmt = table_fmt
    path = write_rollout_table(table, tmp_path / "h.arrow", fmt=fmt)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code in (0, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    # Whatever validate accepts must load; whatever it rejects must fail to load with InputError.
    if result.exit_code == 0:
        rows = load_rows(path)
        assert rows.num_rows == table.num_rows
    else:
        with pytest.raises(InputError):
            load_rows(path)


@pytest.mark.parametrize("case", [c for c in ROW_CASES if c not in ("duplicate sample id", "null token",
                                                                    "proximal length", "positive proximal log-prob")])
def test_the_audit_applies_the_same_rule_with_the_same_message(tmp_path, case):
    """inspect's streaming audit stops at the first problem; drpo validate lists them all. Both name the
    same column and row, and the same expectation (rules.ROW_RULES), for every row rule."""
    import re

    from drpo_cli.audit.data_audit import DataAudit
    from drpo_cli.rollouts.files import open_rollouts

    replace, column, row, _ = ROW_CASES[case]
    path = write_rollout_table(valid_rollout_table(**replace), tmp_path / "bad.arrow")
    line = problem_line(validate(path).output, f"column '{column}'", f"row {row} ")
    expected = re.search(r"expected (.*), found", line).group(1)
    with pytest.raises(InputError) as err:
        for sb in open_rollouts(str(path)).iter_batches():
            DataAudit().update(sb, 1.0)
    assert f"column '{column}', row {row} " in err.value.message
    assert re.search(r"expected (.*?)( \(token \d+\))?, found", err.value.message).group(1) == expected
