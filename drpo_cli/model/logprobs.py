"""The one place that runs the model: per-token log-probs (+ entropy), memory-lean (SPEC.md §1, §5).

log π_t = z_t[y_t] − logsumexp(z_t),  z_t = head(h_t) / τ_row  (float32), for response tokens only.

Three steps, none of which holds full-vocabulary logits for every position:
1. the decoder body gives final hidden states (B, L, H); keep the M response positions (M, H);
2. the output head runs over chunks of tokens with a float32 log-sum-exp, so memory is O(chunk × V);
3. backward either recomputes each chunk's logits (`token_logprobs`: 4 head GEMMs) or, in the fused
   training path (`fused_token_loss`), forms every chunk's gradients right after its forward from the
   per-token upstream gradient of an elementwise loss (3 head GEMMs, no recompute).

Logit transforms declared by a config (scaling, soft-capping) are applied before the temperature,
as the model's own forward does before the sampler divides by τ; unknown ones are refused.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from drpo_cli.base.errors import ConfigError
from drpo_cli.model import vocab_parallel
from drpo_cli.model.batching import MicroBatch
from drpo_cli.model.distributed import ENGINE_METHOD, HEAD_METHOD
from drpo_cli.model.head import (
    Head,
    Workspace,
    buffer,
    chunk_logits,
    in_dtype,
    output_head,
)
from drpo_cli.model.moe import feed as feed_routing

LossFn = Callable[[torch.Tensor, slice], torch.Tensor]


def pick_device(name: str = "auto") -> torch.device:
    """ "auto" -> cuda when available, else cpu; "cuda" without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but no CUDA device is available; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device: expected one of 'auto', 'cpu', 'cuda', found {name!r}")
    return torch.device(name)


EXTRA_BLOCK = 1 << 25  # elements (K × rows × V) the extra temperatures work on at a time: 128 MB of float32


def _extra_rows_per_block(temps: int, vocab: int) -> int:
    return max(1, EXTRA_BLOCK // max(temps * vocab, 1))


def _logp_at_temperatures(x: torch.Tensor, targets: torch.Tensor, sel: torch.Tensor, inv: torch.Tensor,
                          buf: torch.Tensor) -> torch.Tensor:
    """(K, k) log-probs of tokens `sel` of a chunk at K more temperatures, from its logits x (m, V) before τ.

    The same float32 operations as a pass at that temperature (scale, gather, max, exp, sum: one
    log-sum-exp per temperature), for all K at once on blocks of rows in `buf` (K, rows, V), reused:
    a few large ops per block rather than many small ones (each op costs a thread hand-off) or fresh
    buffers (a page fault per 4 KiB). No head GEMM.
    """
    k, temps = sel.shape[0], inv.shape[0]
    out = torch.empty(temps, k, dtype=torch.float32, device=x.device)
    for b in range(0, k, buf.shape[1]):
        rows = sel[b:b + buf.shape[1]]
        n = rows.shape[0]
        z = torch.mul(x[rows][None], inv[:, None, None], out=buf[:, :n])  # (K, n, V), z = x / τ'
        tgt = targets[rows][None, :, None].expand(temps, -1, 1)  # (K, n, 1)
        target_logit = z.gather(2, tgt).squeeze(2)  # (K, n)
        mx = z.amax(dim=-1, keepdim=True)  # (K, n, 1)
        out[:, b:b + n] = target_logit - (z.sub_(mx).exp_().sum(dim=-1).log() + mx.squeeze(2))
    return out


def _logp_entropy(z: torch.Tensor, targets: torch.Tensor, with_entropy: bool, ws: Workspace):
    """(log p(y) (m,), entropy (m,) | None) of logits z (m, V), which are only read: the forward-only statistics.

    The same float32 quantities as `_softmax_stats` (lse = log S + max, H = log S − Σ e·(z − max)/S),
    but z − max and e = exp(z − max) are formed a few rows at a time in two small reused blocks, so
    the (m, V) logits are read twice (max, then the blocks) and never written, and no (m, V) spare
    is needed (half the memory of an audit with entropy); the subtract, exp, sum and the entropy's
    product run on cache-resident rows.
    """
    m = z.shape[0]
    target_logit = z.gather(1, targets[:, None]).squeeze(1)  # (m,)
    mx = z.amax(dim=-1, keepdim=True)  # (m, 1)
    s = torch.empty(m, dtype=torch.float32, device=z.device)
    dot = torch.empty(m, dtype=torch.float32, device=z.device) if with_entropy else None
    step = ws.block.shape[0]
    for b in range(0, m, step):
        n = min(step, m - b)
        shifted = torch.sub(z[b:b + n], mx[b:b + n], out=ws.block[:n])  # (n, V)
        e = torch.exp(shifted, out=ws.block_e[:n])  # (n, V)
        s[b:b + n] = e.sum(dim=-1)
        if with_entropy:  # (a batched matmul is many times slower on a few rows)
            dot[b:b + n] = e.mul_(shifted).sum(dim=-1)
    log_s = s.log()
    entropy = log_s - dot / s if with_entropy else None
    return target_logit - (log_s + mx.squeeze(1)), entropy


def _softmax_stats(z: torch.Tensor, targets: torch.Tensor, with_entropy: bool, ws: Workspace):
    """log p(y), entropy, e = exp(z − max) and its row sums S, so that p = e / S.

    Overwrites z: afterwards z holds z − max when with_entropy, else e itself. Shifting by the row
    max keeps H = log S − E_p[z − max] a sum of two non-negative terms (no cancellation for peaked
    distributions, unlike lse − E_p[z] with lse ≈ 30).
    Returns (logp (m,), entropy (m,) | None, e (m, V), S (m,)).
    """
    m = z.shape[0]
    target_logit = z.gather(1, targets[:, None]).squeeze(1)  # (m,)
    mx = z.amax(dim=-1, keepdim=True)  # (m, 1)
    shifted = z.sub_(mx)  # (m, V), z − max
    e = torch.exp(shifted, out=ws.spare[:m]) if with_entropy else shifted.exp_()  # (m, V)
    s = e.sum(dim=-1)  # (m,)
    log_s = s.log()
    lse = log_s + mx.squeeze(1)
    entropy = log_s - _row_dot(e, shifted, ws) / s if with_entropy else None
    return target_logit - lse, entropy, e, s


def _row_dot(a: torch.Tensor, b: torch.Tensor, ws: Workspace) -> torch.Tensor:
    """Σ_v a·b per row of two (m, V) tensors, a few rows at a time in the workspace's small block.

    No (m, V) temporary, and torch.sum's pairwise float32 summation: 1e-6 from a float64 entropy
    on V = 151,936, where a batched matmul's dot product was 1e-3 off.
    """
    m, step = a.shape[0], ws.block.shape[0]
    out = torch.empty(m, dtype=torch.float32, device=a.device)
    for i in range(0, m, step):
        n = min(step, m - i)
        out[i:i + n] = torch.mul(a[i:i + n], b[i:i + n], out=ws.block[:n]).sum(dim=-1)
    return out


def _backprop_logits(gz: torch.Tensor, t, inv_temp: torch.Tensor, head: Head) -> torch.Tensor:
    """Chain dLoss/dz (m, V) back through temperature, soft-cap and multiplier to the raw head output."""
    gz.mul_(inv_temp[:, None])
    if t is not None:
        gz.mul_(1.0 - t * t)
    if head.multiplier != 1.0:
        gz.mul_(head.multiplier)
    return gz


def _grad_from_probs(p: torch.Tensor, targets: torch.Tensor, g_logp: torch.Tensor) -> torch.Tensor:
    """d(Σ g·log p(y)) / dz = g ⊙ (onehot(y) − p), in place over p (m, V)."""
    gz = p.mul_(-g_logp[:, None])
    return gz.scatter_add_(1, targets[:, None], g_logp[:, None])


def _entropy_grad_z(z: torch.Tensor, p: torch.Tensor, sums: torch.Tensor, ent: torch.Tensor,
                    g_ent: torch.Tensor) -> torch.Tensor:
    """d(Σ g·H)/dz = −g ⊙ p ⊙ (log p + H), in place over z, which holds z − max (log p = z − max − log S)."""
    return z.sub_(sums.log()[:, None]).add_(ent[:, None]).mul_(p).mul_(-g_ent[:, None])


def _loss_grad(loss_fn, logp: torch.Tensor, sl: slice):
    """(d loss/d logp, loss value) of loss_fn over log-probs `logp` of tokens `sl` (zeros when no grad)."""
    leaf = logp.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(leaf, sl)
        g = None
        if loss.requires_grad:
            (g,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    return (torch.zeros_like(logp) if g is None else g.float()), loss.detach().float()


def _accumulate_head_grads(gz, h, head: Head, grad_w, grad_b):
    """Gradient GEMMs of one chunk: returns dL/dh (m, H); adds into grad_w (V, H) and grad_b (V,).

    grad_w/grad_b are float32 accumulators (None when not needed); the GEMMs run in the weight's dtype,
    or in the autocast dtype of `head.low`.
    """
    if head.low is not None:
        gz_l, h_l = gz.to(head.low.dtype), h.to(head.low.dtype)  # (m, V), (m, H)
        if grad_w is not None:
            grad_w.add_(torch.mm(gz_l.t(), h_l))  # (V, H), accumulated in float32
        if grad_b is not None:
            grad_b.add_(gz.sum(0))
        return (gz_l @ head.low).to(h.dtype)  # (m, H)
    gz_w = gz.to(head.weight.dtype)  # (m, V)
    if grad_w is not None:
        h_w = h.to(head.weight.dtype)
        if grad_w.dtype == gz_w.dtype:
            grad_w.addmm_(gz_w.t(), h_w)  # (V, H)
        else:
            grad_w.add_(gz_w.t() @ h_w)
    if grad_b is not None:
        grad_b.add_(gz.sum(0))
    return (gz_w @ head.weight).to(h.dtype)  # (m, H)


def _f32_zeros(like: torch.Tensor | None, needed: bool) -> torch.Tensor | None:
    return (
        torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        if like is not None and needed
        else None
    )


class _ChunkedLogprobs(torch.autograd.Function):
    """Chunked head + float32 log-softmax gather; backward recomputes each chunk's logits.

    `extra_inv` (K,) / `extra_sel` (M,) bool: also the log-probs of the selected tokens at K more
    temperatures (1/τ'), from the same chunk logits; a non-differentiable (K, M) output, NaN where
    not selected.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, inv_temp, head, chunk, with_entropy, extra_inv, extra_sel):
        m, k = h.shape[0], extra_inv.shape[0]
        ws = Workspace(chunk, m, head, h.device, spare=False)
        logp = torch.empty(m, dtype=torch.float32, device=h.device)
        ent = torch.empty(m if with_entropy else 0, dtype=torch.float32, device=h.device)
        extra = torch.full((k, m if k else 0), math.nan, dtype=torch.float32, device=h.device)
        buf = None
        if k:  # (K, rows, V), as many rows as the fullest chunk selects, at most one block
            most = max(int(extra_sel[s:s + chunk].sum()) for s in range(0, m, chunk))
            rows = min(most, _extra_rows_per_block(k, head.weight.shape[0]))
            buf = buffer("temperatures", max(rows, 1), head.weight.shape[0], h.device, k)
        for s in range(0, m, chunk):
            sl = slice(s, min(s + chunk, m))
            sel = torch.nonzero(extra_sel[sl]).squeeze(1) if k else None  # (k_c,) rows of this chunk
            hook = None
            if sel is not None and sel.numel():
                def hook(x, sl=sl, sel=sel):
                    extra[:, sel + sl.start] = _logp_at_temperatures(x, targets[sl], sel, extra_inv, buf)
            z, _ = chunk_logits(h[sl], head, inv_temp[sl], ws, before_temperature=hook)
            logp[sl], ent_c = _logp_entropy(z, targets[sl], with_entropy, ws)
            if with_entropy:
                ent[sl] = ent_c
        ctx.save_for_backward(h, targets, inv_temp)
        ctx.head, ctx.chunk, ctx.with_entropy = head, chunk, with_entropy
        ctx.mark_non_differentiable(extra)
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent, extra

    @staticmethod
    def backward(ctx, g_logp, g_ent, _g_extra):
        h, targets, inv_temp = ctx.saved_tensors
        head, chunk, m = ctx.head, ctx.chunk, h.shape[0]
        use_ent = ctx.with_entropy and g_ent is not None
        ws = Workspace(chunk, m, head, h.device, spare=use_ent)
        grad_w = _f32_zeros(head.weight, ctx.needs_input_grad[1])
        grad_b = _f32_zeros(head.bias, ctx.needs_input_grad[2])
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        g_logp = torch.zeros_like(inv_temp) if g_logp is None else g_logp.float()
        for s in range(0, m, chunk):
            sl = slice(s, min(s + chunk, m))
            z, t = chunk_logits(h[sl], head, inv_temp[sl], ws)  # the recompute: a 4th head GEMM
            _, ent, e, sums = _softmax_stats(z, targets[sl], use_ent, ws)
            p = e.div_(sums[:, None])  # (m, V)
            g_ent_z = _entropy_grad_z(z, p, sums, ent, g_ent[sl].float()) if use_ent else None
            gz = _grad_from_probs(p, targets[sl], g_logp[sl])
            if g_ent_z is not None:
                gz.add_(g_ent_z)
            gz = _backprop_logits(gz, t, inv_temp[sl], head)
            dh = _accumulate_head_grads(gz, h[sl], head, grad_w, grad_b)
            if grad_h is not None:
                grad_h[sl] = dh
        return (grad_h, _cast(grad_w, head.weight), _cast(grad_b, head.bias), None, None, None, None, None,
                None, None)


class _FusedHeadLoss(torch.autograd.Function):
    """Chunked head whose forward also forms all head gradients from the loss's per-token gradient.

    Valid because loss = Σ_chunks loss_fn(logp_chunk): each chunk's dLoss/dlogp is known as soon as
    its log-probs are (SPEC.md §5), so the chunk's logits are used for the gradient GEMMs right away
    (3 head GEMMs, no recompute). Backward only scales the stored gradients by the upstream scalar.

    `whole`: loss_fn needs every log-prob of the micro-batch at once (a sequence-level loss such as
    GSPO, whose sequences are whole in a micro-batch but may span chunks). A first sweep computes
    all log-probs, loss_fn(logp_all, slice(0, M)) gives every token's upstream gradient, and the
    gradient sweep recomputes each chunk's logits: 4 head GEMMs, 3 when the micro-batch is one chunk.
    `ent_weight` (M,): the loss also gets Σ_t ent_weight_t·H_t (an entropy bonus), whose gradient
    d H/dz = −p ⊙ (log p + H) joins the chunk's logit gradient.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, inv_temp, head, chunk, loss_fn, with_entropy, ent_weight, whole):
        m = h.shape[0]
        need_ent = with_entropy or ent_weight is not None
        ws = Workspace(chunk, m, head, h.device, spare=need_ent)
        grad_w = _f32_zeros(weight, weight.requires_grad)
        grad_b = _f32_zeros(bias, bias is not None and bias.requires_grad)
        grad_h = torch.empty_like(h)
        logp_all = torch.empty(m, dtype=torch.float32, device=h.device)
        ent_all = torch.empty(m if need_ent else 0, dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        two_sweeps = whole and m > chunk
        if two_sweeps:  # every log-prob first; the gradient sweep below recomputes the logits
            for s in range(0, m, chunk):
                sl = slice(s, min(s + chunk, m))
                z, _ = chunk_logits(h[sl], head, inv_temp[sl], ws)
                logp_all[sl], ent_c = _logp_entropy(z, targets[sl], need_ent, ws)
                if need_ent:
                    ent_all[sl] = ent_c
            g_all, total = _loss_grad(loss_fn, logp_all, slice(0, m))
        for s in range(0, m, chunk):
            sl = slice(s, min(s + chunk, m))
            z, t = chunk_logits(h[sl], head, inv_temp[sl], ws)
            logp, ent, e, sums = _softmax_stats(z, targets[sl], need_ent, ws)
            if two_sweeps:
                g_logp = g_all[sl]
            else:  # one chunk holds the whole micro-batch when `whole`
                g_logp, loss_c = _loss_grad(loss_fn, logp, slice(0, m) if whole else sl)
                total += loss_c
            p = e.div_(sums[:, None])  # (m, V)
            g_ent_z = None
            if ent_weight is not None:
                w_ent = ent_weight[sl].float()
                total += (w_ent * ent).sum()
                g_ent_z = _entropy_grad_z(z, p, sums, ent, w_ent)
            gz = _grad_from_probs(p, targets[sl], g_logp)
            if g_ent_z is not None:
                gz.add_(g_ent_z)
            gz = _backprop_logits(gz, t, inv_temp[sl], head)
            grad_h[sl] = _accumulate_head_grads(gz, h[sl], head, grad_w, grad_b)
            logp_all[sl] = logp
            if need_ent:
                ent_all[sl] = ent
        ctx.grads = (grad_h, grad_w, grad_b)  # plain attributes: none of these is an input or output
        ctx.weight_dtype = head.weight.dtype
        ctx.mark_non_differentiable(logp_all, ent_all)
        return total, logp_all, ent_all

    @staticmethod
    def backward(ctx, g_total, _g_logp, _g_ent):
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None

        def scaled(g):  # in place: the stored gradients are dropped above (no (V, H) copy)
            return None if g is None else g.mul_(g_total).to(ctx.weight_dtype)

        return (
            grad_h.mul_(g_total.to(grad_h.dtype)),
            scaled(grad_w),
            scaled(grad_b),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _cast(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if grad is None or like is None else grad.to(like.dtype)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def response_hidden_states(
    model: torch.nn.Module, mb: MicroBatch, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """(M, H) final hidden states of the positions predicting each response token.

    Runs the decoder body only (no head); `dtype` (e.g. torch.bfloat16) runs it under autocast.
    Explicit position_ids keep left-padded rows exact (positions count from each row's first token).
    """
    device = mb.input_ids.device
    body = model.get_decoder()
    feed_routing(model, mb)  # an MoE model with routing hooks (moe.install) routes this micro-batch as logged
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    # Without gradients, a sharded untied embedding is read vocabulary-parallel (never gathered whole).
    emb = None if torch.is_grad_enabled() else vocab_parallel.sharded_embedding(model)
    with autocast:
        out = body(
            input_ids=None if emb is not None else mb.input_ids,
            inputs_embeds=vocab_parallel.embed(emb, mb.input_ids) if emb is not None else None,
            attention_mask=mb.attention_mask,
            position_ids=mb.position_ids,
            use_cache=False,
        )
    hidden = out.last_hidden_state  # (B, L, H)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, mb.src_index)  # (M, H)


def token_logprobs(
    model: torch.nn.Module,
    mb: MicroBatch,
    *,
    chunk_tokens: int = 1024,
    with_entropy: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logp (M,), entropy (M,) | None), float32, in the order of `mb.token_index`.

    Differentiable w.r.t. the model's parameters when grad is enabled (entropy too); works under
    torch.inference_mode for audits. Entropy is that of the temperature-scaled distribution over the
    full vocabulary.
    """
    _check_chunk(chunk_tokens)
    logp, ent, _ = run_engine(model, _token_logprobs, mb, chunk_tokens, with_entropy, dtype, (), None)
    return logp, ent


def token_logprobs_at(
    model: torch.nn.Module,
    mb: MicroBatch,
    temperatures: tuple[float, ...],
    select: torch.Tensor,
    *,
    chunk_tokens: int = 1024,
    with_entropy: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """`token_logprobs` plus the log-probs of the tokens `select` (M,) bool at K other temperatures.

    Returns (logp (M,), entropy (M,) | None, extra (K, M) float32, NaN where not selected). The extra
    log-probs come from the same chunk logits (no further head GEMM, no further body pass): one
    log-sum-exp per temperature over the selected tokens, the same operations as a separate pass
    at that temperature. Not differentiable in `extra`.
    """
    _check_chunk(chunk_tokens)
    return run_engine(model, _token_logprobs, mb, chunk_tokens, with_entropy, dtype, tuple(temperatures), select)


def _token_logprobs(model, mb: MicroBatch, chunk_tokens: int, with_entropy: bool, dtype, temperatures, select):
    h = response_hidden_states(model, mb, dtype=dtype)  # (M, H)
    head = None if torch.is_grad_enabled() else vocab_parallel.sharded_head(model)
    if head is not None:  # without gradients a sharded untied head runs vocabulary-parallel: never gathered
        extra_inv = 1.0 / torch.tensor(temperatures, dtype=torch.float32, device=h.device)
        extra_sel = select.to(h.device) if temperatures else torch.zeros(0, dtype=torch.bool, device=h.device)
        logp, ent, extra = vocab_parallel.head_logprobs(model, head, h, mb.target_ids, 1.0 / mb.temperature.float(),
                                                        with_entropy, dtype, extra_inv, extra_sel)
        return logp, ent, extra
    return run_head(model, _head_logprobs, h, mb, chunk_tokens, with_entropy, dtype, temperatures, select)


def _head_logprobs(model, h: torch.Tensor, mb: MicroBatch, chunk_tokens: int, with_entropy: bool, dtype,
                   temperatures, select):
    head = in_dtype(output_head(model), dtype)
    inv_temp = 1.0 / mb.temperature.float()  # (M,)
    extra_inv = 1.0 / torch.tensor(temperatures, dtype=torch.float32, device=h.device)  # (K,), as a pass at τ'
    extra_sel = select.to(h.device) if temperatures else torch.zeros(0, dtype=torch.bool, device=h.device)
    logp, ent, extra = _ChunkedLogprobs.apply(
        h, head.weight, head.bias, mb.target_ids, inv_temp, head, chunk_tokens, with_entropy, extra_inv, extra_sel
    )
    return logp, (ent if with_entropy else None), extra


def fused_token_loss(
    model: torch.nn.Module,
    mb: MicroBatch,
    loss_fn: LossFn,
    *,
    chunk_tokens: int = 1024,
    with_entropy: bool = False,
    dtype: torch.dtype | None = None,
    entropy_weight: torch.Tensor | None = None,
    whole: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, logp (M,) detached, entropy (M,) detached | None) with the head's gradients formed in forward.

    `loss_fn(logp_chunk, sl)` gets the log-probs of tokens `sl` (a slice of the M tokens) with grad
    enabled and returns that chunk's scalar contribution; the total loss must be the sum over chunks
    (true of every per-token loss with global denominators, SPEC.md §1). `loss.backward()` then puts
    on every parameter the same gradients as `loss_fn(token_logprobs(model, mb)[0], slice(None))`.
    `whole=True`: loss_fn is called once with all M log-probs (sequence-level losses; a 4th head GEMM
    when M > chunk_tokens). `entropy_weight` (M,): adds Σ_t entropy_weight_t·H_t to the loss, with its
    gradient through the chunked head (an entropy bonus is a negative weight); entropy is returned.
    """
    _check_chunk(chunk_tokens)
    return run_engine(model, _fused_token_loss, mb, loss_fn, chunk_tokens, with_entropy, dtype, entropy_weight,
                      whole)


def _fused_token_loss(model, mb: MicroBatch, loss_fn: LossFn, chunk_tokens: int, with_entropy: bool, dtype,
                      entropy_weight=None, whole=False):
    h = response_hidden_states(model, mb, dtype=dtype)  # (M, H)
    return run_head(model, _head_loss, h, mb, loss_fn, chunk_tokens, with_entropy, dtype, entropy_weight, whole)


def _head_loss(model, h: torch.Tensor, mb: MicroBatch, loss_fn: LossFn, chunk_tokens: int, with_entropy: bool,
               dtype, entropy_weight, whole):
    head = in_dtype(output_head(model), dtype)
    inv_temp = 1.0 / mb.temperature.float()  # (M,)
    loss, logp, ent = _FusedHeadLoss.apply(
        h, head.weight, head.bias, mb.target_ids, inv_temp, head, chunk_tokens, loss_fn, with_entropy,
        entropy_weight, whole,
    )
    with_ent = with_entropy or entropy_weight is not None
    return loss, logp.detach(), (ent.detach() if with_ent else None)


def run_engine(model: torch.nn.Module, fn: Callable, *args):
    """`fn(model, *args)`, entered through a sharded model's FSDP-registered method when it has one.

    The engine calls the decoder body and the output head itself, not `model.forward`, so FSDP2's
    root hooks would not gather the root's own parameters (final norm, tied embeddings and head) nor
    reduce their gradients; `distributed.shard_model` registers an entry point that does both (and
    one on an untied head: `run_head`).
    """
    entry = model.__dict__.get(ENGINE_METHOD)  # set on the instance by distributed.shard_model
    if entry is None:
        return fn(model, *args)
    if torch.is_grad_enabled():
        return entry(fn, *args)  # the root's gathered parameters are freed after its backward
    # FSDP2 reuses its gathered-parameter buffers from pass to pass: allocated as inference
    # tensors, they could never serve a training pass again (no_grad is as lean). Without a
    # backward nothing reshards the root, whose gathered parameters would stay registered on the
    # model (an optimizer built afterwards would hold them instead of the shards): reshard here.
    with torch.inference_mode(False), torch.no_grad():
        try:
            return entry(fn, *args)
        finally:
            model.reshard()
            head = model.get_output_embeddings()
            if head is not None and HEAD_METHOD in head.__dict__:  # kept gathered after its forward, for a backward
                head.reshard()


def run_head(model: torch.nn.Module, fn: Callable, h: torch.Tensor, *args):
    """`fn(model, h, *args)`, inside the output head's own FSDP entry when it is sharded on its own.

    That entry gathers the head's weight (and nothing else) and hooks its gradient reduce-scatter
    to the backward of `h`; `fn` reads the gathered weight through `output_head(model)`.
    """
    head = model.get_output_embeddings()
    entry = None if head is None else head.__dict__.get(HEAD_METHOD)
    if entry is None:
        return fn(model, h, *args)
    return entry(lambda _head, *a: fn(model, *a), h, *args)


def _check_chunk(chunk_tokens: int) -> None:
    if chunk_tokens < 1:
        raise ConfigError(f"chunk_tokens: expected an integer ≥ 1, found {chunk_tokens}")
