"""Model copies per node: CPU memory for weights under torchrun, meta-device sharded loading vs every rank loading.

    python benchmarks/model_copies.py                      # writes /tmp/drpo_model_copies/ (~870 MB) once
    python benchmarks/model_copies.py --ranks 1 2 4 --path DIR

For each number of gloo ranks on one machine, every rank records its resident memory after the
imports and the process group (its bare footprint) and its peak RSS (getrusage ru_maxrss) once the
model is loaded and sharded. "Model copies per node" = Σ_ranks (peak − bare) / checkpoint bytes.
- sharded: `distributed.load_sharded_model` (meta device, FSDP2, each rank reads its rows);
- every-rank: `checkpoint.load_model` on every rank, then `distributed.shard_model` (the old way).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(path: Path) -> None:
    """A random-weight fp32 Llama of about 217M parameters (870 MB), untied head."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                         num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    tmp = path.with_name(path.name + ".partial")
    model.save_pretrained(tmp, max_shard_size="10GB")
    os.replace(tmp, path)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def worker(path: str, way: str, out: str) -> None:
    import torch

    from drpo_cli.model import distributed
    from drpo_cli.model.checkpoint import load_model

    torch.set_num_threads(1)
    device = distributed.init(torch.device("cpu"))
    from transformers import LlamaForCausalLM  # noqa: F401 - the modelling code is part of the bare footprint

    bare = rss_bytes()
    if way == "sharded":
        model, _ = distributed.load_sharded_model(path, device)
    else:
        model, _ = load_model(path)
        distributed.shard_model(model, device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out, f"rank{distributed.rank()}.json").write_text(json.dumps({"bare": bare, "peak": peak}))
    distributed.shutdown()


def run(path: Path, way: str, ranks: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
                   f"--master-port={port}", __file__, "--worker", way, "--path", str(path), "--out", out]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        subprocess.run(command, check=True, env=env, capture_output=True, timeout=1800)
        per_rank = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    extra = sum(r["peak"] - r["bare"] for r in per_rank)
    return {"way": way, "ranks": ranks, "checkpoint_bytes": size, "copies": extra / size,
            "peak_sum_gb": sum(r["peak"] for r in per_rank) / 1e9, "bare_sum_gb": sum(r["bare"] for r in per_rank) / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=os.path.join(tempfile.gettempdir(), "drpo_model_copies"))
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--ways", nargs="+", default=["sharded", "every-rank"])
    parser.add_argument("--worker", choices=["sharded", "every-rank"])
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        return worker(args.path, args.worker, args.out)
    path = Path(args.path)
    if not path.is_dir():
        make_checkpoint(path)
    for way in args.ways:
        for ranks in args.ranks:
            r = run(path, way, ranks)
            print(f"{way:>10}  ranks {ranks}  checkpoint {r['checkpoint_bytes'] / 1e6:,.0f} MB  "
                  f"model copies per node {r['copies']:.2f}  (Σ peak RSS {r['peak_sum_gb']:.2f} GB, "
                  f"Σ bare {r['bare_sum_gb']:.2f} GB)", flush=True)


if __name__ == "__main__":
    main()
