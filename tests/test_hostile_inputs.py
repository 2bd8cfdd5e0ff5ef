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


# ---- symlinks in a model directory ------------------------------------------------------------------


def _model_copy(toy: Path, where: Path) -> Path:
    import shutil

    shutil.copytree(toy / "model", where)
    return where


def test_a_symlink_named_like_a_tokenizer_file_is_not_copied_into_the_checkpoint(toy, tmp_path, monkeypatch):
    monkeypatch.setenv("DRPO_TEST_SECRET", "hunter2")
    model = _model_copy(toy, tmp_path / "model")
    (model / "tokenizer.env").symlink_to("/proc/self/environ")
    result = CliRunner().invoke(app, ["train", "-r", str(toy / "rollouts.arrow"), "-m", str(model), "--out",
                                      str(tmp_path / "out"), *FAST_TRAIN])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert not (out / "tokenizer.env").exists()
    assert all(b"hunter2" not in p.read_bytes() for p in out.iterdir())


@pytest.mark.parametrize("target", ["/proc/self/environ", "outside.json"])
def test_a_file_drpo_reads_that_leads_out_of_the_model_directory_is_refused(toy, tmp_path, target):
    model = _model_copy(toy, tmp_path / "model")
    outside = tmp_path / "outside.json"
    outside.write_text('{"secret": "hunter2"}')
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to(target if target.startswith("/") else outside)
    real = os.path.realpath(model / "tokenizer.json")
    for argv in (["train", "-r", str(toy / "rollouts.arrow"), "-m", str(model), "--out", str(tmp_path / "out"),
                  *FAST_TRAIN],
                 ["inspect", str(toy / "rollouts.arrow"), "--model", str(model), "--json", str(tmp_path / "a.json")]):
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 2, result.output
        assert result.stderr.splitlines() == [
            f"error: {model / 'tokenizer.json'}: a symlink to {real}, outside the model directory (drpo reads only "
            "files inside it, or in its hub cache's blobs/)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "outside.json"]  # nothing written


def test_a_hub_cache_snapshot_whose_files_are_symlinks_to_blobs_loads_and_copies_the_content(toy, tmp_path):
    import shutil

    repo = tmp_path / "hub" / "models--org--toy"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for p in sorted((toy / "model").iterdir()):
        blob = repo / "blobs" / f"blob-{p.name}"
        shutil.copyfile(p, blob)
        (snapshot / p.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (snapshot / "sub").mkdir()
    inner = snapshot / "sub" / "chat_template.jinja"
    inner.write_text("{{ messages }}")
    (snapshot / "chat_template.jinja").symlink_to(Path("sub", "chat_template.jinja"))  # inside the directory
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["train", "-r", str(toy / "rollouts.arrow"), "-m", str(snapshot), "--out", str(out),
                                      *FAST_TRAIN])
    assert result.exit_code == 0, result.output
    assert not (out / "chat_template.jinja").is_symlink() and (out / "chat_template.jinja").read_text() == "{{ messages }}"
    assert (out / "config.json").is_file() and not (out / "config.json").is_symlink()
