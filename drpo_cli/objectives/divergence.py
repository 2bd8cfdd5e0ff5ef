"""Per-token divergence between the trained policy π and the anchor μ (SPEC.md §2), and a mergeable
accumulator of their statistics.

The elementwise functions (log_ratio, prob_delta, binary_kl, k1..k3) live in elementwise.py,
shared with the loss modules, and are re-exported here; divergence imports the losses, never the
other way.

`Diagnostics` accumulates only sums, counts, maxima and fixed-bin histograms, so any number of
tokens can be audited in constant memory, and two accumulators merge (micro-batches, ranks,
resumed runs): counts, histograms and maxima exactly, sums of values to float64 rounding. Metric
names are documented in docs/losses.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from drpo_cli.base.errors import ConfigError
from drpo_cli.base.value_table import ValueTable
from drpo_cli.objectives.catalog import LOSS_NAMES, LOSSES, resolve_hparams
from drpo_cli.objectives.corrections import (
    behavior_weight,
    reference_kl,
    rejection_mask,
    veto_mask,
    weight_mean,
    weight_sum_parts,
)
from drpo_cli.objectives.elementwise import (  # noqa: F401  (re-exported: the diagnostics API of docs/losses.md)
    LOGR_CLAMP,
    binary_kl,
    binary_tv,
    js_estimate,
    k1,
    k2,
    k3,
    kl_reverse,
    log_ratio,
    prob_delta,
    ratio,
    reverse_k3,
)
from drpo_cli.objectives.filters import FILTER_METRICS, dropped_positive, filter_counts
from drpo_cli.objectives.losses import effect_counts, gradient_weight


def token_diagnostics(
    logp: Tensor, behavior_logp: Tensor, advantages: Tensor, *, tr_delta: float = 0.2
) -> dict[str, Tensor]:
    """Detached per-token diagnostics of SPEC.md §2 (same shape as `logp`), e.g. for --per-token.

    Keys: logr, ratio, delta (Δ), binary_kl, k1, k2, k3, kl_reverse (r·log r), reverse_k3 (1/r − 1 + log r),
    js (NeMo-RL's Jensen-Shannon estimate), outside (|Δ| > tr_delta), harmful (outside in the advantage's
    direction: A>0 ∧ Δ>δ or A<0 ∧ Δ<−δ).
    """
    with torch.no_grad():
        logp, mu_logp, adv = logp.detach(), behavior_logp.detach(), advantages.detach()
        logr = log_ratio(logp, mu_logp)
        r = torch.exp(logr)
        r_minus_1 = torch.expm1(logr)  # exact near r = 1, shared by k3 and its reverse
        delta = prob_delta(logp, mu_logp)
        return {
            "logr": logr,
            "ratio": r,
            "delta": delta,
            "binary_kl": binary_kl(logp, mu_logp),
            "k1": -logr,
            "k2": 0.5 * logr.square(),
            "k3": r_minus_1 - logr,
            "kl_reverse": r * logr,  # elementwise.kl_reverse
            "reverse_k3": logr - r_minus_1 / r,  # elementwise.reverse_k3: 1/r − 1 = −(r − 1)/r
            "js": js_estimate(logp, mu_logp),
            "outside": delta.abs() > tr_delta,
            "harmful": ((adv > 0) & (delta > tr_delta)) | ((adv < 0) & (delta < -tr_delta)),
        }


def sequence_scores(
    values: Tensor, seq_index: Tensor, num_seqs: int, *, mask: Tensor | None = None, reduce: str = "sum"
) -> Tensor:
    """Per-sequence reduction of per-token `values` → (num_seqs,), for "worst sequences" tables.

    `seq_index` maps each token to its sequence in [0, num_seqs). reduce = "sum" (e.g. harmful
    count), "amax" (e.g. max |Δ|) or "mean". Masked tokens are left out; a sequence without
    tokens scores 0. Combine across micro-batches by adding ("sum") or taking the max ("amax").
    """
    if reduce not in ("sum", "amax", "mean"):
        raise ValueError(f"reduce must be 'sum', 'amax' or 'mean', got {reduce!r}")
    with torch.no_grad():
        values, seq_index = values.detach().reshape(-1).double(), seq_index.reshape(-1).long()
        if mask is not None:
            keep = mask.reshape(-1).bool()
            values, seq_index = values[keep], seq_index[keep]
        counts = torch.zeros(num_seqs, dtype=torch.float64, device=values.device)
        counts.index_add_(0, seq_index, torch.ones_like(values))
        if reduce == "amax":
            out = torch.full((num_seqs,), -math.inf, dtype=torch.float64, device=values.device)
            out.scatter_reduce_(0, seq_index, values, reduce="amax")
            return torch.where(counts > 0, out, torch.zeros_like(out))
        out = torch.zeros(num_seqs, dtype=torch.float64, device=values.device).index_add_(
            0, seq_index, values
        )
        return out / counts.clamp(min=1.0) if reduce == "mean" else out


def _sum_by(features: Tensor, inverse: Tensor) -> Tensor:
    """(K, F) sums of (n, F) features over the groups `inverse` (n,) in [0, K)."""
    k = int(inverse.max()) + 1 if inverse.numel() else 0
    return torch.zeros(k, features.shape[1], dtype=features.dtype, device=features.device).index_add_(0, inverse,
                                                                                                     features)


# ---- fixed-bin histograms ------------------------------------------------------------------------


def _log_edges(lo_exp: int, hi_exp: float, per_decade: int = 100) -> Tensor:
    """Edges 10^(k/per_decade) from 10^lo_exp to 10^hi_exp: bins of constant ratio 10^(1/per_decade)."""
    k = torch.arange(lo_exp * per_decade, round(hi_exp * per_decade) + 1, dtype=torch.float64)
    return torch.pow(10.0, k / per_decade)


def _signed_log_edges(lo_exp: int, hi_exp: float, per_decade: int = 100) -> Tensor:
    mags = _log_edges(lo_exp, hi_exp, per_decade)
    return torch.cat([-mags.flip(0), mags])


# Bins are (−inf, e0), [e0, e1), ..., [e_last, +inf). 100 bins per decade: a bin spans a factor
# 1.023, so a quantile (bin midpoint, clamped to the observed min/max) is within ±1.2% relative.
ABS_DELTA_EDGES = _log_edges(-8, 0)  # |Δ| in [1e-8, 1]; below 1e-8 one bin (±1e-8 absolute)
LOGR_EDGES = _signed_log_edges(-6, 1.31)  # log r in ±[1e-6, 20.4]; |log r| < 1e-6 one bin
WEIGHT_DEV_EDGES = _signed_log_edges(-6, 6)  # w − 1 in ±[1e-6, 1e6]: resolves w close to 1 too
WEIGHT_COARSE_EDGES = (0.0, 0.5, 1.0, 1.5, 2.0)  # reported bins: <0, [0,0.5), ..., >=2

QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "p999": 0.999}
LOW_QUANTILES = {"p1": 0.01, "p10": 0.1, "p50": 0.5, "p90": 0.9, "p99": 0.99}


def _bin_counts(x: Tensor, edges: Tensor) -> Tensor:
    idx = torch.bucketize(x, edges.to(x.device, x.dtype), right=True)  # (N,) in [0, E]
    return torch.bincount(idx, minlength=edges.numel() + 1).to(torch.float64)


def histogram_quantile(counts: Tensor, edges: Tensor, q: float, vmin: float, vmax: float) -> float | None:
    """The q-quantile (k-th smallest value, k = ceil(q·n)) read from fixed-bin counts.

    Returns the bin's midpoint (the observed min / max for the two open-ended bins), clamped to
    [vmin, vmax]; exact up to the bin width. None when there are no values.
    """
    total = float(counts.sum())
    if total <= 0:
        return None
    k = max(1.0, math.ceil(q * total))
    b = int(torch.searchsorted(counts.cumsum(0), torch.tensor(k, dtype=counts.dtype)))
    if b == 0:
        value = vmin
    elif b == edges.numel():
        value = vmax
    else:
        value = 0.5 * float(edges[b - 1] + edges[b])
    return min(max(value, vmin), vmax)


# ---- the mergeable accumulator ---------------------------------------------------------------------

MU_EDGES = (0.01, 0.1, 0.5)
MU_LABELS = ("<=0.01", "<=0.1", "<=0.5", ">0.5")
POSITION_EDGES = (16, 64, 256, 1024)
POSITION_LABELS = ("[0,16)", "[16,64)", "[64,256)", "[256,1024)", "[1024,inf)", "unknown")
_BREAKDOWN_FEATURES = ("tokens", "outside", "harmful", "delta_abs", "k3", "logr")
# Losses whose would-be effect is a zeroed gradient (w = 0) and the metric that counts it (the registry's).
_ZEROING_METRICS = {name: spec.zeroing for name, spec in LOSSES.items() if spec.zeroing is not None}
_WEIGHTED_LOSSES = tuple(name for name, spec in LOSSES.items() if spec.weight_stats)  # weight distribution reported
_SEQ_STATE = ("n", "n_zero", "n_seq", "n_seq_zero")
# Fractions of a selection over all the tokens of one update (a whole optimizer step in train, one
# audited batch in inspect), not token by token: merging accumulators adds their counts, so they equal
# one accumulator's only when the updates were the same batches.
PER_UPDATE_METRICS = (*(m for spec in LOSSES.values() if spec.level == "batch" for m in spec.effect_metrics),
                      "m2po/masked_frac")
# A "catastrophic" token has r < CATASTROPHIC_RHO (raw log r < log of it): verl's former rollout_token_veto_threshold
# and slime's rs_veto_threshold examples; `--is-veto C` sets it to C.
CATASTROPHIC_RHO = 1e-4
# Per-row sums a sequence-level metric needs (merged by row key, folded once a row is whole): trained tokens,
# Σ log r, Σ log π, Σ log μ, catastrophic tokens.
_ROW_FEATURES = ("n", "logr", "logp", "logmu", "catastrophic")
# The relative error of a float64 sum of n terms is about log2(n)·2⁻⁵³ per torch sum plus 2⁻⁵³ per fold (one per
# micro-batch or rank): under 1e-11 for 1e5 folds. A variance from such sums, n·Σx² − (Σx)², below 1e-9 of n·Σx²
# (a coefficient of variation under 3e-5) is noise.
VARIANCE_NOISE = 1e-9
# The shares of what each mask drops that had A > 0 (NeMo-RL masked_correct_pct, prime-rl masked_advantage_positive).
DROPPED_POS = "dropped_pos_adv_frac"


class Diagnostics:
    """Mergeable statistics of SPEC.md §2 over masked response tokens; constant memory.

    `losses` maps loss name → hyper-parameters (missing ones take DEFAULTS; None = every loss at
    its defaults); each gets its would-be metrics (`ppo_clip/clip_frac`, `weight/drpo_*`, ...).
    `drpo_deltas` adds what-if DRPO settings, reported in summary()["what_if"]["drpo"]. Lags
    0..lag_buckets−1 get their own breakdown bucket, larger lags share "{lag_buckets}+".

    State is only sums, counts, maxima and fixed-bin histograms (float64, on the CPU), so
    all_reduce_ of several ranks' accumulators equals one accumulator fed every token: exactly
    for counts, histograms, maxima and quantiles, up to float rounding for sums of values.
    """

    def __init__(
        self,
        tr_delta: float = 0.2,
        losses: dict[str, dict] | None = None,
        *,
        drpo_deltas: Sequence[float] = (),
        lag_buckets: int = 8,
        reject: Sequence[tuple[str, str, str, float]] = (),
        veto: float | None = None,
        weight: dict | None = None,
        reject_mode: str = "mask",
        opsm_delta: float | None = None,
        m2po_threshold: float | None = None,
        catastrophic: float | None = None,
        by: Sequence[str] = (),
    ):
        if not (isinstance(tr_delta, (int, float)) and tr_delta > 0):
            raise ConfigError(f"tr_delta must be a number > 0, got {tr_delta!r}")
        if not (isinstance(lag_buckets, int) and lag_buckets >= 1):
            raise ConfigError(f"lag_buckets must be an integer >= 1, got {lag_buckets!r}")
        self.tr_delta = float(tr_delta)
        chosen = losses if losses is not None else {name: {} for name in LOSS_NAMES}
        self.losses = {name: resolve_hparams(name, hp) for name, hp in chosen.items()}
        deltas = (float(resolve_hparams("drpo", {"delta": d})["delta"]) for d in drpo_deltas)
        self.drpo_deltas = tuple(dict.fromkeys(deltas))  # duplicates dropped, order kept
        self.lag_buckets = lag_buckets
        self.reject = [tuple(c) for c in reject]
        # What-if corrections with logp as π_old: the veto's fractions, the behavior weight's batch mean
        # (`weight`: behavior_weight's kind, cap, band, level) over the tokens rejection and veto keep.
        self.veto, self.weight, self.reject_mode = veto, dict(weight) if weight else None, reject_mode
        self.opsm_delta, self.m2po_threshold = opsm_delta, m2po_threshold
        self.catastrophic = float(CATASTROPHIC_RHO if catastrophic is None else catastrophic)
        # --by: the breakdown features per value of each column (ValueTable: merged by value, not by sum).
        self.by_tables = {column: ValueTable(len(_BREAKDOWN_FEATURES)) for column in by}
        # Rows not yet whole (update's `row`): keys (K,) and _ROW_FEATURES sums (K, R), folded by close_rows.
        self._pending_keys = torch.zeros(0, dtype=torch.int64)
        self._pending = torch.zeros(0, len(_ROW_FEATURES), dtype=torch.float64)
        # (state key prefix, loss name, hyper-parameters) of every weight distribution tracked.
        self._weighted = [(name, name, hp) for name, hp in self.losses.items() if name in _WEIGHTED_LOSSES]
        self._weighted += [(f"drpo@{d!r}", "drpo", {"delta": d}) for d in self.drpo_deltas]
        self._state: dict[str, Tensor] = {}
        self._ops: dict[str, str] = {}
        for key in ("n", "n_zero_adv", "n_rare", "n_outside", "n_harmful", "n_up", "n_down", "n_entropy",
                    "n_non_finite"):
            self._register(key, (), "sum")
        for key in ("abs_delta", "ratio", "logr", "logr_sq", "k1", "k2", "k3", "bkl", "nll", "entropy",
                    "ratio_sq", "kl_reverse", "reverse_k3", "js", "pi", "mu", "pi_sq", "mu_sq", "pi_mu",
                    "abs_delta_sq", "abs_logr", "mult_error", "catastrophic"):
            self._register(f"sum_{key}", (), "sum")
        for key in ("n", "R", "R_sq", "d", "abs_d", "exp_d", "catastrophic", "policy_log_ppl", "policy_ppl",
                    "behavior_log_ppl", "behavior_ppl"):  # over rows, once each is whole
            self._register(f"rows/sum_{key}", (), "sum")
        for key in ("d", "neg_d"):
            self._register(f"rows/max_{key}", (), "max")
        for key in ("abs_delta", "neg_abs_delta", "ratio", "neg_ratio", "logr", "neg_logr", "bkl"):
            self._register(f"max_{key}", (), "max")
        self._register("hist_abs_delta", (ABS_DELTA_EDGES.numel() + 1,), "sum")
        self._register("hist_logr", (LOGR_EDGES.numel() + 1,), "sum")
        for name in self.losses:
            if name in _ZEROING_METRICS:
                self._register(f"{name}/n_zero", (), "sum")
        if "gspo" in self.losses:
            for key in _SEQ_STATE:
                self._register(f"gspo/{key}", (), "sum")
        if "cispo" in self.losses:
            self._register("cispo/n_clipped", (), "sum")
        # The later objectives' and the OPSM / M2PO filters' fractions: (hits, total) per metric.
        self._fractions = [m for name in self.losses for m in LOSSES[name].effect_metrics]
        self._fractions += [m for f, on in (("opsm", opsm_delta), ("m2po", m2po_threshold)) if on is not None
                            for m in FILTER_METRICS[f]]
        # What a mask or rejection drops that had A > 0: (dropped with A > 0, dropped) per mask.
        masks = [_ZEROING_METRICS[name].split("/")[0] for name in self.losses if name in _ZEROING_METRICS]
        masks += ["gspo"] * ("gspo" in self.losses) + ["reject"] * bool(self.reject) + ["veto"] * (veto is not None)
        self._fractions += [f"{ns}/{DROPPED_POS}" for ns in masks]
        for metric in self._fractions:
            self._register(f"{metric}#hits", (), "sum")
            self._register(f"{metric}#total", (), "sum")
        for key in ("n_ref", "sum_ref_k1", "sum_ref_k2", "sum_ref_k3", "reject/n", "reject/n_tokens",
                    "reject/n_seq", "reject/n_seq_rejected"):
            self._register(key, (), "sum")
        for key in ("veto/n", "veto/n_tokens", "veto/n_seq", "veto/n_seq_vetoed"):
            self._register(key, (), "sum")
        self._register("is/parts", tuple(weight_sum_parts(torch.ones(0), torch.ones(0), torch.ones(0), "token").shape),
                       "sum")
        for prefix, _, _ in self._weighted:
            for key in ("n_corrective", "n_attenuated", "sum_w"):
                self._register(f"{prefix}/{key}", (), "sum")
            self._register(f"{prefix}/max_w", (), "max")
            self._register(f"{prefix}/max_neg_w", (), "max")
            self._register(f"{prefix}/hist_dev", (WEIGHT_DEV_EDGES.numel() + 1,), "sum")
            self._register(f"{prefix}/coarse", (len(WEIGHT_COARSE_EDGES) + 1,), "sum")
        features = len(_BREAKDOWN_FEATURES)
        self._register("by_lag", (lag_buckets + 2, features), "sum")  # + "K+" and "unknown"
        self._register("by_mu", (len(MU_LABELS), features), "sum")
        self._register("by_position", (len(POSITION_LABELS), features), "sum")

    def _register(self, key: str, shape: tuple[int, ...], op: str) -> None:
        init = 0.0 if op == "sum" else -math.inf
        self._state[key] = torch.full(shape, init, dtype=torch.float64)
        self._ops[key] = op

    def config(self) -> dict:
        """The settings this accumulator was built with (accumulators combine only with equal settings)."""
        return {
            "tr_delta": self.tr_delta,
            "losses": {name: dict(hp) for name, hp in self.losses.items()},
            "drpo_deltas": list(self.drpo_deltas),
            "lag_buckets": self.lag_buckets,
            "reject": [list(c) for c in self.reject],
            "veto": self.veto,
            "weight": self.weight and {k: list(v) if isinstance(v, tuple) else v for k, v in self.weight.items()},
            "reject_mode": self.reject_mode,
            "opsm_delta": self.opsm_delta,
            "m2po_threshold": self.m2po_threshold,
            "catastrophic": self.catastrophic,
            "by": list(self.by_tables),
        }

    # ---- accumulate -------------------------------------------------------------------------------

    def update(
        self,
        logp: Tensor,
        behavior_logp: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        lag: Tensor | None = None,
        position: Tensor | None = None,
        entropy: Tensor | None = None,
        seq_index: Tensor | None = None,
        ref_logp: Tensor | None = None,
        selected: Tensor | None = None,
        old_logp: Tensor | None = None,
        row: Tensor | None = None,
        by: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Add the tokens where `mask` is True. All inputs flat (N,) (any equal shapes work).

        Returns the masked tokens' token_diagnostics, with their float64 `logp` and `behavior_logp`, flat (n,)
        in order, so that a caller's own per-row sums (inspect's worst sequences) reuse them.

        Sequence-level metrics (is/ess_seq, chi2/seq, ppl/*, is/catastrophic_seq_frac) need each row
        whole: with `row` (each token's global row id) a row's tokens may come over several calls and
        are merged by row until close_rows(); without it the `seq_index` sequences are taken as whole in
        this call. `by` = {column: each token's code from by_codes} for the --by breakdowns.

        `lag` = staleness per token (current − policy version; < 0 = unknown), `position` = index
        in the response, `entropy` = entropy of π, `seq_index` = each token's sequence label (whole
        sequences only: gspo's clipping and the sequence-level rejection criteria need it),
        `ref_logp` = log π_ref (the kl/ref_* metrics of KL(π‖π_ref)), `selected` = the tokens the step's
        clip-cov / kl-cov selection picked (else selected over these tokens), `old_logp` = π_old of the M2PO
        what-if over these tokens (train counts its step-wide mask with add_counts instead). Masked
        positions are selected out before any math, so NaN there never reaches a statistic; so are
        trained tokens whose log-prob is not finite (a diverged model), counted in a note.
        """
        with torch.no_grad():
            keep = mask.detach().reshape(-1).bool()
            finite = torch.isfinite(logp.detach().reshape(-1))
            if not bool(finite[keep].all()):  # a diverged model: no ratio, Δ or weight; counted, left out
                self._fold({"n_non_finite": (keep & ~finite).sum()})
                keep = keep & finite
            index = keep.nonzero().squeeze(1)  # (n,) found once, for every input

            def pick(x: Tensor) -> Tensor:
                return x.detach().reshape(-1).index_select(0, index.to(x.device))

            lp, mu_lp, adv = pick(logp).double(), pick(behavior_logp).double(), pick(advantages).double()
            t = token_diagnostics(lp, mu_lp, adv, tr_delta=self.tr_delta)
            t.update(logp=lp, behavior_logp=mu_lp)
            if lp.numel() == 0:
                return t
            abs_d, logr, r, mu = t["delta"].abs(), t["logr"], t["ratio"], torch.exp(mu_lp)
            pi = mu + t["delta"]  # π = μ + Δ, exact up to rounding (Δ from log-space forms)
            catastrophic = (lp - mu_lp) < math.log(self.catastrophic)  # (n,) the raw log r, as verl and slime
            part = {
                "n": torch.tensor(float(lp.numel())),
                "n_zero_adv": (adv == 0).sum(),
                "n_rare": (mu <= MU_EDGES[0]).sum(),
                "n_outside": t["outside"].sum(),
                "n_harmful": t["harmful"].sum(),
                "n_up": (t["delta"] > self.tr_delta).sum(),
                "n_down": (t["delta"] < -self.tr_delta).sum(),
                "sum_abs_delta": abs_d.sum(),
                "sum_ratio": r.sum(),
                "sum_logr": logr.sum(),
                "sum_logr_sq": logr.square().sum(),
                "sum_k1": t["k1"].sum(),
                "sum_k2": t["k2"].sum(),
                "sum_k3": t["k3"].sum(),
                "sum_bkl": t["binary_kl"].sum(),
                "sum_nll": (-mu_lp).sum(),
                "sum_ratio_sq": r.square().sum(),
                "sum_kl_reverse": t["kl_reverse"].sum(),
                "sum_reverse_k3": t["reverse_k3"].sum(),
                "sum_js": t["js"].sum(),
                "sum_pi": pi.sum(),
                "sum_mu": mu.sum(),
                "sum_pi_sq": pi.square().sum(),
                "sum_mu_sq": mu.square().sum(),
                "sum_pi_mu": (pi * mu).sum(),
                "sum_abs_delta_sq": abs_d.square().sum(),
                "sum_abs_logr": logr.abs().sum(),
                "sum_mult_error": torch.maximum(r, r.reciprocal()).sum(),  # exp(|log r|)
                "sum_catastrophic": catastrophic.sum(),
                "max_abs_delta": abs_d.max(),
                "max_neg_abs_delta": (-abs_d).max(),
                "max_ratio": r.max(),
                "max_neg_ratio": (-r).max(),
                "max_logr": logr.max(),
                "max_neg_logr": (-logr).max(),
                "max_bkl": t["binary_kl"].max(),
                "hist_abs_delta": _bin_counts(abs_d, ABS_DELTA_EDGES),
                "hist_logr": _bin_counts(logr, LOGR_EDGES),
            }
            if entropy is not None:
                ent = pick(entropy).double()
                part["n_entropy"], part["sum_entropy"] = torch.tensor(float(ent.numel())), ent.sum()
            counts = {}
            for name, hp in self.losses.items():
                if name in _ZEROING_METRICS:
                    zero = gradient_weight(name, lp, mu_lp, adv, **hp) == 0
                    part[f"{name}/n_zero"] = zero.sum()
                    counts[f"{_ZEROING_METRICS[name].split('/')[0]}/{DROPPED_POS}"] = dropped_positive(zero, adv)
            if seq_index is not None and "gspo" in self.losses:
                seq = pick(seq_index)
                w = gradient_weight("gspo", lp, mu_lp, adv, seq_index=seq, **self.losses["gspo"])
                part.update({"gspo/n": torch.tensor(float(lp.numel())), "gspo/n_zero": (w == 0).sum(),
                             "gspo/n_seq": torch.tensor(float(torch.unique(seq).numel())),
                             "gspo/n_seq_zero": torch.tensor(float(torch.unique(seq[w == 0]).numel()))})
                counts[f"gspo/{DROPPED_POS}"] = dropped_positive(w == 0, adv)
            if "cispo" in self.losses:
                part["cispo/n_clipped"] = (gradient_weight("cispo", lp, mu_lp, adv, **self.losses["cispo"]) != 1).sum()
            seq = pick(seq_index) if seq_index is not None else None
            for name, hp in self.losses.items():
                sel = pick(selected) if selected is not None else None
                counts.update(effect_counts(name, hp, lp, mu_lp, adv, seq, sel))
            counts.update(filter_counts(lp, mu_lp, adv, seq, opsm_delta=self.opsm_delta, m2po_threshold=(
                self.m2po_threshold if old_logp is not None else None),
                old_logp=None if old_logp is None else pick(old_logp).double()))
            if ref_logp is not None:
                ref = pick(ref_logp).double()
                part["n_ref"] = torch.tensor(float(lp.numel()))
                for k in ("k1", "k2", "k3"):
                    part[f"sum_ref_{k}"] = reference_kl(k, lp, ref).sum()
            kept = torch.ones_like(lp, dtype=torch.bool)  # (n,) by rejection and veto
            if self.reject and seq_index is not None:
                seq = pick(seq_index)
                kept = rejection_mask(self.reject, lp, mu_lp, torch.ones_like(lp, dtype=torch.bool), seq)
                part.update({"reject/n": torch.tensor(float(lp.numel())), "reject/n_tokens": (~kept).sum(),
                             "reject/n_seq": torch.tensor(float(torch.unique(seq).numel())),
                             "reject/n_seq_rejected": torch.tensor(float(torch.unique(seq[~kept]).numel()))})
                counts[f"reject/{DROPPED_POS}"] = dropped_positive(~kept, adv)
            if self.veto is not None and seq_index is not None:
                seq = pick(seq_index)
                kept_v, bad = veto_mask(self.veto, lp, mu_lp, torch.ones_like(lp, dtype=torch.bool), seq)
                kept = kept & kept_v
                part.update({"veto/n": torch.tensor(float(lp.numel())), "veto/n_tokens": bad.sum(),
                             "veto/n_seq": torch.tensor(float(torch.unique(seq).numel())),
                             "veto/n_seq_vetoed": torch.tensor(float(torch.unique(seq[~kept_v]).numel()))})
                counts[f"veto/{DROPPED_POS}"] = dropped_positive(~kept_v, adv)
            for metric, (hits, total) in counts.items():
                if metric in self._fractions:
                    part[f"{metric}#hits"], part[f"{metric}#total"] = hits, total
            if self.weight is not None and seq_index is not None:
                seq = pick(seq_index)
                w = behavior_weight(proximal_logp=lp, behavior_logp=mu_lp, seq_index=seq, **self.weight)
                if self.reject_mode == "zero":
                    w, kept = w * kept, torch.ones_like(kept)
                level = "token" if self.weight["level"] == "token" else "sequence"
                part["is/parts"] = weight_sum_parts(w, kept, seq, level).double()
            for prefix, name, hp in self._weighted:
                w = gradient_weight(name, lp, mu_lp, adv, **hp)
                part[f"{prefix}/n_corrective"] = (w < 0).sum()
                part[f"{prefix}/n_attenuated"] = (w < 0.5).sum()
                part[f"{prefix}/sum_w"] = w.sum()
                part[f"{prefix}/max_w"] = w.max()
                part[f"{prefix}/max_neg_w"] = (-w).max()
                part[f"{prefix}/hist_dev"] = _bin_counts(w - 1.0, WEIGHT_DEV_EDGES)
                part[f"{prefix}/coarse"] = _bin_counts(w, torch.tensor(WEIGHT_COARSE_EDGES))
            features = torch.stack(
                [torch.ones_like(lp), t["outside"].double(), t["harmful"].double(), abs_d, t["k3"], logr],
                dim=1,
            )  # (n, F)
            part["by_lag"] = self._by(features, self._lag_bucket(lag, pick, lp), self.lag_buckets + 2)
            mu_bucket = torch.bucketize(mu, torch.tensor(MU_EDGES, dtype=torch.float64, device=lp.device))
            part["by_mu"] = self._by(features, mu_bucket, len(MU_LABELS))
            part["by_position"] = self._by(
                features, self._position_bucket(position, pick, lp), len(POSITION_LABELS)
            )
            for column, codes in (by or {}).items():
                self.by_tables[column].add(pick(torch.as_tensor(codes)).numpy(), features.cpu().numpy())
            row_features = torch.stack([torch.ones_like(lp), logr, lp, mu_lp, catastrophic.double()], dim=1)  # (n, R)
            if row is not None:
                self._pend(pick(row).long(), row_features)
            elif seq is not None:
                _, inverse = torch.unique(seq, return_inverse=True)
                part.update(self._row_part(_sum_by(row_features, inverse)))
            self._fold(part)
            return t

    def by_codes(self, column: str, values) -> np.ndarray:
        """(n,) codes of a --by column's values (pyarrow, one per row), to pass per token to update's `by`."""
        return self.by_tables[column].codes(values)

    def _pend(self, keys: Tensor, features: Tensor) -> None:
        """Merge per-token row features into the pending rows (sums by row key)."""
        keys = torch.cat([self._pending_keys, keys.cpu()])
        features = torch.cat([self._pending, features.cpu()])
        self._pending_keys, inverse = torch.unique(keys, return_inverse=True)
        self._pending = _sum_by(features, inverse)

    def close_rows(self) -> None:
        """Fold the pending rows (all whole now) into the sequence-level sums."""
        if self._pending_keys.numel():
            self._fold(self._row_part(self._pending))
        self._pending_keys = torch.zeros(0, dtype=torch.int64)
        self._pending = torch.zeros(0, len(_ROW_FEATURES), dtype=torch.float64)

    @staticmethod
    def _row_part(rows: Tensor) -> dict[str, Tensor]:
        """The sequence-level sums of whole rows (K, R) of _ROW_FEATURES sums (SPEC.md §2)."""
        n, logr, logp, logmu, catastrophic = rows.unbind(1)
        log_big_r = logr.clamp(-LOGR_CLAMP, LOGR_CLAMP)  # log R = Σ_t log r_t, clamped like every log ratio
        d = (logmu - logp) / n  # mean_t log μ − mean_t log π: verl's log_ppl_diff
        policy, behavior = -logp / n, -logmu / n  # log-perplexities
        return {"rows/sum_n": torch.tensor(float(n.numel())), "rows/sum_R": torch.exp(log_big_r).sum(),
                "rows/sum_R_sq": torch.exp(2 * log_big_r).sum(), "rows/sum_d": d.sum(), "rows/sum_abs_d": d.abs().sum(),
                "rows/sum_exp_d": torch.exp(d).sum(), "rows/max_d": d.max(), "rows/max_neg_d": (-d).max(),
                "rows/sum_catastrophic": (catastrophic > 0).sum(), "rows/sum_policy_log_ppl": policy.sum(),
                "rows/sum_policy_ppl": torch.exp(policy).sum(), "rows/sum_behavior_log_ppl": behavior.sum(),
                "rows/sum_behavior_ppl": torch.exp(behavior).sum()}

    def add_counts(self, counts: dict[str, tuple[float, float]]) -> None:
        """Fold (hits, total) of fractions counted elsewhere (train's step-wide M2PO mask) into the state."""
        self._fold({f"{m}#{k}": torch.tensor(float(v)) for m, (h, t) in counts.items() if m in self._fractions
                    for k, v in (("hits", h), ("total", t))})

    def _lag_bucket(self, lag, pick, like: Tensor) -> Tensor:
        unknown = self.lag_buckets + 1
        if lag is None:
            return torch.full(like.shape, unknown, dtype=torch.long, device=like.device)
        lag = pick(lag).long()
        return torch.where(lag < 0, torch.full_like(lag, unknown), lag.clamp(max=self.lag_buckets))

    @staticmethod
    def _position_bucket(position, pick, like: Tensor) -> Tensor:
        if position is None:
            return torch.full(like.shape, len(POSITION_LABELS) - 1, dtype=torch.long, device=like.device)
        edges = torch.tensor(POSITION_EDGES, dtype=torch.long, device=like.device)
        return torch.bucketize(pick(position).long(), edges, right=True)

    @staticmethod
    def _by(features: Tensor, bucket: Tensor, num_buckets: int) -> Tensor:
        out = torch.zeros(num_buckets, features.shape[1], dtype=torch.float64, device=features.device)
        return out.index_add_(0, bucket, features)  # (buckets, F)

    def _fold(self, part: dict[str, Tensor]) -> None:
        """Combine partial statistics into the state with each key's op (one device→host copy)."""
        keys = list(part)
        flat = torch.cat([part[k].reshape(-1).to(torch.float64) for k in keys]).cpu()
        for key, chunk in zip(keys, flat.split([part[k].numel() for k in keys])):
            state = self._state[key]
            chunk = chunk.reshape(state.shape)
            if self._ops[key] == "sum":
                state += chunk
            else:
                torch.maximum(state, chunk, out=state)

    # ---- distributed -----------------------------------------------------------------

    def all_reduce_(self) -> Diagnostics:
        """Combine the accumulators of every rank in place (SUM / MAX); a no-op without torch.distributed.

        Call it once, on per-rank state, right before summary(): a second call would count twice.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            self.close_rows()
            return self

        def exchange(obj) -> list:
            shares: list = [None] * dist.get_world_size()
            dist.all_gather_object(shares, obj)
            return shares

        # A row split over ranks is merged by its key first; rank 0 folds the union (the others' sums stay 0).
        pending = exchange((self._pending_keys, self._pending))
        self._pending_keys, self._pending = torch.zeros(0, dtype=torch.int64), self._pending[:0]
        if dist.get_rank() == 0:
            for keys, rows in pending:
                self._pend(keys, rows)
        self.close_rows()
        for table in self.by_tables.values():
            table.merge(exchange)
        on_gpu = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        for op, reduce_op in (("sum", dist.ReduceOp.SUM), ("max", dist.ReduceOp.MAX)):
            keys = [k for k in self._state if self._ops[k] == op]
            flat = torch.cat([self._state[k].reshape(-1) for k in keys]).to(device)
            dist.all_reduce(flat, op=reduce_op)
            for key, chunk in zip(keys, flat.cpu().split([self._state[k].numel() for k in keys])):
                self._state[key] = chunk.reshape(self._state[key].shape).clone()
        return self

    # ---- report -----------------------------------------------------------------------------------

    def summary(self) -> dict:
        """Flat namespaced metrics (docs/losses.md) plus nested "breakdowns", "what_if",
        "weight_histograms", "notes" and "config". Fractions and means are None without tokens."""
        self.close_rows()
        s = {k: v for k, v in self._state.items()}
        n = float(s["n"])

        def ratio_of(num: float, den: float) -> float | None:
            return float(num) / den if den > 0 else None

        def extreme(key: str, sign: float = 1.0) -> float | None:
            return sign * float(s[key]) if n > 0 else None

        out: dict = {"data/tokens": int(n), "data/behavior_nll_mean": ratio_of(s["sum_nll"], n)}
        for key, count in (
            ("data/zero_adv_frac", "n_zero_adv"),
            ("data/rare_token_frac", "n_rare"),
            ("tr/outside_frac", "n_outside"),
            ("tr/harmful_frac", "n_harmful"),
            ("tr/outside_up_frac", "n_up"),
            ("tr/outside_down_frac", "n_down"),
        ):
            out[key] = ratio_of(s[count], n)
        out["delta/abs_mean"] = ratio_of(s["sum_abs_delta"], n)
        out["delta/abs_max"] = extreme("max_abs_delta")
        lo, hi = extreme("max_neg_abs_delta", -1.0), extreme("max_abs_delta")
        for name, q in QUANTILES.items():
            out[f"delta/abs_{name}"] = histogram_quantile(s["hist_abs_delta"], ABS_DELTA_EDGES, q, lo, hi)
        out["ratio/mean"] = ratio_of(s["sum_ratio"], n)
        out["ratio/min"] = extreme("max_neg_ratio", -1.0)
        out["ratio/max"] = extreme("max_ratio")
        lo, hi = extreme("max_neg_logr", -1.0), extreme("max_logr")
        for name, q in {"p1": 0.01, **QUANTILES}.items():
            # r = exp(log r) is monotone, so its quantiles are those of the log r histogram.
            logr_q = histogram_quantile(s["hist_logr"], LOGR_EDGES, q, lo, hi)
            out[f"ratio/{name}"] = None if logr_q is None else math.exp(logr_q)
        out["logr/mean"] = ratio_of(s["sum_logr"], n)
        out["logr/std"] = (
            math.sqrt(max(float(s["sum_logr_sq"]) / n - out["logr/mean"] ** 2, 0.0)) if n else None
        )
        out["logr/abs_max"] = max(abs(lo), abs(hi)) if n > 0 else None
        for k in ("k1", "k2", "k3"):
            out[f"kl/{k}_mean"] = ratio_of(s[f"sum_{k}"], n)
        out["kl/binary_mean"] = ratio_of(s["sum_bkl"], n)
        out["kl/binary_max"] = extreme("max_bkl")
        out["tv/binary_mean"] = out["delta/abs_mean"]
        if float(s["n_entropy"]) > 0:
            out["entropy/mean"] = ratio_of(s["sum_entropy"], float(s["n_entropy"]))
        out.update(self._peer_metrics(n))
        for name in self.losses:
            if name in _ZEROING_METRICS:
                out[_ZEROING_METRICS[name]] = ratio_of(s[f"{name}/n_zero"], n)
        if "gspo" in self.losses:
            out["gspo/clip_frac"] = ratio_of(s["gspo/n_zero"], float(s["gspo/n"]))
            out["gspo/seq_clip_frac"] = ratio_of(s["gspo/n_seq_zero"], float(s["gspo/n_seq"]))
        if "cispo" in self.losses:
            out["cispo/clip_frac"] = ratio_of(s["cispo/n_clipped"], n)
        for metric in self._fractions:
            out[metric] = ratio_of(s[f"{metric}#hits"], float(s[f"{metric}#total"]))
        if float(s["n_ref"]) > 0:
            for k in ("k1", "k2", "k3"):
                out[f"kl/ref_{k}_mean"] = ratio_of(s[f"sum_ref_{k}"], float(s["n_ref"]))
        if self.reject:
            out["reject/token_frac"] = ratio_of(s["reject/n_tokens"], float(s["reject/n"]))
            out["reject/seq_frac"] = ratio_of(s["reject/n_seq_rejected"], float(s["reject/n_seq"]))
        if self.veto is not None:
            out["veto/token_frac"] = ratio_of(s["veto/n_tokens"], float(s["veto/n"]))
            out["veto/seq_frac"] = ratio_of(s["veto/n_seq_vetoed"], float(s["veto/n_seq"]))
        if self.weight is not None:
            out["is/batch_norm_factor"] = weight_mean(s["is/parts"].round().long())
        histograms, what_if, notes, unreachable = {}, [], [], set()
        for prefix, name, hp in self._weighted:
            stats = self._weight_stats(prefix, n)
            if prefix == name:
                out.update({f"weight/{name}_{k}": v for k, v in stats.items()})
                histograms[f"weight/{name}"] = self._coarse(prefix, n)
            else:
                what_if.append({"delta": hp["delta"], **stats, "boundary_reachable": hp["delta"] < 1})
            if name == "drpo" and hp["delta"] >= 1 and hp["delta"] not in unreachable:  # once per δ
                unreachable.add(hp["delta"])
                notes.append(
                    f"drpo delta={hp['delta']:g} >= 1: the trust-region boundary |Δ| = δ is unreachable "
                    f"(|Δ| <= 1), so w stays in [{1 - 1 / hp['delta']:.3g}, {1 + 1 / hp['delta']:.3g}] "
                    "and no token is corrected"
                )
        out["breakdowns"] = {
            "by": {column: [{"value": value, **self._record(sums)} for value, sums in table.items()
                            if sums[0] > 0] for column, table in self.by_tables.items()},
            "lag": self._breakdown(
                s["by_lag"], [str(i) for i in range(self.lag_buckets)] + [f"{self.lag_buckets}+", "unknown"]
            ),
            "mu": self._breakdown(s["by_mu"], MU_LABELS),
            "position": self._breakdown(s["by_position"], POSITION_LABELS),
        }
        out["what_if"] = {"drpo": what_if}
        out["weight_histograms"] = histograms
        bad = int(s["n_non_finite"])
        if bad:
            notes.append(f"{bad} of {bad + int(n)} trained tokens have a non-finite log-prob under the model (NaN or "
                         f"±inf: diverged weights or an overflow); every statistic is over the other {int(n)}")
        out["notes"] = notes
        out["config"] = self.config()
        return out

    def _weight_stats(self, prefix: str, n: float) -> dict[str, float | None]:
        s = self._state
        lo = -float(s[f"{prefix}/max_neg_w"]) if n > 0 else None
        hi = float(s[f"{prefix}/max_w"]) if n > 0 else None
        stats = {
            "corrective_frac": float(s[f"{prefix}/n_corrective"]) / n if n else None,
            "attenuated_frac": float(s[f"{prefix}/n_attenuated"]) / n if n else None,
            "mean": float(s[f"{prefix}/sum_w"]) / n if n else None,
            "min": lo,
            "max": hi,
        }
        for name, q in LOW_QUANTILES.items():
            # Binned as w − 1 (a shift is monotone), so weights near 1 keep their resolution.
            dev = (
                histogram_quantile(s[f"{prefix}/hist_dev"], WEIGHT_DEV_EDGES, q, lo - 1, hi - 1)
                if n
                else None
            )
            stats[name] = None if dev is None else 1.0 + dev
        return stats

    def _coarse(self, prefix: str, n: float) -> dict:
        counts = self._state[f"{prefix}/coarse"]
        return {"edges": list(WEIGHT_COARSE_EDGES), "fracs": [float(c) / n if n else None for c in counts]}

    @classmethod
    def _breakdown(cls, table: Tensor, labels: Sequence[str]) -> dict[str, dict]:
        return {label: cls._record(row) for label, row in zip(labels, table) if float(row[0]) > 0}

    @staticmethod
    def _record(row) -> dict:
        """One breakdown entry from its _BREAKDOWN_FEATURES sums (tokens > 0)."""
        tokens, outside, harmful, delta_abs, k3_sum, logr_sum = (float(v) for v in row)
        return {"tokens": int(tokens), "outside_frac": outside / tokens, "harmful_frac": harmful / tokens,
                "delta_abs_mean": delta_abs / tokens, "k3_mean": k3_sum / tokens, "logr_mean": logr_sum / tokens}

    def _peer_metrics(self, n: float) -> dict[str, float | None]:
        """The metrics other trainers' dashboards show (SPEC.md §2, each with its source), over trained tokens
        (n) and over rows with a trained token (m)."""
        s = {k: float(v) for k, v in self._state.items() if v.dim() == 0}
        m = s["rows/sum_n"]

        def mean(key: str, count: float) -> float | None:
            return s[key] / count if count > 0 else None

        out: dict[str, float | None] = {
            "is/ess_token": s["sum_ratio"] ** 2 / (n * s["sum_ratio_sq"]) if n and s["sum_ratio_sq"] > 0 else None,
            "is/ess_seq": s["rows/sum_R"] ** 2 / (m * s["rows/sum_R_sq"]) if m and s["rows/sum_R_sq"] > 0 else None,
            "chi2/token": s["sum_ratio_sq"] / n - 1.0 if n else None,
            "chi2/seq": s["rows/sum_R_sq"] / m - 1.0 if m else None,
            "kl/reverse_mean": mean("sum_kl_reverse", n),
            "kl/reverse_k3_mean": mean("sum_reverse_k3", n),
            "kl/js_mean": mean("sum_js", n),
            "prob/pearson": None,
            "prob/mult_error_mean": mean("sum_mult_error", n),
            "delta/abs_std": None,
            "logr/abs_mean": mean("sum_abs_logr", n),
            "is/catastrophic_token_frac": mean("sum_catastrophic", n),
            "is/catastrophic_seq_frac": mean("rows/sum_catastrophic", m),
            "ppl/log_diff_mean": mean("rows/sum_d", m),
            "ppl/log_abs_diff_mean": mean("rows/sum_abs_d", m),
            "ppl/log_diff_max": s["rows/max_d"] if m else None,
            "ppl/log_diff_min": -s["rows/max_neg_d"] if m else None,
            "ppl/ratio_mean": mean("rows/sum_exp_d", m),
            "ppl/policy_mean": mean("rows/sum_policy_ppl", m),
            "ppl/policy_log_mean": mean("rows/sum_policy_log_ppl", m),
            "ppl/behavior_mean": mean("rows/sum_behavior_ppl", m),
            "ppl/behavior_log_mean": mean("rows/sum_behavior_log_ppl", m),
        }
        if n:
            var_pi = n * s["sum_pi_sq"] - s["sum_pi"] ** 2  # n²·variance of π, of μ; n²·covariance
            var_mu = n * s["sum_mu_sq"] - s["sum_mu"] ** 2
            cov = n * s["sum_pi_mu"] - s["sum_pi"] * s["sum_mu"]
            # A constant π or μ leaves rounding noise of either sign in its variance, which would make the
            # correlation depend on the summation order (micro-batches, ranks): below VARIANCE_NOISE·n·Σx² the
            # variance counts as 0 and the correlation is undefined (None).
            spread = var_pi > VARIANCE_NOISE * n * s["sum_pi_sq"] and var_mu > VARIANCE_NOISE * n * s["sum_mu_sq"]
            out["prob/pearson"] = cov / math.sqrt(var_pi * var_mu) if spread else None
            abs_mean = s["sum_abs_delta"] / n
            out["delta/abs_std"] = math.sqrt(max(s["sum_abs_delta_sq"] / n - abs_mean**2, 0.0))
        entropy = s["sum_entropy"] / s["n_entropy"] if s["n_entropy"] > 0 else 0.0
        out["kl/k3_over_entropy"] = s["sum_k3"] / n / entropy if n and entropy > 0 else None
        return out
