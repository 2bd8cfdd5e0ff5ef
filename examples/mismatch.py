"""Sampler copies of a policy that compute in lower precision, as FP8 / BF16 inference engines do.

An RL stack whose sampler (vLLM, SGLang) runs the policy in BF16 or FP8 while the trainer runs it
in fp32 logs behavior log-probs μ of a numerically different policy: even at lag 0, π_θ ≠ μ. Here
that sampler is a deep copy of the fp32 model whose `nn.Linear` weights are rounded through a
low-precision format with a scale (per tensor or per output channel, as FP8 checkpoints store
them) and, for W8A8 levels, whose Linear inputs are fake-quantized the same way per token with a
dynamic scale (vLLM's dynamic per-token FP8 activations). The embedding / tied output head is
left in fp32, as FP8 engines leave them in high precision. The copy is what samples and what
logs μ; the trainer never sees it.

Levels (`LEVELS`), from none to far beyond real FP8 engines (sizes measured by
`staleness_experiment.py` with `drpo inspect` on lag-0 rollouts, recorded in its results):

    none          the sampler is the trainer's fp32 model
    bf16          weights and Linear inputs rounded to bfloat16
    fp8-channel   weights float8_e4m3fn, one scale per output channel
    fp8-tensor    weights float8_e4m3fn, one scale per tensor
    fp8-w8a8      fp8-tensor weights + float8_e4m3fn Linear inputs, one dynamic scale per token
    e5m2-w8a8     the same in float8_e5m2 (2 mantissa bits instead of 3)
    int4-w4a8     weights int4 (symmetric, one scale per output channel, as W4A16 kernels use) +
                  fp8-w8a8's activations
    fp8-w8a8-x10  fp8-w8a8 with its rounding error (weights and inputs) multiplied by 10: a synthetic
                  level far beyond any real engine (k3 about 100× fp8-w8a8's), where losses can break
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    """How the sampler copy rounds: a weight format and scale granularity, and the activation format."""

    weights: str | None  # "bf16", "e4m3", "e5m2", "int4" or None (fp32)
    scale: str = "tensor"  # "tensor" or "channel" (scaled formats only)
    acts: str | None = None  # Linear-input format: "bf16", "e4m3", "e5m2" or None
    gain: float = 1.0  # rounding error × gain (x + gain · (round(x) − x)): a synthetic, larger mismatch


LEVELS: dict[str, Precision | None] = {
    "none": None,
    "bf16": Precision("bf16", acts="bf16"),
    "fp8-channel": Precision("e4m3", scale="channel"),
    "fp8-tensor": Precision("e4m3", scale="tensor"),
    "fp8-w8a8": Precision("e4m3", scale="tensor", acts="e4m3"),
    "e5m2-w8a8": Precision("e5m2", scale="tensor", acts="e5m2"),
    "int4-w4a8": Precision("int4", scale="channel", acts="e4m3"),
    "fp8-w8a8-x10": Precision("e4m3", scale="tensor", acts="e4m3", gain=10.0),
}
_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def describe(p: Precision) -> str:
    """One line, e.g. "weights e4m3 (per tensor), Linear inputs e4m3 (per token)"."""
    names = {"bf16": "bf16", "e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2", "int4": "int4"}
    w = "weights fp32" if p.weights is None else f"weights {names[p.weights]}"
    if p.weights not in (None, "bf16"):
        w += f" (per {p.scale})"
    if p.acts is not None:
        w += f", Linear inputs {names[p.acts]}" + (" (per token)" if p.acts != "bf16" else "")
    return w if p.gain == 1.0 else w + f", rounding error × {p.gain:g}"


def round_through(x: torch.Tensor, fmt: str, dim: int | None = None) -> torch.Tensor:
    """x rounded through `fmt` ("bf16", "e4m3", "e5m2", "int4") and back to x's dtype.

    Scaled formats (fp8, int4) scale first so the largest magnitude (over the whole tensor, or over `dim` for
    per-channel / per-token scales) maps to the format's largest finite value, as FP8 kernels do.
    """
    if fmt == "bf16":
        return x.to(torch.bfloat16).to(x.dtype)
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    if fmt == "int4":  # symmetric: integers -7..7 times the scale
        scale = amax.clamp(min=1e-12) / 7
        return torch.round(x / scale).clamp(-7, 7) * scale
    dtype = _FP8[fmt]
    scale = amax.clamp(min=1e-12) / torch.finfo(dtype).max
    return ((x / scale).to(dtype).to(x.dtype)) * scale


def _with_gain(x: torch.Tensor, rounded: torch.Tensor, gain: float) -> torch.Tensor:
    return rounded if gain == 1.0 else x + gain * (rounded - x)


def _quantize_input(fmt: str, gain: float):
    def hook(_module, args):
        (x, *rest) = args
        return (_with_gain(x, round_through(x, fmt, dim=None if fmt == "bf16" else -1), gain), *rest)

    return hook


@torch.no_grad()
def sampler_copy(model: torch.nn.Module, level: str) -> torch.nn.Module:
    """The sampler for mismatch `level`: `model` itself for "none", else a rounded deep copy."""
    precision = LEVELS[level]
    if precision is None:
        return model
    sampler = copy.deepcopy(model).eval()
    output_head = sampler.get_output_embeddings() if hasattr(sampler, "get_output_embeddings") else None
    for module in sampler.modules():
        if not isinstance(module, torch.nn.Linear) or module is output_head:
            continue
        if precision.weights is not None:
            dim = 1 if precision.scale == "channel" else None  # weight (out, in): one scale per output row
            w = module.weight
            w.copy_(_with_gain(w, round_through(w, precision.weights, dim), precision.gain))
        if precision.acts is not None:
            module.register_forward_pre_hook(_quantize_input(precision.acts, precision.gain))
    return sampler
