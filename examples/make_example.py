"""Build the bundled example: a tiny "current" policy at version 8 and stale rollouts from older versions.

    python examples/make_example.py            # rewrites examples/toy/{model/,rollouts.arrow}
    python examples/make_example.py --out DIR  # writes DIR/model/ and DIR/rollouts.arrow

1. A tiny Llama (examples/toytask.py) is warm-started with a few supervised steps towards a
   half-right policy (the key letter with probability 1/2, any letter otherwise), so the
   example's distributions are peaked enough for trust-region diagnostics to mean something
   and the reward (about 0.5) leaves room to improve. It is saved as policy version 8.
2. Versions 8 - lag stand for stale samplers: copies of it with seeded Gaussian noise on every
   weight, growing with the lag (`older_version`). Rollouts are sampled from lags 0, 1, 2, 4 and
   8: 24 prompts (groups) x 8 samples, one policy version per group, with the true behavior
   log-probs at temperature 0.9.

Deterministic: rerunning on the same machine yields byte-identical files (single CPU thread).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from drpo_cli import __version__ as drpo_version

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toytask

CURRENT_VERSION = 8
LAGS = (0, 1, 2, 4, 8)
NUM_PROMPTS = 24
SAMPLES_PER_PROMPT = 8
TEMPERATURE = 0.9
RESPONSE_LEN = (6, 12)  # per-group length drawn uniformly from this inclusive range
NOISE = 0.1  # weight noise per sqrt(lag), relative to each tensor's RMS
REWIND = 10  # lag at which an older version would be back at the initial weights
SEED = 0
DEFAULT_OUT = Path(__file__).resolve().parent / "toy"


def warm_start(
    model, *, steps: int = 60, batch: int = 64, length: int = 12, p_key: float = 0.5, seed: int = SEED
):
    """Supervised steps towards responses that repeat the key with probability `p_key` per token."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    keys = torch.tensor([toytask.VOCAB[k] for k in toytask.KEYS])
    model.train()
    for _ in range(steps):
        key = keys[torch.randint(len(keys), (batch, 1), generator=g)]  # (B, 1)
        noise = toytask.LETTER_IDS[
            torch.randint(len(toytask.LETTER_IDS), (batch, length), generator=g)
        ]  # (B, L)
        hit = torch.rand(batch, length, generator=g) < p_key  # (B, L)
        response = torch.where(hit, key, noise)  # (B, L)
        prefix = torch.tensor([toytask.BOS, toytask.KEY_MARK]).expand(batch, 2)
        seq = torch.cat([prefix, key, response], dim=1)  # (B, 3 + L)
        logits = model(input_ids=seq[:, :-1]).logits[:, 2:]  # (B, L, V): positions predicting the response
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), response.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def older_version(model, initial, lag: int, *, noise: float = NOISE, seed: int = SEED):
    """Policy version `current - lag`: less trained and noisier than the current one.

    Each weight moves back towards its initial value by `lag / REWIND` of the way (older
    versions have learned less) and gets N(0, (noise * sqrt(lag) * rms(w))^2) noise (the random
    walk of the updates in between). Lag 0 is an exact copy.
    """
    import copy

    old = copy.deepcopy(model)
    if lag == 0:
        return old
    g = torch.Generator().manual_seed(seed * 1000 + lag)
    start = dict(initial.named_parameters())
    for name, p in sorted(old.named_parameters()):  # tied weights appear once
        p.lerp_(start[name], lag / REWIND)
        p.add_(torch.randn(p.shape, generator=g) * (noise * lag**0.5 * p.pow(2).mean().sqrt()))
    return old


def build(out: Path) -> dict:
    """Write out/model/ and out/rollouts.arrow; returns a summary (mean reward per lag)."""
    initial = toytask.build_model(seed=SEED)
    model = warm_start(toytask.build_model(seed=SEED))
    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model.save_pretrained(model_dir)
    toytask.build_tokenizer().save_pretrained(model_dir)
    meta = {
        "policy_version": CURRENT_VERSION,
        "training": {"example": "examples/make_example.py warm start", "seed": SEED},
        "drpo_version": drpo_version,
    }
    (model_dir / "drpo_checkpoint.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    rng = np.random.default_rng(SEED)
    prompts = toytask.make_prompts(NUM_PROMPTS, seed=SEED)
    lengths = rng.integers(RESPONSE_LEN[0], RESPONSE_LEN[1] + 1, size=NUM_PROMPTS).tolist()
    group_lag = [LAGS[i % len(LAGS)] for i in range(NUM_PROMPTS)]
    tables = []
    for lag in LAGS:
        groups = [i for i in range(NUM_PROMPTS) if group_lag[i] == lag]
        policy = older_version(model, initial, lag)
        for g in groups:  # one call per group keeps the group offset = its index
            tables.append(
                toytask.sample_rollouts(
                    policy,
                    [prompts[g]],
                    SAMPLES_PER_PROMPT,
                    TEMPERATURE,
                    CURRENT_VERSION - lag,
                    seed=SEED * 1000 + g,
                    response_len=lengths[g],
                    group_offset=g,
                )
            )
    table = pa.concat_tables(tables).sort_by([("group_id", "ascending")]).combine_chunks()
    toytask.write_arrow(table.replace_schema_metadata(tables[0].schema.metadata), out / "rollouts.arrow")
    rewards = table.column("reward").to_numpy()
    versions = table.column("policy_version").to_numpy()
    return {f"lag {lag}": float(rewards[versions == CURRENT_VERSION - lag].mean()) for lag in LAGS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="directory for model/ and rollouts.arrow"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reduction order fixed -> identical bytes on every rerun
    try:
        start = time.perf_counter()
        summary = build(args.out)
    finally:
        torch.set_num_threads(threads)
    rewards = ", ".join(f"{k}: {v:.3f}" for k, v in summary.items())
    print(f"wrote {args.out}/model and {args.out}/rollouts.arrow in {time.perf_counter() - start:.1f}s")
    print(f"mean reward by lag: {rewards}")


if __name__ == "__main__":
    main()
