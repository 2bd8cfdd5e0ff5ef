"""The output head, its logit transforms and the chunk buffers the log-prob engine reuses (SPEC.md §5).

`chunk_logits` gives one chunk's float32 logits as the model's own forward does (bias, multiplier,
soft-cap), divided by each row's temperature; `Workspace` and `reused_buffers` hold the chunk buffers.
Both `logprobs` and `vocab_parallel` build on these, so neither imports the other's internals.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from drpo_cli.base.errors import CheckpointError

# ---------------------------------------------------------------------------------------------
# The output head
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    """logits = softcap(multiplier · (h Wᵀ + b)); softcap(x) = c·tanh(x / c) when c is set."""

    weight: torch.Tensor  # (V, H), the lm_head parameter (the embedding when tied)
    bias: torch.Tensor | None  # (V,)
    multiplier: float = 1.0
    softcap: float | None = None
    low: torch.Tensor | None = None  # (V, H) the fp32 weight in the autocast dtype: the GEMMs run in it


def in_dtype(head: Head, dtype: torch.dtype | None) -> Head:
    """Under autocast (`dtype` bf16/fp16): the head's GEMMs in that dtype too, float32 everything after.

    fp32 master weights get one low-precision copy per engine call (as autocast caches its casts);
    the logits land in the float32 chunk buffer, so log-sum-exp, softmax and entropy stay float32,
    and the weight gradient is accumulated in float32. Weights already stored in low precision keep
    their own path.
    """
    if dtype is None or head.weight.dtype != torch.float32:
        return head
    return replace(head, low=head.weight.detach().to(dtype))


# model_type prefixes whose `logits_scaling` divides (Granite, MiniCPM3) or multiplies (HyperCLOVA X).
_DIVIDING = ("granite", "minicpm3")
_MULTIPLYING = ("hyperclovax",)
_UNSUPPORTED_KEYS = ("lm_head_multiplier", "output_multiplier_scale", "mup_width_scaling_factor")


def output_head(model: torch.nn.Module) -> Head:
    """The model's output projection and config-declared logit transforms, or CheckpointError."""
    lm_head = model.get_output_embeddings()
    if not isinstance(lm_head, torch.nn.Linear):
        raise CheckpointError(
            f"{type(model).__name__}: expected a torch.nn.Linear output head, found {type(lm_head).__name__}"
        )
    cfg = model.config.get_text_config()
    model_type = str(getattr(cfg, "model_type", ""))
    multiplier, softcap = 1.0, None
    for key in ("final_logit_softcapping", "logits_soft_cap"):
        if getattr(cfg, key, None) is not None:
            softcap = float(getattr(cfg, key))
    if getattr(cfg, "logit_scale", None) is not None:
        if not model_type.startswith("cohere"):
            raise _unsupported(model_type, "logit_scale", cfg.logit_scale)
        multiplier *= float(cfg.logit_scale)
    scaling = getattr(cfg, "logits_scaling", None)
    if scaling is not None and float(scaling) != 1.0:
        if model_type.startswith(_DIVIDING):
            multiplier /= float(scaling)
        elif model_type.startswith(_MULTIPLYING):
            multiplier *= float(scaling)
        else:
            raise _unsupported(model_type, "logits_scaling", scaling)
    for key in _UNSUPPORTED_KEYS:
        value = getattr(cfg, key, None)
        if value is not None and float(value) != 1.0:
            raise _unsupported(model_type, key, value)
    return Head(lm_head.weight, lm_head.bias, multiplier, softcap)


def _unsupported(model_type: str, key: str, value: object) -> CheckpointError:
    return CheckpointError(
        f"config.json: key {key}={value} (model_type {model_type!r}) rescales the output logits in a way "
        "drpo does not reproduce; expected it absent or 1"
    )


_POOLS = threading.local()  # .buffers: {(slot, device, V): tensor} inside `reused_buffers()`, per thread


@contextlib.contextmanager
def reused_buffers():
    """Inside, consecutive engine calls share their (chunk, V) float32 buffers instead of allocating them.

    A pass over many micro-batches (an audit, a step's micro-batches, the closing audit) would
    otherwise map and fault in the same hundreds of megabytes once per call: a page fault per
    4 KiB, about as long as the log-sum-exp itself on CPU. The buffers are freed on leaving the
    outermost block, so they do not outlive the pass (an optimizer step allocates after it). Per
    thread; nested blocks share the outer one's buffers.
    """
    outer = getattr(_POOLS, "buffers", None)
    if outer is None:
        _POOLS.buffers = {}
    try:
        yield
    finally:
        if outer is None:
            _POOLS.buffers = None


def buffer(slot: str, rows: int, cols: int, device: torch.device, *lead: int, capacity: int = 0) -> torch.Tensor:
    """An uninitialised float32 (*lead, rows, cols) tensor; inside `reused_buffers()` the slot's.

    A pooled slot is made with max(rows, capacity) rows, so that later calls with more rows (up
    to the chunk size) find it large enough; pages never written are never resident.
    """
    pool = getattr(_POOLS, "buffers", None)
    if pool is None:
        return torch.empty(*lead, rows, cols, dtype=torch.float32, device=device)
    key = (slot, str(device), cols, lead)
    have = pool.get(key)
    if have is None or have.shape[-2] < rows:
        pool[key] = None  # the old buffer goes before the larger one is made
        have = torch.empty(*lead, max(rows, capacity), cols, dtype=torch.float32, device=device)
        pool[key] = have
    return have[..., :rows, :]


STATS_BLOCK = 1 << 20  # elements (rows × V) of a forward-only statistics block: 4 MB of float32, cache-resident


class Workspace:
    """float32 buffers: (chunk, V) logits, a (chunk, V) spare where a gradient needs p and z − max
    together (entropy), and two small row blocks for the forward-only statistics.

    Every chunk of a call writes its logits into the same memory, and inside `reused_buffers()`
    so do later calls.
    """

    def __init__(self, chunk: int, m: int, head: Head, device: torch.device, *, spare: bool):
        rows, vocab = min(chunk, max(m, 1)), head.weight.shape[0]
        self.logits = buffer("logits", rows, vocab, device, capacity=chunk)
        self.spare = buffer("spare", rows, vocab, device, capacity=chunk) if spare else None
        block = min(rows, max(1, STATS_BLOCK // max(vocab, 1)))
        self.block = buffer("block", block, vocab, device)  # z − max of a few rows
        self.block_e = buffer("block_e", block, vocab, device)  # exp(z − max) of the same rows


def chunk_logits(h: torch.Tensor, head: Head, inv_temp: torch.Tensor, ws: Workspace, before_temperature=None):
    """Temperature-scaled float32 logits z (m, V) of one chunk, and tanh(x / c) when soft-capped.

    `before_temperature(x)`, when given, sees the logits before the division by τ (the extra
    temperatures of `token_logprobs` are read from them).
    """
    m = h.shape[0]
    # The head runs in the weight's own dtype even when the caller holds an autocast context.
    with torch.autocast(h.device.type, enabled=False):
        if head.low is not None:  # fp32 weights under autocast: GEMM in the low dtype, then float32
            z = ws.logits[:m].copy_(torch.mm(h.to(head.low.dtype), head.low.t()))  # (m, V)
            if head.bias is not None:
                z.add_(head.bias)
        elif head.weight.dtype == torch.float32:
            z = torch.mm(h.float(), head.weight.t(), out=ws.logits[:m])  # (m, V)
            if head.bias is not None:
                z.add_(head.bias)
        else:  # low-precision weights: GEMM in their dtype, everything after it in float32
            z = F.linear(h.to(head.weight.dtype), head.weight, head.bias).float()  # (m, V)
    if head.multiplier != 1.0:
        z.mul_(head.multiplier)
    t = None
    if head.softcap is not None:
        t = torch.tanh(z / head.softcap)  # (m, V), kept for d softcap / dx = 1 − t²
        z = torch.mul(t, head.softcap, out=z)
    if before_temperature is not None:
        before_temperature(z)
    return z.mul_(inv_temp[:, None]), t
