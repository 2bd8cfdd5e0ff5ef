"""Rows longer than the model's context (issue 32, point 8): refused before the weights are loaded, or cut
with --truncate to exactly the tokens the model can score; the limit read from the config as vLLM reads it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import FAST_TRAIN, TOY, require_toy
from typer.testing import CliRunner

from drpo_cli.base.errors import InputError
from drpo_cli.cli import app
from drpo_cli.config import InspectConfig
from drpo_cli.model import checkpoint
from drpo_cli.rollouts.rows import Context, fit_context, load_rows

ROWS = 8


def write_rows(path: Path, prompt: int, responses: list[int], seed: int = 0) -> Path:
    """Rows of `prompt` prompt tokens and the given response lengths (ids in the toy vocabulary)."""
    rng = np.random.default_rng(seed)
    n = len(responses)
    table = pa.table({
        "prompt_ids": [[1 + i % 3 for i in range(prompt)]] * n,
        "response_ids": [rng.integers(4, 21, r).tolist() for r in responses],
        "behavior_logprobs": [[-1.0] * r for r in responses],
        "loss_mask": [[True] * (r - 1) + [False] for r in responses],
        "reward": [float(i % 2) for i in range(n)],
        "group_id": [str(i // 4) for i in range(n)],
        "sample_id": [f"s{i}" for i in range(n)],
    })
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return path


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    """The issue's case: a GPT-2 with 16 learned positions and rows of 23 tokens (3 prompt + 20 response)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = GPT2Config(n_positions=16, vocab_size=21, n_embd=32, n_layer=2, n_head=2, bos_token_id=2,
                        eos_token_id=3)
    GPT2LMHeadModel(config).save_pretrained(root / "model")
    write_rows(root / "long.arrow", 3, [20] * ROWS)
    return root


def no_weights(*args, **kwargs):
    raise AssertionError("the weights were loaded before the rows' lengths were checked")


def test_rows_longer_than_a_gpt2_context_are_refused_before_the_weights_are_loaded(gpt2, tmp_path, monkeypatch):
    # Before: an IndexError in the position table (exit 1) after the data pass and the load.
    from drpo_cli.training import train

    monkeypatch.setattr(train, "load_model", no_weights)
    monkeypatch.setattr(checkpoint, "load_model", no_weights)  # inspect's
    line = (f"error: {gpt2 / 'long.arrow'}, column 'response_ids', row 0 (sample_id 's0'): expected at most 16 input "
            f"positions, prompt + response - 1 (n_positions of {gpt2 / 'model'}), found 22 (prompt 3, response 20); "
            "--truncate would keep its first 14 response tokens")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["train", "-r", str(gpt2 / "long.arrow"), "-m", str(gpt2 / "model"), "--out",
                                      str(out), *FAST_TRAIN])
    assert result.exit_code == 2 and result.stderr.splitlines() == [line], result.output
    assert not out.exists()
    result = CliRunner().invoke(app, ["inspect", str(gpt2 / "long.arrow"), "--model", str(gpt2 / "model"), "--quiet"])
    assert result.exit_code == 2 and result.stderr.splitlines() == [line], result.output


def test_truncate_trains_and_audits_the_first_tokens_and_reports_what_it_left_out(gpt2, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["train", "-r", str(gpt2 / "long.arrow"), "-m", str(gpt2 / "model"), "--out",
                                      str(out), "--truncate", *FAST_TRAIN])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "drpo_report.json").read_text())
    # each row keeps 16 − 3 + 1 = 14 of its 20 response tokens; the 6 cut ones include its one untrained token
    assert report["filters"]["truncation"] == {"max_positions": 16, "rows_truncated": ROWS, "rows_dropped": 0,
                                               "tokens_dropped": 6 * ROWS, "trained_tokens_dropped": 5 * ROWS}
    assert sum(s["tokens"] for s in report["steps"]) == 14 * ROWS
    assert report["input"]["trained_tokens"] == 14 * ROWS
    audit = CliRunner().invoke(app, ["inspect", str(gpt2 / "long.arrow"), "--model", str(gpt2 / "model"),
                                     "--truncate", "--json", "-", "--quiet"])
    assert audit.exit_code == 0, audit.output
    section = json.loads(audit.stdout)
    assert section["data"]["truncation"] == report["filters"]["truncation"]
    assert section["model"]["tokens"] == 14 * ROWS and section["data"]["masked_tokens"] == 19 * ROWS


def test_truncated_rows_keep_exactly_the_log_probs_of_their_first_tokens(tmp_path):
    # A causal model's position t sees only tokens up to t: the kept tokens' log-probs under a context of
    # 10 are those of the whole rows (scored by the same weights with the stated limit of 64).
    require_toy()
    short = tmp_path / "short"
    shutil.copytree(TOY / "model", short)
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 10  # rotary: the weights do not depend on it
    (short / "config.json").write_text(json.dumps(config))
    rollouts = write_rows(tmp_path / "r.arrow", 3, [6, 12, 9, 7])
    tables = {}
    for name, model in (("whole", TOY / "model"), ("cut", short)):
        path = tmp_path / f"{name}.arrow"
        result = CliRunner().invoke(app, ["inspect", str(rollouts), "--model", str(model), "--truncate", "--quiet",
                                          "--per-token", str(path), "--device", "cpu", "--dtype", "fp32"])
        assert result.exit_code == 0, result.output
        tables[name] = pa.ipc.open_file(str(path)).read_all().to_pylist()
    whole = {(r["sample_id"], r["position"]): r["logp"] for r in tables["whole"]}
    cut = {(r["sample_id"], r["position"]): r["logp"] for r in tables["cut"]}
    # at most 10 − 3 + 1 = 8 response tokens per row: rows of 12 and 9 lose 4 and 1
    assert len(whole) == 6 + 12 + 9 + 7 and len(cut) == 6 + 8 + 8 + 7
    assert max(abs(cut[k] - whole[k]) for k in cut) < 1e-5  # other padding: float32 rounding only


def test_a_million_token_response_is_refused_in_seconds(tmp_path):
    # Before: over 10 minutes at 2.7 GB on the toy model, ignoring SIGTERM.
    require_toy()
    rollouts = write_rows(tmp_path / "huge.arrow", 3, [1_000_000])
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "drpo_cli", "train", "-r", str(rollouts), "-m", str(TOY / "model"),
                          "--out", str(tmp_path / "out"), "--quiet"], check=False, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        (f"error: {rollouts}, column 'response_ids', row 0 (sample_id 's0'): expected at most 64 input positions, "
        f"prompt + response - 1 (max_position_embeddings of {TOY / 'model'}), found 1000002 (prompt 3, response "
        "1000000); --truncate would keep its first 62 response tokens")]
    assert time.perf_counter() - t0 < 60 and not (tmp_path / "out").exists()


def test_fit_context_cuts_every_per_token_array_and_the_routing_and_drops_rows_whose_prompt_is_longer(tmp_path):
    path = write_rows(tmp_path / "r.arrow", 3, [2, 6, 4])
    rows = load_rows(path)
    rows = rows.select(np.arange(3))  # a copy to edit
    rows = type(rows)(**{**rows.__dict__, "token_version": np.arange(12, dtype=np.int64),
                         "proximal_logprobs": -np.arange(12, dtype=np.float32),
                         "routed_experts": np.arange(4 + 8 + 6, dtype=np.int16).reshape(-1, 1, 1)})
    context = Context(6, "test")
    with pytest.raises(InputError, match=r"r.arrow, column 'response_ids', row 1 \(sample_id 's1'\): expected at most 6 "
                                         r"input positions.*found 8 \(prompt 3, response 6\); --truncate would keep its "
                                         r"first 4 response tokens"):
        fit_context(rows, context, truncate=False)
    cut, counts = fit_context(rows, context, truncate=True)
    assert counts == {"max_positions": 6, "rows_truncated": 1, "rows_dropped": 0, "tokens_dropped": 2,
                      "trained_tokens_dropped": 1}
    assert cut.response_lengths().tolist() == [2, 4, 4]
    assert cut.token_version.tolist() == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11]
    assert cut.proximal_logprobs.tolist() == [-x for x in (0, 1, 2, 3, 4, 5, 8, 9, 10, 11)]
    # routing: prompt + kept response − 1 positions per row: 4, 6 (of 8), 6
    assert cut.routed_experts.reshape(-1).tolist() == [*range(4), *range(4, 10), *range(12, 18)]
    tiny = Context(2, "test")  # every prompt (3 tokens) is longer: nothing is left
    with pytest.raises(InputError, match="--truncate: the prompt of every one of the 3 rows is longer"):
        fit_context(rows, tiny, truncate=True)
    kept, counts = fit_context(rows, Context(3, "test"), truncate=True)  # 3 − 3 + 1 = 1 token each
    assert kept.response_lengths().tolist() == [1, 1, 1] and counts["rows_truncated"] == 3
    assert fit_context(rows, None, truncate=True) == (rows, None)  # no limit stated (e.g. Mamba)


def test_the_limit_is_read_as_vllm_reads_it():
    from transformers import GPT2Config, LlamaConfig, MambaConfig, Qwen2Config

    assert checkpoint.model_context(GPT2Config(n_positions=16), "m") == Context(16, "n_positions of m")
    assert checkpoint.model_context(LlamaConfig(max_position_embeddings=4096), "m").limit == 4096
    yarn = Qwen2Config(max_position_embeddings=32768, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6})
    assert checkpoint.model_context(yarn, "m") == Context(131072, "max_position_embeddings × rope factor 4 of m")
    llama3 = LlamaConfig(max_position_embeddings=131072, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "rope_theta": 5e5})
    assert checkpoint.model_context(llama3, "m").limit == 131072  # already the extended length
    assert checkpoint.model_context(MambaConfig(), "m") is None  # no positions: no limit


def test_inspect_truncate_needs_a_model():
    assert "--truncate needs --model (the model's context decides what is cut)" in InspectConfig(
        rollouts=(str(TOY / "rollouts.arrow"),), truncate=True).validate()
