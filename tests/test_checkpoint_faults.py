"""Checkpoint faults found before the work: truncated or corrupt weights, config/weight disagreement, integer or
non-finite weights, a disk too small.

Each is a bad input (exit 2, one line naming the file and what is wrong) found before any row is
trained; a write that still fails names the path and the bytes needed and leaves nothing behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST_TRAIN
from safetensors.torch import load_file, save_file
from toy import copy_toy
from typer.testing import CliRunner

from drpo_cli.audit import inspect_data
from drpo_cli.base.errors import CheckpointError
from drpo_cli.cli import app
from drpo_cli.model import checkpoint
from drpo_cli.training import train

FAST = [*FAST_TRAIN, "--device", "cpu"]


@pytest.fixture
def toy(tmp_path) -> Path:
    """A private copy of the bundled example for each test: they damage it."""
    return copy_toy(tmp_path / "toy")


def drpo(*args: str) -> subprocess.CompletedProcess:
    """The real command line, so stderr holds whatever any library prints, not only what CliRunner sees."""
    return subprocess.run([sys.executable, "-m", "drpo_cli", *args], check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def truncate(file: Path, keep: int) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:keep])


def test_truncated_safetensors_is_a_bad_input_naming_the_file(toy):
    weights = toy / "model" / "model.safetensors"
    size = weights.stat().st_size
    truncate(weights, size - 1000)
    run = drpo("inspect", str(toy / "rollouts.arrow"), "--model", str(toy / "model"), "--quiet")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"error: {weights}: truncated safetensors file: its header promises {size} bytes, the file has {size - 1000}"
    ]
    truncate(weights, 20)  # cut inside the header
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated or corrupt safetensors file: header of"):
        checkpoint.load_model(toy / "model")
    truncate(weights, 3)
    with pytest.raises(CheckpointError, match=r"truncated safetensors file \(3 bytes, no header\)"):
        checkpoint.load_model(toy / "model")


def test_config_disagreeing_with_the_weights_gives_drpos_line_alone(toy):
    config = toy / "model" / "config.json"
    config.write_text(config.read_text().replace('"vocab_size": 21', '"vocab_size": 26'))
    run = drpo("inspect", str(toy / "rollouts.arrow"), "--model", str(toy / "model"), "--quiet")
    assert run.returncode == 2
    assert "LOAD REPORT" not in run.stderr
    expected = (f"error: {toy / 'model' / 'model.safetensors'}: tensor model.embed_tokens.weight has shape [21, 64], "
                f"but {config} implies [26, 64] (e.g. vocab_size / hidden_size disagree with the weights)")
    assert run.stderr.strip().splitlines() == [expected]


def test_too_little_free_space_is_refused_before_loading(toy, tmp_path, monkeypatch):
    needed = checkpoint.output_nbytes(toy / "model", "float32", steps=1)  # FAST: one optimizer step
    weights = checkpoint.weights_nbytes(toy / "model", "float32")  # the tensors' bytes (the file adds its header)
    copied = sum((toy / "model" / n).stat().st_size for n in ("generation_config.json", "tokenizer.json",
                                                               "tokenizer_config.json"))
    # The weights, again while their one shard is assembled, the copied files and a report and page of one step.
    assert needed == 2 * weights + copied + checkpoint.report_nbytes(1)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the free-space check")

    monkeypatch.setattr(train, "load_model", no_load)
    out = tmp_path / "sub" / "out"
    result = CliRunner().invoke(app, ["train", "-r", str(toy / "rollouts.arrow"), "-m", str(toy / "model"),
                                      "--out", str(out), *FAST])
    assert result.exit_code == 2, result.output
    # sub/ is made when --out is locked (as the output would make it) and removed again: nothing is left.
    assert f"--out {out}: 1.0 KB (1,000 bytes) free on the filesystem of {tmp_path / 'sub'}, the output needs about" \
        in result.output
    assert f"({needed:,} bytes)" in result.output
    assert not (tmp_path / "sub").exists()


def test_a_full_disk_while_writing_names_the_path_and_the_bytes_and_leaves_nothing(toy, tmp_path, monkeypatch):
    def full(*a, **k):  # what a write raises when the disk fills
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_tensor", full)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["train", "-r", str(toy / "rollouts.arrow"), "-m", str(toy / "model"),
                                      "--out", str(out), *FAST])
    needed = checkpoint.output_nbytes(toy / "model", "float32", steps=1)
    assert result.exit_code == 1, result.output
    assert (f"{out}: cannot write (No space left on device); the output needs about "
            f"{checkpoint.human_bytes(needed)} ({needed:,} bytes) on its filesystem; nothing was left behind") in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]  # no output, no temporary sibling


# ---- broken model directories (issue 32, point 6): one line, exit 2, nothing written, in seconds ----


def edit_config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))


def rewrite_header(file: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header with `edit(header)`, keeping its data bytes."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def replace_tensor(model: Path, name: str, value) -> None:
    tensors = load_file(model / "model.safetensors")
    tensors[name] = value(tensors[name])
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


def shard(model: Path) -> list[Path]:
    """The weights as two shards and an index, as transformers writes a large model."""
    tensors = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    names = sorted(tensors)
    parts = {f"model-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
    for file, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, model / file, metadata={"format": "pt"})
    weight_map = {k: file for file, keys in parts.items() for k in keys}
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return [model / file for file in parts]


GATE = "model.layers.0.mlp.gate_proj.weight"  # (128, 64) float32 in the toy model


def _list_config(m):
    (m / "config.json").write_text("[1, 2]")
    return f"{m / 'config.json'}: expected a JSON object of model settings, found a list"


def _many_layers(m):
    edit_config(m, num_hidden_layers=100_000)
    return (f"{m / 'config.json'}: num_hidden_layers is 100000, but the weights hold 2 layer(s) "
            "(the last: model.layers.1.input_layernorm.weight)")


def _huge_vocabulary(m):
    edit_config(m, vocab_size=10**11)  # 25.6 TB of float32 embeddings if anything were built for real
    return (f"{m / 'model.safetensors'}: tensor model.embed_tokens.weight has shape [21, 64], but "
            f"{m / 'config.json'} implies [100000000000, 64] (e.g. vocab_size / hidden_size disagree with the weights)")


def _offsets_disagree(m):
    rewrite_header(m / "model.safetensors", lambda h: h[GATE].update(shape=[128, 32]))
    return f"{m / 'model.safetensors'}: tensor {GATE}: its data_offsets span 32768 bytes, but F32 × [128, 32] needs 16384"


def _overlapping_offsets(m):
    def overlap(h):
        lo, hi = h[GATE]["data_offsets"]
        h[GATE]["data_offsets"] = [lo - 4, hi - 4]
    rewrite_header(m / "model.safetensors", overlap)
    return f"{m / 'model.safetensors'}: corrupt safetensors header: tensor {GATE} starts at byte"


def _truncated_shard(m):
    second = shard(m)[1]
    size = second.stat().st_size
    truncate(second, size - 4096)
    return f"{second}: truncated safetensors file: its header promises {size} bytes, the file has {size - 4096}"


def _index_names_a_missing_tensor(m):
    shard(m)
    index = json.loads((m / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra.weight"] = "model-00001-of-00002.safetensors"
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    return (f"{m / 'model.safetensors.index.json'}: puts tensor model.extra.weight in model-00001-of-00002.safetensors, "
            "whose header has no such tensor")


def _index_outside_the_directory(m):
    shard(m)
    index = json.loads((m / "model.safetensors.index.json").read_text())
    index["weight_map"][GATE] = "../model-00001-of-00002.safetensors"
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    return f"{m / 'model.safetensors.index.json'}: lists '../model-00001-of-00002.safetensors', expected a file name in {m}"


def _integer_weights(m):
    replace_tensor(m, GATE, lambda t: (t * 100).to(torch.int32))
    return (f"{m / 'model.safetensors'}: tensor {GATE} has dtype I32; a weight must be floating point "
            "(F64, F32, F16, BF16, F8_E4M3, F8_E5M2)")


def _bool_weights(m):
    replace_tensor(m, "model.norm.weight", lambda t: t > 0)
    return (f"{m / 'model.safetensors'}: tensor model.norm.weight has dtype BOOL; a weight must be floating point "
            "(F64, F32, F16, BF16, F8_E4M3, F8_E5M2)")


def _missing_layer(m):
    tensors = {k: v for k, v in load_file(m / "model.safetensors").items() if "layers.1.mlp" not in k}
    save_file(tensors, m / "model.safetensors", metadata={"format": "pt"})
    return (f"{m}: weights missing from the checkpoint: model.layers.1.mlp.down_proj.weight, "
            f"model.layers.1.mlp.gate_proj.weight, model.layers.1.mlp.up_proj.weight; {m / 'config.json'} implies them")


def _nan_weight(m):  # issue 32, point 7: refused when read, naming the tensor and the element
    def poison(t):
        t[3, 5] = float("nan")
        return t
    replace_tensor(m, GATE, poison)
    return (f"{m / 'model.safetensors'}: tensor {GATE} holds nan at [3, 5]; drpo refuses non-finite weights "
            "(they make every log-prob and gradient NaN)")


BROKEN = {f.__name__.lstrip("_"): f for f in (
    _list_config, _many_layers, _huge_vocabulary, _offsets_disagree, _overlapping_offsets, _truncated_shard,
    _index_names_a_missing_tensor, _index_outside_the_directory, _integer_weights, _bool_weights, _missing_layer,
    _nan_weight)}


@pytest.mark.parametrize("fault", BROKEN)
def test_a_broken_model_directory_is_one_line_exit_2_before_any_work(toy, tmp_path, fault):
    expected = BROKEN[fault](toy / "model")
    out = tmp_path / "out"
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, ["train", "-r", str(toy / "rollouts.arrow"), "-m", str(toy / "model"),
                                      "--out", str(out), *FAST])
    seconds = time.perf_counter() - t0
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), (lines, expected)
    assert seconds < 30  # before: minutes (100,000 layers), a 25.6 TB allocation, or a crash after the data pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]  # nothing written


def test_a_broken_model_directory_is_refused_before_the_data_pass(toy, monkeypatch):
    # inspect --model: the directory is checked before a row is read (and before a weight is allocated)
    _many_layers(toy / "model")

    def no_data(*a, **k):
        raise AssertionError("the rollouts were read before the model directory was checked")

    monkeypatch.setattr(inspect_data, "audit_data", no_data)
    result = CliRunner().invoke(app, ["inspect", str(toy / "rollouts.arrow"), "--model", str(toy / "model"), "--quiet"])
    assert result.exit_code == 2 and "num_hidden_layers is 100000" in result.output, result.output


def test_buffers_a_config_inflates_are_refused_before_they_are_computed(toy):
    # A position table sized by max_position_embeddings: computed for real when the model is built, so
    # it is bounded by the weights before that (the meta model holds no memory).
    class Table(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("position_ids", torch.empty(10**10, dtype=torch.int64, device="meta"),
                                 persistent=False)

    entries = checkpoint.weight_entries(toy / "model")
    with pytest.raises(CheckpointError, match=r"config.json: the architecture's buffers would take 80.0 GB "
                                              r"\(position_ids: \[10000000000\], 80.0 GB\), more than its weights"):
        checkpoint._check_buffers(toy / "model", Table(), entries)
