"""`drpo inspect --model` on the example data against a naive full-logits recompute done here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import LOGP_ULPS, METRIC_ULPS, TOY, assert_reordered
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from drpo_cli.audit.inspect_data import inspect_and_write
from drpo_cli.audit.inspect_model import FIT_TOKENS
from drpo_cli.cli import app
from drpo_cli.config import InspectConfig
from drpo_cli.objectives.metrics import INSPECT_DATA_METRICS, INSPECT_MODEL_METRICS
from drpo_cli.reports.report_format import INSPECT_REPORT_SCHEMA, validate_report

MODEL, ROLLOUTS = TOY / "model", TOY / "rollouts.arrow"
CURRENT_VERSION = 8  # examples/toy/model/drpo_checkpoint.json


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return pa.ipc.open_file(str(ROLLOUTS)).read_all()


@pytest.fixture(scope="module")
def naive(table) -> dict:
    """Per-token log π from full logits of prompt + response[:-1], /T, float32 log-softmax, one row at a time.

    `logp_t1` is the same at T = 1, what a sampler that logs before applying temperature records.
    """
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    logp, logp_t1, rows = [], [], []
    with torch.no_grad():
        for i, row in enumerate(table.to_pylist()):
            ids = torch.tensor(row["prompt_ids"] + row["response_ids"][:-1])[None]  # (1, L)
            logits = model(input_ids=ids).logits[0, len(row["prompt_ids"]) - 1:].float()  # (R, V)
            target = torch.tensor(row["response_ids"])[:, None]  # (R, 1)
            for out, temp in ((logp, row["temperature"]), (logp_t1, 1.0)):
                out.append(torch.log_softmax(logits / temp, dim=-1).gather(1, target)[:, 0].double().numpy())
            rows.append(np.full(len(row["response_ids"]), i))
    # Group-relative advantages A = R − mean over the group (SPEC.md §1), broadcast over the row's tokens.
    reward = np.array(table.column("reward").to_pylist(), dtype=np.float64)
    group = np.array(table.column("group_id").to_pylist())
    row_adv = reward - np.array([reward[group == g].mean() for g in group])
    row = np.concatenate(rows)
    return {"logp": np.concatenate(logp), "logp_t1": np.concatenate(logp_t1), "row": row, "adv": row_adv[row],
            "mu": np.concatenate([np.array(x, dtype=np.float64) for x in table.column("behavior_logprobs").to_pylist()]),
            "lag": CURRENT_VERSION - np.array(table.column("policy_version").to_pylist())[row],
            "sample_id": np.array(table.column("sample_id").to_pylist())[row]}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict, pa.Table]:
    d = tmp_path_factory.mktemp("inspect")
    cfg = InspectConfig(rollouts=(str(ROLLOUTS),), model=str(MODEL), deltas=(0.1, 0.2, 12.5), top=5, device="cpu",
                        json_out=str(d / "report.json"), per_token=str(d / "tokens.arrow"), quiet=True,
                        micro_batch_tokens=64).check()
    report = inspect_and_write(cfg)
    assert json.loads((d / "report.json").read_text()) == json.loads(json.dumps(report))
    return report, pa.ipc.open_file(str(d / "tokens.arrow")).read_all()


def test_per_token_output_round_trips_the_naive_recompute(run, naive):
    _, tokens = run
    order = np.lexsort((tokens.column("position").to_numpy(), tokens.column("sample_id").to_numpy(zero_copy_only=False)))
    t = tokens.take(pa.array(order))
    ref = np.lexsort((np.arange(len(naive["row"])) - np.searchsorted(naive["row"], naive["row"]), naive["sample_id"]))
    assert t.num_rows == len(naive["logp"])
    assert t.column("sample_id").to_pylist() == naive["sample_id"][ref].tolist()
    # Micro-batches of 64 tokens against one row at a time: log π to rounding (LOGP_ULPS), and Δ = π − μ and
    # r = π/μ as functions of it: scaled by their derivatives (π, r), plus the float32 rounding of π and μ.
    lp, u = naive["logp"][ref], 1 + np.abs(naive["logp"][ref])
    assert_reordered(t.column("logp").to_numpy(), lp, LOGP_ULPS, scale=u, msg="logp")
    np.testing.assert_allclose(t.column("behavior_logp").to_numpy(), naive["mu"][ref], atol=1e-7)
    np.testing.assert_allclose(t.column("advantage").to_numpy(), naive["adv"][ref], atol=1e-6)
    np.testing.assert_array_equal(t.column("lag").to_numpy(), naive["lag"][ref])
    pi, mu = np.exp(naive["logp"][ref]), np.exp(naive["mu"][ref])
    assert_reordered(t.column("delta").to_numpy(), pi - mu, LOGP_ULPS, scale=pi * (1 + u) + mu, msg="delta")
    assert_reordered(t.column("ratio").to_numpy(), pi / mu, LOGP_ULPS, scale=pi / mu * (1 + u), msg="ratio")


def test_report_metrics_equal_the_naive_recompute(run, naive):
    report, _ = run
    validate_report(report, INSPECT_REPORT_SCHEMA)
    m = report["metrics"]
    # Every metric of the report is a documented, gateable name.
    assert set(m) == set(INSPECT_DATA_METRICS) | set(INSPECT_MODEL_METRICS)
    lp, mu, adv = naive["logp"], naive["mu"], naive["adv"]
    logr = np.clip(lp - mu, -20, 20)
    delta = np.exp(lp) - np.exp(mu)
    tr = 0.2
    harmful = ((adv > 0) & (delta > tr)) | ((adv < 0) & (delta < -tr))
    w = 1 - np.sign(adv) * delta / 0.1  # DRPO weight at the chosen δ = first --delta
    expected = {
        "tr/outside_frac": np.mean(np.abs(delta) > tr),
        "tr/harmful_frac": np.mean(harmful),
        "delta/abs_mean": np.mean(np.abs(delta)),
        "delta/abs_max": np.max(np.abs(delta)),
        "ratio/max": np.exp(logr).max(),
        "kl/k1_mean": np.mean(-logr),
        "kl/k3_mean": np.mean(np.expm1(logr) - logr),
        "weight/drpo_corrective_frac": np.mean(w < 0),
        "data/tokens": len(lp),
    }
    # GSPO at its defaults: a sequence is clipped when s = exp(mean log r) leaves [1 − 3e-4, 1 + 4e-4] in A's
    # harmful direction; CISPO clips the weight where r > 1 + 4.
    s_row = np.exp(np.array([logr[naive["row"] == i].mean() for i in range(naive["row"].max() + 1)]))
    s_tok = s_row[naive["row"]]
    gspo_clipped = ((adv > 0) & (s_tok > 1 + 4e-4)) | ((adv < 0) & (s_tok < 1 - 3e-4))
    expected["gspo/clip_frac"] = np.mean(gspo_clipped)
    expected["gspo/seq_clip_frac"] = np.unique(naive["row"][gspo_clipped]).size / s_row.size
    expected["cispo/clip_frac"] = np.mean(np.exp(logr) > 5.0)
    for name, value in expected.items():
        # from log-probs of other batch shapes (METRIC_ULPS); the fractions are counts: equal unless a token
        # sits within rounding of a threshold
        assert_reordered(m[name], value, METRIC_ULPS, scale=max(1.0, abs(value)), msg=name)
    assert m["reject/token_frac"] is None and m["reject/seq_frac"] is None  # no --reject given
    assert [e["loss"] for e in report["model"]["losses"]] == [
        "pg-is", "ppo-clip", "spo", "dppo-tv", "dppo-kl", "drpo", "gspo", "cispo", "sapo", "gmpo", "topr", "kimi15",
        "dppo-tv-sq", "vespo", "clip-cov", "kl-cov", "opsm (filter)", "m2po (filter)"]
    # Breakdown by lag: tokens and harmful share per lag.
    by_lag = {b["key"]: b for b in report["model"]["by_lag"]}
    for lag in np.unique(naive["lag"]):
        key = str(lag) if lag < 8 else "8+"
        sel = naive["lag"] == lag
        assert by_lag[key]["tokens"] == sel.sum()
        assert by_lag[key]["harmful_frac"] == pytest.approx(harmful[sel].mean(), abs=1e-9)
    # Worst sequences: the largest harmful shares, in order.
    per_row = np.array([harmful[naive["row"] == i].mean() for i in range(naive["row"].max() + 1)])
    worst = report["model"]["worst_sequences"]
    assert [s["harmful_frac"] for s in worst] == pytest.approx(sorted(per_row, reverse=True)[:5])
    # What-if: δ = 12.5 cannot reach its boundary, and the report says so.
    what_if = {w_["delta"]: w_ for w_ in report["model"]["drpo_what_if"]}
    assert not what_if[12.5]["reachable"] and what_if[12.5]["corrective_frac"] == 0
    assert what_if[0.2]["corrective_frac"] == pytest.approx(np.mean(1 - np.sign(adv) * delta / 0.2 < 0))
    assert any("12.5" in n and "unreachable" in n for n in report["notes"])
    assert report["data"]["lag"]["version_source"] == "checkpoint"
    checks = report["model"]["logging_checks"]
    assert checks["scope"] == "lag-0 rows" and not checks["offset_suspected"] and not checks["temperature_suspected"]
    assert checks["best_temperature"] == pytest.approx(0.9)


def test_rejection_fractions_and_stale_row_filter_equal_the_naive_recompute(tmp_path, naive):
    cfg = InspectConfig(rollouts=(str(ROLLOUTS),), model=str(MODEL), device="cpu", quiet=True, micro_batch_tokens=64,
                        reject=("seq_mean_k3>0.02", "token_k2>0.5"), max_lag=2, min_version=5,
                        json_out=str(tmp_path / "r.json")).check()
    report = inspect_and_write(cfg)
    kept = (naive["lag"] <= 2) & (CURRENT_VERSION - naive["lag"] >= 5)  # per token, by its row
    lp, mu, row = naive["logp"][kept], naive["mu"][kept], naive["row"][kept]
    logr = np.clip(lp - mu, -20, 20)
    k3 = np.expm1(logr) - logr
    seq_mean = {i: k3[row == i].mean() for i in np.unique(row)}
    rejected = np.array([seq_mean[i] > 0.02 for i in row]) | (0.5 * logr**2 > 0.5)
    m = report["metrics"]
    assert m["data/tokens"] == report["model"]["tokens"] == kept.sum()
    assert m["reject/token_frac"] == pytest.approx(rejected.mean())
    assert m["reject/seq_frac"] == pytest.approx(np.unique(row[rejected]).size / len(seq_mean))
    assert 0 < m["reject/seq_frac"] < 1
    dropped_rows = np.unique(naive["row"][~kept])
    assert report["data"]["staleness_filter"] == {
        "max_lag": 2, "min_version": 5, "current_version": CURRENT_VERSION, "rows_dropped": dropped_rows.size,
        "tokens_dropped": int((~kept).sum()), "tokens_masked": 0, "rows_kept": len(seq_mean),
        "rows_without_version": 0}
    assert report["data"]["rows"] == len(seq_mean) and dropped_rows.size > 0


def _lag0_file(tmp_path, table, naive, mu) -> Path:
    """Lag-0 rows only, with behavior_logprobs replaced by `mu` (flat, in table order)."""
    keep = np.flatnonzero(np.array(table.column("policy_version").to_pylist()) == CURRENT_VERSION)
    lengths = [len(x) for x in table.column("response_ids").to_pylist()]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rows = [mu[offsets[i]:offsets[i + 1]].astype(np.float32).tolist() for i in range(table.num_rows)]
    t = table.set_column(table.schema.get_field_index("behavior_logprobs"), "behavior_logprobs",
                         pa.array(rows, pa.list_(pa.float32()))).take(pa.array(keep))
    path = tmp_path / "lag0.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, t.schema) as writer:
        writer.write_table(t)
    return path


def test_logging_check_finds_logprobs_logged_before_temperature(tmp_path, table, naive):
    # μ recomputed at T = 1 while the rows say T = 0.9: what a sampler logging before temperature writes.
    path = _lag0_file(tmp_path, table, naive, naive["logp_t1"])
    report = inspect_and_write(InspectConfig(rollouts=(str(path),), model=str(MODEL), quiet=True).check())
    checks = report["model"]["logging_checks"]
    assert checks["temperature_suspected"] and checks["best_temperature"] == 1.0
    assert any("before applying temperature" in f and "suggests" in f for f in checks["findings"])


def test_logging_check_finds_a_systematic_offset(tmp_path, table, naive):
    # Logged log-probs 0.1 nats above the model's, as after top-p renormalisation: log r ≈ −0.1.
    path = _lag0_file(tmp_path, table, naive, np.minimum(naive["logp"] + 0.1, 0.0))
    report = inspect_and_write(InspectConfig(rollouts=(str(path),), model=str(MODEL), quiet=True).check())
    checks = report["model"]["logging_checks"]
    assert checks["offset_suspected"] and checks["logr_mean"] == pytest.approx(-0.1, abs=0.01)
    assert any("top-p" in n for n in report["notes"])


def test_cli_model_gates_and_vocabulary(tmp_path, table):
    runner = CliRunner()
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["inspect", str(ROLLOUTS), "--model", str(MODEL), "--json", str(out), "-q",
                              "--fail-above", "harmful=0.0"])
    assert res.exit_code == 3 and "tr/harmful_frac" in res.stderr
    assert json.loads(out.read_text())["gates"][0]["passed"] is False
    # A token id outside the vocabulary: exit 2, one line, nothing written.
    ids = table.column("response_ids").to_pylist()
    ids[3][1] = 10_000
    bad = table.set_column(1, "response_ids", pa.array(ids, pa.list_(pa.int32())))
    path = tmp_path / "oov.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, bad.schema) as writer:
        writer.write_table(bad)
    out2, tok = tmp_path / "r2.json", tmp_path / "t.arrow"
    res = runner.invoke(app, ["inspect", str(path), "--model", str(MODEL), "--json", str(out2), "--per-token",
                              str(tok), "-q"])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "row 3" in lines[0] and "10000" in lines[0] and "vocabulary" in lines[0]
    assert not out2.exists() and not tok.exists() and not list(tmp_path.glob(".drpo-*"))


def test_logging_check_fits_equal_a_separate_recompute_per_temperature(table):
    # The in-pass check (extra log-sum-exps from the audit's chunk logits) against the obvious way: full
    # logits of every fresh row recomputed at each candidate temperature.
    report = inspect_and_write(InspectConfig(rollouts=(str(ROLLOUTS),), model=str(MODEL), quiet=True).check())
    checks = report["model"]["logging_checks"]
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    fresh = [r for r in table.to_pylist() if r["policy_version"] == CURRENT_VERSION]
    assert checks["rows"] == len(fresh) and len(checks["temperature_fit"]) >= 5
    logr = {f["temperature"]: [] for f in checks["temperature_fit"]}
    logged = []  # μ of the fresh tokens, flat order
    with torch.no_grad():
        for row in fresh:
            ids = torch.tensor(row["prompt_ids"] + row["response_ids"][:-1])[None]  # (1, L)
            logits = model(input_ids=ids).logits[0, len(row["prompt_ids"]) - 1:].float()  # (R, V)
            target = torch.tensor(row["response_ids"])[:, None]
            keep = np.array(row["loss_mask"], dtype=bool) if row.get("loss_mask") else slice(None)
            mu = np.array(row["behavior_logprobs"], dtype=np.float64)
            logged.append(mu[keep])
            for temp, values in logr.items():
                lp = torch.log_softmax(logits / np.float32(temp), dim=-1).gather(1, target)[:, 0].double().numpy()
                values.append((lp - mu)[keep])
    # The fit reads FIT_TOKENS fresh tokens spread evenly (flat token order); the offset check all of them.
    n = sum(x.size for x in next(iter(logr.values())))
    spread = np.unique(np.linspace(0, n - 1, min(n, FIT_TOKENS)).round().astype(int))
    assert checks["fit_tokens"] == spread.size
    for fit in checks["temperature_fit"]:
        x = np.concatenate(logr[fit["temperature"]])[spread]
        # means of log r from the audit's batches against row-by-row log-probs (METRIC_ULPS; |log r| < 1 here)
        assert_reordered(fit["abs_logr_mean"], np.abs(x).mean(), METRIC_ULPS, scale=1.0, msg="abs_logr_mean")
        assert_reordered(fit["logr_mean"], x.mean(), METRIC_ULPS, scale=1.0, msg="logr_mean")
    x = np.concatenate(logr[round(checks["logged_temperature"], 4)])
    assert checks["tokens"] == x.size
    assert_reordered(checks["logr_mean"], x.mean(), METRIC_ULPS, scale=1.0, msg="logr_mean")
    # log r on these rows is numerics only (≈ 1e-7 per token), so the spread compares at that level: the two
    # log r differ per token by LOGP_ULPS·ε32·(1 + |log π|) (log π ≈ log μ here), so their standard errors by
    # at most the rms of that over √(n − 1).
    u = 1 + np.abs(np.concatenate(logged))
    assert_reordered(checks["logr_sem"], x.std(ddof=1) / np.sqrt(x.size), LOGP_ULPS,
                     scale=np.sqrt(np.mean(u**2) / (x.size - 1)), msg="logr_sem")


def test_console_at_80_columns_elides_no_number_and_notes_once(run):
    # The report (δ 12.5 chosen and in the what-if sweep) printed on an 80-column terminal.
    import io

    from rich.console import Console

    from drpo_cli.reports.report_format import render_inspect

    report, _ = run
    assert sum("12.5 >= 1" in n for n in report["notes"]) == 1  # the δ ≥ 1 note once in the JSON
    console = Console(width=80, file=io.StringIO(), color_system=None)
    render_inspect(report, console)
    text = console.file.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert text.count("12.5 >= 1") == 1
    for w in report["model"]["worst_sequences"]:  # every value printed whole (3 significant digits)
        assert f"{w['harmful_frac']:.3g}" in text


def test_veto_seq_mask_and_batch_norm_what_if_equal_the_naive_recompute(tmp_path, naive):
    # The audited model is π_old: ρ = π/μ. Veto at 0.3, seq-mask-tis at [0.9, 1.1] (zero mode), and the
    # batch mean of its weight (raw token ρ on the kept sequences, 0 on the masked ones, all counted).
    cfg = InspectConfig(rollouts=(str(ROLLOUTS),), model=str(MODEL), device="cpu", quiet=True, micro_batch_tokens=64,
                        is_veto=0.3, correction="seq-mask-tis", is_band=(0.9, 1.1), is_batch_norm=True,
                        json_out=str(tmp_path / "r.json")).check()
    report = inspect_and_write(cfg)
    lp, mu, row = naive["logp"], naive["mu"], naive["row"]
    log_rho = lp - mu
    bad = log_rho < np.log(0.3)
    vetoed_rows = np.unique(row[bad])
    geo = {i: np.exp(log_rho[row == i].mean()) for i in np.unique(row)}
    masked_rows = [i for i, g in geo.items() if not 0.9 <= g <= 1.1]
    vetoed = np.isin(row, vetoed_rows)
    kept = ~np.isin(row, masked_rows) & ~vetoed
    weight = np.where(kept, np.exp(np.clip(log_rho, -20, 20)), 0.0)
    m = report["metrics"]
    assert m["veto/token_frac"] == pytest.approx(bad.mean())
    assert m["veto/seq_frac"] == pytest.approx(vetoed_rows.size / len(geo))
    assert m["reject/seq_frac"] == pytest.approx(len(masked_rows) / len(geo))
    assert 0 < m["veto/seq_frac"] < 1 and 0 < m["reject/seq_frac"] < 1
    # The preset's --reject-mode zero applies to the veto too: vetoed tokens count, with weight 0.
    factor = weight.sum() / len(weight)  # the weights from log-probs of other batch shapes (METRIC_ULPS)
    assert_reordered(m["is/batch_norm_factor"], factor, METRIC_ULPS, scale=max(1.0, factor), msg="factor")
    assert report["settings"]["correction"] == "seq-mask-tis" and report["settings"]["is_veto"] == 0.3
