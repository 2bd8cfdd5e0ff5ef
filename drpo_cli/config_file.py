"""`drpo train --config FILE`: TrainConfig fields from a TOML or JSON file, flags on top (no torch).

The file holds TrainConfig fields by name (`lr = 1e-6`, `rollouts = ["r.arrow"]`). A JSON file
with a `training` object, such as a checkpoint's `drpo_checkpoint.json`, uses that object, so a
past run reruns as it was (`loss_hparams`, which drpo records next to the fields, is derived from
them and ignored). Command-line flags override the file. Unknown keys and wrong types are refused,
all at once, naming the file, the key and the valid keys. Relative paths are relative to the
working directory, as on the command line.

Destructive and unsafe switches (`overwrite`, `allow_unsafe_weights`: fields declared `file=False`)
come only from the command line: a file that sets one is refused, except a checkpoint's recorded
run, where they are dropped (a replay never replaces an output nobody asked to replace).
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from typing import Any

from drpo_cli.config import TrainConfig, raise_problems
from drpo_cli.objectives.catalog import HPARAM_NAMES, LOSS_HPARAMS

DERIVED_KEYS = ("loss_hparams",)  # written by TrainConfig.to_dict, recomputed from the fields


def load_document(path: str) -> tuple[dict[str, Any], bool]:
    """(the file's options, whether it is a run drpo recorded): TOML for *.toml, else JSON; a JSON
    document's `training` object when it has one (ConfigError naming the file and line)."""
    from drpo_cli.base.errors import ConfigError

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise ConfigError(f"--config {path}: {err.strerror or err}") from None
    if path.endswith(".toml"):
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # Python 3.10: the same parser, published as tomli
            import tomli as tomllib
        try:
            doc = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"--config {path}: not valid TOML ({err})") from None
    else:
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            where = f"line {err.lineno}, column {err.colno}: " if isinstance(err, json.JSONDecodeError) else ""
            raise ConfigError(f"--config {path}: not valid JSON ({where}{err.msg if where else err}); "
                              "use a .toml suffix for TOML") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {path}: expected an object of option names, found {type(doc).__name__}")
    training = doc.get("training")
    recorded = isinstance(training, dict) and "rollouts" in training
    return (training if recorded else doc), recorded


def train_config(path: str, overrides: dict[str, Any]) -> TrainConfig:
    """TrainConfig from the file's values with `overrides` (the flags given) on top, not yet checked."""
    doc, recorded = load_document(path)
    specs = {f.name: f for f in fields(TrainConfig)}
    problems, values = [], {}
    for key, value in doc.items():
        if key in DERIVED_KEYS:
            continue
        if key in specs and not specs[key].metadata.get("file", True):
            if not recorded and value not in (False, None):
                flag = "--" + key.replace("_", "-")
                problems.append(f"--config {path}: key {key!r}: {flag} is taken from the command line only "
                                f"(a destructive or unsafe switch); remove it from the file and pass {flag}")
            continue
        if key not in specs:
            problems.append(f"--config {path}: unknown key {key!r}; valid keys: {', '.join(specs)}")
            continue
        converted, problem = _convert(value, str(specs[key].type))
        if problem:
            problems.append(f"--config {path}: key {key!r}: expected {problem}, found {value!r}")
        else:
            values[key] = converted
    raise_problems(problems)
    if "loss" in overrides and overrides["loss"] != values.get("loss"):
        # Another loss on the command line: the file's hyper-parameters of its own loss no longer apply.
        valid = LOSS_HPARAMS.get(overrides["loss"], {})
        values = {k: v for k, v in values.items() if k not in HPARAM_NAMES or k in valid}
    values.update(overrides)
    return TrainConfig(**values)


def _convert(value: Any, annotation: str) -> tuple[Any, str | None]:
    """(value as the field holds it, None) or (None, what was expected) for a field's type annotation."""
    kinds = [k.strip() for k in annotation.split("|")]
    if "None" in kinds:
        if value is None:
            return None, None
        kinds.remove("None")
    kind = kinds[0] if len(kinds) == 1 else annotation
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return (value, None) if isinstance(value, bool) else (None, "true or false")
    if kind == "int":
        return (value, None) if isinstance(value, int) and not isinstance(value, bool) else (None, "an integer")
    if kind == "float":
        return (float(value), None) if number else (None, "a number")
    if kind == "str":
        return (value, None) if isinstance(value, str) else (None, "a string")
    if kind == "tuple[str, ...]":
        if isinstance(value, str):
            return (value,), None
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        return (tuple(value), None) if ok else (None, "a list of strings")
    if kind == "tuple[float, float]":
        ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        return (tuple(float(v) for v in value), None) if ok else (None, "a list of two numbers")
    return value, None  # a type this loader does not know: TrainConfig.validate() judges the value
