"""The losses' option tables, torch-free: config.py validates with them before torch is imported,
losses.py registers and checks with the same objects, and the command-line help is written from them.
"""

from __future__ import annotations

# Hyper-parameters each loss accepts and their defaults (SPEC.md §1); None: off. The loss registry
# (losses.LOSSES) takes its defaults from here, one entry per loss in this order.
LOSS_HPARAMS: dict[str, dict[str, float | None]] = {
    "pg-is": {},
    "ppo-clip": {"eps_low": 0.2, "eps_high": 0.28, "dual_clip": None},
    "spo": {"eps": 0.2},
    "dppo-tv": {"delta": 0.15, "ratio_cap": 20.0},
    "dppo-kl": {"delta": 0.05, "ratio_cap": 20.0},
    "drpo": {"delta": 12.5},
    "gspo": {"eps_low": 3e-4, "eps_high": 4e-4},
    "cispo": {"eps_low": None, "eps_high": 4.0},
    "sapo": {"tau_pos": 1.0, "tau_neg": 1.05},
    "gmpo": {"eps_low": 0.4, "eps_high": 0.4},
    "topr": {},
    "kimi15": {"tau": 0.1},
    "dppo-tv-sq": {"delta_low": 0.2, "delta_high": 0.2, "tau": 1e-3},
    "vespo": {"k_pos": 2.0, "lambda_pos": 3.0, "k_neg": 3.0, "lambda_neg": 2.0},
    "clip-cov": {"eps_low": 0.2, "eps_high": 0.2, "cov_ratio": 2e-4, "cov_lb": 1.0, "cov_ub": 5.0},
    "kl-cov": {"cov_ratio": 2e-4, "cov_kl_coef": 0.1},
}
LOSS_NAMES = tuple(LOSS_HPARAMS)
# Every hyper-parameter name, in the order of the command-line options (a TrainConfig field each).
HPARAM_NAMES = ("delta", "eps", "eps_low", "eps_high", "dual_clip", "ratio_cap", "tau_pos", "tau_neg", "tau",
                "delta_low", "delta_high", "k_pos", "lambda_pos", "k_neg", "lambda_neg", "cov_ratio", "cov_lb",
                "cov_ub", "cov_kl_coef")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
DEFAULT_HORIZON = 8192  # H of seq-mean-token-sum-norm
IS_CORRECTIONS = ("none", "tis", "mis", "is")  # behavior weights of the decoupled (proximal-anchor) mode
IS_LEVELS = ("token", "sequence", "geometric")
IS_CAP = 2.0  # tis cap when none is given
IS_BAND = (0.5, 2.0)  # mis kept band when none is given
REJECT_LEVELS = ("token", "seq_sum", "seq_mean", "seq_max")
KL_ESTIMATORS = ("k1", "k2", "k3")


def number(value: float | None) -> str:
    """A default as the help text writes it: 12.5, 0.0003, 20; None: off."""
    return "off" if value is None else f"{value:g}"


def defaults_of(name: str) -> str:
    """Which losses take hyper-parameter `name` and their defaults, e.g. 'dppo-tv (0.15), drpo (12.5)'."""
    return ", ".join(f"{loss} ({number(hp[name])})" for loss, hp in LOSS_HPARAMS.items() if name in hp)
