"""`drpo train` options: validated before any model or data is loaded, every problem listed at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from drpo_cli.cli import app
from drpo_cli.config import LOSS_HPARAMS, TrainConfig
from drpo_cli.objectives.catalog import SETTINGS
from drpo_cli.reports.report_format import TRAIN_REPORT_SCHEMA

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def paths(tmp_path):
    """An existing rollout file and model directory (contents irrelevant: nothing is loaded)."""
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "r.arrow").write_bytes(b"")
    return tmp_path


def cfg(paths: Path, **kw) -> TrainConfig:
    return TrainConfig(rollouts=(str(paths / "r.arrow"),), model=str(paths / "ckpt"), **kw)


def test_defaults_are_valid(paths):
    c = cfg(paths)
    assert c.validate() == []
    assert c.check() is c
    assert c.loss_hparams() == {"delta": 12.5}  # SPEC.md §1: drpo δ = 12.5


def test_every_problem_is_listed_at_once(paths):
    c = cfg(paths, loss="spo", delta=0.1, eps=-1.0, epochs=0, minibatches=0, lr=0.0, agg="mean",
            device="tpu", tr_delta=1.5, columns=("nonsense",))
    problems = c.validate()
    # 9 problems: --delta not an spo option, eps <= 0, epochs 0, minibatches 0, lr 0, agg, device,
    # tr_delta > 1, --column without '='.
    assert len(problems) == 9, problems
    assert any("--delta does not apply to --loss spo" in p for p in problems)
    with pytest.raises(Exception) as err:
        c.check()
    assert err.value.exit_code == 2
    assert err.value.message == "9 problems with the options"
    assert err.value.details == problems


@pytest.mark.parametrize("loss", sorted(LOSS_HPARAMS))
def test_only_the_chosen_losses_hyperparameters_are_accepted(paths, loss):
    # A value within its bound for every setting of the registry: the first declaring loss's default, else 3.
    valid = {name: next(v for v in (s.default, 3.0) if v is not None and (s.bound is None or s.bound.test(v)))
             for name, s in SETTINGS.items()}
    c = cfg(paths, loss=loss, **valid)
    wrong = [p for p in c.validate() if "does not apply" in p]
    assert len(wrong) == len(valid) - len(LOSS_HPARAMS[loss])
    ok = cfg(paths, loss=loss, **{k: valid[k] for k in LOSS_HPARAMS[loss]})
    assert ok.validate() == []
    assert ok.loss_hparams() == {k: valid[k] for k in LOSS_HPARAMS[loss]}


@pytest.mark.parametrize("loss", ["cispo", "ppo-clip", "gspo"])
def test_eps_low_one_is_accepted_and_outside_zero_one_refused(paths, loss):
    # ε_low = 1: lower bound 0, CISPO's own (default) setting; 0 and > 1 are no bound at all.
    assert cfg(paths, loss=loss, eps_low=1.0).validate() == []
    for bad in (0.0, 1.5):
        assert cfg(paths, loss=loss, eps_low=bad).validate() == [
            f"--eps-low must be in (0, 1] (1: no lower clip), got {bad}"]


def test_combination_rules(paths):
    assert cfg(paths, is_correction="tis").validate() == [
        "--is-correction tis needs --anchor proximal (with the behavior anchor ρ = 1)"
    ]
    assert cfg(paths, anchor="proximal", is_correction="tis", is_band=(0.5, 2.0)).validate() == [
        "--is-band applies only to --is-correction mis and --correction seq-mask-tis"
    ]
    assert cfg(paths, anchor="proximal", is_correction="mis", is_band=(2.0, 0.5)).validate() == [
        "--is-band must satisfy 0 <= lo < hi, got 2.0 0.5"
    ]
    for dtype in ("bf16", "fp16", "fp32"):  # mixed precision runs on the CPU too (torch's CPU autocast)
        assert cfg(paths, dtype=dtype, device="cpu").validate() == []
    assert cfg(paths, dtype="fp8").validate() == ["--dtype 'fp8': expected one of auto, bf16, fp16, fp32"]
    assert cfg(paths, out=str(paths / "ckpt")).validate() == [
        (f"--out {paths / 'ckpt'}: is the input --model {paths / 'ckpt'} (an output may not be, contain or lie "
        "inside an input)")
    ]
    (paths / "taken").mkdir()
    assert cfg(paths, out=str(paths / "taken")).validate() == [
        f"--out {paths / 'taken'}: already exists (pass --overwrite to replace it)"
    ]
    assert cfg(paths, out=str(paths / "taken"), overwrite=True).validate() == []


def test_new_options_every_problem_listed_before_anything_loads(paths):
    c = cfg(paths, reject=("seq_mean_k3>0.01", "seq_median_k3>1", "token_k4>1", "token_k1=2", "seq_max_k2>abc"),
            ref_model=str(paths / "nowhere"), kl_coef=-1.0, kl_estimator="k5", entropy_coef=-0.1,
            is_level="sequence", max_lag=-1, min_version=-2)
    hint = ("expected LEVEL_kN>NUMBER or LEVEL_kN<NUMBER with LEVEL one of token, seq_sum, seq_mean, seq_max "
            "and N 1, 2 or 3, e.g. seq_mean_k3>0.01")
    assert c.validate() == [
        "--is-level sequence applies to --is-correction tis or mis",
        f"--reject 'seq_median_k3>1': {hint}",
        f"--reject 'token_k4>1': {hint}",
        f"--reject 'token_k1=2': {hint}",
        f"--reject 'seq_max_k2>abc': {hint}",
        f"--ref-model {paths / 'nowhere'}: not a directory (expected a Hugging Face checkpoint directory)",
        "--kl-coef must be >= 0, got -1.0",
        "--kl-estimator 'k5': expected one of k1, k2, k3",
        "--entropy-coef must be >= 0, got -0.1",
        "--max-lag must be >= 0, got -1",
        "--min-version must be >= 0, got -2",
    ]
    assert cfg(paths, kl_coef=0.1).validate() == ["--kl-coef needs --ref-model (the KL penalty is to a reference model)"]
    good = cfg(paths, reject=("seq_mean_k3>0.01", "token_k1 < -0.5"), ref_model=str(paths / "ckpt"))
    assert good.validate() == []
    assert good.reject_criteria() == [("seq_mean", "k3", ">", 0.01), ("token", "k1", "<", -0.5)]
    assert good.resolved_kl_coef() == 0.001 and cfg(paths).resolved_kl_coef() == 0.0
    assert good.needs_old_logprobs() and not cfg(paths).needs_old_logprobs()


def test_nan_is_rejected(paths):
    bound = "--lr must be > 0 and <= 3.4e37 (AdamW's first update, 10·lr, is a float32), got"
    assert cfg(paths, lr=float("nan")).validate() == [f"{bound} nan"]
    assert cfg(paths, lr=1e38).validate() == [f"{bound} 1e+38"]  # its update would overflow the weights


def test_column_map(paths):
    c = cfg(paths, columns=("logprobs=behavior_logprobs", "adv = advantage"))
    assert c.validate() == []
    assert c.column_map() == {"logprobs": "behavior_logprobs", "adv": "advantage"}
    assert len(cfg(paths, columns=("a=b",)).validate()) == 1  # b is not a schema v1 column


def test_config_is_json_ready(paths):
    d = cfg(paths, anchor="proximal", is_correction="mis", is_band=(0.25, 4.0)).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["is_band"] == [0.25, 4.0] and d["loss_hparams"] == {"delta": 12.5}


def test_config_does_not_import_torch():
    code = "import sys, drpo_cli.config, drpo_cli.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_report_schema_file_equals_the_code():
    on_disk = json.loads((ROOT / "schemas" / "train-report.schema.json").read_text())
    assert on_disk == TRAIN_REPORT_SCHEMA


# ---- command line: one line, exit 2, nothing written --------------------------------------------


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--loss", "ppo"], ("error: --loss 'ppo': expected one of pg-is, ppo-clip, spo, dppo-tv, dppo-kl, drpo, gspo, "
                             "cispo, sapo, gmpo, topr, kimi15, dppo-tv-sq, vespo, clip-cov, kl-cov")),
        (["--epochs", "0"], "error: --epochs must be >= 1, got 0"),
        (["--loss", "pg-is", "--delta", "0.2"], "error: --delta does not apply to --loss pg-is (its options: none)"),
        (["--micro-batch-tokens", "-5"], "error: --micro-batch-tokens must be >= 1, got -5"),
        (["--anchor", "old"], "error: --anchor 'old': expected one of behavior, proximal"),
    ],
)
def test_cli_bad_values(paths, args, message):
    before = _listing(paths)
    result = CliRunner().invoke(app, ["train", "-r", str(paths / "r.arrow"), "-m", str(paths / "ckpt"), *args])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [message]
    assert _listing(paths) == before


def test_cli_missing_files(paths):
    before = _listing(paths)
    runner = CliRunner()
    missing_rollouts = runner.invoke(app, ["train", "-r", str(paths / "nope.arrow"), "-m", str(paths / "ckpt")])
    missing_model = runner.invoke(app, ["train", "-r", str(paths / "r.arrow"), "-m", str(paths / "nockpt")])
    assert missing_rollouts.exit_code == missing_model.exit_code == 2
    assert missing_rollouts.stderr.splitlines() == [f"error: --rollouts {paths / 'nope.arrow'}: no such file or directory"]
    assert missing_model.stderr.splitlines() == [
        f"error: --model {paths / 'nockpt'}: not a directory (expected a Hugging Face checkpoint directory)"
    ]
    both = runner.invoke(app, ["train", "-r", str(paths / "nope.arrow"), "-m", str(paths / "nockpt")])
    assert both.stderr.splitlines()[0] == "error: 2 problems with the options"  # then one line per problem
    assert _listing(paths) == before


def test_cli_out_exists(paths):
    (paths / "out").mkdir()
    before = _listing(paths)
    result = CliRunner().invoke(
        app, ["train", "-r", str(paths / "r.arrow"), "-m", str(paths / "ckpt"), "--out", str(paths / "out")]
    )
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"error: --out {paths / 'out'}: already exists (pass --overwrite to replace it)"]
    assert _listing(paths) == before


def test_ref_model_is_an_input_of_the_output_rule(paths):
    (paths / "ref").mkdir()
    ref = str(paths / "ref")
    assert cfg(paths, ref_model=ref, out=ref).validate() == [
        f"--out {ref}: is the input --ref-model {ref} (an output may not be, contain or lie inside an input)"
    ]
    assert cfg(paths, ref_model=ref, out=str(paths / "elsewhere")).validate() == []


def test_filter_lines_for_the_console():
    from drpo_cli.reports.report_format import filter_lines

    staleness = {"max_lag": 2, "min_version": None, "current_version": 8, "rows_dropped": 72, "tokens_dropped": 656,
                 "tokens_masked": 0, "rows_kept": 120, "rows_without_version": 0}
    rejection = {"criteria": ["seq_mean_k3>0.02"], "tokens_rejected": 81, "token_frac": 0.125, "sequences_rejected": 15,
                 "seq_frac": 0.125}
    assert filter_lines(staleness, rejection) == [
        "--max-lag 2: dropped 72 rows (656 trained tokens), kept 120 (current version 8)",
        "--reject seq_mean_k3>0.02: rejected 81 tokens (0.125) and 15 sequences (0.125)",
    ]
    assert filter_lines({**staleness, "max_lag": None}, None) == []
    assert filter_lines({**staleness, "tokens_masked": 1234}, None) == [  # token_policy_versions
        ("--max-lag 2: dropped 72 rows (656 trained tokens), masked 1,234 tokens of kept rows, kept 120 "
         "(current version 8)")]
