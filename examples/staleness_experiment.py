"""Staleness experiment: how each loss copes as the rollouts it trains on go stale.

    python examples/staleness_experiment.py            # default size: 72 runs (8 arms), about 9 min on 2 CPU cores
    python examples/staleness_experiment.py --quick    # smoke size: 24 runs, about 1 min
    python examples/staleness_experiment.py --out DIR --seeds 5 --rounds 20 --workers 2

Each run starts from the bundled toy checkpoint (examples/toy/model, policy version 8) and repeats
a round: sample rollouts with the checkpoint K policy versions older than the current one (the
start checkpoint while the history is shorter than K) -> `drpo train` on them (the library entry
point drpo_cli.train.train, in-process) -> the next checkpoint, whose mean reward is measured by
sampling from it (toytask.evaluate). Runs cover every (loss arm, staleness K, seed); a run's rounds
share one temporary directory of checkpoints and rollout files.

Per round it keeps: the reward, the trust-region metrics of drpo_report.json (tr/outside_frac,
tr/harmful_frac, delta/abs_mean, kl/k3_mean of the final weights against the sampler; the loss's
clip / mask / corrective fraction averaged over the optimizer steps), the entropy of the trained
policy at the sampled tokens, and the pre-clip gradient norms of every step. Out of it come a
markdown table, PNG plots (reward vs round, one panel per staleness), the raw numbers as JSON and
the command that made them, all under --out (default examples/results/).
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
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toytask

from drpo_cli.checkpoint import load_model, read_policy_version
from drpo_cli.config import TrainConfig
from drpo_cli.train import train

HERE = Path(__file__).resolve().parent
START = HERE / "toy" / "model"
DEFAULT_OUT = HERE / "results"

# Loss arms: name -> TrainConfig overrides. DRPO runs twice: the paper's δ = 12.5 (boundary
# |Δ| = δ unreachable, so w stays within 1 ± 0.08 and it behaves like pg-is with a mild pull) and
# δ = 0.2, where the boundary is reachable and the corrective gradient can act.
ARMS: dict[str, dict] = {
    "drpo": {"loss": "drpo"},
    "drpo-d0.2": {"loss": "drpo", "delta": 0.2},
    "dppo-tv": {"loss": "dppo-tv"},
    "ppo-clip": {"loss": "ppo-clip"},
    "spo": {"loss": "spo"},
    "pg-is": {"loss": "pg-is"},
    "gspo": {"loss": "gspo", "agg": "seq-mean-token-mean"},  # GSPO's own averaging (mean over sequences)
    "cispo": {"loss": "cispo"},
}
# The per-step metric that says what each loss did to the tokens (SPEC.md §2, docs/losses.md).
LOSS_FRACTION = {
    "ppo-clip": "ppo_clip/clip_frac",
    "dppo-tv": "dppo_tv/mask_frac",
    "drpo": "weight/drpo_corrective_frac",
    "spo": "weight/spo_corrective_frac",
    "gspo": "gspo/clip_frac",
    "cispo": "cispo/clip_frac",
}
TR_METRICS = ("tr/outside_frac", "tr/harmful_frac", "delta/abs_mean", "kl/k3_mean", "entropy/mean")
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
    seeds: int = 3
    rounds: int = 16
    prompts: int = 16
    """Prompts (groups) per round; their keys cycle through a..h."""
    samples: int = 8
    """Responses per prompt (group size of the group-relative advantage)."""
    response_len: int = 10
    temperature: float = 1.0
    lr: float = 5e-4
    epochs: int = 2
    minibatches: int = 4
    eval_prompts: int = 64
    eval_samples: int = 4
    workers: int = 2
    """Processes running runs side by side, each on `threads` torch threads."""
    threads: int = 1


PRESETS = {
    "default": Settings(),
    "quick": Settings(seeds=1, rounds=6, eval_prompts=32),
}


# ---- one run -------------------------------------------------------------------------------------


def run_one(arm: str, staleness: int, seed: int, s: Settings) -> dict:
    """Rounds of sample (K versions stale) -> drpo train -> evaluate; returns the run's record."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per checkpoint otherwise
    torch.set_num_threads(s.threads)
    t0 = time.perf_counter()
    start_model, _ = load_model(START)
    history = [(START, start_model)]  # history[r] = (dir, model) of the checkpoint entering round r
    eval_kw = {"num_prompts": s.eval_prompts, "samples_per_prompt": s.eval_samples,
               "temperature": s.temperature, "response_len": s.response_len, "seed": EVAL_SEED}
    rounds = []
    with tempfile.TemporaryDirectory(prefix=f"staleness-{arm}-k{staleness}-s{seed}-") as tmp:
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
            cfg = TrainConfig(
                rollouts=(str(rollouts),), model=str(history[r][0]), out=str(Path(tmp) / f"ckpt-{r + 1}"),
                lr=s.lr, epochs=s.epochs, minibatches=s.minibatches, seed=round_seed, device="cpu",
                quiet=True, **ARMS[arm],
            ).check()
            result = train(cfg)
            model, _ = load_model(result.out_dir)
            history.append((result.out_dir, model))
            rounds.append(round_record(result.report, r, sampler_version,
                                       float(table.column("reward").to_numpy().mean()),
                                       toytask.evaluate(model, **eval_kw)))
        start_reward = toytask.evaluate(start_model, **eval_kw)
    return {"arm": arm, "staleness": staleness, "seed": seed, "start_reward": start_reward, "rounds": rounds,
            "seconds": time.perf_counter() - t0}


def round_record(report: dict, r: int, sampler_version: int, rollout_reward: float, reward: float) -> dict:
    """The numbers kept per round from one drpo_report.json plus the evaluation."""
    steps = report["steps"]
    final = report["final"]["metrics"]
    frac_name = LOSS_FRACTION.get(report["loss"]["name"])
    fracs = [st["metrics"].get(frac_name) for st in steps] if frac_name else []
    return {
        "round": r + 1,
        "trained_version": report["input"]["policy_version"],
        "sampler_version": sampler_version,
        "lag": report["input"]["policy_version"] - sampler_version,
        "reward": reward,
        "rollout_reward": rollout_reward,
        "final": {k: final.get(k) for k in TR_METRICS},
        "loss_fraction": {"name": frac_name, "mean": _mean(fracs)} if frac_name else None,
        "grad_norms": [st["grad_norm"] for st in steps],
        "skipped_steps": report["skipped_steps"],
        "train_seconds": report["seconds"],
    }


# ---- summary -------------------------------------------------------------------------------------


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def _std(xs) -> float:
    return statistics.pstdev(xs) if len(xs) > 1 else 0.0


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (arm, staleness): means over seeds of the run-level numbers."""
    rows = []
    for arm in dict.fromkeys(r["arm"] for r in runs):
        for k in sorted({r["staleness"] for r in runs}):
            group = [r for r in runs if r["arm"] == arm and r["staleness"] == k]
            if not group:
                continue
            final = [g["rounds"][-1]["reward"] for g in group]
            # Pre-clip gradient norms of every step of each run (None: a non-finite norm).
            norms = [[x for rd in g["rounds"] for x in rd["grad_norms"] if x is not None] for g in group]
            last = [g["rounds"][-1] for g in group]
            rows.append({
                "arm": arm, "staleness": k, "seeds": len(group),
                "start_reward": _mean([g["start_reward"] for g in group]),
                "final_reward": _mean(final), "final_reward_std": _std(final),
                "mean_reward": _mean([_mean([rd["reward"] for rd in g["rounds"]]) for g in group]),
                "min_reward": min(rd["reward"] for g in group for rd in g["rounds"]),
                "reward_collapses": sum(g["rounds"][-1]["reward"] < g["start_reward"] - REWARD_COLLAPSE
                                        for g in group),
                "entropy_collapses": sum((rd["final"]["entropy/mean"] or 1.0) < ENTROPY_COLLAPSE
                                         and rd["reward"] < 0.9 for rd in last),
                **{k2: _mean([rd["final"][k2] for g in group for rd in g["rounds"]]) for k2 in TR_METRICS[:4]},
                "final_entropy": _mean([rd["final"]["entropy/mean"] for rd in last]),
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
    """Two results tables: reward and collapse per (loss, K); trust-region and gradient metrics."""
    reward = [("| loss | K | final reward | mean reward over rounds | min reward | reward collapses | "
               "entropy collapses | final entropy |"), "|---|---|---|---|---|---|---|---|"]
    tr = [("| loss | K | outside | harmful | \\|Δ\\| mean | k3 | clip / mask / corrective | max grad norm | "
           "grad spike | clipped steps |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n = r["seeds"]
        reward.append(
            f"| {r['arm']} | {r['staleness']} | {_fmt(r['final_reward'])} ± {_fmt(r['final_reward_std'])} "
            f"| {_fmt(r['mean_reward'])} | {_fmt(r['min_reward'])} | {r['reward_collapses']} of {n} "
            f"| {r['entropy_collapses']} of {n} | {_fmt(r['final_entropy'], '.2f')} |"
        )
        tr.append(
            f"| {r['arm']} | {r['staleness']} | {_fmt(r['tr/outside_frac'])} | {_fmt(r['tr/harmful_frac'])} "
            f"| {_fmt(r['delta/abs_mean'])} | {_fmt(r['kl/k3_mean'])} | {_fmt(r['loss_fraction'])} "
            f"| {_fmt(r['grad_norm_max'], '.2f')} | {_fmt(r['grad_spike'], '.1f')} | {_fmt(r['clipped_frac'])} |"
        )
    return "\n".join(reward) + "\n\n" + "\n".join(tr)


def plot(runs: list[dict], out: Path, metric: str, ylabel: str, filename: str) -> Path | None:
    """One panel per staleness, one line per arm (mean over seeds; band = min..max); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ks = sorted({r["staleness"] for r in runs})
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    fig, axes = plt.subplots(1, len(ks), figsize=(4.2 * len(ks), 3.6), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], ks):
        for arm in arms:
            group = [r for r in runs if r["arm"] == arm and r["staleness"] == k]
            curves = [[_value(g, None, metric)] + [_value(g, rd, metric) for rd in g["rounds"]] for g in group]
            xs = range(len(curves[0]))
            cols = [[c[i] for c in curves if c[i] is not None] for i in xs]
            mean = [sum(c) / len(c) if c else float("nan") for c in cols]
            (line,) = ax.plot(xs, mean, label=arm, marker=".", linewidth=1.4)
            if len(group) > 1:
                ax.fill_between(xs, [min(c, default=math.nan) for c in cols], [max(c, default=math.nan) for c in cols],
                                color=line.get_color(), alpha=0.12, linewidth=0)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(f"staleness K = {k}")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = out / filename
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _value(run: dict, rd: dict | None, metric: str) -> float | None:
    """`metric` of round record `rd`; rd None is round 0, the start checkpoint (reward only)."""
    if rd is None:
        return run["start_reward"] if metric == "reward" else None
    return rd["reward"] if metric == "reward" else rd["final"][metric]


# ---- driver --------------------------------------------------------------------------------------


def run_all(s: Settings, progress=print) -> list[dict]:
    """Every (arm, staleness, seed) run, in parallel over `s.workers` processes; results in job order."""
    jobs = [(arm, k, seed, s) for k in s.staleness for arm in s.arms for seed in range(s.seeds)]
    runs = []
    if s.workers <= 1:
        for job in jobs:
            runs.append(run_one(*job))
            progress(_done_line(runs[-1], len(runs), len(jobs)))
        return runs
    # spawn: a fresh interpreter per worker, no forked torch thread pools.
    import multiprocessing

    with ProcessPoolExecutor(s.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_one, *job) for job in jobs]
        for i, f in enumerate(futures):
            runs.append(f.result())
            progress(_done_line(runs[-1], i + 1, len(jobs)))
    return runs


def _done_line(run: dict, i: int, n: int) -> str:
    return (f"[{i}/{n}] {run['arm']:>9} K={run['staleness']} seed={run['seed']}: reward "
            f"{run['start_reward']:.3f} -> {run['rounds'][-1]['reward']:.3f} ({run['seconds']:.1f}s)")


def write_outputs(out: Path, s: Settings, runs: list[dict], command: str, seconds: float) -> dict:
    """results.json, results.md, reward.png, harmful.png and command.txt under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(runs)
    plots = [p for p in (plot(runs, out, "reward", "mean reward (eval samples)", "reward.png"),
                         plot(runs, out, "tr/harmful_frac", "tr/harmful_frac after training", "harmful.png"))
             if p is not None]
    doc = {"command": command, "settings": asdict(s), "seconds": seconds, "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "summary": rows, "runs": runs,
           "definitions": {
               "reward_collapse": f"last-round reward < start reward - {REWARD_COLLAPSE}",
               "entropy_collapse": f"last-round entropy/mean < {ENTROPY_COLLAPSE} nats with reward < 0.9",
               "grad_spike": "max / median of a run's pre-clip gradient norms over all its steps, mean over "
                             "seeds; grad_norm_max: the largest pre-clip norm of any step; clipped steps: "
                             f"share of steps with a pre-clip norm above the clip {MAX_GRAD_NORM}",
               "outside/harmful/|Δ| mean/k3": "drpo_report.json final.metrics (trained weights vs the sampler "
                                              "on the round's rollouts), mean over rounds and seeds",
               "clip / mask / corrective": "the loss's ppo_clip/clip_frac, dppo_tv/mask_frac or "
                                  "weight/{drpo,spo}_corrective_frac, mean over steps, rounds and seeds"}}
    doc = _round_floats(doc)
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(doc, separators=(",", ":")) + "\n", encoding="utf-8")
    os.replace(tmp, out / "results.json")
    text = [
        "# Staleness experiment results", "",
        f"Command: `{command}`", "",
        (f"{len(runs)} runs ({len(s.arms)} arms × K ∈ {{{', '.join(map(str, s.staleness))}}} × {s.seeds} seeds), "
         f"{s.rounds} rounds each; {s.prompts} prompts × {s.samples} samples per round, lr {s.lr:g}, "
         f"{s.epochs} epochs × {s.minibatches} mini-batches; wall time {seconds / 60:.1f} min on "
         f"{s.workers} worker(s) × {s.threads} thread(s)."), "",
        markdown_tables(rows), "",
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
    p.add_argument("--quick", action="store_true", help="the smoke size (1 seed, 6 rounds)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default examples/results/)")
    for f in Settings.__dataclass_fields__.values():
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("arms", "staleness"):
            p.add_argument(flag, nargs="+", type=str if f.name == "arms" else int, default=None)
        else:
            p.add_argument(flag, type=type(getattr(PRESETS["default"], f.name)), default=None)
    args = p.parse_args(argv)
    s = PRESETS["quick" if args.quick else "default"]
    given = {k: getattr(args, k) for k in Settings.__dataclass_fields__ if getattr(args, k) is not None}
    s = replace(s, **{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    unknown = [a for a in s.arms if a not in ARMS]
    if unknown:
        p.error(f"--arms {' '.join(unknown)}: unknown (expected some of {', '.join(ARMS)})")
    if s.seeds < 1 or s.rounds < 1 or min(s.staleness) < 0:
        p.error("--seeds and --rounds must be >= 1 and --staleness values >= 0")
    return s, args.out


def main(argv: list[str] | None = None) -> dict:
    s, out = parse_args(argv)
    raw = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "examples/staleness_experiment.py", *raw])
    torch.set_num_threads(s.threads)
    t0 = time.perf_counter()
    runs = run_all(s)
    doc = write_outputs(out, s, runs, command, time.perf_counter() - t0)
    print(markdown_tables(doc["summary"]))
    print(f"wrote {out}/results.md, results.json and plots in {doc['seconds'] / 60:.1f} min")
    return doc


if __name__ == "__main__":
    main()
