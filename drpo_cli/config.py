"""Frozen configuration dataclasses, one per command, validated before any heavy work.

`validate()` returns every problem at once (one line each); `check()` raises a ConfigError that
lists them. Nothing here imports torch: a bad option must fail in milliseconds, before a model
or a rollout file is opened.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

from drpo_cli.errors import ConfigError
from drpo_cli.outputs import Output, output_problems, state_dir

# Hyper-parameters each loss accepts and their defaults (SPEC.md §1). A test keeps this table equal to
# losses.DEFAULTS, which cannot be imported here because losses imports torch.
LOSS_HPARAMS: dict[str, dict[str, float | None]] = {
    "pg-is": {},
    "ppo-clip": {"eps_low": 0.2, "eps_high": 0.28, "dual_clip": None},
    "spo": {"eps": 0.2},
    "dppo-tv": {"delta": 0.15, "ratio_cap": 20.0},
    "dppo-kl": {"delta": 0.05, "ratio_cap": 20.0},
    "drpo": {"delta": 12.5},
    "gspo": {"eps_low": 3e-4, "eps_high": 4e-4},
    "cispo": {"eps_low": None, "eps_high": 4.0},
}
HPARAM_NAMES = ("delta", "eps", "eps_low", "eps_high", "dual_clip", "ratio_cap")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
ANCHORS = ("behavior", "proximal")
IS_CORRECTIONS = ("none", "tis", "mis", "is")
IS_LEVELS = ("token", "sequence", "geometric")
KL_ESTIMATORS = ("k1", "k2", "k3")
DEFAULT_KL_COEF = 0.001  # verl's kl_loss_coef default
REJECT_LEVELS = ("token", "seq_sum", "seq_mean", "seq_max")
REJECT_EXAMPLE = "seq_mean_k3>0.01"
ADV_NORMS = ("none", "std")
CORRECTIONS = ("none", "seq-mask-tis")  # named compositions of --is-* and --reject (expand_correction)
SEQ_MASK_TIS_BAND = (0.999, 1.002)  # NeMo-RL's recommended bounds (examples/configs/prorlv2_1_moe.v2.yaml)
REJECT_MODES = ("mask", "zero")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "bf16", "fp16", "fp32")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_columns(specs: tuple[str, ...] | list[str]) -> tuple[dict[str, str], list[str]]:
    """`("logged=drpo_name", ...)` -> ({logged: drpo_name}, problems)."""
    from drpo_cli.schema import column_map_problems  # pyarrow, no torch

    return column_map_problems(specs)


def parse_reject(spec: str) -> tuple[tuple[str, str, str, float] | None, str | None]:
    """`LEVEL_kN>X` or `LEVEL_kN<X` -> ((level, "kN", op, X), None), or (None, problem).

    LEVEL is token, seq_sum, seq_mean or seq_max; N is 1, 2 or 3 (e.g. seq_mean_k3>0.01 rejects the
    sequences whose mean k3 exceeds 0.01). The criterion rejects where the comparison holds.
    """
    text = spec.replace(" ", "")
    op = ">" if ">" in text else "<" if "<" in text else None
    name, _, raw = text.partition(op) if op else (text, "", "")
    level, _, estimator = name.rpartition("_")
    try:
        threshold = float(raw)
    except ValueError:
        threshold = math.nan
    if op is None or level not in REJECT_LEVELS or estimator not in KL_ESTIMATORS or not math.isfinite(threshold):
        return None, (f"--reject {spec!r}: expected LEVEL_kN>NUMBER or LEVEL_kN<NUMBER with LEVEL one of "
                      f"{', '.join(REJECT_LEVELS)} and N 1, 2 or 3, e.g. {REJECT_EXAMPLE}")
    return (level, estimator, op, threshold), None


def parse_rejects(specs: tuple[str, ...]) -> tuple[list[tuple[str, str, str, float]], list[str]]:
    """Every `--reject` criterion parsed, and a problem line for each bad one."""
    parsed = [parse_reject(spec) for spec in specs]
    return [c for c, _ in parsed if c is not None], [p for _, p in parsed if p is not None]


def correction_problems(cfg) -> list[str]:
    """Problems with --is-veto, --correction and --reject-mode (train and inspect configs alike)."""
    p = []
    if cfg.is_veto is not None and not (math.isfinite(cfg.is_veto) and 0 < cfg.is_veto < 1):
        p.append(f"--is-veto must be in (0, 1) (a ratio π_old/μ below which the sequence is dropped), got {cfg.is_veto}")
    _choice(p, "correction", cfg.correction, CORRECTIONS)
    if cfg.reject_mode is not None:
        _choice(p, "reject_mode", cfg.reject_mode, REJECT_MODES)
    if cfg.correction == "seq-mask-tis":
        if cfg.is_correction not in ("none", "is") or cfg.is_level != "token" or cfg.is_cap is not None:
            p.append("--correction seq-mask-tis sets --is-correction is at --is-level token; leave those and --is-cap out")
        if cfg.reject_mode == "mask":
            p.append("--correction seq-mask-tis zeroes the masked sequences' weights (--reject-mode zero), not mask")
    if cfg.is_band is not None and cfg.correction == "seq-mask-tis":
        lo, hi = cfg.is_band
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
            p.append(f"--is-band must satisfy 0 <= lo < hi, got {lo} {hi}")
    return p


def expand_correction(cfg):
    """`cfg` with --correction spelled out as the options it stands for (correction "none" afterwards).

    seq-mask-tis (NeMo-RL's `truncated_importance_sampling_type: seq-mask-tis`): a sequence whose
    geometric-mean ρ = exp(mean_t log ρ_t) is outside [lo, hi] (--is-band, default SEQ_MASK_TIS_BAND)
    gets weight 0 and the others the raw token ρ_t. As options: --is-correction is, and --reject
    seq_mean_k1>−log(lo) and seq_mean_k1<−log(hi) (mean k1 = −log of the geometric mean) in
    --reject-mode zero (the masked sequences stay in the aggregation denominators, as in NeMo-RL).
    """
    from dataclasses import replace

    reject_mode = cfg.reject_mode or "mask"
    if cfg.correction != "seq-mask-tis":
        return replace(cfg, reject_mode=reject_mode)
    lo, hi = cfg.is_band if cfg.is_band is not None else SEQ_MASK_TIS_BAND
    band = ((f"seq_mean_k1>{-math.log(lo)!r}",) if lo > 0 else ()) + (f"seq_mean_k1<{-math.log(hi)!r}",)
    return replace(cfg, correction="none", is_correction="is", is_band=None, reject=tuple(cfg.reject) + band,
                   reject_mode="zero")


def staleness_problems(max_lag: int | None, min_version: int | None) -> list[str]:
    """Problems with --max-lag / --min-version (both commands)."""
    p = []
    for name, value in (("max_lag", max_lag), ("min_version", min_version)):
        if value is not None and value < 0:
            p.append(f"{_flag(name)} must be >= 0, got {value}")
    return p


@dataclass(frozen=True)
class TrainConfig:
    """Everything `drpo train` does is decided by these fields (SPEC.md §1, §4)."""

    rollouts: tuple[str, ...]
    """Rollout files or directories (Arrow IPC file/stream or Parquet); one or more."""
    model: str
    """Input Hugging Face checkpoint directory (safetensors); never modified."""
    out: str | None = None
    """Output checkpoint directory; default: a sibling named after the input and the new policy version."""
    loss: str = "drpo"
    """Surrogate loss, one of SPEC.md §1: pg-is, ppo-clip, spo, dppo-tv, dppo-kl, drpo, gspo, cispo."""
    delta: float | None = None
    """Trust-region size δ of drpo / dppo-tv / dppo-kl (None: the loss's default)."""
    eps: float | None = None
    """SPO's ε (None: 0.2)."""
    eps_low: float | None = None
    """Lower clip ε_low of ppo-clip (None: 0.2), gspo (3e-4) and cispo (None: no lower clip)."""
    eps_high: float | None = None
    """Upper clip ε_high of ppo-clip (None: 0.28, DAPO clip-higher), gspo (4e-4) and cispo (4: weight ≤ 5)."""
    dual_clip: float | None = None
    """PPO dual-clip constant c > 1 for A < 0 (None: off)."""
    ratio_cap: float | None = None
    """DPPO's cap C on the detached ratio in the gradient (None: 20)."""
    anchor: str = "behavior"
    """Anchor log-probs μ: the sampler's (behavior) or π_old (proximal: column or recomputed once)."""
    is_correction: str = "none"
    """Behavior correction ρ = π_old/μ with the proximal anchor: none, tis (truncate), mis (mask)."""
    is_cap: float | None = None
    """Cap C_is of tis (None: 2.0)."""
    is_band: tuple[float, float] | None = None
    """Kept band [lo, hi] of mis (None: [0.5, 2.0])."""
    is_level: str = "token"
    """Level of ρ for tis / mis: token ρ_t, sequence Π_t ρ_t, geometric (Π_t ρ_t)^(1/n) per sequence."""
    reject: tuple[str, ...] = ()
    """Rejection criteria LEVEL_kN>X on log ρ = log π_old − log μ, e.g. seq_mean_k3>0.01 (any one rejects)."""
    is_veto: float | None = None
    """Veto: drop a whole sequence when any trained token has ρ = π_old/μ below this (slime: 1e-4; None: off)."""
    is_batch_norm: bool = False
    """Self-normalise the behavior weights to mean 1 over each optimizer step's trained tokens (or sequences)."""
    correction: str = "none"
    """Named correction: seq-mask-tis (NeMo-RL) = --is-correction is + geometric-mean ρ band as --reject, zero mode."""
    reject_mode: str | None = None
    """mask: rejected/vetoed tokens leave the loss mask and denominators (verl, slime); zero: weight 0, counted."""
    ref_model: str | None = None
    """Reference checkpoint for a KL(π‖π_ref) penalty; its log-probs are computed once, before training."""
    kl_coef: float | None = None
    """β of the reference KL penalty β·KL per token (None: 0.001 with --ref-model)."""
    kl_estimator: str = "k3"
    """Per-token KL(π‖π_ref) estimator: k1, k2 or k3 (= π_ref/π − log(π_ref/π) − 1)."""
    entropy_coef: float = 0.0
    """Entropy bonus c: each token's loss gets −c·H(π), gradient through the chunked head."""
    max_lag: int | None = None
    """Drop rows whose staleness lag (current − policy_version) exceeds N (rows without a version are kept);
    with token_policy_versions, mask the too-stale tokens and drop rows left with no trained token."""
    min_version: int | None = None
    """Drop rows whose policy_version is below V (rows without a version are kept)."""
    agg: str = "token-mean"
    """Token aggregation, independent of the loss (SPEC.md §1); denominators global over the step."""
    horizon: int = 8192
    """Horizon H of seq-mean-token-sum-norm."""
    adv_norm: str = "none"
    """Group-relative advantages from reward: none (R − mean) or std (also divide by group std + 1e-6)."""
    epochs: int = 1
    """Passes over the rollouts."""
    minibatches: int = 1
    """Optimizer steps per pass: the shuffled rows are split into this many mini-batches."""
    micro_batch_tokens: int = 4096
    """Token budget per forward/backward (prompt + response, padded); gradients are accumulated."""
    lr: float = 1e-6
    """AdamW learning rate (after warmup)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    warmup_steps: int = 0
    """Linear learning-rate warmup over this many optimizer steps."""
    seed: int = 0
    """Seeds the per-pass shuffle (and torch); same seed and inputs give identical weights on CPU."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    dtype: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU), bf16 / fp16 (autocast and low-precision head GEMMs, fp32 master
    weights, fp16 with a loss scaler; CPU or CUDA) or fp32."""
    grad_checkpointing: bool = False
    """Recompute transformer activations in backward to save memory."""
    replay_routing: bool = False
    """Mixture of experts: route every position through the experts the sampler logged (routed_experts, R3)."""
    cpu_offload: bool = False
    """Under torchrun (FSDP2) on CUDA: keep sharded parameters, gradients and optimizer state in CPU memory."""
    lora_r: int | None = None
    """LoRA rank: train a peft LoRA adapter of this rank, base weights and head frozen (None: every weight)."""
    lora_alpha: float | None = None
    """LoRA scaling numerator: the update is (alpha / r) · B A (None: 2 × lora_r)."""
    lora_targets: tuple[str, ...] = ()
    """Module names LoRA adapts (empty: every linear layer of attention and MLP, not the output head)."""
    adapter: str | None = None
    """A peft LoRA adapter directory to continue training on top of --model (its rank, alpha and targets)."""
    merge: bool = False
    """With LoRA: write a full checkpoint with the adapter merged into the weights instead of the adapter."""
    tr_delta: float = 0.2
    """Trust-region yardstick for diagnostics: a token is outside when |π − μ| > tr_delta."""
    temperature: float | None = None
    """Sampling temperature when rows and file metadata give none (None: 1.0)."""
    columns: tuple[str, ...] = ()
    """Column renames LOGGED=DRPO for rollout files with other names."""
    overwrite: bool = False
    """Replace an existing --out that drpo wrote (atomically); anything else is refused."""
    resume: bool = False
    """Continue an interrupted run from OUT.partial-state/ (same options required)."""
    quiet: bool = False
    """No progress bar and no summary tables."""
    tensorboard: str | None = None
    """Write every step's metrics as TensorBoard events here; global step = policy version × steps + step."""
    allow_unsafe_weights: bool = False
    """Allow pickle (.bin) weights; safetensors only otherwise."""
    chunk_tokens: int = field(default=1024, repr=False)
    """Tokens per output-head chunk (memory O(chunk × V)); not a command-line option."""

    def loss_hparams(self) -> dict[str, float | None]:
        """The chosen loss's hyper-parameters: given values over SPEC.md defaults."""
        given = {name: getattr(self, name) for name in HPARAM_NAMES}
        return {k: (given[k] if given[k] is not None else v) for k, v in LOSS_HPARAMS[self.loss].items()}

    def column_map(self) -> dict[str, str]:
        return parse_columns(self.columns)[0]

    def resolved_kl_coef(self) -> float:
        """β: the given --kl-coef, else DEFAULT_KL_COEF with a reference model, else 0."""
        if self.kl_coef is not None:
            return self.kl_coef
        return DEFAULT_KL_COEF if self.ref_model else 0.0

    def reject_criteria(self) -> list[tuple[str, str, str, float]]:
        return parse_rejects(self.reject)[0]

    def needs_old_logprobs(self) -> bool:
        """π_old is needed: the proximal anchor, or rejection criteria measured against it."""
        return self.anchor == "proximal" or bool(self.reject) or self.is_veto is not None

    def uses_lora(self) -> bool:
        return self.lora_r is not None or self.adapter is not None

    def resolved_lora_alpha(self) -> float | None:
        if self.lora_r is None:
            return None
        return 2.0 * self.lora_r if self.lora_alpha is None else self.lora_alpha

    def resolved_is_cap(self) -> float:
        return 2.0 if self.is_cap is None else self.is_cap

    def resolved_is_band(self) -> tuple[float, float]:
        return (0.5, 2.0) if self.is_band is None else self.is_band

    def to_dict(self) -> dict:
        """JSON-ready record of the run (stored with the checkpoint and in the report)."""
        d = asdict(self)
        d["rollouts"] = list(self.rollouts)
        d["columns"] = list(self.columns)
        d["is_band"] = None if self.is_band is None else list(self.is_band)
        d["reject"] = list(self.reject)
        d["lora_targets"] = list(self.lora_targets)
        d["loss_hparams"] = self.loss_hparams() if self.loss in LOSS_HPARAMS else {}
        return d

    def paths(self, out: str | os.PathLike) -> tuple[list[tuple[str, str | None]], list[Output]]:
        """(inputs, outputs) of a run writing to `out`, for the one output rule (outputs.py)."""
        inputs = [("--rollouts", r) for r in self.rollouts] + [("--model", self.model), ("--ref-model", self.ref_model)]
        if self.adapter is not None:
            inputs.append(("--adapter", self.adapter))
        # The resumable state is an output too; whether it may exist is train's decision (--resume).
        return inputs, [Output("--out", out, "checkpoint"),
                        Output("state directory", state_dir(out), "state", check_existing=False)]

    def validate(self) -> list[str]:
        """Every problem with these options, one line each, without touching a model or data."""
        p: list[str] = []
        if not self.rollouts:
            p.append("--rollouts: at least one rollout file or directory is required")
        for path in self.rollouts:
            if not os.path.exists(path):
                p.append(f"--rollouts {path}: no such file or directory")
        if not self.model:
            p.append("--model: required (a Hugging Face checkpoint directory)")
        elif not os.path.isdir(self.model):
            p.append(f"--model {self.model}: not a directory (expected a Hugging Face checkpoint directory)")
        if self.out is not None and self.model:
            p.extend(output_problems(*self.paths(self.out), overwrite=self.overwrite))
        _choice(p, "loss", self.loss, tuple(LOSS_HPARAMS))
        if self.loss in LOSS_HPARAMS:
            valid = LOSS_HPARAMS[self.loss]
            for name in HPARAM_NAMES:
                if getattr(self, name) is not None and name not in valid:
                    hint = ", ".join(_flag(v) for v in valid) or "none"
                    p.append(f"{_flag(name)} does not apply to --loss {self.loss} (its options: {hint})")
        _positive(p, "delta", self.delta)
        _positive(p, "eps", self.eps)
        if self.eps_low is not None and not 0 < self.eps_low < 1:
            p.append(f"--eps-low must be in (0, 1), got {self.eps_low}")
        _positive(p, "eps_high", self.eps_high)
        if self.dual_clip is not None and not self.dual_clip > 1:
            p.append(f"--dual-clip must be > 1 (e.g. 3), got {self.dual_clip}")
        if self.ratio_cap is not None and not self.ratio_cap >= 1:
            p.append(f"--ratio-cap must be >= 1, got {self.ratio_cap}")
        _choice(p, "anchor", self.anchor, ANCHORS)
        _choice(p, "is_correction", self.is_correction, IS_CORRECTIONS)
        if self.is_correction in ("tis", "mis", "is") and self.anchor != "proximal":
            p.append(f"--is-correction {self.is_correction} needs --anchor proximal (with the behavior anchor ρ = 1)")
        if self.is_cap is not None:
            if self.is_correction != "tis":
                p.append("--is-cap applies only to --is-correction tis")
            elif not self.is_cap > 0:
                p.append(f"--is-cap must be > 0, got {self.is_cap}")
        if self.is_band is not None:
            lo, hi = self.is_band
            if self.is_correction != "mis" and self.correction != "seq-mask-tis":
                p.append("--is-band applies only to --is-correction mis and --correction seq-mask-tis")
            elif not 0 <= lo < hi:
                p.append(f"--is-band must satisfy 0 <= lo < hi, got {lo} {hi}")
        _choice(p, "is_level", self.is_level, IS_LEVELS)
        if self.is_level != "token" and self.is_correction == "none":
            p.append(f"--is-level {self.is_level} applies to --is-correction tis or mis")
        p.extend(parse_rejects(self.reject)[1])
        p.extend(correction_problems(self))
        if self.correction == "seq-mask-tis" and self.anchor != "proximal":
            p.append("--correction seq-mask-tis needs --anchor proximal (its token IS ρ = π_old/μ multiplies a π/π_old loss)")
        if self.is_batch_norm and self.is_correction == "none" and self.correction == "none":
            p.append("--is-batch-norm needs --is-correction is, tis or mis (or --correction): there is no weight to normalise")
        if self.ref_model is not None:
            if not os.path.isdir(self.ref_model):
                p.append(f"--ref-model {self.ref_model}: not a directory (expected a Hugging Face checkpoint directory)")
        elif self.kl_coef is not None:
            p.append("--kl-coef needs --ref-model (the KL penalty is to a reference model)")
        if self.kl_coef is not None and not (math.isfinite(self.kl_coef) and self.kl_coef >= 0):
            p.append(f"--kl-coef must be >= 0, got {self.kl_coef}")
        _choice(p, "kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        if not (math.isfinite(self.entropy_coef) and self.entropy_coef >= 0):
            p.append(f"--entropy-coef must be >= 0, got {self.entropy_coef}")
        p.extend(staleness_problems(self.max_lag, self.min_version))
        _choice(p, "agg", self.agg, AGG_MODES)
        _positive(p, "horizon", self.horizon)
        _choice(p, "adv_norm", self.adv_norm, ADV_NORMS)
        for name in ("epochs", "minibatches", "micro_batch_tokens", "chunk_tokens"):
            if getattr(self, name) < 1:
                p.append(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        _positive(p, "lr", self.lr)
        _positive(p, "max_grad_norm", self.max_grad_norm)
        for name in ("weight_decay", "warmup_steps", "seed"):
            if getattr(self, name) < 0:
                p.append(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        _choice(p, "device", self.device, DEVICES)
        _choice(p, "dtype", self.dtype, DTYPES)
        if not 0 < self.tr_delta <= 1:
            p.append(f"--tr-delta must be in (0, 1], got {self.tr_delta}")
        _positive(p, "temperature", self.temperature)
        p.extend(parse_columns(self.columns)[1])
        if self.tensorboard is not None:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:
                p.append("--tensorboard needs the tensorboard package: pip install 'drpo[tensorboard]'")
            if os.path.isfile(self.tensorboard):
                p.append(f"--tensorboard {self.tensorboard}: is a file (expected a directory for event files)")
        p.extend(self._lora_problems())
        return p

    def _lora_problems(self) -> list[str]:
        p: list[str] = []
        if self.lora_r is not None and self.lora_r < 1:
            p.append(f"--lora-r must be >= 1, got {self.lora_r}")
        _positive(p, "lora_alpha", self.lora_alpha)
        if self.adapter is not None:
            if not os.path.isdir(self.adapter):
                p.append(f"--adapter {self.adapter}: not a directory (expected a peft LoRA adapter directory)")
            given = [f for f, v in (("--lora-r", self.lora_r), ("--lora-alpha", self.lora_alpha),
                                    ("--lora-targets", self.lora_targets or None)) if v is not None]
            if given:
                p.append(f"{', '.join(given)}: not with --adapter (the adapter fixes its rank, alpha and targets)")
        elif self.lora_r is None:
            for flag, value in (("--lora-alpha", self.lora_alpha), ("--lora-targets", self.lora_targets or None)):
                if value is not None:
                    p.append(f"{flag} needs --lora-r")
        if self.merge and not self.uses_lora():
            p.append("--merge needs --lora-r or --adapter (it merges a LoRA adapter into the weights)")
        return p

    def check(self) -> TrainConfig:
        """Raise ConfigError listing every problem; return self when there is none."""
        _raise_problems(self.validate())
        return self


@dataclass(frozen=True)
class InspectConfig:
    """Everything `drpo inspect` does is decided by these fields (SPEC.md §2, §4)."""

    rollouts: tuple[str, ...]
    """Rollout files or directories (Arrow IPC file/stream or Parquet); one or more."""
    model: str | None = None
    """Checkpoint directory for per-token diagnostics; None: the data-only audit."""
    current_version: int | None = None
    """Policy version of the current model for staleness lags (None: checkpoint's, else the data's max)."""
    deltas: tuple[float, ...] = ()
    """DRPO δ values for the what-if table; the first is the chosen δ of weight/drpo_corrective_frac."""
    tr_delta: float = 0.2
    """Trust-region yardstick: a token is outside when |π − μ| > tr_delta."""
    temperature: float | None = None
    """Sampling temperature when rows and file metadata give none (None: 1.0)."""
    columns: tuple[str, ...] = ()
    """Column renames LOGGED=DRPO for rollout files with other names."""
    top: int = 10
    """Worst sequences listed by sample_id."""
    json_out: str | None = None
    """Write the JSON report here ("-" for stdout, then nothing else goes to stdout)."""
    per_token: str | None = None
    """Write per-token diagnostics here as an Arrow IPC file (needs a model)."""
    html: str | None = None
    """Write a self-contained HTML page of the report here (plots inline, nothing fetched)."""
    fail_above: tuple[str, ...] = ()
    """Gates METRIC=VALUE: exit 3 when a metric exceeds its value (after writing the report)."""
    overwrite: bool = False
    """Replace an existing --json / --per-token / --html file that drpo wrote; anything else is refused."""
    reject: tuple[str, ...] = ()
    """Rejection criteria LEVEL_kN>X (as train's --reject) whose rejected fractions the audit reports (needs a model)."""
    is_veto: float | None = None
    """Veto threshold on ρ = π/μ (the audited model as π_old) whose vetoed fractions the audit reports."""
    correction: str = "none"
    """Named correction (as train's --correction) whose masked fractions the audit reports."""
    is_correction: str = "none"
    """Behavior weight (is, tis, mis) whose batch-normalisation factor the audit reports with --is-batch-norm."""
    is_cap: float | None = None
    """Cap of tis (None: 2.0)."""
    is_band: tuple[float, float] | None = None
    """Band of mis (None: [0.5, 2.0]) or of --correction seq-mask-tis (None: [0.999, 1.002])."""
    is_level: str = "token"
    """Level of ρ of the behavior weight: token, sequence or geometric."""
    is_batch_norm: bool = False
    """Report is/batch_norm_factor: the mean behavior weight over the audited tokens (or sequences)."""
    reject_mode: str | None = None
    """mask or zero (as train's); decides which tokens the batch-normalisation mean runs over."""
    max_lag: int | None = None
    """Leave out rows whose staleness lag exceeds N (rows without a version are kept); with
    token_policy_versions, the too-stale tokens (a row left with no trained token drops)."""
    min_version: int | None = None
    """Leave out rows whose policy_version is below V (rows without a version are kept)."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    dtype: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32 model weights (CPU or CUDA); log-softmax is float32."""
    micro_batch_tokens: int = 4096
    """Token budget per forward pass (prompt + response, padded)."""
    replay_routing: bool = False
    """Mixture of experts: route every position through the experts the sampler logged (routed_experts, R3)."""
    quiet: bool = False
    """No progress bar and no tables (the JSON report and gates still work)."""
    allow_unsafe_weights: bool = False
    """Allow pickle (.bin) weights; safetensors only otherwise."""
    chunk_tokens: int = field(default=1024, repr=False)
    """Tokens per output-head chunk (memory O(chunk × V)); not a command-line option."""

    def column_map(self) -> dict[str, str]:
        return parse_columns(self.columns)[0]

    def reject_criteria(self) -> list[tuple[str, str, str, float]]:
        return parse_rejects(self.reject)[0]

    def behavior_weight_args(self) -> dict:
        """behavior_weight's keywords for the what-if weight (after expand_correction)."""
        return {"kind": self.is_correction, "cap": 2.0 if self.is_cap is None else self.is_cap,
                "band": (0.5, 2.0) if self.is_band is None else self.is_band, "level": self.is_level}

    def paths(self) -> tuple[list[tuple[str, str | None]], list[Output]]:
        """(inputs, outputs) of this audit, for the one output rule (outputs.py)."""
        inputs = [("rollouts", r) for r in self.rollouts] + [("--model", self.model)]
        outs = [Output("--json", self.json_out, "json")] if self.json_out not in (None, "-") else []
        if self.per_token is not None:
            outs.append(Output("--per-token", self.per_token, "arrow"))
        if self.html is not None:
            outs.append(Output("--html", self.html, "html"))
        return inputs, outs

    def chosen_delta(self) -> float:
        return self.deltas[0] if self.deltas else float(LOSS_HPARAMS["drpo"]["delta"])

    def gates(self) -> list[tuple[str, float]]:
        """`--fail-above` specs as (stable metric name, threshold); call after check()."""
        return self._parse_gates()[0]

    def _parse_gates(self) -> tuple[list[tuple[str, float]], list[str]]:
        from drpo_cli.report import resolve_metric  # no torch there; keeps this module's imports minimal

        gates, problems = [], []
        for spec in self.fail_above:
            name, sep, raw = spec.partition("=")
            try:
                value = float(raw)
            except ValueError:
                value = math.nan
            if not sep or not name.strip() or math.isnan(value):
                problems.append(f"--fail-above {spec!r}: expected METRIC=NUMBER, e.g. tr/harmful_frac=0.01")
                continue
            try:
                gates.append((resolve_metric(name.strip(), self.model is not None), value))
            except ConfigError as err:
                problems.append(err.message)
        return gates, problems

    def validate(self) -> list[str]:
        """Every problem with these options, one line each, without touching a model or data."""
        p: list[str] = []
        if not self.rollouts:
            p.append("ROLLOUTS: at least one rollout file or directory is required")
        for path in self.rollouts:
            if not os.path.exists(path):
                p.append(f"{path}: no such file or directory")
        if self.model is not None and not os.path.isdir(self.model):
            p.append(f"--model {self.model}: not a directory (expected a Hugging Face checkpoint directory)")
        if self.current_version is not None and self.current_version < 0:
            p.append(f"--current-version must be >= 0, got {self.current_version}")
        for d in self.deltas:
            if not d > 0:
                p.append(f"--delta values must be > 0, got {d}")
        if not 0 < self.tr_delta <= 1:
            p.append(f"--tr-delta must be in (0, 1], got {self.tr_delta}")
        _positive(p, "temperature", self.temperature)
        p.extend(parse_columns(self.columns)[1])
        if self.top < 0:
            p.append(f"--top must be >= 0, got {self.top}")
        if self.per_token is not None and self.model is None:
            p.append("--per-token needs --model (per-token diagnostics compare the model with the sampler)")
        p.extend(parse_rejects(self.reject)[1])
        if self.reject and self.model is None:
            p.append("--reject needs --model (the criteria compare the model with the sampler)")
        p.extend(correction_problems(self))
        _choice(p, "is_correction", self.is_correction, IS_CORRECTIONS)
        _choice(p, "is_level", self.is_level, IS_LEVELS)
        corrected = (self.is_veto is not None or self.correction != "none" or self.is_correction != "none"
                     or self.is_batch_norm)
        if corrected and self.model is None:
            p.append("--is-veto, --correction, --is-correction and --is-batch-norm need --model")
        if self.is_batch_norm and self.is_correction == "none" and self.correction == "none":
            p.append("--is-batch-norm needs --is-correction is, tis or mis (or --correction)")
        if self.is_band is not None and self.is_correction != "mis" and self.correction != "seq-mask-tis":
            p.append("--is-band applies only to --is-correction mis and --correction seq-mask-tis")
        if (self.is_correction != "none" or self.is_cap is not None or self.is_level != "token") and not self.is_batch_norm:
            p.append("--is-correction, --is-cap and --is-level shape the weight --is-batch-norm reports: add it")
        _positive(p, "is_cap", self.is_cap)
        p.extend(staleness_problems(self.max_lag, self.min_version))
        p.extend(output_problems(*self.paths(), overwrite=self.overwrite))
        p.extend(self._parse_gates()[1])
        _choice(p, "device", self.device, DEVICES)
        _choice(p, "dtype", self.dtype, DTYPES)
        for name in ("micro_batch_tokens", "chunk_tokens"):
            if getattr(self, name) < 1:
                p.append(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        return p

    def check(self) -> InspectConfig:
        """Raise ConfigError listing every problem; return self when there is none."""
        _raise_problems(self.validate())
        return self


def _raise_problems(problems: list[str]) -> None:
    """One ConfigError for all problems: the only one as its message, or a count with each as a detail line."""
    if problems:
        summary = problems[0] if len(problems) == 1 else f"{len(problems)} problems with the options"
        raise ConfigError(summary, details=problems if len(problems) > 1 else [])


def _choice(problems: list[str], name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        problems.append(f"{_flag(name)} {value!r}: expected one of {', '.join(choices)}")


def _positive(problems: list[str], name: str, value: float | None) -> None:
    if value is not None and not value > 0:  # `not >` also rejects NaN
        problems.append(f"{_flag(name)} must be > 0, got {value}")
