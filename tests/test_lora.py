"""LoRA through peft: `drpo train --lora-r`, `--merge`, `--adapter`; one process and two gloo ranks."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from conftest import assert_reordered, assert_trained_alike
from safetensors.torch import load_file
from typer.testing import CliRunner

from drpo_cli.base.errors import ConfigError
from drpo_cli.cli import app
from drpo_cli.config import TrainConfig
from drpo_cli.model import lora
from drpo_cli.model.checkpoint import load_model

TRAIN = ["--quiet", "--device", "cpu", "--lr", "1e-2", "--micro-batch-tokens", "512", "--minibatches", "2"]
# Targets given explicitly: the attention and MLP projections of the example's Llama layers.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def train(toy: Path, out: Path, *args: str):
    result = CliRunner().invoke(app, ["train", "-r", str(toy / "rollouts.arrow"), "-m", str(toy / "model"),
                                      "--out", str(out), *TRAIN, *args])
    assert result.exit_code == 0, result.output
    return json.loads((out / "drpo_report.json").read_text())


@pytest.fixture(scope="module")
def adapter_run(toy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "adapter"
    train(toy, out, "--lora-r", "4", "--lora-alpha", "8")
    return out


def test_adapter_output_loads_with_peft_and_matches_the_merged_run(toy, adapter_run, tmp_path):
    from transformers import AutoModelForCausalLM

    names = sorted(p.name for p in adapter_run.iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "drpo_report.json", "drpo_checkpoint.json"} <= set(names)
    assert "model.safetensors" not in names and "config.json" not in names
    config = json.loads((adapter_run / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.0)
    assert {t.rsplit(".", 1)[-1] for t in config["target_modules"]} == set(PROJECTIONS)  # not the head
    report = json.loads((adapter_run / "drpo_report.json").read_text())
    # 2 layers × 7 projections × r (in + out): the example has H = 64, MLP 128, 4 heads of 16, 2 KV heads.
    per_layer = 4 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + (64 + 128) * 2 + (128 + 64))
    assert report["input"]["trainable_parameters"] == 2 * per_layer
    assert json.loads((adapter_run / "drpo_checkpoint.json").read_text())["policy_version"] == 9

    base = AutoModelForCausalLM.from_pretrained(toy / "model")
    peft_model = peft.PeftModel.from_pretrained(base, str(adapter_run))
    adapter = load_file(str(adapter_run / "adapter_model.safetensors"))
    assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 1e-3  # B moved from 0
    merged_by_peft = peft_model.merge_and_unload().state_dict()

    train(toy, tmp_path / "merged", "--lora-r", "4", "--lora-alpha", "8", "--merge")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    source = load_file(str(toy / "model" / "model.safetensors"))
    assert merged.keys() == source.keys()
    for name, value in merged.items():  # the same adapter (the same runs), merged by other code: W + s·B·A
        # rounds r + 2 = 6 times at most, each within ε32 of the tensor's largest entry
        assert_reordered(value, merged_by_peft[name], 6, msg=name)
    # Frozen: the embedding (tied head) and norms are the source's; the projections moved.
    assert torch.equal(merged["model.embed_tokens.weight"], source["model.embed_tokens.weight"])
    assert torch.equal(merged["model.norm.weight"], source["model.norm.weight"])
    assert (merged["model.layers.0.self_attn.q_proj.weight"] - source["model.layers.0.self_attn.q_proj.weight"]).abs().max() > 1e-4


def test_adapter_values_round_trip_through_the_peft_format(toy, adapter_run):
    from transformers import AutoModelForCausalLM

    model, _ = load_model(toy / "model")
    lora.add_adapter(model, lora.read_config(adapter_run))
    values = lora.read_adapter(adapter_run, model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in values:
                p.copy_(values[name])
    reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy / "model"), str(adapter_run))
    ids = torch.tensor([[1, 5, 7, 3, 9, 2]])
    with torch.no_grad():
        # peft's LoRA layers on the same base weights with the same values: the same arithmetic, bit for bit
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_continuing_an_adapter(toy, adapter_run, tmp_path):
    report = train(toy, tmp_path / "next", "--adapter", str(adapter_run))
    assert report["input"]["adapter"] == str(adapter_run)
    assert report["output"]["policy_version"] == 9
    first, second = load_file(str(adapter_run / "adapter_model.safetensors")), load_file(str(tmp_path / "next" / "adapter_model.safetensors"))
    assert first.keys() == second.keys()
    assert max((first[k] - second[k]).abs().max().item() for k in first) > 1e-4  # trained further
    assert json.loads((tmp_path / "next" / "adapter_config.json").read_text())["r"] == 4


def test_an_adapter_with_a_non_finite_weight_is_refused(toy, adapter_run, tmp_path):
    from safetensors.torch import save_file

    shutil.copytree(adapter_run, tmp_path / "bad")
    tensors = load_file(str(adapter_run / "adapter_model.safetensors"))
    key = min(tensors)
    tensors[key][1, 2] = float("inf")
    save_file(tensors, str(tmp_path / "bad" / "adapter_model.safetensors"))
    result = CliRunner().invoke(app, ["train", "-r", str(toy / "rollouts.arrow"), "-m", str(toy / "model"),
                                      "--out", str(tmp_path / "out"), *TRAIN, "--adapter", str(tmp_path / "bad")])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        (f"error: {tmp_path / 'bad' / 'adapter_model.safetensors'}: tensor {key} holds inf at [1, 2]; drpo refuses "
        "non-finite weights (they make every log-prob and gradient NaN)")]
    assert not (tmp_path / "out").exists()


def test_initial_values_are_peft_kaiming_a_and_zero_b():
    model = torch.nn.Module()
    model.q_proj = torch.nn.Linear(48, 32)
    lora.add_adapter(model, lora.new_config(4, 8.0, ("q_proj",)))
    values = lora.initial_values(model, seed=3)
    a, b = values["q_proj.lora_A.default.weight"], values["q_proj.lora_B.default.weight"]
    assert a.shape == (4, 48) and b.shape == (32, 4) and not b.any()
    bound = 1 / math.sqrt(48)  # kaiming_uniform(a=√5): gain √(1/3) · √(3 / fan_in)
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    assert torch.equal(a, lora.initial_values(model, seed=3)["q_proj.lora_A.default.weight"])  # seeded
    assert [n for n, p in model.named_parameters() if p.requires_grad] == list(values)


def test_merge_of_a_stream_is_w_plus_scaled_ba():
    w, bias, a, b = torch.randn(3, 5), torch.randn(3), torch.randn(2, 5), torch.randn(3, 2)
    stream = [("m.base_layer.weight", w), ("m.base_layer.bias", bias), ("m.lora_A.default.weight", a),
              ("m.lora_B.default.weight", b), ("n.weight", torch.ones(1))]
    out = dict(lora.merged(iter(stream), {"m": 0.5}))
    assert list(out) == ["m.bias", "m.weight", "n.weight"]
    torch.testing.assert_close(out["m.weight"], w + 0.5 * b @ a)
    assert torch.equal(out["m.bias"], bias)


def test_frozen_head_skips_its_gradient_and_leaves_the_others_unchanged(toy):
    from drpo_cli.model.batching import plan_micro_batches
    from drpo_cli.model.logprobs import fused_token_loss
    from drpo_cli.rollouts.rows import load_rows

    rows = load_rows([str(toy / "rollouts.arrow")])
    mb = plan_micro_batches(rows, np.arange(6), 4096)[0]
    grads = []
    for frozen in (False, True):
        model, _ = load_model(toy / "model")
        model.get_output_embeddings().weight.requires_grad_(not frozen)  # tied: the embedding too
        loss, _, _ = fused_token_loss(model, mb, lambda logp, sl: (logp * 0.5).sum(), chunk_tokens=7)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[1]["model.embed_tokens.weight"] is None and grads[0]["model.embed_tokens.weight"] is not None
    for name, g in grads[1].items():
        if name != "model.embed_tokens.weight":
            # the head's own gradient GEMM is skipped; every other op is the same: bit for bit
            assert torch.equal(g, grads[0][name]), name


def test_lora_options_are_checked_before_any_work(tmp_path):
    base = TrainConfig(rollouts=(str(tmp_path),), model=str(tmp_path))
    cases = {
        "--merge needs --lora-r or --adapter": {"merge": True},
        "--lora-alpha needs --lora-r": {"lora_alpha": 4.0},
        "--lora-targets needs --lora-r": {"lora_targets": ("q_proj",)},
        "--lora-r must be >= 1, got 0": {"lora_r": 0},
        "--lora-r: not with --adapter": {"lora_r": 4, "adapter": str(tmp_path)},
        "--adapter /nonexistent: not a directory": {"adapter": "/nonexistent"},
    }
    for expected, fields in cases.items():
        problems = TrainConfig(**{**base.__dict__, **fields}).validate()
        assert any(expected in p for p in problems), (expected, problems)


def test_the_adapter_is_an_input_no_output_may_overlap(adapter_run, toy):
    for out in (adapter_run, adapter_run / "sub", adapter_run.parent):
        problems = TrainConfig(rollouts=(str(toy / "rollouts.arrow"),), model=str(toy / "model"), out=str(out),
                               adapter=str(adapter_run), overwrite=True).validate()
        assert any("--adapter" in p for p in problems), (out, problems)


def test_missing_peft_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ConfigError, match=r"need peft: pip install 'drpo\[lora\]'"):
        lora.new_config(4, 8.0, ())


@pytest.mark.multiproc
def test_two_ranks_train_the_same_adapter_as_one(toy, adapter_run, tmp_path):
    from ranks import torchrun

    run = torchrun("train", "-r", str(toy / "rollouts.arrow"), "-m", str(toy / "model"), "--out", str(tmp_path / "two"),
                   *TRAIN, "--lora-r", "4", "--lora-alpha", "8")
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = load_file(str(adapter_run / "adapter_model.safetensors")), load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert one.keys() == two.keys()
    # Ranks sum the gradient in another order than one process; AdamW's m/√v turns that rounding into a
    # fraction of the step lr (ADAM_DRIFT; measured 8.3e-4 of lr per step).
    assert_trained_alike(two, one, lr=1e-2, steps=2)  # TRAIN: --lr 1e-2, --minibatches 2
    assert (tmp_path / "two" / "adapter_config.json").read_text() == (adapter_run / "adapter_config.json").read_text()
