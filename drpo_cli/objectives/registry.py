"""The loss registry: every loss registers itself where it is defined, with everything else derives from.

    @register_loss("drpo", rank=6, weight=_w_drpo, settings={"delta": delta(12.5)}, doc=LossDoc(...))
    def drpo(logp, anchor, adv, *, delta): ...

One entry (LossSpec) carries the loss's name, its place in the tables (`rank`), its level (token,
sequence, batch), its detached gradient-weight function, its settings (each a Setting: default,
bound, help, declared once), the metrics it reports and its rows in docs/losses.md and SPEC.md §1.
catalog.py imports every family module (so that they register) and derives the rest: the loss
names, the option fields of config.py, validation, the docs tables. Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class Bound(NamedTuple):
    """What a value must satisfy: `test(value)`, and `text`, how a problem line and the docs say it."""

    test: Callable[[Any], bool]
    text: str


POSITIVE = Bound(lambda v: v > 0, "> 0")  # `>` also refuses NaN
NON_NEGATIVE = Bound(lambda v: math.isfinite(v) and v >= 0, ">= 0")
AT_LEAST_ONE = Bound(lambda v: v >= 1, ">= 1")
UNIT = Bound(lambda v: 0 < v <= 1, "in (0, 1]")


@dataclass(frozen=True)
class Setting:
    """One setting of a loss, declared once at the loss: a `--flag` option, a config key, a keyword.

    default: the loss's value when none is given (None: off; a setting off by default may be set to None).
    bound: what a value must satisfy (None: any finite number); checked by config.py before anything
      runs and by validate_hparams in the library, printed in docs/options.md.
    help: the option's one-line help; `{}` becomes the losses that take it and their defaults.
    order: its place among the loss options on the command line and in docs/options.md.
    kind: the value's type. library_text: the library's wording of the bound where the command
      line's (bound.text) would mislead a Python caller (e.g. "or None for off").
    A setting name several losses declare is one option: they must agree on all but the default
    (catalog.py checks it on import).
    """

    default: float | None
    bound: Bound | None
    help: str
    order: int
    kind: type = float
    library_text: str | None = None

    def same_option(self) -> tuple:
        """What the losses declaring this setting must agree on."""
        return (self.bound, self.help, self.order, self.kind, self.library_text)


@dataclass(frozen=True)
class LossDoc:
    """The loss's rows in docs/losses.md and SPEC.md §1, each cell as the table prints it."""

    paper: str  # docs/losses.md: paper
    loss: str  # docs/losses.md: per-token loss
    weight: str  # docs/losses.md: gradient weight w
    defaults: str  # docs/losses.md: defaults
    use: str  # docs/losses.md: when to use it
    spec_loss: str  # SPEC.md: per-token loss
    spec_weight: str  # SPEC.md: gradient weight w_t
    spec_defaults: str  # SPEC.md: default hyper-parameters
    source: str  # SPEC.md: source


@dataclass(frozen=True)
class LossSpec:
    """One registered loss.

    `loss(logp, anchor, adv, **settings)` -> per-token loss; `weight(...)` -> the analytic gradient
    weight w (d loss/d logπ = −A·r·w). `level` "sequence": both also take `seq` (each token's sequence
    label) and `valid` (the trained tokens), keyword-only; "batch": they take `selected`
    (ratio_clipped.covariance_selection). `contract` says how w gives d(Σ_t loss_t)/d logπ_u
    (losses.loss_gradient): "token" −A_u·r_u·w_u (+ the A-free `penalty` gradient g_u where there is
    one), "sequence" −(s_i/n_i)·Σ_{t∈i} A_t·w_t (GSPO), "geometric" −(s_i/n_i)·(Σ_{t∈i} A_t)·w_u (GMPO);
    `seq_ratio` gives s_i. `reinforce`: the value is in REINFORCE form (−c·A·logπ with a detached c,
    e.g. cispo), so at π = μ it is −A·logπ, not −A.
    Reports: `metrics` maps the labels of `drpo inspect`'s loss table to the loss's metric names (every
    one in metrics.INSPECT_MODEL_METRICS);
    `zeroing` the one counting the tokens whose w is 0; `weight_stats`: its weight distribution is
    reported as weight/<name>_*; `effects(hp, logp, anchor, adv, seq, selected)` -> {metric: (hits,
    total)} for the metrics `effect_metrics`.
    """

    name: str
    rank: int
    loss: Callable[..., Any]
    weight: Callable[..., Any]
    settings: Mapping[str, Setting]
    doc: LossDoc
    level: str = "token"
    contract: str = "token"
    penalty: Callable[..., Any] | None = None
    seq_ratio: Callable[..., Any] | None = None
    reinforce: bool = False
    metrics: Mapping[str, str] = field(default_factory=dict)
    zeroing: str | None = None
    weight_stats: bool = False
    effects: Callable[..., dict] | None = None
    effect_metrics: tuple[str, ...] = ()

    @property
    def defaults(self) -> dict[str, float | None]:
        return {key: s.default for key, s in self.settings.items()}


REGISTRY: dict[str, LossSpec] = {}  # filled by register_loss as the family modules are imported


def register_loss(name: str, *, rank: int, weight: Callable[..., Any], doc: LossDoc,
                  settings: Mapping[str, Setting] | None = None, **facts: Any) -> Callable:
    """Decorator: register the decorated function as loss `name` (LossSpec's fields by keyword)."""

    def add(fn: Callable) -> Callable:
        if name in REGISTRY:
            raise ValueError(f"loss {name!r} is registered twice")
        REGISTRY[name] = LossSpec(name, rank, fn, weight, dict(settings or {}), doc, **facts)
        return fn

    return add


def number(value: float | None) -> str:
    """A default as the help text writes it: 12.5, 0.0003, 20; None: off."""
    return "off" if value is None else f"{value:g}"


def is_number(value: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
