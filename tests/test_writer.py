"""RolloutWriter: checked, atomic schema-v1 files; the raw-log-prob refusal; no torch on import."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pytest
from conftest import valid_rollout_table, write_rollout_table

from drpo_cli import RolloutWriter
from drpo_cli.base.errors import ConfigError, InputError
from drpo_cli.rollouts.files import open_rollouts
from drpo_cli.rollouts.validate import validate_rollouts
from drpo_cli.rollouts.writer import check_logprobs_kind

ROWS = valid_rollout_table().to_pylist()


def test_round_trip_in_batches_with_metadata(tmp_path):
    out = tmp_path / "r.arrow"
    with RolloutWriter(out, temperature=0.7, top_p=0.9, top_k=40, sampler="vllm 0.11", batch_rows=3) as w:
        for row in ROWS:
            w.write(**row)
        assert not out.exists()  # only a clean close puts the file in place
    reader = pa.ipc.open_file(str(out))
    assert reader.num_record_batches == 2  # 3 + 1 rows: written as they came
    table = reader.read_all()
    assert table.to_pylist() == ROWS
    assert {k.decode(): v.decode() for k, v in table.schema.metadata.items()} == {
        "drpo.schema_version": "1", "drpo.logprobs": "processed", "drpo.temperature": "0.7",
        "drpo.top_p": "0.9", "drpo.top_k": "40", "drpo.sampler": "vllm 0.11",
        "drpo.output": "rollouts"}  # outputs.py's marker: --overwrite may replace this file
    assert validate_rollouts(open_rollouts(out)).total == 0
    assert [p.name for p in tmp_path.iterdir()] == ["r.arrow"]


def test_token_policy_versions_round_trip_and_are_checked(tmp_path):
    versions = [[3, 4, 4], [3], [1, 2], [0, 0]]
    rows = [{**r, "token_policy_versions": v} for r, v in zip(ROWS, versions)]
    with RolloutWriter(tmp_path / "r.arrow") as w:
        w.write_rows(rows)
    table = pa.ipc.open_file(str(tmp_path / "r.arrow")).read_all()
    assert table.schema.field("token_policy_versions").type == pa.list_(pa.int64())
    assert table.column("token_policy_versions").to_pylist() == versions
    assert validate_rollouts(open_rollouts(tmp_path / "r.arrow")).total == 0
    bad = [dict(r) for r in rows]
    bad[1]["token_policy_versions"] = [3, 3]
    with pytest.raises(InputError, match=r"column 'token_policy_versions', row 1 \(sample_id 's1'\): "
                                         r"expected length 1 \(as response_ids\), found length 2"), \
            RolloutWriter(tmp_path / "b.arrow") as w:
        w.write_rows(bad)
    bad[1]["token_policy_versions"] = [-2]
    with pytest.raises(InputError, match=r"row 1 .*expected policy versions >= 0 where loss_mask is 1, found -2"), \
            RolloutWriter(tmp_path / "b.arrow") as w:
        w.write_rows(bad)
    bad[1]["token_policy_versions"] = ["v3"]
    with pytest.raises(InputError, match=r"column 'token_policy_versions', row 1: expected a value of type "
                                         r"list<int64>, found \['v3'\]"), RolloutWriter(tmp_path / "b.arrow") as w:
        w.write_rows(bad)
    assert not (tmp_path / "b.arrow").exists()


def test_exception_inside_with_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), RolloutWriter(tmp_path / "r.arrow", batch_rows=1) as w:
        w.write(**ROWS[0])
        w.write(**ROWS[1])  # already flushed to the temporary file
        raise RuntimeError("sampler crashed")
    assert list(tmp_path.iterdir()) == []


def test_bad_row_has_validates_message_and_leaves_nothing(tmp_path):
    bad = [dict(r) for r in ROWS]
    bad[2]["behavior_logprobs"] = [-0.125, 0.5]
    # What `drpo validate` says about the same row, written by pyarrow directly.
    reference = tmp_path / "ref" / "r.arrow"
    reference.parent.mkdir()
    table = valid_rollout_table(behavior_logprobs=([r["behavior_logprobs"] for r in bad], pa.list_(pa.float32())))
    write_rollout_table(table, reference)
    expected = str(validate_rollouts(open_rollouts(reference))[0])

    out = tmp_path / "w" / "r.arrow"
    out.parent.mkdir()
    with pytest.raises(InputError) as err, RolloutWriter(out) as w:
        for row in bad[:3]:
            w.write(**row)
    assert err.value.message == "invalid rollout rows: " + expected.replace(str(reference), str(out))
    assert "row 2" in err.value.message and "0.5 at token 1" in err.value.message
    assert list(out.parent.iterdir()) == []


def test_rows_must_keep_the_first_rows_columns(tmp_path):
    with pytest.raises(InputError, match=r"row 1: expected the columns of row 0"), RolloutWriter(tmp_path / "r.arrow") as w:
        w.write(**ROWS[0])
        w.write(prompt_ids=[1], response_ids=[2], behavior_logprobs=[-1.0], reward=1.0, group_id="g")
    with pytest.raises(InputError, match=r"row 0: expected schema v1 columns .* found 'logprob'"):
        RolloutWriter(tmp_path / "s.arrow").write(prompt_ids=[1], response_ids=[2], behavior_logprobs=[-1.0],
                                                  logprob=[-1.0])
    with pytest.raises(InputError, match=r"column 'response_ids', row 0: expected a value of type list<int64>, "
                                         r"found \['a'\]"), RolloutWriter(tmp_path / "t.arrow") as w:
        w.write(prompt_ids=[1], response_ids=["a"], behavior_logprobs=[-1.0], advantage=1.0)
    with pytest.raises(InputError, match="advantage source"), RolloutWriter(tmp_path / "u.arrow") as w:
        w.write(prompt_ids=[1], response_ids=[2], behavior_logprobs=[-1.0])
    with pytest.raises(InputError, match="duplicate|unique sample_id"), RolloutWriter(tmp_path / "v.arrow") as w:
        w.write(**ROWS[0])
        w.write(**{**ROWS[1], "sample_id": ROWS[0]["sample_id"]})
    assert list(tmp_path.iterdir()) == []


def test_raw_logprobs_at_temperature_or_truncation_are_refused(tmp_path):
    for kwargs in ({"temperature": 0.7}, {"top_p": 0.9}, {"top_k": 20}, {"min_p": 0.05}):
        with pytest.raises(ConfigError, match='logprobs_mode="processed_logprobs"') as err:
            RolloutWriter(tmp_path / "r.arrow", logprobs="raw", **kwargs)
        # SGLang's fix differs: after temperature by default, but before truncation whatever the setting
        assert ("SGLANG_RETURN_ORIGINAL_LOGPROB" if "temperature" in kwargs else "return_sampling_mask=true") \
            in err.value.message
    check_logprobs_kind("raw", 1.0, 1.0, 0)  # raw at T = 1 without truncation is the sampled distribution
    with pytest.raises(ConfigError, match="expected one of processed, raw"):
        check_logprobs_kind("logits", 1.0)
    # Raw with no temperature known is refused when the first rows come; min-p truncates like top-p.
    with pytest.raises(InputError, match=r"column 'temperature', row 0: expected a temperature .*generation_config"), \
            RolloutWriter(tmp_path / "r.arrow", logprobs="raw") as w:
        w.write(**ROWS[0])
    with pytest.raises(ConfigError, match="raw log-probs with min_p=0.1"):
        check_logprobs_kind("raw", 1.0, min_p=0.1)
    check_logprobs_kind("raw", 1.0, min_p=0.0)
    # A per-row temperature column counts too.
    with pytest.raises(InputError, match="row 0.*temperature 1 with raw log-probs"), \
            RolloutWriter(tmp_path / "r.arrow", logprobs="raw") as w:
        w.write(**ROWS[0], temperature=0.7)
    # The explicit override writes the file and records the kind.
    with RolloutWriter(tmp_path / "r.arrow", logprobs="raw", temperature=0.7, allow_raw_logprobs=True) as w:
        w.write(**ROWS[0])
    assert open_rollouts(tmp_path / "r.arrow").metadata["drpo.logprobs"] == "raw"


def test_the_output_rule(tmp_path):
    out = tmp_path / "r.arrow"
    out.write_bytes(b"keep me")
    with pytest.raises(ConfigError, match="already exists \\(pass --overwrite"):
        RolloutWriter(out)
    with pytest.raises(ConfigError, match="a file drpo did not write"):
        RolloutWriter(out, overwrite=True)  # --overwrite replaces only what drpo wrote
    assert out.read_bytes() == b"keep me"
    with pytest.raises(ConfigError, match="is a directory"):
        RolloutWriter(tmp_path)
    with pytest.raises(ConfigError, match="parent directory does not exist"):
        RolloutWriter(tmp_path / "no" / "r.arrow")
    out.unlink()
    for n in (1, 2):  # a file RolloutWriter wrote may be replaced
        with RolloutWriter(out, overwrite=True) as w:
            w.write_rows(ROWS[:n])
        assert pa.ipc.open_file(str(out)).read_all().num_rows == n
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_writer_adapters_and_convert_import_without_torch():
    code = ("import sys\nimport drpo_cli.rollouts.writer, drpo_cli.rollouts.adapters, drpo_cli.rollouts.convert\n"
            "from drpo_cli import RolloutWriter\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_validate_and_inspect_read_the_logprobs_kind(tmp_path):
    from drpo_cli.audit.inspect_data import run_inspect
    from drpo_cli.config import InspectConfig

    bad = write_rollout_table(valid_rollout_table(), tmp_path / "bad.arrow", metadata={"drpo.logprobs": "logits"})
    (problem,) = validate_rollouts(open_rollouts(bad))
    assert str(problem) == f'{bad}: expected metadata drpo.logprobs "processed" or "raw", found "logits"'
    out = tmp_path / "raw.arrow"
    with RolloutWriter(out, logprobs="raw", temperature=0.7, allow_raw_logprobs=True) as w:
        w.write_rows(ROWS)
    notes = run_inspect(InspectConfig(rollouts=(str(out),), quiet=True).check())["notes"]
    assert any(n.startswith("drpo.logprobs = raw") and "processed_logprobs" in n for n in notes)
