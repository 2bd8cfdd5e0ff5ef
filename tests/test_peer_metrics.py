"""The other trainers' mismatch metrics (SPEC.md §2), `--by`, `--worst-by` and the per-token traces.

Hand-computed values, a naive NumPy reference, rows split over calls (merged by row), and the whole
`drpo inspect --model` report against a NumPy recompute from its own `--per-token` output.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import TOY, write_rollout_table
from typer.testing import CliRunner

from drpo_cli.audit.inspect_data import run_inspect
from drpo_cli.audit.inspect_model import WORST_BY_SCORES
from drpo_cli.cli import app
from drpo_cli.config import WORST_BY, InspectConfig
from drpo_cli.objectives.divergence import Diagnostics
from drpo_cli.objectives.metrics import INSPECT_MODEL_METRICS

runner = CliRunner()
LN2 = math.log(2.0)
# Float64 sums of a few thousand float64 terms in another order: relative error ~ n·2⁻⁵³ ≈ 1e-12; the
# metrics divide and subtract such sums once or twice, so 1e-9 relative (1e-12 absolute near 0) leaves room.
RTOL, ATOL = 1e-9, 1e-12


def t(*x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def test_hand_computed_values_with_a_row_split_over_two_calls():
    # Row 0: π/μ = 0.5/0.25 (r = 2), 0.25/0.5 (r = 0.5), then an untrained token whose μ is NaN; row 1: 0.25/0.5.
    logp, mu = t(0.5, 0.25, 0.1, 0.25).log(), t(0.25, 0.5, float("nan"), 0.5).log()
    adv, mask = t(1.0, 1.0, 1.0, -1.0), torch.tensor([True, True, False, True])
    row, entropy = torch.tensor([0, 0, 0, 1]), t(1.0, 1.0, 1.0, 1.0)
    diag = Diagnostics(catastrophic=0.6)
    for part in (slice(0, 1), slice(1, 4)):  # row 0 arrives in two calls: merged by row before its R is formed
        diag.update(logp[part], mu[part], adv[part], mask[part], row=row[part], entropy=entropy[part])
    s = diag.summary()
    # r = (2, 0.5, 0.5): Σr = 3, Σr² = 4.5; R = (2·0.5, 0.5) = (1, 0.5); d = mean log μ − mean log π = (0, ln 2).
    expected = {
        "is/ess_token": 9 / (3 * 4.5), "chi2/token": 4.5 / 3 - 1, "is/ess_seq": 1.5**2 / (2 * 1.25),
        "chi2/seq": 1.25 / 2 - 1, "kl/reverse_mean": (2 * LN2 - 0.5 * LN2 - 0.5 * LN2) / 3,
        "kl/reverse_k3_mean": ((0.5 - 1 + LN2) + 2 * (2 - 1 - LN2)) / 3,
        "kl/js_mean": math.log(9 / 8) / 2,  # π/m, μ/m = 4/3, 2/3 (or the reverse) on every token
        "kl/k3_over_entropy": ((2 - 1 - LN2) + 2 * (0.5 - 1 + LN2)) / 3 / 1.0,
        "prob/pearson": -1.0,  # π = 0.75 − μ on every trained token
        "prob/mult_error_mean": 2.0, "delta/abs_std": 0.0, "logr/abs_mean": LN2,
        "ppl/log_diff_mean": LN2 / 2, "ppl/log_abs_diff_mean": LN2 / 2, "ppl/log_diff_max": LN2,
        "ppl/log_diff_min": 0.0, "ppl/ratio_mean": (1 + 2) / 2,
        "ppl/policy_mean": (2**1.5 + 4) / 2, "ppl/policy_log_mean": (1.5 * LN2 + 2 * LN2) / 2,
        "ppl/behavior_mean": (2**1.5 + 2) / 2, "ppl/behavior_log_mean": (1.5 * LN2 + LN2) / 2,
        "is/catastrophic_token_frac": 2 / 3, "is/catastrophic_seq_frac": 1.0,  # r = 0.5 < 0.6 in both rows
        # ppo-clip drops the r = 2 token (A > 0, r > 1.28) and row 1's (A < 0, r < 0.8): one of two with A > 0.
        "ppo_clip/dropped_pos_adv_frac": 0.5,
    }
    for key, value in expected.items():
        assert s[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert Diagnostics(catastrophic=None).catastrophic == 1e-4


def peer_reference(logp, mu, adv, row, entropy, catastrophic=1e-4) -> dict:
    """The SPEC.md §2 definitions, naively in NumPy over trained tokens (float64); `row` each token's row."""
    logr = np.clip(logp - mu, -20, 20)
    r, pi, m = np.exp(logr), np.exp(logp), np.exp(mu)
    rows = np.unique(row)
    big_r = np.exp(np.clip([logr[row == i].sum() for i in rows], -20, 20))
    d = np.array([mu[row == i].mean() - logp[row == i].mean() for i in rows])
    log_mix = np.log(0.5 * pi + 0.5 * m)
    a, b = logp - log_mix, mu - log_mix
    cat = (logp - mu) < math.log(catastrophic)
    k3 = np.expm1(logr) - logr
    return {
        "is/ess_token": r.sum() ** 2 / (r.size * (r**2).sum()), "chi2/token": (r**2).mean() - 1,
        "is/ess_seq": big_r.sum() ** 2 / (big_r.size * (big_r**2).sum()), "chi2/seq": (big_r**2).mean() - 1,
        "kl/reverse_mean": (r * logr).mean(), "kl/reverse_k3_mean": (1 / r - 1 + logr).mean(),
        "kl/js_mean": (0.5 * (np.exp(a) - 1 - a) + 0.5 * (np.exp(b) - 1 - b)).mean(),
        "kl/k3_over_entropy": k3.mean() / entropy.mean(), "prob/pearson": np.corrcoef(pi, m)[0, 1],
        "prob/mult_error_mean": np.exp(np.abs(logr)).mean(), "delta/abs_std": np.abs(pi - m).std(),
        "logr/abs_mean": np.abs(logr).mean(), "ppl/log_diff_mean": d.mean(), "ppl/log_abs_diff_mean": np.abs(d).mean(),
        "ppl/log_diff_max": d.max(), "ppl/log_diff_min": d.min(), "ppl/ratio_mean": np.exp(d).mean(),
        "ppl/policy_mean": np.mean([np.exp(-logp[row == i].mean()) for i in rows]),
        "ppl/policy_log_mean": np.mean([-logp[row == i].mean() for i in rows]),
        "ppl/behavior_mean": np.mean([np.exp(-mu[row == i].mean()) for i in rows]),
        "ppl/behavior_log_mean": np.mean([-mu[row == i].mean() for i in rows]),
        "is/catastrophic_token_frac": cat.mean(),
        "is/catastrophic_seq_frac": np.mean([cat[row == i].any() for i in rows]),
    }


def random_rows(n: int = 3000, seed: int = 5):
    g = np.random.default_rng(seed)
    mu = np.log(g.uniform(1e-6, 1, n))
    logp = np.minimum(mu + 0.5 * g.standard_normal(n), 0.0)
    logp[:3] = (0.0, -30.0, -12.0)  # |log r| > 20 and a catastrophic token
    adv = np.where(g.uniform(size=n) < 0.1, 0.0, g.standard_normal(n))
    mask = g.uniform(size=n) > 0.2
    row = np.sort(g.integers(0, 120, n))
    entropy = g.uniform(0, 3, n)
    for x in (logp, mu, adv, entropy):
        x[~mask] = np.nan  # untrained tokens may hold anything: none may reach a statistic
    return logp, mu, adv, mask, row, entropy


def test_against_a_numpy_reference_with_rows_split_over_calls():
    logp, mu, adv, mask, row, entropy = random_rows()
    diag = Diagnostics(reject=[("seq_max", "k1", ">", 1.0)], veto=0.01, catastrophic=0.01)
    for a, b in ((0, 7), (7, 1500), (1500, 1501), (1501, 3000)):  # cuts fall inside rows
        diag.update(*(torch.from_numpy(x[a:b]) for x in (logp, mu, adv, mask)), row=torch.from_numpy(row[a:b]),
                    entropy=torch.from_numpy(entropy[a:b]))
    s = diag.summary()
    ref = peer_reference(*(x[mask] for x in (logp, mu, adv, row, entropy)), catastrophic=0.01)
    for key, value in ref.items():
        assert s[key] == pytest.approx(value, rel=RTOL, abs=ATOL), key
    # The same tokens in one call, whole rows by seq_index, fold the same rows: the same figures.
    one = Diagnostics(reject=[("seq_max", "k1", ">", 1.0)], veto=0.01, catastrophic=0.01)
    one.update(*(torch.from_numpy(x) for x in (logp, mu, adv, mask)), seq_index=torch.from_numpy(row),
               entropy=torch.from_numpy(entropy))
    for key in ref:
        assert one.summary()[key] == pytest.approx(s[key], rel=RTOL, abs=ATOL), key


def test_pearson_of_a_constant_mu_is_none_whatever_the_split():
    # μ = e⁻¹ on every token (a sampler that logged one value): its variance is 0, but n·Σμ² − (Σμ)² from float64
    # sums is rounding noise of either sign, so without a floor the result would depend on the split.
    g = np.random.default_rng(2)
    logp, mu = np.log(g.uniform(0.05, 1.0, 2001)), np.full(2001, -1.0)
    adv, mask = g.standard_normal(2001), np.ones(2001, dtype=bool)
    for cuts in ((0, 2001), tuple(range(0, 2001, 23)) + (2001,), tuple(range(0, 2001, 8)) + (2001,)):  # 0, < 0, > 0
        diag = Diagnostics()
        for a, b in itertools.pairwise(cuts):
            diag.update(*(torch.from_numpy(x[a:b]) for x in (logp, mu, adv, mask)))
        assert diag.summary()["prob/pearson"] is None, cuts
    spread = mu + 1e-3 * g.standard_normal(2001)  # a small real spread is still a correlation
    diag = Diagnostics()
    diag.update(*(torch.from_numpy(x) for x in (logp, spread, adv, mask)))
    ref = np.corrcoef(np.exp(logp), np.exp(spread))[0, 1]
    assert diag.summary()["prob/pearson"] == pytest.approx(ref, rel=1e-6)  # raw moments: cancellation ~1e-10


def test_dropped_positive_shares_against_the_masks():
    logp, mu, adv, mask, row, _ = random_rows()
    diag = Diagnostics(reject=[("seq_max", "k1", ">", 1.0)], veto=0.01, opsm_delta=0.1, m2po_threshold=0.04)
    diag.update(*(torch.from_numpy(x) for x in (logp, mu, adv, mask)), seq_index=torch.from_numpy(row),
                old_logp=torch.from_numpy(logp))
    s = diag.summary()
    lp, m, a, rw = (x[mask] for x in (logp, mu, adv, row))
    r = np.exp(np.clip(lp - m, -20, 20))
    delta = np.exp(lp) - np.exp(m)
    drops = {
        "ppo_clip": ((a > 0) & (r > 1.28)) | ((a < 0) & (r < 0.8)),
        "dppo_tv": ((a > 0) & (delta > 0.15)) | ((a < 0) & (delta < -0.15)),
        "reject": np.isin(rw, [i for i in np.unique(rw) if (m - lp)[rw == i].max() > 1.0]),
        "veto": np.isin(rw, [i for i in np.unique(rw) if ((lp - m)[rw == i] < math.log(0.01)).any()]),
        "opsm": (a < 0) & np.isin(rw, [i for i in np.unique(rw) if (m - lp)[rw == i].mean() > 0.1]),
    }
    for ns, dropped in drops.items():
        assert dropped.any(), ns
        assert s[f"{ns}/dropped_pos_adv_frac"] == (dropped & (a > 0)).sum() / dropped.sum(), ns
    assert 0 <= s["m2po/dropped_pos_adv_frac"] <= 1 and s["opsm/dropped_pos_adv_frac"] == 0.0  # OPSM drops A < 0 only


def test_by_tables_equal_a_groupby():
    logp, mu, adv, mask, row, _ = random_rows()
    env = np.array(["b", "a", None, "c"], dtype=object)[row % 4]  # null is a value too
    diag = Diagnostics(by=("env",))
    for a, b in ((0, 1000), (1000, 3000)):
        codes = diag.by_codes("env", pa.array(env[a:b], pa.string()))
        diag.update(*(torch.from_numpy(x[a:b]) for x in (logp, mu, adv, mask)), by={"env": torch.from_numpy(codes)})
    got = diag.summary()["breakdowns"]["by"]["env"]
    assert [e["value"] for e in got] == ["a", "b", "c", None]
    for entry in got:
        sel = mask & np.array([v == entry["value"] for v in env])
        lr = np.clip(logp[sel] - mu[sel], -20, 20)
        assert entry["tokens"] == sel.sum()
        assert entry["logr_mean"] == pytest.approx(lr.mean(), rel=RTOL, abs=ATOL)
        assert entry["k3_mean"] == pytest.approx((np.expm1(lr) - lr).mean(), rel=RTOL, abs=ATOL)
        assert entry["delta_abs_mean"] == pytest.approx(np.abs(np.exp(logp[sel]) - np.exp(mu[sel])).mean(), rel=RTOL)


RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys, numpy as np, pyarrow as pa, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[3])
    from test_peer_metrics import random_rows
    from drpo_cli.objectives.divergence import Diagnostics
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
    logp, mu, adv, mask, row, entropy = random_rows()
    part = slice(0, 1501) if rank == 0 else slice(1501, None)  # the row at the cut has tokens on both ranks
    diag = Diagnostics(by=("env",))
    env = np.array(["x", "y", "z"], dtype=object)[row % 3]
    codes = diag.by_codes("env", pa.array(env[part] if rank == 0 else env[part][::-1], pa.string()))
    codes = codes if rank == 0 else codes[::-1]  # codes differ between ranks: the tables merge by value
    diag.update(*(torch.from_numpy(x[part]) for x in (logp, mu, adv, mask)), row=torch.from_numpy(row[part]),
                entropy=torch.from_numpy(entropy[part]), by={"env": torch.from_numpy(codes.copy())})
    summary = diag.all_reduce_().summary()
    json.dump({k: v for k, v in summary.items() if k != "config"}, open(sys.argv[2] + f".rank{rank}", "w"))
    dist.destroy_process_group()
    """
)


@pytest.mark.multiproc  # two Python processes with torch: ~10 s
def test_two_ranks_with_a_row_split_between_them_equal_one_pass(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    store = str(tmp_path / "store")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), store, str(Path(__file__).parent)]) for r in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    logp, mu, adv, mask, row, entropy = random_rows()
    one = Diagnostics(by=("env",))
    codes = one.by_codes("env", pa.array(np.array(["x", "y", "z"], dtype=object)[row % 3], pa.string()))
    one.update(*(torch.from_numpy(x) for x in (logp, mu, adv, mask)), row=torch.from_numpy(row),
               entropy=torch.from_numpy(entropy), by={"env": torch.from_numpy(codes)})
    expected = json.loads(json.dumps({k: v for k, v in one.summary().items() if k != "config"}))
    for rank in (0, 1):
        got = json.loads(Path(f"{store}.rank{rank}").read_text())
        for a, b in zip(got["breakdowns"]["by"]["env"], expected["breakdowns"]["by"]["env"], strict=True):
            a, b = dict(a), dict(b)
            assert a.pop("value") == b.pop("value") and a == pytest.approx(b, rel=RTOL, abs=ATOL)
        for key in peer_reference(*(x[mask] for x in (logp, mu, adv, row, entropy))):
            assert got[key] == pytest.approx(expected[key], rel=RTOL, abs=ATOL), key


# ---- drpo inspect --model on a file with masks, NaN, per-row temperatures and per-token versions ----------


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """The toy rollouts with loss_mask zeros (NaN μ there), two temperatures, token versions and an env
    column, audited with --by env and --by group_id, --worst-by chi2/seq, --is-veto and --reject."""
    d = tmp_path_factory.mktemp("peer")
    table = pa.ipc.open_file(str(TOY / "rollouts.arrow")).read_all()
    g = np.random.default_rng(3)
    lengths = [len(x) for x in table.column("response_ids").to_pylist()]
    masks = [list(g.uniform(size=n) > 0.15) for n in lengths]
    mus = [[m if keep else float("nan") for m, keep in zip(mu, mk)]
           for mu, mk in zip(table.column("behavior_logprobs").to_pylist(), masks)]
    version = table.column("policy_version").to_pylist()
    tokens = [[v - int(g.uniform() < 0.3) if v > 0 else v for _ in range(n)] for v, n in zip(version, lengths)]
    table = (table.set_column(table.schema.get_field_index("behavior_logprobs"), "behavior_logprobs",
                              pa.array(mus, pa.list_(pa.float32())))
             .set_column(table.schema.get_field_index("temperature"), "temperature",
                         pa.array([0.9 if i % 3 else 1.0 for i in range(table.num_rows)], pa.float32()))
             .append_column("loss_mask", pa.array(masks, pa.list_(pa.bool_())))
             .append_column("token_policy_versions", pa.array(tokens, pa.list_(pa.int64())))
             .append_column("env", pa.array([["math", "code", "[red]chat[/red]"][i % 3] for i in range(table.num_rows)])))
    path = write_rollout_table(table, d / "rollouts.arrow", metadata={"drpo.temperature": "0.9"})
    cfg = InspectConfig(rollouts=(str(path),), model=str(TOY / "model"), device="cpu", micro_batch_tokens=64,
                        per_token=str(d / "tokens.arrow"), by=("env", "group_id"), worst_by="chi2/seq", top=4,
                        is_veto=0.05, reject=("seq_max_k1>0.5",), quiet=True).check()
    from drpo_cli.audit.inspect_data import inspect_and_write

    report = inspect_and_write(cfg)
    return report, pa.ipc.open_file(str(d / "tokens.arrow")).read_all(), table


def test_inspect_report_equals_a_numpy_recompute_from_its_per_token_output(audited):
    report, tokens, _ = audited
    m = report["metrics"]
    assert set(m) >= set(INSPECT_MODEL_METRICS)
    trained = tokens.column("loss_mask").to_numpy(zero_copy_only=False)
    col = {k: tokens.column(k).to_numpy(zero_copy_only=False)[trained] for k in
           ("logp", "behavior_logp", "advantage", "entropy", "sample_id")}
    _, row = np.unique(col["sample_id"], return_inverse=True)
    ref = peer_reference(col["logp"].astype(np.float64), col["behavior_logp"].astype(np.float64),
                         col["advantage"].astype(np.float64), row, col["entropy"].astype(np.float64), catastrophic=0.05)
    for key, value in ref.items():
        # The audit's entropy is float32 per token like the file's; every other input is the same float32.
        assert m[key] == pytest.approx(value, rel=1e-6 if "entropy" in key else RTOL, abs=ATOL), key
    assert m["tr/harmful_frac"] is not None and m["veto/dropped_pos_adv_frac"] is not None
    assert m["reject/dropped_pos_adv_frac"] is not None


def test_by_env_and_worst_by_in_the_report(audited):
    report, tokens, table = audited
    trained = tokens.column("loss_mask").to_numpy(zero_copy_only=False)
    sid = tokens.column("sample_id").to_numpy(zero_copy_only=False)
    env_of = dict(zip(table.column("sample_id").to_pylist(), table.column("env").to_pylist()))
    env = np.array([env_of[s] for s in sid])
    logr = tokens.column("logr").to_numpy().astype(np.float64)
    model_by = report["model"]["by"]["env"]
    assert [e["value"] for e in model_by] == sorted(set(env_of.values()))
    for entry in model_by:
        sel = trained & (env == entry["value"])
        assert entry["tokens"] == sel.sum()
        assert entry["logr_mean"] == pytest.approx(logr[sel].mean(), rel=1e-6)  # per-token logr is stored float32
    data_by = {e["value"]: e for e in report["data"]["by"]["env"]}
    assert sum(e["rows"] for e in data_by.values()) == table.num_rows
    assert sum(e["tokens"] for e in data_by.values()) == report["data"]["masked_tokens"]
    # group_id is a string column in drpo's schema: its integer ids come in natural order ("2" before "10").
    groups = sorted(set(table.column("group_id").to_pylist()))
    assert [e["value"] for e in report["model"]["by"]["group_id"]] == [str(g) for g in groups]
    # Worst sequences by chi2/seq: the rows of largest R² − 1, R = exp(Σ log r), from the per-token output.
    lp, mu = (tokens.column(k).to_numpy().astype(np.float64) for k in ("logp", "behavior_logp"))
    score = {s: np.expm1(2 * np.clip(np.clip(lp - mu, -20, 20)[trained & (sid == s)].sum(), -20, 20))
             for s in np.unique(sid[trained])}
    worst = report["model"]["worst_sequences"]
    assert report["model"]["worst_by"] == "chi2/seq"
    assert [w["sample_id"] for w in worst] == sorted(score, key=lambda s: -score[s])[:4]
    for w in worst:
        assert w["score"] == pytest.approx(score[w["sample_id"]], rel=1e-9)
    trace = report["model"]["worst_tokens"][0]
    on = [i for i, k in enumerate(trace["mask"]) if k]
    off = [i for i, k in enumerate(trace["mask"]) if not k]
    assert all(trace[k][i] is None for k in ("pi", "mu", "ratio", "delta") for i in off)
    i = on[0]
    assert trace["ratio"][i] == pytest.approx(trace["pi"][i] / trace["mu"][i], rel=1e-5)  # each rounded to 6 digits


def test_every_worst_by_name_has_a_score():
    assert set(WORST_BY) == set(WORST_BY_SCORES)


def worst_by_reference(lp, mu, adv, catastrophic: float, tr_delta: float = 0.2) -> dict:
    """Each --worst-by metric over one row's trained tokens, naively in NumPy (float64)."""
    d = lp - mu
    logr = np.clip(d, -20, 20)
    r, delta = np.exp(logr), np.exp(lp) - np.exp(mu)
    return {
        "tr/harmful_frac": (((adv > 0) & (delta > tr_delta)) | ((adv < 0) & (delta < -tr_delta))).mean(),
        "tr/outside_frac": (np.abs(delta) > tr_delta).mean(), "delta/abs_mean": np.abs(delta).mean(),
        "delta/abs_max": np.abs(delta).max(), "kl/k1_mean": -logr.mean(), "kl/k3_mean": (r - 1 - logr).mean(),
        "kl/reverse_mean": (r * logr).mean(), "kl/reverse_k3_mean": (1 / r - 1 + logr).mean(),
        "kl/js_mean": np.log(np.cosh(d / 2)).mean(), "chi2/token": (r**2).mean() - 1,
        "chi2/seq": np.exp(2 * np.clip(logr.sum(), -20, 20)) - 1, "prob/mult_error_mean": np.exp(np.abs(logr)).mean(),
        "ppl/log_diff_mean": -d.mean(), "ppl/log_abs_diff_mean": abs(d.mean()), "ppl/ratio_mean": np.exp(-d.mean()),
        "logr/abs_mean": np.abs(logr).mean(), "logr/abs_max": np.abs(logr).max(),
        "is/catastrophic_token_frac": (d < math.log(catastrophic)).mean(),
    }


def test_each_worst_by_score_per_row_equals_a_numpy_reference():
    # The toy rows with a random loss mask (NaN μ under it) and a random π, fed micro-batch by micro-batch as
    # inspect --model does: every --worst-by metric's per-row score against the NumPy reference of its row.
    from drpo_cli.audit.inspect_model import _Chunk
    from drpo_cli.model.batching import plan_micro_batches
    from drpo_cli.rollouts.rows import load_rows

    rows = load_rows(str(TOY / "rollouts.arrow"))
    g = np.random.default_rng(7)
    mask = g.uniform(size=rows.num_tokens) > 0.2
    rows = dataclasses.replace(rows, loss_mask=mask,
                               behavior_logprobs=np.where(mask, rows.behavior_logprobs, np.nan).astype(np.float32))
    logp = np.minimum(rows.behavior_logprobs + 0.7 * g.standard_normal(rows.num_tokens), 0.0).astype(np.float32)
    logp[np.flatnonzero(rows.loss_mask)[:2]] = (-25.0, 0.0)  # a |log r| beyond the clamp, and a likely one near it
    for metric in WORST_BY:
        diag, chunk = Diagnostics(catastrophic=0.05), _Chunk(rows, None, None, metric, 0.05)
        for mb in plan_micro_batches(rows, np.arange(rows.num_rows), 64):
            idx = mb.token_index.numpy()
            f = torch.from_numpy
            t = diag.update(f(logp[idx]), f(rows.behavior_logprobs[idx]), f(rows.advantages[idx]),
                            f(rows.loss_mask[idx]), seq_index=mb.seq_index)
            chunk.add(mb, logp[idx], rows.loss_mask[idx], t)
        score = WORST_BY_SCORES[metric][2](chunk.seq)
        for i in range(rows.num_rows):
            lo, hi = rows.response_offsets[i], rows.response_offsets[i + 1]
            on = rows.loss_mask[lo:hi]
            if not on.any():
                continue
            ref = worst_by_reference(*(x[lo:hi][on].astype(np.float64) for x in (logp, rows.behavior_logprobs,
                                                                                  rows.advantages)), 0.05)[metric]
            # float64 sums of float32 inputs over one row (≤ 12 tokens): rounding ~1e-15 relative; 1e-9 is room.
            assert score[i] == pytest.approx(ref, rel=RTOL, abs=ATOL), (metric, i)


def test_bad_by_column_and_worst_by_are_refused_before_any_work(tmp_path, valid_rollout_path):
    bogus = tmp_path / "model"
    bogus.mkdir()  # no weights: reaching the model would fail with another message
    table = pa.ipc.open_file(str(valid_rollout_path)).read_all()
    path = write_rollout_table(table.append_column("score", pa.array([0.5] * 4, pa.float32())), tmp_path / "r.arrow")
    out = tmp_path / "report.json"
    cases = {
        "env": "column env: expected a string or integer column to break the audit down by (--by), found no "
               "such column",
        "response_ids": "column response_ids: expected a string or integer column to break the audit down by "
                        "(--by), found a list column",
        "score": "column score: expected a string or integer column to break the audit down by (--by), found float",
    }
    for name, message in cases.items():
        result = runner.invoke(app, ["inspect", str(path), "--model", str(bogus), "--by", name, "--json", str(out)])
        assert result.exit_code == 2, result.output
        assert f"{path}: {message}" in result.output and not out.exists()
    result = runner.invoke(app, ["inspect", str(path), "--model", str(bogus), "--worst-by", "ppl/nope"])
    assert result.exit_code == 2 and "--worst-by 'ppl/nope': expected one of tr/harmful_frac" in result.output


def test_by_values_come_in_natural_order():
    from drpo_cli.base.value_table import ValueTable

    table = ValueTable(1)
    table.codes(pa.array(["g10", None, "g2", "b", "10", "2", "g2a"]))
    assert [v for v, _ in table.items()] == ["2", "10", "b", "g2", "g2a", "g10", None]
    ints = ValueTable(1)
    ints.codes(pa.array([10, None, -1, 2]))
    assert [v for v, _ in ints.items()] == [-1, 2, 10, None]


def test_data_only_by_hand_computed(tmp_path, valid_rollout_path):
    table = pa.ipc.open_file(str(valid_rollout_path)).read_all()
    path = write_rollout_table(table.append_column("turn", pa.array([1, 2, 1, None], pa.int16())), tmp_path / "r.arrow")
    by = {e["value"]: e for e in run_inspect(InspectConfig(rollouts=(str(path),), by=("turn",)).check())["data"]["by"]["turn"]}
    assert list(by) == [1, 2, None]
    # Rows 0 and 2 (turn 1): trained tokens 2 + 2; −log μ 0.5, 1.0 and 0.125, 0.75; rewards 1 and 2; advantages
    # R − group mean: 1 − 0.5 = 0.5 (row 0), 2 − 3 = −1 (row 2).
    assert by[1] == {"value": 1, "rows": 2, "tokens": 4, "response_len_mean": 2.5, "neg_logmu_mean": 2.375 / 4,
                     "rare_token_frac": 0.0, "zero_adv_frac": 0.0, "adv_abs_mean": (0.5 * 2 + 1.0 * 2) / 4,
                     "reward_mean": 1.5}
    assert by[None]["rows"] == 1 and by[None]["reward_mean"] == 4.0 and by[2]["tokens"] == 1


def test_console_prints_column_values_and_sample_ids_literally(tmp_path, valid_rollout_path):
    table = pa.ipc.open_file(str(valid_rollout_path)).read_all()
    table = table.set_column(table.schema.get_field_index("sample_id"), "sample_id",
                             pa.array(["[bold]s0[/bold]", "s1", "s2", "s3"]))
    path = write_rollout_table(table.append_column("env", pa.array(["[red]x[/red]"] * 4)), tmp_path / "r.arrow")
    result = runner.invoke(app, ["inspect", str(path), "--by", "env"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "[red]x[/red]" in result.output


# ---- --against: two samplers on the same tokens ------------------------------------------------------------


@pytest.fixture(scope="module")
def two_samplers(tmp_path_factory):
    """A = the toy rollouts; B = the same rows, shuffled, in batches of 50, with μ moved by noise."""
    d = tmp_path_factory.mktemp("against")
    a = pa.ipc.open_file(str(TOY / "rollouts.arrow")).read_all()
    g = np.random.default_rng(1)
    moved = [[min(0.0, x + 0.05 * g.standard_normal()) for x in row] for row in a.column("behavior_logprobs").to_pylist()]
    b = a.set_column(a.schema.get_field_index("behavior_logprobs"), "behavior_logprobs",
                     pa.array(moved, pa.list_(pa.float32())))
    b = b.take(pa.array(g.permutation(b.num_rows)))
    path_b = write_rollout_table(b, d / "b.arrow", max_chunksize=50)
    return d, a, b, path_b


def test_against_without_model_equals_a_numpy_reference(two_samplers):
    _, a, b, path_b = two_samplers
    report = run_inspect(InspectConfig(rollouts=(str(TOY / "rollouts.arrow"),), against=(str(path_b),)).check())
    (ab,) = report["against"]["comparisons"]
    assert ab["label"] == "B vs A" and report["against"]["rows"] == a.num_rows
    mu_b_of = dict(zip(b.column("sample_id").to_pylist(), b.column("behavior_logprobs").to_pylist()))
    mu_a = np.concatenate([np.array(x, np.float32) for x in a.column("behavior_logprobs").to_pylist()]).astype(float)
    mu_b = np.concatenate([np.array(mu_b_of[s], np.float32) for s in a.column("sample_id").to_pylist()]).astype(float)
    logr = np.clip(mu_b - mu_a, -20, 20)
    assert ab["tokens"] == mu_a.size
    assert ab["metrics"]["kl/k3_mean"] == pytest.approx((np.expm1(logr) - logr).mean(), rel=RTOL)
    assert ab["metrics"]["kl/k1_mean"] == pytest.approx(-logr.mean(), rel=RTOL)
    assert ab["metrics"]["delta/abs_max"] == pytest.approx(np.abs(np.exp(mu_b) - np.exp(mu_a)).max(), rel=RTOL)


def test_against_names_rows_sampled_at_another_temperature(two_samplers, tmp_path):
    _, _, b, path_b = two_samplers
    same = run_inspect(InspectConfig(rollouts=(str(TOY / "rollouts.arrow"),), against=(str(path_b),)).check())
    assert same["against"]["temperature_differs"] == 0 and not any("--against" in n for n in same["notes"])
    hotter = b.set_column(b.schema.get_field_index("temperature"), "temperature",
                          pa.array([1.0] * 3 + b.column("temperature").to_pylist()[3:], pa.float32()))
    path = write_rollout_table(hotter, tmp_path / "hotter.arrow")
    report = run_inspect(InspectConfig(rollouts=(str(TOY / "rollouts.arrow"),), against=(str(path),)).check())
    assert report["against"]["temperature_differs"] == 3
    assert any(n.startswith(f"--against: 3 row(s) were sampled at another temperature in {path}") for n in report["notes"])


def test_against_with_model_is_a_three_way_table(two_samplers):
    *_, path_b = two_samplers
    report = run_inspect(InspectConfig(rollouts=(str(TOY / "rollouts.arrow"),), against=(str(path_b),),
                                       model=str(TOY / "model"), device="cpu", micro_batch_tokens=64).check())
    comps = {c["label"]: c for c in report["against"]["comparisons"]}
    assert list(comps) == ["model vs A", "model vs B", "B vs A"]
    for key in ("kl/k3_mean", "tr/harmful_frac", "is/ess_seq", "ppo_clip/clip_frac"):  # the same passes, sums
        assert comps["model vs A"]["metrics"][key] == report["metrics"][key], key
    assert comps["model vs B"]["metrics"]["kl/k3_mean"] != comps["model vs A"]["metrics"]["kl/k3_mean"]


def test_against_refuses_unmatched_rows_and_other_tokens_before_any_work(two_samplers, tmp_path):
    _, _, b, _ = two_samplers
    bogus = tmp_path / "model"
    bogus.mkdir()
    other = b.set_column(b.schema.get_field_index("response_ids"), "response_ids",
                         pa.array([[7] + r[1:] if i == 3 else r for i, r in enumerate(b.column("response_ids").to_pylist())],
                                  pa.list_(pa.int32())))
    cases = {"missing": (b.slice(1), "expected a row for every sample id of"),
             "other tokens": (other, (f"expected the token ids of the same rows of {TOY / 'rollouts.arrow'}, found 1 "
                                      f"whose tokens differ: sample_id {b.column('sample_id')[3].as_py()!r} "
                                      f"({tmp_path / 'other tokens.arrow'} row 3)"))}
    for name, (table, message) in cases.items():
        path = write_rollout_table(table, tmp_path / f"{name}.arrow")
        out = tmp_path / "r.json"
        result = runner.invoke(app, ["inspect", str(TOY / "rollouts.arrow"), "--against", str(path), "--model",
                                     str(bogus), "--json", str(out)])
        assert result.exit_code == 2 and message in result.output and not out.exists(), result.output
    assert f"sample_id {b.column('sample_id')[0].as_py()!r}" in runner.invoke(app, [
        "inspect", str(TOY / "rollouts.arrow"), "--against", str(tmp_path / "missing.arrow")]).output
