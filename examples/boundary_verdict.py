"""The boundary experiment's named comparisons (docs/experiments.md, "Where DRPO's correction acts"):
Welch's t on the late reward, Holm's correction over the named comparisons, 95 % intervals.

    python examples/boundary_verdict.py     # reads the round files; writes verdict.md / verdict.json

Reads examples/results/engine-boundary/rounds/ (the main setting, K = 4) and, when present,
examples/results/engine-boundary-k8/rounds/ (the stress setting), and writes verdict.md and
verdict.json beside the main results. Runs nothing; a comparison whose runs are not all finished is
listed as incomplete, never tested on part of its seeds (its late rewards on the seeds both arms finished
are described below the table, without a test).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import real_experiment as rx
import staleness_experiment as se

MAIN = HERE / "results" / "engine-boundary"
STRESS = HERE / "results" / "engine-boundary-k8"
LEVEL = "Q8_0"
SEEDS = 5
ROUNDS = 16
LATE = (14, 15, 16)  # the late reward: the mean of the evaluations after these rounds
ALPHA = 0.05
ARMS = ("pg-is", "ppo-clip", "dppo-tv", "drpo", "drpo-d0.2")


@dataclass(frozen=True)
class Comparison:
    """One named comparison, declared before the experiment ran: arm `a` against arm `b` at staleness k."""

    a: str
    b: str
    k: int
    why: str


COMPARISONS = (
    Comparison("drpo-d0.2", "drpo", 4, "the correction's own ablation (δ 0.2: boundary reachable; δ 12.5: not)"),
    Comparison("drpo-d0.2", "pg-is", 4, "the corrective weight against no trust region"),
    Comparison("drpo-d0.2", "dppo-tv", 4, "the corrective gradient against DPPO's hard mask"),
    Comparison("drpo-d0.2", "drpo", 8, "the ablation again under the stress setting (K = 8)"),
)


def late_reward(rounds: list[dict]) -> float:
    return statistics.fmean(rd["reward"] for rd in rounds if rd["round"] in LATE)


def finished(out: Path, arm: str, k: int) -> dict[int, list[dict]]:
    """{seed: its rounds} of the runs of `arm` at staleness k that finished all ROUNDS rounds, in seed order."""
    found = {seed: rx.finished_rounds(out, rx.run_name(arm, LEVEL, k, seed))[:ROUNDS] for seed in range(SEEDS)}
    return {seed: r for seed, r in found.items() if len(r) == ROUNDS}


def runs(out: Path, arm: str, k: int) -> list[list[dict]]:
    """The finished runs (all ROUNDS rounds) of `arm` at staleness k, one per seed, in seed order."""
    return list(finished(out, arm, k).values())


def welch(a: list[float], b: list[float], level: float = 0.95) -> dict:
    """Welch's two-sample t-test of mean(a) − mean(b): t, Welch–Satterthwaite df, two-sided p and the
    difference's `level` confidence interval (scipy.stats.ttest_ind with equal_var=False)."""
    from scipy import stats

    res = stats.ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(level)
    return {"diff": statistics.fmean(a) - statistics.fmean(b), "t": float(res.statistic), "df": float(res.df),
            "p": float(res.pvalue), "ci": [float(ci.low), float(ci.high)]}


def holm(pvalues: list[float], alpha: float = ALPHA) -> list[dict]:
    """Holm's step-down procedure: per p-value its adjusted p (monotone, capped at 1) and whether it is
    rejected at family-wise `alpha`, in the input order."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    m, out, running, stopped = len(pvalues), [None] * len(pvalues), 0.0, False
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        stopped = stopped or pvalues[i] > alpha / (m - rank)
        out[i] = {"p_holm": running, "rejected": not stopped}
    return out


def detectable(sd_a: float, sd_b: float, n_a: int, n_b: int, alpha: float = ALPHA, power: float = 0.8) -> float:
    """The smallest true difference a two-sided Welch test at `alpha` finds with `power`, given these SDs
    (normal-theory approximation with Welch's df)."""
    from scipy import stats

    va, vb = sd_a**2 / n_a, sd_b**2 / n_b
    df = (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1)) if va + vb > 0 else n_a + n_b - 2
    return (stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * math.sqrt(va + vb)


def compare(settings: dict[int, Path]) -> list[dict]:
    """Every named comparison whose setting was run: the test when both arms have SEEDS finished runs."""
    rows = []
    for c in COMPARISONS:
        if c.k not in settings:
            continue
        fa, fb = (finished(settings[c.k], arm, c.k) for arm in (c.a, c.b))
        a, b = list(fa.values()), list(fb.values())
        row = {"a": c.a, "b": c.b, "k": c.k, "why": c.why, "n": [len(a), len(b)]}
        shared = sorted(fa.keys() & fb.keys())
        if shared and not len(a) == len(b) == SEEDS:  # described on the seeds both arms finished, not tested
            la, lb = ([late_reward(runs_[s]) for s in shared] for runs_ in (fa, fb))
            row["untested"] = {"seeds": shared, "mean": [statistics.fmean(la), statistics.fmean(lb)],
                               "sd": [statistics.stdev(x) if len(x) > 1 else None for x in (la, lb)],
                               "late": [la, lb]}
        if len(a) == len(b) == SEEDS:
            la, lb = [late_reward(r) for r in a], [late_reward(r) for r in b]
            row.update(mean=[statistics.fmean(la), statistics.fmean(lb)], sd=[statistics.stdev(la), statistics.stdev(lb)],
                       late=[la, lb], **welch(la, lb))
            row["detectable"] = detectable(*row["sd"], len(la), len(lb))
        rows.append(row)
    tested = [r for r in rows if "p" in r]
    for r, h in zip(tested, holm([r["p"] for r in tested])):
        r.update(h)
    return rows


def weight_rounds(out: Path, arm: str, k: int) -> list[dict]:
    """Per round, mean ± sample SD over seeds of a drpo arm's corrective and attenuated fractions and the
    smallest weight over its seeds."""
    found = runs(out, arm, k)
    table = []
    for r in range(ROUNDS):
        ws = [run[r].get("weight") or {} for run in found]
        cor = [w["corrective_frac"] for w in ws if w.get("corrective_frac") is not None]
        att = [w["attenuated_frac"] for w in ws if w.get("attenuated_frac") is not None]
        mins = [w["min"] for w in ws if w.get("min") is not None]
        table.append({"round": r + 1, "corrective": _ms(cor), "attenuated": _ms(att), "min": min(mins, default=None)})
    return table


def _ms(xs: list[float]) -> list[float] | None:
    return [statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0] if xs else None


def _pct(ms) -> str:
    return "–" if ms is None else f"{100 * ms[0]:.2f} ± {100 * ms[1]:.2f}"


def markdown(rows: list[dict], weights: dict) -> str:
    lines = ["# The boundary experiment: named comparisons", "",
             (f"Late reward = the mean of the evaluations after rounds {', '.join(map(str, LATE))}; mean ± sample "
             f"SD over seeds; Welch's t (two-sided), Holm's correction over the {sum('p' in r for r in rows)} comparisons tested "
             f"(family-wise α = {ALPHA}), the difference's 95 % Welch interval (unadjusted); `detectable`: the "
             "smallest true difference found with 80 % power at these SDs."), "",
             ("| comparison | K | seeds | late reward a | late reward b | a − b | 95 % interval | t (df) | p | "
             "p (Holm) | beyond the noise | detectable |"), "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"{r['a']} vs {r['b']}"
        if "p" not in r:
            lines.append(f"| {name} | {r['k']} | {r['n'][0]} + {r['n'][1]} of {SEEDS} | incomplete | | | | | | | | |")
            continue
        lines.append(f"| {name} | {r['k']} | {r['n'][0]} + {r['n'][1]} | {r['mean'][0]:.3f} ± {r['sd'][0]:.3f} | "
                     f"{r['mean'][1]:.3f} ± {r['sd'][1]:.3f} | {r['diff']:+.3f} | [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] | "
                     f"{r['t']:.2f} ({r['df']:.1f}) | {r['p']:.3f} | {r['p_holm']:.3f} | "
                     f"{'yes' if r['rejected'] else 'no'} | {r['detectable']:.3f} |")
    for r in rows:
        u = r.get("untested")
        if u is None:
            continue
        sd = ["–" if x is None else f"{x:.3f}" for x in u["sd"]]
        lines += ["", (f"{r['a']} vs {r['b']} at K = {r['k']} is incomplete ({r['n'][0]} and {r['n'][1]} of {SEEDS} "
                  f"runs finished), so it is not tested. Described only, on the seeds both arms finished "
                  f"({', '.join(map(str, u['seeds']))}): late reward {u['mean'][0]:.3f} ± {sd[0]} vs "
                  f"{u['mean'][1]:.3f} ± {sd[1]} (difference {u['mean'][0] - u['mean'][1]:+.3f}).")]
    for (arm, k), table in weights.items():
        if not any(t["corrective"] for t in table):
            continue
        lines += ["", (f"**{arm}, K = {k}: the gradient weight per round** (mean ± sample SD over seeds, % of trained "
                  "tokens; `min`: the smallest weight of any step of any seed)"), "",
                  "| round | corrective (w < 0) | attenuated (w < 0.5) | min w |", "|---|---|---|---|"]
        lines += [f"| {t['round']} | {_pct(t['corrective'])} | {_pct(t['attenuated'])} | "
                  f"{'–' if t['min'] is None else format(t['min'], '.3f')} |" for t in table]
    return "\n".join(lines) + "\n"


def main() -> dict:
    settings = {4: MAIN} | ({8: STRESS} if (STRESS / "rounds").is_dir() else {})
    rows = compare(settings)
    weights = {(arm, k): weight_rounds(out, arm, k) for k, out in settings.items() for arm in ("drpo-d0.2", "drpo")}
    doc = {"comparisons": rows, "weights": {f"{arm}_k{k}": t for (arm, k), t in weights.items()}}
    (MAIN / "verdict.json").write_text(json.dumps(se._round_floats(doc), indent=1) + "\n", encoding="utf-8")
    text = markdown(rows, weights)
    (MAIN / "verdict.md").write_text(text, encoding="utf-8")
    print(text)
    return doc


if __name__ == "__main__":
    main()
