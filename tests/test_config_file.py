"""`drpo train --config FILE` (TOML / JSON / a checkpoint's drpo_checkpoint.json) and `--tensorboard DIR`."""

from __future__ import annotations

import json

import pytest
from conftest import FAST_TRAIN
from safetensors.torch import load_file
from typer.testing import CliRunner

from drpo_cli.base.errors import ConfigError
from drpo_cli.cli import app
from drpo_cli.config import TrainConfig
from drpo_cli.config_file import train_config

FAST = [*FAST_TRAIN, "--minibatches", "2"]


def test_toml_fields_flags_override_and_types(tmp_path, toy):
    path = tmp_path / "run.toml"
    path.write_text(f'rollouts = ["{toy / "rollouts.arrow"}"]\nmodel = "{toy / "model"}"\nloss = "ppo-clip"\n'
                    'eps_high = 0.3\nlr = 1\nis_band = [0.5, 2]\ncolumns = "a=advantage"\n', encoding="utf-8")
    cfg = train_config(str(path), {"lr": 2e-6})
    assert cfg == TrainConfig(rollouts=(str(toy / "rollouts.arrow"),), model=str(toy / "model"), loss="ppo-clip",
                              eps_high=0.3, lr=2e-6, is_band=(0.5, 2.0), columns=("a=advantage",))
    assert isinstance(train_config(str(path), {}).lr, float)
    # Another loss on the command line drops the file's hyper-parameters of its own loss.
    assert train_config(str(path), {"loss": "drpo"}).eps_high is None


def test_unknown_keys_and_wrong_types_are_all_refused_with_the_valid_keys(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('epochs = "two"\nlearning_rate = 1e-6\ngrad_checkpointing = 1\n', encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        train_config(str(path), {})
    lines = err.value.details
    assert len(lines) == 3 and all(str(path) in line for line in lines)
    assert "key 'epochs': expected an integer, found 'two'" in lines[0]
    assert "unknown key 'learning_rate'" in lines[1] and "valid keys: rollouts, model, out" in lines[1]
    assert "expected true or false" in lines[2]
    res = CliRunner().invoke(app, ["train", "--config", str(path)])
    assert res.exit_code == 2 and "3 problems" in res.stderr
    (tmp_path / "broken.json").write_text('{"lr": 1e-6,}', encoding="utf-8")
    res = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "broken.json")])
    assert res.exit_code == 2 and "line 1, column" in res.stderr and "not valid JSON" in res.stderr


def test_a_checkpoint_reruns_its_run_exactly_and_tensorboard_rounds_form_one_curve(toy, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = tmp_path / "tb"
    runner = CliRunner()
    first = ["train", "-r", str(toy / "rollouts.arrow"), "-m", str(toy / "model"), "--out", str(tmp_path / "v9"),
             "--tensorboard", str(board), *FAST]
    assert runner.invoke(app, first).exit_code == 0
    # The training block of drpo_checkpoint.json as it is; --out (a flag) overrides the recorded one.
    rerun = runner.invoke(app, ["train", "--config", str(tmp_path / "v9" / "drpo_checkpoint.json"),
                                "--out", str(tmp_path / "again"), "--tensorboard", str(tmp_path / "tb-rerun")])
    assert rerun.exit_code == 0, rerun.output
    a, b = load_file(str(tmp_path / "v9" / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bit for bit
    # Round two, from v9 (policy version 9): its steps continue the curve of round one (version 8).
    second = ["train", "-r", str(toy / "rollouts.arrow"), "-m", str(tmp_path / "v9"), "--out", str(tmp_path / "v10"),
              "--tensorboard", str(board), *FAST]
    assert runner.invoke(app, second).exit_code == 0
    events = EventAccumulator(str(board)).Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    outside = [(e.step, e.value) for e in events.Scalars("tr/outside_frac")]
    reports = [json.loads((tmp_path / d / "drpo_report.json").read_text()) for d in ("v9", "v10")]
    steps = [s for r in reports for s in r["steps"]]
    assert [s for s, _ in loss] == [16, 17, 18, 19]  # policy version × 2 steps per round + step
    assert [v for _, v in loss] == pytest.approx([s["loss"] for s in steps])
    assert [v for _, v in outside] == pytest.approx([s["metrics"]["tr/outside_frac"] for s in steps])
    final = [(e.step, e.value) for e in events.Scalars("final/tr/outside_frac")]
    assert final == [(17, pytest.approx(reports[0]["final"]["metrics"]["tr/outside_frac"])),
                     (19, pytest.approx(reports[1]["final"]["metrics"]["tr/outside_frac"]))]
