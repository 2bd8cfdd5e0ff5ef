"""The staleness × mismatch experiment (examples/staleness_experiment.py): bookkeeping, summary arithmetic, outputs."""

from __future__ import annotations

import importlib.util
import json
import shlex
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import mismatch
import staleness_experiment as se

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
START_VERSION = 8  # examples/toy/model/drpo_checkpoint.json
# Smaller than --quick so the smoke run stays within seconds: every arm, a fresh and a stale
# setting, 3 rounds (at K = 2 the third round is the first to sample from a trained checkpoint), no
# mismatch; a second, smaller run covers a mismatch level.
SMOKE = ["--staleness", "0", "2", "--mismatch", "none", "--seeds", "1", "--rounds", "3", "--prompts", "8",
         "--samples", "4", "--eval-prompts", "8", "--eval-samples", "2", "--epochs", "1", "--minibatches", "2",
         "--workers", "1"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("staleness")
    doc = se.main([*SMOKE, "--out", str(out)])
    return out, doc


@pytest.mark.multiproc  # a spawned worker process per run
def test_smoke_writes_every_output(smoke):
    out, doc = smoke
    names = {"results.json", "results.md", "command.txt"} | (
        {"reward.png", "harmful.png", "instability.png"} if HAS_MATPLOTLIB else set())
    assert names <= {p.name for p in out.iterdir()}
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(doc))
    command = (out / "command.txt").read_text().strip()
    assert command == shlex.join(["python", "examples/staleness_experiment.py", *SMOKE, "--out", str(out)])
    table = (out / "results.md").read_text()
    assert f"Command: `{command}`" in table
    for arm in se.ARMS:
        for k in (0, 2):
            assert f"| {arm} | none | {k} |" in table
    assert "| none | fp32 (the trainer's) |" in table  # the measured mismatch level
    # every arm x 2 staleness x 1 seed, each with 3 rounds of 1 epoch x 2 mini-batches = 2 optimizer steps.
    assert len(doc["runs"]) == 2 * len(se.ARMS)
    assert all(len(run["rounds"]) == 3 for run in doc["runs"])
    assert all(len(rd["grad_norms"]) == 2 for run in doc["runs"] for rd in run["rounds"])


@pytest.mark.multiproc  # a spawned worker process per run
def test_smoke_samples_from_the_checkpoint_k_rounds_back(smoke):
    _, doc = smoke
    for run in doc["runs"]:
        k = run["staleness"]
        for i, rd in enumerate(run["rounds"]):  # round i (0-based) trains checkpoint i on samples of max(0, i - K)
            assert rd["trained_version"] == START_VERSION + i
            assert rd["sampler_version"] == START_VERSION + max(0, i - k)
            assert rd["lag"] == min(i, k)


@pytest.mark.multiproc  # a spawned worker process per run
def test_smoke_rounds_share_data_where_the_sampler_is_the_same(smoke):
    _, doc = smoke
    # Round 1 samples the start checkpoint with seed 0 in every run; at K = 2 so does round 2.
    first = {run["rounds"][0]["rollout_reward"] for run in doc["runs"]}
    assert len(first) == 1
    second = {run["rounds"][1]["rollout_reward"] for run in doc["runs"] if run["staleness"] == 2}
    assert len(second) == 1
    starts = {run["start_reward"] for run in doc["runs"]}
    assert len(starts) == 1 and 0.0 <= starts.pop() <= 1.0


@pytest.mark.multiproc  # a spawned worker process per run
def test_smoke_records_the_report_metrics(smoke):
    _, doc = smoke
    for run in doc["runs"]:
        for rd in run["rounds"]:
            assert 0.0 <= rd["reward"] <= 1.0
            assert all(v is not None and v >= 0 for v in rd["final"].values()), rd["final"]
            frac = rd["loss_fraction"]
            if run["arm"] == "pg-is":
                assert frac is None
            else:
                assert frac["name"] == se.fraction_name(se.ARMS[run["arm"]])
                assert 0.0 <= frac["mean"] <= 1.0
    # The summary row is the mean over seeds of the runs' last rewards (one seed here: equal).
    for row in doc["summary"]:
        (run,) = [r for r in doc["runs"] if r["arm"] == row["arm"] and r["staleness"] == row["staleness"]]
        assert row["final_reward"] == run["rounds"][-1]["reward"]
    # Without mismatch a K = 0 round starts on-policy: the first step's k3 is rounding noise.
    for run in doc["runs"]:
        if run["staleness"] == 0:
            assert all(rd["start"]["kl/k3_mean"] < 1e-9 for rd in run["rounds"])


@pytest.mark.multiproc  # a spawned worker process per run
def test_mismatch_level_is_measured_and_trains_on_the_rounded_sampler(tmp_path):
    doc = se.main(["--arms", "pg-is", "--staleness", "0", "--mismatch", "none", "int4-w4a8", "--seeds", "1",
                   "--rounds", "2", "--prompts", "8", "--samples", "4", "--eval-prompts", "8", "--eval-samples", "2",
                   "--minibatches", "2", "--workers", "1", "--out", str(tmp_path)])
    levels = {lv["level"]: lv for lv in doc["mismatch_levels"]}
    assert list(levels) == list(mismatch.LEVELS)  # every level is measured, not only those run
    none, int4 = levels["none"], levels["int4-w4a8"]
    assert none["k3"] < 1e-9 and none["logr_abs_mean"] < 1e-5
    assert int4["k3"] > 1e-5 and int4["logr_abs_mean"] > 1e-3 and int4["delta_abs_mean"] > 0
    by_level = {run["mismatch"]: run for run in doc["runs"]}
    # Same seeds, same start checkpoint: only the sampler's rounding differs, and at lag 0 the first
    # step sees exactly that gap.
    assert by_level["none"]["rounds"][0]["start"]["kl/k3_mean"] < 1e-9
    assert by_level["int4-w4a8"]["rounds"][0]["start"]["kl/k3_mean"] > 1e-6
    assert {r["mismatch"] for r in doc["summary"]} == {"none", "int4-w4a8"}


def _round(reward, grad_norms, entropy=1.0, frac=None):
    final = {k: 0.0 for k in se.TR_METRICS} | {"entropy/mean": entropy}
    return {"reward": reward, "grad_norms": grad_norms, "final": final, "skipped_steps": 0, "start": None,
            "loss_fraction": None if frac is None else {"name": "x", "mean": frac}}


def test_summarize_hand_computed():
    runs = [
        {"arm": "a", "staleness": 2, "seed": 0, "start_reward": 0.5,
         "rounds": [_round(0.6, [1.0, 2.0, 3.0], frac=0.2), _round(0.44, [1.0, 9.0, 1.0], entropy=0.05, frac=0.4)]},
        {"arm": "a", "staleness": 2, "seed": 1, "start_reward": 0.5,
         "rounds": [_round(0.7, [2.0, 2.0]), _round(0.8, [4.0, 2.0])]},
    ]
    (row,) = se.summarize(runs)
    assert row["seeds"] == 2
    assert row["final_reward"] == pytest.approx((0.44 + 0.8) / 2)  # 0.62
    assert row["final_reward_std"] == pytest.approx(0.36 / 2**0.5)  # sample SD of {0.44, 0.8}: |0.8 - 0.44| / √2
    assert row["mean_reward"] == pytest.approx(((0.6 + 0.44) / 2 + (0.7 + 0.8) / 2) / 2)  # (0.52 + 0.75) / 2
    assert row["min_reward"] == 0.44
    assert row["reward_collapses"] == 1  # seed 0 ends at 0.44 < 0.5 - 0.05; seed 1 at 0.8 does not
    assert row["entropy_collapses"] == 1  # seed 0: entropy 0.05 < 0.1 with reward 0.44 < 0.9
    # Per run, over all its steps: seed 0 norms 1, 2, 3, 1, 9, 1 (sorted 1, 1, 1, 2, 3, 9: median 1.5) -> 9 / 1.5 = 6;
    # seed 1 norms 2, 2, 4, 2 (median 2) -> 4 / 2 = 2. Mean over seeds: 4.
    assert row["grad_spike"] == pytest.approx(4.0)
    assert row["grad_norm_max"] == 9.0
    # Steps above the clip 1.0: seed 0 has 2, 3, 9 of 6 -> 0.5; seed 1 all 4 of 4 -> 1. Mean 0.75.
    assert row["clipped_frac"] == pytest.approx(0.75)
    assert row["loss_fraction"] == pytest.approx(0.3)  # mean of the rounds that have one: (0.2 + 0.4) / 2


def _run(arm, level, seed, rewards, norms):
    return {"arm": arm, "mismatch": level, "staleness": 0, "seed": seed, "start_reward": 0.3,
            "rounds": [_round(r, n) for r, n in zip(rewards, norms)]}


def test_verdicts_compare_arms_and_samplers_against_the_seed_spread():
    flat = [1.0, 1.0, 1.0]
    runs = [
        # F32 control: a and b within each other's spread (a 0.5 ± 0.1, b 0.45 ± 0.05).
        _run("pg-is", "F32", 0, [0.2, 0.4, 0.5, 0.6], [flat] * 4),
        _run("pg-is", "F32", 1, [0.2, 0.3, 0.4, 0.5], [flat] * 4),
        _run("drpo", "F32", 0, [0.2, 0.5, 0.4, 0.5], [flat] * 4),
        _run("drpo", "F32", 1, [0.2, 0.4, 0.4, 0.5], [flat] * 4),
        # Q8_0: pg-is spikes (max / median 10 in both seeds) and falls below its start; drpo stays as under F32.
        _run("pg-is", "Q8_0", 0, [0.2, 0.1, 0.1, 0.1], [flat, flat, [1.0, 10.0, 1.0], flat]),
        _run("pg-is", "Q8_0", 1, [0.2, 0.1, 0.2, 0.1], [flat, [10.0, 1.0, 1.0], flat, flat]),
        _run("drpo", "Q8_0", 0, [0.2, 0.5, 0.4, 0.5], [flat] * 4),
        _run("drpo", "Q8_0", 1, [0.2, 0.4, 0.4, 0.5], [flat] * 4),
    ]
    runs[-1]["rounds"][-1]["final"]["entropy/mean"] = 0.05  # an entropy collapse: shown, not counted as instability
    text = "\n".join(se.verdicts(runs))
    # Late reward = mean of the last 3 evaluations, ± the sample SD (of two values: |a − b| / √2): F32 pg-is
    # (0.5, 0.4) -> 0.45 ± 0.0707; drpo (0.4667, 0.4333) -> 0.45 ± 0.0236.
    assert "**F32, K = 0** (after 4 rounds): " in text
    assert "No difference between arms is larger than the seed spread." in text.split("**F32")[1].split("\n")[0]
    # Q8_0: drpo 0.45 ± 0.0236 against pg-is (0.1, 0.1333) -> 0.1167 ± 0.0236: 0.333 apart, spreads 0.047.
    assert "drpo > pg-is by 0.333" in text
    assert "- pg-is, K = 0: late reward Q8_0 0.117 ± 0.024 vs F32 0.450 ± 0.071; grad spike 10.00 ± 0.00 vs " \
           "1.00 ± 0.00; reward collapses 2 of 2 vs 0 of 2; entropy collapses 0 of 2 vs 0 of 2 — worse under low " \
           "precision beyond the seed spread: its gradient spikes are larger and more runs collapse and its late " \
           "reward is lower." in text
    assert "- drpo, K = 0: late reward Q8_0 0.450 ± 0.024 vs F32 0.450 ± 0.024; grad spike 1.00 ± 0.00 vs " \
           "1.00 ± 0.00; reward collapses 0 of 2 vs 0 of 2; entropy collapses 1 of 2 vs 0 of 2." in text
    # Spike ratios Q8_0 / F32: pg-is 10 / 1, drpo 1 / 1 -> larger in 1 cell of 2; geometric mean √10.
    assert ("Gradient spikes are larger under low precision in 1 of the 2 arm × K cells (ratio of means: geometric "
            "mean ×3.16, range ×1.00–×10.00).") in text
    assert text.endswith("shows up: pg-is (Q8_0, K = 0), while no divergence-bounded arm is worse.")
    # Without the low-precision pg-is runs nothing is worse: the claim is said not to show up.
    calm = "\n".join(se.verdicts([r for r in runs if not (r["arm"] == "pg-is" and r["mismatch"] == "Q8_0")]))
    assert "does not show up here" in calm


def test_curve_tables_hand_computed():
    runs = [_run("drpo", "Q8_0", 0, [0.2, 0.6], [[1.0]] * 2), _run("drpo", "Q8_0", 1, [0.4, 0.8, 0.5], [[1.0]] * 3),
            _run("pg-is", "Q8_0", 0, [0.3], [[1.0]])]
    runs[0]["rounds"][0]["start"] = {"kl/k3_mean": 0.01}
    runs[1]["rounds"][0]["start"] = {"kl/k3_mean": 0.03}
    reward, k3 = se.curve_tables(runs).split("k3 at each round's first step")
    # Round 1 of drpo: seeds 0.2 and 0.4 -> 0.30 ± 0.14 (sample SD 0.2 / √2); round 3 has seed 1 alone.
    assert "| drpo | Q8_0 | 0 | 0.30 ± 0.14 | 0.70 ± 0.14 | 0.50 ± 0.00 |" in reward
    assert "| pg-is | Q8_0 | 0 | 0.30 ± 0.00 | – | – |" in reward
    assert "| drpo | Q8_0 | 0 | 0.02 ± 0.01 | – | – |" in k3  # k3 0.01 and 0.03; rounds without a start record: –


def test_arguments_pick_a_preset_and_override_it(tmp_path):
    s, out = se.parse_args(["--quick", "--seeds", "2", "--arms", "drpo", "pg-is", "--out", str(tmp_path)])
    assert s == replace(se.PRESETS["quick"], seeds=2, arms=("drpo", "pg-is"))
    assert out == tmp_path
    assert se.parse_args([])[0] == se.PRESETS["default"]
    for bad in (["--arms", "grpo"], ["--mismatch", "fp4"]):
        with pytest.raises(SystemExit) as err:
            se.parse_args(bad)
        assert err.value.code == 2


@pytest.mark.slow
def test_quick_run_covers_every_arm_and_setting(tmp_path):
    doc = se.main(["--quick", "--out", str(tmp_path)])
    quick = se.PRESETS["quick"]
    assert len(doc["summary"]) == len(se.ARMS) * len(quick.staleness) * len(quick.mismatch)


# ---- the boundary experiment's statistics (examples/boundary_verdict.py) ------------------------------


def test_welch_matches_the_formula_by_hand():
    import boundary_verdict as bv
    from scipy import stats

    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 4.0, 6.0]
    # By hand: means 3 and 4, sample variances 2.5 and 4, so SE² = 2.5/5 + 4/3 = 11/6;
    # t = −1 / √(11/6); df = (11/6)² / ((1/2)²/4 + (4/3)²/2) = (121/36) / (137/144) = 484/137.
    se2 = 11 / 6
    df = 484 / 137
    got = bv.welch(a, b)
    assert got["diff"] == -1.0
    assert got["t"] == pytest.approx(-1 / se2**0.5, rel=1e-12)
    assert got["df"] == pytest.approx(df, rel=1e-12)
    assert got["p"] == pytest.approx(2 * stats.t.sf(1 / se2**0.5, df), rel=1e-9)
    half = stats.t.ppf(0.975, df) * se2**0.5
    assert got["ci"] == pytest.approx([-1 - half, -1 + half], rel=1e-9)


def test_holm_steps_down_and_stops_at_the_first_kept_hypothesis():
    import boundary_verdict as bv

    # m = 4; sorted p: 0.01 (×4 = 0.04, ≤ α/4: rejected), 0.03 (×3 = 0.09 > α/3: kept, and every later one).
    got = bv.holm([0.01, 0.04, 0.03, 0.2])
    assert [g["p_holm"] for g in got] == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert [g["rejected"] for g in got] == [True, False, False, False]
    assert [g["rejected"] for g in bv.holm([0.001, 0.012, 0.02])] == [True, True, True]  # 0.003, 0.024, 0.02 → 0.024


def test_named_comparisons_test_only_complete_runs(tmp_path, monkeypatch):
    import boundary_verdict as bv

    def write(arm, k, seed, late):
        for r in range(1, bv.ROUNDS + 1):
            rd = {"round": r, "reward": late if r in bv.LATE else 0.1,
                  "weight": {"corrective_frac": 0.01 * seed, "attenuated_frac": 0.02, "min": -1.0 - seed}}
            path = tmp_path / "rounds" / f"{arm}_{bv.LEVEL}_k{k}_s{seed}" / f"round-{r:03d}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rd))

    for seed in range(bv.SEEDS):
        write("drpo-d0.2", 4, seed, 0.5 + 0.01 * seed)
        write("drpo", 4, seed, 0.4 + 0.02 * seed)
    for seed in range(bv.SEEDS - 1):  # pg-is misses a seed: not tested
        write("pg-is", 4, seed, 0.3)
    rows = bv.compare({4: tmp_path})
    assert [(r["a"], r["b"], "p" in r) for r in rows] == [("drpo-d0.2", "drpo", True), ("drpo-d0.2", "pg-is", False),
                                                          ("drpo-d0.2", "dppo-tv", False)]
    first = rows[0]
    assert first["mean"] == pytest.approx([0.52, 0.44]) and first["diff"] == pytest.approx(0.08)
    assert first["p_holm"] == pytest.approx(first["p"])  # the only one tested: Holm changes nothing
    weights = bv.weight_rounds(tmp_path, "drpo-d0.2", 4)
    assert weights[0]["corrective"] == pytest.approx([0.02, statistics.stdev([0.0, 0.01, 0.02, 0.03, 0.04])])
    assert weights[0]["min"] == -5.0
    assert "| drpo-d0.2 vs pg-is | 4 | 5 + 4 of 5 | incomplete |" in bv.markdown(rows, {})
    # Described on the 4 seeds both arms finished, without a test: 0.5 + 0.01·s against 0.3.
    untested = rows[1]["untested"]
    assert untested["seeds"] == [0, 1, 2, 3] and untested["mean"] == pytest.approx([0.515, 0.3])
    assert "difference +0.215" in bv.markdown(rows, {}) and "p" not in rows[1]


def test_verify_compares_a_rerun_round_with_the_committed_one_and_the_seeds_spread():
    sys.path.insert(0, str(EXAMPLES / "real"))
    import engine_experiment as ex

    def rd(reward, k3, norms):
        return {"round": 1, "reward": reward, "rollout_reward": 0.5, "response_len_mean": 10.0,
                "start": {"kl/k3_mean": k3}, "final": {"entropy/mean": 1.0}, "grad_norms": norms,
                "loss_fraction": None}

    seeds = [[rd(0.30, 1e-11, [1.0, 2.0])], [rd(0.34, 2e-11, [1.2, 1.8])], [rd(0.38, 3e-11, [1.4, 1.6])]]
    same = ex.compare_rounds([seeds[0][0]], [rd(0.30, 1e-11 + 3e-8, [1.0, 2.0])], seeds)
    assert {r["figure"]: r["agreement"] for r in same} == {
        "rollout_reward": "bit for bit", "reward": "bit for bit", "response_len_mean": "bit for bit",
        "start.kl/k3_mean": "rounding", "final.entropy/mean": "bit for bit", "grad_norms[0]": "bit for bit",
        "grad_norms[1]": "bit for bit"}
    assert ex.verdict(same) == "reproduced"
    # Another draw: reward 0.40 against seeds 0.34 ± 0.04 (within 3 SD); a norm of 3.0 against 1.2 ± 0.2 is not.
    other = ex.compare_rounds([seeds[0][0]], [rd(0.40, 2e-11, [1.1, 2.1])], seeds)
    assert {r["figure"]: r["agreement"] for r in other}["reward"] == "draw" and ex.verdict(other) == "another draw"
    off = ex.compare_rounds([seeds[0][0]], [rd(0.30, 1e-11, [3.0, 2.0])], seeds)
    assert {r["figure"]: r["agreement"] for r in off}["grad_norms[0]"] == "beyond"
    assert ex.verdict(off) == "not reproduced"
    assert ex._parse_run("drpo-d0.2_Q8_0_k4_s1") == ("drpo-d0.2", "Q8_0", 4, 1)
