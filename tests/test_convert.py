"""`drpo convert`: JSONL dumps -> schema-v1 Arrow; every bad line reported, nothing written on error."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
from typer.testing import CliRunner

from drpo_cli.cli import app
from drpo_cli.rollouts.files import open_rollouts
from drpo_cli.rollouts.validate import validate_rollouts

FIXTURES = Path(__file__).resolve().parent / "fixtures"
runner = CliRunner()
GOOD = {"prompt_ids": [1, 2], "response_ids": [3, 4], "behavior_logprobs": [-0.5, -0.25], "reward": 1.0,
        "group_id": "g0"}


def jsonl(path: Path, *lines) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_jsonl_with_renamed_fields(tmp_path):
    src = jsonl(tmp_path / "in.jsonl", {**GOOD, "text": "ignored"},
                {"prompt_ids": [1], "output_token_ids": [7], "behavior_logprobs": [-1.0], "reward": 0.0,
                 "group_id": "g0"})
    # The first line has response_ids already; the rename applies to lines that use the other name.
    result = runner.invoke(app, ["convert", str(src), "--out", str(tmp_path / "out.arrow"), "--temperature", "0.7",
                                 "--column", "output_token_ids=response_ids", "--sampler", "vllm 0.11"])
    assert result.exit_code == 0, result.output
    assert "2 rows from 2 lines" in result.output
    source = open_rollouts(tmp_path / "out.arrow")
    assert validate_rollouts(source).total == 0
    assert source.metadata["drpo.temperature"] == "0.7" and source.metadata["drpo.sampler"] == "vllm 0.11"
    assert pa.ipc.open_file(str(tmp_path / "out.arrow")).read_all().column("response_ids").to_pylist() == [[3, 4], [7]]


def test_every_bad_line_is_reported_and_nothing_is_written(tmp_path):
    src = jsonl(tmp_path / "in.jsonl", GOOD, "{not json", {**GOOD, "behavior_logprobs": [-0.5]},
                {**GOOD, "behavior_logprobs": [-0.5, 0.25]}, {**GOOD, "behavior_logprobs": [-0.5, float("nan")]},
                {k: v for k, v in GOOD.items() if k != "prompt_ids"}, {**GOOD, "response_ids": [3, -4]},
                {**GOOD, "response_ids": [], "behavior_logprobs": []}, GOOD)
    out = tmp_path / "out.arrow"
    result = runner.invoke(app, ["convert", str(src), "--out", str(out)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("error: 7 bad lines; no output written: ")
    assert [line.strip().removeprefix("error: 7 bad lines; no output written: ") for line in lines] == [
        (f"{src}:2: expected a JSON object, found invalid JSON (Expecting property name enclosed in double quotes "
        "at column 2)"),
        f"{src}:3: field 'behavior_logprobs': expected length 2 (as response_ids), found length 1",
        f"{src}:4: field 'behavior_logprobs[1]': expected a finite log-prob <= 0, found 0.25",
        f"{src}:5: field 'behavior_logprobs[1]': expected a finite log-prob <= 0, found nan",
        (f"{src}:6: field 'prompt_ids': expected a field of schema v1 (rename with --column SRC=prompt_ids), "
        "found no such field"),
        f"{src}:7: field 'response_ids[1]': expected a token id (integer >= 0), found -4",
        f"{src}:8: field 'response_ids': expected at least one response token, found an empty list",
    ]
    assert list(tmp_path.iterdir()) == [src]


def test_jsonl_token_policy_versions_pass_through_and_are_checked(tmp_path):
    src = jsonl(tmp_path / "in.jsonl", {**GOOD, "token_policy_versions": [6, 7]},
                {**GOOD, "token_policy_versions": [7, 7]})
    out = tmp_path / "out.arrow"
    assert runner.invoke(app, ["convert", str(src), "--out", str(out)]).exit_code == 0
    assert pa.ipc.open_file(str(out)).read_all().column("token_policy_versions").to_pylist() == [[6, 7], [7, 7]]
    bad = jsonl(tmp_path / "bad.jsonl", {**GOOD, "token_policy_versions": [6]},
                {**GOOD, "token_policy_versions": [6, -1]}, {**GOOD, "token_policy_versions": [6, "v7"]},
                {**GOOD, "token_policy_versions": [6, 7.5]})
    result = runner.invoke(app, ["convert", str(bad), "--out", str(tmp_path / "bad.arrow")])
    assert result.exit_code == 2
    assert [line.strip().removeprefix("error: 4 bad lines; no output written: ")
            for line in result.output.strip().splitlines()] == [
        f"{bad}:1: field 'token_policy_versions': expected length 2 (as response_ids), found length 1",
        f"{bad}:2: field 'token_policy_versions[1]': expected a policy version (integer >= 0), found -1",
        f"{bad}:3: field 'token_policy_versions[1]': expected a policy version (integer >= 0), found 'v7'",
        f"{bad}:4: field 'token_policy_versions[1]': expected a policy version (integer >= 0), found 7.5",
    ]
    assert not (tmp_path / "bad.arrow").exists()


def test_raw_logprobs_at_temperature_are_refused(tmp_path):
    src = jsonl(tmp_path / "in.jsonl", GOOD)
    result = runner.invoke(app, ["convert", str(src), "--out", str(tmp_path / "o.arrow"), "--logprobs", "raw",
                                 "--temperature", "0.7"])
    assert result.exit_code == 2
    assert "raw log-probs at temperature 0.7" in result.output and "processed_logprobs" in result.output
    assert list(tmp_path.iterdir()) == [src]
    ok = runner.invoke(app, ["convert", str(src), "--out", str(tmp_path / "o.arrow"), "--logprobs", "raw",
                             "--temperature", "0.7", "--allow-raw-logprobs"])
    assert ok.exit_code == 0 and open_rollouts(tmp_path / "o.arrow").metadata["drpo.logprobs"] == "raw"


def test_output_rules(tmp_path):
    src = jsonl(tmp_path / "in.jsonl", GOOD)
    assert runner.invoke(app, ["convert", str(src), "--out", str(src)]).exit_code == 2
    out = tmp_path / "o.arrow"
    assert runner.invoke(app, ["convert", str(src), "--out", str(out)]).exit_code == 0
    again = runner.invoke(app, ["convert", str(src), "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert runner.invoke(app, ["convert", str(src), "--out", str(out), "--overwrite"]).exit_code == 0


def test_engine_dumps(tmp_path):
    for fmt, name, rows, extra in (("vllm", "vllm_0.11_request_outputs.jsonl", 2, ["--logprobs", "processed"]),
                                   ("openai", "openai_vllm_0.11_completion.jsonl", 2, ["--logprobs", "processed"]),
                                   ("openai", "openai_vllm_0.11_chat.jsonl", 1, ["--logprobs", "processed"]),
                                   ("sglang", "sglang_0.5_generate.jsonl", 2, ["--logprobs", "processed"])):
        out = tmp_path / f"{name}.arrow"
        result = runner.invoke(app, ["convert", str(FIXTURES / name), "--out", str(out), "--format", fmt,
                                     "--temperature", "0.7", *extra])
        if fmt == "sglang":  # no reward next to the responses: no advantage source
            assert result.exit_code == 2 and "advantage" in result.output and not out.exists()
            continue
        assert result.exit_code == 0, result.output
        table = pa.ipc.open_file(str(out)).read_all()
        assert table.num_rows == rows and set(table.column("reward").to_pylist()) <= {0.5, 1.0}
    needs_kind = runner.invoke(app, ["convert", str(FIXTURES / "vllm_0.11_request_outputs.jsonl"), "--out",
                                     str(tmp_path / "x.arrow"), "--format", "vllm"])
    assert needs_kind.exit_code == 2 and "pass --logprobs processed or raw" in needs_kind.output
