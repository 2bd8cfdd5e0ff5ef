"""One source of truth for the options: the config fields, the Typer commands, the config-file keys,
docs/options.md and the loss registry may not drift apart."""

from __future__ import annotations

import inspect
import json
import re
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import pytest
import typer
from typer.main import get_command

from drpo_cli.cli import app, config_parameters, config_values
from drpo_cli.config import (
    SHARED_OPTIONS,
    InspectConfig,
    TrainConfig,
    TrainLaunch,
    command_line_fields,
    option,
    option_flags,
    option_help,
)
from drpo_cli.config_file import train_config
from drpo_cli.objectives import catalog
from drpo_cli.objectives.catalog import HPARAM_NAMES, LOSS_HPARAMS, LOSS_NAMES
from drpo_cli.objectives.registry import number
from drpo_cli.reports import loss_tables
from drpo_cli.reports.options_doc import render

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"train": (TrainLaunch, TrainConfig), "inspect": (InspectConfig,)}


def drift(command, *classes) -> list[str]:
    """Every difference between a click command's parameters and the option fields of `classes`."""
    params = {p.name: p for p in command.params if p.name != "help"}
    found = {f.name: f for f in command_line_fields(*classes)}
    problems = [f"{name}: an option without a field" for name in params.keys() - found.keys()]
    problems += [f"{name}: a field without an option" for name in found.keys() - params.keys()]
    for name in params.keys() & found.keys():
        p, f = params[name], found[name]
        if f.metadata["argument"]:
            if p.param_type_name != "argument" or p.required != (f.default is MISSING):
                problems.append(f"{name}: not the declared argument")
            continue
        if tuple(p.opts + p.secondary_opts) != option_flags(f):
            problems.append(f"{name}: flags {p.opts + p.secondary_opts} != {option_flags(f)}")
        if p.help != option_help(f):
            problems.append(f"{name}: help {p.help!r} != {option_help(f)!r}")
        # What the command makes of its own default must be the field's default.
        cli_default = config_values(_only(f), {name: p.default})[name]
        if cli_default != f.default:
            problems.append(f"{name}: command-line default {cli_default!r} != field default {f.default!r}")
    return problems


def _only(f):
    """A config class with field `f` alone, for config_values."""
    return dataclass(type("One", (), {"__annotations__": {f.name: f.type}, f.name: f}))


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_is_its_config_field(name):
    command = get_command(app).commands[name]
    assert drift(command, *COMMANDS[name]) == []
    # Each option is declared with its help (no field is left to a bare default).
    for cls in COMMANDS[name]:
        assert all(f.metadata.get("help") for f in fields(cls)), cls


def test_drift_is_found():
    """A command whose option differs from its field, or lacks one, is reported."""
    @dataclass(frozen=True)
    class Declared:
        lr: float = option(1e-6, "AdamW learning rate.")
        seed: int = option(0, "Shuffle seed.", flags=("--seed", "-s"))

    def command(lr: float = typer.Option(1e-5, "--lr", help="AdamW learning rate."), extra: int = 0) -> None:
        pass

    drifted = typer.Typer(add_completion=False)
    drifted.command()(command)
    assert sorted(drift(get_command(drifted), Declared)) == [
        "extra: an option without a field",
        "lr: command-line default 1e-05 != field default 1e-06",
        "seed: a field without an option",
    ]
    honest = typer.Typer(add_completion=False)
    honest.command()(_signed(Declared))
    assert drift(get_command(honest), Declared) == []


def _signed(cls):
    def command(**params) -> None:
        pass

    command.__signature__ = inspect.Signature(config_parameters(cls))
    return command


def test_command_line_defaults_build_the_default_config():
    command = get_command(app).commands["train"]
    given = {p.name: p.default for p in command.params if p.name in {f.name for f in fields(TrainConfig)}}
    assert TrainConfig(**config_values(TrainConfig, given)) == TrainConfig()


def test_config_file_keys_are_the_fields(tmp_path):
    """A run with every field off its default comes back from its JSON record and from TOML (but the
    destructive and unsafe switches, `file=False`, which come from the command line only)."""
    changed = {}
    hints = typing.get_type_hints(TrainConfig)
    in_files = [f for f in fields(TrainConfig) if f.metadata.get("file", True)]
    assert {f.name for f in fields(TrainConfig)} - {f.name for f in in_files} == {"overwrite", "allow_unsafe_weights"}
    for f in in_files:
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        base = args[0] if args and typing.get_origin(kind) is not tuple else kind
        if f.metadata.get("choices"):
            changed[f.name] = next(c for c in f.metadata["choices"] if c != f.default)
        elif typing.get_origin(base) is tuple:
            changed[f.name] = (0.25, 4.0) if typing.get_args(base)[1] is float else ("x", "y")
        else:
            changed[f.name] = {bool: True, int: 7, float: 0.125, str: "somewhere"}[base]
    cfg = TrainConfig(**changed)
    assert all(getattr(cfg, f.name) != f.default for f in in_files)
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"training": cfg.to_dict()}), encoding="utf-8")
    assert train_config(str(path), {}) == cfg
    toml = "\n".join(f"{k} = {json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in changed.items())
    (tmp_path / "run.toml").write_text(toml + "\n", encoding="utf-8")
    assert train_config(str(tmp_path / "run.toml"), {}) == cfg


@pytest.mark.parametrize("cls", [TrainConfig, InspectConfig])
def test_each_declared_choice_is_what_validate_accepts(cls, tmp_path):
    base = {"rollouts": (str(tmp_path),)}
    for f in fields(cls):
        choices = f.metadata.get("choices")
        if not choices:
            continue
        refused = f"{option_flags(f)[0]} "
        for value in choices:
            assert not any(p.startswith(refused) and "expected one of" in p
                           for p in cls(**base, **{f.name: value}).validate()), (f.name, value)
        assert f"{refused}'bogus': expected one of {', '.join(choices)}" in cls(**base, **{f.name: "bogus"}).validate()


@pytest.mark.parametrize("cls", [TrainConfig, InspectConfig])
def test_each_declared_bound_is_what_validate_checks(cls, tmp_path):
    base = {"rollouts": (str(tmp_path),)}
    if cls is TrainConfig:
        base["loss"] = "pg-is"  # a hyper-parameter of another loss is refused, and checked against its bound
    hints = typing.get_type_hints(cls)
    bounded = [f for f in fields(cls) if f.metadata.get("bound")]
    assert len(bounded) >= 10
    for f in bounded:
        test, text = f.metadata["bound"]
        number_type = int if int in (hints[f.name], *typing.get_args(hints[f.name])) else float
        bad = next(number_type(v) for v in (-1, 0, 1.5, 0.5) if not test(number_type(v)))
        context = {"anchor": "proximal", "is_correction": "tis"} if (cls, f.name) == (TrainConfig, "is_cap") else {}
        problems = cls(**base, **context, **{f.name: bad}).validate()
        assert f"{option_flags(f)[0]} must be {text}, got {bad}" in problems, (f.name, bad, problems)


def test_options_both_commands_take_agree_but_for_their_wording():
    # A name in both configs is one option: same type, default, choices, bound and flags; only the help
    # (what the command does with it) and the panel may differ. rollouts and model differ on purpose.
    hints = typing.get_type_hints(TrainConfig), typing.get_type_hints(InspectConfig)
    train = {f.name: f for f in fields(TrainConfig)}
    shared = [f for f in fields(InspectConfig) if f.name in train and f.name not in ("rollouts", "model")]
    assert len(shared) >= 25
    for f in shared:
        g = train[f.name]
        assert (hints[0][f.name], g.default) == (hints[1][f.name], f.default), f.name
        for key in ("choices", "bound", "flags", "cli", "parse", "minimum", "command_line"):
            assert g.metadata[key] == f.metadata[key], (f.name, key)


def test_every_option_both_commands_take_is_declared_once():
    # The fields both configs have (but rollouts and model, which differ on purpose) come from one
    # declaration each, config.SHARED_OPTIONS, through config.shared(); none is declared twice.
    train = {f.name: f for f in fields(TrainConfig)}
    both = {f.name for f in fields(InspectConfig) if f.name in train} - {"rollouts", "model"}
    assert both == set(SHARED_OPTIONS)
    for cls in (TrainConfig, InspectConfig):
        assert {f.name for f in fields(cls) if f.metadata.get("shared") == f.name} == both, cls.__name__
    declared = {f.name: f for f in fields(InspectConfig) if f.name in both}
    for name, base in SHARED_OPTIONS.items():
        for f in (train[name], declared[name]):
            assert (f.default, f.repr) == (base.default, base.repr), name
            for key in ("choices", "bound", "flags", "cli", "parse", "minimum", "command_line"):
                assert f.metadata[key] is base.metadata[key] or f.metadata[key] == base.metadata[key], (name, key)


def test_loss_registry_and_options_share_one_table():
    # The registry's losses, in order, are the table's; each loss function takes exactly its table entry.
    assert tuple(catalog.LOSSES) == LOSS_NAMES and catalog.DEFAULTS == LOSS_HPARAMS
    context = {"seq", "valid", "selected"}  # what sequence- and batch-level losses take besides hyper-parameters
    for name, spec in catalog.LOSSES.items():
        keywords = {p.name for p in inspect.signature(spec.loss).parameters.values() if p.kind == p.KEYWORD_ONLY}
        assert keywords - context == set(LOSS_HPARAMS[name]), name
    # Every hyper-parameter is a train option whose help names each loss that takes it and its default.
    hparams = [f for f in fields(TrainConfig) if f.metadata.get("hparam")]
    assert tuple(f.name for f in hparams) == HPARAM_NAMES
    assert set().union(*LOSS_HPARAMS.values()) == set(HPARAM_NAMES)
    for f in hparams:
        named = dict(re.findall(r"(?<![\w-])([a-z0-9-]+) \(([^)]*)\)", option_help(f)))
        assert named == {loss: number(hp[f.name]) for loss, hp in LOSS_HPARAMS.items() if f.name in hp}, f.name


def test_docs_option_page_is_current():
    page = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    assert page == render(), "docs/options.md is out of date: python -m drpo_cli.reports.options_doc docs/options.md"
    for f in command_line_fields(TrainLaunch, TrainConfig, InspectConfig):
        assert option_help(f).replace("|", "\\|") in page


@pytest.mark.parametrize("page", sorted(loss_tables.PAGES))
def test_docs_loss_tables_are_current(page):
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    assert text == loss_tables.with_table(text, loss_tables.PAGES[page]()), (
        f"docs/{page}: the loss table is out of date: {loss_tables.COMMAND}")


def test_spec_loss_table_states_each_default():
    """SPEC.md §1's loss table: a row per registered loss whose defaults cell has every default (None: off)."""
    cells = {}
    for line in (ROOT / "docs" / "SPEC.md").read_text(encoding="utf-8").splitlines():
        name = re.match(r"\| `([a-z0-9-]+)` \|", line)
        if name and name.group(1) in LOSS_HPARAMS:
            cells.setdefault(name.group(1), line.split(" | ")[3])
    assert tuple(cells) == LOSS_NAMES
    for loss, hp in LOSS_HPARAMS.items():
        numbers = {float(x) for x in re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?:e-?\d+)?", cells[loss])}
        for name, value in hp.items():
            assert (value in numbers) if value is not None else "off" in cells[loss], (loss, name, cells[loss])
