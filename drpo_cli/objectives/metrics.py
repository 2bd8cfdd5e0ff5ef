"""The stable metric names of `drpo inspect` (SPEC.md §2, docs/inspect.md), each with its one-line
meaning, and the name rules the options use: `--fail-above` gates (resolve_metric) and `--worst-by`.
Torch-free: config.py checks a gate's name before anything runs; the report schemas list the same names.
"""

from __future__ import annotations

from drpo_cli.base.errors import ConfigError

INSPECT_DATA_METRICS: dict[str, str] = {
    "data/rows": "rollout rows",
    "data/tokens": "response tokens with loss_mask 1",
    "data/response_tokens": "all response tokens",
    "data/zero_adv_frac": "share of tokens whose advantage is exactly 0 (no gradient)",
    "data/rare_token_frac": "share of tokens the sampler drew with μ ≤ 0.01",
    "data/neg_logmu_mean": "mean −log μ of the sampled tokens",
    "data/adv_abs_mean": "mean |A|",
    "data/response_len_mean": "mean response length (tokens, all rows)",
    "data/response_len_max": "longest response (tokens)",
    "data/duplicate_ids": "rows whose sample_id repeats an earlier row's",
    "data/stale_frac": "share of tokens with staleness lag > 0 (0 when versions are unknown)",
    "data/lag_max": "largest staleness lag (0 when versions are unknown)",
}
INSPECT_MODEL_METRICS: dict[str, str] = {
    "tr/outside_frac": "share of tokens with |Δ| > tr_delta",
    "tr/harmful_frac": "share outside in the advantage's direction (A>0 ∧ Δ>δ or A<0 ∧ Δ<−δ)",
    "tr/outside_up_frac": "share with Δ > tr_delta",
    "tr/outside_down_frac": "share with Δ < −tr_delta",
    "delta/abs_mean": "mean |Δ| = |π − μ|",
    "delta/abs_max": "max |Δ|",
    **{f"delta/abs_{q}": f"{q} of |Δ|" for q in ("p50", "p90", "p99", "p999")},
    "ratio/mean": "mean r = π/μ (log r clamped to ±20)",
    "ratio/min": "min r",
    "ratio/max": "max r",
    **{f"ratio/{q}": f"{q} of r" for q in ("p1", "p50", "p90", "p99", "p999")},
    "logr/mean": "mean log r = log π − log μ",
    "logr/std": "standard deviation of log r",
    "logr/abs_max": "the log r of largest magnitude",
    "kl/k1_mean": "mean k1 = −log r, estimates KL(μ‖π)",
    "kl/k2_mean": "mean k2 = ½ log² r",
    "kl/k3_mean": "mean k3 = (r − 1) − log r",
    "kl/binary_mean": "mean Binary-KL D(μ‖π) of the sampled token",
    "kl/binary_max": "max Binary-KL",
    "tv/binary_mean": "mean Binary-TV |Δ| (same as delta/abs_mean)",
    "entropy/mean": "mean entropy of π over the vocabulary (at the sampling temperature)",
    "ppo_clip/clip_frac": "share ppo-clip zeroes (clipped in the harmful direction) at its defaults",
    "dppo_tv/mask_frac": "share dppo-tv masks at its default δ",
    "dppo_kl/mask_frac": "share dppo-kl masks at its default δ",
    "gspo/clip_frac": "share of tokens whose sequence ratio s gspo clips in the harmful direction (defaults)",
    "gspo/seq_clip_frac": "share of sequences gspo clips (s outside [1−ε_low, 1+ε_high] in A's harmful direction)",
    "cispo/clip_frac": "share of tokens whose cispo IS weight is clipped (r > 1 + ε_high at its defaults)",
    "reject/token_frac": "share of tokens the --reject criteria reject (null without --reject)",
    "reject/seq_frac": "share of sequences with a token the --reject criteria reject",
    "veto/token_frac": "share of tokens with ρ = π/μ below --is-veto (null without it)",
    "veto/seq_frac": "share of sequences --is-veto drops (a token with ρ below the threshold)",
    "is/batch_norm_factor": "mean behavior weight over the audited tokens (sequences): --is-batch-norm's divisor",
    "weight/drpo_corrective_frac": "share with DRPO weight w < 0 at the chosen δ (first --delta, else 12.5)",
    "weight/drpo_attenuated_frac": "share with DRPO weight w < 0.5 at the chosen δ",
    "weight/spo_corrective_frac": "share with SPO weight w < 0 at its default ε",
    "weight/spo_attenuated_frac": "share with SPO weight w < 0.5 at its default ε",
    **{f"weight/{loss}_{k}": f"{k} of the {loss.upper()} weight w" for loss in ("drpo", "spo")
       for k in ("mean", "min", "max", "p1", "p10", "p50", "p90", "p99")},
    # The later objectives and filters (docs/losses.md), each at its reference's defaults.
    "weight/sapo_corrective_frac": "share with SAPO weight w < 0 (always 0: the soft gate never reverses)",
    "weight/sapo_attenuated_frac": "share whose SAPO soft gate attenuates the weight below 0.5",
    **{f"weight/sapo_{k}": f"{k} of the SAPO weight w = 4σ(1 − σ)"
       for k in ("mean", "min", "max", "p1", "p10", "p50", "p90", "p99")},
    "gmpo/clip_frac": "share of tokens whose log r gmpo clips in the advantage's direction (no gradient)",
    "gmpo/seq_clip_frac": "share of sequences with a token gmpo clips",
    "topr/truncated_frac": "share of A < 0 tokens with r > 1, whose topr weight is truncated to 1",
    "kimi15/corrective_frac": "share whose kimi15 gradient opposes the advantage (the (τ/2)·log²r pull wins)",
    "dppo_tv_sq/mask_frac": "share dppo-tv-sq (prime-rl) masks at its default thresholds",
    "vespo/attenuated_frac": "share of tokens whose VESPO sequence weight φ(w) is below 0.5",
    "vespo/seq_attenuated_frac": "share of sequences whose VESPO weight φ(w) is below 0.5",
    "clip_cov/selected_frac": "share clip-cov selects (loss zeroed), over each audited batch",
    "kl_cov/selected_frac": "share kl-cov selects (|log r| penalty), over each audited batch",
    "opsm/token_drop_frac": "share of tokens OPSM drops at --opsm-delta (0.5): A < 0, sequence mean log(μ/π) > δ",
    "opsm/seq_drop_frac": "share of sequences OPSM drops a token of",
    "m2po/masked_frac": "share M2PO masks at --m2po-threshold (0.04), π_old = the model, over each audited batch",
    # Other trainers' mismatch dashboards under drpo's names (docs/inspect.md maps them; SPEC.md §2 defines them).
    # r = π/μ per trained token, R = exp(Σ_t log r_t) per row (log r, log R clamped to ±20).
    "is/ess_token": "effective sample size of the token weights r, (Σr)² / (N·Σr²) in (0, 1]",
    "is/ess_seq": "effective sample size of the sequence weights R, (ΣR)² / (M·ΣR²) over rows",
    "chi2/token": "χ²(π‖μ) per token, mean(r²) − 1",
    "chi2/seq": "χ² per sequence, mean over rows of R² − 1",
    "kl/reverse_mean": "mean r·log r, estimates KL(π‖μ) from μ's samples",
    "kl/reverse_k3_mean": "mean 1/r − 1 + log r (NeMo-RL policy_kl_error; not importance-weighted)",
    "kl/js_mean": "NeMo-RL's Jensen-Shannon estimate, mean ½·k3(π/m) + ½·k3(μ/m), m = (π + μ)/2",
    "kl/k3_over_entropy": "kl/k3_mean / entropy/mean (prime-rl kl_ent_ratio)",
    "prob/pearson": "Pearson correlation of π and μ over tokens",
    "prob/mult_error_mean": "mean exp(|log r|) (NeMo-RL token_mult_prob_error)",
    "delta/abs_std": "standard deviation of |Δ| (population)",
    "logr/abs_mean": "mean |log r|",
    "is/catastrophic_token_frac": "share of tokens with r below the catastrophic threshold (--is-veto, else 1e-4)",
    "is/catastrophic_seq_frac": "share of rows holding a catastrophic token",
    "ppl/log_diff_mean": "mean over rows of mean_t log μ − mean_t log π (log of π's perplexity over μ's)",
    "ppl/log_abs_diff_mean": "mean over rows of |mean_t log μ − mean_t log π|",
    "ppl/log_diff_max": "largest row's mean_t log μ − mean_t log π",
    "ppl/log_diff_min": "smallest row's mean_t log μ − mean_t log π",
    "ppl/ratio_mean": "mean over rows of exp(mean_t log μ − mean_t log π): π's perplexity over μ's",
    "ppl/policy_mean": "mean over rows of π's perplexity exp(−mean_t log π)",
    "ppl/policy_log_mean": "mean over rows of −mean_t log π",
    "ppl/behavior_mean": "mean over rows of μ's perplexity exp(−mean_t log μ)",
    "ppl/behavior_log_mean": "mean over rows of −mean_t log μ",
    **{f"{ns}/dropped_pos_adv_frac": f"share of the tokens {what} drops that have A > 0 (null when it drops none)"
       for ns, what in (("ppo_clip", "ppo-clip"), ("dppo_tv", "dppo-tv"), ("dppo_kl", "dppo-kl"),
                        ("dppo_tv_sq", "dppo-tv-sq"), ("gspo", "gspo's clip"), ("reject", "--reject"),
                        ("veto", "--is-veto"), ("opsm", "OPSM"), ("m2po", "M2PO"))},
}

# What `inspect --worst-by` may rank the worst sequences by: each metric's value over one sequence
# (inspect_model.WORST_BY_SCORES; chi2/seq, ppl/* and logr/abs_max by the sequence's own R, gap or extreme).
WORST_BY = ("tr/harmful_frac", "tr/outside_frac", "delta/abs_mean", "delta/abs_max", "kl/k1_mean", "kl/k3_mean",
            "kl/reverse_mean", "kl/reverse_k3_mean", "kl/js_mean", "chi2/token", "chi2/seq", "prob/mult_error_mean",
            "ppl/log_diff_mean", "ppl/log_abs_diff_mean", "ppl/ratio_mean", "logr/abs_mean", "logr/abs_max",
            "is/catastrophic_token_frac")


def inspect_metric_names(with_model: bool) -> list[str]:
    return list(INSPECT_DATA_METRICS) + (list(INSPECT_MODEL_METRICS) if with_model else [])


def _short_names(name: str, candidates) -> list[str]:
    """Metrics whose name after the namespace is `name`, with or without `_frac` (`harmful`)."""
    return [m for m in candidates if name in (m.split("/", 1)[1], m.split("/", 1)[1].removesuffix("_frac"))]


def resolve_metric(name: str, with_model: bool) -> str:
    """A gate's metric name -> its stable name; unique short forms work (`harmful` -> tr/harmful_frac).

    Raises ConfigError listing the valid names for this mode.
    """
    valid = inspect_metric_names(with_model)
    if name in valid:
        return name
    short = _short_names(name, valid)
    if len(short) == 1:
        return short[0]
    if not with_model and (name in INSPECT_MODEL_METRICS or _short_names(name, INSPECT_MODEL_METRICS)):
        raise ConfigError(f"--fail-above {name}: needs --model (data-only metrics: {', '.join(valid)})")
    reason = f"ambiguous ({', '.join(short)})" if short else "unknown metric"
    raise ConfigError(f"--fail-above {name}: {reason}; valid names: {', '.join(valid)}")

