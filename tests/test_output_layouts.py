"""Random layouts of inputs and outputs through the real CLI (hypothesis): siblings, parents, children,
symlinks, the same path given twice. Whatever the layout: exit 0 or 2; no input byte changes; nothing
drpo did not write disappears or changes; a refusal (2) changes nothing at all; no hidden temporaries."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import FAST_TRAIN, TOY, valid_rollout_table, write_rollout_table
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from drpo_cli.cli import app

FAST = FAST_TRAIN

# Paths (relative to the layout's root) that commands may be pointed at. The layout:
#   data/r.arrow, data/more/r2.arrow        rollouts (inputs)      notes/notes.txt   the user's own file
#   model/                                  a checkpoint (input)   ckpt/             a checkpoint drpo wrote
#   report.json                             a report drpo wrote    empty/            an empty directory
#   link-data -> data, link-model -> model, link-report -> report.json, link-notes -> notes/notes.txt
ROLLOUTS = ["data/r.arrow", "data/more", "data/more/r2.arrow", "link-data/r.arrow", "data/../data/r.arrow"]
MODELS = ["model", "link-model", "ckpt", "model/../model"]
PATHS = [
    ".", "data", "data/r.arrow", "data/more", "data/more/r2.arrow", "data/new.json", "link-data",
    "link-data/new", "model", "model/config.json", "model/sub/x", "link-model", "link-model/../new",
    "ckpt", "ckpt/config.json", "report.json", "link-report", "notes", "notes/notes.txt", "link-notes",
    "empty", "new", "new.json", "deep/new", "data/../new2", "ckpt.partial-state", "model.partial-state",
]
# Half the draws: paths a command may write to (new, empty, or drpo's own), so that runs also succeed.
TARGETS = st.sampled_from(PATHS) | st.sampled_from(["new", "deep/new", "empty", "ckpt", "report.json", "link-report"])


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> Path:
    """A checkpoint and a JSON report that drpo wrote, made once and copied into every layout."""
    if not (TOY / "model").is_dir():
        pytest.fail("examples/toy/model is missing: it is committed (git checkout examples/toy), "
                    "or rebuild it with python examples/make_example.py")
    root = tmp_path_factory.mktemp("templates")
    rollouts = write_rollout_table(valid_rollout_table(), root / "r.arrow")
    res = CliRunner().invoke(app, ["train", "-r", str(rollouts), "-m", str(TOY / "model"), "--out",
                                   str(root / "ckpt"), *FAST])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["inspect", str(rollouts), "--json", str(root / "report.json"), "-q"])
    assert res.exit_code == 0, res.output
    return root


def make_layout(root: Path, templates: Path) -> set[str]:
    """Build the layout under `root`; returns the relative paths of the files drpo wrote."""
    (root / "data" / "more").mkdir(parents=True)
    write_rollout_table(valid_rollout_table(), root / "data" / "r.arrow")
    other_ids = valid_rollout_table(sample_id=(["t0", "t1", "t2", "t3"], pa.string()))
    write_rollout_table(other_ids, root / "data" / "more" / "r2.arrow", fmt="parquet")
    shutil.copytree(TOY / "model", root / "model")
    shutil.copytree(templates / "ckpt", root / "ckpt")
    shutil.copy(templates / "report.json", root / "report.json")
    (root / "notes").mkdir()
    (root / "notes" / "notes.txt").write_text("my notes")
    (root / "empty").mkdir()
    for link, target in (("link-data", "data"), ("link-model", "model"), ("link-report", "report.json"),
                         ("link-notes", "notes/notes.txt")):
        (root / link).symlink_to(target)
    return {f"ckpt/{p.name}" for p in (root / "ckpt").iterdir()} | {"report.json"}


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root`, not following symlinks: files by content hash, links by target."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(d) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def under(rel: str, root: Path, prefixes: list[Path]) -> bool:
    real = Path(os.path.realpath(root / rel))
    return any(real == p or p in real.parents for p in prefixes)


def check_run(root: Path, drpo_files: set[str], inputs: list[str], outputs: list[str], argv: list[str]) -> None:
    before = snapshot(root)
    res = CliRunner().invoke(app, argv)
    after = snapshot(root)
    assert res.exit_code in (0, 2), (argv, res.output)
    assert not [k for k in after if ".tmp-" in k or ".old-" in k], (argv, after)
    if res.exit_code == 2:
        assert after == before, argv
        assert len(res.stderr.splitlines()) >= 1
        return
    in_reals = [Path(os.path.realpath(root / p)) for p in inputs]
    out_reals = [Path(os.path.realpath(root / p)) for p in outputs]
    assert all(p.exists() for p in out_reals), argv
    for rel, value in before.items():
        if under(rel, root, in_reals) or rel not in drpo_files or not under(rel, root, out_reals):
            # inputs, the user's files and anything outside the outputs: untouched
            assert after.get(rel) == value, (argv, rel)


@settings(max_examples=80, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(rollouts=st.lists(st.sampled_from(ROLLOUTS), min_size=1, max_size=2),
       model=st.none() | st.sampled_from(MODELS),
       json_out=st.none() | TARGETS, per_token=st.none() | TARGETS,
       overwrite=st.booleans())
@example(rollouts=["data/r.arrow"], model="ckpt", json_out="link-report", per_token="new", overwrite=True)
def test_inspect_in_any_layout(templates, rollouts, model, json_out, per_token, overwrite):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(os.path.realpath(tmp))
        drpo_files = make_layout(root, templates)
        if model is None or per_token is None:
            per_token = None  # per-token diagnostics need a model; the cheap data-only audit otherwise
        argv = ["inspect", *(str(root / r) for r in rollouts), "-q"]
        argv += ["--model", str(root / model)] if model else []
        argv += ["--json", str(root / json_out)] if json_out else []
        argv += ["--per-token", str(root / per_token)] if per_token else []
        argv += ["--overwrite"] if overwrite else []
        outs = [p for p in (json_out, per_token) if p]
        check_run(root, drpo_files, rollouts + ([model] if model else []), outs, argv)


@settings(max_examples=16, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(rollouts=st.lists(st.sampled_from(ROLLOUTS), min_size=1, max_size=2), model=st.sampled_from(MODELS),
       out=TARGETS, overwrite=st.booleans())
@example(rollouts=["data/r.arrow"], model="model", out="ckpt", overwrite=True)  # replaces drpo's checkpoint
@example(rollouts=["data/more"], model="ckpt", out="ckpt", overwrite=True)  # the input itself
def test_train_in_any_layout(templates, rollouts, model, out, overwrite):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(os.path.realpath(tmp))
        drpo_files = make_layout(root, templates)
        argv = ["train", *(a for r in rollouts for a in ("-r", str(root / r))), "-m", str(root / model),
                "--out", str(root / out), *FAST, *(["--overwrite"] if overwrite else [])]
        check_run(root, drpo_files, rollouts + [model], [out], argv)
