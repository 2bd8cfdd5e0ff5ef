"""Chunked-head log-probs, entropy and the fused loss path against the naive full-logits path (fp32)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import ENTROPY_ULPS, GRAD_ULPS, LOGP_ULPS, assert_reordered
from toy import TINY, make_rows, random_rows, tiny_model  # tests/ is on sys.path under pytest
from transformers import Gemma2Config, GraniteConfig, LlamaConfig, Qwen2Config

from drpo_cli.base.errors import CheckpointError, ConfigError
from drpo_cli.model.batching import plan_micro_batches
from drpo_cli.model.head import output_head
from drpo_cli.model.logprobs import (
    fused_token_loss,
    pick_device,
    token_logprobs,
    token_logprobs_at,
)

VOCAB = 97  # toy.random_rows' default vocabulary
def build(config_cls=Qwen2Config, *, tied=True, bias=False, seed=0, attn="sdpa", **extra) -> torch.nn.Module:
    model = tiny_model(config_cls, vocab_size=VOCAB, seed=seed, attn=attn, max_position_embeddings=128,
                       tie_word_embeddings=tied, **extra)
    with torch.no_grad():  # larger logits than the default init, so the distributions are far from uniform
        model.get_output_embeddings().weight.mul_(4.0)
        if bias:
            head = torch.nn.Linear(TINY["hidden_size"], VOCAB, bias=True)
            head.weight.copy_(0.5 * torch.randn(VOCAB, TINY["hidden_size"]))
            head.bias.copy_(torch.randn(VOCAB))
            model.lm_head = head
    return model


def naive(model, rows):
    """Row by row, unpadded: full logits → / temperature → float32 log_softmax → gather; flat token order."""
    logps, ents = [], []
    for i in range(rows.num_rows):
        p, r = rows.prompt(i), rows.response(i)
        ids = torch.from_numpy(np.concatenate([p, r]))[None]  # (1, P+R)
        logits = model(input_ids=ids).logits[0, len(p) - 1 : len(p) + len(r) - 1]  # (R, V)
        logp_all = torch.log_softmax(logits.float() / float(rows.temperature[i]), dim=-1)  # (R, V)
        logps.append(logp_all.gather(1, torch.from_numpy(r)[:, None]).squeeze(1))
        ents.append(-(logp_all.exp() * logp_all).sum(-1))
    return torch.cat(logps), torch.cat(ents)


def ours(model, rows, *, budget, side, chunk, with_entropy=True):
    """Micro-batched engine, scattered back into the flat token order of RolloutRows."""
    logp = torch.zeros(rows.num_tokens)
    ent = torch.zeros(rows.num_tokens)
    for mb in plan_micro_batches(rows, np.arange(rows.num_rows), budget, padding_side=side):
        lp, en = token_logprobs(model, mb, chunk_tokens=chunk, with_entropy=with_entropy)
        logp = logp.index_put((mb.token_index,), lp)
        if with_entropy:
            ent = ent.index_put((mb.token_index,), en)
    return logp, ent


def objective(logp, ent, seed=1):
    """A fixed random linear functional (token-mean scale), so every log-prob and entropy carries gradient."""
    g = torch.Generator().manual_seed(seed)
    total = (torch.randn(logp.shape, generator=g) * logp).sum() + (
        torch.randn(ent.shape, generator=g) * ent
    ).sum()
    return total / logp.numel()


def grads(model, fn):
    model.zero_grad(set_to_none=True)
    fn().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# The engine (micro-batches, padding, head chunks, the fused path) against a naive full-logits forward: the
# same formulas in another order, so equal to float32 rounding (conftest's bounds), never bit for bit.
def assert_logp_close(got, want, msg="log-probs"):
    want = want.detach()
    assert_reordered(got, want, LOGP_ULPS, scale=1 + want.abs(), msg=msg)


def assert_entropy_close(got, want):
    want = want.detach()
    assert_reordered(got, want, ENTROPY_ULPS, scale=1 + want.abs(), msg="entropy")


def assert_loss_close(got, want):
    """A sum of per-token losses of log p, each moving with its log-prob; their errors average (measured: 2.1
    ε32 of max(1, |loss|)), so the per-token bound holds for the sum."""
    want = want.detach()
    assert_reordered(got, want, LOGP_ULPS, scale=max(1.0, abs(float(want))), msg="loss")


def assert_grads_close(a, b):
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert_reordered(a[name], b[name], GRAD_ULPS, msg=name)


MODELS = {
    "qwen2-tied": lambda: build(Qwen2Config, tied=True),
    "llama-untied": lambda: build(LlamaConfig, tied=False),
    "qwen2-bias-head": lambda: build(Qwen2Config, tied=False, bias=True),
}


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    model, rows = MODELS[request.param](), random_rows()
    ref_logp, ref_ent = naive(model, rows)
    ref_grads = grads(model, lambda: objective(*naive(model, rows)))
    return model, rows, ref_logp, ref_ent, ref_grads


@pytest.mark.parametrize(
    ("side", "chunk", "budget"),
    [("right", 1, 1000), ("left", 7, 1000), ("right", 1000, 12), ("left", 1, 12), ("left", 4096, 1)],
)
def test_logprobs_entropy_and_grads_match_naive(case, side, chunk, budget):
    model, rows, ref_logp, ref_ent, ref_grads = case
    logp, ent = ours(model, rows, budget=budget, side=side, chunk=chunk)
    assert_logp_close(logp, ref_logp)
    assert_entropy_close(ent, ref_ent)
    got = grads(model, lambda: objective(*ours(model, rows, budget=budget, side=side, chunk=chunk)))
    assert_grads_close(got, ref_grads)


def test_logprob_only_grads_match_naive():
    model, rows = build(LlamaConfig, tied=False), random_rows(seed=3)
    ref = grads(model, lambda: objective(naive(model, rows)[0], torch.zeros(0)))
    got = grads(
        model,
        lambda: objective(
            ours(model, rows, budget=20, side="right", chunk=3, with_entropy=False)[0], torch.zeros(0)
        ),
    )
    assert_grads_close(got, ref)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("side", ["right", "left"])
def test_fused_loss_matches_unfused_values_and_every_gradient(tied, side):
    model, rows = build(Qwen2Config, tied=tied, seed=4), random_rows(seed=5, n=6)
    (mb,) = plan_micro_batches(rows, np.arange(rows.num_rows), 10_000, padding_side=side)
    g = torch.Generator().manual_seed(7)
    adv = torch.randn(mb.num_tokens, generator=g)  # (M,)
    mu = -torch.rand(mb.num_tokens, generator=g) * 3  # (M,)

    def loss_fn(logp, sl):  # an elementwise, non-linear per-token loss summed over tokens
        r = torch.exp((logp - mu[sl]).clamp(-20, 20))
        return (-adv[sl] * r + adv[sl].abs() * (r - 1) ** 2 / 0.4).sum() / 17.0

    def unfused():
        logp, _ = token_logprobs(model, mb, chunk_tokens=5)
        return loss_fn(logp, slice(None))

    ref_loss = unfused()
    ref_logp, ref_ent = token_logprobs(model, mb, chunk_tokens=1000, with_entropy=True)
    ref = grads(model, unfused)
    loss, logp, ent = fused_token_loss(model, mb, loss_fn, chunk_tokens=3, with_entropy=True)
    assert_loss_close(loss, ref_loss)
    assert_logp_close(logp, ref_logp)
    assert_entropy_close(ent, ref_ent)
    assert not logp.requires_grad and loss.requires_grad
    got = grads(model, lambda: fused_token_loss(model, mb, loss_fn, chunk_tokens=3)[0])
    assert_grads_close(got, ref)


def test_padding_invariance_alone_vs_packed():
    model, rows = build(Qwen2Config, seed=2), random_rows(seed=6, n=6)
    packed, _ = ours(model, rows, budget=10_000, side="left", chunk=4, with_entropy=False)
    for i in range(rows.num_rows):
        (mb,) = plan_micro_batches(rows, [i], 10_000)
        alone, _ = token_logprobs(model, mb)
        lo, hi = rows.response_offsets[i], rows.response_offsets[i + 1]
        assert_logp_close(alone, packed[lo:hi])


def test_inference_mode_audit_path():
    model, rows = build(Qwen2Config, seed=8), random_rows(seed=9)
    ref_logp, ref_ent = naive(model, rows)
    with torch.inference_mode():
        logp, ent = ours(model, rows, budget=16, side="right", chunk=2)
    assert not logp.requires_grad
    assert_logp_close(logp, ref_logp)
    assert_entropy_close(ent, ref_ent)


@pytest.mark.parametrize(("config_cls", "extra"), [
    (Qwen2Config, {}), (Gemma2Config, {"final_logit_softcapping": 3.0, "head_dim": 8, "attn": "eager"}),
])
def test_extra_temperatures_equal_separate_passes(config_cls, extra):
    # Log-probs at other temperatures from the same chunk logits equal a separate pass at each one.
    model, rows = build(config_cls, seed=12, **extra), random_rows(seed=13, n=6)
    temps = (0.5, 0.9, 1.0, 1.6)
    for mb in plan_micro_batches(rows, np.arange(rows.num_rows), 40):
        select = torch.arange(mb.num_tokens) % 3 != 1  # spans chunk boundaries, some chunks partly
        with torch.inference_mode():
            logp, ent, at = token_logprobs_at(model, mb, temps, select, chunk_tokens=4, with_entropy=True)
            ref_logp, ref_ent = token_logprobs(model, mb, chunk_tokens=4, with_entropy=True)
            assert torch.equal(logp, ref_logp) and torch.equal(ent, ref_ent)  # the main outputs are unchanged
            assert at.shape == (len(temps), mb.num_tokens) and at[:, ~select].isnan().all()
            for j, temp in enumerate(temps):
                sep, _ = token_logprobs(model, replace(mb, temperature=torch.full_like(mb.temperature, temp)),
                                        chunk_tokens=4)
                assert torch.equal(at[j, select], sep[select])  # the same float32 operations
    none = token_logprobs_at(model, mb, (), torch.zeros(mb.num_tokens, dtype=torch.bool))[2]
    assert none.shape == (0, 0)


@pytest.mark.parametrize(
    ("config_cls", "extra"),
    [
        (Gemma2Config, {"final_logit_softcapping": 3.0, "head_dim": 8, "attn": "eager"}),  # Gemma2: no SDPA
        (GraniteConfig, {"logits_scaling": 4.0}),
    ],
)
def test_config_logit_transforms_match_the_models_own_forward(config_cls, extra):
    model, rows = build(config_cls, tied=True, seed=10, **extra), random_rows(seed=11)
    head = output_head(model)
    assert (head.softcap, head.multiplier) == (
        (3.0, 1.0) if "final_logit_softcapping" in extra else (None, 0.25)
    )
    ref_logp, ref_ent = naive(model, rows)  # the model's forward applies its own transform
    ref = grads(model, lambda: objective(*naive(model, rows)))
    logp, ent = ours(model, rows, budget=20, side="left", chunk=3)
    assert_logp_close(logp, ref_logp)
    assert_entropy_close(ent, ref_ent)
    assert_grads_close(
        grads(model, lambda: objective(*ours(model, rows, budget=20, side="left", chunk=3))), ref
    )


def test_unknown_logit_scaling_is_refused_naming_the_key():
    model = build(Qwen2Config)
    model.config.logits_scaling = 2.0
    with pytest.raises(CheckpointError, match="logits_scaling=2.0"):
        output_head(model)


def test_pick_device_and_bad_arguments():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="device"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            pick_device("cuda")
    model, rows = build(Qwen2Config), random_rows()
    (mb,) = plan_micro_batches(rows, [0], 100)
    with pytest.raises(ConfigError, match="chunk_tokens"):
        token_logprobs(model, mb, chunk_tokens=0)


def test_bf16_autocast_body_runs_on_cpu_and_keeps_float32_outputs():
    model, rows = build(Qwen2Config, seed=12), random_rows(seed=13)
    (mb,) = plan_micro_batches(rows, np.arange(rows.num_rows), 1000)
    ref, _ = token_logprobs(model, mb)
    low, _ = token_logprobs(model, mb, dtype=torch.bfloat16)
    assert low.dtype == torch.float32
    # bf16 keeps 8 mantissa bits: hidden states round at ~0.4%, the log-probs move by far less than 0.05.
    assert (low - ref).abs().max().item() < 0.05
    loss, _, _ = fused_token_loss(model, mb, lambda lp, sl: lp.sum(), dtype=torch.bfloat16)
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize("chunk", [3, 1000])  # several chunks per micro-batch (two sweeps) and one chunk
def test_fused_whole_sequence_loss_matches_autograd(chunk):
    # GSPO's per-token loss depends on every token of its sequence: the fused path gets each token's
    # upstream gradient (per-sequence factor / |seq|) from the whole micro-batch.
    from drpo_cli.objectives.losses import token_loss

    model, rows = build(Qwen2Config, seed=8), random_rows(seed=9, n=6)
    (mb,) = plan_micro_batches(rows, np.arange(rows.num_rows), 10_000)
    g = torch.Generator().manual_seed(3)
    adv = torch.randn(mb.num_rows, generator=g)[mb.seq_index]  # (M,) one advantage per sequence
    with torch.no_grad():
        mu = token_logprobs(model, mb)[0] + 0.3 * torch.randn(mb.num_tokens, generator=g)  # (M,)
    hp = {"eps_low": 0.2, "eps_high": 0.28}
    coef = torch.rand(mb.num_tokens, generator=g)  # (M,) any per-token aggregation weights

    def loss_fn(logp, sl):
        return (coef[sl] * token_loss("gspo", logp, mu[sl], adv[sl], seq_index=mb.seq_index[sl], **hp)).sum()

    def unfused():
        return loss_fn(token_logprobs(model, mb, chunk_tokens=4)[0], slice(None))

    ref_loss, ref = unfused().detach(), grads(model, unfused)
    loss, _, _ = fused_token_loss(model, mb, loss_fn, chunk_tokens=chunk, whole=True)
    assert_loss_close(loss, ref_loss)
    assert_grads_close(grads(model, lambda: fused_token_loss(model, mb, loss_fn, chunk_tokens=chunk, whole=True)[0]),
                       ref)


def test_fused_entropy_bonus_matches_full_logits_autograd():
    # loss = Σ_t coef_t·(−logπ_t) − c·Σ_t coef_t·H_t: the entropy gradient goes through the chunked head.
    model, rows = build(Qwen2Config, tied=False, bias=True, seed=10), random_rows(seed=11, n=6)
    (mb,) = plan_micro_batches(rows, np.arange(rows.num_rows), 10_000)
    g = torch.Generator().manual_seed(4)
    coef = torch.rand(mb.num_tokens, generator=g)  # (M,)

    def naive_loss():
        logp, ent = naive(model, rows)  # flat token order: gathered into the micro-batch's
        lp, en = logp[mb.token_index], ent[mb.token_index]
        return (coef * -lp).sum() - 0.05 * (coef * en).sum()

    ref_loss, ref = naive_loss().detach(), grads(model, naive_loss)

    def fused():
        return fused_token_loss(model, mb, lambda lp, sl: (coef[sl] * -lp).sum(), chunk_tokens=3,
                                entropy_weight=-0.05 * coef)

    loss, _, ent = fused()
    assert ent is not None
    assert_loss_close(loss, ref_loss)
    assert_grads_close(grads(model, lambda: fused()[0]), ref)


def test_entropy_at_a_real_vocabulary_size_is_float32_accurate():
    # V = 151,936: the entropy of both the forward-only path (audits) and the gradient path (an
    # entropy bonus) within ENTROPY_ULPS·ε32·(1 + H) of float64 (≤ 2e-5 nats here); a float32 dot product over
    # the whole row drifts ~1e-3.
    model = tiny_model(Qwen2Config, vocab_size=151_936, seed=3, max_position_embeddings=128, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # logits of a few nats' spread, like a trained model's
    g = np.random.default_rng(5)
    rows = make_rows([g.integers(0, 151_936, 4).tolist() for _ in range(3)],
                     [g.integers(0, 151_936, 12).tolist() for _ in range(3)], [1.0, 0.7, 1.3])
    (mb,) = plan_micro_batches(rows, np.arange(rows.num_rows), 10_000)
    with torch.no_grad():
        h = model.get_decoder()(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                                position_ids=mb.position_ids).last_hidden_state
        h = h.reshape(-1, h.shape[-1]).index_select(0, mb.src_index).double()  # (M, H)
        z = (h @ model.lm_head.weight.double().t()) / mb.temperature.double()[:, None]  # (M, V) float64
        ref = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    assert ref.min() > 1.0  # far from one-hot: every vocabulary entry counts
    with torch.inference_mode():
        _, audit = token_logprobs(model, mb, chunk_tokens=16, with_entropy=True)
    _, _, bonus = fused_token_loss(model, mb, lambda lp, sl: lp.sum(), chunk_tokens=16,
                                   entropy_weight=torch.full((mb.num_tokens,), -0.01))
    for name, ent in (("audit", audit), ("bonus", bonus)):
        assert_reordered(ent, ref, ENTROPY_ULPS, scale=1 + ref, msg=name)


def test_calls_sharing_buffers_give_the_same_results_and_free_them_after():
    # Inside reused_buffers() later calls write their logits into the first call's buffers (made
    # at the chunk size); outside, each call has its own. Same numbers either way.
    from drpo_cli.model import head

    model = build(Qwen2Config, seed=12)
    small, large = random_rows(seed=13, n=2), random_rows(seed=14, n=6)
    batches = [plan_micro_batches(r, np.arange(r.num_rows), 10_000)[0] for r in (small, large, small)]
    with torch.inference_mode():
        alone = [token_logprobs(model, mb, chunk_tokens=64, with_entropy=True) for mb in batches]
        with head.reused_buffers():
            shared = [token_logprobs(model, mb, chunk_tokens=64, with_entropy=True) for mb in batches]
            held = dict(head._POOLS.buffers)
        assert head._POOLS.buffers is None  # freed on leaving the block
    assert {key[0] for key in held} >= {"logits", "block", "block_e"}
    for (lp_a, ent_a), (lp_s, ent_s) in zip(alone, shared):
        assert torch.equal(lp_a, lp_s) and torch.equal(ent_a, ent_s)
