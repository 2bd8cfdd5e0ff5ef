"""Vocabulary-parallel embedding and head (drpo_cli/model/vocab_parallel.py) at 2 and 4 gloo ranks against one
unsharded copy of the same model on each rank: log-probs, entropy, extra-temperature log-probs and the
embeddings, with an untied head that has a bias, a soft-cap and a vocabulary no rank count divides."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import copy, sys, torch, torch.distributed as dist
    from transformers import LlamaConfig
    from drpo_cli.model import distributed, vocab_parallel
    from drpo_cli.model.batching import MicroBatch
    from drpo_cli.model.logprobs import token_logprobs_at

    sys.path.insert(0, sys.argv[2])  # tests/: conftest's bounds, toy's model
    from conftest import ENTROPY_ULPS, LOGP_ULPS, assert_reordered
    from toy import tiny_model

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ref = tiny_model(LlamaConfig, vocab_size=37, tie_word_embeddings=False, final_logit_softcapping=None)
    ref.lm_head.bias = torch.nn.Parameter(torch.randn(37) * 0.5)  # a biased head, as some models have
    model = distributed.shard_model(copy.deepcopy(ref), torch.device("cpu"))
    assert vocab_parallel.sharded_head(model) is not None and vocab_parallel.sharded_embedding(model) is not None

    g = torch.Generator().manual_seed(100 + rank)  # every rank its own batch, of its own size
    B, L = 2 + rank % 2, 5 + rank
    ids = torch.randint(1, 37, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.int64)
    pos = torch.arange(L).expand(B, L).contiguous()
    src = torch.arange(B * L).reshape(B, L)[:, 1:-1].reshape(-1)  # positions predicting targets
    flat = ids.reshape(-1)
    mb = MicroBatch(input_ids=ids, attention_mask=mask, position_ids=pos, target_ids=flat[src + 1],
                    src_index=src, temperature=torch.full((src.numel(),), 0.7), token_index=torch.arange(src.numel()),
                    seq_index=src // L, rows=torch.arange(B), real_positions=B * L)
    select = torch.arange(src.numel()) % 2 == 0
    with torch.no_grad():
        want = token_logprobs_at(ref, mb, (1.0, 0.9), select, chunk_tokens=3, with_entropy=True)
        got = token_logprobs_at(model, mb, (1.0, 0.9), select, chunk_tokens=3, with_entropy=True)
        emb_want = ref.get_input_embeddings()(ids)
        emb_got = vocab_parallel.embed(model.get_input_embeddings(), ids)
    torch.testing.assert_close(emb_got, emb_want, rtol=0, atol=0)  # one nonzero addend per row: exact
    # The sharded head merges per-rank log-sum-exps: the same formulas in another order (conftest's bounds).
    for name, a, b in zip(("logp", "entropy", "extra"), got, want):
        ulps = ENTROPY_ULPS if name == "entropy" else LOGP_ULPS
        assert_reordered(a, b, ulps, scale=1 + b.abs().nan_to_num(), msg=name)
    assert got[2][:, ~select].isnan().all() and not got[2][:, select].isnan().any()
    dist.destroy_process_group()
    open(f"{sys.argv[1]}.rank{rank}", "w").write("ok")  # (stdout lines of several ranks may interleave)
    """
)


@pytest.mark.multiproc
@pytest.mark.parametrize("nproc", [2, 4])
def test_vocab_parallel_equals_one_unsharded_model(tmp_path, nproc):
    from ranks import torchrun

    script = tmp_path / "vp.py"
    script.write_text(SCRIPT)
    run = torchrun(str(tmp_path / "done"), str(Path(__file__).parent), nproc=nproc, script=script)
    assert run.returncode == 0, run.stderr[-4000:]
    assert all((tmp_path / f"done.rank{r}").read_text() == "ok" for r in range(nproc))
