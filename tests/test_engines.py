"""Engine conformance: vLLM 0.33.0, SGLang 0.5.23 and their OpenAI-compatible servers (through openai 3.51.0).

Fixtures: tests/fixtures/engines/<engine>-<version>/, built by tests/fixtures/engines/build.py from the shapes
the engine sources produce. Each point of the engine-dump contract is run as a user runs it, through
`drpo convert` (exit code, the one-line message naming FILE:LINE and field, no output on refusal), and
through the Python adapters.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import httpx2
import openai
import pyarrow as pa
import pydantic
import pytest
from typer.testing import CliRunner

from drpo_cli.base.errors import InputError
from drpo_cli.cli import app
from drpo_cli.rollouts.adapters import openai_rows, sglang_rows, vllm_rows
from drpo_cli.rollouts.files import open_rollouts
from drpo_cli.rollouts.validate import validate_rollouts

ENGINES = Path(__file__).resolve().parent / "fixtures" / "engines"
VLLM, SGLANG = ENGINES / "vllm-0.33.0", ENGINES / "sglang-0.5.23"
runner = CliRunner()
_spec = importlib.util.spec_from_file_location("engine_fixtures", ENGINES / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


def first(path: Path):
    return json.loads(path.read_text().splitlines()[0])


def jsonl(path: Path, *objs) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def convert(out: Path, *args: str):
    return runner.invoke(app, ["convert", *map(str, args), "--out", str(out)])


def rows_of(out: Path) -> list[dict]:
    return pa.ipc.open_file(str(out)).read_all().to_pylist()


def ok(result, out: Path) -> list[dict]:
    assert result.exit_code == 0, result.output
    assert validate_rollouts(open_rollouts(out)).total == 0
    return rows_of(out)


def refused(result, out: Path, *fragments: str) -> str:
    """Exit 2, one line, every fragment in it, and no output (nor a temporary) left."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists() and not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())
    return lines[0]


def through_client(body: dict, chat: bool):
    """The response as the real openai client returns it (it constructs without validating)."""
    body = {k: v for k, v in body.items() if k != "reward"}
    client = openai.OpenAI(api_key="-", base_url="http://engine/v1", http_client=httpx2.Client(
        transport=httpx2.MockTransport(lambda request: httpx2.Response(200, json=body))))
    if chat:
        return client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}], logprobs=True,
                                              extra_body={"return_token_ids": True})
    return client.completions.create(model="m", prompt=[[1, 2]], logprobs=0, extra_body={"return_token_ids": True})


# ---- 10. the fixtures are the builder's, and the client parses them ------------------------------------------


def test_fixtures_are_what_the_builder_builds():
    built = build.build()
    on_disk = {p for d in (VLLM, SGLANG) for p in d.glob("*.jsonl")}  # llama.cpp's fixtures have their own builder
    assert set(built) == on_disk
    for path, text in built.items():
        assert path.read_text() == text, f"{path} differs from build.py: rerun it"


@pytest.mark.parametrize("path", [VLLM / "openai_completions.jsonl", VLLM / "openai_chat.jsonl",
                                  SGLANG / "openai_completions.jsonl", SGLANG / "openai_chat.jsonl"])
def test_openai_client_objects_give_the_json_rows(path):
    body = first(path)
    chat = body["object"] == "chat.completion"
    parsed = through_client(body, chat)
    assert type(parsed).__module__.startswith("openai.types")
    assert list(openai_rows(parsed, truncated=False)) == list(openai_rows(body, truncated=False))
    if body["choices"][0]["finish_reason"] == "abort":  # what the engines send; the OpenAI schema has no "abort"
        with pytest.raises(pydantic.ValidationError, match="finish_reason"):
            type(parsed).model_validate({k: v for k, v in body.items() if k != "reward"})


# ---- 1. groups: by prompt, never across convert lines; vLLM run prefixes --------------------------------------


def test_openai_completions_with_several_prompts_group_by_prompt(tmp_path):
    body = first(VLLM / "openai_completions.jsonl")
    rows = list(openai_rows(through_client(body, chat=False)))
    assert [r["group_id"] for r in rows] == ["cmpl-9a7e/p0", "cmpl-9a7e/p0", "cmpl-9a7e/p1", "cmpl-9a7e/p1"]
    assert [r["prompt_ids"] for r in rows] == [build.PROMPT_A] * 2 + [build.PROMPT_B] * 2
    assert [r["sample_id"] for r in rows] == [f"cmpl-9a7e/{i}" for i in range(4)]
    src = VLLM / "openai_completions.jsonl"
    out = tmp_path / "o.arrow"
    got = ok(convert(out, src, "--format", "openai", "--logprobs", "processed", "--temperature", "0.7"), out)
    assert [r["group_id"] for r in got] == [f"{src}:1/0"] * 2 + [f"{src}:1/1"] * 2
    one = first(SGLANG / "openai_chat.jsonl")  # one prompt: the response id alone
    assert next(openai_rows(one, truncated=False))["group_id"] == "a81d44"


def test_sglang_lines_never_share_a_group(tmp_path):
    a = build.sglang_item("a", build.PROMPT_A, [500, 2], [-0.75, -0.01])
    b = build.sglang_item("b", build.PROMPT_B, [501, 2], [-0.5, -0.01])
    src = jsonl(tmp_path / "gen.jsonl", {**a, "reward": 1.0}, {**b, "reward": 0.0})
    out = tmp_path / "o.arrow"
    got = ok(convert(out, src, "--format", "sglang", "--logprobs", "processed", "--temperature", "0.7"), out)
    assert [r["group_id"] for r in got] == [f"{src}:1", f"{src}:2"]  # not "0" for both
    # A line that names its group keeps it (samples of one prompt sent as separate requests).
    src2 = jsonl(tmp_path / "gen2.jsonl", {**a, "reward": 1.0, "group_id": "q1"},
                 {**build.sglang_item("other", build.PROMPT_A, [501, 2], [-0.5, -0.01]), "reward": 0.0,
                  "group_id": "q1"})
    out2 = tmp_path / "o2.arrow"
    assert [r["group_id"] for r in ok(convert(out2, src2, "--format", "sglang", "--logprobs", "processed",
                                              "--temperature", "0.7"), out2)] == ["q1", "q1"]


def test_vllm_offline_runs_need_their_own_prefix(tmp_path):
    run_a = VLLM / "request_outputs.jsonl"
    run_b = tmp_path / "run_b.jsonl"
    run_b.write_text(run_a.read_text().splitlines()[0] + "\n")  # a second process: ids count from "0" again
    out = tmp_path / "o.arrow"
    common = ["--format", "vllm", "--logprobs", "processed", "--temperature", "0.7"]
    refused(convert(out, run_a, run_b, *common), out, f"{run_b}:1: field 'sample_id': expected an id not written "
            f"before (it was on {run_a}:1;", "--run-prefix", "found '0/0'")
    got = ok(convert(out, run_a, run_b, *common, "--run-prefix", "a", "--run-prefix", "b"), out)
    assert [r["sample_id"] for r in got] == ["a/0/0", "a/0/1", "a/1/0", "a/1/1", "b/0/0", "b/0/1"]
    assert len({r["group_id"] for r in got}) == 3  # one per line: runs never share a group
    out.unlink()
    refused(convert(out, run_a, run_b, *common, "--run-prefix", "a", "--run-prefix", "b", "--run-prefix", "c"), out,
            "--run-prefix: expected one prefix, or one per input (2), found 3")
    rows = list(vllm_rows(first(run_a), run="a"))
    assert [(r["group_id"], r["sample_id"]) for r in rows] == [("a/0", "a/0/0"), ("a/0", "a/0/1")]


# ---- 2. SGLang /generate list lines carry fields per item -----------------------------------------------------


def test_sglang_list_line_rewards_per_item(tmp_path):
    src = SGLANG / "generate_batch.jsonl"
    out = tmp_path / "o.arrow"
    got = ok(convert(out, src, "--format", "sglang", "--logprobs", "processed", "--temperature", "0.7",
                     "--top-p", "0.9"), out)
    assert [r["reward"] for r in got] == [0.0, 1.0, 0.0, 1.0]
    assert [r["group_id"] for r in got] == [f"{src}:1/0"] * 2 + [f"{src}:1/1"] * 2
    assert [r["sample_id"] for r in got] == ["r00", "r01", "r10", "r11"]
    out.unlink()
    # Items without the engine's prompt ids carry their own prompt_ids: grouped by them.
    bare = []
    for k, item in enumerate(first(src)):
        del item["prompt_token_ids"], item["meta_info"]["input_token_logprobs"]
        bare.append({**item, "prompt_ids": [9, k // 2]})
    given = jsonl(tmp_path / "given.jsonl", bare)
    got = ok(convert(out, given, "--format", "sglang", "--logprobs", "processed", "--temperature", "0.7",
                     "--top-p", "0.9"), out)
    assert [(r["prompt_ids"], r["group_id"]) for r in got] == [([9, 0], f"{given}:1/0")] * 2 + \
        [([9, 1], f"{given}:1/1")] * 2
    out.unlink()
    del bare[3]["prompt_ids"]
    refused(convert(out, jsonl(tmp_path / "g2.jsonl", bare), "--format", "sglang", "--logprobs", "processed",
                    "--temperature", "0.7", "--top-p", "0.9"), out, "field '[3].meta_info.input_token_logprobs'",
            "return_prompt_token_ids=true")
    items = first(src)
    items[1]["behavior_logprobs"] = [-1.0, -1.0]  # a per-token field next to a response: ambiguous
    bad = jsonl(tmp_path / "bad.jsonl", items)
    refused(convert(out, bad, "--format", "sglang", "--logprobs", "processed", "--temperature", "0.7", "--top-p",
                    "0.9"), out, f"{bad}:1: field '[1].behavior_logprobs': expected no such field next to an engine "
            "response")


# ---- 3. SGLang's OpenAI-compatible chat ---------------------------------------------------------------------


def test_sglang_chat_reads_response_token_ids_and_hints_for_sglang(tmp_path):
    body = first(SGLANG / "openai_chat.jsonl")
    (row,) = openai_rows(through_client(body, chat=True), truncated=False)
    assert (row["prompt_ids"], row["response_ids"], row["behavior_logprobs"]) == (build.PROMPT_A, [37, 2],
                                                                                 [-0.25, -0.01])
    del body["choices"][0]["response_token_ids"]
    bad = jsonl(tmp_path / "chat.jsonl", body)
    out = tmp_path / "o.arrow"
    line = refused(convert(out, bad, "--format", "openai", "--logprobs", "processed", "--temperature", "0.7"), out,
                   f"{bad}:1: field 'choices[0].logprobs.content[*].token[0]'",
                   "SGLang: request return_token_ids=true", "choices[i].response_token_ids")
    assert "vLLM" not in line and "return_tokens_as_token_ids" not in line
    del body["choices"][0]["prompt_token_ids"]
    body["choices"][0]["response_token_ids"] = [37, 2]
    refused(convert(out, jsonl(tmp_path / "c2.jsonl", body), "--format", "openai", "--logprobs", "processed",
                    "--temperature", "0.7"), out, "field 'choices[0].prompt_token_ids'", "return_prompt_token_ids=true")


# ---- 4. clamped -inf ----------------------------------------------------------------------------------------


def test_clamped_minus_infinity_is_refused(tmp_path):
    out = tmp_path / "o.arrow"
    src = VLLM / "openai_completions_clamped.jsonl"
    refused(convert(out, src, "--format", "openai", "--logprobs", "processed", "--temperature", "0.7"), out,
            f"{src}:1: field 'choices[0].logprobs.token_logprobs[1]': expected a log-prob > -9999", "found -9999.0")
    src = SGLANG / "generate_clamped.jsonl"
    refused(convert(out, src, "--format", "sglang", "--logprobs", "processed", "--temperature", "0.7"), out,
            f"{src}:1: field 'meta_info.output_token_logprobs[0][0]': expected a log-prob > -9999")
    chat = first(VLLM / "openai_chat.jsonl")
    chat["choices"][0]["logprobs"]["content"][1]["logprob"] = -9999.0  # ChatCompletionLogProb's default
    with pytest.raises(InputError, match=r"content\[1\].logprob': expected a log-prob > -9999"):
        list(openai_rows(chat))


# ---- 5. the truncated μ ------------------------------------------------------------------------------------------


def test_sglang_truncated_sampling_uses_the_sampling_logprobs_or_is_refused(tmp_path):
    out = tmp_path / "o.arrow"
    src = SGLANG / "generate_batch.jsonl"
    got = ok(convert(out, src, "--format", "sglang", "--logprobs", "processed", "--temperature", "0.7",
                     "--top-p", "0.9"), out)
    items = first(src)
    for row, item in zip(got, items):  # output_token_sampling_logprobs, not the pre-truncation output_token_logprobs
        assert row["behavior_logprobs"] == pytest.approx(item["meta_info"]["output_token_sampling_logprobs"], abs=1e-6)
        assert row["behavior_logprobs"] == pytest.approx([t[0] - math.log(0.99) for t in
                                                          item["meta_info"]["output_token_logprobs"]], abs=1e-6)
    out.unlink()
    plain = SGLANG / "generate_no_mask.jsonl"
    for cut in (["--top-p", "0.9"], ["--top-k", "20"], ["--min-p", "0.05"]):
        refused(convert(out, plain, "--format", "sglang", "--logprobs", "processed", "--temperature", "0.7", *cut),
                out, f"{plain}:1: field '[0].meta_info.output_token_sampling_logprobs'", "return_sampling_mask=true")
    refused(convert(out, src, "--format", "sglang", "--logprobs", "raw", "--temperature", "1.0"), out,
            "field '[0].meta_info.output_token_sampling_logprobs'", "pass --logprobs processed")
    # Python: the caller says whether the sampler truncated; unsaid is refused when the sampling log-probs are absent.
    with pytest.raises(InputError, match="truncated=False"):
        list(sglang_rows(first(plain)))
    assert [r["behavior_logprobs"] for r in sglang_rows(first(plain), truncated=False)] == [[-0.75, -0.01],
                                                                                          [-1.5, -0.01]]


def test_sglang_support_mode_picks_the_sampled_token():
    item = copy.deepcopy(first(SGLANG / "generate_batch.jsonl")[0])
    meta = item["meta_info"]
    meta["output_token_sampling_mask"] = [[9, 400, 8], [2]]  # sampling_logprobs_mode="support"
    meta["output_token_sampling_logprobs"] = [[-3.0, -0.125, -2.0], [0.0]]
    assert next(sglang_rows(item))["behavior_logprobs"] == [-0.125, 0.0]
    meta["output_token_sampling_mask"][0] = [9, 8, 7]
    with pytest.raises(InputError, match=r"output_token_sampling_mask\[0\]': expected the kept tokens.*sampled "
                                         r"token 400"):
        list(sglang_rows(item))


def test_vllm_sampling_mask_holds_each_sampled_token(tmp_path):
    dump = first(VLLM / "flat_logprobs.jsonl")
    assert next(vllm_rows(dump))["response_ids"] == [5, 6, 7, 8, 9, 2]
    # Processed log-probs are -inf outside the kept support; a finite listed one there shows raw log-probs.
    raw = copy.deepcopy(dump)
    raw["outputs"][0]["sampling_mask"]["token_ids"][0] = [5]  # token 11 (listed at -1.5) was cut
    src = jsonl(tmp_path / "raw.jsonl", raw)
    out = tmp_path / "o.arrow"
    refused(convert(out, src, "--format", "vllm", "--logprobs", "processed", "--temperature", "0.7", "--top-p",
                    "0.9"), out, f"{src}:1: field 'outputs[0].logprobs[0]': expected processed log-probs (-inf "
            "outside outputs[0].sampling_mask.token_ids[0])", "token 11 outside it at -1.5", "--logprobs raw")
    assert next(vllm_rows(raw))["response_ids"] == [5, 6, 7, 8, 9, 2]  # the caller claimed nothing
    with pytest.raises(InputError, match="these are raw log-probs"):
        list(vllm_rows(raw, processed=True))
    cut = copy.deepcopy(raw)
    cut["outputs"][0]["logprobs"]["logprobs"][1] = float("-inf")  # what processed_logprobs gives token 11
    assert next(vllm_rows(cut, processed=True))["behavior_logprobs"][0] == -0.5
    dump["outputs"][0]["sampling_mask"]["token_ids"][3] = [14]
    bad = jsonl(tmp_path / "mask.jsonl", dump)
    refused(convert(out, bad, "--format", "vllm", "--logprobs", "processed", "--temperature", "0.7", "--top-p",
                    "0.9"), out, f"{bad}:1: field 'outputs[0].sampling_mask.token_ids[3]': expected a support "
            "holding the sampled token 8")


# ---- 6. the raw-logprobs trap ------------------------------------------------------------------------------------


def test_raw_logprobs_holes_are_closed(tmp_path):
    out = tmp_path / "o.arrow"
    src = VLLM / "request_outputs.jsonl"
    vllm = ["--format", "vllm"]
    # T not given: vLLM's server takes it from generation_config.json; unknown T, unknown μ.
    refused(convert(out, src, *vllm, "--logprobs", "raw"), out, "column 'temperature'", "with raw log-probs",
            "generation_config.json")
    refused(convert(out, src, *vllm, "--logprobs", "raw", "--temperature", "1", "--min-p", "0.05"), out,
            "raw log-probs with min_p=0.05", "processed_logprobs")
    ok(convert(out, src, *vllm, "--logprobs", "raw", "--temperature", "1"), out)  # T = 1, no truncation: μ
    out.unlink()
    line = refused(convert(out, src, *vllm, "--logprobs", "raw", "--temperature", "1", "--top-p", "0.9"), out,
                   "raw log-probs with top_p=0.9")
    assert "return_sampling_mask=true" in line and "unset SGLANG_RETURN_ORIGINAL_LOGPROB" not in line
    refused(convert(out, src, *vllm, "--logprobs", "processed_logits"), out,
            "found 'processed_logits'", "logits are not log-probs")
    logits = VLLM / "processed_logits.jsonl"
    refused(convert(out, logits, *vllm, "--logprobs", "processed", "--temperature", "0.7"), out,
            f"{logits}:1: field 'outputs[0].logprobs[0]': expected log-probs", "--logprobs-mode processed_logprobs")
    sgl = SGLANG / "generate_no_mask.jsonl"
    refused(convert(out, sgl, "--format", "sglang", "--temperature", "0.7"), out,
            "--format sglang: pass --logprobs processed or raw", "SGLANG_RETURN_ORIGINAL_LOGPROB")


# ---- 7. dumps that crashed -----------------------------------------------------------------------------------------


def test_flat_logprobs_dump_with_six_tokens(tmp_path):
    src = VLLM / "flat_logprobs.jsonl"
    out = tmp_path / "o.arrow"
    (row,) = ok(convert(out, src, "--format", "vllm", "--logprobs", "processed", "--temperature", "0.7",
                        "--top-p", "0.9"), out)
    assert row["response_ids"] == [5, 6, 7, 8, 9, 2]
    assert row["behavior_logprobs"] == pytest.approx([-0.5, -0.25, -0.125, -1.0, -0.75, -0.01])
    dump = first(src)
    dump["outputs"][0]["logprobs"]["end_indices"][5] = 99
    with pytest.raises(InputError, match=r"logprobs.end_indices\[5\]': expected a range"):
        list(vllm_rows(dump))
    dump["outputs"][0]["logprobs"] = {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6}
    with pytest.raises(InputError, match="FlatLogprobs"):
        list(vllm_rows(dump))


def test_prompt_ids_next_to_an_openai_response_are_used(tmp_path):
    body = first(VLLM / "openai_chat.jsonl")
    del body["prompt_token_ids"]  # a server asked without return_token_ids
    out = tmp_path / "o.arrow"
    src = jsonl(tmp_path / "chat.jsonl", {**body, "prompt_ids": [1, 2, 3]})
    (row,) = ok(convert(out, src, "--format", "openai", "--logprobs", "processed", "--temperature", "0.7"), out)
    assert row["prompt_ids"] == [1, 2, 3]
    clash = jsonl(tmp_path / "clash.jsonl", {**first(VLLM / "openai_chat.jsonl"), "prompt_ids": [1, 2, 3]})
    out.unlink()
    refused(convert(out, clash, "--format", "openai", "--logprobs", "processed", "--temperature", "0.7"), out,
            f"{clash}:1: field 'prompt_ids': expected the ids the engine logged in prompt_token_ids")


def test_include_reasoning_false_is_named(tmp_path):
    src = VLLM / "openai_chat_no_reasoning.jsonl"
    out = tmp_path / "o.arrow"
    refused(convert(out, src, "--format", "openai", "--logprobs", "processed", "--temperature", "0.7"), out,
            f"{src}:1: field 'choices[0].logprobs'", "include_reasoning=false", "include_reasoning=true")


# ---- 8. weight versions -> token_policy_versions ---------------------------------------------------------------


def test_weight_versions_fill_token_policy_versions(tmp_path):
    out = tmp_path / "o.arrow"
    got = ok(convert(out, VLLM / "request_outputs.jsonl", "--format", "vllm", "--logprobs", "processed",
                     "--temperature", "0.7"), out)
    assert [r["token_policy_versions"] for r in got] == [[3, 3, 4], [3, 3, 3], [4, 4], [4, 4]]
    labels = VLLM / "request_outputs_labels.jsonl"
    out.unlink()
    refused(convert(out, labels, "--format", "vllm", "--logprobs", "processed", "--temperature", "0.7"), out,
            f"{labels}:1: field 'outputs[0].weight_versions[0].version'", "--version-map default=N", "found 'default'")
    refused(convert(out, labels, "--format", "vllm", "--logprobs", "processed", "--temperature", "0.7",
                    "--version-map", "default=11"), out, "weight_versions[1].version", "--version-map step-12=N")
    got = ok(convert(out, labels, "--format", "vllm", "--logprobs", "processed", "--temperature", "0.7",
                     "--version-map", "default=11", "--version-map", "step-12=12"), out)
    assert got[0]["token_policy_versions"] == [11, 12]
    out.unlink()
    refused(convert(out, labels, "--format", "vllm", "--logprobs", "processed", "--version-map", "step-12"), out,
            "--version-map: expected LABEL=N with an integer N >= 0, found 'step-12'")
    sgl = ok(convert(out, SGLANG / "generate_batch.jsonl", "--format", "sglang", "--logprobs", "processed",
                     "--temperature", "0.7", "--top-p", "0.9", "--overwrite"), out)
    assert [r["token_policy_versions"] for r in sgl] == [[5, 6]] * 4
    assert next(openai_rows(first(SGLANG / "openai_chat.jsonl"), truncated=False))["token_policy_versions"] == [9, 9]
    assert next(openai_rows(first(VLLM / "openai_completions.jsonl")))["token_policy_versions"] == [7, 7]
    assert next(openai_rows(first(VLLM / "openai_completions.jsonl"), version_map={"7": 70}))[
        "token_policy_versions"] == [70, 70]


def test_unnamed_weights_give_no_versions_and_one_label_covers_a_request():
    # Only the engine's unset label: nothing to record (the default SGLang metadata, a vLLM run never relabelled).
    assert all("token_policy_versions" not in r
               for r in openai_rows(first(SGLANG / "openai_completions.jsonl"), truncated=False))
    dump = first(VLLM / "request_outputs_labels.jsonl")
    dump["outputs"][0]["weight_versions"] = [build.span("default", 0, 2)]
    assert "token_policy_versions" not in next(vllm_rows(dump))
    assert next(vllm_rows(dump, version_map={"default": 0}))["token_policy_versions"] == [0, 0]
    # SGLang without spans: meta_info.weight_version labels the whole request.
    item = build.sglang_item("x", build.PROMPT_A, [500, 2], [-0.75, -0.01], version="8")
    assert next(sglang_rows(item, truncated=False))["token_policy_versions"] == [8, 8]
    item["meta_info"]["weight_version"] = "v8"
    with pytest.raises(InputError, match=r"field 'meta_info.weight_version': expected an integer label .*"
                                         r"version_map=\{'v8': N\}"):
        list(sglang_rows(item, truncated=False))
    # Spans that do not cover the output in order are refused.
    dump["outputs"][0]["weight_versions"] = [build.span("3", 0, 1), build.span("4", 0, 2)]
    with pytest.raises(InputError, match=r"weight_versions\[1\]': expected a span starting at 1"):
        list(vllm_rows(dump))


def test_sglang_metadata_cannot_speak_for_several_choices(tmp_path):
    body = first(SGLANG / "openai_completions.jsonl")
    body["metadata"] = {"weight_version": "9", "weight_versions": [build.span("9", 0, 2)]}
    src = jsonl(tmp_path / "c.jsonl", {**body, "reward": 1.0})
    out = tmp_path / "o.arrow"
    refused(convert(out, src, "--format", "openai", "--logprobs", "processed", "--temperature", "0.7"), out,
            f"{src}:1: field 'metadata.weight_versions': expected each choice's weight versions",
            "return_meta_info=true")
    for i, choice in enumerate(body["choices"]):  # return_meta_info=true: each choice's own meta_info
        choice["meta_info"] = {"weight_version": "9", "weight_versions": [build.span(str(8 + i % 2), 0, 2)]}
    assert [r["token_policy_versions"] for r in openai_rows(body, truncated=False)] == [[8, 8], [9, 9], [8, 8],
                                                                                         [9, 9]]


def test_rows_with_and_without_versions_name_the_fix(tmp_path):
    labelled = first(VLLM / "request_outputs.jsonl")
    unset = copy.deepcopy(labelled)
    for o in unset["outputs"]:
        o["weight_versions"] = [build.span("default", 0, len(o["token_ids"]))]
    unset["request_id"] = "9"
    src = jsonl(tmp_path / "mixed.jsonl", labelled, unset)
    out = tmp_path / "o.arrow"
    refused(convert(out, src, "--format", "vllm", "--logprobs", "processed", "--temperature", "0.7"), out,
            f"{src}:2: fields", "--version-map default=N")


def test_sglang_openai_truncation_needs_the_choice_meta_info(tmp_path):
    out = tmp_path / "o.arrow"
    src = SGLANG / "openai_chat.jsonl"
    refused(convert(out, src, "--format", "openai", "--logprobs", "processed", "--temperature", "0.7", "--top-p",
                    "0.9"), out, f"{src}:1: field 'choices[0].meta_info.output_token_sampling_logprobs'",
            "return_meta_info=true and return_sampling_mask=true")
    body = first(src)  # chat with return_meta_info=true, return_sampling_mask=true (serving_chat.py)
    body["choices"][0]["meta_info"] = {"weight_version": "9", "output_token_sampling_mask": [[37, 38], [2]],
                                       "output_token_sampling_logprobs": [-0.125, 0.0]}
    (row,) = ok(convert(out, jsonl(tmp_path / "c.jsonl", body), "--format", "openai", "--logprobs", "processed",
                        "--temperature", "0.7", "--top-p", "0.9"), out)
    assert row["behavior_logprobs"] == [-0.125, 0.0] and row["token_policy_versions"] == [9, 9]
    # vLLM's processed log-probs are already after truncation: nothing more is needed.
    out.unlink()
    ok(convert(out, VLLM / "openai_chat.jsonl", "--format", "openai", "--logprobs", "processed", "--temperature",
               "0.7", "--top-p", "0.9"), out)
