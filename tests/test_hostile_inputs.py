"""What drpo reads is untrusted (docs/outputs.md, "Security model"): each attack or fault reproduced as
described, then what drpo does instead. Resume state, model-directory symlinks, config-file switches."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import FAST_TRAIN
from typer.testing import CliRunner

from drpo_cli.cli import app
from drpo_cli.hooks import INTERRUPT_AFTER_STEP

ARGS = ["--epochs", "2", "--minibatches", "2", *FAST_TRAIN]


def train(toy: Path, out: Path, *args: str, env: dict | None = None):
    argv = ["train", "-r", str(toy / "rollouts.arrow"), "-m", str(toy / "model"), "--out", str(out), *ARGS, *args]
    return CliRunner().invoke(app, argv, env=env)


class Payload:
    """Unpickling this runs os.system: it leaves `flag` behind if anything unpickles it unrestricted."""

    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))


@pytest.fixture
def interrupted(toy, tmp_path):
    """(--out, its OUT.partial-state/) after a run interrupted at step 1 (exit 130, state saved)."""
    out = tmp_path / "out"
    first = train(toy, out, env={INTERRUPT_AFTER_STEP: "0"})
    assert first.exit_code == 130, first.output
    return out, tmp_path / "out.partial-state"


def test_resume_state_holds_no_pickle_but_dcp_metadata(interrupted):
    _, state = interrupted
    assert sorted(p.name for p in state.iterdir()) == ["dcp", "rng.safetensors", "state.json"]


def test_a_pickle_payload_in_the_dcp_metadata_is_refused_unrun(toy, interrupted, tmp_path):
    out, state = interrupted
    flag = tmp_path / "ran"
    (state / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(flag)))
    result = train(toy, out, "--resume")
    assert result.exit_code == 2, result.output
    assert not flag.exists()  # the payload never ran
    assert result.stderr.splitlines() == [
        f"error: {state / 'dcp' / '.metadata'}: refused: refers to posix.system, which a checkpoint's metadata "
        "never holds (a state drpo wrote holds only DCP metadata and tensors; delete the directory and train again)"]
    assert not out.exists() and state.is_dir()  # nothing written, nothing removed


def test_a_pickle_payload_among_the_optimizer_values_is_refused_unrun(toy, interrupted, tmp_path):
    # The attacker re-saves a valid state with DCP, one optimizer setting replaced by a payload: DCP's
    # default planner would torch.load it with weights_only=False and run it.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from drpo_cli.checkpoint import load_model

    out, state = interrupted
    flag = tmp_path / "ran"
    model, _ = load_model(toy / "model")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    optim_sd["param_groups"][0]["lr"] = Payload(flag)
    for p in (state / "dcp").iterdir():
        p.unlink()
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(state / "dcp"))
    result = train(toy, out, "--resume")
    assert result.exit_code == 2, result.output
    assert not flag.exists()
    assert "cannot resume" in result.stderr and "Weights only load failed" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_metadata_naming_a_file_outside_the_state_is_refused(toy, interrupted, tmp_path):
    from drpo_cli.resume import _MetadataUnpickler

    out, state = interrupted
    path = state / "dcp" / ".metadata"
    with open(path, "rb") as fh:
        meta = _MetadataUnpickler(fh).load()
    for info in meta.storage_data.values():
        info.relative_path = "../../../etc/passwd"
    path.write_bytes(pickle.dumps(meta))
    result = train(toy, out, "--resume")
    assert result.exit_code == 2 and "names the data file '../../../etc/passwd'" in result.stderr, result.output


def test_a_valid_state_still_resumes_to_the_uninterrupted_weights(toy, interrupted, tmp_path):
    from safetensors.torch import load_file

    out, state = interrupted
    assert train(toy, tmp_path / "straight").exit_code == 0
    resumed = train(toy, out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same process, the same arithmetic, step for step
    assert not state.exists()
