"""No legal input loses a run: every command finishes with strict JSON, or refuses before any work.

A Hypothesis strategy builds rollout files that schema v1 allows but that a first implementation
rarely meets: NaN, ±inf and positive log-probs (and advantages) under loss_mask 0, μ = 1 exactly,
log-probs near −1e4, all advantages 0, huge finite advantages, a row with every token masked, one
row, no optional column at all, very long rows, duplicate sample_ids, a single group, every row of
one lag. On each file `drpo validate` must accept it, and `drpo inspect` (data-only and with the
example model, with --json, --per-token and --html) and `drpo train` must each either exit 0 with
reports that are strict JSON (no NaN/Infinity: parsed with a hook that refuses them), or exit 2
with one line and nothing written. Named cases of the issue run every time (`@example`); more
random ones in the slow tier.

Reports go through `report.finite_or_null` on their way to JSON; under pytest the warning it
gives when it has to replace a value is an error (pyproject.toml), so a NaN that reaches a report
fails here even though the user would get null.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import TOY, write_rollout_table
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from drpo_cli.cli import app

MODEL = TOY / "model"
VOCAB = 21  # the example model's vocabulary (config.json)
runner = CliRunner()

NON_FINITE = [math.nan, math.inf, -math.inf]
UNTRAINED_LOGPROBS = [*NON_FINITE, 5.0, 0.0, -1e4, -0.7]  # anything goes where loss_mask is 0


# ---- the files --------------------------------------------------------------------------------


def _row(draw, i: int, opts: dict) -> dict:
    long = opts["long_row"] and i == 0
    n = draw(st.integers(150, 400)) if long else draw(st.integers(1, 6))
    prompt = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=4))
    response = draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n))
    masked_row = opts["masked_row"] and i == opts["rows"] - 1
    mask = ([False] * n if masked_row else draw(st.lists(st.booleans(), min_size=n, max_size=n))
            if opts["loss_mask"] else [True] * n)
    trained_logp = {"near -1e4": st.floats(-1.0001e4, -9999.0, width=32), "mu = 1": st.just(0.0),
                    "ordinary": st.floats(-12.0, 0.0, width=32)}[opts["logprobs"]]
    logp = [draw(trained_logp) if m else draw(st.sampled_from(UNTRAINED_LOGPROBS)) for m in mask]
    adv = {"zero": st.just(0.0), "huge": st.sampled_from([1e30, -1e30, 3e38]),
           "ordinary": st.floats(-3.0, 3.0, width=32)}[opts["advantage_values"]]
    row = {"prompt_ids": prompt, "response_ids": response, "behavior_logprobs": logp}
    if opts["loss_mask"]:
        row["loss_mask"] = mask
    if opts["advantage"] == "advantages":  # per token: anything where untrained
        row["advantages"] = [draw(adv) if m else draw(st.sampled_from([*NON_FINITE, 0.0])) for m in mask]
    elif opts["advantage"] == "advantage":
        row["advantage"] = draw(adv)
    else:
        row["reward"] = draw(adv)
        row["group_id"] = "g" if opts["one_group"] else f"g{draw(st.integers(0, 1))}"
    if opts["sample_id"]:
        row["sample_id"] = "same" if opts["duplicate_ids"] else f"s{i}"
    if opts["policy_version"]:
        row["policy_version"] = 8 - opts["lag"] if opts["one_lag"] else draw(st.integers(0, 10))  # the model is v8
    if opts["temperature"]:
        row["temperature"] = draw(st.sampled_from([1.0, 0.7]))
    if opts["proximal"]:
        row["proximal_logprobs"] = [draw(st.floats(-12.0, 0.0, width=32)) if m else draw(st.sampled_from(NON_FINITE))
                                    for m in mask]
    return row


TYPES = {"prompt_ids": pa.list_(pa.int64()), "response_ids": pa.list_(pa.int64()),
         "behavior_logprobs": pa.list_(pa.float32()), "loss_mask": pa.list_(pa.bool_()),
         "advantages": pa.list_(pa.float32()), "advantage": pa.float32(), "reward": pa.float32(),
         "group_id": pa.string(), "sample_id": pa.string(), "policy_version": pa.int64(),
         "temperature": pa.float32(), "proximal_logprobs": pa.list_(pa.float32())}


@st.composite
def rollout_files(draw) -> dict:
    """The options of one file (what the named cases are written in) and its rows."""
    opts = {
        "rows": draw(st.integers(1, 5)),
        "loss_mask": draw(st.booleans()), "masked_row": draw(st.booleans()), "long_row": draw(st.booleans()),
        "logprobs": draw(st.sampled_from(["ordinary", "mu = 1", "near -1e4"])),
        "advantage": draw(st.sampled_from(["advantage", "advantages", "reward"])),
        "advantage_values": draw(st.sampled_from(["ordinary", "zero", "huge"])), "one_group": draw(st.booleans()),
        "sample_id": draw(st.booleans()), "duplicate_ids": draw(st.booleans()),
        "policy_version": draw(st.booleans()), "one_lag": draw(st.booleans()), "lag": draw(st.integers(0, 3)),
        "temperature": draw(st.booleans()), "proximal": draw(st.booleans()),
    }
    opts["masked_row"] &= opts["loss_mask"]
    return {"opts": opts, "rows": [_row(draw, i, opts) for i in range(opts["rows"])]}


def table_of(case: dict) -> pa.Table:
    names = list(case["rows"][0])
    return pa.table({c: pa.array([r[c] for r in case["rows"]], type=TYPES[c]) for c in names})


def named(**changes) -> dict:
    """A hand-made case: two ordinary rows with the required columns only, then `changes`."""
    rows = [{"prompt_ids": [1, 2, 3], "response_ids": [4, 5], "behavior_logprobs": [-1.0, -2.0], "advantage": 1.0},
            {"prompt_ids": [6], "response_ids": [7, 8, 9], "behavior_logprobs": [-0.5, -1.5, -2.5], "advantage": -1.0}]
    for i, row in changes.pop("rows", {}).items():
        rows[i] = {**rows[i], **row}
    rows = rows[: changes.pop("keep", len(rows))]
    return {"opts": {}, "rows": rows}


MASKED_NAN = named(rows={0: {"response_ids": [4, 5, 6], "behavior_logprobs": [-1.0, math.nan, -1e4],
                             "loss_mask": [True, False, True]},
                         1: {"loss_mask": [True, True, True]}})
NAMED = {
    "smallest legal file": named(),
    "NaN, inf and +5 under loss_mask 0": named(rows={
        0: {"response_ids": [4, 5, 6, 7], "behavior_logprobs": [math.nan, math.inf, 5.0, -0.1],
            "loss_mask": [False, False, False, True]},
        1: {"loss_mask": [True, True, True]}}),
    "a NaN untrained token among the worst, −1e4 trained": MASKED_NAN,
    "μ = 1 exactly": named(rows={0: {"behavior_logprobs": [0.0, 0.0]}, 1: {"behavior_logprobs": [0.0, 0.0, 0.0]}}),
    "all advantages 0": named(rows={0: {"advantage": 0.0}, 1: {"advantage": 0.0}}),
    "a row with every token masked": named(rows={0: {"loss_mask": [False, False], "behavior_logprobs": [math.nan, 1.0]},
                                                  1: {"loss_mask": [True, True, True]}}),
    "every token of every row masked": named(rows={0: {"loss_mask": [False, False]},
                                                    1: {"loss_mask": [False, False, False]}}),
    "one row": named(keep=1),
    "huge finite advantages": named(rows={0: {"advantage": 3e38}, 1: {"advantage": -3e38}}),
    "a very long row": named(rows={0: {"response_ids": [i % VOCAB for i in range(300)],
                                       "behavior_logprobs": [-1.0] * 300}}),
    "duplicate ids, a single group, one lag": named(rows={
        0: {"sample_id": "x", "group_id": "g", "reward": 1.0, "policy_version": 7},
        1: {"sample_id": "x", "group_id": "g", "reward": 0.0, "policy_version": 7}}),
}
for _case in NAMED["duplicate ids, a single group, one lag"]["rows"]:
    del _case["advantage"]


# ---- the commands -----------------------------------------------------------------------------


def strict_json(text: str, what: str):
    def refuse(constant: str):
        raise AssertionError(f"{what}: {constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run(root: Path, args: list[str], outputs: dict[str, Path]):
    """Run one command in-process: exit 0 with strict JSON outputs, or exit 2, one line, nothing written."""
    before = listing(root)
    res = runner.invoke(app, args)
    if res.exit_code == 0:
        for path in (p for p in outputs.values() if p.suffix == ".json"):
            strict_json(path.read_text(encoding="utf-8"), str(path))
        for path in outputs.values():
            assert path.exists(), (args, path)
        return res
    assert res.exit_code == 2, (args, res.exit_code, res.output, repr(res.exception))
    lines = res.stderr.rstrip().splitlines()
    # One line; further problems of the same refusal (DrpoError.details) only indented below it.
    assert lines[0].startswith("error: ") and all(line.startswith("  ") for line in lines[1:]), (args, lines)
    assert listing(root) == before, (args, lines)
    return res


def every_command(case: dict, root: Path) -> None:
    root.mkdir()
    path = write_rollout_table(table_of(case), root / "rollouts.arrow")
    res = runner.invoke(app, ["validate", str(path)])
    duplicates = len({r.get("sample_id") for r in case["rows"]}) < len(case["rows"]) and "sample_id" in case["rows"][0]
    if duplicates:  # the one thing here validate refuses (sample_id: "unique across all files"); the others warn
        first = res.stderr.splitlines()[0]
        assert res.exit_code == 2 and first.startswith("error: invalid rollouts: ") and first.endswith(
            "duplicate-sample-id)"), res.stderr
    else:
        assert res.exit_code == 0, res.output  # legal by construction
    for mode in ("data", "model"):
        out = {"json": root / f"{mode}.json", "html": root / f"{mode}.html"}
        args = ["inspect", str(path), "-q", "--json", str(out["json"]), "--html", str(out["html"])]
        if mode == "model":
            out["per_token"] = root / "per-token.arrow"
            args += ["--model", str(MODEL), "--device", "cpu", "--per-token", str(out["per_token"])]
        run(root, args, out)
    out_dir = root / "next"
    res = run(root, ["train", "-r", str(path), "-m", str(MODEL), "--out", str(out_dir), "-q", "--device", "cpu",
                     "--lr", "1e-3"], {"report": out_dir / "drpo_report.json", "page": out_dir / "report.html"})
    if res.exit_code == 0:
        for file in out_dir.glob("*.json"):
            strict_json(file.read_text(encoding="utf-8"), str(file))


_SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                        HealthCheck.data_too_large]}


def _examples(test):
    for case in NAMED.values():
        test = example(case=case)(test)
    return test


@_examples
@settings(max_examples=4, **_SETTINGS)
@given(case=rollout_files())
def test_every_command_finishes_or_refuses_on_unusual_legal_files(tmp_path_factory, case):
    every_command(case, tmp_path_factory.mktemp("case") / "run")


@pytest.mark.slow
@settings(max_examples=40, **_SETTINGS)
@given(case=rollout_files())
def test_every_command_finishes_or_refuses_on_many_unusual_legal_files(tmp_path_factory, case):
    every_command(case, tmp_path_factory.mktemp("case") / "run")


# ---- the cases, exactly --------------------------------------------------------------


def test_the_smallest_legal_file_is_audited_with_the_model(tmp_path):
    path = write_rollout_table(table_of(NAMED["smallest legal file"]), tmp_path / "r.arrow")
    res = runner.invoke(app, ["inspect", str(path), "--model", str(MODEL), "--device", "cpu", "--json", "-"])
    assert res.exit_code == 0, res.output
    report = strict_json(res.stdout, "stdout")
    assert report["model"]["tokens"] == 5  # every response token trained
    # No version anywhere, no temperature: the logging checks run on every row, at T = 1, with a caveat.
    assert report["model"]["logging_checks"]["scope"].startswith("all rows (staleness unknown")
    checks = report["model"]["logging_checks"]
    assert checks["logged_temperature"] == 1.0 and checks["rows"] == 2 and checks["tokens"] == 5


def test_an_untrained_nan_among_the_worst_tokens_is_null_and_train_keeps_its_run(tmp_path):
    path = write_rollout_table(table_of(MASKED_NAN), tmp_path / "r.arrow")
    res = runner.invoke(app, ["inspect", str(path), "--model", str(MODEL), "--device", "cpu", "--json", "-"])
    assert res.exit_code == 0, res.output
    worst = {w["sample_id"]: w for w in strict_json(res.stdout, "stdout")["model"]["worst_tokens"]}
    assert worst["0"]["mask"] == [True, False, True]
    d = worst["0"]["delta"]
    assert d[1] is None and d[0] is not None and d[2] is not None  # only the untrained token has no Δ
    assert 0 < d[2] <= 1  # μ = e^−1e4 = 0 in float64: Δ = π
    res = runner.invoke(app, ["train", "-r", str(path), "-m", str(MODEL), "--out", str(tmp_path / "next"), "-q",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    report = strict_json((tmp_path / "next" / "drpo_report.json").read_text(encoding="utf-8"), "report")
    assert report["final"]["worst_tokens"]


@pytest.mark.parametrize("fails", ["drpo_report.json", "report.html"])
def test_a_report_that_cannot_be_made_never_costs_the_weights(tmp_path, monkeypatch, fails):
    import drpo_cli.reports.html_pages
    import drpo_cli.training.report

    def broken(report):
        raise ValueError("cannot make this\nsecond line")

    monkeypatch.setattr(*((drpo_cli.training.report, "train_report_json", broken) if fails == "drpo_report.json"
                          else (drpo_cli.reports.html_pages, "train_page", broken)))
    path = write_rollout_table(table_of(named()), tmp_path / "r.arrow")
    out = tmp_path / "next"
    res = runner.invoke(app, ["train", "-r", str(path), "-m", str(MODEL), "--out", str(out), "-q", "--device", "cpu"])
    assert res.exit_code == 1
    assert res.stderr.strip().splitlines() == [
        f"error: wrote {out} (policy version 9) but could not write {fails} (ValueError: cannot make this)"]
    assert (out / "model.safetensors").is_file() and not (out / fails).exists()
    other = {"drpo_report.json": "report.html", "report.html": "drpo_report.json"}[fails]
    assert (out / other).is_file()  # what could be written was
    marker = strict_json((out / "drpo_checkpoint.json").read_text(encoding="utf-8"), "marker")
    assert fails not in marker["files"] and "model.safetensors" in marker["files"]
    assert not Path(f"{out}.partial-state").exists()


# ---- every report writer: finite or null -----------------------------------------------------


def test_finite_or_null_replaces_every_non_finite_float_and_names_it():
    from drpo_cli.reports.report_format import NonFiniteReportValue, finite_or_null, report_json

    report = {"a": [1.0, math.nan, {"b": math.inf}], "c": (-math.inf, 2), "d": "nan", "e": None, "f": True}
    with pytest.warns(NonFiniteReportValue, match=r"/a/1 = nan, /a/2/b = inf, /c/0 = -inf"):
        clean = finite_or_null(report)
    assert clean == {"a": [1.0, None, {"b": None}], "c": [None, 2], "d": "nan", "e": None, "f": True}
    assert report["a"][1] != report["a"][1]  # the input is left as it was
    with pytest.warns(NonFiniteReportValue):
        assert strict_json(report_json(report), "report") == clean


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    """A real inspect report (model mode) and train report of the NaN-under-mask case, as returned."""
    from drpo_cli.audit.inspect_data import inspect_and_write
    from drpo_cli.config import InspectConfig, TrainConfig
    from drpo_cli.training.train import train

    root = tmp_path_factory.mktemp("reports")
    path = write_rollout_table(table_of(MASKED_NAN), root / "r.arrow")
    cfg = InspectConfig(rollouts=(str(path),), model=str(MODEL), device="cpu", quiet=True,
                        json_out=str(root / "i.json")).check()
    inspect = inspect_and_write(cfg)
    result = train(TrainConfig(rollouts=(str(path),), model=str(MODEL), out=str(root / "next"), device="cpu",
                               quiet=True).check())
    return {"inspect": inspect, "inspect_file": root / "i.json", "train": result.report,
            "train_file": root / "next" / "drpo_report.json"}


def test_the_written_reports_are_what_train_and_inspect_return(reports):
    """Sanitised once, before the console, the page and the JSON see them: the file is the returned report."""
    for name in ("inspect", "train"):
        written = strict_json(reports[f"{name}_file"].read_text(encoding="utf-8"), name)
        assert written == json.loads(json.dumps(reports[name], allow_nan=False)), name


@pytest.mark.parametrize("where", ["inspect --json FILE", "inspect --json -", "train"])
def test_every_report_writer_writes_a_planted_nan_as_null(reports, tmp_path, capsys, where):
    import copy

    from drpo_cli.reports.report_format import NonFiniteReportValue, train_report_json, write_report

    report = copy.deepcopy(reports["train" if where == "train" else "inspect"])
    metrics = report["final"]["metrics"] if where == "train" else report["metrics"]
    metrics["kl/k3_mean"] = math.nan
    path = "-" if where == "inspect --json -" else str(tmp_path / "r.json")

    def write() -> str:
        if where == "train":
            return train_report_json(report)  # validated (NaN is a JSON Schema number), then sanitised
        write_report(report, path, overwrite=False)
        return capsys.readouterr().out if path == "-" else (tmp_path / "r.json").read_text(encoding="utf-8")

    with pytest.warns(NonFiniteReportValue, match="kl/k3_mean = nan"):
        text = write()
    written = strict_json(text, where)
    assert (written["final"]["metrics"] if where == "train" else written["metrics"])["kl/k3_mean"] is None
