"""Ratio-space losses (SPEC.md §1): pg-is, ppo-clip, spo, cispo, topr, kimi15 and the batch-level
clip-cov / kl-cov, each registered at its definition (registry.py).

Conventions of every loss module: `logp` = logπ (the only differentiable input), `anchor` = logμ and
`adv` = A already detached, masked positions already neutralised (losses.py); r = exp(clamp(log r,
±20)). Each loss's weight function gives w with d loss/d logπ = −A·r·w (plus, for kimi15 and kl-cov,
a `penalty` gradient that does not scale with A). Batch-level losses get `selected`, the tokens a
statistic over the whole optimizer step picked (covariance_selection).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from drpo_cli.base.lazy import lazy
from drpo_cli.objectives.counts import fraction
from drpo_cli.objectives.elementwise import log_ratio
from drpo_cli.objectives.registry import NON_NEGATIVE, POSITIVE, UNIT, Bound, LossDoc, Setting, register_loss

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy("torch")

# ---- settings other families declare too (one option each: every loss declaring one agrees on it) ----

EPS_LOW_BOUND = Bound(lambda v: 0 < v <= 1, "in (0, 1] (1: no lower clip)")


def eps_low(default: float | None) -> Setting:
    """ε_low: the ratio's lower clip 1 − ε_low (None: no lower clip)."""
    return Setting(default, EPS_LOW_BOUND, "ε_low of {}.", order=3,
                   library_text="in (0, 1] (1: lower bound 0, no lower clip)")


def eps_high(default: float) -> Setting:
    """ε_high: the ratio's upper clip 1 + ε_high."""
    return Setting(default, POSITIVE, "ε_high of {}.", order=4)


def tau(default: float) -> Setting:
    """τ: the coefficient of a squared-log-ratio penalty (kimi15, dppo-tv-sq)."""
    return Setting(default, NON_NEGATIVE, "Squared-log-ratio coefficient of {}.", order=9)


def cov_ratio(default: float) -> Setting:
    return Setting(default, UNIT, "Share of the step's tokens selected by {}.", order=16)


# ---- pg-is -----------------------------------------------------------------------------------------


def _w_pg_is(logp: Tensor, anchor: Tensor, adv: Tensor) -> Tensor:
    return torch.ones_like(logp)


@register_loss("pg-is", rank=1, weight=_w_pg_is, doc=LossDoc(
    paper="plain importance-sampled PG (PPO paper's L^CPI, arXiv 1707.06347 Eq. 6)",
    loss='`−A·r`',
    weight='`1`',
    defaults='—',
    use=('Reference point, or rollouts that are nearly on-policy. No protection: a stale token keeps its '
         'full, ratio-scaled gradient.'),
    spec_loss='`−A·r`',
    spec_weight='1',
    spec_defaults='—',
    source='plain importance-sampled PG'))
def pg_is(logp: Tensor, anchor: Tensor, adv: Tensor) -> Tensor:
    """Plain importance-sampled policy gradient: loss = −A·r, w = 1.

    The unclipped surrogate of PPO (arXiv 1707.06347, Eq. 6, L^CPI). Relative to PPO-clip: no
    clipping at all, so every token keeps its full gradient however far π has drifted.
    """
    return -adv * torch.exp(log_ratio(logp, anchor))


# ---- ppo-clip --------------------------------------------------------------------------------------


def _w_ppo_clip(logp, anchor, adv, *, eps_low, eps_high, dual_clip):
    r = torch.exp(log_ratio(logp, anchor))
    clipped = ((adv > 0) & (r > 1.0 + eps_high)) | ((adv < 0) & (r < 1.0 - eps_low))
    if dual_clip is not None:
        clipped = clipped | ((adv < 0) & (r > dual_clip))
    return (~clipped).to(logp.dtype)


@register_loss(
    "ppo-clip", rank=2, weight=_w_ppo_clip,
    settings={"eps_low": eps_low(0.2), "eps_high": eps_high(0.28),
              "dual_clip": Setting(None, Bound(lambda v: v > 1, "> 1 (e.g. 3)"), "Dual-clip c > 1 of {}.", order=5,
                                   library_text="> 1 (or None for off)")},
    metrics={"clipped": "ppo_clip/clip_frac", "A > 0 among clipped": "ppo_clip/dropped_pos_adv_frac"},
    zeroing="ppo_clip/clip_frac",
    doc=LossDoc(
    paper=('PPO, arXiv 1707.06347 Eq. 7; clip-higher from DAPO (arXiv 2503.14476); dual clip from arXiv '
           '1912.09729'),
    loss='`max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high))`; with dual clip c and A<0: `min(that, −A·c)`',
    weight='0 where clipped in the harmful direction (A>0 ∧ r>1+ε_high, A<0 ∧ r<1−ε_low, A<0 ∧ r>c), else 1',
    defaults='`eps_low` 0.2, `eps_high` 0.28, `dual_clip` None (off; 3.0 is the usual value when on)',
    use=('The familiar baseline. Its region is in ratio space: rare tokens (small μ) are frozen after '
         'tiny probability moves, frequent ones may move a lot. Turn on the dual clip when '
         'negative-advantage tokens with huge ratios appear.'),
    spec_loss='`max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high))`; with dual-clip c (A<0 only): `min(that, −A·c)`',
    spec_weight=('0 where clipped in the harmful direction (A>0 ∧ r>1+ε_high, A<0 ∧ r<1−ε_low, or '
                 'dual-clipped), else 1'),
    spec_defaults='ε_low 0.2, ε_high 0.28, dual-clip off (c = 3 when on)',
    source='PPO (arXiv 1707.06347), GRPO/DAPO clip-higher'))
def ppo_clip(
    logp: Tensor, anchor: Tensor, adv: Tensor, *, eps_low: float, eps_high: float, dual_clip: float | None
) -> Tensor:
    """PPO-clip: loss = max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high)); dual-clip: min(that, −A·c) for A<0.

    PPO (arXiv 1707.06347, Eq. 7, L^CLIP) with DAPO's asymmetric "clip-higher" bounds (arXiv
    2503.14476) and the optional dual clip of Ye et al. (arXiv 1912.09729), which caps the loss of
    negative-advantage tokens whose ratio exploded. w = 0 where clipped in the harmful direction
    (A>0 ∧ r>1+ε_high, A<0 ∧ r<1−ε_low, or A<0 ∧ r>c), else 1. This is the reference loss.
    """
    r = torch.exp(log_ratio(logp, anchor))
    loss = torch.maximum(-adv * r, -adv * r.clamp(1.0 - eps_low, 1.0 + eps_high))
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return loss


# ---- spo -------------------------------------------------------------------------------------------


def _w_spo(logp, anchor, adv, *, eps):
    r = torch.exp(log_ratio(logp, anchor))
    return 1.0 - torch.sign(adv) * (r - 1.0) / eps  # sign(A·(r−1))·|r−1| = sign(A)·(r−1)


@register_loss("spo", rank=3, weight=_w_spo, settings={"eps": Setting(0.2, POSITIVE, "ε of {}.", order=2)},
               weight_stats=True, metrics={"corrective (w<0)": "weight/spo_corrective_frac",
                                                   "attenuated (w<0.5)": "weight/spo_attenuated_frac"},
               doc=LossDoc(
    paper='Simple Policy Optimization, arXiv 2401.16025',
    loss='`−A·r + abs(A)·(r−1)²/(2ε)`',
    weight='`1 − sign(A·(r−1))·abs(r−1)/ε` (unbounded as μ→0)',
    defaults='`eps` 0.2',
    use=("A smooth ratio-space region: the gradient fades to 0 at r = 1 ± ε in the advantage's direction "
         "and turns corrective beyond, instead of PPO's dead zone. Pushes back hardest on rare tokens."),
    spec_loss='`−A·r + abs(A)·(r−1)² / (2ε)`',
    spec_weight='`1 − sign(A·(r−1))·abs(r−1)/ε` (unbounded as μ→0)',
    spec_defaults='ε 0.2',
    source='SPO (arXiv 2401.16025)'))
def spo(logp: Tensor, anchor: Tensor, adv: Tensor, *, eps: float) -> Tensor:
    """SPO: loss = −A·r + |A|·(r−1)²/(2ε), w = 1 − sign(A·(r−1))·|r−1|/ε.

    Simple Policy Optimization (arXiv 2401.16025, its objective with penalty |A|/(2ε)·(r−1)²).
    Relative to PPO-clip: the hard clip becomes a quadratic penalty in the ratio, so the gradient
    fades to 0 at r = 1 ± ε in the advantage's direction and turns corrective beyond. Because the
    penalty is in r, not in probability, rare tokens (small μ) are pushed back hardest.
    """
    r = torch.exp(log_ratio(logp, anchor))
    return -adv * r + adv.abs() * (r - 1.0).square() / (2.0 * eps)


# ---- cispo -----------------------------------------------------------------------------------------


def _w_cispo(logp, anchor, adv, *, eps_low, eps_high):
    r = torch.exp(log_ratio(logp, anchor))
    lo = 0.0 if eps_low is None else 1.0 - eps_low
    return r.clamp(lo, 1.0 + eps_high) / r


@register_loss("cispo", rank=8, weight=_w_cispo, settings={"eps_low": eps_low(None), "eps_high": eps_high(4.0)},
               reinforce=True, metrics={"weight clipped": "cispo/clip_frac"}, doc=LossDoc(
    paper='CISPO, MiniMax-M1 arXiv 2506.13585 §3.1',
    loss='`−sg(clip(r, 1−ε_low, 1+ε_high))·A·logπ`',
    weight='`clip(r)/r`',
    defaults=("`eps_low` None (no lower clip, as the paper), `eps_high` 4 (weight ≤ 5, TRL's ε_max after "
              'ScaleRL)'),
    use=('Compare with a CISPO run. REINFORCE with a bounded, detached IS weight: no token loses its '
         'gradient, so rare tokens keep learning; nothing pulls a drifted token back.'),
    spec_loss='`−sg(clip(r, 1−ε_low, 1+ε_high))·A·logπ` (value in REINFORCE form)',
    spec_weight='`clip(r)/r` (never 0)',
    spec_defaults='ε_low off (no lower clip; `--eps-low 1` is the same: bound 0), ε_high 4 (weight ≤ 5)',
    source=('CISPO, MiniMax-M1 arXiv 2506.13585 §3.1; verl `compute_policy_loss_cispo`; TRL '
            '`loss_type="cispo"` (ε_max 5 after ScaleRL, arXiv 2510.13786)')))
def cispo(logp: Tensor, anchor: Tensor, adv: Tensor, *, eps_low: float | None, eps_high: float) -> Tensor:
    """CISPO: loss = −sg(clip(r, 1−ε_low, 1+ε_high))·A·logπ; w = clip(r)/r.

    Clipped IS-weight Policy Optimization (MiniMax-M1, arXiv 2506.13585, §3.1), as in verl's
    compute_policy_loss_cispo and TRL's loss_type="cispo". Relative to PPO-clip: the IS weight is
    clipped and detached instead of the surrogate, so no token ever loses its gradient (REINFORCE
    with a bounded weight). The paper sets no lower bound (ε_low None here); ε_high = 4 caps the
    weight at 5, the ε_max = 5 TRL recommends after ScaleRL (arXiv 2510.13786). The value is the
    REINFORCE form −w·A·logπ (not −A·r), as in both references.
    """
    r = torch.exp(log_ratio(logp, anchor)).detach()
    lo = 0.0 if eps_low is None else 1.0 - eps_low
    return -r.clamp(lo, 1.0 + eps_high) * adv * logp


# ---- topr ------------------------------------------------------------------------------------------


def _topr_coef(logp: Tensor, anchor: Tensor, adv: Tensor) -> Tensor:
    r = torch.exp(log_ratio(logp, anchor)).detach()
    return torch.where(adv > 0, torch.ones_like(r), r.clamp(0.0, 1.0))


def _w_topr(logp, anchor, adv):
    return _topr_coef(logp, anchor, adv) / torch.exp(log_ratio(logp, anchor))


def _topr_effects(hp, logp, anchor, adv, seq, selected):
    """A < 0 tokens with r > 1 (weight truncated to 1)."""
    return {"topr/truncated_frac": fraction((adv < 0) & (log_ratio(logp, anchor) > 0), logp.numel())}


@register_loss("topr", rank=11, weight=_w_topr, reinforce=True, metrics={"truncated": "topr/truncated_frac"},
               effects=_topr_effects, effect_metrics=("topr/truncated_frac",), doc=LossDoc(
    paper='TOPR, arXiv 2503.14286 Eq. 8',
    loss='A>0: `−A·logπ`; A≤0: `−sg(clip(r, 0, 1))·A·logπ`',
    weight='A>0: `1/r`; A≤0: `min(r, 1)/r`',
    defaults='—',
    use=('Very stale data with many negative examples: positives are learned like SFT (no IS weight, so '
         'rare good tokens keep learning), negatives only with a truncated weight (never pushed down '
         'harder than on-policy). Nothing pulls a drifted token back.'),
    spec_loss='A>0: `−A·logπ`; A≤0: `−sg(clip(r, 0, 1))·A·logπ` (REINFORCE form)',
    spec_weight='A>0: `1/r`; A≤0: `min(r, 1)/r`',
    spec_defaults='—',
    source=('TOPR, arXiv 2503.14286 Eq. 8; ROLL '
            '`roll/pipeline/agentic/agentic_actor_pg_worker.py::_compute_topr_loss` (8eb27cc; ROLL splits'
            ' by episode score > 0, drpo by the advantage sign; its topr_positive/negative_weight 1.0 are'
            ' not exposed)')))
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


# ---- kimi15 ----------------------------------------------------------------------------------------


def _w_reinforce(logp, anchor, adv, **_):
    return 1.0 / torch.exp(log_ratio(logp, anchor))


def _g_kimi15(logp, anchor, adv, *, tau):
    return tau * log_ratio(logp, anchor)


def _kimi15_effects(hp, logp, anchor, adv, seq, selected):
    """Tokens whose gradient opposes their advantage (the squared-log-ratio pull wins, A·(A − τ·log r) < 0)."""
    pull = adv - hp["tau"] * log_ratio(logp, anchor)  # −(d loss/d logπ)
    return {"kimi15/corrective_frac": fraction((adv != 0) & (adv * pull < 0), logp.numel())}


@register_loss("kimi15", rank=12, weight=_w_reinforce, settings={"tau": tau(0.1)}, penalty=_g_kimi15,
               reinforce=True, metrics={"corrective": "kimi15/corrective_frac"}, effects=_kimi15_effects,
               effect_metrics=("kimi15/corrective_frac",), doc=LossDoc(
    paper='Kimi k1.5, arXiv 2501.12599 Eq. 3',
    loss='`−A·logπ + (τ/2)·(log r)²`',
    weight='`1/r`, plus the A-free gradient `τ·log r`',
    defaults='`tau` 0.1',
    use=('Off-policy REINFORCE with an L2 pull of log π back to log μ on every token (zero-advantage ones'
         ' too): a soft, symmetric log-space region. `kimi15/corrective_frac` says where the pull already'
         ' outweighs the advantage.'),
    spec_loss='`−A·logπ + (τ/2)·(log r)²`',
    spec_weight='`1/r`, plus the A-free penalty gradient `τ·log r`: `d loss/d logπ = −A + τ·log r`',
    spec_defaults='τ 0.1',
    source=('Kimi k1.5, arXiv 2501.12599 Eq. 3; ROLL `agentic_actor_pg_worker.py::_compute_kimi15_loss` '
            '(pg_variant `kimi15`, 8eb27cc)')))
def kimi15(logp: Tensor, anchor: Tensor, adv: Tensor, *, tau: float) -> Tensor:
    """Kimi k1.5: loss = −A·logπ + (τ/2)·(log r)²; w = 1/r, plus the penalty gradient τ·log r.

    Kimi k1.5 (arXiv 2501.12599, Eq. 3), as ROLL's _compute_kimi15_loss (pg_variant "kimi15", τ 0.1).
    Relative to PPO-clip: REINFORCE on the sampled tokens with a quadratic pull of log π back to log μ
    that does not depend on the advantage, so it acts on zero-advantage tokens too.
    """
    return -adv * logp + 0.5 * tau * log_ratio(logp, anchor).square()


# ---- covariance-based (Clip-Cov, KL-Cov): batch-level ----------------------------------------------


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


def _selection_effects(name: str):
    """The share of tokens selected (`selected`, else chosen over these tokens)."""
    metric = f"{name.replace('-', '_')}/selected_frac"

    def effects(hp, logp, anchor, adv, seq, selected):
        if selected is None:
            selected = covariance_selection(name, logp, anchor, adv, torch.ones_like(logp, dtype=torch.bool), **hp)
        return {metric: fraction(selected.bool(), logp.numel())}

    return effects


def _w_clip_cov(logp, anchor, adv, *, selected, eps_low, eps_high, cov_ratio, cov_lb, cov_ub):
    w = _w_ppo_clip(logp, anchor, adv, eps_low=eps_low, eps_high=eps_high, dual_clip=None)
    return torch.where(selected, torch.zeros_like(w), w)


@register_loss(
    "clip-cov", rank=15, weight=_w_clip_cov, level="batch",
    settings={"eps_low": eps_low(0.2), "eps_high": eps_high(0.2), "cov_ratio": cov_ratio(2e-4),
              "cov_lb": Setting(1.0, None, "Lower covariance bound of a selected candidate of {}.", order=17),
              "cov_ub": Setting(5.0, None, "Upper covariance bound of a selected candidate of {}.", order=18)},
    metrics={"selected": "clip_cov/selected_frac"}, effects=_selection_effects("clip-cov"),
    effect_metrics=("clip_cov/selected_frac",), doc=LossDoc(
    paper='Clip-Cov, arXiv 2505.22617 (batch-level)',
    loss=("ppo-clip's loss, 0 on a random `cov_ratio` share of the unclipped tokens with `cov_lb < cov_t "
          '< cov_ub`'),
    weight="ppo-clip's w, 0 on selected tokens",
    defaults='`eps_low` 0.2, `eps_high` 0.2, `cov_ratio` 2e-4, `cov_lb` 1, `cov_ub` 5',
    use=('Entropy collapse: the tokens whose advantage and log-prob covary most drive it; detaching a few'
         " keeps entropy up. `clip_cov/selected_frac` is 0 when no token's covariance reaches `cov_lb` "
         '(common with small advantages).'),
    spec_loss=("ppo-clip's loss, 0 on the selected tokens; selected: among trained tokens not clipped by "
               'ppo-clip with `cov_lb < cov_t < cov_ub`, `cov_t = (A_t − mean A)·(logπ_t − mean logπ)`, '
               '`max(1, ⌊cov_ratio·N⌋)` at random (seeded)'),
    spec_weight="ppo-clip's w, 0 on selected tokens",
    spec_defaults='ε_low 0.2, ε_high 0.2, cov_ratio 2e-4, cov_lb 1, cov_ub 5',
    source='Clip-Cov, arXiv 2505.22617; verl `core_algos.py::compute_policy_loss_clip_cov` (b178a3c)'))
def clip_cov(logp: Tensor, anchor: Tensor, adv: Tensor, *, selected: Tensor, eps_low: float, eps_high: float,
             cov_ratio: float, cov_lb: float, cov_ub: float) -> Tensor:
    """Clip-Cov: PPO-clip whose loss is 0 on the `selected` tokens (covariance_selection); w = ppo-clip's × (1 − sel).

    The Entropy Mechanism of RL for reasoning LMs (arXiv 2505.22617), as verl's
    compute_policy_loss_clip_cov (clip_cov_ratio 2e-4, clip_cov_lb 1, clip_cov_ub 5, clip ratio 0.2 both
    sides). Relative to PPO-clip: a random few of the tokens whose covariance between advantage and
    log-prob is large (those that drive entropy collapse) lose their gradient.
    """
    loss = ppo_clip(logp, anchor, adv, eps_low=eps_low, eps_high=eps_high, dual_clip=None)
    return torch.where(selected, torch.zeros_like(loss), loss)


def _w_ones(logp, anchor, adv, **_):
    return torch.ones_like(logp)


def _g_kl_cov(logp, anchor, adv, *, selected, cov_ratio, cov_kl_coef):
    return torch.where(selected, cov_kl_coef * torch.sign(log_ratio(logp, anchor)), torch.zeros_like(logp))


@register_loss(
    "kl-cov", rank=16, weight=_w_ones, level="batch", penalty=_g_kl_cov,
    settings={"cov_ratio": cov_ratio(2e-4),
              "cov_kl_coef": Setting(0.1, NON_NEGATIVE, "|log r| penalty coefficient on the selected tokens of {}.",
                                     order=19)},
    metrics={"selected": "kl_cov/selected_frac"}, effects=_selection_effects("kl-cov"),
    effect_metrics=("kl_cov/selected_frac",), doc=LossDoc(
    paper='KL-Cov, arXiv 2505.22617 (batch-level)',
    loss='`−A·r`, plus `c·abs(log r)` on the `cov_ratio` share of tokens with the largest cov_t',
    weight='`1`, plus `c·sign(log r)` on selected tokens',
    defaults='`cov_ratio` 2e-4, `cov_kl_coef` 0.1',
    use=('As clip-cov, with a KL-like penalty on the top-covariance tokens instead of detaching them; no '
         'clip elsewhere.'),
    spec_loss='`−A·r`, plus `c·abs(log r)` on the `max(1, ⌊cov_ratio·N⌋)` trained tokens of largest cov_t',
    spec_weight='`1`, plus the penalty gradient `c·sign(log r)` on selected tokens',
    spec_defaults='cov_ratio 2e-4, c (`cov_kl_coef`) 0.1',
    source=('KL-Cov, arXiv 2505.22617; verl `core_algos.py::compute_policy_loss_kl_cov` (b178a3c; c = '
            "verl's actor-config ppo_kl_coef 0.1)")))
def kl_cov(logp: Tensor, anchor: Tensor, adv: Tensor, *, selected: Tensor, cov_ratio: float,
           cov_kl_coef: float) -> Tensor:
    """KL-Cov: loss = −A·r, plus c·|log r| on the `selected` tokens; w = 1, penalty c·sign(log r) there.

    As verl's compute_policy_loss_kl_cov (kl_cov_ratio 2e-4, ppo_kl_coef 0.1 in verl's actor config).
    Relative to PPO-clip: no clip at all; the top covariance tokens get an |log r| penalty instead.
    """
    logr = log_ratio(logp, anchor)
    penalty = torch.where(selected, cov_kl_coef * logr.abs(), torch.zeros_like(logr))
    return -adv * torch.exp(logr) + penalty
