"""llama.cpp in: llama-server /completion responses (fixtures in the shapes of llama.cpp 0c1e57098),
`drpo convert --format llamacpp`, and the llama-cpp-python sampler's math against a fake engine.
The real engine on a GGUF model is tested under the `llamacpp` marker (tests/test_llamacpp_real.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from drpo_cli.base.errors import ConfigError, InputError
from drpo_cli.cli import app
from drpo_cli.rollouts.files import open_rollouts
from drpo_cli.rollouts.llamacpp import llamacpp_sample, llamacpp_server_rows, processed_logprobs
from drpo_cli.rollouts.validate import validate_rollouts

HERE = Path(__file__).resolve().parent / "fixtures" / "engines" / "llama.cpp-0c1e570"
PROMPT, PROMPT_2 = [1, 9690, 198, 2683, 314, 260], [1, 9690, 198, 504, 30]
runner = CliRunner()


def fixture(name: str):
    return json.loads((HERE / f"{name}.json").read_text())


# ---- llama-server /completion ---------------------------------------------------------------------------


def test_post_sampling_probs_with_eos():
    res = fixture("post_sampling_eos")
    (row,) = llamacpp_server_rows(res, PROMPT)
    assert row["prompt_ids"] == PROMPT
    assert row["response_ids"] == res["tokens"] and row["response_ids"][-1] == 2  # EOS kept
    assert res["stop_type"] == "eos"
    assert row["behavior_logprobs"] == [math.log(e["prob"]) for e in res["completion_probabilities"]]
    assert row["temperature"] == 0.7
    assert "sample_id" not in row and row["group_id"].startswith("prompt-")


def test_post_sampling_probs_are_those_of_the_truncated_tempered_chain():
    """With the server's default chain (top_k 40, top_p 0.95, min_p 0.05, T 0.8) the logged p is after it."""
    res = fixture("post_sampling_truncated_limit")
    (row,) = llamacpp_server_rows(res, PROMPT)
    assert len(row["response_ids"]) == 8 and res["stop_type"] == "limit"
    assert row["temperature"] == 0.8
    np.testing.assert_allclose(np.exp(row["behavior_logprobs"]), [e["prob"] for e in res["completion_probabilities"]])


def test_pre_sampling_logprobs_accepted_only_when_the_chain_is_the_identity():
    res = fixture("pre_sampling_identity")
    (row,) = llamacpp_server_rows(res, PROMPT)
    assert row["behavior_logprobs"] == [e["logprob"] for e in res["completion_probabilities"]]
    assert row["temperature"] == 1.0
    with pytest.raises(InputError) as err:
        list(llamacpp_server_rows(fixture("pre_sampling_defaults"), PROMPT))
    assert err.value.message == (
        "field 'completion_probabilities[0].logprob': expected log-probs of the sampled distribution, but "
        "pre-sampling log-probs are of the raw T=1 logits and temperature 0.8 (needs 1), top_k 40 (needs 0), "
        "top_p 0.95 (needs 1), min_p 0.05 (needs 0) change it: request post_sampling_probs: true (the "
        "probabilities after the sampler chain), found pre-sampling log-probs")
    # A sampler left out of the chain does not change the distribution, whatever its setting.
    res = fixture("pre_sampling_defaults")
    res["generation_settings"]["samplers"] = ["penalties"]
    (row,) = llamacpp_server_rows(res, PROMPT)
    assert row["temperature"] == 1.0  # no temperature sampler: T = 1
    res["generation_settings"]["logit_bias"] = [{"bias": -1.0, "token": 5}]
    with pytest.raises(InputError, match="logit_bias"):
        list(llamacpp_server_rows(res, PROMPT))


@pytest.mark.parametrize(("name", "message"), [
    ("no_return_tokens", ("field 'tokens': expected the sampled token ids (request return_tokens: true), "
                         "found an empty list")),
    ("utf8_gap", "field 'completion_probabilities[2].id': expected tokens[2] = "),
    ("speculative_placeholder", "field 'generation_settings.speculative.types': expected none "),
    ("grammar", "field 'generation_settings.grammar': expected no grammar "),
])
def test_refusals(name, message):
    with pytest.raises(InputError) as err:
        list(llamacpp_server_rows(fixture(name), PROMPT))
    assert err.value.message.startswith(message)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: r.pop("completion_probabilities"), ("field 'completion_probabilities': expected one entry per "
                                                  "sampled token (request n_probs: 1")),
    (lambda r: r.pop("generation_settings"), "field 'generation_settings': expected the sampling settings"),
    (lambda r: r["generation_settings"].update(temperature=0.0), ("field 'generation_settings.temperature': "
                                                                 "expected a temperature > 0")),
    (lambda r: r["generation_settings"].update(xtc_probability=0.5), "field 'generation_settings.xtc_probability'"),
    (lambda r: r["generation_settings"].update(mirostat=2), "field 'generation_settings.mirostat'"),
    (lambda r: r["generation_settings"].update(stream=True), "field 'generation_settings.stream': expected false"),
    (lambda r: r["generation_settings"].update(dynatemp_range=0.5), "field 'generation_settings.dynatemp_range'"),
    (lambda r: r["generation_settings"].update(backend_sampling=True), "field 'generation_settings.backend_sampling'"),
    (lambda r: r["completion_probabilities"][1].update(prob=0.0), ("field 'completion_probabilities[1].prob': "
                                                                  "expected a probability in (0, 1], found 0.0")),
    (lambda r: r["completion_probabilities"][1].update(top_probs=[]), "field 'completion_probabilities[1].top_probs'"),
    (lambda r: r["completion_probabilities"].pop(), ("field 'completion_probabilities': expected 5 entries (one per "
                                                    "token; stop_type 'eos'), found 4")),
    (lambda r: r.update(tokens_evaluated=7), "field 'tokens_evaluated': expected 6 (the prompt ids' length"),
])
def test_malformed_results(edit, message):
    res = fixture("post_sampling_eos")
    edit(res)
    with pytest.raises(InputError) as err:
        list(llamacpp_server_rows(res, PROMPT))
    assert err.value.message.startswith(message), err.value.message


def test_stop_word_row_ends_before_the_stop_string():
    res = fixture("stop_word")
    (row,) = llamacpp_server_rows(res, PROMPT)
    assert len(res["tokens"]) == 6 and len(res["completion_probabilities"]) == 4
    assert row["response_ids"] == res["tokens"][:4]
    assert len(row["behavior_logprobs"]) == 4


def test_array_of_prompts_times_n_cmpl():
    res = fixture("two_prompts_n_cmpl_2")
    rows = list(llamacpp_server_rows(res, [PROMPT, PROMPT_2], request_id="req-7"))
    assert [r["prompt_ids"] for r in rows] == [PROMPT, PROMPT, PROMPT_2, PROMPT_2]
    assert [r["group_id"] for r in rows] == ["req-7/0", "req-7/0", "req-7/1", "req-7/1"]
    assert [r["sample_id"] for r in rows] == ["req-7/0", "req-7/1", "req-7/2", "req-7/3"]
    assert [r["response_ids"] for r in rows] == [r["tokens"] for r in res]
    hashed = list(llamacpp_server_rows(res, [PROMPT, PROMPT_2]))
    assert hashed[0]["group_id"] == hashed[1]["group_id"] != hashed[2]["group_id"] == hashed[3]["group_id"]
    with pytest.raises(InputError, match=r"field '\[2\].tokens_evaluated': expected 6"):
        list(llamacpp_server_rows(res, PROMPT))  # one prompt for all four: the second prompt is shorter
    with pytest.raises(InputError, match="field 'prompt_ids': expected one list per prompt"):
        list(llamacpp_server_rows(res, [PROMPT, PROMPT_2, PROMPT]))


# ---- drpo convert --format llamacpp ------------------------------------------------------------------


def test_convert_llamacpp(tmp_path):
    out = tmp_path / "out.arrow"
    result = runner.invoke(app, ["convert", str(HERE / "completions.jsonl"), "--out", str(out),
                                 "--format", "llamacpp", "--sampler", "llama-server 0c1e570"])
    assert result.exit_code == 0, result.output
    assert "3 rows from 3 lines" in result.output
    source = open_rollouts(out)
    assert validate_rollouts(source).total == 0
    table = pa.ipc.open_file(str(out)).read_all()
    lines = [json.loads(x) for x in (HERE / "completions.jsonl").read_text().splitlines()]
    assert table.column("response_ids").to_pylist() == [x["tokens"] for x in lines]
    np.testing.assert_allclose(table.column("temperature").to_pylist(), [0.7, 0.8, 1.0], rtol=1e-7)  # float32
    assert table.column("reward").to_pylist() == [1.0, 1.0, 1.0]
    np.testing.assert_allclose(table.column("behavior_logprobs").to_pylist()[0],
                               [math.log(e["prob"]) for e in lines[0]["completion_probabilities"]])


def test_convert_llamacpp_array_line(tmp_path):
    """One line holding the array of a request's results (two prompts x n_cmpl 2), each with its prompt ids."""
    results = fixture("two_prompts_n_cmpl_2")
    line = [{**r, "prompt_ids": PROMPT if i < 2 else PROMPT_2, "reward": float(i)} for i, r in enumerate(results)]
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(line) + "\n")
    out = tmp_path / "out.arrow"
    result = runner.invoke(app, ["convert", str(src), "--out", str(out), "--format", "llamacpp"])
    assert result.exit_code == 0, result.output
    table = pa.ipc.open_file(str(out)).read_all()
    assert table.column("prompt_ids").to_pylist() == [PROMPT, PROMPT, PROMPT_2, PROMPT_2]
    groups = table.column("group_id").to_pylist()
    assert groups[0] == groups[1] != groups[2] == groups[3]
    assert table.column("reward").to_pylist() == [0.0, 1.0, 2.0, 3.0]


def test_convert_llamacpp_bad_lines(tmp_path):
    lines = [json.loads(x) for x in (HERE / "completions.jsonl").read_text().splitlines()]
    pre = {**fixture("pre_sampling_defaults"), "prompt_ids": PROMPT}
    no_ids = {**lines[0], "tokens": []}
    no_prompt = {k: v for k, v in lines[0].items() if k != "prompt_ids"}
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in (lines[0], pre, no_ids, no_prompt, lines[1])))
    out = tmp_path / "out.arrow"
    result = runner.invoke(app, ["convert", str(src), "--out", str(out), "--format", "llamacpp"])
    assert result.exit_code == 2
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    got = [line.strip().removeprefix("error: 3 bad lines; no output written: ")
           for line in result.output.strip().splitlines()]
    assert got[0].startswith(f"{src}:2: field 'completion_probabilities[0].logprob': expected log-probs of the "
                             "sampled distribution")
    assert got[1:] == [
        f"{src}:3: field 'tokens': expected the sampled token ids (request return_tokens: true), found an empty list",
        (f"{src}:4: field 'prompt_ids': expected the prompt ids sent (pass prompt_ids, or add a prompt_ids field), "
        "found null"),
    ]


# ---- the sampler's math, against a fake engine ---------------------------------------------------------------


def naive_chain(logits, temperature, top_k, typical_p, top_p, min_p, min_keep=1):
    """llama.cpp's chain written out as loops over (id, logit) candidates, as in src/llama-sampler.cpp."""
    cand = [(i, float(x)) for i, x in enumerate(logits)]
    if top_k > 0:
        cand = sorted(cand, key=lambda c: -c[1])[:top_k]

    def probs(cs):
        m = max(x for _, x in cs)
        e = [math.exp(x - m) for _, x in cs]
        return [v / sum(e) for v in e]
    if typical_p < 1:
        p = probs(cand)
        h = -sum(q * math.log(q) for q in p if q > 0)
        order = sorted(range(len(cand)), key=lambda i: abs(-math.log(p[i]) - h))
        kept, cum = [], 0.0
        for n, i in enumerate(order):
            kept.append(cand[i])
            cum += p[i]
            if cum > typical_p and n + 1 >= min_keep:
                break
        cand = kept
    if top_p < 1:
        cand = sorted(cand, key=lambda c: -c[1])
        p = probs(cand)
        kept, cum = [], 0.0
        for n, c in enumerate(cand):
            kept.append(c)
            cum += p[n]
            if cum >= top_p and n + 1 >= min_keep:
                break
        cand = kept
    if min_p > 0:
        m = max(x for _, x in cand)
        cand = [c for c in cand if c[1] >= m + math.log(min_p)]
    z = [x / temperature for _, x in cand]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return {i: v - lse for (i, _), v in zip(cand, z)}


@pytest.mark.parametrize("chain", [
    {"temperature": 1.0, "top_k": 0, "typical_p": 1.0, "top_p": 1.0, "min_p": 0.0},
    {"temperature": 0.7, "top_k": 0, "typical_p": 1.0, "top_p": 1.0, "min_p": 0.0},
    {"temperature": 0.8, "top_k": 40, "typical_p": 1.0, "top_p": 0.95, "min_p": 0.05},  # llama.cpp's defaults
    {"temperature": 1.3, "top_k": 0, "typical_p": 0.9, "top_p": 0.8, "min_p": 0.0},
    {"temperature": 0.5, "top_k": 7, "typical_p": 1.0, "top_p": 1.0, "min_p": 0.2},
])
def test_processed_logprobs_equal_the_naive_chain(chain):
    logits = np.random.default_rng(1).normal(0, 2, 300).astype(np.float32)
    ids, logp = processed_logprobs(logits, **chain)
    want = naive_chain(logits, **chain)
    assert sorted(ids.tolist()) == sorted(want)
    np.testing.assert_allclose(logp, [want[i] for i in ids.tolist()], rtol=0, atol=1e-9)
    assert math.isclose(np.exp(logp).sum(), 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("scale", [4.0, 0.05])  # peaked: the 256 largest reach top_p; flat: they do not
def test_top_p_on_a_large_vocabulary(scale):
    logits = np.random.default_rng(2).normal(0, scale, 5000).astype(np.float32)
    ids, logp = processed_logprobs(logits, temperature=0.9, top_p=0.9)
    want = naive_chain(logits, 0.9, 0, 1.0, 0.9, 0.0)
    assert (len(ids) < 256) == (scale == 4.0)
    assert sorted(ids.tolist()) == sorted(want)
    np.testing.assert_allclose(logp, [want[i] for i in ids.tolist()], rtol=0, atol=1e-9)


def test_chain_order_top_p_sees_the_untempered_distribution():
    """p = softmax([2, 1, 0]) = (.665, .245, .090): top_p 0.8 keeps 2 tokens at T = 1; at T = 3 first
    (transformers' order) the tempered (.418, .299, .284) would keep all 3. llama.cpp keeps 2."""
    ids, logp = processed_logprobs(np.array([2.0, 1.0, 0.0], np.float32), temperature=3.0, top_p=0.8)
    assert ids.tolist() == [0, 1]
    np.testing.assert_allclose(logp, [2 / 3 - math.log(math.exp(2 / 3) + math.exp(1 / 3)),
                                      1 / 3 - math.log(math.exp(2 / 3) + math.exp(1 / 3))])
    ids, _ = processed_logprobs(np.array([2.0, 1.0, 0.0], np.float32), temperature=3.0, min_p=0.3)
    assert ids.tolist() == [0, 1]  # min_p too: e^-2 = .135 < 0.3 of the max at T = 1 (at T = 3, .513 would pass)


class FakeLlama:
    """The part of llama_cpp.Llama the sampler uses; logits a fixed function of (last token, position)."""

    _is_recurrent = _is_hybrid = False
    _logits_all = True

    def __init__(self, vocab: int = 50, eos: int = 3, n_ctx: int = 64):
        self.vocab, self.eos, self.ctx_len = vocab, eos, n_ctx
        self.n_tokens = 0
        self.input_ids = np.zeros(n_ctx, np.intc)
        self.scores = np.zeros((n_ctx, vocab), np.float32)
        self.evaluated = 0  # tokens run through the model

    def logits_for(self, context: list[int]) -> np.ndarray:
        rng = np.random.default_rng(hash((len(context), context[-1])) % 2**32)
        row = rng.normal(0, 2, self.vocab).astype(np.float32)
        row[self.eos] += 0.25 * len(context)  # ends become likely as the context grows
        return row

    def eval(self, tokens):
        for tok in tokens:
            self.input_ids[self.n_tokens] = tok
            self.n_tokens += 1
            self.scores[self.n_tokens - 1] = self.logits_for(self.input_ids[: self.n_tokens].tolist())
            self.evaluated += 1

    def n_ctx(self):
        return self.ctx_len


def test_sampler_logs_the_chain_logprob_of_each_drawn_token_and_ends_with_eos():
    llm = FakeLlama()
    chain = {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.02}
    rows = list(llamacpp_sample(llm, [[5, 6, 7], [5, 6, 9]], n=3, max_tokens=30, seed=0, eos=llm.eos, **chain))
    assert [r["group_id"] for r in rows] == ["0"] * 3 + ["1"] * 3
    assert [r["sample_id"] for r in rows] == ["0/0", "0/1", "0/2", "1/0", "1/1", "1/2"]
    ended = 0
    for row in rows:
        context = list(row["prompt_ids"])
        for tok, lp in zip(row["response_ids"], row["behavior_logprobs"]):
            want = naive_chain(llm.logits_for(context), chain["temperature"], chain["top_k"], 1.0, chain["top_p"],
                               chain["min_p"])
            assert tok in want and math.isclose(lp, want[tok], abs_tol=1e-9)
            context.append(tok)
        ends = row["response_ids"][-1] == llm.eos
        ended += ends
        assert ends or len(row["response_ids"]) == 30
        assert llm.eos not in row["response_ids"][:-1]
    assert ended >= 1


def test_sampler_reuses_the_prompt_cache():
    llm = FakeLlama()
    rows = list(llamacpp_sample(llm, [[5, 6, 7, 8], [5, 6, 7, 9]], n=4, max_tokens=5, seed=1, eos=[llm.eos]))
    # the second prompt shares 3 tokens with the first: only its last token is evaluated again;
    # each sample evaluates every response token but the last one.
    assert llm.evaluated == 4 + 1 + sum(len(r["response_ids"]) - 1 for r in rows)


def test_sampler_draws_from_the_logged_distribution():
    """Token frequencies over many draws match exp(logged log-prob) (one position, 4000 samples)."""
    llm = FakeLlama(vocab=6, eos=5)
    rows = list(llamacpp_sample(llm, [[1, 2]], n=4000, max_tokens=1, seed=3, temperature=1.5, top_k=4, eos=5))
    ids, logp = processed_logprobs(llm.logits_for([1, 2]), temperature=1.5, top_k=4)
    freq = np.bincount([r["response_ids"][0] for r in rows], minlength=6) / 4000
    np.testing.assert_allclose(freq[ids], np.exp(logp), atol=0.03)
    assert freq[np.setdiff1d(np.arange(6), ids)].sum() == 0
    assert {r["behavior_logprobs"][0] for r in rows} <= set(logp.tolist())


def test_sampler_refusals():
    llm = FakeLlama(n_ctx=10)
    with pytest.raises(ConfigError, match="exceed the context of 10 tokens"):
        list(llamacpp_sample(llm, [[1, 2, 3]], max_tokens=8, eos=3))
    with pytest.raises(ConfigError, match="temperature: expected a finite number > 0"):
        list(llamacpp_sample(llm, [[1]], temperature=0.0))
    with pytest.raises(InputError, match=r"prompts\[0\]: expected at least one token"):
        list(llamacpp_sample(llm, [[]], eos=3))
    llm._is_recurrent = True
    with pytest.raises(ConfigError, match="recurrent"):
        list(llamacpp_sample(llm, [[1]]))
