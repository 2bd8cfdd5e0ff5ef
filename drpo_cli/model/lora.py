"""LoRA adapters through peft: add, initialise, load, save, merge (`drpo train --lora-r`, `--adapter`).

The adapter layers are injected into the transformers model in place (`peft.inject_adapter_in_model`),
so the model stays the plain causal LM the log-prob engine and FSDP2 already run: only the LoRA
matrices train, the base weights and the output head stay frozen (the fused head path then skips
the head-weight gradient GEMM). Dropout is 0: π must be the policy μ approximates.

Initial values are drawn here, not by peft: A ~ kaiming-uniform(a=√5) (peft's own choice) from a
generator seeded with --seed, in name order, B = 0, as full tensors, so every world size starts
from the same adapter (a sharded model copies each rank's rows of them).

On disk an adapter is peft's format: `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight`, loadable with `PeftModel.from_pretrained(base, dir)`.
peft is the `lora` extra, imported only when LoRA is asked for.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from drpo_cli.base.errors import CheckpointError, ConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER = "default"  # peft's adapter name inside the model
_PREFIX = "base_model.model."  # how PeftModel names the wrapped model's parameters on disk
_LORA_KEY = re.compile(rf"^(.*)\.(lora_A|lora_B)\.{ADAPTER}\.weight$")


def require_peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("--lora-r / --adapter need peft: pip install 'drpo[lora]'") from None
    return peft


def new_config(r: int, alpha: float, targets: tuple[str, ...]):
    """A peft LoraConfig: rank r, scaling alpha / r, the given module names or every linear layer but the head."""
    peft = require_peft()
    return peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets) if targets else "all-linear",
                           lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


def read_config(adapter_dir: str | Path):
    """The LoraConfig of an adapter directory (dropout forced to 0), or CheckpointError naming the file."""
    peft = require_peft()
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"--adapter {adapter_dir}: no {ADAPTER_CONFIG}; expected a peft LoRA adapter directory")
    if not (Path(adapter_dir) / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"--adapter {adapter_dir}: no {ADAPTER_WEIGHTS} (safetensors adapter weights)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable JSON ({err})") from err
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type {raw.get('peft_type')!r}; drpo continues LoRA adapters only")
    try:
        config = peft.LoraConfig.from_pretrained(str(adapter_dir))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: not a LoRA config peft can read ({err})") from err
    config.lora_dropout = 0.0
    config.inference_mode = False
    return config


def add_adapter(model: torch.nn.Module, config) -> list[str]:
    """Inject LoRA layers in place and freeze everything else; returns the trainable parameter names."""
    peft = require_peft()
    try:
        peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as err:  # e.g. target modules not found
        raise ConfigError(f"--lora-targets: {str(err).strip().splitlines()[0]}") from err
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(bool(_LORA_KEY.match(name)))
        if p.requires_grad:
            names.append(name)
    if not names:
        raise ConfigError("--lora-targets: no LoRA parameters were added")
    return names


def initial_values(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Full CPU float32 initial values of every LoRA matrix: A kaiming-uniform (seeded), B zero."""
    gen = torch.Generator().manual_seed(seed)
    values = {}
    for name, p in sorted(model.named_parameters()):
        match = _LORA_KEY.match(name)
        if match is None:
            continue
        t = torch.zeros(p.shape, dtype=torch.float32)
        if match.group(2) == "lora_A":
            # kaiming_uniform_(a=√5): U(−b, b), b = gain·√(3 / fan_in), gain = √(2 / (1 + a²)).
            bound = math.sqrt(2.0 / 6.0) * math.sqrt(3.0 / p.shape[1])
            t.uniform_(-bound, bound, generator=gen)
        values[name] = t
    return values


def read_adapter(adapter_dir: str | Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights under the model's own parameter names; every LoRA matrix must be there."""
    from safetensors.torch import load_file

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    from drpo_cli.model.checkpoint import non_finite_at, non_finite_error, safetensors_header

    safetensors_header(path)  # a truncated file is named, not a SafetensorError
    stored = load_file(str(path))
    values, expected = {}, {}
    for name, p in model.named_parameters():
        if _LORA_KEY.match(name):
            expected[disk_name(name)] = (name, tuple(p.shape))
    for key, (name, shape) in expected.items():
        if key not in stored:
            raise CheckpointError(f"{path}: no tensor {key} (the adapter does not fit this base model)")
        if tuple(stored[key].shape) != shape:
            raise CheckpointError(f"{path}: tensor {key} has shape {list(stored[key].shape)}, the base model "
                                  f"needs {list(shape)}")
        found = non_finite_at(stored[key])
        if found is not None:
            raise non_finite_error(str(path), key, shape, found)
        values[name] = stored[key].float()
    return values


def disk_name(name: str) -> str:
    """`model.layers.0.q_proj.lora_A.default.weight` -> `base_model.model.model.layers.0.q_proj.lora_A.weight`."""
    return _PREFIX + name.replace(f".{ADAPTER}.", ".")


def is_lora(name: str) -> bool:
    return _LORA_KEY.match(name) is not None


def config_json(config, base: str) -> str:
    """adapter_config.json as peft writes it (sets as sorted lists), with the base model's path."""
    d = config.to_dict()
    d["base_model_name_or_path"] = base
    d["inference_mode"] = True
    d = {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}
    return json.dumps(d, indent=2, sort_keys=True) + "\n"


def scalings(model: torch.nn.Module) -> dict[str, float]:
    """Module name -> LoRA scaling (alpha / r, or alpha / √r with rsLoRA) of every adapted module."""
    from peft.tuners.lora import LoraLayer

    return {name: float(m.scaling[ADAPTER]) for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def merged(entries: Iterable[tuple[str, torch.Tensor | None]], scale: dict[str, float]
           ) -> Iterator[tuple[str, torch.Tensor | None]]:
    """A state-dict stream with every LoRA layer merged: `W + scaling · B A` under the base model's names.

    Streamed, for a sharded model gathered one tensor at a time (None on ranks other than 0): a base
    weight is held only until its module's A and B follow (peft registers them right after it).
    """
    held: dict[str, dict[str, torch.Tensor | None]] = {}
    for name, tensor in entries:
        module, _, leaf = name.rpartition(".base_layer.")
        if leaf and module in scale:
            if leaf == "weight":
                held.setdefault(module, {})["W"] = tensor
            else:  # the base layer's bias: unchanged by LoRA
                yield f"{module}.{leaf}", tensor
            continue
        match = _LORA_KEY.match(name)
        if match is None:
            yield name, tensor
            continue
        module = match.group(1)
        parts = held.setdefault(module, {})
        parts[match.group(2)] = tensor
        if {"W", "lora_A", "lora_B"} <= parts.keys():
            del held[module]
            w, a, b = parts["W"], parts["lora_A"], parts["lora_B"]
            if w is None:
                yield f"{module}.weight", None
            else:
                delta = (b.double() @ a.double()) * scale[module]  # (out, r) @ (r, in)
                yield f"{module}.weight", (w.double() + delta).to(w.dtype)
    if held:
        raise CheckpointError(f"merging the adapter: incomplete LoRA layers {', '.join(sorted(held)[:3])}")
