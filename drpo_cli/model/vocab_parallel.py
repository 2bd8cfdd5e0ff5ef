"""Vocabulary-parallel input embedding and output head for passes without gradients, on a model whose
untied vocabulary matrices FSDP2 shards on their own (distributed.shard_model): no rank ever gathers
a vocabulary matrix.

FSDP2 shards a (V, H) matrix by rows: rank r holds rows [r·c, min((r + 1)·c, V)), c = ⌈V / N⌉ (torch.chunk).

- Embedding: the token ids of every rank are gathered (a few KB); each rank looks up the ids that fall
  in its rows, zeros elsewhere; one all-reduce (a sum in which each row has exactly one nonzero
  addend: exact) gives every rank every row, and each keeps its own.
- Head: the response hidden states of every rank are gathered ((Σ tokens) × H, the size of one layer's
  activations); each rank forms the logits of every token over its rows, chunk by chunk as
  head.chunk_logits does (bias, multiplier, soft-cap, temperature), and reduces them to four
  numbers per token: the row max m, S = Σ exp(z − m), D = Σ exp(z − m)·(z − m) and the target's
  logit (−inf where the target is another rank's). The statistics of all ranks are gathered and
  merged exactly: M = max m_j, S = Σ_j S_j·e^(m_j − M), D = Σ_j e^(m_j − M)·(D_j + (m_j − M)·S_j);
  log π(y) = z_y − (M + log S), H = log S − D / S. The extra temperatures of token_logprobs_at merge
  the same way (m, S and the target logit per temperature). Only the summation order differs from a
  pass over the gathered matrix: float32 rounding.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.distributed as dist

from drpo_cli.model import distributed
from drpo_cli.model.distributed import HEAD_METHOD

STAT_ROWS = 1 << 22  # elements (tokens × local vocabulary) of one chunk's logits: 16 MB of float32


def _local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's rows of a dim-0-sharded parameter, the index of its first row)."""
    full = param.shape[0]
    per_rank = math.ceil(full / dist.get_world_size())
    return param.to_local(), min(dist.get_rank() * per_rank, full)


def _gather_padded(t: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Every rank's `t` (rows along dim 0, possibly a different number per rank), stacked in rank
    order after padding each to the longest; and the row counts."""
    device = distributed._comm_device()
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    counts = [int(c) for c in counts]
    most = max(counts)
    padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = t.to(device)
    out = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(out, padded)
    return torch.cat(out), counts


def sharded_embedding(model: torch.nn.Module) -> torch.nn.Embedding | None:
    """The input embedding when it is a plain nn.Embedding that FSDP2 shards on its own, else None."""
    emb = model.get_input_embeddings()
    plain = (isinstance(emb, torch.nn.Embedding) and type(emb).forward is torch.nn.Embedding.forward
             and emb.max_norm is None)  # (FSDP2 subclasses the module; a scaled embedding overrides forward)
    if not plain or not distributed.is_distributed():
        return None
    head = model.get_output_embeddings()
    untied = head is not None and HEAD_METHOD in head.__dict__
    return emb if untied and hasattr(emb.weight, "to_local") else None


def embed(emb: torch.nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L, H) embeddings of this rank's `input_ids` (B, L), from every rank's rows of the matrix."""
    local, first = _local_rows(emb.weight)
    ids, counts = _gather_padded(input_ids.reshape(-1))  # (N · most,)
    rows = ids - first
    mine = (rows >= 0) & (rows < local.shape[0])
    out = torch.zeros(ids.shape[0], local.shape[1], dtype=local.dtype, device=local.device)
    out[mine] = local[rows[mine]].to(out.device)
    dist.all_reduce(out)
    most, rank = max(counts), dist.get_rank()
    return out[rank * most: rank * most + counts[rank]].reshape(*input_ids.shape, -1).to(input_ids.device)


def sharded_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The output head when FSDP2 shards it on its own (untied), else None."""
    head = model.get_output_embeddings()
    if head is None or HEAD_METHOD not in head.__dict__ or not hasattr(head.weight, "to_local"):
        return None
    return head


def head_logprobs(model, head_module, h: torch.Tensor, targets: torch.Tensor, inv_temp: torch.Tensor,
                  with_entropy: bool, dtype, extra_inv: torch.Tensor, extra_sel: torch.Tensor):
    """(logp (M,), entropy (M,) | None, extra (K, M), NaN where not selected) of this rank's M tokens,
    as logprobs' chunked forward gives them, without gathering the head's weight."""
    from drpo_cli.model.head import Workspace, chunk_logits, in_dtype, output_head

    weight, first = _local_rows(head_module.weight)
    bias = _local_rows(head_module.bias)[0] if head_module.bias is not None else None
    head = in_dtype(replace(output_head(model), weight=weight, bias=bias), dtype)
    m, k, device = h.shape[0], extra_inv.shape[0], h.device
    sel_f = extra_sel.to(torch.float32) if k else torch.zeros(m, device=device)
    packed = torch.cat([h.float(), targets[:, None].float(), inv_temp[:, None], sel_f[:, None]], dim=1)
    every, counts = _gather_padded(packed)  # (N · most, H + 3)
    hs, tgt = every[:, :-3].to(h.dtype), every[:, -3].long()
    inv_all, sel_all = every[:, -2], every[:, -1] > 0
    width = 3 + (1 if with_entropy else 0)
    stats = torch.empty(every.shape[0], width + 3 * k, dtype=torch.float32, device=device)
    vocab = weight.shape[0]
    local_t = tgt - first
    has_t = (local_t >= 0) & (local_t < vocab)
    chunk = max(1, STAT_ROWS // max(vocab, 1))
    ws = Workspace(chunk, every.shape[0], head, device, spare=False)
    for s in range(0, every.shape[0], chunk):
        sl = slice(s, min(s + chunk, every.shape[0]))
        x_hold = {}
        z, _ = chunk_logits(hs[sl], head, inv_all[sl], ws,
                             before_temperature=(lambda x, hold=x_hold: hold.setdefault("x", x.clone())) if k else None)
        _fill(stats[sl, :width], z, local_t[sl], has_t[sl], with_entropy)
        if k:
            x = x_hold["x"]
            for j in range(k):
                zj = x * extra_inv[j]
                _fill(stats[sl, width + 3 * j: width + 3 * j + 3], zj, local_t[sl], has_t[sl], False)
    gathered = [torch.empty_like(stats) for _ in counts]
    dist.all_gather(gathered, stats.contiguous())
    most, rank = max(counts), dist.get_rank()
    mine = torch.stack([g[rank * most: rank * most + m] for g in gathered]).double()  # (N, M, width + 3K)
    logp, ent = _merge(mine[..., :width], with_entropy)
    extra = torch.full((k, m if k else 0), math.nan, dtype=torch.float32, device=device)
    for j in range(k):
        lp_j, _ = _merge(mine[..., width + 3 * j: width + 3 * j + 3], False)
        extra[j] = torch.where(sel_all[rank * most: rank * most + m], lp_j, torch.full_like(lp_j, math.nan))
    return logp, ent, extra


def _fill(out: torch.Tensor, z: torch.Tensor, local_t: torch.Tensor, has_t: torch.Tensor, with_entropy: bool) -> None:
    """out[:, 0] row max, [:, 1] Σ exp(z − max), [:, 2] the target logit (−inf: not in these rows),
    [:, 3] Σ exp(z − max)·(z − max) with entropy; z (n, V_local) is only read."""
    if z.shape[1] == 0:  # a rank without rows (V < N): contributes nothing
        out[:, 0], out[:, 1], out[:, 2] = -math.inf, 0.0, -math.inf
        if with_entropy:
            out[:, 3] = 0.0
        return
    mx = z.amax(dim=1, keepdim=True)  # (n, 1)
    shifted = z - mx
    e = shifted.exp()
    out[:, 0] = mx.squeeze(1)
    out[:, 1] = e.sum(dim=1)
    tl = z.gather(1, local_t.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
    out[:, 2] = torch.where(has_t, tl, torch.full_like(tl, -math.inf))
    if with_entropy:
        out[:, 3] = (e * shifted).sum(dim=1)


def _merge(parts: torch.Tensor, with_entropy: bool):
    """Exact merge over ranks (dim 0) of (max, S, target logit[, D]): (log p (M,), entropy (M,) | None)."""
    m_j, s_j, t_j = parts[..., 0], parts[..., 1], parts[..., 2]
    big = m_j.amax(dim=0)  # (M,)
    scale = torch.where(s_j > 0, torch.exp(m_j - big), torch.zeros_like(s_j))
    total = (s_j * scale).sum(dim=0)
    log_s = total.log()
    logp = (t_j.amax(dim=0) - (big + log_s)).float()
    if not with_entropy:
        return logp, None
    shift = torch.where(s_j > 0, m_j - big, torch.zeros_like(m_j))
    d = (scale * (parts[..., 3] + shift * s_j)).sum(dim=0)
    return logp, (log_s - d / total).float()
