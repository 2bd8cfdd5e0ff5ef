"""Checkpoint faults found before the work: truncated weights, config/weight disagreement, a disk too small.

Each is a bad input (exit 2, one line naming the file and what is wrong) found before any row is
trained; a write that still fails names the path and the bytes needed and leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST_TRAIN, TOY
from typer.testing import CliRunner

from drpo_cli import checkpoint, train
from drpo_cli.cli import app
from drpo_cli.errors import CheckpointError

FAST = [*FAST_TRAIN, "--device", "cpu"]


@pytest.fixture
def toy(tmp_path) -> Path:
    if not (TOY / "model").is_dir():
        pytest.fail("examples/toy/model is missing: it is committed (git checkout examples/toy), "
                    "or rebuild it with python examples/make_example.py")
    shutil.copytree(TOY, tmp_path / "toy")
    return tmp_path / "toy"


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
