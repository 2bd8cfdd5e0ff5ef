"""Every registered loss, in table order, and what is derived from the registry: the loss names, each
setting as one option (shared names checked for agreement), and validation. No torch.

Importing this module imports the family modules, whose @register_loss decorators fill the registry.
"""

from __future__ import annotations

from collections.abc import Mapping

from drpo_cli.base.errors import ConfigError
from drpo_cli.objectives import probability, ratio_clipped, sequence, soft  # noqa: F401 -- they register
from drpo_cli.objectives.registry import REGISTRY, LossSpec, Setting, is_number, number


def in_rank_order(registry: Mapping[str, LossSpec]) -> dict[str, LossSpec]:
    """The losses by rank (their rows in the tables, their place among --loss's choices); ranks are unique."""
    by_rank: dict[int, str] = {}
    for name, spec in registry.items():
        if spec.rank in by_rank:
            raise ValueError(f"losses {by_rank[spec.rank]!r} and {name!r} both have rank {spec.rank}")
        by_rank[spec.rank] = name
    return {name: registry[name] for _, name in sorted(by_rank.items())}


def option_settings(losses: Mapping[str, LossSpec]) -> dict[str, Setting]:
    """Each setting name once (the first declaration), in option order; raises TypeError when two losses
    declaring a name disagree on its bound, help, order, kind or library wording (one option, one bound)."""
    first: dict[str, tuple[str, Setting]] = {}
    for spec in losses.values():
        for key, setting in spec.settings.items():
            owner, seen = first.setdefault(key, (spec.name, setting))
            if setting.same_option() != seen.same_option():
                raise TypeError(f"setting {key!r}: {spec.name} and {owner} declare different bounds, help, order, "
                                "kind or wording (a shared setting is one option: declare it once and reuse it)")
    orders = sorted(setting.order for _, setting in first.values())
    if len(set(orders)) != len(orders):
        raise TypeError(f"two settings share an order: {orders}")
    return {key: setting for key, (_, setting) in sorted(first.items(), key=lambda kv: kv[1][1].order)}


LOSSES: dict[str, LossSpec] = in_rank_order(REGISTRY)
LOSS_NAMES = tuple(LOSSES)
# Hyper-parameters each loss accepts and their defaults (SPEC.md §1); None: off.
LOSS_HPARAMS: dict[str, dict[str, float | None]] = {name: spec.defaults for name, spec in LOSSES.items()}
DEFAULTS = LOSS_HPARAMS
SETTINGS: dict[str, Setting] = option_settings(LOSSES)
# Every hyper-parameter name, in the order of the command-line options (a TrainConfig field each).
HPARAM_NAMES = tuple(SETTINGS)
SEQUENCE_LOSSES = tuple(name for name, spec in LOSSES.items() if spec.level == "sequence")
BATCH_LOSSES = tuple(name for name, spec in LOSSES.items() if spec.level == "batch")


def defaults_of(name: str) -> str:
    """Which losses take hyper-parameter `name` and their defaults, e.g. 'dppo-tv (0.15), drpo (12.5)'."""
    return ", ".join(f"{loss} ({number(hp[name])})" for loss, hp in LOSS_HPARAMS.items() if name in hp)


def setting_help(name: str) -> str:
    """The option's help: the setting's, with its losses and their defaults."""
    return SETTINGS[name].help.format(defaults_of(name))


def validate_hparams(name: str, hp: Mapping[str, object]) -> list[str]:
    """Every problem with loss `name` and hyper-parameters `hp` (empty list = valid), one line each."""
    if name not in LOSSES:
        return [f"unknown loss {name!r} (choose one of: {', '.join(LOSS_NAMES)})"]
    accepted = LOSSES[name].settings
    problems = []
    for key, value in hp.items():
        setting = accepted.get(key)
        if setting is None:
            allowed = ", ".join(accepted) if accepted else "none"
            problems.append(f"{name}: unknown hyper-parameter {key!r} (accepted: {allowed})")
        elif value is None and setting.default is None:  # a bound that is off by default may be turned off
            continue
        elif not is_number(value):
            problems.append(f"{name}: {key} must be a finite number, got {value!r}")
        elif setting.bound is not None and not setting.bound.test(value):
            problems.append(f"{name}: {key} must be {setting.library_text or setting.bound.text}, got {value!r}")
    return problems


def resolve_hparams(name: str, hp: Mapping[str, object] | None = None) -> dict[str, float | None]:
    """Defaults of loss `name` updated with `hp`; raises ConfigError listing every problem."""
    hp = dict(hp or {})
    problems = validate_hparams(name, hp)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems with the {name} hyper-parameters", details=problems)
    resolved = dict(LOSSES[name].defaults)
    resolved.update({k: (None if v is None else float(v)) for k, v in hp.items()})
    return resolved
