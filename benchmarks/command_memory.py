"""Memory per node during whole commands under torchrun: `drpo inspect --model` and `drpo train`.

    python benchmarks/command_memory.py                          # both sizes, 1 2 4 ranks, both commands
    python benchmarks/command_memory.py --ranks 1 2 --commands inspect --dir /tmp/drpo_command_memory

Two random-weight fp32 Llama checkpoints of the same vocabulary (32,000, untied head) and depth
structure, about 170 MB and 670 MB, and 8 rollout rows (responses 16 … 64 tokens), built once in
--dir. Each command runs whole, as a user runs it (`python -m torch.distributed.run
--nproc-per-node N -m drpo_cli ...`, gloo on CPU); every 50 ms the sampler reads each rank's
resident memory (VmRSS) and peak (VmHWM) from /proc. Printed per command, ranks and size:
- peak per rank: the largest VmHWM of a rank (what ru_maxrss reports);
- node peak: the largest sum of the ranks' VmRSS at one sampling instant;
- bare: one rank that imports python, torch, transformers' Llama and drpo and joins the process
  group, then exits (its ru_maxrss), measured the same way at each N;
- copies: (node peak − N × bare) / checkpoint bytes: model copies per node during the work.
Then, per command and N, the fit over the two sizes: node peak = N × (bare + fixed) + k × checkpoint
bytes: `k` is what grows with the model (copies per node), `fixed` the per-rank cost that does not
(chunk buffers, allocator, activations).

The floor: inspect needs the weights (1 copy per node); train needs weights, gradients and AdamW's
two moments (4 copies per node, sharded over the ranks). Above it, each rank gathers one FSDP unit
at a time (briefly twice: the all-gather buffer, then the parameter): in training a decoder layer
and the 32,000 × 1,024 head (19.5% of the 670 MB model); without gradients an attention block or an
MLP, the vocabulary matrices never (drpo_cli/model/vocab_parallel.py). Measured (2 cores, gloo): k =
1.04 / 1.22 / 1.39 copies per node for inspect at 1 / 2 / 4 ranks, 4.24 / 4.17 / 4.00 for train
(docs/scale-out.md has the table).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIZES = {  # name -> (hidden, intermediate, layers): vocab 32,000 for both, so the head buffers match
    "170MB": (512, 1408, 3),
    "670MB": (1024, 2816, 8),
}
VOCAB = 32000
ROWS = 8
FLOOR = {"inspect": 1.0, "train": 4.0}


def make_checkpoint(path: Path, hidden: int, intermediate: int, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         tie_word_embeddings=False, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    tmp = path.with_name(path.name + ".partial")
    model.save_pretrained(tmp, max_shard_size="10GB")
    os.replace(tmp, path)


def prepare(root: Path) -> dict[str, Path]:
    sys.path.insert(0, str(HERE))
    from logging_checks import write_rollouts

    root.mkdir(parents=True, exist_ok=True)
    if not (root / "rollouts.arrow").is_file():
        write_rollouts(root / "rollouts.arrow", ROWS, VOCAB, max_len=64)
    models = {}
    for name, shape in SIZES.items():
        models[name] = root / f"model-{name}"
        if not models[name].is_dir():
            make_checkpoint(models[name], *shape)
    return models


def bare_worker() -> None:
    """What every rank holds before any model: the imports and the process group."""
    import torch
    from transformers import LlamaForCausalLM  # noqa: F401 - the modelling code is part of the bare footprint

    import drpo_cli.audit.inspect_data
    import drpo_cli.cli
    import drpo_cli.training.train  # noqa: F401
    from drpo_cli.model import distributed

    distributed.init(torch.device("cpu"))
    distributed.shutdown()


def _status(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of a process in bytes, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def measure(args: list[str], ranks: int, cwd: Path, every: float = 0.05) -> dict:
    """Run `torchrun --nproc-per-node ranks <args>`; the ranks' peak VmHWM and the largest sum of their VmRSS."""
    import psutil

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", f"--master-port={port}",
               *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    log = cwd / "log.txt"
    with open(log, "w") as out:
        agent = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        me = psutil.Process(agent.pid)
        hwm: dict[int, int] = {}
        node_peak = 0
        while agent.poll() is None:
            try:
                workers = [p.pid for p in me.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            total = 0
            for pid in workers:
                st = _status(pid)
                if st is not None:
                    total += st[0]
                    hwm[pid] = max(hwm.get(pid, 0), st[1])
            node_peak = max(node_peak, total)
            time.sleep(every)
    if agent.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({agent.returncode}):\n{log.read_text()[-3000:]}")
    return {"rank_peak": max(hwm.values()), "node_peak": node_peak, "ranks_seen": len(hwm)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "drpo_command_memory"))
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--commands", nargs="+", default=["inspect", "train"], choices=["inspect", "train"])
    parser.add_argument("--bare-worker", action="store_true")
    args = parser.parse_args()
    if args.bare_worker:
        return bare_worker()
    root = Path(args.dir)
    models = prepare(root)
    rollouts = root / "rollouts.arrow"
    gb = 1e9
    results: dict = {}
    for ranks in args.ranks:
        with tempfile.TemporaryDirectory(dir=root) as work:
            bare = measure([__file__, "--bare-worker"], ranks, Path(work))["rank_peak"]
        print(f"ranks {ranks}: bare rank {bare / gb:.2f} GB", flush=True)
        for command in args.commands:
            for size in args.sizes:
                model = models[size]
                nbytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
                with tempfile.TemporaryDirectory(dir=root) as work:
                    work = Path(work)
                    common = ["--quiet", "--device", "cpu"]
                    if command == "inspect":
                        drpo = ["inspect", str(rollouts), "--model", str(model), "--json", str(work / "r.json"), *common]
                    else:
                        drpo = ["train", "-r", str(rollouts), "-m", str(model), "--out", str(work / "out"),
                                "--minibatches", "1", *common]
                    r = measure(["-m", "drpo_cli", *drpo], ranks, work)
                copies = (r["node_peak"] - ranks * bare) / nbytes
                results[command, ranks, size] = (nbytes, r["node_peak"], bare)
                print(f"  {command:>7}  {size:>5} ({nbytes / 1e6:,.0f} MB)  peak per rank {r['rank_peak'] / gb:.2f} GB  "
                      f"node peak {r['node_peak'] / gb:.2f} GB  copies per node {copies:.2f} "
                      f"(floor {FLOOR[command]:.0f})", flush=True)
    if len(args.sizes) < 2:
        return
    print("\nfit over the two sizes: node peak = N × (bare + fixed) + k × checkpoint")
    small, large = args.sizes[0], args.sizes[-1]
    for command in args.commands:
        for ranks in args.ranks:
            (s1, p1, bare), (s2, p2, _) = results[command, ranks, small], results[command, ranks, large]
            k = (p2 - p1) / (s2 - s1)
            fixed = ((p1 - k * s1) / ranks - bare) / gb
            print(f"  {command:>7}  ranks {ranks}: k = {k:.2f} model copies per node (floor {FLOOR[command]:.0f}), "
                  f"fixed {fixed:+.2f} GB per rank above bare", flush=True)


if __name__ == "__main__":
    main()
