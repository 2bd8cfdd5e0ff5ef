"""Frozen configuration dataclasses, one per command, validated before any heavy work.

`validate()` returns every problem at once (one line each); `check()` raises a ConfigError that
lists them. Nothing here imports torch: a bad option must fail in milliseconds, before a model
or a rollout file is opened.
"""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, make_dataclass
from typing import Any

from drpo_cli.base.errors import ConfigError
from drpo_cli.base.outputs import Output, output_problems, state_dir
from drpo_cli.objectives.aggregation import AGG_MODES, DEFAULT_HORIZON
from drpo_cli.objectives.catalog import HPARAM_NAMES, LOSS_HPARAMS, LOSS_NAMES, SETTINGS, setting_help
from drpo_cli.objectives.corrections import (
    ANCHORS,
    CORRECTIONS,
    IS_BAND,
    IS_CAP,
    IS_CORRECTIONS,
    IS_LEVELS,
    KL_ESTIMATORS,
    REJECT_LEVELS,
    REJECT_MODES,
    SEQ_MASK_TIS_BAND,
)
from drpo_cli.objectives.metrics import WORST_BY, resolve_metric
from drpo_cli.objectives.registry import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, UNIT, Bound, number

DEFAULT_KL_COEF = 0.001  # verl's kl_loss_coef default
OPSM_WHAT_IF = 0.5  # inspect's OPSM δ when none is given (TRL's example value of off_policy_mask_threshold)
M2PO_WHAT_IF = 0.04  # inspect's M2PO τ when none is given (AReaL's examples/math/gsm8k_m2po.yaml)
REJECT_EXAMPLE = "seq_mean_k3>0.01"
ADV_NORMS = ("none", "std")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "bf16", "fp16", "fp32")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---- options: each declared once, as a config field; the command line and the docs are derived -------
# Bounds an option's value must satisfy (registry.Bound: test, what the problem line says it must be):
# POSITIVE, NON_NEGATIVE, AT_LEAST_ONE, UNIT, the loss settings' own, and:
# AdamW's first update moves each weight by lr / (1 − β1) = 10·lr: it must be a float32 (3.4e38), or the update
# overflows (the fused kernel writes ±inf weights, the per-tensor one raises).
VETO = Bound(lambda v: math.isfinite(v) and 0 < v < 1, "in (0, 1) (a ratio π_old/μ below which the sequence is dropped)")
LEARNING_RATE = Bound(lambda v: 0 < v <= 3.4e37, "> 0 and <= 3.4e37 (AdamW's first update, 10·lr, is a float32)")
# Panels group `drpo train --help` / `drpo inspect --help`, in this order.
PANELS = INPUTS, OUTPUTS, LOSS, CORRECTIONS_PANEL, PENALTIES, DATA, OPTIMIZER, HARDWARE, LORA = (
    "Inputs", "Outputs", "Loss", "Off-policy corrections", "Penalties", "Data", "Optimizer", "Hardware", "LoRA")


def option(default: Any = MISSING, help: str = "", *, flags: tuple[str, ...] = (), panel: str | None = None,
           choices: tuple[str, ...] | None = None, cli: Any = None, parse: Any = None,
           bound: Bound | None = None, argument: bool = False, hparam: bool = False,
           command_line: bool = True, minimum: int | None = None, repr: bool = True,
           file: bool = True, checked_if: Any = None) -> Any:
    """A config field that is also a command-line option (drpo_cli.cli derives the Typer parameter).

    help: the flag's one-line help and its docs/options.md row; in a loss hyper-parameter's (`hparam`),
      `{}` becomes the losses that take it with their defaults (catalog.LOSS_HPARAMS).
    flags: the option's names (default --field-name). panel: its group in --help (PANELS).
    choices / bound: what validate() accepts: a tuple of values (None passes where it is the default),
      or a Bound (test, "what it must be") such as POSITIVE (None, unset, always passes); checked for
      every field in one loop (declared_problems), only when `checked_if(cfg)` holds if it is given.
    cli / parse: the command-line type when it is not the field's (`str | None` for a comma-separated
      list) and the function from that value to the field's; a tuple field is a repeatable option.
    argument: positional. command_line=False: a config-file key only. minimum: the least value the
      command-line parser accepts. file=False: a destructive or unsafe switch, taken from the command
      line only, never from a --config file (config_file.py).
    """
    meta = {"help": help, "flags": flags, "panel": panel, "choices": choices, "bound": bound, "cli": cli,
            "parse": parse, "argument": argument, "hparam": hparam, "command_line": command_line,
            "minimum": minimum, "file": file, "checked_if": checked_if}
    return field(default=default, repr=repr, metadata=meta)


def setting_field(name: str) -> Any:
    """The config field of loss setting `name` (catalog.SETTINGS): None (the loss's default), its help and bound."""
    setting = SETTINGS[name]
    return option(None, setting.help, bound=setting.bound, panel=LOSS, hparam=True)


def option_help(f: Field) -> str:
    """The help text of a config field, with a hyper-parameter's losses and defaults filled in."""
    return setting_help(f.name) if f.metadata.get("hparam") else f.metadata.get("help", "")


def option_flags(f: Field) -> tuple[str, ...]:
    """The command-line names of a config field's option: its declared flags, else --field-name."""
    return f.metadata.get("flags") or (_flag(f.name),)


def command_line_fields(*classes) -> list[Field]:
    """The fields of config classes that are command-line options, by panel (PANELS), then as declared."""
    found = [f for cls in classes for f in fields(cls) if f.metadata.get("command_line", False)]
    return sorted(found, key=lambda f: -1 if f.metadata["panel"] is None else PANELS.index(f.metadata["panel"]))


def one_of(choices: tuple[str, ...]) -> str:
    return " | ".join(choices)


def parse_deltas(specs: list[str] | tuple[str, ...]) -> tuple[float, ...]:
    """`--delta 0.1,0.2 --delta 12.5` -> (0.1, 0.2, 12.5) (ConfigError on anything but numbers)."""
    try:
        return tuple(float(d) for spec in specs for d in spec.split(",") if d.strip())
    except ValueError:
        raise ConfigError(f"--delta {','.join(specs)!r}: expected numbers separated by commas, "
                          "e.g. 0.1,0.2,12.5") from None


def parse_names(spec: str | None) -> tuple[str, ...]:
    """`"q_proj, v_proj"` -> ("q_proj", "v_proj"); None -> ()."""
    return tuple(t.strip() for t in (spec or "").split(",") if t.strip())


def parse_columns(specs: tuple[str, ...] | list[str]) -> tuple[dict[str, str], list[str]]:
    """`("logged=drpo_name", ...)` -> ({logged: drpo_name}, problems)."""
    from drpo_cli.rollouts.schema import column_map_problems  # pyarrow, no torch

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
    """Problems with --correction's combinations (train and inspect configs alike)."""
    p = []
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


# ---- the options both commands take: each declared once here (type of value, default, choices, bound,
# flags); a command's field takes it with `shared(name)`, saying in its own words (help, panel) what the
# option does there: inspect reports what a correction would do where train applies it. `--rollouts` and
# `--model` are not shared: inspect takes the files as arguments and the model as optional.
_KEEP = object()
SHARED_OPTIONS: dict[str, Field] = {
    "tr_delta": option(0.2, "Trust-region yardstick of the diagnostics: |π − μ| > tr_delta.", panel=DATA, bound=UNIT),
    "temperature": option(None, "Sampling temperature when the rollouts give none.", panel=DATA, bound=POSITIVE),
    "columns": option((), "Rename a rollout column: LOGGED=DRPO (repeatable).", flags=("--column",), panel=INPUTS),
    "overwrite": option(False, "Replace an existing --out that drpo wrote.", panel=OUTPUTS, file=False),
    "reject": option((), f"Reject tokens/sequences by LEVEL_kN>X on π_old vs μ, e.g. {REJECT_EXAMPLE} (repeatable).",
                     panel=CORRECTIONS_PANEL),
    "is_veto": option(None, "Drop a sequence when a token has π_old/μ below THRESH (slime: 1e-4).",
                      panel=CORRECTIONS_PANEL, bound=VETO),
    "correction": option("none", f"Named correction: {one_of(CORRECTIONS)} (needs --anchor proximal).",
                         choices=CORRECTIONS, panel=CORRECTIONS_PANEL),
    "is_correction": option("none", f"Behavior correction with --anchor proximal: {one_of(IS_CORRECTIONS)}.",
                            choices=IS_CORRECTIONS, panel=CORRECTIONS_PANEL),
    "is_cap": option(None, f"Cap of tis ({IS_CAP}).", panel=CORRECTIONS_PANEL, bound=POSITIVE),
    "is_band": option(None, f"Kept band LO HI of mis ({IS_BAND[0]} {IS_BAND[1]}).", panel=CORRECTIONS_PANEL),
    "is_level": option("token", "ρ of tis / mis per token | sequence (product) | geometric (mean).",
                       choices=IS_LEVELS, panel=CORRECTIONS_PANEL),
    "is_batch_norm": option(False, "Self-normalise the behavior weights to mean 1 over each step.",
                            panel=CORRECTIONS_PANEL),
    "reject_mode": option(None, "Rejected/vetoed tokens: mask (leave the denominators; default) | zero (weight 0).",
                          choices=REJECT_MODES, panel=CORRECTIONS_PANEL),
    "opsm_delta": option(
        None, "OPSM filter (any loss): drop A < 0 tokens of sequences whose mean log(μ/π) exceeds δ (off).",
        panel=CORRECTIONS_PANEL, bound=NON_NEGATIVE),
    "m2po_threshold": option(
        None, "M2PO filter (any loss): mask the step's largest (log μ − log π_old)² until their mean < τ (off).",
        panel=CORRECTIONS_PANEL, bound=POSITIVE),
    "max_lag": option(None, "Drop rows (or mask tokens) whose staleness lag exceeds N.", panel=DATA,
                      bound=NON_NEGATIVE),
    "min_version": option(None, "Drop rows (or mask tokens) whose policy version is below V.", panel=DATA,
                          bound=NON_NEGATIVE),
    "truncate": option(False, "Train a row longer than the model's context on its first tokens (else refused).",
                       panel=DATA),
    "micro_batch_tokens": option(4096, "Token budget per forward/backward.", panel=OPTIMIZER, bound=AT_LEAST_ONE),
    "device": option("auto", f"{one_of(DEVICES)}.", choices=DEVICES, panel=HARDWARE),
    "dtype": option("auto", "auto | bf16 | fp16 (autocast, fp32 master weights; fp16 loss-scaled) | fp32.",
                    choices=DTYPES, panel=HARDWARE),
    "replay_routing": option(
        False, "MoE: route through the experts the sampler logged (routed_experts column).", panel=HARDWARE),
    "quiet": option(False, "No progress bar or summary tables.", flags=("--quiet", "-q"), panel=OUTPUTS),
    "allow_unsafe_weights": option(False, "Allow pickle weights.", panel=INPUTS, file=False),
    "chunk_tokens": option(1024, "Tokens per output-head chunk (memory O(chunk × V)).", command_line=False,
                           repr=False, bound=AT_LEAST_ONE),
}


def shared(name: str, help: str | None = None, *, panel: Any = _KEEP, **meta: Any) -> Any:
    """A command's field of the shared option `name` (SHARED_OPTIONS): its declaration, with this command's
    own `help` and `panel` where given (and further metadata, e.g. `checked_if`)."""
    base = SHARED_OPTIONS[name]
    changed = {**({"help": help} if help is not None else {}), **({"panel": panel} if panel is not _KEEP else {}), **meta}
    return field(default=base.default, repr=base.repr, metadata={**base.metadata, **changed, "shared": name})


@dataclass(frozen=True)
class TrainInputs:
    """The first fields of TrainConfig: what it reads, where it writes, which loss."""

    rollouts: tuple[str, ...] = option((), "Rollout file or directory (repeatable).", flags=("--rollouts", "-r"),
                                       panel=INPUTS)
    model: str = option("", "Input Hugging Face checkpoint directory.", flags=("--model", "-m"), panel=INPUTS)
    out: str | None = option(None, "Output directory (default: a sibling MODEL-v<N+1>).", flags=("--out", "-o"),
                             panel=OUTPUTS)
    loss: str = option("drpo", one_of(LOSS_NAMES) + ".", choices=LOSS_NAMES, panel=LOSS)


# Each loss setting of the registry (catalog.SETTINGS) as a field, in option order, after TrainInputs' fields.
TrainLossSettings = make_dataclass(
    "TrainLossSettings", [(name, SETTINGS[name].kind | None, setting_field(name)) for name in HPARAM_NAMES],
    bases=(TrainInputs,), frozen=True)


@dataclass(frozen=True)
class TrainConfig(TrainLossSettings):
    """Everything `drpo train` does is decided by these fields (SPEC.md §1, §4).

    Each field is one option: its `help` is the flag's help and its row in docs/options.md; the same
    names are the keys of a `--config` file. The loss settings' fields come from the loss registry.
    """

    opsm_delta: float | None = shared("opsm_delta")
    m2po_threshold: float | None = shared("m2po_threshold")
    anchor: str = option("behavior", f"Anchor log-probs: {one_of(ANCHORS)}.", choices=ANCHORS,
                         panel=CORRECTIONS_PANEL)
    is_correction: str = shared("is_correction")
    is_cap: float | None = shared("is_cap", checked_if=lambda cfg: cfg.is_correction == "tis")
    is_band: tuple[float, float] | None = shared("is_band")
    is_level: str = shared("is_level")
    reject: tuple[str, ...] = shared("reject")
    is_veto: float | None = shared("is_veto", bound=VETO)
    is_batch_norm: bool = shared("is_batch_norm")
    correction: str = shared("correction")
    reject_mode: str | None = shared("reject_mode")
    ref_model: str | None = option(None, "Reference checkpoint for a KL(π‖π_ref) penalty.", panel=PENALTIES)
    kl_coef: float | None = option(
        None, f"β of the reference KL penalty ({number(DEFAULT_KL_COEF)} with --ref-model).", panel=PENALTIES,
        bound=NON_NEGATIVE)
    kl_estimator: str = option("k3", f"Per-token KL estimator: {one_of(KL_ESTIMATORS)}.", choices=KL_ESTIMATORS,
                               panel=PENALTIES)
    entropy_coef: float = option(
        0.0, "Entropy bonus c: each token's loss gets −c·H(π).", panel=PENALTIES, bound=NON_NEGATIVE)
    max_lag: int | None = shared("max_lag")
    min_version: int | None = shared("min_version")
    truncate: bool = shared("truncate")
    agg: str = option("token-mean", one_of(AGG_MODES) + ".", choices=AGG_MODES, panel=LOSS)
    horizon: int = option(DEFAULT_HORIZON, "Horizon of seq-mean-token-sum-norm.", panel=LOSS, bound=POSITIVE)
    adv_norm: str = option("none", f"Group advantages from reward: {one_of(ADV_NORMS)}.", choices=ADV_NORMS,
                           panel=LOSS)
    epochs: int = option(1, "Passes over the rollouts.", panel=OPTIMIZER, bound=AT_LEAST_ONE)
    minibatches: int = option(1, "Optimizer steps per pass.", panel=OPTIMIZER, bound=AT_LEAST_ONE)
    micro_batch_tokens: int = shared("micro_batch_tokens")
    lr: float = option(1e-6, "AdamW learning rate.", panel=OPTIMIZER, bound=LEARNING_RATE)
    weight_decay: float = option(0.0, "AdamW weight decay.", panel=OPTIMIZER, bound=NON_NEGATIVE)
    max_grad_norm: float = option(1.0, "Gradient-norm clip.", panel=OPTIMIZER, bound=POSITIVE)
    warmup_steps: int = option(0, "Linear warmup steps.", panel=OPTIMIZER, bound=NON_NEGATIVE)
    seed: int = option(0, "Shuffle seed.", panel=OPTIMIZER, bound=NON_NEGATIVE)
    device: str = shared("device")
    dtype: str = shared("dtype")
    grad_checkpointing: bool = option(False, "Recompute activations.", panel=HARDWARE)
    replay_routing: bool = shared("replay_routing")
    cpu_offload: bool = option(
        False, "Under torchrun on CUDA: keep sharded weights, grads and optimizer state in CPU memory.",
        panel=HARDWARE)
    lora_r: int | None = option(
        None, "Train a LoRA adapter of rank R (peft; head frozen).", panel=LORA, bound=AT_LEAST_ONE)
    lora_alpha: float | None = option(
        None, "LoRA alpha: update (alpha / r)·BA (2R).", panel=LORA, bound=POSITIVE)
    lora_targets: tuple[str, ...] = option(
        (), "Comma-separated module names (default: attention and MLP projections).", cli=str | None,
        parse=parse_names, panel=LORA)
    adapter: str | None = option(None, "Continue training this peft LoRA adapter directory.", panel=LORA)
    merge: bool = option(False, "With LoRA: write merged full weights instead of the adapter.", panel=LORA)
    tr_delta: float = shared("tr_delta")
    temperature: float | None = shared("temperature")
    columns: tuple[str, ...] = shared("columns")
    overwrite: bool = shared("overwrite")
    resume: bool = option(False, "Continue an interrupted run (OUT.partial-state/).", panel=OUTPUTS)
    quiet: bool = shared("quiet")
    tensorboard: str | None = option(
        None, "Write every step's metrics as TensorBoard events to DIR (rounds form one curve).", panel=OUTPUTS)
    allow_unsafe_weights: bool = shared("allow_unsafe_weights")
    chunk_tokens: int = shared("chunk_tokens")

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
        return (self.anchor == "proximal" or bool(self.reject) or self.is_veto is not None
                or self.m2po_threshold is not None)

    def uses_lora(self) -> bool:
        return self.lora_r is not None or self.adapter is not None

    def resolved_lora_alpha(self) -> float | None:
        if self.lora_r is None:
            return None
        return 2.0 * self.lora_r if self.lora_alpha is None else self.lora_alpha

    def resolved_is_cap(self) -> float:
        return IS_CAP if self.is_cap is None else self.is_cap

    def resolved_is_band(self) -> tuple[float, float]:
        return IS_BAND if self.is_band is None else self.is_band

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
        # The resumable state is an output too; whether it may exist is train's decision (--resume). The
        # TensorBoard directory is one as well: it may exist (rounds of a pipeline append to one curve).
        outs = [Output("--out", out, "checkpoint"), Output("state directory", state_dir(out), "state", check_existing=False)]
        if self.tensorboard is not None:
            outs.append(Output("--tensorboard", self.tensorboard, "events", check_existing=False))
        return inputs, outs

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
        if self.loss in LOSS_HPARAMS:
            valid = LOSS_HPARAMS[self.loss]
            for name in HPARAM_NAMES:
                if getattr(self, name) is not None and name not in valid:
                    hint = ", ".join(_flag(v) for v in valid) or "none"
                    p.append(f"{_flag(name)} does not apply to --loss {self.loss} (its options: {hint})")
        defaults = LOSS_HPARAMS["clip-cov"]
        lb = defaults["cov_lb"] if self.cov_lb is None else self.cov_lb
        ub = defaults["cov_ub"] if self.cov_ub is None else self.cov_ub
        if not (math.isfinite(lb) and math.isfinite(ub) and lb < ub):
            p.append(f"--cov-lb must be below --cov-ub, got {lb} and {ub}")
        if self.is_correction in ("tis", "mis", "is") and self.anchor != "proximal":
            p.append(f"--is-correction {self.is_correction} needs --anchor proximal (with the behavior anchor ρ = 1)")
        if self.is_cap is not None and self.is_correction != "tis":
            p.append("--is-cap applies only to --is-correction tis")
        if self.is_band is not None:
            lo, hi = self.is_band
            if self.is_correction != "mis" and self.correction != "seq-mask-tis":
                p.append("--is-band applies only to --is-correction mis and --correction seq-mask-tis")
            elif not 0 <= lo < hi:
                p.append(f"--is-band must satisfy 0 <= lo < hi, got {lo} {hi}")
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
        p.extend(parse_columns(self.columns)[1])
        if self.tensorboard is not None:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:
                p.append("--tensorboard needs the tensorboard package: pip install 'drpo[tensorboard]'")
            if os.path.isfile(self.tensorboard):
                p.append(f"--tensorboard {self.tensorboard}: is a file (expected a directory for event files)")
        p.extend(self._lora_problems())
        p.extend(declared_problems(self))
        return p

    def _lora_problems(self) -> list[str]:
        p: list[str] = []
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
        raise_problems(self.validate())
        return self


@dataclass(frozen=True)
class TrainLaunch:
    """The options of `drpo train` that decide how it starts, not what it trains (not in its record)."""

    config: str | None = option(
        None, "TOML or JSON file of options (a drpo_checkpoint.json reruns its run); flags override it.",
        panel=INPUTS)
    nproc: int | None = option(None, "Run under torchrun with N processes on this machine (FSDP2; one per GPU).",
                               minimum=1, panel=HARDWARE)


@dataclass(frozen=True)
class InspectConfig:
    """Everything `drpo inspect` does is decided by these fields (SPEC.md §2, §4); one option each."""

    rollouts: tuple[str, ...] = option(
        help="Rollout files or directories (Arrow IPC or Parquet).", argument=True)
    model: str | None = option(None, "Checkpoint for per-token diagnostics (else data-only).",
                               flags=("--model", "-m"))
    current_version: int | None = option(
        None, "Policy version of the current model (default: the checkpoint's, else the data's max).",
        bound=NON_NEGATIVE)
    deltas: tuple[float, ...] = option(
        (), "DRPO δ values for a what-if table, e.g. 0.1,0.2,12.5.", flags=("--delta",), cli=list[str],
        parse=parse_deltas)
    tr_delta: float = shared(
        "tr_delta", "Trust-region yardstick: a token is outside when |π − μ| > tr_delta.", panel=None)
    temperature: float | None = shared("temperature", panel=None)
    columns: tuple[str, ...] = shared("columns", panel=None)
    top: int = option(10, "Worst sequences to list by sample_id.", bound=NON_NEGATIVE)
    worst_by: str = option("tr/harmful_frac", "Rank the worst sequences by this metric over each sequence.",
                           choices=WORST_BY)
    by: tuple[str, ...] = option(
        (), "Break the audit down by the values of COLUMN (a string or integer column; repeatable).")
    against: tuple[str, ...] = option(
        (), "Compare the behavior log-probs with another sampler's rollouts of the same rows (matched by sample_id).",
        flags=("--against",))
    json_out: str | None = option(None, "Write the JSON report to PATH ('-': stdout only).", flags=("--json",),
                                  panel=OUTPUTS)
    per_token: str | None = option(None, "Write per-token diagnostics (Arrow IPC) to PATH.", panel=OUTPUTS)
    html: str | None = option(None, "Write a self-contained HTML page of the report to PAGE.", panel=OUTPUTS)
    fail_above: tuple[str, ...] = option(
        (), "Gate METRIC=VALUE: exit 3 when the metric exceeds VALUE (repeatable).", panel=OUTPUTS)
    overwrite: bool = shared("overwrite", "Replace an existing --json/--per-token/--html file drpo wrote.")
    reject: tuple[str, ...] = shared(
        "reject", f"Report what a rejection criterion LEVEL_kN>X would reject, e.g. {REJECT_EXAMPLE} (repeatable).")
    is_veto: float | None = shared(
        "is_veto", "Report what a veto at ρ = π/μ < THRESH would drop.", bound=VETO)
    correction: str = shared(
        "correction", f"Report what a named correction would mask: {one_of(CORRECTIONS)}.")
    is_correction: str = shared(
        "is_correction", f"Behavior weight for --is-batch-norm: {one_of(IS_CORRECTIONS)}.")
    is_cap: float | None = shared("is_cap")
    is_band: tuple[float, float] | None = shared(
        "is_band", f"Band LO HI of mis ({IS_BAND[0]} {IS_BAND[1]}) / seq-mask-tis.")
    is_level: str = shared("is_level", f"ρ of the behavior weight: {one_of(IS_LEVELS)}.")
    is_batch_norm: bool = shared("is_batch_norm", "Report the weights' batch mean (normaliser).")
    reject_mode: str | None = shared(
        "reject_mode", "mask (rejected tokens leave the mean) | zero (weight 0).")
    opsm_delta: float | None = shared(
        "opsm_delta", f"δ of the OPSM what-if ({number(OPSM_WHAT_IF)}; needs --model).")
    m2po_threshold: float | None = shared(
        "m2po_threshold", f"τ of the M2PO what-if, π_old = the model ({number(M2PO_WHAT_IF)}; needs --model).")
    max_lag: int | None = shared(
        "max_lag", "Leave out rows (or tokens) whose staleness lag exceeds N.", panel=None)
    min_version: int | None = shared(
        "min_version", "Leave out rows (or tokens) whose policy version is below V.", panel=None)
    truncate: bool = shared(
        "truncate", "Audit a row longer than the model's context on its first tokens (else refused).", panel=None)
    device: str = shared("device")
    dtype: str = shared("dtype", "auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32 weights.")
    micro_batch_tokens: int = shared("micro_batch_tokens", "Token budget per forward pass.", panel=HARDWARE)
    replay_routing: bool = shared("replay_routing")
    quiet: bool = shared("quiet", "No progress bar and no tables.")
    allow_unsafe_weights: bool = shared("allow_unsafe_weights", panel=None)
    chunk_tokens: int = shared("chunk_tokens")

    def column_map(self) -> dict[str, str]:
        return parse_columns(self.columns)[0]

    def reject_criteria(self) -> list[tuple[str, str, str, float]]:
        return parse_rejects(self.reject)[0]

    def behavior_weight_args(self) -> dict:
        """behavior_weight's keywords for the what-if weight (after expand_correction)."""
        return {"kind": self.is_correction, "cap": IS_CAP if self.is_cap is None else self.is_cap,
                "band": IS_BAND if self.is_band is None else self.is_band, "level": self.is_level}

    def paths(self) -> tuple[list[tuple[str, str | None]], list[Output]]:
        """(inputs, outputs) of this audit, for the one output rule (outputs.py)."""
        inputs = ([("rollouts", r) for r in self.rollouts] + [("--against", r) for r in self.against]
                  + [("--model", self.model)])
        outs = [Output("--json", self.json_out, "json")] if self.json_out not in (None, "-") else []
        if self.per_token is not None:
            outs.append(Output("--per-token", self.per_token, "arrow"))
        if self.html is not None:
            outs.append(Output("--html", self.html, "html"))
        return inputs, outs

    def resolved_opsm_delta(self) -> float:
        return OPSM_WHAT_IF if self.opsm_delta is None else self.opsm_delta

    def resolved_m2po_threshold(self) -> float:
        return M2PO_WHAT_IF if self.m2po_threshold is None else self.m2po_threshold

    def chosen_delta(self) -> float:
        return self.deltas[0] if self.deltas else float(LOSS_HPARAMS["drpo"]["delta"])

    def gates(self) -> list[tuple[str, float]]:
        """`--fail-above` specs as (stable metric name, threshold); call after check()."""
        return self._parse_gates()[0]

    def _parse_gates(self) -> tuple[list[tuple[str, float]], list[str]]:
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
        for d in self.deltas:
            if not d > 0:
                p.append(f"--delta values must be > 0, got {d}")
        p.extend(parse_columns(self.columns)[1])
        if self.worst_by != "tr/harmful_frac" and self.model is None:
            p.append("--worst-by needs --model (the worst sequences compare the model with the sampler)")
        for name in sorted({c for c in self.by if self.by.count(c) > 1}):
            p.append(f"--by {name}: given twice")
        for path in self.against:
            if not os.path.exists(path):
                p.append(f"--against {path}: no such file or directory")
        if self.against and (self.max_lag is not None or self.min_version is not None):
            p.append("--against compares every row of both files: leave out --max-lag and --min-version")
        if self.per_token is not None and self.model is None:
            p.append("--per-token needs --model (per-token diagnostics compare the model with the sampler)")
        p.extend(parse_rejects(self.reject)[1])
        if self.reject and self.model is None:
            p.append("--reject needs --model (the criteria compare the model with the sampler)")
        p.extend(correction_problems(self))
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
        if self.truncate and self.model is None:
            p.append("--truncate needs --model (the model's context decides what is cut)")
        for name in ("opsm_delta", "m2po_threshold"):
            if getattr(self, name) is not None and self.model is None:
                p.append(f"{_flag(name)} needs --model (the what-if compares the model with the sampler)")
        p.extend(output_problems(*self.paths(), overwrite=self.overwrite))
        p.extend(self._parse_gates()[1])
        p.extend(declared_problems(self))
        return p

    def check(self) -> InspectConfig:
        """Raise ConfigError listing every problem; return self when there is none."""
        raise_problems(self.validate())
        return self


def raise_problems(problems: list[str]) -> None:
    """One ConfigError for all problems: the only one as its message, or a count with each as a detail line."""
    if problems:
        summary = problems[0] if len(problems) == 1 else f"{len(problems)} problems with the options"
        raise ConfigError(summary, details=problems if len(problems) > 1 else [])


def declared_problems(cfg) -> list[str]:
    """A problem for each field of `cfg` outside the choices or the bound its option declares, in field order."""
    p: list[str] = []
    for f in fields(cfg):
        value, choices, bound = getattr(cfg, f.name), f.metadata.get("choices"), f.metadata.get("bound")
        if f.metadata.get("checked_if") is not None and not f.metadata["checked_if"](cfg):
            continue
        if choices is not None and value not in choices and not (value is None and f.default is None):
            p.append(f"{_flag(f.name)} {value!r}: expected one of {', '.join(choices)}")
        if bound is not None and value is not None and not bound.test(value):
            p.append(f"{_flag(f.name)} must be {bound.text}, got {value}")
    return p
