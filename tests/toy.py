"""The tests' toy inputs, defined once: the bundled example (a private copy, or its first rows), the shape of
every tiny random-weight model built from a transformers config, and rollout rows built in memory.

Tests import it by name (tests/ is on sys.path under pytest, and the torchrun scripts put it there).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

TOY = Path(__file__).resolve().parents[1] / "examples" / "toy"  # the bundled example, committed
TOY_MODEL, TOY_ROLLOUTS = TOY / "model", TOY / "rollouts.arrow"
TOY_VERSION = 8  # examples/toy/model/drpo_checkpoint.json

# The shape of every tiny model the tests build from a config (dense ones add intermediate_size=64).
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def require_toy() -> None:
    """The bundled example is committed: a checkout without it fails (never skips)."""
    if not TOY_MODEL.is_dir():
        pytest.fail("examples/toy/model is missing: it is committed (git checkout examples/toy), "
                    "or rebuild it with python examples/make_example.py")


def copy_toy(root: Path, rows: int | None = None) -> Path:
    """A private copy of the bundled example in `root`: model/ (policy version 8) and rollouts.arrow, all of
    its rows or the first `rows` (metadata kept)."""
    require_toy()
    if rows is None:
        shutil.copytree(TOY, root, dirs_exist_ok=True)
        return root
    shutil.copytree(TOY_MODEL, root / "model")
    table = pa.ipc.open_file(str(TOY_ROLLOUTS)).read_all().slice(0, rows)
    with pa.OSFile(str(root / "rollouts.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return root


def tiny_model(config_cls, *, vocab_size: int, seed: int = 0, attn: str | None = None, **extra):
    """A random-weight causal LM of the TINY shape (float32, eval mode), seeded; `extra` completes the config."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = config_cls(**{**TINY, "intermediate_size": 64, "vocab_size": vocab_size, **extra})
    kwargs = {} if attn is None else {"attn_implementation": attn}
    return AutoModelForCausalLM.from_config(config, **kwargs).float().eval()


def make_rows(prompts, responses, temperatures=None):
    """RolloutRows from lists of token lists (behavior log-probs / advantages are placeholders)."""
    from drpo_cli.rollouts.rows import RolloutRows

    n = len(prompts)
    p_off = np.concatenate([[0], np.cumsum([len(p) for p in prompts])]).astype(np.int64)
    r_off = np.concatenate([[0], np.cumsum([len(r) for r in responses])]).astype(np.int64)
    t = int(r_off[-1])
    return RolloutRows(
        prompt_ids=np.array([x for p in prompts for x in p], dtype=np.int64),
        prompt_offsets=p_off,
        response_ids=np.array([x for r in responses for x in r], dtype=np.int64),
        response_offsets=r_off,
        behavior_logprobs=np.full(t, -1.0, dtype=np.float32),
        advantages=np.zeros(t, dtype=np.float32),
        loss_mask=np.ones(t, dtype=bool),
        proximal_logprobs=None,
        sample_ids=[f"s{i}" for i in range(n)],
        policy_version=np.full(n, -1, dtype=np.int64),
        temperature=np.asarray(temperatures if temperatures is not None else [1.0] * n, dtype=np.float32),
        source_file=["mem.arrow"] * n,
        source_row=np.arange(n, dtype=np.int64),
    )


def random_rows(seed: int = 0, n: int = 5, vocab: int = 97):
    """`n` rows of random prompts (1-5 tokens) and responses (1-8 tokens) over `vocab`, at temperatures 0.7,
    1.0 and 1.3 (make_rows)."""
    g = np.random.default_rng(seed)
    prompts = [g.integers(0, vocab, g.integers(1, 6)).tolist() for _ in range(n)]
    responses = [g.integers(0, vocab, g.integers(1, 9)).tolist() for _ in range(n)]
    temps = [0.7, 1.0, 1.3, 1.0, 0.7, 1.3][:n]
    return make_rows(prompts, responses, temps)
