"""Staleness × training–inference mismatch: how each loss copes with rollouts that are stale and
sampled by a numerically different copy of the policy (FP8 / BF16 inference engines).

    python examples/staleness_experiment.py            # default size (docs/experiments.md), ≤ 30 min on 2 CPU cores
    python examples/staleness_experiment.py --quick    # smoke size, about 1 min
    python examples/staleness_experiment.py --out DIR --seeds 5 --rounds 20 --mismatch none fp8-w8a8

Each run starts from the bundled toy checkpoint (examples/toy/model, policy version 8) and repeats
a round: sample rollouts with the checkpoint K policy versions older than the current one (the
start checkpoint while the history is shorter than K), run through the sampler precision of the
mismatch level (examples/mismatch.py: fp32, bf16, fp8 weights / activations, int4) -> `drpo train`
on them in fp32 (the library entry point drpo_cli.training.train.train, in-process; Dr.GRPO advantages, the
behavior anchor, one pass of 4 mini-batches) -> the next checkpoint, whose mean reward is measured
by sampling from it in fp32 (toytask.evaluate). Runs cover every (loss arm, staleness K, mismatch
level, seed); a run's rounds share one temporary directory of checkpoints and rollout files.
Before the runs, each mismatch level's size is measured with `drpo inspect` (drpo_cli.audit.inspect_data) on
lag-0 rollouts of the start checkpoint: mean |log r|, k3 and |Δ|.

`--real` runs the same loop on a real chat model (examples/real_experiment.py).

Per round it keeps: the reward, the trust-region metrics of drpo_report.json (tr/outside_frac,
tr/harmful_frac, delta/abs_mean, kl/k3_mean of the final weights against the sampler; the loss's
clip / mask / corrective fraction averaged over the optimizer steps), the entropy of the trained
policy at the sampled tokens, and the pre-clip gradient norms of every step. Out of it come a
markdown table, PNG plots (reward vs round, one panel per setting; instability per arm), the raw
numbers as JSON and the command that made them, all under --out (default examples/results/).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mismatch
import toytask

from drpo_cli.config import InspectConfig, TrainConfig
from drpo_cli.model.checkpoint import load_model, read_policy_version
from drpo_cli.training.train import train

HERE = Path(__file__).resolve().parent
START = HERE / "toy" / "model"
DEFAULT_OUT = HERE / "results"

# Loss arms: name -> TrainConfig overrides, every loss at its SPEC.md default (ppo-clip 0.2 / 0.28,
# dppo-tv δ 0.15, drpo δ 12.5). DRPO also runs a δ sweep: at the paper's δ = 12.5 the boundary
# |Δ| = δ is unreachable (w stays within 1 ± 0.08, pg-is with a mild pull); at δ ≤ 2.5 it is
# reachable and the corrective gradient can act.
ARMS: dict[str, dict] = {
    "drpo": {"loss": "drpo"},
    "drpo-d0.2": {"loss": "drpo", "delta": 0.2},
    "drpo-d0.5": {"loss": "drpo", "delta": 0.5},
    "drpo-d2.5": {"loss": "drpo", "delta": 2.5},
    "dppo-tv": {"loss": "dppo-tv"},
    "ppo-clip": {"loss": "ppo-clip"},
    "spo": {"loss": "spo"},
    "pg-is": {"loss": "pg-is"},
    "gspo": {"loss": "gspo", "agg": "seq-mean-token-mean"},  # GSPO's own averaging (mean over sequences)
    "cispo": {"loss": "cispo"},
    # The later objectives at their references' defaults; sapo and gmpo with the sequence averaging their
    # references force (verl / TRL), the OPSM and M2PO filters on ppo-clip.
    "sapo": {"loss": "sapo", "agg": "seq-mean-token-mean"},
    "gmpo": {"loss": "gmpo", "agg": "seq-mean-token-mean"},
    "topr": {"loss": "topr"},
    "kimi15": {"loss": "kimi15"},
    "dppo-tv-sq": {"loss": "dppo-tv-sq"},
    "vespo": {"loss": "vespo"},
    "clip-cov": {"loss": "clip-cov"},
    "kl-cov": {"loss": "kl-cov"},
    "ppo-clip+opsm": {"loss": "ppo-clip", "opsm_delta": 0.5},
    "ppo-clip+m2po": {"loss": "ppo-clip", "m2po_threshold": 0.04},
}
# The per-step metric that says what each loss did to the tokens (SPEC.md §2, docs/losses.md).
LOSS_FRACTION = {
    "ppo-clip": "ppo_clip/clip_frac",
    "dppo-tv": "dppo_tv/mask_frac",
    "drpo": "weight/drpo_corrective_frac",
    "spo": "weight/spo_corrective_frac",
    "gspo": "gspo/clip_frac",
    "cispo": "cispo/clip_frac",
    "sapo": "weight/sapo_attenuated_frac",
    "gmpo": "gmpo/clip_frac",
    "topr": "topr/truncated_frac",
    "kimi15": "kimi15/corrective_frac",
    "dppo-tv-sq": "dppo_tv_sq/mask_frac",
    "vespo": "vespo/attenuated_frac",
    "clip-cov": "clip_cov/selected_frac",
    "kl-cov": "kl_cov/selected_frac",
}
FILTER_FRACTION = {"opsm_delta": "opsm/seq_drop_frac", "m2po_threshold": "m2po/masked_frac"}


def fraction_name(config: dict) -> str | None:
    """The per-step metric an arm (TrainConfig fields) reports: its filter's, else its loss's."""
    for option, metric in FILTER_FRACTION.items():
        if config.get(option) is not None:
            return metric
    return LOSS_FRACTION.get(config["loss"])
TR_METRICS = ("tr/outside_frac", "tr/harmful_frac", "delta/abs_mean", "kl/k3_mean", "entropy/mean")
# The sampler-vs-trainer divergence a round starts from (its first optimizer step, before any update):
# lag plus mismatch at K > 0, the mismatch alone at K = 0.
START_METRICS = ("kl/k3_mean", "delta/abs_mean", "tr/outside_frac")
EVAL_SEED = 12345  # one set of evaluation prompts and random draws for every round, arm and seed
REWARD_COLLAPSE = 0.05  # a run has collapsed when its last reward is this far below the start's
MAX_GRAD_NORM = TrainConfig.max_grad_norm  # the gradient clip every run uses
ENTROPY_COLLAPSE = 0.1  # nats: entropy collapse = final entropy below this while the reward is < 0.9


@dataclass(frozen=True)
class Settings:
    """One experiment size. Every field is a command-line option of the same name."""

    arms: tuple[str, ...] = tuple(ARMS)
    staleness: tuple[int, ...] = (0, 2, 8)
    """K: rollouts of round r come from the checkpoint of round max(0, r − K)."""
    mismatch: tuple[str, ...] = ("none", "fp8-w8a8", "fp8-w8a8-x10")
    """Sampler precision levels (examples/mismatch.LEVELS); the trainer is always fp32."""
    seeds: int = 3
    rounds: int = 12
    prompts: int = 16
    """Prompts (groups) per round; their keys cycle through a..h."""
    samples: int = 8
    """Responses per prompt (group size of the group-relative advantage)."""
    response_len: int = 10
    temperature: float = 1.0
    lr: float = 1e-3
    epochs: int = 1
    minibatches: int = 4
    """Optimizer steps per rollout batch (the paper's 4), over `epochs` passes."""
    eval_prompts: int = 64
    eval_samples: int = 4
    workers: int = 2
    """Processes running runs side by side, each on `threads` torch threads."""
    threads: int = 1
    checkpoint_results: int = 1
    """1: rewrite the outputs (marked partial) at most once a minute while the grid runs; 0: only at the end."""

    def total_runs(self) -> int:
        return len(self.arms) * len(self.staleness) * len(self.mismatch) * self.seeds


PRESETS = {
    "default": Settings(),
    # 2 rounds of 8 prompts, a small evaluation: a smoke test of every arm (at K = 8 every round samples the start).
    "quick": Settings(staleness=(0, 8), mismatch=("none", "fp8-w8a8-x10"), seeds=1, rounds=2, prompts=8,
                      eval_prompts=16, eval_samples=2),
}


# ---- one run -------------------------------------------------------------------------------------


def run_one(arm: str, staleness: int, level: str, seed: int, s: Settings) -> dict:
    """Rounds of sample (K versions stale, through `level`'s precision) -> drpo train -> evaluate."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per checkpoint otherwise
    torch.set_num_threads(s.threads)
    t0 = time.perf_counter()
    start_model, _ = load_model(START)
    # history[r] = (dir, sampler) of the checkpoint entering round r; the sampler is its rounded copy.
    history = [(START, mismatch.sampler_copy(start_model, level))]
    eval_kw = {"num_prompts": s.eval_prompts, "samples_per_prompt": s.eval_samples,
               "temperature": s.temperature, "response_len": s.response_len, "seed": EVAL_SEED}
    rounds = []
    with tempfile.TemporaryDirectory(prefix=f"staleness-{arm}-k{staleness}-{level}-s{seed}-") as tmp:
        for r in range(s.rounds):
            sampler_dir, sampler = history[max(0, r - staleness)]
            sampler_version = read_policy_version(sampler_dir)
            round_seed = seed * 1000 + r  # same sampler -> same data in every arm and K: paired comparisons
            table = toytask.sample_rollouts(
                sampler, toytask.make_prompts(s.prompts, round_seed), s.samples, s.temperature,
                sampler_version, round_seed, response_len=s.response_len,
            )
            rollouts = Path(tmp) / f"rollouts-{r}.arrow"
            toytask.write_arrow(table, rollouts)
            result = train(train_config(s, arm, rollouts, history[r][0], Path(tmp) / f"ckpt-{r + 1}", round_seed))
            model, _ = load_model(result.out_dir)
            history.append((result.out_dir, mismatch.sampler_copy(model, level)))
            rounds.append(round_record(result.report, r, sampler_version,
                                       float(table.column("reward").to_numpy().mean()),
                                       toytask.evaluate(model, **eval_kw)))
        start_reward = toytask.evaluate(start_model, **eval_kw)
    return {"arm": arm, "staleness": staleness, "mismatch": level, "seed": seed, "start_reward": start_reward,
            "rounds": rounds, "seconds": time.perf_counter() - t0}


def train_config(s: Settings, arm: str, rollouts: Path, model: str | Path, out: Path, seed: int,
                 **overrides) -> TrainConfig:
    """The paper's recipe: Dr.GRPO advantages (no std), the behavior anchor, `minibatches` steps per pass."""
    return TrainConfig(
        rollouts=(str(rollouts),), model=str(model), out=str(out), lr=s.lr, epochs=s.epochs,
        minibatches=s.minibatches, adv_norm="none", anchor="behavior", seed=seed, device="cpu", quiet=True,
        **ARMS[arm], **overrides,
    ).check()


def round_record(report: dict, r: int, sampler_version: int, rollout_reward: float, reward: float) -> dict:
    """The numbers kept per round from one drpo_report.json plus the evaluation."""
    steps = report["steps"]
    final = report["final"]["metrics"]
    frac_name = fraction_name(report["config"])
    fracs = [st["metrics"].get(frac_name) for st in steps] if frac_name else []
    trained = report["input"]["policy_version"] or 0  # a checkpoint without a version is version 0, as in train
    return {
        "round": r + 1,
        "trained_version": trained,
        "sampler_version": sampler_version,
        "lag": trained - sampler_version,
        "reward": reward,
        "rollout_reward": rollout_reward,
        "final": {k: final.get(k) for k in TR_METRICS},
        "start": {k: steps[0]["metrics"].get(k) for k in START_METRICS} if steps else None,
        "loss_fraction": {"name": frac_name, "mean": _mean(fracs)} if frac_name else None,
        "weight": _weight_record(report["config"]["loss"], steps),
        "grad_norms": [st["grad_norm"] for st in steps],
        "skipped_steps": report["skipped_steps"],
        "train_seconds": report["seconds"],
    }


def _weight_record(loss: str, steps: list[dict]) -> dict | None:
    """A weighted loss's gradient weight over the round's steps (drpo, spo: SPEC.md §2): the mean
    corrective (w < 0) and attenuated (w < 0.5) fractions and the smallest weight, so that a round
    shows whether the boundary was reached; None for a loss without a gradient-weight diagnostic."""
    prefix = f"weight/{loss}_"
    if not steps or prefix + "corrective_frac" not in steps[0]["metrics"]:
        return None
    mins = [st["metrics"].get(prefix + "min") for st in steps]
    return {"corrective_frac": _mean([st["metrics"].get(prefix + "corrective_frac") for st in steps]),
            "attenuated_frac": _mean([st["metrics"].get(prefix + "attenuated_frac") for st in steps]),
            "min": min((m for m in mins if m is not None and math.isfinite(m)), default=None)}


# ---- summary -------------------------------------------------------------------------------------


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def _std(xs) -> float:
    """The sample standard deviation (n − 1): what "±" means in every table here; 0 for one value."""
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def settings_of(runs: list[dict]) -> list[tuple[str, int]]:
    """The (mismatch level, staleness K) settings present, in run order of levels, K ascending."""
    levels = list(dict.fromkeys(r.get("mismatch", "none") for r in runs))
    return [(m, k) for m in levels for k in sorted({r["staleness"] for r in runs if r.get("mismatch", "none") == m})]


def runs_of(runs: list[dict], arm: str, level: str, k: int) -> list[dict]:
    """The runs (one per seed) of `arm` at mismatch `level` and staleness `k`."""
    return [r for r in runs if r["arm"] == arm and r.get("mismatch", "none") == level and r["staleness"] == k]


def reward_collapsed(run: dict) -> bool:
    return run["rounds"][-1]["reward"] < run["start_reward"] - REWARD_COLLAPSE


def entropy_collapsed(run: dict) -> bool:
    last = run["rounds"][-1]
    return (last["final"]["entropy/mean"] or 1.0) < ENTROPY_COLLAPSE and last["reward"] < 0.9


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (arm, mismatch, staleness): means over seeds of the run-level numbers."""
    rows = []
    for level, k in settings_of(runs):
        for arm in dict.fromkeys(r["arm"] for r in runs):
            group = runs_of(runs, arm, level, k)
            if not group or not all(g["rounds"] for g in group):
                continue
            final = [g["rounds"][-1]["reward"] for g in group]
            # Pre-clip gradient norms of every step of each run (None: a non-finite norm).
            norms = [[x for rd in g["rounds"] for x in rd["grad_norms"] if x is not None] for g in group]
            last = [g["rounds"][-1] for g in group]
            rows.append({
                "arm": arm, "mismatch": level, "staleness": k, "seeds": len(group),
                "rounds": min(len(g["rounds"]) for g in group),
                "start_reward": _mean([g["start_reward"] for g in group]),
                "final_reward": _mean(final), "final_reward_std": _std(final),
                "mean_reward": _mean([_mean([rd["reward"] for rd in g["rounds"]]) for g in group]),
                "min_reward": min(rd["reward"] for g in group for rd in g["rounds"]),
                "reward_collapses": sum(map(reward_collapsed, group)),
                "entropy_collapses": sum(map(entropy_collapsed, group)),
                **{k2: _mean([rd["final"][k2] for g in group for rd in g["rounds"]]) for k2 in TR_METRICS[:4]},
                "final_entropy": _mean([rd["final"]["entropy/mean"] for rd in last]),
                "start_k3": _mean([(rd.get("start") or {}).get("kl/k3_mean") for g in group for rd in g["rounds"]]),
                "loss_fraction": _mean([(rd["loss_fraction"] or {}).get("mean") for g in group
                                        for rd in g["rounds"]]),
                "grad_norm_max": max(max(n, default=0.0) for n in norms),
                "grad_spike": _mean([_spike(n) for n in norms]),
                "clipped_frac": _mean([sum(x > MAX_GRAD_NORM for x in n) / len(n) for n in norms if n]),
                "skipped_steps": sum(rd["skipped_steps"] for g in group for rd in g["rounds"]),
            })
    return rows


def _spike(norms: list[float]) -> float | None:
    """max / median of a run's pre-clip gradient norms (None without a nonzero median)."""
    median = statistics.median(norms) if norms else 0.0
    return max(norms) / median if median > 0 else None


def _fmt(x, spec=".3f") -> str:
    return "–" if x is None else format(x, spec)


def markdown_tables(rows: list[dict]) -> str:
    """Two results tables: reward and collapse per (loss, setting); trust-region and gradient metrics."""
    reward = [("| loss | mismatch | K | final reward (± sample SD) | mean reward over rounds | min reward | reward collapses | "
               "entropy collapses | final entropy |"), "|---|---|---|---|---|---|---|---|---|"]
    tr = [("| loss | mismatch | K | k3 at round start | outside | harmful | \\|Δ\\| mean | k3 | clip / mask / corrective "
           "| max grad norm | grad spike | clipped steps |"), "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n, key = r["seeds"], f"| {r['arm']} | {r['mismatch']} | {r['staleness']} "
        reward.append(
            f"{key}| {_fmt(r['final_reward'])} ± {_fmt(r['final_reward_std'])} "
            f"| {_fmt(r['mean_reward'])} | {_fmt(r['min_reward'])} | {r['reward_collapses']} of {n} "
            f"| {r['entropy_collapses']} of {n} | {_fmt(r['final_entropy'], '.2f')} |"
        )
        tr.append(
            f"{key}| {_fmt(r['start_k3'], '.2g')} | {_fmt(r['tr/outside_frac'])} | {_fmt(r['tr/harmful_frac'])} "
            f"| {_fmt(r['delta/abs_mean'])} | {_fmt(r['kl/k3_mean'])} | {_fmt(r['loss_fraction'])} "
            f"| {_fmt(r['grad_norm_max'], '.2f')} | {_fmt(r['grad_spike'], '.1f')} | {_fmt(r['clipped_frac'])} |"
        )
    return "\n".join(reward) + "\n\n" + "\n".join(tr)


def curve_tables(runs: list[dict]) -> str:
    """Per round, mean ± sample SD over seeds of each arm and setting: the evaluated reward, and the k3 the
    round's first optimizer step starts from (the sampler's mismatch plus the staleness, as trained)."""
    runs = [r for r in runs if r["rounds"]]
    if not runs:
        return ""
    width = max(len(r["rounds"]) for r in runs)
    head = "| loss | mismatch | K | " + " | ".join(f"round {i}" for i in range(1, width + 1)) + " |"
    rule = "|---|---|---|" + "---|" * width
    tables = {"reward": [head, rule], "k3": [head, rule]}
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    for level, k in settings_of(runs):
        for arm in arms:
            group = runs_of(runs, arm, level, k)
            if not group:
                continue
            key = f"| {arm} | {level} | {k} |"
            cells = {"reward": [], "k3": []}
            for i in range(width):
                rounds = [g["rounds"][i] for g in group if len(g["rounds"]) > i]
                reward = [rd["reward"] for rd in rounds]
                k3 = [x for x in ((rd.get("start") or {}).get("kl/k3_mean") for rd in rounds) if x is not None]
                cells["reward"].append(f"{_mean(reward):.2f} ± {_std(reward):.2f}" if reward else "–")
                cells["k3"].append(f"{_mean(k3):.2g} ± {_std(k3):.1g}" if k3 else "–")
            for name, lines in tables.items():
                lines.append(key + " " + " | ".join(cells[name]) + " |")
    return ("Reward after each round (mean ± sample SD over seeds):\n\n" + "\n".join(tables["reward"])
            + "\n\nk3 at each round's first step (mean ± sample SD over seeds):\n\n" + "\n".join(tables["k3"]))


# Losses whose gradient weight is the importance ratio itself (clipped or not): the family the DRPO paper
# says turns unstable under low-precision rollouts; dppo-tv and drpo bound a divergence instead.
RATIO_ARMS = ("pg-is", "ppo-clip", "spo", "gspo", "cispo", "ppo-clip+opsm", "ppo-clip+m2po")
LATE_ROUNDS = 3  # a run's reward = the mean of its last LATE_ROUNDS evaluations (one round alone is noisy)


def _run_numbers(run: dict) -> dict:
    rounds = run["rounds"]
    norms = [x for rd in rounds for x in rd["grad_norms"] if x is not None]
    return {"late": _mean([rd["reward"] for rd in rounds[-LATE_ROUNDS:]]),
            "spike": _spike(norms), "grad_max": max(norms, default=0.0),
            "collapsed": reward_collapsed(run), "entropy_collapsed": entropy_collapsed(run)}


def _band(xs: list[float]) -> tuple[float, float]:
    return _mean(xs) or 0.0, _std(xs)


def verdicts(runs: list[dict]) -> list[str]:
    """What the numbers say, each claim against the seed spread (markdown lines).

    Per setting, the arms' late reward (the mean of a run's last LATE_ROUNDS evaluations) as mean ± sample
    SD over seeds; two arms differ beyond the seed spread when their means are further apart than the sum
    of their sample standard deviations (the mean ± SD bands do not overlap). Then, per arm and K, the
    low-precision sampler against the float32 control on late reward, gradient spikes (max / median
    pre-clip norm) and collapses: the paper's "ratio-based methods become unstable under
    low-precision rollouts" shows up only if a ratio-based arm spikes or collapses more under the
    low-precision sampler than under the control, beyond the seed spread, while dppo-tv / drpo do not.
    Reward collapses count in that test; entropy collapses (a policy gone near-deterministic while
    still wrong on some prompts) are shown beside them but do not, being premature convergence, not
    instability.
    """
    complete = [r for r in runs if r["rounds"]]
    if not complete:
        return []
    lines = [(f"## What the numbers say (mean ± sample SD over seeds; late reward = mean of the last {LATE_ROUNDS} "
              "evaluations of a run)"), ""]
    numbers = {id(r): _run_numbers(r) for r in complete}

    def group(arm, level, k):
        return [numbers[id(r)] for r in runs_of(complete, arm, level, k)]

    arms = list(dict.fromkeys(r["arm"] for r in complete))
    for level, k in settings_of(complete):
        bands = {a: _band([g["late"] for g in group(a, level, k)]) for a in arms if group(a, level, k)}
        rounds = min(len(r["rounds"]) for r in complete if r.get("mismatch", "none") == level and r["staleness"] == k)
        ranked = sorted(bands, key=lambda a: -bands[a][0])
        apart = [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1:]
                 if bands[a][0] - bands[b][0] > bands[a][1] + bands[b][1]]
        lines.append(f"- **{level}, K = {k}** (after {rounds} rounds): "
                     + ", ".join(f"{a} {bands[a][0]:.3f} ± {bands[a][1]:.3f}" for a in ranked) + ". "
                     + ("Beyond the seed spread: " + "; ".join(
                         f"{a} > {b} by {bands[a][0] - bands[b][0]:.3f} (spreads {bands[a][1]:.3f} + "
                         f"{bands[b][1]:.3f})" for a, b in apart) + "."
                        if apart else "No difference between arms is larger than the seed spread."))
    levels = list(dict.fromkeys(r.get("mismatch", "none") for r in complete))
    control = next((lv for lv in levels if lv in ("F32", "none")), None)
    if control is None or len(levels) < 2:
        return lines
    lines += ["", f"Low precision against the control ({control}), same arm and K:", ""]
    unstable, spike_ratios = [], []
    for level in (lv for lv in levels if lv != control):
        for k in sorted({r["staleness"] for r in complete}):
            for arm in arms:
                low, ctl = group(arm, level, k), group(arm, control, k)
                if not low or not ctl:
                    continue
                (lr, lrs), (cr, crs) = _band([g["late"] for g in low]), _band([g["late"] for g in ctl])
                (ls, lss), (cs, css) = (_band([g["spike"] or 1.0 for g in low]),
                                        _band([g["spike"] or 1.0 for g in ctl]))
                lc, cc = sum(g["collapsed"] for g in low), sum(g["collapsed"] for g in ctl)
                le, ce = sum(g["entropy_collapsed"] for g in low), sum(g["entropy_collapsed"] for g in ctl)
                spike_ratios.append(ls / cs if cs > 0 else None)
                why = [w for w, hit in (("its gradient spikes are larger", ls - cs > lss + css),
                                        ("more runs collapse", lc > cc),
                                        ("its late reward is lower", cr - lr > lrs + crs)) if hit]
                if why:
                    unstable.append((arm, level, k))
                reward_note = (f" (its late reward is {'higher' if lr > cr else 'lower'} with {level}, within the spread)"
                               if why and "its late reward is lower" not in why else "")
                lines.append(f"- {arm}, K = {k}: late reward {level} {lr:.3f} ± {lrs:.3f} vs {control} {cr:.3f} ± "
                             f"{crs:.3f}; grad spike {ls:.2f} ± {lss:.2f} vs {cs:.2f} ± {css:.2f}; reward collapses "
                             f"{lc} of {len(low)} vs {cc} of {len(ctl)}; entropy collapses {le} of {len(low)} vs "
                             f"{ce} of {len(ctl)}"
                             + (f" — worse under low precision beyond the seed spread: {' and '.join(why)}{reward_note}."
                                if why else "."))
    ratios = [r for r in spike_ratios if r is not None]
    if ratios:
        geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        lines += ["", (f"Gradient spikes are larger under low precision in {sum(r > 1 for r in ratios)} of the "
                  f"{len(ratios)} arm × K cells (ratio of means: geometric mean ×{geo:.2f}, range "
                  f"×{min(ratios):.2f}–×{max(ratios):.2f}).")]
    ratio = [u for u in unstable if u[0] in RATIO_ARMS]
    bounded = [u for u in unstable if u[0] not in RATIO_ARMS]
    lines += ["", "**Ratio-based instability under low-precision rollouts:** "
              + ("shows up: " + ", ".join(f"{a} ({lv}, K = {k})" for a, lv, k in ratio)
                 + (" (and also in " + ", ".join(f"{a} ({lv}, K = {k})" for a, lv, k in bounded) + ")" if bounded
                    else ", while no divergence-bounded arm is worse") + "."
                 if ratio else "does not show up here: no ratio-based arm has larger gradient spikes, more "
                 "collapses or a lower late reward with the low-precision sampler than with the control beyond "
                 "the seed spread" + (" (divergence-bounded arms worse: " + ", ".join(
                     f"{a} ({lv}, K = {k})" for a, lv, k in bounded) + ")" if bounded else "") + ".")]
    return lines


def levels_table(levels: list[dict]) -> str:
    """The measured size of each mismatch level (drpo inspect on lag-0 rollouts of the start checkpoint)."""
    lines = ["| mismatch level | sampler precision | mean \\|log r\\| | k3 | \\|Δ\\| mean | \\|Δ\\| max | outside |",
             "|---|---|---|---|---|---|---|"]
    for lv in levels:
        lines.append(f"| {lv['level']} | {lv['precision']} | {_fmt(lv['logr_abs_mean'], '.2e')} "
                     f"| {_fmt(lv['k3'], '.2e')} | {_fmt(lv['delta_abs_mean'], '.2e')} "
                     f"| {_fmt(lv['delta_abs_max'], '.2e')} | {_fmt(lv['outside_frac'], '.3f')} |")
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(runs: list[dict], out: Path, metric: str, ylabel: str, filename: str) -> Path | None:
    """One panel per setting (rows: mismatch level, columns: K), one line per arm (mean over seeds;
    band = min..max); None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    levels = list(dict.fromkeys(m for m, _ in settings_of(runs)))
    ks = sorted({k for _, k in settings_of(runs)})
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    fig, axes = plt.subplots(len(levels), len(ks), figsize=(4.2 * len(ks), 3.3 * len(levels)), sharey=True,
                             squeeze=False)
    for i, level in enumerate(levels):
        for j, k in enumerate(ks):
            ax = axes[i][j]
            for arm in arms:
                group = [r for r in runs_of(runs, arm, level, k) if r["rounds"]]
                if not group:
                    continue
                n = min(len(g["rounds"]) for g in group)
                curves = [[_value(g, None, metric)] + [_value(g, rd, metric) for rd in g["rounds"][:n]] for g in group]
                xs = range(n + 1)
                cols = [[c[x] for c in curves if c[x] is not None] for x in xs]
                mean = [sum(c) / len(c) if c else float("nan") for c in cols]
                (line,) = ax.plot(xs, mean, label=arm, marker=".", linewidth=1.3)
                if len(group) > 1:
                    ax.fill_between(xs, [min(c, default=math.nan) for c in cols],
                                    [max(c, default=math.nan) for c in cols],
                                    color=line.get_color(), alpha=0.10, linewidth=0)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_title(f"mismatch {level}, K = {k}", fontsize=10)
            ax.grid(alpha=0.3)
            if i == len(levels) - 1:
                ax.set_xlabel("round")
        axes[i][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = out / filename
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


INSTABILITY = (("final_reward", "final reward", ".2f"), ("grad_spike", "grad spike (max / median norm)", ".0f"),
               ("tr/outside_frac", "outside the trust region", ".2f"), ("final_entropy", "final entropy", ".2f"))


def plot_instability(rows: list[dict], out: Path, filename: str = "instability.png") -> Path | None:
    """Heat maps, arm × setting, of the final reward and the instability metrics; collapses marked."""
    plt = _pyplot()
    if plt is None or not rows:
        return None
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    settings = list(dict.fromkeys((r["mismatch"], r["staleness"]) for r in rows))
    cell = {(r["arm"], r["mismatch"], r["staleness"]): r for r in rows}
    fig, axes = plt.subplots(len(INSTABILITY), 1, figsize=(1.0 + 0.75 * len(settings), 2.0 + 2.1 * len(INSTABILITY)
                                                          * len(arms) / 8), squeeze=False)
    for ax, (key, title, spec) in zip(axes[:, 0], INSTABILITY):
        grid = [[(cell.get((a, m, k)) or {}).get(key) for m, k in settings] for a in arms]
        values = [[math.nan if v is None else v for v in row] for row in grid]
        ax.imshow(values, aspect="auto", cmap="viridis")
        for i, a in enumerate(arms):
            for j, (m, k) in enumerate(settings):
                r = cell.get((a, m, k))
                if r is None or values[i][j] != values[i][j]:
                    continue
                mark = "*" if key == "final_reward" and (r["reward_collapses"] or r["entropy_collapses"]) else ""
                ax.text(j, i, format(values[i][j], spec) + mark, ha="center", va="center", fontsize=6.5, color="w")
        ax.set_yticks(range(len(arms)), arms, fontsize=7)
        ax.set_xticks(range(len(settings)), [f"{m}\nK={k}" for m, k in settings], fontsize=6.5)
        ax.set_title(title + (" (* = a reward or entropy collapse)" if key == "final_reward" else ""), fontsize=9)
    fig.tight_layout()
    path = out / filename
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _value(run: dict, rd: dict | None, metric: str) -> float | None:
    """`metric` of round record `rd`; rd None is round 0, the start checkpoint (reward only)."""
    if rd is None:
        return run["start_reward"] if metric == "reward" else None
    return rd["reward"] if metric == "reward" else rd["final"][metric]


# ---- driver --------------------------------------------------------------------------------------


def measure_level(model, model_dir: str | Path, level: str, sample, tmp: Path, precision: str | None = None) -> dict:
    """`level`'s mismatch on lag-0 rollouts: `sample(sampler)` -> a table, audited by drpo inspect
    (drpo_cli.audit.inspect_data.run_inspect, `drpo inspect ROLLOUTS --model MODEL_DIR --per-token T`) against
    the fp32 model. Mean |log r| comes from the per-token file, the rest from the report.
    `precision`: the sampler's description when it is not a mismatch.LEVELS copy (then sample(None))."""
    import numpy as np
    import pyarrow as pa

    from drpo_cli.audit.inspect_data import run_inspect

    rollouts, per_token = tmp / f"lag0-{level}.arrow", tmp / f"lag0-{level}.tokens.arrow"
    toytask.write_arrow(sample(None if precision else mismatch.sampler_copy(model, level)), rollouts)
    cfg = InspectConfig(rollouts=(str(rollouts),), model=str(model_dir), device="cpu", quiet=True).check()
    m = run_inspect(cfg, per_token_path=str(per_token))["metrics"]
    with pa.memory_map(str(per_token)) as f:
        logr = pa.ipc.open_file(f).read_all().column("logr").to_numpy()
    if precision is None:
        precision = "fp32 (the trainer's)" if mismatch.LEVELS[level] is None else mismatch.describe(mismatch.LEVELS[level])
    return {"level": level, "precision": precision,
            "tokens": int(logr.size), "logr_abs_mean": float(np.abs(logr).mean()), "k3": m["kl/k3_mean"],
            "k1": m["kl/k1_mean"], "delta_abs_mean": m["delta/abs_mean"], "delta_abs_max": m["delta/abs_max"],
            "outside_frac": m["tr/outside_frac"]}


def measure_levels(s: Settings) -> list[dict]:
    """Every mismatch level (mismatch.LEVELS, not only those of `s`), on lag-0 rollouts of the start
    checkpoint (4 rounds' worth of prompts)."""
    model, _ = load_model(START)

    def sample(sampler):
        return toytask.sample_rollouts(sampler, toytask.make_prompts(4 * s.prompts, EVAL_SEED), s.samples,
                                       s.temperature, read_policy_version(START), EVAL_SEED,
                                       response_len=s.response_len)

    with tempfile.TemporaryDirectory(prefix="mismatch-levels-") as tmp:
        return [measure_level(model, START, level, sample, Path(tmp)) for level in mismatch.LEVELS]


def run_all(s: Settings, progress=print, on_run=None) -> list[dict]:
    """Every (arm, staleness, mismatch, seed) run, over `s.workers` processes; results in job order.

    Jobs go seed by seed (every setting and arm of seed 0 first), so an interrupted grid still covers
    every cell; `on_run(runs_so_far)` is called after each finished run, in completion order.
    """
    jobs = [(arm, k, level, seed, s) for seed in range(s.seeds) for level in s.mismatch for k in s.staleness
            for arm in s.arms]
    done: dict[int, dict] = {}

    def finished(i: int, run: dict) -> None:
        done[i] = run
        progress(_done_line(run, len(done), len(jobs)))
        if on_run is not None:
            on_run([done[j] for j in sorted(done)])

    if s.workers <= 1:
        for i, job in enumerate(jobs):
            finished(i, run_one(*job))
        return [done[i] for i in range(len(jobs))]
    # spawn: a fresh interpreter per worker, no forked torch thread pools.
    import multiprocessing

    with ProcessPoolExecutor(s.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_one, *job): i for i, job in enumerate(jobs)}
        for f in as_completed(futures):
            finished(futures[f], f.result())
    return [done[i] for i in range(len(jobs))]


def _done_line(run: dict, i: int, n: int) -> str:
    return (f"[{i}/{n}] {run['arm']:>9} {run['mismatch']:>10} K={run['staleness']} seed={run['seed']}: reward "
            f"{run['start_reward']:.3f} -> {run['rounds'][-1]['reward']:.3f} ({run['seconds']:.1f}s)")


DEFINITIONS = {
    "reward_collapse": f"last-round reward < start reward - {REWARD_COLLAPSE}",
    "entropy_collapse": f"last-round entropy/mean < {ENTROPY_COLLAPSE} nats with reward < 0.9",
    "grad_spike": "max / median of a run's pre-clip gradient norms over all its steps, mean over "
                  "seeds; grad_norm_max: the largest pre-clip norm of any step; clipped steps: "
                  f"share of steps with a pre-clip norm above the clip {MAX_GRAD_NORM}",
    "k3 at round start": "kl/k3_mean of each round's first optimizer step (before any update: the "
                         "sampler-vs-trainer divergence, lag + mismatch), mean over rounds and seeds",
    "outside/harmful/|Δ| mean/k3": "drpo_report.json final.metrics (trained weights vs the sampler "
                                   "on the round's rollouts), mean over rounds and seeds",
    "clip / mask / corrective": "the loss's ppo_clip/clip_frac, dppo_tv/mask_frac or "
                                "weight/{drpo,spo}_corrective_frac, mean over steps, rounds and seeds",
    "mismatch levels": "drpo inspect on lag-0 rollouts sampled through each level's precision, "
                       "against the fp32 start checkpoint: mean |log r| (per-token file), kl/k3_mean, "
                       "delta/abs_mean, delta/abs_max, tr/outside_frac",
}


def write_outputs(out: Path, s, runs: list[dict], command: str, seconds: float, levels: list[dict],
                  title: str = "Staleness × mismatch experiment results", extra: dict | None = None,
                  partial_of: int | None = None, load_average: list[float] | None = None) -> dict:
    """results.json, results.md, reward.png, harmful.png, instability.png and command.txt under `out`;
    `load_average`: the one recorded when the rounds ran (a report written later), else now's."""
    out.mkdir(parents=True, exist_ok=True)
    load_average = list(load_average or os.getloadavg())
    rows = summarize(runs)
    plots = [p for p in (plot(runs, out, "reward", "mean reward (eval samples)", "reward.png"),
                         plot(runs, out, "tr/harmful_frac", "tr/harmful_frac after training", "harmful.png"),
                         plot_instability(rows, out))
             if p is not None]
    doc = {"command": command, "settings": asdict(s), "seconds": seconds, "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "load_average": load_average, "partial_of": partial_of,
           "mismatch_levels": levels,
           **(extra or {}), "summary": rows, "runs": runs, "definitions": DEFINITIONS}
    doc = _round_floats(doc)
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(doc, separators=(",", ":")) + "\n", encoding="utf-8")
    os.replace(tmp, out / "results.json")
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    text = [
        f"# {title}", "",
        f"Command: `{command}`", "",
        *([f"**Partial: {len(runs)} of {partial_of} runs finished so far.**", ""] if partial_of else []),
        (f"{len(runs)} runs ({len(arms)} arms × mismatch ∈ {{{', '.join(s.mismatch)}}} × "
         f"K ∈ {{{', '.join(map(str, s.staleness))}}} × {s.seeds} seeds), up to {s.rounds} rounds each; "
         f"{s.prompts} prompts × {s.samples} samples per round, lr {s.lr:g}, "
         f"{s.epochs} epoch(s) × {s.minibatches} mini-batches, Dr.GRPO advantages, behavior anchor; wall time "
         f"{seconds / 60:.1f} min on {s.workers} worker(s) × {s.threads} thread(s), load average at the end "
         f"{load_average[0]:.1f} on {os.cpu_count()} CPUs."), "",
        "Mismatch levels, measured with `drpo inspect` on lag-0 rollouts of the start checkpoint:", "",
        levels_table(levels), "",
        markdown_tables(rows), "",
        curve_tables(runs), "",
        *verdicts(runs), "",
        *[f"![{p.stem}]({p.name})" for p in plots],
    ]
    (out / "results.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    (out / "command.txt").write_text(command + "\n", encoding="utf-8")
    return doc


def _round_floats(x):
    """Floats to 5 significant digits (far below the evaluation noise), keeping results.json small."""
    if isinstance(x, float):
        return float(f"{x:.5g}")
    if isinstance(x, dict):
        return {k: _round_floats(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round_floats(v) for v in x]
    return x


def parse_args(argv: list[str] | None) -> tuple[Settings, Path]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the smoke size (1 seed, 2 rounds, 2 mismatch levels)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default examples/results/)")
    for f in Settings.__dataclass_fields__.values():
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("arms", "staleness", "mismatch"):
            p.add_argument(flag, nargs="+", type=int if f.name == "staleness" else str, default=None)
        else:
            p.add_argument(flag, type=type(getattr(PRESETS["default"], f.name)), default=None)
    args = p.parse_args(argv)
    s = PRESETS["quick" if args.quick else "default"]
    given = {k: getattr(args, k) for k in Settings.__dataclass_fields__ if getattr(args, k) is not None}
    s = replace(s, **{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    check_names(p, s)
    if s.seeds < 1 or s.rounds < 1 or min(s.staleness) < 0:
        p.error("--seeds and --rounds must be >= 1 and --staleness values >= 0")
    return s, args.out


def check_names(p: argparse.ArgumentParser, s) -> None:
    """Unknown --arms / --mismatch names end the command with exit code 2 (argparse's error)."""
    for flag, names, known in (("--arms", s.arms, ARMS), ("--mismatch", s.mismatch, mismatch.LEVELS)):
        unknown = [a for a in names if a not in known]
        if unknown:
            p.error(f"{flag} {' '.join(unknown)}: unknown (expected some of {', '.join(known)})")


def main(argv: list[str] | None = None) -> dict:
    raw = sys.argv[1:] if argv is None else argv
    if "--real" in raw:
        import real_experiment

        return real_experiment.main([a for a in raw if a != "--real"])
    s, out = parse_args(raw)
    command = shlex.join(["python", "examples/staleness_experiment.py", *raw])
    torch.set_num_threads(s.threads)
    t0 = time.perf_counter()
    import multiprocessing

    # The levels are measured in a process of their own while the grid runs.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        measured = pool.submit(measure_levels, s)
        last = [0.0]

        def partial(runs: list[dict]) -> None:  # results so far, at most once a minute: an interrupted grid keeps them
            if measured.done() and time.perf_counter() - last[0] > 60:
                write_outputs(out, s, runs, command, time.perf_counter() - t0, measured.result(),
                              partial_of=s.total_runs())
                last[0] = time.perf_counter()

        runs = run_all(s, on_run=partial if s.checkpoint_results else None)
        levels = measured.result()
    print(levels_table(levels))
    doc = write_outputs(out, s, runs, command, time.perf_counter() - t0, levels)
    print(markdown_tables(doc["summary"]))
    print(f"wrote {out}/results.md, results.json and plots in {doc['seconds'] / 60:.1f} min")
    return doc


if __name__ == "__main__":
    main()
