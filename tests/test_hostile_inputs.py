"""What drpo reads is untrusted (docs/outputs.md, "Security model"): each attack or fault reproduced as
described, then what drpo does instead. Resume state, model-directory symlinks, config-file switches."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST_TRAIN
from typer.testing import CliRunner

from drpo_cli.base.hooks import INTERRUPT_AFTER_STEP
from drpo_cli.cli import app

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
        (f"error: {state / 'dcp' / '.metadata'}: refused: refers to posix.system, which a checkpoint's metadata "
        "never holds (a state drpo wrote holds only DCP metadata and tensors; delete the directory and train again)")]
    assert not out.exists() and state.is_dir()  # nothing written, nothing removed


def test_a_pickle_payload_among_the_optimizer_values_is_refused_unrun(toy, interrupted, tmp_path):
    # The attacker re-saves a valid state with DCP, one optimizer setting replaced by a payload: DCP's
    # default planner would torch.load it with weights_only=False and run it.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from drpo_cli.model.checkpoint import load_model

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
    from drpo_cli.training.resume import _MetadataUnpickler

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
            (f"error: {model / 'tokenizer.json'}: a symlink to {real}, outside the model directory (drpo reads only "
            "files inside it, or in its hub cache's blobs/)")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "outside.json"]  # nothing written


def test_a_hub_cache_snapshot_whose_files_are_symlinks_to_blobs_loads_and_copies_the_content(toy, tmp_path):
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


# ---- modes: never more readable than the inputs ---------------------------------------------------------


def test_a_private_model_gives_a_private_checkpoint_and_state(toy, tmp_path):
    import stat

    model = _model_copy(toy, tmp_path / "model")
    for p in model.iterdir():
        p.chmod(0o600)
    model.chmod(0o700)
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        args = ["-r", str(toy / "rollouts.arrow"), "-m", str(model), "--out", str(out), *ARGS]
        assert CliRunner().invoke(app, ["train", *args], env={INTERRUPT_AFTER_STEP: "0"}).exit_code == 130
        state = tmp_path / "out.partial-state"
        entries = [state, *state.rglob("*")]
        assert {stat.S_IMODE(p.stat().st_mode) for p in entries if p.is_dir()} == {0o700}
        assert {stat.S_IMODE(p.stat().st_mode) for p in entries if p.is_file()} == {0o600}
        assert CliRunner().invoke(app, ["train", *args, "--resume"]).exit_code == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o700
        assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o600}
        # The same model, readable by all: the umask's modes, as before.
        model.chmod(0o755)
        for p in model.iterdir():
            p.chmod(0o644)
        public = tmp_path / "public"
        assert CliRunner().invoke(app, ["train", "-r", str(toy / "rollouts.arrow"), "-m", str(model), "--out",
                                        str(public), *FAST_TRAIN]).exit_code == 0
        assert stat.S_IMODE(public.stat().st_mode) == 0o755
        assert {stat.S_IMODE(p.stat().st_mode) for p in public.iterdir()} == {0o644}
        assert os.umask(0o022) == 0o022  # the command put the process's umask back
    finally:
        os.umask(old)


def test_withheld_bits_follow_the_least_readable_input(tmp_path):
    from drpo_cli.base.outputs import withheld_bits

    a, d = tmp_path / "a", tmp_path / "d"
    a.write_text("x")
    d.mkdir()
    (d / "f").write_text("y")
    a.chmod(0o644)
    d.chmod(0o755)
    (d / "f").chmod(0o640)  # a file inside the directory that others may not read
    assert withheld_bits([a]) == 0
    assert withheld_bits([a, d]) == 0o007
    d.chmod(0o711)  # group and others may enter, not list
    assert withheld_bits([d]) == 0o077
    a.chmod(0o600)
    assert withheld_bits([a]) == 0o077


# ---- locks: one run per output -------------------------------------------------------------------------


def _holder(path: Path, kind: str):
    """A second process holding drpo's lock on `path` until its stdin closes."""
    import subprocess
    import sys

    code = ("import sys\nfrom drpo_cli.base import outputs\n"
            f"with outputs.locked(outputs.Output('--out', {str(path)!r}, {kind!r})):\n"
            "    print('held', flush=True)\n    sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_a_locked_output_is_refused_at_once_naming_the_holder(toy, tmp_path):
    import time

    out = tmp_path / "out"
    holder = _holder(out, "checkpoint")
    try:
        t0 = time.perf_counter()
        result = train(toy, out)
        assert result.exit_code == 2, result.output
        assert result.stderr.splitlines() == [
            (f"error: --out {out}: in use by another drpo run (pid {holder.pid}); wait for it to end or choose "
            "another path")]
        assert time.perf_counter() - t0 < 10  # refused before any work
        assert sorted(p.name for p in tmp_path.iterdir()) == [".out.drpo-lock"]  # the holder's lock alone
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not (tmp_path / ".out.drpo-lock").exists()  # released and removed with its holder
    assert train(toy, out).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock file left by the run either


@pytest.mark.parametrize("flag", ["--json", "--html"])
def test_inspect_locks_its_report_targets(toy, tmp_path, flag):
    target = tmp_path / "report"
    holder = _holder(target, "json" if flag == "--json" else "html")
    try:
        result = CliRunner().invoke(app, ["inspect", str(toy / "rollouts.arrow"), flag, str(target), "--quiet"])
        assert result.exit_code == 2 and f"(pid {holder.pid})" in result.stderr, result.output
        assert not target.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_a_stale_lock_file_of_a_dead_process_locks_nothing(toy, tmp_path):
    (tmp_path / ".out.drpo-lock").write_text("999999\n")  # its process died: the kernel released the lock
    assert train(toy, tmp_path / "out").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_output_directory_that_cannot_be_written_is_found_before_any_work(toy, tmp_path):
    # Root writes into a 0555 directory, so the unwritable parent here is a file (ENOTDIR); a read-only
    # filesystem (EROFS) or a missing permission (EACCES) takes the same path: the lock file cannot be made.
    parent = tmp_path / "file"
    parent.write_text("")
    result = train(toy, parent / "out")
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [f"error: --out {parent / 'out'}: cannot write in {parent} (Not a directory)"]


# ---- --tensorboard follows the output rule -----------------------------------------------------------------


@pytest.mark.parametrize(("where", "relation"), [("model/tb", "is inside the input --model"),
                                                  ("out", "is --tensorboard")])
def test_tensorboard_may_not_be_an_input_or_another_output(toy, tmp_path, where, relation):
    model = _model_copy(toy, tmp_path / "model")
    before = sorted(p.name for p in model.iterdir())
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["train", "-r", str(toy / "rollouts.arrow"), "-m", str(model), "--out", str(out),
                                      "--tensorboard", str(tmp_path / where), *FAST_TRAIN])
    assert result.exit_code == 2, result.output
    assert relation in result.stderr
    assert sorted(p.name for p in model.iterdir()) == before and not out.exists()


# ---- destructive and unsafe switches come from the command line only ----------------------------------------


def test_a_recorded_run_replayed_with_config_never_overwrites(toy, tmp_path):
    out = tmp_path / "out"
    assert train(toy, out, "--overwrite").exit_code == 0  # the recorded run had --overwrite
    recorded = out / "drpo_checkpoint.json"
    assert json.loads(recorded.read_text())["training"]["overwrite"] is True
    replay = tmp_path / "replay.json"
    shutil.copy(recorded, replay)  # a copy outside --out: the checkpoint is the output here
    before = (out / "model.safetensors").read_bytes()
    result = CliRunner().invoke(app, ["train", "--config", str(replay)])
    assert result.exit_code == 2, result.output
    assert f"--out {out}: already exists (pass --overwrite to replace it)" in result.stderr
    assert (out / "model.safetensors").read_bytes() == before
    # Given on the command line, it replaces what drpo wrote, as asked.
    assert CliRunner().invoke(app, ["train", "--config", str(replay), "--overwrite"]).exit_code == 0


@pytest.mark.parametrize("key", ["overwrite", "allow_unsafe_weights"])
def test_a_config_file_setting_a_destructive_or_unsafe_switch_is_refused(toy, tmp_path, key):
    path = tmp_path / "run.toml"
    path.write_text(f'rollouts = ["{toy / "rollouts.arrow"}"]\nmodel = "{toy / "model"}"\nout = "{tmp_path / "o"}"\n'
                    f"{key} = true\n")
    result = CliRunner().invoke(app, ["train", "--config", str(path)])
    flag = "--" + key.replace("_", "-")
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        (f"error: --config {path}: key {key!r}: {flag} is taken from the command line only (a destructive or unsafe "
        f"switch); remove it from the file and pass {flag}")]
    assert not (tmp_path / "o").exists()


# ---- exit 130 means --resume works ------------------------------------------------------------------------

NOTHING_KEPT = ("error: interrupted: nothing was kept (no output written, nothing to resume); rerun the command")


@pytest.mark.parametrize("when", ["load", "0*2"])
def test_an_interrupt_that_keeps_nothing_exits_4_not_130(toy, tmp_path, when):
    # "load": SIGTERM while loading (nothing to save yet); "0*2": a second signal after step 0 aborts the save.
    out = tmp_path / "out"
    result = train(toy, out, env={INTERRUPT_AFTER_STEP: when})
    assert result.exit_code == 4, result.output
    assert result.stderr.splitlines() == [NOTHING_KEPT]
    assert list(tmp_path.iterdir()) == []  # no output, no state, no temporary, no lock file
    again = train(toy, out, "--resume")
    assert again.exit_code == 2 and "no interrupted run" in again.stderr


def test_a_resumed_run_interrupted_twice_keeps_its_earlier_state_and_exits_130(toy, interrupted, tmp_path):
    from safetensors.torch import load_file

    out, state = interrupted
    second = train(toy, out, "--resume", env={INTERRUPT_AFTER_STEP: "1*2"})
    assert second.exit_code == 130, second.output
    assert second.stderr.splitlines() == [
        (f"error: interrupted again before a new state was saved; the earlier state at {state} is kept: rerun the same "
        "command with --resume to continue from it")]
    assert train(toy, out, "--resume").exit_code == 0
    assert train(toy, tmp_path / "straight").exit_code == 0
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_inspect_interrupted_exits_4(toy, tmp_path, monkeypatch):
    from drpo_cli.audit import inspect_data

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect_data, "audit_data", interrupted)
    result = CliRunner().invoke(app, ["inspect", str(toy / "rollouts.arrow"), "--json", str(tmp_path / "a.json")])
    assert result.exit_code == 4 and result.stderr.splitlines() == [NOTHING_KEPT], result.output
    assert list(tmp_path.iterdir()) == []


# ---- faults found before the work, or said in one line ----------------------------------------------------


def test_a_full_disk_while_saving_the_state_exits_4_in_one_line_and_leaves_nothing(toy, tmp_path, monkeypatch):
    # DCP reports a full disk as its CheckpointException, a BaseException that no `except Exception` catches.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    def full(*args, **kwargs):
        raise CheckpointException("save failed", {0: (OSError(28, "No space left on device"), None)})

    monkeypatch.setattr(dcp, "save", full)
    out = tmp_path / "out"
    result = train(toy, out, env={INTERRUPT_AFTER_STEP: "0"})
    assert result.exit_code == 4, result.output
    state = tmp_path / "out.partial-state"
    assert result.stderr.splitlines() == [
        (f"error: interrupted after step 1 of 4, but the resumable state could not be saved to {state} "
         "(OSError: [Errno 28] No space left on device): nothing was kept; rerun the command")]
    assert list(tmp_path.iterdir()) == []  # no state, no temporary directory, no output


def test_the_free_space_check_counts_the_shard_being_assembled_and_the_report(toy, tmp_path, monkeypatch):
    import collections

    from drpo_cli.model import checkpoint

    weights = checkpoint.weights_nbytes(toy / "model", "float32")
    need = checkpoint.output_nbytes(toy / "model", "float32", steps=4)
    copied = sum((toy / "model" / n).stat().st_size for n in ("generation_config.json", "tokenizer.json",
                                                               "tokenizer_config.json"))
    assert need == 2 * weights + copied + 4 * 2**20 + 4 * 32 * 2**10
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage(10**12, 0, need - 1))
    result = train(toy, tmp_path / "out")
    assert result.exit_code == 2 and "the output needs about" in result.stderr and f"({need:,} bytes)" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_under_inspect_writes_no_output_and_names_the_file(toy, tmp_path, monkeypatch):
    import builtins

    from drpo_cli.base import outputs

    real_open = builtins.open
    page = tmp_path / "audit.html"

    def full_for_the_page(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if "w" in mode and Path(path).name.startswith(f".{page.name}.tmp-"):
            def no_room(data):
                raise OSError(28, "No space left on device")
            handle.write = no_room
        return handle

    monkeypatch.setattr(outputs, "open", full_for_the_page, raising=False)
    result = CliRunner().invoke(app, ["inspect", str(toy / "rollouts.arrow"), "--model", str(toy / "model"), "--quiet",
                                      "--json", str(tmp_path / "audit.json"), "--html", str(page),
                                      "--per-token", str(tmp_path / "tokens.arrow")])
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [
        f"error: --html {page}: cannot write (No space left on device); none of the outputs was written"]
    assert list(tmp_path.iterdir()) == []  # neither the report, nor the per-token file, nor a temporary


# ---- values from the data print as they are ---------------------------------------------------------------


def test_markup_in_sample_ids_prints_literally(toy, tmp_path):
    import pyarrow as pa

    table = pa.ipc.open_file(str(toy / "rollouts.arrow")).read_all()
    ids = [f"[/]{i}" if i % 2 else f"[link=https://example.invalid]click-me[/link]{i}" for i in range(table.num_rows)]
    table = table.set_column(table.schema.get_field_index("sample_id"), "sample_id", pa.array(ids, pa.string()))
    rollouts = tmp_path / "marked.arrow"
    with pa.OSFile(str(rollouts), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    runner = CliRunner(env={"COLUMNS": "250"})
    audit = runner.invoke(app, ["inspect", str(rollouts), "--model", str(toy / "model"), "--top", "20",
                                "--fail-above", "tr/outside_frac=0"])
    assert audit.exit_code == 3, audit.output  # the gate's code, not a crash in the table
    shown = [i for i in ids if i in audit.stdout]
    assert any(i.startswith("[/]") for i in shown) and any(i.startswith("[link=") for i in shown), audit.stdout
    assert "\x1b]8;" not in audit.stdout  # no terminal hyperlink
    trained = runner.invoke(app, ["train", "-r", str(rollouts), "-m", str(toy / "model"), "--out", str(tmp_path / "out"),
                                  "--lr", "1e-3", "--micro-batch-tokens", "512"])
    assert trained.exit_code == 0, trained.output
    assert any(i in trained.stdout for i in ids)  # the worst-samples table, literally
