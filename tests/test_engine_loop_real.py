"""llama.cpp in the loop on the real engine (marker llamacpp; `python -m pytest -m llamacpp tests/test_engine_loop_real.py`
after `pip install -e '.[real]'`): the GGUF round trip and one round of examples/llamacpp_loop.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from drpo_cli.audit.inspect_data import run_inspect
from drpo_cli.config import InspectConfig

pytestmark = pytest.mark.llamacpp
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "examples" / "real"))


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """The shipped GGUF as a float32 Hugging Face directory (examples/real/convert_model.py); its
    default output when already made (read only), else a fresh conversion."""
    import convert_model

    if (convert_model.DEFAULT_OUT / convert_model.MARKER).is_file():
        return convert_model.DEFAULT_OUT
    return convert_model.convert(tmp_path_factory.mktemp("smollm2") / "model")


def lag0(tmp_path: Path, hf_model: Path, kind: str) -> dict:
    import engine
    import realtask
    import toytask
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_model)
    llm = engine.load(engine.gguf_for(hf_model, kind, tmp_path / f"m.{kind}.gguf"), kind)
    table = engine.sample_rollouts(llm, tok, realtask.make_problems(2, 0), 2, 1.0, 0, 0, 12, realtask.score_first)
    toytask.write_arrow(table, tmp_path / f"{kind}.arrow")
    cfg = InspectConfig(rollouts=(str(tmp_path / f"{kind}.arrow"),), model=str(hf_model), device="cpu", quiet=True)
    return run_inspect(cfg.check())["metrics"]


def test_f32_gguf_of_an_unchanged_checkpoint_samples_what_the_checkpoint_does(tmp_path, hf_model):
    m = lag0(tmp_path, hf_model, "F32")
    assert m["kl/k3_mean"] < 1e-8  # measured 1e-11: float32 weights and KV cache, only summation order differs
    assert m["delta/abs_mean"] < 1e-4
    q = lag0(tmp_path, hf_model, "Q8_0")
    assert q["kl/k3_mean"] > 1e3 * max(m["kl/k3_mean"], 1e-12)  # 8-bit weights and activations: a real mismatch


def test_one_round_of_the_loop(tmp_path, hf_model):
    import llamacpp_loop

    work = tmp_path / "loop"
    res = llamacpp_loop.main(["--model", str(hf_model), "--work", str(work), "--type", "F32", "--rounds", "1",
                              "--prompts", "1", "--samples", "2", "--max-new-tokens", "6", "--minibatches", "1"])
    assert len(res["rounds"]) == 1 and res["rounds"][0]["lag0_k3"] < 1e-8
    saved = json.loads((work / "results.json").read_text())
    assert saved["engine"].startswith("llama-cpp-python ") and saved["gguf_type"] == "F32"
    assert str(tmp_path) not in json.dumps({k: saved[k] for k in ("model", "engine", "gguf_type", "rounds")})
    assert (work / "round-0" / "model" / "config.json").is_file()
    assert (work / "round-0" / "model.F32.gguf").is_file()
    # rerun: the finished round is kept, one more round samples from round 0's checkpoint
    res = llamacpp_loop.main(["--model", str(hf_model), "--work", str(work), "--type", "F32", "--rounds", "2",
                              "--prompts", "1", "--samples", "2", "--max-new-tokens", "6", "--minibatches", "1"])
    assert [r["round"] for r in res["rounds"]] == [0, 1]
    assert (work / "round-1" / "model.F32.gguf").is_file()


def test_verify_reruns_a_committed_round_of_the_llamacpp_grid(hf_model):
    # Round 1 of a committed F32 run, rerun from its recorded settings (examples/engine_experiment.py --verify).
    # Where llama.cpp's F32 kernels compute what they did when it was recorded, it is reproduced (bit for
    # bit, the start k3 within rounding); elsewhere it must still be another draw of the same experiment.
    import engine_experiment as ex

    doc = ex.main(["--model", str(hf_model), "--threads", "1", "--verify", "pg-is_F32_k0_s0/1"])
    assert doc["verdict"] in ("reproduced", "another draw"), [r for r in doc["rows"] if r["agreement"] == "beyond"]
    assert {r["figure"] for r in doc["rows"]} >= {"reward", "rollout_reward", "start.kl/k3_mean", "grad_norms[0]"}
