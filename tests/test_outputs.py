"""The one output rule (drpo_cli/base/outputs.py) through the real CLI: inputs are never touched, --overwrite
replaces only what drpo wrote, replacements leave nothing behind, files honour the umask."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import FAST_TRAIN, TOY, valid_rollout_table, write_rollout_table
from typer.testing import CliRunner

from drpo_cli.base import outputs
from drpo_cli.base.errors import ConfigError
from drpo_cli.cli import app

FAST = FAST_TRAIN


@pytest.fixture(scope="module")
def toy_src() -> Path:
    if not (TOY / "model").is_dir():
        pytest.fail("examples/toy/model is missing: it is committed (git checkout examples/toy), "
                    "or rebuild it with python examples/make_example.py")
    return TOY


@pytest.fixture
def work(toy_src, tmp_path) -> Path:
    """tmp_path/work/{model/, rollouts.arrow}: a private copy of the bundled example."""
    root = tmp_path / "work"
    shutil.copytree(toy_src, root)
    return root


def tree(root: Path) -> dict[str, str]:
    """Every file under `root` (hidden ones too) -> sha256 of its bytes; directories as 'dir'."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "link" if p.is_symlink() else "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cli(*argv) -> object:
    return CliRunner().invoke(app, [str(a) for a in argv])


def train(rollouts, model, out, *args):
    return cli("train", "-r", rollouts, "-m", model, "--out", out, *FAST, *args)


def error_line(res, code: int = 2) -> str:
    assert res.exit_code == code, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# ---- the scenarios ------------------------------------------------------------------------


def test_out_equal_to_the_rollout_directory_is_refused(work, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.move(work / "rollouts.arrow", runs / "rollouts.arrow")
    before = tree(tmp_path)
    line = error_line(train(runs, work / "model", runs, "--overwrite"))
    assert line == (f"error: --out {runs}: is the input --rollouts {runs} "
                    "(an output may not be, contain or lie inside an input)")
    assert tree(tmp_path) == before


def test_out_that_contains_the_inputs_is_refused(work, tmp_path):
    before = tree(tmp_path)
    line = error_line(train(work / "rollouts.arrow", work / "model", work, "--overwrite"))
    assert line == (f"error: --out {work}: contains the input --rollouts {work / 'rollouts.arrow'} "
                    "(an output may not be, contain or lie inside an input)")
    assert tree(tmp_path) == before


def test_out_equal_to_the_rollout_file_is_refused_and_leaves_nothing(work, tmp_path):
    before = tree(tmp_path)
    line = error_line(train(work / "rollouts.arrow", work / "model", work / "rollouts.arrow", "--overwrite"))
    assert f"--out {work / 'rollouts.arrow'}: is the input --rollouts {work / 'rollouts.arrow'}" in line
    assert tree(tmp_path) == before  # no hidden .old- or .tmp- sibling either


def test_overwrite_refuses_a_directory_drpo_did_not_write(work, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    (notes / "plan.md").write_text("mine too")
    (notes / "sub").mkdir()
    (notes / "z.txt").write_text("and this")
    before = tree(tmp_path)
    line = error_line(train(work / "rollouts.arrow", work / "model", notes, "--overwrite"))
    assert line == (f"error: --out {notes}: holds 4 files drpo did not write: notes.txt, plan.md, sub/, … "
                    "(--overwrite replaces only what drpo wrote)")
    assert tree(tmp_path) == before


def test_overwrite_refuses_a_checkpoint_with_files_added(work, tmp_path):
    out = tmp_path / "ckpt-v9"
    assert train(work / "rollouts.arrow", work / "model", out).exit_code == 0
    (out / "notes.txt").write_text("eval results")
    before = tree(tmp_path)
    line = error_line(train(work / "rollouts.arrow", work / "model", out, "--overwrite"))
    assert line == (f"error: --out {out}: holds 1 file drpo did not write: notes.txt "
                    "(--overwrite replaces only what drpo wrote)")
    assert tree(tmp_path) == before


def test_overwrite_refuses_a_model_directory_drpo_did_not_write(work, tmp_path):
    # examples/toy/model has a drpo_checkpoint.json (its policy version) but it lists no files drpo wrote.
    other = tmp_path / "other"
    shutil.copytree(work / "model", other)
    line = error_line(train(work / "rollouts.arrow", work / "model", other, "--overwrite"))
    assert f"--out {other}: holds 6 files drpo did not write: config.json, drpo_checkpoint.json, " in line


def test_overwrite_replaces_drpo_checkpoint_and_leaves_no_hidden_sibling(work, tmp_path):
    out = tmp_path / "out"
    assert train(work / "rollouts.arrow", work / "model", out).exit_code == 0
    first = json.loads((out / "drpo_checkpoint.json").read_text())
    assert first["files"] == sorted(p.name for p in out.iterdir())
    res = train(work / "rollouts.arrow", work / "model", out, "--overwrite", "--loss", "pg-is")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "drpo_checkpoint.json").read_text())["training"]["loss"] == "pg-is"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "work"]


def test_inspect_json_inside_the_model_is_refused(work, tmp_path):
    before = tree(tmp_path)
    config = work / "model" / "config.json"
    line = error_line(cli("inspect", work / "rollouts.arrow", "--model", work / "model", "--json", config))
    assert line == (f"error: --json {config}: is inside the input --model {work / 'model'} "
                    "(an output may not be, contain or lie inside an input)")
    assert tree(tmp_path) == before


def test_inspect_json_over_a_file_drpo_did_not_write(valid_rollout_path, tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text('{"results": [1, 2]}')
    assert error_line(cli("inspect", valid_rollout_path, "--json", mine, "-q")) == (
        f"error: --json {mine}: already exists (pass --overwrite to replace it)")
    assert error_line(cli("inspect", valid_rollout_path, "--json", mine, "-q", "--overwrite")) == (
        f"error: --json {mine}: is a file drpo did not write (not a drpo JSON report) "
        "(--overwrite replaces only what drpo wrote)")
    assert mine.read_text() == '{"results": [1, 2]}'
    report = tmp_path / "report.json"
    assert cli("inspect", valid_rollout_path, "--json", report, "-q").exit_code == 0
    assert cli("inspect", valid_rollout_path, "--json", report, "-q", "--overwrite").exit_code == 0
    assert json.loads(report.read_text())["report"] == "drpo-inspect"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.json", "report.json", "rollouts.arrow"]


def test_symlinks_and_dotdot_do_not_get_around_the_rule(work, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(work)
    json_link = tmp_path / "report.json"
    json_link.symlink_to(work / "rollouts.arrow")
    before = tree(tmp_path)
    line = error_line(train(work / "rollouts.arrow", work / "model", link, "--overwrite"))
    assert line == (f"error: --out {link} (= {work}): contains the input --rollouts {work / 'rollouts.arrow'} "
                    "(an output may not be, contain or lie inside an input)")
    dotdot = work / "model" / ".." / "model"
    line = error_line(train(work / "rollouts.arrow", link / "model", dotdot, "--overwrite"))
    assert f"--out {dotdot}: is the input --model {link / 'model'} (= {work / 'model'})" in line
    line = error_line(cli("inspect", work / "rollouts.arrow", "--json", json_link, "--overwrite"))
    assert f"--json {json_link} (= {work / 'rollouts.arrow'}): is the input" in line
    assert tree(tmp_path) == before


def test_the_state_directory_is_an_output_too(work, tmp_path):
    state_named = tmp_path / "m.partial-state"
    shutil.copytree(work / "model", state_named)
    line = error_line(train(work / "rollouts.arrow", state_named, tmp_path / "m"))
    assert line == (f"error: state directory {state_named}: is the input --model {state_named} "
                    "(an output may not be, contain or lie inside an input)")


def test_two_outputs_may_not_overlap(valid_rollout_path, tmp_path):
    out = tmp_path / "x.arrow"
    line = error_line(cli("inspect", valid_rollout_path, "--model", TOY / "model", "--json", out, "--per-token", out))
    assert line == f"error: --json {out}: is --per-token {out} (two outputs may not overlap)"


# ---- permissions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_every_output_honours_the_umask(work, tmp_path, mask):
    old = os.umask(mask)
    try:
        out = tmp_path / "out"
        assert train(work / "rollouts.arrow", work / "model", out).exit_code == 0
        res = cli("inspect", work / "rollouts.arrow", "--model", out, "--json", tmp_path / "r.json",
                  "--per-token", tmp_path / "t.arrow", "-q")
        assert res.exit_code == 0, res.output
    finally:
        os.umask(old)
    files = [p for p in out.iterdir()] + [tmp_path / "r.json", tmp_path / "t.arrow"]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o666 & ~mask for p in files}
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    assert pa.ipc.open_file(str(tmp_path / "t.arrow")).schema.metadata[outputs.ARROW_MARKER_KEY] == b"per-token"


# ---- the module itself ------------------------------------------------------------------------------


def test_publish_dir_puts_the_old_output_back_when_the_rename_fails(tmp_path, monkeypatch):
    dest = tmp_path / "ckpt"
    with outputs.atomic_dir(dest, "checkpoint", overwrite=False) as tmp:
        (tmp / "a.txt").write_text("old")
        outputs.write_marker(tmp, "checkpoint", {"policy_version": 1})
    before = tree(tmp_path)
    real_rename = os.rename

    def failing(src, dst):
        if Path(src).name.startswith(".ckpt.tmp-"):
            raise OSError("disk full")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)  # the fallback: old aside, new in
    with pytest.raises(OSError, match="disk full"), outputs.atomic_dir(dest, "checkpoint", overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new")
        outputs.write_marker(tmp, "checkpoint", {"policy_version": 2})
    assert tree(tmp_path) == before


@pytest.mark.parametrize("exchange", [True, False])
def test_publish_dir_replaces_with_or_without_an_atomic_exchange(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    dest = tmp_path / "ckpt"
    for version in (1, 2):
        with outputs.atomic_dir(dest, "checkpoint", overwrite=True) as tmp:
            (tmp / f"v{version}.txt").write_text(str(version))
            outputs.write_marker(tmp, "checkpoint", {"policy_version": version})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in dest.iterdir()) == ["drpo_checkpoint.json", "v2.txt"]


def test_exchange_swaps_two_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not outputs._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) not available here")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_atomic_file_leaves_nothing_on_error(tmp_path):
    dest = tmp_path / "r.json"
    with pytest.raises(RuntimeError), outputs.atomic_file(dest, "json", overwrite=False) as tmp:
        tmp.write_text("{}")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_path_that_appears_while_writing_is_not_replaced(tmp_path):
    dest = tmp_path / "r.json"
    with pytest.raises(ConfigError, match="already exists"), outputs.atomic_file(dest, "json", overwrite=False) as tmp:
        tmp.write_text('{"report": "drpo-inspect"}')
        dest.write_text("someone else's")
    assert dest.read_text() == "someone else's" and list(tmp_path.iterdir()) == [dest]


@pytest.mark.parametrize("kind,content,drpo", [
    ("json", '{"report": "drpo-inspect", "x": 1}', True),
    ("json", '{"report": "other"}', False),
    ("json", "[1, 2]", False),
    ("json", "not json", False),
    ("html", f"<!doctype html>{outputs.HTML_MARKER}<p>", True),
    ("html", "<!doctype html><p>", False),
    ("json", "", True),  # an empty file holds nothing
])
def test_which_files_are_drpo_s(tmp_path, kind, content, drpo):
    path = tmp_path / "f"
    path.write_text(content)
    assert (outputs.foreign(path, kind) is None) == drpo


def test_arrow_files_are_drpo_s_by_their_schema_metadata(tmp_path):
    table = valid_rollout_table()
    mine = write_rollout_table(table, tmp_path / "a.arrow", metadata={"drpo.output": "rollouts"})
    theirs = write_rollout_table(table, tmp_path / "b.arrow")
    parquet = write_rollout_table(table, tmp_path / "c.parquet", fmt="parquet", metadata={"drpo.output": "rollouts"})
    stream = write_rollout_table(table, tmp_path / "d.arrows", fmt="stream", metadata={"drpo.output": "rollouts"})
    assert outputs.foreign(mine, "arrow") is None and outputs.foreign(parquet, "arrow") is None
    assert outputs.foreign(stream, "arrow") is None
    assert outputs.foreign(theirs, "arrow") == "is a file drpo did not write (not a drpo Arrow file)"


def test_the_resumable_state_is_drpo_s_and_honours_the_umask(work, tmp_path):
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        res = CliRunner().invoke(app, ["train", "-r", str(work / "rollouts.arrow"), "-m", str(work / "model"),
                                       "--out", str(out), "--minibatches", "2", *FAST],
                                 env={"DRPO_INTERRUPT_AFTER_STEP": "0"})
    finally:
        os.umask(old)
    assert res.exit_code == 130, res.output
    state = tmp_path / "out.partial-state"
    listed = json.loads((state / "state.json").read_text())["files"]
    assert listed == ["dcp/", "rng.safetensors", "state.json"]  # dcp/: model + optimizer (torch.distributed.checkpoint)
    assert sorted(p.name for p in state.iterdir()) == ["dcp", "rng.safetensors", "state.json"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in state.rglob("*") if p.is_file()} == {0o644}
    assert {stat.S_IMODE(p.stat().st_mode) for p in [state, *state.rglob("*")] if p.is_dir()} == {0o755}
    line = error_line(train(work / "rollouts.arrow", work / "model", out))
    assert line == f"error: {state}: an interrupted run's state; pass --resume to continue it or delete it"

    mine = tmp_path / "mine.partial-state"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    line = error_line(train(work / "rollouts.arrow", work / "model", tmp_path / "mine"))
    assert line == (f"error: {mine}: holds 1 file drpo did not write: notes.txt; train keeps an interrupted "
                    "run's state there: move it or choose another --out")
    assert (mine / "notes.txt").read_text() == "mine"
