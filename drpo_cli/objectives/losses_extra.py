"""The later off-policy objectives of SPEC.md §1 and the step filters OPSM and M2PO.

Same conventions as losses.py (which registers these functions in its one registry): `logp` = logπ
(the only differentiable input), `anchor` = logμ and `adv` = A already detached, r = exp(clamp(log r,
±20)), masked positions already neutralised. Each loss follows its reference implementation (repo,
file and function in its docstring and in SPEC.md); the gradient weights `_w_*` give
d loss/d logπ = −A·r·w (plus the penalty gradient `_g_*` of the squared-log-ratio losses, which does
not scale with A). Sequence-level losses see each token's sequence (`seq`, `valid`); batch-level
losses get `selected`, the tokens a statistic over the whole optimizer step picked
(`covariance_selection`).

sequence_reduce and ppo_clip live in losses.py, which imports this module: they are imported
where they are called, so either module can be imported first.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from drpo_cli.objectives.elementwise import LOGR_CLAMP, log_ratio, prob_delta

VESPO_LOG_W_FLOOR = math.log(1e-8)  # TRL's lower clamp of the sequence log-weight


def _seq(x: Tensor, seq: Tensor, valid: Tensor, reduce: str) -> Tensor:
    from drpo_cli.objectives.losses import sequence_reduce

    return sequence_reduce(x, seq, valid, reduce)


# ---- SAPO ------------------------------------------------------------------------------------------


def _sapo_gate_arg(logp: Tensor, anchor: Tensor, adv: Tensor, tau_pos: float, tau_neg: float):
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))  # (…,)
    return tau, tau * torch.expm1(log_ratio(logp, anchor))  # τ, τ·(r − 1)


def sapo(logp: Tensor, anchor: Tensor, adv: Tensor, *, tau_pos: float, tau_neg: float) -> Tensor:
    """SAPO: loss = −(4/τ)·σ(τ·(r − 1))·A, τ = τ_pos where A > 0 else τ_neg; w = 4·σ·(1 − σ).

    Soft Adaptive Policy Optimization (arXiv 2511.20347), as verl's compute_policy_loss_sapo and TRL's
    loss_type="sapo" (defaults τ_pos 1.0, τ_neg 1.05). Relative to PPO-clip: a smooth gate replaces the
    hard clip; the weight is 1 at r = 1 and decays like a logistic bump on both sides, never to 0 and
    never below 0, faster for negative advantages (τ_neg > τ_pos). Both references force
    seq-mean-token-mean aggregation; here --agg chooses (docs/losses.md recommends theirs).
    """
    tau, x = _sapo_gate_arg(logp, anchor, adv, tau_pos, tau_neg)
    return -(4.0 / tau) * torch.sigmoid(x) * adv


def _w_sapo(logp, anchor, adv, *, tau_pos, tau_neg):
    s = torch.sigmoid(_sapo_gate_arg(logp, anchor, adv, tau_pos, tau_neg)[1])
    return 4.0 * s * (1.0 - s)


# ---- GMPO ------------------------------------------------------------------------------------------


def _gmpo_clip(logp: Tensor, anchor: Tensor, adv: Tensor, eps_low: float, eps_high: float):
    """(sign-aware clipped log r, kept): the clip applies only in the advantage's direction."""
    x = log_ratio(logp, anchor)
    sgn = torch.sign(adv)
    x_min = sgn * torch.minimum(sgn * x, sgn * x.clamp(-eps_low, eps_high))
    kept = ~(((adv > 0) & (x > eps_high)) | ((adv < 0) & (x < -eps_low))) & (adv != 0)
    return x_min, kept


def gmpo(
    logp: Tensor, anchor: Tensor, adv: Tensor, *, seq: Tensor, valid: Tensor, eps_low: float, eps_high: float
) -> Tensor:
    """GMPO: per sequence i, loss = −Ā_i·exp(mean_{t∈i} x_t) on each of its tokens.

    Geometric-Mean Policy Optimization (arXiv 2507.20673), as verl's compute_policy_loss_geo_mean:
    x_t = sgn(A_t)·min(sgn(A_t)·log r_t, sgn(A_t)·clip(log r_t, −ε_low, ε_high)), Ā_i the mean advantage
    over the sequence's trained tokens; ε_low = ε_high = 0.4 (the paper's clip range (e^−0.4, e^0.4)).
    Relative to PPO-clip: the ratio is the geometric mean of the token ratios (clipped per token in log
    space, only in the advantage's direction), so one outlier token moves the sequence ratio by its n-th
    root. A token with A_t = 0 contributes log r 0 and no gradient (sgn = 0), as in verl. Every token
    carries its sequence's value: with --agg seq-mean-token-mean the step loss is verl's mean over
    sequences. Gradient: d(Σ_{t∈i} loss_t)/d logπ_u = −(s_i/n_i)·(Σ_{t∈i} A_t)·w_u, w_u = 1 unless u's log
    ratio is clipped in its advantage's direction (or A_u = 0).
    """
    x_min, _ = _gmpo_clip(logp, anchor, adv, eps_low, eps_high)
    s = torch.exp(_seq(x_min, seq, valid, "mean"))  # (…,) x_min ∈ [−20, 20], so no overflow
    return -_seq(adv, seq, valid, "mean") * s


def _w_gmpo(logp, anchor, adv, *, seq, valid, eps_low, eps_high):
    return _gmpo_clip(logp, anchor, adv, eps_low, eps_high)[1].to(logp.dtype)


def gmpo_ratio(logp: Tensor, anchor: Tensor, adv: Tensor, seq: Tensor, valid: Tensor, eps_low: float,
               eps_high: float) -> Tensor:
    """s_i of each token's sequence (detached), for the sequence contract of the gradient."""
    return torch.exp(_seq(_gmpo_clip(logp, anchor, adv, eps_low, eps_high)[0], seq, valid, "mean")).detach()


# ---- TOPR ------------------------------------------------------------------------------------------


def _topr_coef(logp: Tensor, anchor: Tensor, adv: Tensor) -> Tensor:
    r = torch.exp(log_ratio(logp, anchor)).detach()
    return torch.where(adv > 0, torch.ones_like(r), r.clamp(0.0, 1.0))


def topr(logp: Tensor, anchor: Tensor, adv: Tensor) -> Tensor:
    """TOPR: A > 0: loss = −A·logπ; A ≤ 0: loss = −sg(clip(r, 0, 1))·A·logπ; w = 1/r resp. min(r, 1)/r.

    Tapered Off-Policy REINFORCE (arXiv 2503.14286, Eq. 8), as ROLL's _compute_topr_loss
    (roll/pipeline/agentic/agentic_actor_pg_worker.py). Relative to PPO-clip: positive examples get a
    plain SFT-like gradient with no importance weight at all, negative ones a truncated weight
    min(r, 1), so pushing down tokens the policy already left is damped and nothing is ever zeroed.
    ROLL splits by the episode score (score > 0); drpo splits by the advantage sign per token, the
    paper's R(τ) being the advantage here. Value in REINFORCE form, like cispo.
    """
    return -_topr_coef(logp, anchor, adv) * adv * logp


def _w_topr(logp, anchor, adv):
    return _topr_coef(logp, anchor, adv) / torch.exp(log_ratio(logp, anchor))


# ---- the squared-log-ratio family ------------------------------------------------------------------


def kimi15(logp: Tensor, anchor: Tensor, adv: Tensor, *, tau: float) -> Tensor:
    """Kimi k1.5: loss = −A·logπ + (τ/2)·(log r)²; w = 1/r, plus the penalty gradient τ·log r.

    Kimi k1.5 (arXiv 2501.12599, Eq. 3), as ROLL's _compute_kimi15_loss (pg_variant "kimi15", τ 0.1).
    Relative to PPO-clip: REINFORCE on the sampled tokens with a quadratic pull of log π back to log μ
    that does not depend on the advantage, so it acts on zero-advantage tokens too.
    """
    return -adv * logp + 0.5 * tau * log_ratio(logp, anchor).square()


def _w_reinforce(logp, anchor, adv, **_):
    return 1.0 / torch.exp(log_ratio(logp, anchor))


def _g_kimi15(logp, anchor, adv, *, tau):
    return tau * log_ratio(logp, anchor)


def _tv_sq_keep(logp: Tensor, anchor: Tensor, adv: Tensor, delta_low: float, delta_high: float) -> Tensor:
    d = prob_delta(logp, anchor)
    return ~(((adv > 0) & (d > delta_high)) | ((adv < 0) & (d < -delta_low)))


def dppo_tv_sq(logp: Tensor, anchor: Tensor, adv: Tensor, *, delta_low: float, delta_high: float,
               tau: float) -> Tensor:
    """prime-rl's default loss: loss = −M·A·r + τ·(log r)², M the Binary-TV mask; w = M, penalty 2τ·log r.

    prime-rl's default_loss_fn (src/prime_rl/trainer/rl/loss.py, DefaultLossConfig: dppo_mask_low 0.2,
    dppo_mask_high 0.2, kl_tau 1e-3, adv_tau 1): M = 0 where (A > 0 ∧ Δ > δ_high) or (A < 0 ∧ Δ < −δ_low).
    Relative to dppo-tv: the full ratio carries the gradient (no cap C, no detach), the thresholds may
    differ by direction, and a squared log ratio (no ½, unlike kimi15) pulls every trained token back
    toward μ, masked ones included.
    """
    keep = _tv_sq_keep(logp.detach(), anchor, adv, delta_low, delta_high)
    logr = log_ratio(logp, anchor)
    return -torch.where(keep, adv, torch.zeros_like(adv)) * torch.exp(logr) + tau * logr.square()


def _w_dppo_tv_sq(logp, anchor, adv, *, delta_low, delta_high, tau):
    return _tv_sq_keep(logp, anchor, adv, delta_low, delta_high).to(logp.dtype)


def _g_dppo_tv_sq(logp, anchor, adv, *, delta_low, delta_high, tau):
    return 2.0 * tau * log_ratio(logp, anchor)


# ---- VESPO -----------------------------------------------------------------------------------------


def vespo_phi(logp: Tensor, anchor: Tensor, adv: Tensor, seq: Tensor, valid: Tensor, *, k_pos: float,
              lambda_pos: float, k_neg: float, lambda_neg: float) -> Tensor:
    """φ(w) = e^λ·w^k·e^(−λw) per token (detached), w = exp(Σ_{t∈i} log r_t) of its sequence.

    As TRL's GRPOTrainer.get_gamma_weights: per-token log r clamped to ±20, summed over the sequence's
    trained tokens, then clamped to [log 1e-8, 20]; k, λ by the sign of A (A ≥ 0: k_pos, λ_pos);
    computed in log space, NaN/inf mapped to 0.
    """
    with torch.no_grad():
        log_w = _seq(log_ratio(logp.detach(), anchor), seq, valid, "sum").clamp(VESPO_LOG_W_FLOOR, LOGR_CLAMP)
        nonneg = adv >= 0
        k = torch.where(nonneg, torch.full_like(adv, k_pos), torch.full_like(adv, k_neg))
        lam = torch.where(nonneg, torch.full_like(adv, lambda_pos), torch.full_like(adv, lambda_neg)).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def vespo(logp: Tensor, anchor: Tensor, adv: Tensor, *, seq: Tensor, valid: Tensor, k_pos: float,
          lambda_pos: float, k_neg: float, lambda_neg: float) -> Tensor:
    """VESPO: loss = −φ(w_i)·A·logπ, φ(w) = e^λ·w^k·e^(−λw) of the sequence IS weight; w_t = φ/r_t.

    Variational Sequence-Level Soft Policy Optimization (arXiv 2602.10693), as TRL's loss_type="vespo"
    (get_gamma_weights; k_pos 2, λ_pos 3, k_neg 3, λ_neg 2). φ(1) = 1 and φ peaks at w = k/λ, then decays
    exponentially: a smooth sequence-level trust region instead of a clip. Relative to PPO-clip: one
    detached weight per sequence (the product, not the geometric mean, of its token ratios) scales a
    REINFORCE gradient. TRL folds its vLLM correction π_old/μ into w; with drpo's default behavior anchor
    r = π/μ already is that product.
    """
    phi = vespo_phi(logp, anchor, adv, seq, valid, k_pos=k_pos, lambda_pos=lambda_pos, k_neg=k_neg,
                    lambda_neg=lambda_neg)
    return -phi * adv * logp


def _w_vespo(logp, anchor, adv, *, seq, valid, **hp):
    return vespo_phi(logp, anchor, adv, seq, valid, **hp) / torch.exp(log_ratio(logp, anchor))


# ---- covariance-based (Clip-Cov, KL-Cov): batch-level ----------------------------------------------


def clip_cov(logp: Tensor, anchor: Tensor, adv: Tensor, *, selected: Tensor, eps_low: float, eps_high: float,
             cov_ratio: float, cov_lb: float, cov_ub: float) -> Tensor:
    """Clip-Cov: PPO-clip whose loss is 0 on the `selected` tokens (covariance_selection); w = ppo-clip's × (1 − sel).

    The Entropy Mechanism of RL for reasoning LMs (arXiv 2505.22617), as verl's
    compute_policy_loss_clip_cov (clip_cov_ratio 2e-4, clip_cov_lb 1, clip_cov_ub 5, clip ratio 0.2 both
    sides). Relative to PPO-clip: a random few of the tokens whose covariance between advantage and
    log-prob is large (those that drive entropy collapse) lose their gradient.
    """
    from drpo_cli.objectives.losses import ppo_clip

    loss = ppo_clip(logp, anchor, adv, eps_low=eps_low, eps_high=eps_high, dual_clip=None)
    return torch.where(selected, torch.zeros_like(loss), loss)


def _w_clip_cov(logp, anchor, adv, *, selected, eps_low, eps_high, cov_ratio, cov_lb, cov_ub):
    from drpo_cli.objectives.losses import LOSSES

    w = LOSSES["ppo-clip"].weight(logp, anchor, adv, eps_low=eps_low, eps_high=eps_high, dual_clip=None)
    return torch.where(selected, torch.zeros_like(w), w)


def kl_cov(logp: Tensor, anchor: Tensor, adv: Tensor, *, selected: Tensor, cov_ratio: float,
           cov_kl_coef: float) -> Tensor:
    """KL-Cov: loss = −A·r, plus c·|log r| on the `selected` tokens; w = 1, penalty c·sign(log r) there.

    As verl's compute_policy_loss_kl_cov (kl_cov_ratio 2e-4, ppo_kl_coef 0.1 in verl's actor config).
    Relative to PPO-clip: no clip at all; the top covariance tokens get an |log r| penalty instead.
    """
    logr = log_ratio(logp, anchor)
    penalty = torch.where(selected, cov_kl_coef * logr.abs(), torch.zeros_like(logr))
    return -adv * torch.exp(logr) + penalty


def _w_ones(logp, anchor, adv, **_):
    return torch.ones_like(logp)


def _g_kl_cov(logp, anchor, adv, *, selected, cov_ratio, cov_kl_coef):
    return torch.where(selected, cov_kl_coef * torch.sign(log_ratio(logp, anchor)), torch.zeros_like(logp))


def covariance_selection(name: str, logp: Tensor, anchor: Tensor, adv: Tensor, valid: Tensor, *, seed: int = 0,
                         **hp) -> Tensor:
    """The tokens Clip-Cov / KL-Cov single out (bool, same shape, detached), over ALL the tokens given.

    cov_t = (A_t − mean A)·(logπ_t − mean logπ), means over the valid tokens (logπ detached).
    kl-cov: the k = max(1, int(cov_ratio·n)) largest cov_t (ties: earlier token first).
    clip-cov: among valid tokens not clipped by PPO-clip (−A·clip(r) > −A·r) with cov_lb < cov_t < cov_ub,
    min(k, #candidates) chosen uniformly at random (a permutation from a generator seeded with `seed`;
    candidates in token order), k = max(1, int(cov_ratio·n)). verl computes this per micro-batch with
    the global RNG; drpo passes the whole optimizer step's tokens in global order (train.py), so the
    choice depends neither on the micro-batch size nor on the world size (beyond the rounding of the
    log-probs it reads), and a seed reproduces it.
    """
    with torch.no_grad():
        flat_valid = valid.reshape(-1).bool()
        lp, mu, a = (x.detach().reshape(-1).double() for x in (logp, anchor, adv))
        selected = torch.zeros_like(flat_valid)
        n = int(flat_valid.sum())
        if n == 0:
            return selected.reshape(valid.shape)
        cov = (a - a[flat_valid].mean()) * (lp - lp[flat_valid].mean())  # (N,)
        k = max(int(hp["cov_ratio"] * n), 1)
        if name == "kl-cov":
            idx = torch.nonzero(flat_valid).squeeze(1)
            order = torch.sort(cov[idx], descending=True, stable=True).indices
            selected[idx[order[:k]]] = True
        else:
            r = torch.exp(log_ratio(lp, mu))
            clipped = -a * r.clamp(1.0 - hp["eps_low"], 1.0 + hp["eps_high"]) > -a * r
            cand = flat_valid & ~clipped & (cov > hp["cov_lb"]) & (cov < hp["cov_ub"])
            idx = torch.nonzero(cand).squeeze(1)
            if idx.numel():
                g = torch.Generator().manual_seed(seed)
                selected[idx[torch.randperm(idx.numel(), generator=g)[:k].to(idx.device)]] = True
        return selected.reshape(valid.shape)


# ---- step filters: OPSM and M2PO (usable with any loss) --------------------------------------------


def opsm_keep(logp: Tensor, behavior_logp: Tensor, adv: Tensor, seq: Tensor, valid: Tensor, delta: float) -> Tensor:
    """Off-Policy Sequence Mask: tokens kept (bool, detached) = valid ∧ (A ≥ 0 ∨ mean_{t∈i} log(μ/π) ≤ δ).

    DeepSeek-V3.2 (arXiv 2512.02556, Eq. 9), as TRL's GRPOTrainer.get_off_policy_mask
    (off_policy_mask_threshold): a sequence whose mean log(μ/π) over its trained tokens exceeds δ is
    dropped where its advantage is negative. μ is the sampler's (behavior) log-prob, π the current one,
    so it needs whole sequences and is recomputed at every update. With a per-token advantage the test
    is per token (TRL's broadcast does the same).
    """
    with torch.no_grad():
        kl = _seq(behavior_logp.detach() - logp.detach(), seq, valid, "mean")  # (…,)
        return valid.bool() & ((adv >= 0) | (kl <= delta))


def m2po_keep(behavior_logp: Tensor, old_logp: Tensor, valid: Tensor, threshold: float) -> Tensor:
    """M2PO: tokens kept (bool, detached) after masking the largest m2 = (log μ − log π_old)².

    As AReaL's _apply_m2po_masking / _get_m2po_loss_mask (areal/trainer/ppo/actor.py): the valid tokens
    sorted by m2, largest first (ties: earlier token first); the k largest are masked, k the first
    index where the mean m2 of the rest falls below `threshold` (all but one when none does). AReaL
    applies it per micro-batch; drpo passes the optimizer step's tokens in global order (train.py), so
    the mask depends neither on the micro-batch size nor on the world size.
    """
    with torch.no_grad():
        flat_valid = valid.reshape(-1).bool()
        keep = flat_valid.clone()
        idx = torch.nonzero(flat_valid).squeeze(1)
        if idx.numel() == 0:
            return keep.reshape(valid.shape)
        m2 = (behavior_logp.detach().reshape(-1)[idx].double() - old_logp.detach().reshape(-1)[idx].double()).square()
        sorted_m2, order = torch.sort(m2, descending=True, stable=True)
        n = sorted_m2.numel()
        rest_mean = sorted_m2.flip(0).cumsum(0).flip(0) / torch.arange(n, 0, -1, dtype=torch.float64)
        below = torch.nonzero(rest_mean < threshold)
        k = int(below[0]) if below.numel() else n - 1
        keep[idx[order[:k]]] = False
        return keep.reshape(valid.shape)


# ---- what each later objective / filter would do to a set of tokens (diagnostics) -------------------

# Metric names of each loss's effect (docs/losses.md); sapo's weight distribution is reported as
# weight/sapo_* with drpo's and spo's, dppo-tv-sq's mask as dppo_tv_sq/mask_frac with dppo's.
EFFECT_METRICS: dict[str, tuple[str, ...]] = {
    "gmpo": ("gmpo/clip_frac", "gmpo/seq_clip_frac"),
    "topr": ("topr/truncated_frac",),
    "kimi15": ("kimi15/corrective_frac",),
    "vespo": ("vespo/attenuated_frac", "vespo/seq_attenuated_frac"),
    "clip-cov": ("clip_cov/selected_frac",),
    "kl-cov": ("kl_cov/selected_frac",),
}
# Each filter's fractions; `…/dropped_pos_adv_frac` is the share of what it drops that had A > 0.
FILTER_METRICS = {"opsm": ("opsm/token_drop_frac", "opsm/seq_drop_frac", "opsm/dropped_pos_adv_frac"),
                  "m2po": ("m2po/masked_frac", "m2po/dropped_pos_adv_frac")}


def _count(hit: Tensor, total: int | Tensor) -> tuple[Tensor, Tensor]:
    return hit.sum().double(), torch.as_tensor(float(total), dtype=torch.float64)


def _seq_count(hit: Tensor, seq: Tensor) -> tuple[Tensor, Tensor]:
    """(sequences with at least one hit, sequences)."""
    return (torch.as_tensor(float(torch.unique(seq[hit]).numel()), dtype=torch.float64),
            torch.as_tensor(float(torch.unique(seq).numel()), dtype=torch.float64))


def effect_counts(name: str, hp: dict, logp: Tensor, anchor: Tensor, adv: Tensor, seq: Tensor | None,
                  selected: Tensor | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """{metric: (hits, total)} of loss `name` on flat valid tokens (detached); {} for other losses.

    gmpo: tokens whose log r is clipped in their advantage's direction (w = 0, A ≠ 0), and sequences
    holding one; topr: A < 0 tokens with r > 1 (weight truncated to 1); kimi15: tokens whose gradient
    opposes their advantage (the squared-log-ratio pull wins, A·(A − τ·log r) < 0); vespo: tokens and
    sequences with φ < 0.5; clip-cov / kl-cov: tokens selected (`selected`, else over these tokens).
    Sequence metrics need `seq` (skipped without it).
    """
    from drpo_cli.objectives.losses import gradient_weight

    out: dict[str, tuple[Tensor, Tensor]] = {}
    n = logp.numel()
    if name == "gmpo" and seq is not None:
        hit = (gradient_weight(name, logp, anchor, adv, seq_index=seq, **hp) == 0) & (adv != 0)
        out["gmpo/clip_frac"], out["gmpo/seq_clip_frac"] = _count(hit, n), _seq_count(hit, seq)
    elif name == "topr":
        out["topr/truncated_frac"] = _count((adv < 0) & (log_ratio(logp, anchor) > 0), n)
    elif name == "kimi15":
        pull = adv - hp["tau"] * log_ratio(logp, anchor)  # −(d loss/d logπ)
        out["kimi15/corrective_frac"] = _count((adv != 0) & (adv * pull < 0), n)
    elif name == "vespo" and seq is not None:
        phi = vespo_phi(logp, anchor, adv, seq, torch.ones_like(logp, dtype=torch.bool), **hp)
        out["vespo/attenuated_frac"], out["vespo/seq_attenuated_frac"] = _count(phi < 0.5, n), _seq_count(phi < 0.5, seq)
    elif name in ("clip-cov", "kl-cov"):
        if selected is None:
            selected = covariance_selection(name, logp, anchor, adv, torch.ones_like(logp, dtype=torch.bool), **hp)
        out[f"{name.replace('-', '_')}/selected_frac"] = _count(selected.bool(), n)
    return out


def filter_counts(logp: Tensor, behavior: Tensor, adv: Tensor, seq: Tensor | None, *, opsm_delta: float | None,
                  m2po_threshold: float | None, old_logp: Tensor | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """{metric: (hits, total)} of the OPSM / M2PO filters on flat valid tokens (π_old = `old_logp`, else π)."""
    out: dict[str, tuple[Tensor, Tensor]] = {}
    every = torch.ones_like(logp, dtype=torch.bool)
    if opsm_delta is not None and seq is not None:
        dropped = ~opsm_keep(logp, behavior, adv, seq, every, opsm_delta)
        out["opsm/token_drop_frac"], out["opsm/seq_drop_frac"] = _count(dropped, logp.numel()), _seq_count(dropped, seq)
        out["opsm/dropped_pos_adv_frac"] = dropped_positive(dropped, adv)
    if m2po_threshold is not None:
        masked = ~m2po_keep(behavior, logp if old_logp is None else old_logp, every, m2po_threshold)
        out["m2po/masked_frac"] = _count(masked, logp.numel())
        out["m2po/dropped_pos_adv_frac"] = dropped_positive(masked, adv)
    return out


def dropped_positive(dropped: Tensor, adv: Tensor) -> tuple[Tensor, Tensor]:
    """(dropped tokens with A > 0, dropped tokens): a mask that drops mostly good samples shows (NeMo-RL
    `masked_correct_pct`, prime-rl `masked_advantage_positive`)."""
    return _count(dropped & (adv > 0), dropped.sum())
