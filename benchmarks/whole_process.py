"""One training step as a whole process: `drpo train` vs TRL's log-prob path vs the naive one, side by side.

    python benchmarks/whole_process.py --threads 2

The same job for each, one fresh process per run, timed from launch to exit (imports, loading,
the step, saving), with the process's peak resident memory (ru_maxrss of the child):
- drpo: `python -m drpo_cli train --loss ppo-clip ...`, one optimizer step over every row, as
  shipped: validation, the step, the closing audit of the final weights, the report and its page,
  the safetensors checkpoint;
- TRL: what a user writes around GRPOTrainer's log-prob path (`trl_paths.trl_logps`: left-padded
  prompts + right-padded completions, `logits_to_keep`, `selective_log_softmax`): read the Arrow
  rows, `from_pretrained`, GRPO's clipped token-mean loss (ε 0.2 / 0.28, as drpo's ppo-clip),
  backward, gradient clip 1.0, one AdamW step, `save_pretrained`. No Trainer, no audit, no report:
  the leanest job around TRL's path, so the comparison favours it;
- naive: the same around full logits of every position (`trl_paths.naive_logps`).
Every child prints its loss and gradient norm; they must agree with drpo's report (printed).
Workload (issue 13): a random-weight Qwen2 (1 layer, hidden 256, the real 151,936-token head),
8 rows, responses 16 … 512 tokens (geometric), prompts of 32.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EPS_LOW, EPS_HIGH, LR, MAX_GRAD_NORM = 0.2, 0.28, 1e-6, 1.0


# ---- the children: TRL's path and the naive one (no drpo import) ------------------------------


def child(path_name: str, rollouts: str, model_dir: str, out: str, result: str) -> None:
    import pyarrow as pa
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(HERE))
    from trl_paths import ArrowRows, naive_logps, trl_batch, trl_logps

    with pa.memory_map(rollouts) as source:
        table = pa.ipc.open_file(source).read_all()
    rows = ArrowRows(table)
    behavior = [torch.tensor(b, dtype=torch.float32) for b in table.column("behavior_logprobs").to_pylist()]
    adv = torch.tensor(table.column("advantage").to_pylist(), dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    if path_name == "trl":
        batch = trl_batch(rows)
        mask = batch[3].float()  # (B, C) completion mask
        logp = trl_logps(model, batch)  # (B, C)
        old = torch.zeros_like(logp)
        for i, b in enumerate(behavior):
            old[i, :len(b)] = b
        a = adv[:, None].expand_as(logp)
    else:
        logp = naive_logps(model, rows)  # (T,) flat
        old = torch.cat(behavior)
        mask = torch.ones_like(logp)
        a = torch.cat([adv[i].expand(len(b)) for i, b in enumerate(behavior)])
    # GRPOTrainer's loss: −min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A), token mean over the batch
    ratio = torch.exp(logp - old)
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - EPS_LOW, 1 + EPS_HIGH) * a)
    loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    optimizer.step()
    model.save_pretrained(out)
    Path(result).write_text(json.dumps({"loss": loss.item(), "grad_norm": grad_norm.item()}))


# ---- the parent -------------------------------------------------------------------------------


def run(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak resident GB) of one child process, from launch to exit."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err}")
    return wall, usage.ru_maxrss / 1024**2  # KiB -> GiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3, help="Runs per path, interleaved (best and median shown).")
    ap.add_argument("--child", choices=("trl", "naive"), help=argparse.SUPPRESS)
    ap.add_argument("--files", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        return child(args.child, *args.files)

    import torch

    sys.path.insert(0, str(HERE))
    from logging_checks import skewed_lengths, write_workload
    from trl_logprobs import matmul_peak

    torch.set_num_threads(args.threads)
    peak = matmul_peak(args.threads)  # first, on a quiet process
    tokens = int(skewed_lengths(args.rows, args.max_len).sum())
    head_work = 6 * tokens * args.hidden * args.vocab  # the step's head GEMMs: forward and two gradient GEMMs
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads),
           "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        # behavior log-probs near a random model's −log V, so ratios sit inside and outside the clip band
        model_dir, rollouts = write_workload(root, args.rows, args.vocab, args.hidden, max_len=args.max_len,
                                             behavior=lambda g, n: -11.93 + 0.3 * g.standard_normal(n))
        paths = {
            "drpo": lambda: [sys.executable, "-m", "drpo_cli", "train", "--rollouts", str(rollouts), "--model",
                             str(model_dir), "--out", str(root / "drpo-out"), "--overwrite", "--loss", "ppo-clip",
                             "--eps-low", str(EPS_LOW), "--eps-high", str(EPS_HIGH), "--lr", str(LR),
                             "--max-grad-norm", str(MAX_GRAD_NORM), "--device", "cpu", "--quiet"],
            **{name: (lambda name=name: [sys.executable, __file__, "--child", name, "--threads", str(args.threads),
                                         "--files", str(rollouts), str(model_dir), str(root / f"{name}-out"),
                                         str(root / f"{name}.json")]) for name in ("trl", "naive")},
        }
        walls, peaks = {name: [] for name in paths}, {name: 0.0 for name in paths}
        for _ in range(args.repeat):
            for name, cmd in paths.items():
                if name != "drpo" and (root / f"{name}-out").exists():
                    shutil.rmtree(root / f"{name}-out")
                wall, rss = run(cmd(), env)
                walls[name].append(wall)
                peaks[name] = max(peaks[name], rss)
        step = json.loads((root / "drpo-out" / "drpo_report.json").read_text())["steps"][0]
        seen = {"drpo": {"loss": step["loss"], "grad_norm": step["grad_norm"]},
                **{n: json.loads((root / f"{n}.json").read_text()) for n in ("trl", "naive")}}
    agree = max(abs(seen[n][k] - seen["drpo"][k]) / max(abs(seen["drpo"][k]), 1e-30)
                for n in ("trl", "naive") for k in ("loss", "grad_norm"))
    print(json.dumps({"seconds": walls, "peak_rss_gb": peaks, "loss_and_grad_norm": seen}, indent=2))
    print(f"{args.rows} rows, responses 16 … {args.max_len} (+32 prompt), V={args.vocab:,}, H={args.hidden}, "
          f"{args.threads} threads; one step, whole process, {args.repeat} runs each, interleaved")
    best, median = ({n: f(w) for n, w in walls.items()} for f in (min, statistics.median))
    for name in ("trl", "naive"):
        print(f"drpo {best['drpo']:6.2f} s (median {median['drpo']:6.2f}) {peaks['drpo']:5.2f} GB | "
              f"{name:5s} {best[name]:6.2f} s (median {median[name]:6.2f}) {peaks[name]:5.2f} GB | "
              f"drpo/{name}: ×{best[name] / best['drpo']:.2f} speed (medians ×{median[name] / median['drpo']:.2f}), "
              f"{peaks['drpo'] / peaks[name]:.0%} memory")
    print(f"the step's head GEMMs ({head_work / 1e9:.0f} GFLOP) at this machine's matmul peak "
          f"({peak / 1e9:.0f} GFLOP/s) take {head_work / peak:.2f} s: "
          + ", ".join(f"{n} {head_work / peak / best[n]:.0%} of its best wall time" for n in paths))
    print(f"loss and gradient norm, largest relative difference from drpo's: {agree:.1e}")


if __name__ == "__main__":
    main()
