"""What the HTML pages draw, kept in the JSON reports: the μ-π histogram and the worst sequences' tokens.

- `MuPiHistogram`: every masked token's (μ, π) in a BINS × BINS grid over [0, 1]², one grid per
  advantage sign (A > 0, A < 0; A = 0 carries no gradient and is left out). Mergeable, exact over ranks.
- `worst_tokens(rows, row_ids, logp)`: per worst row, its response token ids with π, μ, Δ = π − μ and
  r = π/μ per token (what the page decodes with the checkpoint's tokenizer and colors); null for an
  untrained token.
"""

from __future__ import annotations

import math

import numpy as np

BINS = 40
MAX_TOKENS_SHOWN = 400  # per worst sequence


class MuPiHistogram:
    def __init__(self, bins: int = BINS):
        self.bins = bins
        self.counts = np.zeros((2, bins, bins), dtype=np.int64)  # (sign: A>0, A<0; μ bin; π bin)

    def update(self, logp: np.ndarray, behavior_logp: np.ndarray, advantages: np.ndarray, mask: np.ndarray) -> None:
        """Add tokens (each (M,)): only masked ones with a non-zero advantage and a finite π (a diverged
        model's NaN log-probs have no bin; the reports count them as non-finite elsewhere)."""
        keep = mask & (advantages != 0) & np.isfinite(logp)
        mu = np.exp(behavior_logp[keep].astype(np.float64))
        pi = np.exp(logp[keep].astype(np.float64))
        i = np.minimum((mu * self.bins).astype(np.int64), self.bins - 1)
        j = np.minimum((pi * self.bins).astype(np.int64), self.bins - 1)
        sign = (advantages[keep] < 0).astype(np.int64)
        np.add.at(self.counts, (sign, i, j), 1)

    def all_reduce_(self) -> MuPiHistogram:
        from drpo_cli.model import distributed

        if distributed.is_distributed():
            import torch

            self.counts = distributed.all_reduce_sum(torch.from_numpy(self.counts)).numpy()
        return self

    def to_dict(self) -> dict:
        return {"bins": self.bins, "positive": self.counts[0].tolist(), "negative": self.counts[1].tolist()}


def worst_tokens(rows, row_ids, logp: np.ndarray) -> list[dict]:
    """[{sample_id, token_ids, delta, pi, mu, ratio, mask, advantage}] for rows `row_ids`; logp (T,) over all
    tokens. The per-token trace: π, μ, Δ = π − μ and r = π/μ (log r clamped to ±20), null where loss_mask is 0."""
    out = []
    for i in row_ids:
        lo, hi = int(rows.response_offsets[i]), int(rows.response_offsets[i + 1])
        hi = min(hi, lo + MAX_TOKENS_SHOWN)
        trained = rows.loss_mask[lo:hi]
        log_pi, log_mu = logp[lo:hi].astype(np.float64), rows.behavior_logprobs[lo:hi].astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            trace = {"delta": np.exp(log_pi) - np.exp(log_mu), "pi": np.exp(log_pi), "mu": np.exp(log_mu),
                     "ratio": np.exp(np.clip(log_pi - log_mu, -20.0, 20.0))}
        # Values are a trained token's: an untrained one (loss_mask 0) may log any log-prob, even NaN.
        shown = {k: [_shown(x, m, 5 if k == "delta" else None) for x, m in zip(v, trained)] for k, v in trace.items()}
        adv = rows.advantages[lo:hi][trained]  # the first trained token's (per-token advantages differ)
        out.append({"sample_id": rows.sample_ids[i], "token_ids": rows.response_ids[lo:hi].tolist(), **shown,
                    "mask": trained.tolist(), "advantage": float(adv[0]) if adv.size else None})
    return out


def _shown(x: float, trained: bool, digits: int | None) -> float | None:
    """A trained token's finite value (rounded to `digits` decimals, else 6 significant digits), else None."""
    if not trained or not math.isfinite(x):
        return None
    return round(float(x), digits) if digits is not None else float(f"{x:.6g}")


SCHEMA_HISTOGRAM: dict = {
    "type": "object",
    "description": "Token counts over (μ, π) ∈ [0, 1]², bins × bins, [μ bin][π bin], per advantage sign.",
    "required": ["bins", "positive", "negative"],
    "additionalProperties": False,
    "properties": {
        "bins": {"type": "integer", "minimum": 1},
        "positive": {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}}},
        "negative": {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}}},
    },
}
SCHEMA_WORST_TOKENS: dict = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["sample_id", "token_ids", "delta", "pi", "mu", "ratio", "mask", "advantage"],
        "additionalProperties": False,
        "properties": {
            "sample_id": {"type": "string"},
            "token_ids": {"type": "array", "items": {"type": "integer"}},
            "delta": {"type": "array", "items": {"type": ["number", "null"]}},
            "pi": {"type": "array", "items": {"type": ["number", "null"]}},
            "mu": {"type": "array", "items": {"type": ["number", "null"]}},
            "ratio": {"type": "array", "items": {"type": ["number", "null"]}},
            "mask": {"type": "array", "items": {"type": "boolean"}},
            "advantage": {"type": ["number", "null"]},
        },
    },
}
