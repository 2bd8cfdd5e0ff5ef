"""The staleness × mismatch experiment with a real inference engine as the sampler: llama.cpp samples,
drpo trains in float32, the new weights go back to llama.cpp as a GGUF of the same type.

    pip install -e '.[real]'                  # compiles llama.cpp (about 30 min on 2 cores)
    python examples/real/convert_model.py     # once: examples/real/model/
    python examples/engine_experiment.py      # the default grid; resumable
    nice -n 5 python examples/engine_experiment.py --threads 1 --part 0/2 &   # split over processes
    nice -n 5 python examples/engine_experiment.py --threads 1 --part 1/2 &
    python examples/engine_experiment.py --report   # results.md from the rounds found so far; runs nothing
    python examples/engine_experiment.py --verify drpo_Q8_0_k4_s2/1   # rerun a committed round, compare

Sampler ∈ {F32 (control: float32 GGUF and KV cache, the engine computes what the trainer does),
Q8_0 (8-bit weights and activations, float16 KV cache: a deployed engine's mismatch)}; K ∈ {0, 4}:
round r samples from the GGUF of the checkpoint entering round max(0, r − K). Arms: pg-is, ppo-clip,
dppo-tv and drpo at the paper's δ; 3 seeds; 8 rounds of 8 prompts × 4 samples, 2 optimizer steps each
(384 rounds, about 2.5 hours on 2 cores). The task is realtask's one-digit additions with
the reward of examples/real/run.py (the first number of the reply other than A and B is the sum;
realtask.score_first), 16 new tokens; the evaluation is the float32 checkpoint on all 100 pairs.
Each round: GGUF of the sampler checkpoint (examples/real/to_gguf.py, cached next to it) ->
llamacpp_sample (processed log-probs, end-of-turn included) -> `drpo train` -> evaluate; the k3 each
round starts from is drpo train's first step (the engine's mismatch alone at K = 0). Before the grid,
`drpo inspect --model` measures each sampler's lag-0 mismatch against the float32 start checkpoint.

The bookkeeping is examples/real_experiment.py's: every finished round is a JSON file under
OUT/rounds/RUN/, results.json / results.md / plots are rewritten after each round from all rounds
found, so a partial run is a valid partial result; rerunning the same command resumes.
"""

from __future__ import annotations

import shutil
import statistics
import sys
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import engine
import real_experiment as rx
import realtask
import staleness_experiment as se

DEFAULT_OUT = HERE / "results" / "engine"
DEFAULT_WORK = HERE.parent / "runs" / "engine-experiment"
DEFAULTS = rx.RealSettings(arms=("pg-is", "ppo-clip", "dppo-tv", "drpo"), staleness=(0, 4), mismatch=("Q8_0", "F32"),
                           seeds=3, rounds=8, prompts=8, samples=4, minibatches=2, max_new_tokens=16, lr=3e-5,
                           threads=1)
RULE = realtask.score_first


class Sampler:
    """`sample(sampler_dir, kind, problems, version, seed)` for real_experiment.run_rounds: llama.cpp on
    the GGUF of `sampler_dir` at `kind`, one engine kept open per (checkpoint, kind)."""

    def __init__(self, s: rx.RealSettings, tokenizer, work: Path):
        self.s, self.tokenizer, self.work = s, tokenizer, work
        self.key, self.llm = None, None

    def gguf(self, sampler_dir: Path, kind: str) -> Path:
        # The start checkpoint's GGUF is shared; a run's checkpoint gets its GGUF beside it (removed with it).
        path = (self.work / f"start.{kind}.gguf" if sampler_dir.name != "ckpt" and not sampler_dir.name.startswith(
            "ckpt-") else sampler_dir.with_name(sampler_dir.name + f".{kind}.gguf"))
        return engine.gguf_for(sampler_dir, kind, path)

    def __call__(self, sampler_dir: Path, kind: str, problems, version: int, seed: int):
        key = (str(sampler_dir), kind)
        if key != self.key:
            self.llm = None
            self.llm = engine.load(self.gguf(Path(sampler_dir), kind), kind, threads=self.s.threads)
            self.key = key
        self.llm.reset()
        return engine.sample_rollouts(self.llm, self.tokenizer, problems, self.s.samples, self.s.temperature, version,
                                      seed, self.s.max_new_tokens, RULE)


def measure(s: rx.RealSettings, model_dir: Path, out: Path, tokenizer, sampler: Sampler) -> dict:
    """Start reward and each sampler's lag-0 mismatch (drpo inspect --model), cached in OUT/start.json."""
    from drpo_cli.model.checkpoint import load_model

    cached = rx._read_json(out / "start.json") or {"levels": {}}
    if "start_reward" not in cached:
        model, _ = load_model(model_dir)
        cached["start_reward"] = realtask.evaluate(model, tokenizer, samples_per_prompt=s.eval_samples,
                                                   temperature=s.temperature, seed=rx.EVAL_SEED,
                                                   max_new_tokens=s.max_new_tokens, rule=RULE)
        rx._write_json(out / "start.json", cached)
    for kind in s.mismatch:
        if kind in cached["levels"]:
            continue
        work = out / ".levels"
        work.mkdir(parents=True, exist_ok=True)
        problems = realtask.make_problems(s.level_prompts, rx.EVAL_SEED)
        level = se.measure_level(None, model_dir, kind, lambda _, kind=kind, problems=problems: sampler(model_dir, kind, problems, 0, rx.EVAL_SEED),
                                 work, precision=f"{kind} GGUF, {engine.engine_build()}"
                                 + (", float32 KV cache" if kind == "F32" else ", float16 KV cache"))
        shutil.rmtree(work, ignore_errors=True)
        cached["levels"][kind] = level
        rx._write_json(out / "start.json", cached)
        print(se.levels_table([level]).splitlines()[-1], flush=True)
    return cached


# --verify: a rerun round's figures against the committed ones. A round is a chain of seeded draws
# (llama.cpp's sampler, the mini-batch shuffle, the evaluation's sampler) through float32 arithmetic, so
# where llama.cpp's CPU kernels compute what they computed when the round was recorded, every figure
# comes back bit for bit, or within ROUNDING where a figure depends on μ's last bits (the F32 sampler
# here: its k3 at round start, about 1e-11, moved by 3e-8). Where they differ (the Q8_0 dot products of
# another SIMD width), a sampled token can change where two candidates' probabilities lie within
# rounding of the seeded draw; from there on the round's rollouts differ, and its figures agree only as
# two draws of the same experiment do: within DRAW_SDS sample SDs of the committed seeds' mean for that
# arm, setting and round.
ROUNDING = 1e-6  # absolute; the round files keep 5 significant digits
DRAW_SDS = 3.0


def _leaves(record: dict) -> dict[str, float]:
    """The round's figures: rewards, response length, start and final metrics, gradient norms, loss fraction."""
    out = {k: record[k] for k in ("rollout_reward", "reward", "response_len_mean") if record.get(k) is not None}
    for group in ("start", "final"):
        out.update({f"{group}.{k}": v for k, v in (record.get(group) or {}).items() if v is not None})
    out.update({f"grad_norms[{i}]": v for i, v in enumerate(record.get("grad_norms") or []) if v is not None})
    if (record.get("loss_fraction") or {}).get("mean") is not None:
        out["loss_fraction"] = record["loss_fraction"]["mean"]
    return out


def compare_rounds(committed: list[dict], rerun: list[dict], seeds: list[list[dict]]) -> list[dict]:
    """Per round and figure: committed and rerun values, and how they agree — "bit for bit", "rounding"
    (within ROUNDING), "draw" (within DRAW_SDS sample SDs of the mean of `seeds`, the committed runs of
    the same arm and setting, one list of rounds per seed) or "beyond"."""
    rows = []
    for old, new in zip(committed, rerun):
        r = old["round"]
        band = [_leaves(run[r - 1]) for run in seeds if len(run) >= r]
        for key, a in _leaves(old).items():
            b = _leaves(new).get(key)
            values = [x[key] for x in band if key in x]
            mean = statistics.fmean(values) if values else a
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            how = ("bit for bit" if b == a else "rounding" if b is not None and abs(b - a) <= ROUNDING
                   else "draw" if b is not None and abs(b - mean) <= DRAW_SDS * sd + ROUNDING else "beyond")
            rows.append({"round": r, "figure": key, "committed": a, "rerun": b, "seeds_mean": mean, "seeds_sd": sd,
                         "agreement": how})
    return rows


def verify(target: str, s: rx.RealSettings, model_dir: Path, out: Path, tokenizer, sampler: Sampler) -> list[dict]:
    """Rerun rounds 1..R of run RUN (target 'RUN/R', e.g. 'drpo_Q8_0_k4_s2/3') from the recorded settings in
    a scratch directory and compare each with the committed round files under `out`."""
    import tempfile

    name, _, upto = target.partition("/")
    committed = rx.finished_rounds(out, name)
    if not upto.isdigit() or not 1 <= int(upto) <= len(committed):
        raise SystemExit(f"--verify {target}: expected RUN/ROUND with a committed round (RUN has {len(committed)})")
    arm, level, k, seed = _parse_run(name)
    seeds = [rx.finished_rounds(out, rx.run_name(arm, level, k, x)) for x in range(s.seeds)]
    with tempfile.TemporaryDirectory(prefix="verify-") as scratch:
        rx.run_rounds(arm, k, level, seed, s, model_dir, Path(scratch) / "out", Path(scratch) / "work", tokenizer,
                      int(upto), sample=sampler, rule=RULE)
        rerun = rx.finished_rounds(Path(scratch) / "out", name)
    return compare_rounds(committed[: int(upto)], rerun, seeds)


def verdict(rows: list[dict]) -> str:
    """"reproduced" (every figure bit for bit or within rounding), "another draw" (within the seeds'
    spread), or "not reproduced" (some figure beyond it)."""
    kinds = {r["agreement"] for r in rows}
    return ("not reproduced" if "beyond" in kinds else "another draw" if "draw" in kinds else "reproduced")


def _parse_run(name: str) -> tuple[str, str, int, int]:
    """run_name's inverse: 'drpo-d0.2_Q8_0_k4_s1' -> ('drpo-d0.2', 'Q8_0', 4, 1)."""
    head, k, seed = name.rsplit("_", 2)
    arm, level = next((head[: -len(kind) - 1], kind) for kind in engine.KINDS if head.endswith("_" + kind))
    return arm, level, int(k.removeprefix("k")), int(seed.removeprefix("s"))


def main(argv: list[str] | None = None) -> dict:
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    raw = sys.argv[1:] if argv is None else argv
    report_only = "--report" in raw  # rewrite results.json / results.md / plots from the rounds found; run none
    raw = [a for a in raw if a != "--report"]
    target = None
    if "--verify" in raw:  # rerun one committed round (and the rounds before it) and compare; writes nothing
        i = raw.index("--verify")
        target, raw = raw[i + 1], raw[:i] + raw[i + 2:]
    s, model_dir, out, work = rx.parse_args(raw, defaults=DEFAULTS, levels=engine.KINDS, out=DEFAULT_OUT,
                                            work=DEFAULT_WORK)
    i, n = s.part_index()
    command = rx.grid_command("examples/engine_experiment.py", raw, n)
    hf_logging.disable_progress_bar()
    torch.set_num_threads(s.threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    work.mkdir(parents=True, exist_ok=True)
    sampler = Sampler(s, tokenizer, work)
    if target is not None:
        recorded = (rx._read_json(out / "results.json") or {}).get("settings", {})
        s = replace(s, **{k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items() if k != "part"})
        rows = verify(target, s, model_dir, out, tokenizer, sampler)
        for r in rows:
            print(f"round {r['round']} {r['figure']}: committed {r['committed']:.6g}, rerun "
                  f"{'–' if r['rerun'] is None else format(r['rerun'], '.6g')} ({r['agreement']}; seeds "
                  f"{r['seeds_mean']:.4g} ± {r['seeds_sd']:.2g})")
        print(f"{target}: {verdict(rows)}")
        return {"verify": target, "rows": rows, "verdict": verdict(rows)}
    with rx.locked(out):
        start = measure(s, model_dir, out, tokenizer, sampler)
    levels = [start["levels"][k] for k in s.mismatch]
    load_average = None
    if report_only:  # the grid's command, worker count and load as recorded when its rounds ran, not this call's
        ran = rx._read_json(out / "results.json") or {}
        command, n = ran.get("command", command), ran.get("settings", {}).get("workers", n)
        load_average = ran.get("load_average")
    names = {"model": rx.MODEL_NAME, "engine": engine.engine_build(),
             "samplers": {k: f"{k} GGUF" + (" (control)" if k == "F32" else "") for k in s.mismatch}}
    write = rx.writer(s, out, command, start["start_reward"], levels, n, names,
                      title="Engine-in-the-loop (llama.cpp) staleness × mismatch results, SmolLM2-135M-Instruct",
                      record_session=not report_only, load_average=load_average)
    if report_only:
        doc = write()
        print("\n".join(se.verdicts(doc["runs"])))
        return doc
    # K first: the K = 0 comparison of both samplers comes before the stale settings. Part i takes every
    # n-th run, so each part gets its share of the slower F32 sampler. Runs go seed by seed (every arm's
    # seed 0, then seed 1, ...), so a grid stopped early holds every arm on the same seeds. K = 0 runs
    # advance round by round together (one checkpoint each); a K > 0 run keeps K + 1 checkpoints, so
    # those runs go one at a time.
    for k in s.staleness:
        runs = [(kind, arm, seed) for kind in s.mismatch for seed in range(s.seeds) for arm in s.arms][i::n]
        schedule = ([(upto, run) for upto in range(1, s.rounds + 1) for run in runs] if k == 0
                    else [(s.rounds, run) for run in runs])
        for upto, (kind, arm, seed) in schedule:
            rx.run_rounds(arm, k, kind, seed, s, model_dir, out, work, tokenizer, upto, on_round=write,
                          sample=sampler, rule=RULE)
    doc = write()
    print(se.markdown_tables(doc["summary"]))
    return doc


if __name__ == "__main__":
    main()
