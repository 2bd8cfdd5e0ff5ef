"""SmolLM2-135M-Instruct end to end on a verifiable arithmetic task: sample -> inspect -> train, in rounds.

    pip install -e '.[real]'
    python examples/real/convert_model.py     # once: examples/real/model/
    python examples/real/run.py               # writes examples/real/runs/default/

Task: "What is A + B? Answer with just the number." with A, B in 1..12; reward 1 when the first number in the answer other than
A and B is A + B ("12 + 7 = 19" and "The answer is 19." are right, "12 + 7 = 18" is not).
Each round samples `--prompts` training prompts x `--samples` answers with Hugging Face generate
at `--temperature`, logs them through `drpo_cli.rollouts.adapters.hf_rows` and `RolloutWriter` (processed
log-probs, policy_version = round), audits them with `drpo inspect --model` (round 0, or every round with
--inspect-all; lag 0: the current model sampled them, so the mean log r should be ~0), and runs `drpo train` on them to make the next
checkpoint. The reward on held-out prompts is measured before the first round and after the last.

Every stage writes its output atomically and is skipped when rerun, so an interrupted run resumes
where it stopped (an interrupted `drpo train` continues with --resume). Results: `RUN/results.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

QUESTION = "What is {a} + {b}? Answer with just the number."  # the model's own default system prompt


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=HERE / "model", help="converted model (convert_model.py)")
    p.add_argument("--out", type=Path, default=HERE / "runs" / "default", help="run directory")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompts", type=int, default=4, help="training prompts per round")
    p.add_argument("--samples", type=int, default=8, help="answers per prompt (one group)")
    p.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts")
    p.add_argument("--eval-samples", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--minibatches", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--loss", default="drpo")
    p.add_argument("--inspect-all", action="store_true",
                   help="audit every round's rollouts (default: round 0 only; drpo train audits its own steps)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---- the task -----------------------------------------------------------------------------------


def problems(seed: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """All (A, B) with 1 <= A, B <= 12, shuffled and split: the first quarter is held out."""
    pairs = [(a, b) for a in range(1, 13) for b in range(1, 13)]
    random.Random(seed).shuffle(pairs)
    cut = len(pairs) // 4
    return pairs[cut:], pairs[:cut]


def reward(a: int, b: int, text: str) -> float:
    numbers = [int(m) for m in re.findall(r"-?\d+", text) if int(m) not in (a, b)]
    return float(bool(numbers) and numbers[0] == a + b)


# ---- sampling through the adapter ---------------------------------------------------------------


def sample(model, tok, pairs, n: int, args, seed: int):
    """generate -> hf_rows: yields (row, reward, text) for n answers to each (A, B)."""
    import torch

    from drpo_cli.rollouts.adapters import hf_rows

    sampling = {"temperature": args.temperature, "top_k": 0, "top_p": 1.0}  # top_k=0: no transformers default 50
    chats = [[{"role": "user", "content": QUESTION.format(a=a, b=b)}] for a, b in pairs]
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, max_new_tokens=args.max_new_tokens, num_return_sequences=n,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
                             **sampling)
    for row in hf_rows(out, enc.input_ids, attention_mask=enc.attention_mask, eos_token_id=tok.eos_token_id,
                       **sampling):
        a, b = pairs[int(row["group_id"])]
        text = tok.decode(row["response_ids"], skip_special_tokens=True)
        yield row, reward(a, b, text), text


def evaluate(model_dir: Path, pairs, args, seed: int) -> dict:
    model, tok = load(model_dir, args)
    rewards, examples = [], []
    for start in range(0, len(pairs), 8):
        for _, r, text in sample(model, tok, pairs[start:start + 8], args.eval_samples, args, seed + start):
            rewards.append(r)
            if len(examples) < 6:
                examples.append(text)
    return {"model": str(model_dir), "prompts": len(pairs), "samples": len(rewards),
            "reward": sum(rewards) / len(rewards), "examples": examples}


def load(model_dir: Path, args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    return (AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(model_dir))


def write_rollouts(path: Path, model_dir: Path, pairs, version: int, args, seed: int) -> dict:
    from drpo_cli import RolloutWriter

    model, tok = load(model_dir, args)
    rewards = []
    with RolloutWriter(path, temperature=args.temperature, top_k=0, top_p=1.0, logprobs="processed",
                       sampler="transformers generate (examples/real/run.py)", overwrite=True) as w:
        for row, r, _ in sample(model, tok, pairs, args.samples, args, seed):
            group = int(row.pop("group_id"))
            w.write(**row, reward=r, group_id=f"{version}-{group}", policy_version=version)
            rewards.append(r)
    return {"rows": len(rewards), "reward": sum(rewards) / len(rewards)}


# ---- stages -------------------------------------------------------------------------------------


def stage(results: dict, name: str, path: Path, fn):
    """Run fn() unless its result is already recorded (resume); record and save it atomically."""
    if name in results["stages"]:
        print(f"[skip] {name} (done)")
        return results["stages"][name]
    start = time.perf_counter()
    value = fn()
    value["seconds"] = round(time.perf_counter() - start, 1)
    results["stages"][name] = value
    save_json(path, results)
    print(f"[done] {name}: {json.dumps({k: v for k, v in value.items() if k != 'examples'})}")
    return value


def save_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def drpo(*argv: str) -> None:
    command = [sys.executable, "-m", "drpo_cli", *argv]
    print("$ drpo " + " ".join(argv), flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run(command, check=True, env=env)


def audit(rollouts: Path, model: Path, version: int) -> dict:
    report = rollouts.with_name("inspect.json")
    drpo("inspect", str(rollouts), "--model", str(model), "--current-version", str(version), "--json", str(report),
         "--overwrite", "--quiet")
    checks = json.loads(report.read_text())["model"]["logging_checks"]
    return {"logr_mean": checks["logr_mean"], "logr_sem": checks["logr_sem"], "tokens": checks["tokens"],
            "findings": checks["findings"]}


def train(rollouts: Path, model: Path, out: Path, args) -> dict:
    resume = ["--resume"] if out.with_name(out.name + ".partial-state").exists() else []
    drpo("train", "--rollouts", str(rollouts), "--model", str(model), "--out", str(out), "--loss", args.loss,
         "--lr", str(args.lr), "--epochs", str(args.epochs), "--minibatches", str(args.minibatches),
         "--temperature", str(args.temperature), "--overwrite", "--quiet", *resume)
    report = json.loads((out / "drpo_report.json").read_text())
    return {"report": str(out / "drpo_report.json"), "steps": len(report["steps"]),
            "train_seconds": round(report["seconds"], 1)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not (args.model / "config.json").is_file():
        sys.exit(f"run.py: {args.model}: no model; run python examples/real/convert_model.py first")
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"stages": {}}
    results["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    train_pairs, held_out = problems(args.seed)
    rng = random.Random(args.seed)
    round_pairs = [rng.sample(train_pairs, args.prompts) for _ in range(args.rounds)]
    eval_pairs = held_out[: args.eval_prompts]
    start = time.perf_counter()

    stage(results, "eval_before", results_path, lambda: evaluate(args.model, eval_pairs, args, 1000))
    current = args.model
    for k in range(args.rounds):
        rdir = args.out / f"round-{k}"
        rdir.mkdir(exist_ok=True)
        rollouts, next_model = rdir / "rollouts.arrow", rdir / "model"
        stage(results, f"round-{k}/sample", results_path,
              partial(write_rollouts, rollouts, current, round_pairs[k], k, args, 100 + k))
        if k == 0 or args.inspect_all:
            stage(results, f"round-{k}/inspect", results_path, partial(audit, rollouts, current, k))
        stage(results, f"round-{k}/train", results_path, partial(train, rollouts, current, next_model, args))
        current = next_model
    stage(results, "eval_after", results_path, lambda: evaluate(current, eval_pairs, args, 1000))

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    results["summary"] = {
        "reward_before": results["stages"]["eval_before"]["reward"],
        "reward_after": results["stages"]["eval_after"]["reward"],
        "first_round_reward": results["stages"]["round-0/sample"]["reward"],
        "lag0_logr_mean": results["stages"]["round-0/inspect"]["logr_mean"],
        "seconds_this_invocation": round(time.perf_counter() - start, 1),
        "seconds_all_stages": round(sum(v["seconds"] for v in results["stages"].values()), 1),
        "peak_rss_mb_sampling_process": round(own), "peak_rss_mb_drpo_subprocess": round(children),
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    save_json(results_path, results)
    print(json.dumps(results["summary"], indent=2))
    return results


if __name__ == "__main__":
    main()
