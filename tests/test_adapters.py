"""Adapters: recorded vLLM / OpenAI-compatible / SGLang responses, and Hugging Face generate live."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TOY_MODEL
from transformers import AutoModelForCausalLM

from drpo_cli import RolloutWriter
from drpo_cli.base.errors import InputError
from drpo_cli.model.batching import plan_micro_batches
from drpo_cli.model.logprobs import token_logprobs
from drpo_cli.rollouts.adapters import hf_rows, openai_rows, sglang_rows, vllm_rows
from drpo_cli.rollouts.rows import load_rows

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOY = TOY_MODEL


def fixture(name: str):
    return json.loads((FIXTURES / name).read_text().splitlines()[0])


def test_vllm_request_output_objects_and_json_dumps():
    dump = fixture("vllm_0.11_request_outputs.jsonl")
    expected = [
        {"prompt_ids": dump["prompt_token_ids"], "response_ids": [216, 37, 2],
         "behavior_logprobs": [-0.0123, -0.6512, -0.05], "group_id": "0", "sample_id": "0/0"},
        {"prompt_ids": dump["prompt_token_ids"], "response_ids": [216, 38], "behavior_logprobs": [-0.0123, -2.0],
         "group_id": "0", "sample_id": "0/1"},  # the sampled token (38, rank 2), not the top one
    ]
    assert list(vllm_rows(dump)) == expected
    # The live objects: RequestOutput / CompletionOutput attributes, {int: Logprob} per position.
    objects = SimpleNamespace(request_id="0", prompt_token_ids=dump["prompt_token_ids"], outputs=[
        SimpleNamespace(index=o["index"], token_ids=o["token_ids"],
                        logprobs=[{int(k): SimpleNamespace(**v) for k, v in pos.items()} for pos in o["logprobs"]])
        for o in dump["outputs"]])
    assert list(vllm_rows([objects])) == expected
    objects.outputs[0].logprobs = None
    with pytest.raises(InputError, match=r"field 'outputs\[0\].logprobs': expected .*SamplingParams\(logprobs=0\)"):
        list(vllm_rows(objects))


def test_openai_completion_and_chat():
    rows = list(openai_rows(fixture("openai_vllm_0.11_completion.jsonl")))
    assert [r["response_ids"] for r in rows] == [[216, 37], [216, 38]]
    assert [r["behavior_logprobs"] for r in rows] == [[-0.0123, -0.6512], [-0.0123, -2.0]]
    assert rows[0]["prompt_ids"] == [1, 1841, 314] and rows[1]["sample_id"] == "cmpl-7f3a/1"
    chat = fixture("openai_vllm_0.11_chat.jsonl")
    (row,) = openai_rows(chat)  # token ids from "token_id:N", prompt ids from the response
    assert row == {"prompt_ids": [1, 9, 8, 7], "response_ids": [37, 2], "behavior_logprobs": [-0.25, -0.01],
                   "group_id": "chatcmpl-91c2", "sample_id": "chatcmpl-91c2/0"}
    chat["choices"][0]["logprobs"]["content"][0]["token"] = "5"
    with pytest.raises(InputError, match=r"field 'choices\[0\].logprobs.content\[\*\].token\[0\]': expected "
                                         r"'token_id:N', or token ids .*return_tokens_as_token_ids=true.*found '5'"):
        list(openai_rows(chat))
    del chat["prompt_token_ids"]
    chat["choices"][0]["token_ids"] = [37, 2]
    with pytest.raises(InputError, match="field 'prompt_token_ids'"):
        list(openai_rows(chat))
    assert next(openai_rows(chat, prompt_ids=[4, 5]))["prompt_ids"] == [4, 5]
    chat["choices"][0]["logprobs"]["content"][1]["logprob"] = 0.3
    with pytest.raises(InputError, match=r"content\[1\].logprob': expected a finite log-prob <= 0, found 0.3"):
        list(openai_rows(chat))


def test_sglang_generate_batch():
    rows = list(sglang_rows(fixture("sglang_0.5_generate.jsonl"), truncated=False))
    # group_id: the first request id of the prompt (unique across calls, unlike a batch index)
    assert [(r["prompt_ids"], r["response_ids"], r["behavior_logprobs"], r["group_id"], r["sample_id"])
            for r in rows] == [([1, 1841, 314], [216, 37], [-0.0123, -0.6512], "a1", "a1"),
                               ([1, 1841, 314], [216, 38], [-0.0123, -2.0], "a1", "a2")]
    single = fixture("sglang_0.5_generate.jsonl")[0]
    del single["meta_info"]["input_token_logprobs"]
    with pytest.raises(InputError, match=r"input_token_logprobs'.*logprob_start_len=0"):
        list(sglang_rows(single, truncated=False))
    assert next(sglang_rows(single, prompt_ids=[7], truncated=False))["prompt_ids"] == [7]


# ---- Hugging Face generate, live on the toy model ------------------------------------------------


@pytest.fixture(scope="module")
def toy():
    return AutoModelForCausalLM.from_pretrained(TOY, dtype=torch.float32).eval()


def _generate(model, seed, **sampling):
    # Two prompts of different lengths, left-padded as a batch for generate.
    input_ids = torch.tensor([[2, 4, 5], [0, 4, 9]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    torch.manual_seed(seed)
    out = model.generate(input_ids, attention_mask=mask, do_sample=True, max_new_tokens=8, num_return_sequences=3,
                         output_logits=True, output_scores=True, return_dict_in_generate=True, pad_token_id=0,
                         eos_token_id=5, **sampling)
    rows = list(hf_rows(out, input_ids, attention_mask=mask, eos_token_id=5, **sampling))
    return out, rows


def test_hf_rows_match_drpos_logprob_engine_at_lag_0(toy, tmp_path):
    _out, rows = _generate(toy, seed=1, temperature=0.7, top_k=0)
    assert len(rows) == 6 and rows[3]["prompt_ids"] == [4, 9] and rows[3]["group_id"] == "1"
    ended = [r for r in rows if 5 in r["response_ids"]]
    assert ended and all(r["response_ids"].index(5) == len(r["response_ids"]) - 1 for r in ended)  # cut after EOS
    assert any(len(r["response_ids"]) < 8 for r in ended)  # generate padded these rows after their EOS
    path = tmp_path / "r.arrow"
    with RolloutWriter(path, temperature=0.7, top_k=0, sampler="transformers") as w:
        for row in rows:
            w.write(**row, reward=1.0)
    loaded = load_rows(path)
    (mb,) = plan_micro_batches(loaded, np.arange(loaded.num_rows), 4096)
    with torch.no_grad():
        logp, _ = token_logprobs(toy, mb)
    engine = np.empty(len(loaded.behavior_logprobs), dtype=np.float32)
    engine[mb.token_index.numpy()] = logp.numpy()
    mu = loaded.behavior_logprobs
    assert np.abs(engine - mu).max() < 1e-5  # the adapter's μ is the trainer's π at lag 0
    assert abs(float((engine - mu).mean())) < 1e-6


def test_hf_rows_reproduce_the_processed_distribution_with_top_k_and_top_p(toy):
    out, rows = _generate(toy, seed=2, temperature=1.3, top_k=6, top_p=0.8)
    response = out.sequences[:, 3:]
    for r, row in enumerate(rows):
        n = len(row["response_ids"])
        # transformers' own processed scores (output_scores) for the sampled tokens.
        ref = [torch.log_softmax(out.scores[t][r].float(), -1)[response[r, t]].item() for t in range(n)]
        assert row["behavior_logprobs"] == pytest.approx(ref, abs=1e-6)
        assert all(np.isfinite(row["behavior_logprobs"]))
    # Without the truncation the same tokens get other (untruncated) log-probs: the processors matter.
    plain = list(hf_rows(out, torch.tensor([[2, 4, 5], [0, 4, 9]]), attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]),
                         temperature=1.3, top_k=0, eos_token_id=5))
    assert any(abs(a - b) > 1e-3 for p, q in zip(plain, rows)
               for a, b in zip(p["behavior_logprobs"], q["behavior_logprobs"]))


def test_hf_rows_needs_logits(toy):
    torch.manual_seed(0)
    out = toy.generate(torch.tensor([[2, 4, 5]]), do_sample=True, max_new_tokens=2, return_dict_in_generate=True,
                       pad_token_id=0)
    with pytest.raises(InputError, match="output_logits=True"):
        list(hf_rows(out, torch.tensor([[2, 4, 5]])))
