"""Streamed responses: a piece of a stream is refused as a response; a whole stream becomes the exact row.

Fixtures: tests/fixtures/engines/<engine>/*_stream*.jsonl, the bytes the engines stream (built from
vLLM's chat_completion_stream_generator / completion_stream_generator and RequestOutputKind.DELTA outputs,
SGLang's /generate stream, llama-server's streamed /completion), each beside the unstreamed response of the
same request (*_whole.jsonl, llama.cpp's post_sampling_eos.json). Every joined stream is checked against
that response's rows, token for token and log-prob for log-prob, through Python and `drpo convert --stream`.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import httpx2
import openai
import pytest
from test_engines import ENGINES, SGLANG, VLLM, build, convert, first, jsonl, ok, refused

from drpo_cli.base.errors import InputError
from drpo_cli.rollouts.adapters import openai_compat, openai_rows, sglang, sglang_rows, vllm, vllm_rows
from drpo_cli.rollouts.adapters.streams import WHOLE_STREAM
from drpo_cli.rollouts.llamacpp import assemble_stream as llamacpp_stream
from drpo_cli.rollouts.llamacpp import llamacpp_server_rows

LLAMA = ENGINES / "llama.cpp-0c1e570"
PROMPT = [1, 9690, 198, 2683, 314, 260]  # llama.cpp-0c1e570/build.py PROMPT
OPENAI = ["--format", "openai", "--logprobs", "processed", "--temperature", "0.7"]
VLLM_FMT = ["--format", "vllm", "--logprobs", "processed", "--temperature", "0.7"]
SGLANG_FMT = ["--format", "sglang", "--logprobs", "processed", "--temperature", "0.7", "--top-p", "0.9"]
TOKENS = ("prompt_ids", "response_ids", "behavior_logprobs", "token_policy_versions", "routed_experts")
_spec = importlib.util.spec_from_file_location("llama_fixtures", LLAMA / "build.py")
llama_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(llama_build)


def sse_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def payloads(path: Path) -> list[dict]:
    """The JSON of each event (what a logger that parses the events writes): `data:` lines, or JSON lines."""
    return [json.loads(x.removeprefix("data: ")) for x in sse_lines(path) if x.strip() and x != "data: [DONE]"]


def messages(output: str) -> list[str]:
    """convert's problems without their FILE:LINE."""
    return [re.sub(r"^(error: \d+ bad lines?; no output written: )?\S+:\d+: ", "", x.strip())
            for x in output.splitlines()]


def with_fields(lines: list[str], last, **fields) -> list[str]:
    """The stream's lines with fields next to each final event (`last(event)`), as JSON lines."""
    out = []
    for x in lines:
        event = json.loads(x[6:]) if x.startswith("data: {") else None
        out.append(json.dumps({**event, **fields}) if event is not None and last(event) else x)
    return out


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def tokens(rows: list[dict]) -> list[dict]:
    """What the rows say of the sampled tokens, by sample."""
    return sorted(({k: r[k] for k in TOKENS if k in r} | {"sample_id": r.get("sample_id")} for r in rows),
                  key=lambda r: str(r["sample_id"]))


def client_stream(path: Path, chat: bool):
    """The stream as the real openai client yields it (ChatCompletionChunk / Completion objects)."""
    body = path.read_bytes()
    client = openai.OpenAI(api_key="-", base_url="http://engine/v1", http_client=httpx2.Client(
        transport=httpx2.MockTransport(lambda request: httpx2.Response(
            200, headers={"content-type": "text/event-stream"}, content=body))))
    if chat:
        return client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}], logprobs=True,
                                              top_logprobs=2, stream=True, extra_body={"return_token_ids": True})
    return client.completions.create(model="m", prompt=[[1, 2]], logprobs=0, stream=True,
                                     extra_body={"return_token_ids": True})


def final_openai(event: dict) -> bool:
    return any(c.get("finish_reason") for c in event.get("choices", []))


# ---- the fixtures are the builders' ------------------------------------------------------------------------


def test_llamacpp_stream_fixtures_are_what_the_builder_builds():
    whole = json.loads((LLAMA / "post_sampling_eos.json").read_text())
    assert sse_lines(LLAMA / "stream_post_sampling_eos.jsonl") == llama_build.stream(whole)
    assert sse_lines(LLAMA / "stream_utf8_gap.jsonl") == llama_build.stream(whole, skip=2)


# ---- a whole stream is the unstreamed row: Python ------------------------------------------------------------


@pytest.mark.parametrize("name,chat", [("openai_chat", True), ("openai_completions", False)])
def test_openai_client_stream_assembles_to_the_unstreamed_rows(name, chat):
    whole = list(openai_rows(first(VLLM / f"{name}_whole.jsonl")))
    streamed = [row for response in openai_compat.assemble_stream(client_stream(VLLM / f"{name}_stream.jsonl", chat))
                for row in openai_rows(response)]
    assert streamed == whole  # ids, log-probs, versions, and the groups: by prompt within the response
    assert [r["group_id"] for r in whole] == (["chatcmpl-5e1f"] if chat else ["cmpl-3c9d/p0", "cmpl-3c9d/p1"])
    # the SSE lines and the events' JSON (no [DONE]: the end of the events ends the response) give the same
    for events in (sse_lines(VLLM / f"{name}_stream.jsonl"), payloads(VLLM / f"{name}_stream.jsonl")):
        assert [row for r in openai_compat.assemble_stream(events) for row in openai_rows(r)] == whole


def test_vllm_delta_outputs_assemble_to_the_final_only_rows():
    whole = list(vllm_rows(first(VLLM / "request_outputs_delta_whole.jsonl"), processed=True))
    streamed = [row for r in vllm.assemble_stream(sse_lines(VLLM / "request_outputs_delta_stream.jsonl"))
                for row in vllm_rows(r, processed=True)]
    assert tokens(streamed) == tokens(whole) and len(whole) == 2
    assert sorted(streamed, key=lambda r: r["sample_id"]) == whole  # group req-17, samples req-17/0, req-17/1
    assert whole[0]["token_policy_versions"] == [3, 4, 4, 4] and len(whole[0]["routed_experts"]) == 4 + 4 - 1


@pytest.mark.parametrize("mode", ["incremental", "cumulative"])
def test_sglang_generate_stream_assembles_to_the_unstreamed_rows(mode):
    whole = list(sglang_rows(first(SGLANG / "generate_stream_whole.jsonl")))
    items = list(sglang.assemble_stream(sse_lines(SGLANG / f"generate_stream_{mode}.jsonl")))
    assert [item["index"] for item in items] == [1, 0]  # in the order the requests ended
    assert list(sglang_rows(sorted(items, key=lambda x: x["index"]))) == whole  # one request's items: one group
    assert [r["behavior_logprobs"] for r in whole] == [
        pytest.approx([-0.5 + 0.01005, -0.25 + 0.01005, -1.0 + 0.01005, -0.02 + 0.01005], abs=1e-5),
        pytest.approx([-1.5 + 0.01005, -0.02 + 0.01005], abs=1e-5)]  # output_token_sampling_logprobs
    assert whole[0]["token_policy_versions"] == [5, 6, 6, 6]


def test_llamacpp_stream_assembles_to_the_unstreamed_row():
    whole = list(llamacpp_server_rows(json.loads((LLAMA / "post_sampling_eos.json").read_text()), PROMPT))
    (result,) = llamacpp_stream(sse_lines(LLAMA / "stream_post_sampling_eos.jsonl"))
    assert list(llamacpp_server_rows(result, PROMPT)) == whole


def test_an_unfinished_stream_is_refused_naming_it():
    lines = [x for x in sse_lines(VLLM / "openai_chat_stream.jsonl") if '"finish_reason":"stop"' not in x]
    with pytest.raises(InputError, match=r"^stream 'chatcmpl-5e1f' choice 0: expected its final chunk \(finish_reason "
                                         r"set\), found none \(the events end first: an incomplete stream\)$"):
        list(openai_compat.assemble_stream(lines))
    outputs = payloads(VLLM / "request_outputs_delta_stream.jsonl")[:-1]
    with pytest.raises(InputError, match=r"^request 'req-17' output 0: expected its final output"):
        list(vllm.assemble_stream(outputs))


# ---- a piece is refused as a response, by what it says of itself ------------------------------------------------


def test_a_chat_stream_chunk_is_refused_never_a_one_token_row():
    # Looping openai_rows over the client's stream: every chunk is refused, none becomes a 1-token row.
    chunks = list(client_stream(VLLM / "openai_chat_stream.jsonl", chat=True))
    assert len(chunks) == 6  # role, 4 tokens, usage
    for chunk in chunks:
        with pytest.raises(InputError) as err:
            list(openai_rows(chunk, build.PROMPT_A))
        assert err.value.message == (
            "field 'object': expected a whole response ('chat.completion'), found 'chat.completion.chunk': one "
            f"chunk of a streamed response: {WHOLE_STREAM}")
    usage = payloads(VLLM / "openai_completions_stream.jsonl")[-1]  # completions' usage chunk: object text_completion
    with pytest.raises(InputError, match=r"field 'choices': expected a non-empty list, found \[\] next to a usage: "
                                         r"the usage chunk that ends a stream: pass the whole stream"):
        list(openai_rows(usage))
    chunk = payloads(VLLM / "openai_chat_stream.jsonl")[2]
    del chunk["object"]  # a dump that dropped it: the delta still shows
    with pytest.raises(InputError, match=r"field 'choices\[0\].delta': expected a message \(a whole chat response\), "
                                         r"found a delta: one chunk of a streamed response: pass the whole stream"):
        list(openai_rows(chunk, build.PROMPT_A))


def test_a_completions_stream_chunk_is_refused():
    events = payloads(VLLM / "openai_completions_stream.jsonl")
    with pytest.raises(InputError) as err:
        list(openai_rows(events[0]))
    assert err.value.message == ("field 'choices[0].finish_reason': expected why the choice ended (stop, length, ...), "
                                 f"found null: a chunk sent before its choice ended: {WHOLE_STREAM}")
    last = copy.deepcopy(events[3])  # B's final chunk: finish_reason set, but its text starts past the response's
    del last["usage"]
    with pytest.raises(InputError) as err:
        list(openai_rows(last))
    assert err.value.message == ("field 'choices[0].logprobs.text_offset[0]': expected 0 (a response's first token "
                                 "starts its text), found 5: a chunk from inside a streamed completion: "
                                 f"{WHOLE_STREAM}")
    sglang_like = {**last, "choices": [{**last["choices"][0], "logprobs": {**last["choices"][0]["logprobs"],
                                                                          "text_offset": [-1]}}]}
    sglang_like["usage"] = {"prompt_tokens": 3, "total_tokens": 5, "completion_tokens": 2}  # continuous usage
    with pytest.raises(InputError, match=r"field 'usage.completion_tokens': expected at most 1 \(the tokens of the "
                                         r"response's choices\), found 2: the choices hold only some"):
        list(openai_rows(sglang_like))


def test_an_echoed_completion_is_refused_as_echo():
    body = first(VLLM / "openai_completions_whole.jsonl")
    choice = body["choices"][0]  # echo=true (request_output_to_completion_response): prompt + output, prompt first
    choice["token_ids"] = choice["prompt_token_ids"] + choice["token_ids"]
    n = len(choice["prompt_token_ids"])
    choice["logprobs"]["token_logprobs"] = [None] + [-1.0] * (n - 1) + choice["logprobs"]["token_logprobs"]
    choice["logprobs"]["tokens"] = ["p"] * n + choice["logprobs"]["tokens"]
    choice["logprobs"]["text_offset"] = list(range(n)) + [n + x for x in choice["logprobs"]["text_offset"]]
    choice["logprobs"]["top_logprobs"] = [None] * n + choice["logprobs"]["top_logprobs"]
    with pytest.raises(InputError) as err:
        list(openai_rows(body))
    assert err.value.message == ("field 'choices[0].logprobs.token_logprobs[0]': expected the log-prob of the "
                                 "response's first token, found null: the choice echoes the prompt (echo=true: a "
                                 "prompt's first token has no log-prob, and its tokens are not the response's): "
                                 "request echo=false")


def test_a_vllm_delta_output_is_refused():
    outputs = payloads(VLLM / "request_outputs_delta_stream.jsonl")
    with pytest.raises(InputError) as err:
        list(vllm_rows(outputs[2]))
    assert err.value.message == ("field 'finished': expected a finished request (true), found false: an output "
                                 "streamed before the request ended (one RequestOutputKind.DELTA piece, or a "
                                 f"CUMULATIVE output: only its last is whole): {WHOLE_STREAM}")
    middle = copy.deepcopy(outputs[2])
    del middle["finished"]  # a dump of the CompletionOutputs alone
    with pytest.raises(InputError, match=r"field 'outputs\[0\].finish_reason': expected why the output ended .*found "
                                         r"null: an output streamed before it ended: pass the whole stream"):
        list(vllm_rows(middle))
    final = copy.deepcopy(outputs[-1])  # child 0's last piece: finished, spans over all 4 tokens, 1 token here
    final["outputs"][0]["weight_versions"] = final["outputs"][0]["routed_experts"] = None  # as older dumps have
    with pytest.raises(InputError) as err:
        list(vllm_rows(final))
    assert err.value.message == ("field 'outputs[0].cumulative_logprob': expected the sum of the output's log-probs "
                                 "(-0.05), found -2.2135: the output holds only the last tokens of a "
                                 f"RequestOutputKind.DELTA stream: {WHOLE_STREAM}")


def test_an_sglang_stream_piece_is_refused():
    pieces = payloads(SGLANG / "generate_stream_incremental.jsonl")
    with pytest.raises(InputError) as err:
        list(sglang_rows(pieces[2]))  # request 0's second piece: 2 new ids of 3 so far
    assert err.value.message == ("field 'meta_info.finish_reason': expected why the request ended ({type: stop | "
                                 "length | abort}), found null: one piece of an incremental stream "
                                 f"(--incremental-streaming-output: 3 tokens so far, 2 here): {WHOLE_STREAM}")
    final = copy.deepcopy(pieces[4])
    del final["meta_info"]["weight_versions"]  # without spans, as older dumps have: the counts still show
    with pytest.raises(InputError) as err:
        list(sglang_rows(final))
    assert err.value.message == ("field 'meta_info.completion_tokens': expected 1 (one per output id), found 4: the "
                                 "last piece of an incremental stream (--incremental-streaming-output: 4 tokens so "
                                 f"far, 1 here): {WHOLE_STREAM}")
    cumulative = payloads(SGLANG / "generate_stream_cumulative.jsonl")
    with pytest.raises(InputError, match=r"found null: an output streamed before the request ended \(each holds every "
                                         r"token so far: only the last is whole\): pass the whole stream"):
        list(sglang_rows(cumulative[2]))
    assert list(sglang_rows(cumulative[4])) == list(sglang_rows(first(SGLANG / "generate_stream_whole.jsonl")[0]))


def test_a_llamacpp_stream_event_is_refused():
    events = payloads(LLAMA / "stream_post_sampling_eos.jsonl")
    with pytest.raises(InputError) as err:
        list(llamacpp_server_rows(events[0], PROMPT))
    assert err.value.message == ("field 'stop': expected a finished result (true), found false: the event of one "
                                 f"token of a streamed answer (\"stream\": true): {WHOLE_STREAM}")
    with pytest.raises(InputError) as err:
        list(llamacpp_server_rows(events[-1], PROMPT))
    assert err.value.message == ("field 'generation_settings.stream': expected false (an unstreamed result), found "
                                 "true: the final event of a streamed answer, which carries no tokens or "
                                 f"probabilities: {WHOLE_STREAM}")
    with pytest.raises(InputError) as err:
        list(llamacpp_stream(sse_lines(LLAMA / "stream_utf8_gap.jsonl")))
    assert err.value.message == ("field 'tokens_predicted': expected 3 (the tokens streamed so far), found 4: "
                                 "llama-server sends no event for a token that ends inside a UTF-8 character "
                                 "(sample such text with llamacpp_sample), or events are missing from the log")


# ---- a whole stream is the unstreamed row: drpo convert --stream ------------------------------------------------


def test_convert_stream_openai_rows_equal_the_unstreamed_ones(tmp_path):
    for name in ("openai_chat", "openai_completions"):
        out, whole_out = tmp_path / f"{name}.arrow", tmp_path / f"{name}_whole.arrow"
        # raw SSE lines, the final events logged as JSON with a reward next to them
        src = write(tmp_path / f"{name}.jsonl", with_fields(sse_lines(VLLM / f"{name}_stream.jsonl"), final_openai,
                                                           reward=1.0))
        streamed = ok(convert(out, src, *OPENAI, "--stream"), out)
        whole = ok(convert(whole_out, jsonl(tmp_path / f"{name}_w.jsonl", {**first(VLLM / f"{name}_whole.jsonl"),
                                                                           "reward": 1.0}), *OPENAI), whole_out)
        assert tokens(streamed) == tokens(whole)
    # groups: FILE:LINE of the response's first event, /K for its K-th other prompt in the order its choices end
    assert [(r["sample_id"], r["group_id"]) for r in streamed] == [("cmpl-3c9d/1", f"{src}:1"),
                                                                 ("cmpl-3c9d/0", f"{src}:1/1")]


def test_convert_stream_vllm_sglang_llamacpp(tmp_path):
    lines = payloads(VLLM / "request_outputs_delta_stream.jsonl")  # one RequestOutput per line
    lines[-1]["reward"], lines[3]["reward"] = 1.0, 0.0  # next to each output's final piece
    src, out = jsonl(tmp_path / "delta.jsonl", *lines), tmp_path / "delta.arrow"
    got = ok(convert(out, src, *VLLM_FMT, "--run-prefix", "a", "--stream"), out)
    whole = {**first(VLLM / "request_outputs_delta_whole.jsonl"), "reward": 1.0}
    want = ok(convert(tmp_path / "w.arrow", jsonl(tmp_path / "w.jsonl", whole), *VLLM_FMT, "--run-prefix", "a"),
              tmp_path / "w.arrow")
    assert tokens(got) == tokens(want) and [r["sample_id"] for r in got] == ["a/req-17/1", "a/req-17/0"]
    assert {r["group_id"] for r in got} == {f"{src}:1"} and [r["reward"] for r in got] == [0.0, 1.0]
    whole = jsonl(tmp_path / "gen_whole.jsonl", [{**item, "reward": 1.0}
                                                 for item in first(SGLANG / "generate_stream_whole.jsonl")])
    want = ok(convert(tmp_path / "gw.arrow", whole, *SGLANG_FMT), tmp_path / "gw.arrow")
    for mode in ("incremental", "cumulative"):
        out = tmp_path / f"{mode}.arrow"
        src = write(tmp_path / f"{mode}.jsonl", with_fields(sse_lines(SGLANG / f"generate_stream_{mode}.jsonl"),
                                                            lambda e: e["meta_info"]["finish_reason"], reward=1.0))
        got = ok(convert(out, src, *SGLANG_FMT, "--stream"), out)
        assert tokens(got) == tokens(want)
        assert [r["group_id"] for r in got] == [f"{src}:3", f"{src}:1"]  # one group per SGLang request (own id)
    src = write(tmp_path / "llama.jsonl", with_fields(sse_lines(LLAMA / "stream_post_sampling_eos.jsonl"),
                                                      lambda e: e["stop"], reward=1.0, prompt_ids=PROMPT))
    (row,) = ok(convert(tmp_path / "l.arrow", src, "--format", "llamacpp", "--stream"), tmp_path / "l.arrow")
    whole = {**json.loads((LLAMA / "post_sampling_eos.json").read_text()), "reward": 1.0, "prompt_ids": PROMPT}
    (want,) = ok(convert(tmp_path / "lw.arrow", jsonl(tmp_path / "lw.jsonl", whole), "--format", "llamacpp"),
                 tmp_path / "lw.arrow")
    assert {**row, "group_id": None} == {**want, "group_id": None} and row["group_id"] == f"{src}:1"


# ---- drpo convert: refusals with the fix, exit 2, no output -------------------------------------------------------


def test_convert_refuses_stream_lines_without_stream(tmp_path):
    out = tmp_path / "o.arrow"
    src = write(tmp_path / "chat.jsonl", sse_lines(VLLM / "openai_chat_stream.jsonl"))
    result = convert(out, src, *OPENAI)
    assert result.exit_code == 2 and not out.exists()
    assert result.output.splitlines()[0] == (
        f"error: 7 bad lines; no output written: {src}:1: expected a JSON object, found an SSE line ('data: ...'), "
        "one event of a streamed response: pass --stream with the engine's --format; see docs/rollouts.md")
    # the events' JSON, each line carrying the prompt ids: every chunk refused as a chunk
    lines = [{**e, "prompt_ids": build.PROMPT_A, "reward": 1.0} for e in payloads(VLLM / "openai_chat_stream.jsonl")]
    result = convert(out, jsonl(tmp_path / "c.jsonl", *lines[:-1]), *OPENAI)
    assert result.exit_code == 2 and not out.exists()
    assert messages(result.output) == [("field 'object': expected a whole response ('chat.completion'), found "
                                        f"'chat.completion.chunk': one chunk of a streamed response: {WHOLE_STREAM}")] * 5
    src = write(tmp_path / "gen.jsonl", with_fields(sse_lines(SGLANG / "generate_stream_incremental.jsonl"),
                                                    lambda e: True, reward=1.0))
    result = convert(out, src, *SGLANG_FMT)  # not the repeated-sample-id check: the pieces are named as pieces
    assert result.exit_code == 2 and "sample_id" not in result.output and result.output.count(WHOLE_STREAM) == 5


def test_convert_stream_refusals(tmp_path):
    out = tmp_path / "o.arrow"
    chat = with_fields(sse_lines(VLLM / "openai_chat_stream.jsonl"), final_openai, reward=1.0)
    cut = write(tmp_path / "cut.jsonl", [x for x in chat if '"finish_reason": "stop"' not in x])
    refused(convert(out, cut, *OPENAI, "--stream"), out, f"{cut}:1: stream 'chatcmpl-5e1f' choice 0: expected its "
            "final chunk (finish_reason set), found none (the events end first: an incomplete stream)")
    gap = write(tmp_path / "gap.jsonl", sse_lines(VLLM / "openai_completions_stream.jsonl")[:4] +
                sse_lines(VLLM / "openai_completions_stream.jsonl")[6:])  # A's second token lost
    line = refused(convert(out, gap, *OPENAI, "--stream"), out,
                   f"{gap}:7: field 'choices[0].logprobs.text_offset[0]': expected 5 (where the stream's previous "
                   "chunk ended), found 10: chunks of this stream are missing from the log, or out of order")
    assert "stream 'cmpl-3c9d' choice 0: expected its final chunk" not in line  # one problem per broken stream
    refused(convert(out, cut, "--stream"), out, "--stream: expected an engine --format (vllm, openai, sglang, "
            "llamacpp), found jsonl")
    events = payloads(VLLM / "openai_chat_stream.jsonl")
    events[1]["reward"], events[4]["reward"] = 1.0, 0.0  # two rewards for one choice
    twice = jsonl(tmp_path / "twice.jsonl", *events)
    refused(convert(out, twice, *OPENAI, "--stream"), out, f"{twice}:5: field 'reward': expected the value given "
            "earlier for this stream (1.0), found 0.0")
    gen = write(tmp_path / "gen.jsonl", with_fields(sse_lines(SGLANG / "generate_stream_incremental.jsonl"),
                                                    lambda e: e["meta_info"]["finish_reason"], reward=1.0))
    dropped = write(tmp_path / "dropped.jsonl", [x for i, x in enumerate(sse_lines(gen)) if i != 4])
    refused(convert(out, dropped, *SGLANG_FMT, "--stream"), out, f"{dropped}:8: field 'meta_info.completion_tokens': "
            "expected 2 (incremental: 1 ids so far + 1 here) or 1 (cumulative: these ids, starting with those so "
            "far), found 4: pieces of this stream are missing from the log, or out of order")


def test_convert_same_response_twice_is_not_told_to_use_run_prefix(tmp_path):
    out = tmp_path / "o.arrow"
    body = {**first(VLLM / "openai_chat_whole.jsonl"), "reward": 1.0}
    src = jsonl(tmp_path / "twice.jsonl", body, body)
    line = refused(convert(out, src, *OPENAI), out, f"{src}:2: field 'sample_id': expected an id not written before "
                   f"(it was on {src}:1; in this same input: one response logged twice, or lines of one streamed "
                   "response (pass --stream; see docs/rollouts.md)), found 'chatcmpl-5e1f/0'")
    assert "--run-prefix" not in line
    one, other = jsonl(tmp_path / "one.jsonl", body), jsonl(tmp_path / "other.jsonl", body)
    refused(convert(out, one, other, *OPENAI), out, f"{other}:1: field 'sample_id': expected an id not written before "
            f"(it was on {one}:1; engine ids repeat across runs: give each input its own --run-prefix)")


def test_streams_that_cannot_be_joined_say_why():
    # SGLang's chat stream (serving_chat.py: ChatCompletionResponseStreamChoice, matched_stop serialized) has no ids
    chunk = {"id": "a81d44", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [
        {"index": 0, "delta": {"role": None, "content": "5", "reasoning_content": None},
         "logprobs": {"content": [{"token": "5", "bytes": [53], "logprob": -0.25, "top_logprobs": []}]},
         "finish_reason": None, "matched_stop": None}], "usage": None}
    with pytest.raises(InputError) as err:
        list(openai_compat.assemble_stream([chunk]))
    assert err.value.message == (
        "field 'choices[0].logprobs': expected token ids next to the streamed tokens, found none: SGLang's chat stream "
        "carries no token ids (it refuses return_token_ids with stream=true): stream /v1/completions with "
        "return_token_ids=true, or /generate, or ask chat unstreamed")
    # vLLM's error event (create_streaming_error_response) ends a stream that will never finish
    error = {"error": {"message": "The engine died", "type": "InternalServerError", "param": None, "code": 500}}
    with pytest.raises(InputError, match=r"^field 'error': expected a stream chunk, found the server's error event "
                                         r"\('The engine died'\): the request failed and its stream broke off: drop "
                                         r"its events$"):
        list(openai_compat.assemble_stream([payloads(VLLM / "openai_chat_stream.jsonl")[0], error]))
    # RequestOutputKind.CUMULATIVE outputs (each holds every token so far) are not DELTA pieces
    whole = first(VLLM / "request_outputs_delta_whole.jsonl")
    steps = []
    for stop in (1, 3):
        out = copy.deepcopy(whole["outputs"][0])
        ids, positions = out["token_ids"][:stop], out["logprobs"][:stop]
        out.update(token_ids=ids, logprobs=positions, finish_reason=None, sampling_mask=None, routed_experts=None,
                   cumulative_logprob=sum(p[str(t)]["logprob"] for p, t in zip(positions, ids)), weight_versions=None)
        steps.append({**whole, "outputs": [out], "finished": False})
    with pytest.raises(InputError) as err:
        list(vllm.assemble_stream(steps))
    assert err.value.message == (
        "field 'outputs[0].cumulative_logprob': expected the sum of the log-probs streamed so far (-2.1758), found "
        "-2.1635, the sum of this output's alone: a RequestOutputKind.CUMULATIVE stream (each output holds every "
        "token so far): its final output is the whole response: convert it alone, without --stream")
