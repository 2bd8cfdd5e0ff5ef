"""The real-model mode of the staleness × mismatch experiment (examples/real_experiment.py) on a tiny
random chat model: rounds recorded, results written, a rerun skips finished work and an interrupted
run continues where it stopped."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import LOGP_ULPS, assert_reordered

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import real_experiment as rx
import realtask

WORDS = ["What", "is", "Reply", "with", "the", "number", "only", "user", "assistant", "=", "+", "?", "."]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_chat_model(path: Path) -> Path:
    """A 2-layer Llama with a word-level tokenizer (digits split, <|im_end|> as end of turn) and a chat template."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<pad>", "<|im_start|>", "<|im_end|>", *WORDS,
                                         *map(str, range(10))])}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = TEMPLATE
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64,
                         tie_word_embeddings=True, eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<pad>"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


ARGS = ["--arms", "pg-is", "drpo-d0.5", "--staleness", "0", "1", "--mismatch", "none", "fp8-w8a8", "--rounds", "2",
        "--prompts", "2", "--samples", "2", "--minibatches", "2", "--level-prompts", "2", "--threads", "1"]


@pytest.mark.slow
def test_real_mode_records_rounds_and_resumes(tmp_path, monkeypatch):
    model = tiny_chat_model(tmp_path / "model")
    out, work = tmp_path / "out", tmp_path / "work"
    argv = [*ARGS, "--model", str(model), "--out", str(out), "--work", str(work)]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    assert tokenizer.decode(realtask.prompt_ids(tokenizer, 3, 4)).count("<|im_start|>") == 2

    # An interruption in the 3rd round trained: two rounds are recorded, the rest is not.
    calls = {"n": 0}
    real_train = rx.train

    def interrupted(cfg):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_train(cfg)

    monkeypatch.setattr(rx, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rx.main(argv)
    assert sum(len(list(p.glob("round-*.json"))) for p in (out / "rounds").iterdir()) == 2

    # The same command continues: 2 arms x 2 K x 2 levels x 2 rounds = 16 rounds, 14 of them trained now.
    calls["n"] = 0
    monkeypatch.setattr(rx, "train", lambda cfg: (calls.__setitem__("n", calls["n"] + 1), real_train(cfg))[1])
    doc = rx.main(argv)
    assert calls["n"] == 14
    assert doc["rounds_done"] == doc["rounds_planned"] == 16
    assert len(doc["runs"]) == 8 and all(len(r["rounds"]) == 2 for r in doc["runs"])
    for run in doc["runs"]:
        for i, rd in enumerate(run["rounds"]):
            assert rd["lag"] == min(i, run["staleness"])
            assert 0.0 <= rd["reward"] <= 1.0 and rd["peak_rss_mb"] > 0
    assert {lv["level"] for lv in doc["mismatch_levels"]} == {"none", "fp8-w8a8"}
    assert json.loads((out / "results.json").read_text())["rounds_done"] == 16
    assert "| pg-is | fp8-w8a8 | 1 |" in (out / "results.md").read_text()
    assert not any(work.iterdir())  # finished runs keep no checkpoints

    # A third run has nothing left to do.
    calls["n"] = 0
    rx.main(argv)
    assert calls["n"] == 0


def test_real_task_sampler_logs_the_log_probs_a_full_forward_gives(tmp_path):
    # The KV-cache loop must log exactly what the trainer recomputes from prompt + response (lag 0, no mismatch).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_chat_model(tmp_path / "model")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    table = realtask.sample_rollouts(model, tokenizer, [(3, 4), (1, 8)], 3, 0.7, 0, seed=5)
    assert table.num_rows == 6
    with torch.no_grad():
        for prompt, response, logged in zip(*(table.column(c).to_pylist() for c in
                                              ("prompt_ids", "response_ids", "behavior_logprobs"))):
            assert 1 <= len(response) <= realtask.MAX_NEW_TOKENS and len(logged) == len(response)
            eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
            assert eos not in response[:-1]  # cut after the first end of turn
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
            logp = torch.log_softmax(logits / 0.7, -1).gather(1, torch.tensor(response)[:, None])[:, 0]
            # the KV-cache loop against one full forward: other shapes, so equal to rounding (LOGP_ULPS)
            assert_reordered(logp, torch.tensor(logged), LOGP_ULPS, scale=1 + logp.abs(), msg="log-probs")


@pytest.mark.slow
def test_parts_split_the_grid_and_write_the_results_of_all(tmp_path):
    model = tiny_chat_model(tmp_path / "model")
    argv = [*ARGS, "--rounds", "1", "--model", str(model), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w")]
    first = rx.main([*argv, "--part", "0/2"])  # settings 0 and 2: (none, K 0) and (fp8-w8a8, K 0)
    assert {(r["mismatch"], r["staleness"]) for r in first["runs"]} == {("none", 0), ("fp8-w8a8", 0)}
    both = rx.main([*argv, "--part", "1/2"])
    assert both["rounds_done"] == both["rounds_planned"] == 8  # every run of the grid, from both parts
    assert len(both["sessions"]) == 2


def test_a_bad_part_is_refused(tmp_path):
    for bad in ("2/2", "1", "a/b"):
        with pytest.raises(SystemExit) as err:
            rx.parse_args(["--part", bad, "--model", str(tmp_path)])
        assert err.value.code == 2


def test_wall_time_counts_side_by_side_parts_once_and_no_pause():
    sessions = [{"started": "2026-12-02T00:00:00Z", "seconds": 100.0},  # part 0
                {"started": "2026-12-02T00:00:50Z", "seconds": 100.0},  # part 1, side by side: 150 s in all
                {"started": "2026-12-02T01:00:00Z", "seconds": 10.0}]  # resumed an hour later
    assert rx.wall_seconds(sessions) == 160.0
