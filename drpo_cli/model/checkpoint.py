"""Hugging Face model directories: safe loading, policy-version metadata, atomic saving.

Loading uses `trust_remote_code=False`, local files only and safetensors weights unless the user
opts in (SPEC.md §4). Saving writes a complete model directory into a hidden temporary sibling
and renames it into place (outputs.py: the one output rule, umask modes, --overwrite only of
drpo's own checkpoints), so a crash at any moment leaves either no output directory or a
complete one; the source checkpoint is only ever read.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch

from drpo_cli import __version__
from drpo_cli.base import outputs
from drpo_cli.base.errors import CheckpointError, ConfigError, DrpoError
from drpo_cli.rollouts.rows import Context

DRPO_META = outputs.DIR_MARKERS["checkpoint"]  # policy version, training record, the files drpo wrote
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
MAX_SHARD_SIZE = "2GB"  # a checkpoint's safetensors files, as transformers' save_pretrained writes them
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Files copied from the source directory, by name: generation settings and what a tokenizer needs
# (a `*.tiktoken` vocabulary is the one suffix). Nothing else is copied: a name like tokenizer.env is
# no tokenizer file (docs/outputs.md, "Security model").
COPIED = frozenset({
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
    "merges.txt", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
})
COPIED_SUFFIX = ".tiktoken"
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # peft's names (lora.py)
_UNSAFE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
_VERSION_SUFFIX = re.compile(r"^(.*)-v\d+$")


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    policy_version: int | None  # from drpo_checkpoint.json; None when the directory has none
    vocab_size: int  # rows of the input embedding: token ids must be below this
    config: Any  # transformers PreTrainedConfig


# ---- what drpo reads from a model directory -------------------------------------------------------


def copied_files(source_dir: Path) -> list[tuple[str, Path]]:
    """(name, real path) of each file a checkpoint written from `source_dir` copies from it (COPIED), `contained`."""
    names = sorted(e.name for e in os.scandir(source_dir) if e.name in COPIED or e.name.endswith(COPIED_SUFFIX))
    return [(name, contained(source_dir, name)) for name in names]


def read_names(directory: Path) -> set[str]:
    """The entries of a model directory that drpo reads or copies: config, weights, its marker, tokenizer files."""
    return {e.name for e in os.scandir(directory)
            if e.name in ("config.json", DRPO_META, WEIGHTS_INDEX, *_ADAPTER_FILES) or e.name.endswith(".safetensors")
            or any(fnmatch(e.name, pat) for pat in _UNSAFE_WEIGHTS) or e.name in COPIED or e.name.endswith(COPIED_SUFFIX)}


def contained(directory: Path, name: str) -> Path:
    """The real path of `directory/name`, a regular file inside the directory, or CheckpointError.

    A symlink may lead only inside the directory, or, for a Hugging Face hub snapshot
    (`models--org--name/snapshots/REV/`, whose files are symlinks to `../../blobs/HASH`), into that
    repository's `blobs/`: a model directory that someone else wrote cannot make drpo read (and copy
    into a checkpoint it publishes) a file from elsewhere, e.g. /proc/self/environ.
    """
    root = outputs.real(directory)
    path = directory / name
    target = outputs.real(path)
    allowed = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    if not any(a in target.parents for a in allowed):
        raise CheckpointError(f"{path}: a symlink to {target}, outside the model directory (drpo reads only "
                              "files inside it, or in its hub cache's blobs/)")
    if not target.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    return target


# ---- loading --------------------------------------------------------------------------------------


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`float32` | `bfloat16` | `float16` | `auto` (bf16 on a CUDA device that supports it, else fp32)."""
    if dtype == "auto":
        cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}: expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_policy_version(path: str | os.PathLike) -> int | None:
    """The policy version recorded in `path/drpo_checkpoint.json`, or None when there is no such file."""
    meta = Path(path) / DRPO_META
    if not meta.is_file():
        return None
    try:
        version = json.loads(meta.read_text(encoding="utf-8"))["policy_version"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f'{meta}: unreadable ({type(err).__name__}: {err}); expected {{"policy_version": int}}'
        )
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise CheckpointError(f"{meta}: policy_version must be an integer >= 0, found {version!r}")
    return version


def _check_directory(path: Path, allow_unsafe: bool) -> dict:
    """Every reason a directory cannot be loaded, found before transformers is asked (one line each)."""
    if not path.exists():
        raise CheckpointError(f"{path}: model directory not found")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; --model expects a Hugging Face model directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json; not a Hugging Face model directory")
    for name in sorted(read_names(path)):
        contained(path, name)
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config_file}: unreadable JSON ({err})")
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object of model settings, found a {_json_kind(config)}")
    names = [p.name for p in path.iterdir() if p.is_file()]
    has_safe = any(n.endswith(".safetensors") for n in names)
    unsafe = sorted(n for n in names if any(fnmatch(n, pat) for pat in _UNSAFE_WEIGHTS))
    if not has_safe and not (allow_unsafe and unsafe):
        if unsafe:
            raise CheckpointError(
                f"{path}: no safetensors weights, only {unsafe[0]} (pickle) found: pass --allow-unsafe-weights"
            )
        raise CheckpointError(f"{path}: no weights found (expected {WEIGHTS} or {WEIGHTS_INDEX})")

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES:
        if "auto_map" in config:
            raise CheckpointError(
                f"{config_file}: model type {model_type!r} needs remote code; drpo loads only architectures "
                "built into transformers (trust_remote_code=False)"
            )
        raise CheckpointError(
            f"{config_file}: unknown model type {model_type!r} for this transformers version"
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise CheckpointError(
            f"{config_file}: model type {model_type!r} has no causal-LM head in transformers"
        )
    return config


def _json_kind(value: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")


def load_model(
    path: str | os.PathLike, *, device: str = "cpu", dtype: str = "float32", allow_unsafe: bool = False
) -> tuple[torch.nn.Module, CheckpointInfo]:
    """Load a causal LM from a local directory (never the Hub) in eval mode, with its CheckpointInfo.

    Every file is checked first (check_weights: safetensors headers, config.json against the
    weights), so a bad checkpoint ends with one line naming the file and tensor before anything is
    allocated, never with transformers' own report; a weight holding NaN or ±inf is refused once read.
    """
    path = Path(path)
    torch_dtype = resolve_dtype(dtype, device)
    target = _target_device(device)
    config = read_config(path, allow_unsafe)
    policy_version = read_policy_version(path)
    entries = check_weights(path, config)

    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                path,
                config=config,
                dtype=torch_dtype,
                trust_remote_code=False,
                local_files_only=True,
                use_safetensors=None if allow_unsafe else True,
                output_loading_info=True,
            )
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as err:
        raise CheckpointError(f"{path}: cannot load model: {_first_line(err)}") from err
    # transformers fills missing weights with random values and only warns; training on them would be silent garbage.
    problems = sorted(info.get("missing_keys", ())) + sorted(str(k) for k in info.get("mismatched_keys", ()))
    if problems:
        raise CheckpointError(
            f"{path}: weights missing or of the wrong shape: {', '.join(problems[:3])}"
            + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
        )
    check_finite(model, path, entries)
    model = model.to(target).eval()
    return model, checkpoint_info(path, policy_version, model)


def checkpoint_info(path: Path, policy_version: int | None, model: torch.nn.Module) -> CheckpointInfo:
    vocab_size = int(model.get_input_embeddings().weight.shape[0])  # a DTensor's global shape when sharded
    return CheckpointInfo(path=path, policy_version=policy_version, vocab_size=vocab_size, config=model.config)


def _target_device(device: str) -> torch.device:
    try:
        target = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"invalid device {device!r}: {err}")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return target


def read_config(path: Path, allow_unsafe: bool = False):
    """The checked directory's transformers config (every safetensors file's header checked too)."""
    _check_directory(path, allow_unsafe)
    from transformers import AutoConfig

    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path / 'config.json'}: cannot read the model config: {_first_line(err)}") from err


@contextlib.contextmanager
def quiet_transformers():
    """transformers' own warnings, load report and progress bars stay off stderr; drpo reports instead."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the meta device; buffers stay real.

    Non-persistent buffers (rotary `inv_freq`) are computed by the constructors and are not in the
    checkpoint, so they must exist for real; parameters are filled from the files later. A parameter
    already on meta is kept as it is, so weight tying (the same object registered twice) survives.
    """
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def empty_model(config: Any, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The architecture without weights: parameters on the meta device, real (computed) buffers."""
    from transformers import AutoModelForCausalLM

    with _parameters_on_meta(), quiet_transformers():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    return model.eval()


# ---- safetensors files ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str  # safetensors dtype name, e.g. F32, BF16
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # where the tensor's bytes start in the file


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_rows(entry: TensorEntry, start: int, stop: int, out: torch.Tensor) -> None:
    """Copy rows [start, stop) of a stored tensor into `out` (any dtype and device), reading only those bytes.

    Plain reads, not a memory map: the pages of the file do not become part of this process's
    resident memory, so N ranks reading N disjoint slices hold one copy of the weights together.
    When `out` is a CPU tensor of the stored dtype the bytes land in it directly (no extra copy).
    """
    dtype = _ST_DTYPES.get(entry.dtype)
    if dtype is None:
        raise CheckpointError(f"{entry.file}: unsupported safetensors dtype {entry.dtype}")
    row_numel = math.prod(entry.shape[1:]) if entry.shape else 1
    count = (stop - start) * row_numel
    direct = out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous()
    buf = out if direct else torch.empty(count, dtype=dtype)
    if count:
        with open(entry.file, "rb") as f:
            f.seek(entry.offset + start * row_numel * dtype.itemsize)
            view = memoryview(buf.view(-1).view(torch.uint8).numpy())
            if f.readinto(view) != len(view):
                raise CheckpointError(f"{entry.file}: truncated safetensors file (tensor data ends early)")
    if not direct:
        out.copy_(buf.view(out.shape))


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_SAFETENSORS_HEADER_MAX = 100 * 1024 * 1024  # the format's own limit on the JSON header
# Bytes per element of every safetensors dtype drpo can read (sub-byte F4 / F6 ones it cannot).
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


def safetensors_header(file: Path) -> dict[str, TensorEntry]:
    """Tensor name -> entry from a safetensors file's header, or CheckpointError if it is truncated or corrupt.

    Reads the 8-byte length and the JSON header only, and checks everything the header promises
    against itself and the file, as the safetensors library would when loading, but naming the file
    and the tensor: every tensor's dtype is known and its data_offsets span exactly dtype × shape
    bytes, the tensors tile the data section without gap or overlap, and the file holds every byte
    of it (a copy cut short by a full disk or an interrupted download does not).
    """
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, no header)")
            n = int.from_bytes(head, "little")
            if n > _SAFETENSORS_HEADER_MAX or 8 + n > size:
                raise CheckpointError(
                    f"{file}: truncated or corrupt safetensors file: header of {n} bytes, file has {size} bytes"
                )
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: unreadable safetensors header ({type(err).__name__}: {err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header: expected a JSON object, found {type(header).__name__}")
    entries = {}
    for name, t in header.items():
        if name != "__metadata__":
            entries[name] = _header_entry(file, 8 + n, name, t)
    end = 0  # the tensors must tile the data section: each starts where the previous one ended
    for name, e in sorted(entries.items(), key=lambda item: (item[1].offset, item[1].nbytes)):
        if e.offset - 8 - n != end:
            what = "overlaps the tensor before it" if e.offset - 8 - n < end else "leaves a gap before it"
            raise CheckpointError(f"{file}: corrupt safetensors header: tensor {name} starts at byte "
                                  f"{e.offset - 8 - n} of the data, expected {end} ({what})")
        end += e.nbytes
    if 8 + n + end > size:
        raise CheckpointError(
            f"{file}: truncated safetensors file: its header promises {8 + n + end} bytes, the file has {size}"
        )
    if 8 + n + end < size:
        raise CheckpointError(f"{file}: corrupt safetensors file: its header accounts for {8 + n + end} bytes, "
                              f"the file has {size}")
    return entries


def _header_entry(file: Path, data_start: int, name: str, t: Any) -> TensorEntry:
    """One tensor of a safetensors header, its fields checked (dtype, shape, offsets that fit them)."""
    where = f"{file}: tensor {name}"
    if not isinstance(t, dict) or not {"dtype", "shape", "data_offsets"} <= set(t):
        raise CheckpointError(f"{where}: corrupt safetensors header entry: expected dtype, shape and data_offsets, "
                              f"found {str(t)[:80]}")
    dtype, shape, offsets = t["dtype"], t["shape"], t["data_offsets"]
    if dtype not in _ST_ITEMSIZE:
        raise CheckpointError(f"{where}: unsupported safetensors dtype {dtype!r} (expected one of "
                              f"{', '.join(_ST_ITEMSIZE)})")
    if not (isinstance(shape, list) and all(_count(d) for d in shape)):
        raise CheckpointError(f"{where}: corrupt safetensors header: shape {shape!r} is not a list of sizes >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(x) for x in offsets)
            and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: corrupt safetensors header: data_offsets {offsets!r} are not [begin, end] "
                              "with 0 <= begin <= end")
    need = math.prod(shape) * _ST_ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != need:
        raise CheckpointError(f"{where}: its data_offsets span {offsets[1] - offsets[0]} bytes, but {dtype} × "
                              f"{shape} needs {need}")
    return TensorEntry(file, dtype, tuple(shape), need, data_start + offsets[0])


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def weight_entries(path: Path) -> dict[str, TensorEntry]:
    """Every tensor of a checkpoint directory's safetensors weights (sharded or not), headers checked.

    With an index, every shard it names is a plain file of the directory and holds the tensors the
    index puts there.
    """
    index = path / WEIGHTS_INDEX
    if not index.is_file():
        entries: dict[str, TensorEntry] = {}
        for name in sorted(p.name for p in path.iterdir() if p.is_file() and p.name.endswith(".safetensors")):
            entries.update(safetensors_header(path / name))
        return entries
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index}: unreadable ({type(err).__name__}: {err}); expected a weight_map")
    if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
        raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
    files = sorted(set(weight_map.values()))
    for name in files:
        if Path(name).name != name or name in (".", ".."):
            raise CheckpointError(f"{index}: lists {name!r}, expected a file name in {path}")
        if not (path / name).is_file():
            raise CheckpointError(f"{index}: lists {name}, which is not in {path}")
    headers = {name: safetensors_header(path / name) for name in files}
    for tensor, name in weight_map.items():
        if tensor not in headers[name]:
            raise CheckpointError(f"{index}: puts tensor {tensor} in {name}, whose header has no such tensor")
    return {tensor: entry for name in files for tensor, entry in headers[name].items()}


def weights_nbytes(path: str | os.PathLike, dtype: str | None = None) -> int:
    """Bytes of a checkpoint directory's safetensors weights, with floating tensors in `dtype` if given."""
    total = 0
    for e in weight_entries(Path(path)).values():
        if dtype is not None and e.dtype in _FLOAT_DTYPES:
            total += math.prod(e.shape) * DTYPES[dtype].itemsize
        else:
            total += e.nbytes
    return total


def output_nbytes(source: str | os.PathLike, dtype: str | None, steps: int = 0) -> int:
    """What writing a checkpoint from `source` (weights in `dtype`, default float32) takes on disk at its
    peak, about: the weights, plus the shard being assembled (its bytes sit in scratch files until the
    shard's file is written: `CheckpointWriter`), the copied files and the report and page of `steps` steps."""
    source = Path(source)
    copied = sum(real.stat().st_size for _, real in copied_files(source))
    weights = weights_nbytes(source, dtype or "float32")
    return weights + min(weights, parse_size(MAX_SHARD_SIZE)) + copied + report_nbytes(steps)


def report_nbytes(steps: int) -> int:
    """Room for a training report and its page: 4 MiB plus 32 KiB per optimizer step (the toy example's
    report takes 60 KB and its page 131 KB after one step; a step adds about 4 KB to each)."""
    return 4 * 2**20 + 32 * 2**10 * steps


# Decoder layers in tensor names: model.layers.3. (Llama, Qwen, Mistral), transformer.h.3. (GPT-2, Falcon),
# transformer.blocks.3. (MPT), encoder.layers / decoder.layers.
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_FLOAT_WEIGHTS = (*_FLOAT_DTYPES, "F8_E4M3", "F8_E5M2")  # what a trained parameter may be stored as
_BUFFER_SLACK = 64 * 1024 * 1024  # computed buffers may outweigh tiny weights by this much


def check_weights(path: Path, config: Any) -> dict[str, TensorEntry]:
    """The weights' tensors (weight_entries), once config.json and the files are known to agree.

    Found before anything is built or allocated, in seconds whatever the config claims, each as one
    line naming the file, the tensor or the key, expected against found: every safetensors header
    (safetensors_header, the index's shards), decoder layers in the config that the weights do not
    hold, then, on the architecture built on the meta device (no memory): every parameter present
    in the files, of its shape and of a floating-point dtype, and buffers the constructors would
    compute that outweigh the weights (e.g. a position table of an absurd max_position_embeddings).
    Pickle weights (--allow-unsafe-weights) have no headers: transformers checks them (returns {}).
    """
    entries = weight_entries(path)
    if not entries:
        return entries
    _check_layers(path, config, entries)
    model = meta_architecture(config, path)
    _check_parameters(path, model, entries)
    _check_buffers(path, model, entries)
    return entries


# Where configs state their context (vLLM's list for max_model_len; transformers maps GPT-2's n_positions).
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                  "max_sequence_length", "max_seq_length", "seq_len")
_SCALED_ROPE = ("linear", "dynamic", "yarn")  # rope types whose factor extends max_position_embeddings (vLLM)


def model_context(config: Any, model_dir: str | os.PathLike) -> Context | None:
    """The most positions a model's input may hold and the config key(s) saying so, or None: no limit stated.

    The least of the position keys the text config has, times the rope scaling factor where the rope
    type extends the context past max_position_embeddings (linear, dynamic; yarn from its
    original_max_position_embeddings), as vLLM derives max_model_len; llama3 and longrope configs
    already state the extended length. Beyond it a learned position table has no row (GPT-2: an
    IndexError) and a rotary model was never trained; a model without positions (Mamba) has no limit.
    """
    text = config.get_text_config()
    stored = text.to_dict()  # the keys as config.json spells them (GPT-2: n_positions)
    found = [(v, k) for k in _POSITION_KEYS
             if isinstance(v := stored.get(k), int) and not isinstance(v, bool) and v > 0]
    if not found:
        return None
    limit, key = min(found)
    rope = stored.get("rope_parameters") or stored.get("rope_scaling")
    rope = rope if isinstance(rope, dict) else {}
    factor = rope.get("factor")
    if rope.get("rope_type", rope.get("type")) in _SCALED_ROPE and isinstance(factor, (int, float)) and factor > 1:
        base = rope.get("original_max_position_embeddings") if rope.get("rope_type", rope.get("type")) == "yarn" else None
        limit, key = int((base if isinstance(base, int) and base > 0 else limit) * factor), f"{key} × rope factor {factor:g}"
    return Context(limit, f"{key} of {model_dir}")


def check_model(path: str | os.PathLike, allow_unsafe: bool = False) -> Any:
    """The transformers config of a model directory whose files all check (read_config, check_weights).

    Nothing is loaded: train and inspect run it before reading any row, so a broken directory costs
    seconds, not a data pass.
    """
    path = Path(path)
    config = read_config(path, allow_unsafe)
    check_weights(path, config)
    return config


def _check_layers(path: Path, config: Any, entries: Mapping[str, TensorEntry]) -> None:
    """num_hidden_layers within the layers the weights hold (building 100,000 layers is minutes of work)."""
    layers = getattr(config.get_text_config(), "num_hidden_layers", None)
    if not isinstance(layers, int) or isinstance(layers, bool):
        return
    indices = [int(m.group(1)) for name in entries for m in [_LAYER_INDEX.search(name)] if m]
    held = max(indices) + 1 if indices else 0
    if indices and layers > held:
        example = next(name for name in entries if (m := _LAYER_INDEX.search(name)) and int(m.group(1)) == held - 1)
        raise CheckpointError(f"{path / 'config.json'}: num_hidden_layers is {layers}, but the weights hold "
                              f"{held} layer(s) (the last: {example})")
    if layers > len(entries):  # whatever the tensors' names: every layer has at least one weight
        raise CheckpointError(f"{path / 'config.json'}: num_hidden_layers is {layers}, but the weights hold "
                              f"only {len(entries)} tensors")


def meta_architecture(config: Any, path: Path | None = None) -> torch.nn.Module:
    """The architecture with every parameter and buffer on the meta device: shapes, no memory, no init."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"), quiet_transformers():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as err:  # any failure to build from the config is a bad config
        where = "config.json" if path is None else path / "config.json"
        raise CheckpointError(f"{where}: cannot build the architecture from it: {type(err).__name__}: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_buffers(path: Path, model: torch.nn.Module, entries: Mapping[str, TensorEntry]) -> None:
    """Buffers the constructors compute for real (empty_model, from_pretrained) no larger than the weights."""
    weights = sum(e.nbytes for e in entries.values())
    buffers = [(b.numel() * b.element_size(), name, list(b.shape)) for name, b in model.named_buffers()]
    total = sum(n for n, _, _ in buffers)
    if total > weights + _BUFFER_SLACK:
        n, name, shape = max(buffers)
        raise CheckpointError(f"{path / 'config.json'}: the architecture's buffers would take {human_bytes(total)} "
                              f"({name}: {shape}, {human_bytes(n)}), more than its weights ({human_bytes(weights)}); "
                              "e.g. max_position_embeddings too large")


def _check_parameters(path: Path, model: torch.nn.Module, entries: Mapping[str, TensorEntry]) -> None:
    """Every weight of the (meta) model in the files, with the shape the config gives it and a float dtype.

    Names and shapes are the saved ones (tied copies left out, MoE experts that transformers fuses
    on load split back), so each is compared with the tensor of that name in the files.
    """
    config_file = path / "config.json"
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    ignored = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_missing", None) or ())]
    convert = saved_format(model)
    missing = []
    for name, p in model.state_dict(keep_vars=True).items():
        for saved, t in convert(name, p):
            entry = entries.get(saved)
            if entry is None:
                if name in params and not any(pat.search(saved) for pat in ignored):
                    missing.append(saved)
                continue
            if tuple(entry.shape) != tuple(t.shape):
                raise CheckpointError(
                    f"{entry.file}: tensor {saved} has shape {list(entry.shape)}, but {config_file} "
                    f"implies {list(t.shape)} (e.g. vocab_size / hidden_size disagree with the weights)"
                )
            if name in params and entry.dtype not in _FLOAT_WEIGHTS:
                raise CheckpointError(f"{entry.file}: tensor {saved} has dtype {entry.dtype}; a weight must be "
                                      f"floating point ({', '.join(_FLOAT_WEIGHTS)})")
    if missing:
        raise CheckpointError(f"{path}: weights missing from the checkpoint: {', '.join(sorted(missing)[:3])}"
                              + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
                              + f"; {config_file} implies them")


_FINITE_BLOCK = 1 << 22  # elements checked at once: a 4 MB temporary, whatever the tensor's size


def non_finite_at(t: torch.Tensor) -> tuple[int, float] | None:
    """(flat index, value) of the first NaN or ±inf of a floating tensor, or None; block by block."""
    if not t.is_floating_point():
        return None
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), _FINITE_BLOCK):
        block = flat[start : start + _FINITE_BLOCK]
        bad = ~torch.isfinite(block)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            return start + i, float(block[i])
    return None


def non_finite_error(where: str, name: str, shape: tuple[int, ...], found: tuple[int, float]) -> CheckpointError:
    """The one line for a weight holding NaN or ±inf: the tensor, the first such element and its index."""
    index, value = found
    at = [int(i) for i in torch.unravel_index(torch.tensor(index), shape)] if shape else []
    return CheckpointError(f"{where}: tensor {name} holds {value} at {at}; drpo refuses non-finite weights "
                           "(they make every log-prob and gradient NaN)")


def check_finite(model: torch.nn.Module, path: Path, entries: Mapping[str, TensorEntry]) -> None:
    """CheckpointError naming the first floating weight of a loaded model that holds NaN or ±inf."""
    seen = set()
    for name, t in model.state_dict().items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        found = non_finite_at(t)
        if found is not None:
            where = entries[name].file if name in entries else path
            raise non_finite_error(str(where), name, tuple(t.shape), found)


def default_out_dir(model_dir: str | os.PathLike, policy_version: int | None) -> Path:
    """The sibling directory a new checkpoint goes to: `ckpt/` at version 7 -> `ckpt-v8/`.

    An existing `-vN` suffix is replaced (`ckpt-v8/` at 8 -> `ckpt-v9/`); an unknown version counts as 0.
    """
    src = Path(os.path.abspath(model_dir))  # abspath also drops a trailing slash
    match = _VERSION_SUFFIX.match(src.name)
    base = match.group(1) if match else src.name
    return src.with_name(f"{base}-v{(policy_version or 0) + 1}")


def human_bytes(n: int) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def check_free_space(out_dir: str | os.PathLike, needed: int) -> None:
    """CheckpointError (exit 2) when `out_dir`'s filesystem has less than `needed` bytes free.

    Checked before anything is loaded, so a full disk is found in a second, not after the run.
    The nearest existing parent stands for `out_dir`, which usually does not exist yet.
    """
    where = Path(os.path.abspath(out_dir))
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < needed:
        raise CheckpointError(
            f"--out {out_dir}: {human_bytes(free)} ({free:,} bytes) free on the filesystem of {where}, "
            f"the output needs about {human_bytes(needed)} ({needed:,} bytes)"
        )


def write_error(err: Exception, path: Path, needed: int) -> DrpoError:
    """One line for a failed write: the path, the reason and, for a full disk, the bytes needed.

    `err` is an OSError, or safetensors' own error, which carries the OS error only in its text.
    """
    code = getattr(err, "errno", None)
    if code is None:
        match = re.search(r"os error (\d+)", str(err))
        code = int(match.group(1)) if match else None
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return DrpoError(f"{path}: cannot write ({os.strerror(code)}); the output needs about "
                         f"{human_bytes(needed)} ({needed:,} bytes) on its filesystem; nothing was left behind")
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return DrpoError(f"{path}: cannot write ({type(err).__name__}: {first}); nothing was left behind")


# ---- saving ---------------------------------------------------------------------------------------


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like `2GB`, `500MB`, `10KB`, `1GiB` (decimal and binary units)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ConfigError(f"invalid shard size {size!r}: expected e.g. 2GB, 500MB or a number of bytes")
    unit = (match.group(2) or "B").upper()
    power = "BKMGT".index(unit[0]) if unit != "B" else 0
    base = 1024 if "I" in unit else 1000
    return int(float(match.group(1)) * base**power)


class CheckpointWriter:
    """Streams tensors into safetensors shards inside a temporary sibling of `out_dir`; `commit()` renames it in.

    Each tensor's bytes go to disk when it is added (no tensor is kept), so a caller that gathers
    a sharded model parameter by parameter (FSDP on rank 0) holds one tensor at a time, never a
    shard nor the model. A safetensors file starts with a header naming every tensor, so the bytes
    wait in one scratch file per element size inside the temporary directory; a shard's file is
    assembled (header, then the scratch files, largest elements first: every tensor stays aligned to
    its element size) as soon as the shard reaches `max_shard_size`. Use as a context manager: leaving the
    block with an exception removes the temporary directory and leaves `out_dir` untouched.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        source_dir: str | os.PathLike,
        policy_version: int,
        training_config: dict,
        config: Any = None,
        overwrite: bool = False,
        max_shard_size: int | str = MAX_SHARD_SIZE,
        dtype: str | None = None,
        extra_files: Mapping[str, str | bytes] | None = None,
        expected_bytes: int | None = None,
        adapter_config: str | None = None,
        tmp_dir: Path | None = None,
    ):
        self.out_dir = outputs.real(out_dir)
        self.source_dir = Path(os.path.abspath(source_dir))
        # The one output rule (outputs.py): not the source, not around or inside it, replace only drpo's own.
        outputs.check_paths([("source", source_dir)], [outputs.Output("out_dir", out_dir, "checkpoint")],
                            overwrite=overwrite)
        if dtype is not None and dtype not in DTYPES:
            raise CheckpointError(f"unsupported save dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        if isinstance(policy_version, bool) or not isinstance(policy_version, int) or policy_version < 0:
            raise CheckpointError(f"policy_version must be an integer >= 0, found {policy_version!r}")
        self.policy_version = policy_version
        self.training_config = training_config
        self.config = config
        self.overwrite = overwrite
        self.max_shard_bytes = parse_size(max_shard_size) if adapter_config is None else float("inf")
        self.dtype = dtype
        self.extra_files = dict(extra_files or {})
        self.expected_bytes = expected_bytes  # named in a write error (default: the bytes queued so far)
        # A LoRA adapter instead of a model: adapter_model.safetensors (one file) + adapter_config.json.
        self.adapter_config = adapter_config
        for name in self.extra_files:
            if Path(name).name != name or name in (WEIGHTS, WEIGHTS_INDEX, "config.json", DRPO_META, *_ADAPTER_FILES):
                raise CheckpointError(
                    f"extra file {name!r}: expected a plain file name not used by the checkpoint"
                )
        # A hidden sibling: same filesystem, so the final rename is atomic. `tmp_dir`: one made earlier by
        # outputs.new_temp_dir(out_dir) (train makes it before the first step: an unwritable --out fails then).
        self.tmp_dir = tmp_dir if tmp_dir is not None else outputs.new_temp_dir(self.out_dir)
        self._pending: dict[str, tuple[str, list[int], int, int]] = {}  # name -> dtype, shape, element size, offset
        self._pending_bytes = 0
        self._scratch: dict[int, Any] = {}  # element size -> open scratch file of the current shard
        self._shards: list[list[str]] = []  # tensor names per written shard, in order
        self._total_bytes = 0
        self._names: set[str] = set()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor's bytes; the current shard is assembled first when this one would overflow it."""
        if name in self._names:
            raise CheckpointError(f"tensor {name!r} written twice")
        self._names.add(name)
        tensor = tensor.detach()
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(DTYPES[self.dtype])
        if tensor.dtype not in _SAVED_DTYPES:
            raise CheckpointError(f"tensor {name!r}: cannot save dtype {tensor.dtype} in safetensors")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        size = tensor.element_size()
        try:
            f = self._scratch.get(size)
            if f is None:
                f = self._scratch[size] = open(self.tmp_dir / f"scratch-{size}", "w+b")  # noqa: SIM115 - closed in _flush / abort
            offset = f.tell()
            _write_tensor(f, tensor)
        except OSError as err:
            raise write_error(err, self.out_dir, self.expected_bytes or self._total_bytes + nbytes) from err
        self._pending[name] = (_SAVED_DTYPES[tensor.dtype], list(tensor.shape), size, offset)
        self._pending_bytes += nbytes
        self._total_bytes += nbytes

    def _flush(self) -> None:
        """Assemble the current shard's safetensors file from the header and the scratch files."""
        sizes = sorted(self._scratch, reverse=True)
        base, at = {}, 0  # element size -> where its scratch file's bytes start in the data section
        for size in sizes:
            base[size] = at
            at += self._scratch[size].seek(0, os.SEEK_END)
        header = {"__metadata__": {"format": "pt"}}
        for name, (dtype, shape, size, offset) in self._pending.items():
            n = math.prod(shape) * size
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [base[size] + offset, base[size] + offset + n]}
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)  # the format's padding: tensor data starts 8-byte aligned
        path = self.tmp_dir / f"part-{len(self._shards):05d}.safetensors"
        try:
            with open(path, "wb") as out:
                out.write(len(text).to_bytes(8, "little") + text)
                for size in sizes:
                    scratch = self._scratch[size]
                    scratch.flush()
                    _copy_file(scratch, out)
            _fsync(path)
        except OSError as err:
            raise write_error(err, self.out_dir, self.expected_bytes or self._total_bytes) from err
        finally:
            self._close_scratch()
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def _close_scratch(self) -> None:
        for size, f in self._scratch.items():
            f.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp_dir / f"scratch-{size}")
        self._scratch = {}

    def commit(self) -> Path:
        """Write the remaining shard, index, config, copied files and metadata; rename into `out_dir`."""
        try:
            if self._pending or not self._shards:
                self._flush()
            try:
                self._finish_files()
            except OSError as err:
                raise write_error(err, self.out_dir, self.expected_bytes or self._total_bytes) from err
        except BaseException:
            self.abort()
            raise
        # Checks again that out_dir may be replaced (it may have changed meanwhile), applies the umask.
        return outputs.publish_dir(self.tmp_dir, self.out_dir, "checkpoint", overwrite=self.overwrite)

    def abort(self) -> None:
        self._close_scratch()
        outputs.discard(self.tmp_dir)

    def _finish_files(self) -> None:
        n = len(self._shards)
        if self.adapter_config is not None:
            os.rename(self.tmp_dir / "part-00000.safetensors", self.tmp_dir / _ADAPTER_FILES[1])
            (self.tmp_dir / _ADAPTER_FILES[0]).write_text(self.adapter_config, encoding="utf-8")
            _fsync(self.tmp_dir / _ADAPTER_FILES[0])
        elif n == 1:
            os.rename(self.tmp_dir / "part-00000.safetensors", self.tmp_dir / WEIGHTS)
        else:
            weight_map = {}
            for i, names in enumerate(self._shards):
                final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                os.rename(self.tmp_dir / f"part-{i:05d}.safetensors", self.tmp_dir / final)
                weight_map.update({name: final for name in names})
            index = {
                "metadata": {"total_size": self._total_bytes},
                "weight_map": dict(sorted(weight_map.items())),
            }
            _write_json(self.tmp_dir / WEIGHTS_INDEX, index)

        if self.adapter_config is not None:
            pass  # the base model's config stays with the base model
        elif self.config is not None:
            # to_json_string turns torch dtypes and nested configs into plain JSON.
            config = json.loads(self.config.to_json_string(use_diff=False))
        else:
            config = json.loads((self.source_dir / "config.json").read_text(encoding="utf-8"))
        if self.adapter_config is None:
            if self.dtype is not None:
                config["dtype"] = self.dtype
                config.pop("torch_dtype", None)
            _write_json(self.tmp_dir / "config.json", config)

        for name, real in copied_files(self.source_dir):  # checked again: the directory may have changed
            shutil.copyfile(real, self.tmp_dir / name)
            _fsync(self.tmp_dir / name)

        meta = {
            "policy_version": self.policy_version,
            "training": self.training_config,
            "drpo_version": __version__,
            "source": {"path": str(self.source_dir), "policy_version": read_policy_version(self.source_dir)},
        }
        for name, content in self.extra_files.items():  # e.g. the training report, renamed in with the weights
            path = self.tmp_dir / name
            path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
            _fsync(path)
        outputs.write_marker(self.tmp_dir, "checkpoint", meta)  # last: it lists every file written


def save_checkpoint(
    model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    *,
    out_dir: str | os.PathLike,
    config: Any = None,
    **writer_kwargs: Any,
) -> Path:
    """Write a Hugging Face model directory atomically; returns `out_dir`.

    `model_or_state_dict` is a transformers model, or a plain state dict (e.g. full tensors
    gathered from FSDP shards) described by `config` (default: the source's config.json). Tied
    weights (a tied `lm_head.weight`) are written once, as transformers expects, and tie again on
    load. Tensors are written as they are (no copy) unless `dtype` casts them, shard by shard.
    `writer_kwargs` are CheckpointWriter's: `source_dir`, `policy_version`, `training_config`
    (required), `overwrite`, `max_shard_size`, `dtype`, and `extra_files` (name -> content, in
    `out_dir` in the same rename, e.g. a report).
    """
    if isinstance(model_or_state_dict, torch.nn.Module):
        model = model_or_state_dict
        state_dict = model.state_dict()
        config = model.config if config is None else config
    else:
        model, state_dict = None, dict(model_or_state_dict)
    with CheckpointWriter(out_dir, config=config, **writer_kwargs) as writer:
        ref = model if model is not None else _meta_model(writer.config, writer.source_dir)
        state_dict = to_saved_format(ref, state_dict)
        for name in list(state_dict):
            writer.add(name, state_dict.pop(name))  # pop: the writer holds the only extra reference
        return writer.commit()


def _meta_model(config: Any, source_dir: Path) -> torch.nn.Module:
    """The architecture without weights: knows its tied keys and on-disk key format."""
    return empty_model(config if config is not None else read_config(source_dir, allow_unsafe=True))


def to_saved_format(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tied copies (kept once, under the name transformers reloads) and undo load-time key conversions."""
    for target in model.get_expanded_tied_weights_keys(all_submodels=True):
        state_dict.pop(target, None)
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # older transformers: no load-time conversions to undo
        return state_dict
    # A no-op for dense models; MoE models whose experts transformers fuses on load are split back.
    return dict(revert_weight_conversion(model, state_dict))


def saved_format(model: torch.nn.Module):
    """`convert(name, tensor) -> [(saved name, tensor), ...]`: `to_saved_format` one tensor at a time.

    For a writer fed tensor by tensor (an FSDP model gathered per parameter): tied copies give
    `[]`; a fused tensor that transformers split on load is split back from that tensor alone.
    """
    tied = set(model.get_expanded_tied_weights_keys(all_submodels=True))

    def convert(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return [] if name in tied else list(to_saved_format(model, {name: tensor}).items())

    return convert


_SAVED_DTYPES = {v: k for k, v in _ST_DTYPES.items()} | {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_COPY_BLOCK = 64 * 1024 * 1024  # bytes per copy_file_range call


def _write_tensor(f, tensor: torch.Tensor) -> None:
    """Append a tensor's bytes (C order, little-endian as in memory) to an open file."""
    t = tensor.to("cpu").contiguous().reshape(-1)
    if t.numel():
        f.write(memoryview(t.view(torch.uint8).numpy()))


def _copy_file(src, dst) -> None:
    """Append all of `src` to `dst` (open files) inside the kernel where it can; never the whole file in memory."""
    src.flush()
    size, at = os.fstat(src.fileno()).st_size, dst.seek(0, os.SEEK_END)
    done = 0
    copy_range = getattr(os, "copy_file_range", None)
    try:
        while copy_range is not None and done < size:
            n = copy_range(src.fileno(), dst.fileno(), min(_COPY_BLOCK, size - done), done, at + done)
            if n == 0:
                break
            done += n
    except OSError as err:  # not across these filesystems, or not here: copied through a buffer below
        if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    src.seek(done)
    dst.seek(at + done)
    shutil.copyfileobj(src, dst, _COPY_BLOCK)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- sharded loading (torchrun) of weights converted on load -------------------------------------


def saved_pieces(model: torch.nn.Module, name: str, shape: tuple[int, ...]) -> list[tuple[str, int, int]] | None:
    """Where the rows of a parameter that transformers converts on load lie on disk: experts fused
    into one tensor (`experts.gate_up_proj` (E, 2I, H) from each expert's gate and up projections,
    `experts.down_proj` (E, H, I)) or renamed (Mixtral's `block_sparse_moe` → `mlp`).
    Returns [(saved name, first flat row, rows)] over the parameter's rows flattened to
    (E·rows_per_expert) for 3-D and (rows) for 2-D tensors, or None for a parameter stored as it is.

    Found by undoing the load-time conversion (transformers' own, as saving does) on a tensor of
    row numbers: each saved piece then holds the row numbers it came from.
    """
    if len(shape) not in (2, 3):
        return None
    rows = math.prod(shape[:-1])
    index = torch.arange(rows, dtype=torch.float64).reshape(*shape[:-1], 1)
    saved = to_saved_format(model, {name: index})
    if list(saved) == [name]:
        return None
    pieces = []
    for saved_name, t in saved.items():
        flat = t.reshape(-1).long()
        if t.shape[-1] != 1 or not torch.equal(flat, flat[0] + torch.arange(len(flat))):
            return None  # a conversion other than splitting or renaming rows (e.g. a transpose)
        pieces.append((saved_name, int(flat[0]), len(flat)))
    return pieces


def read_converted_rows(model: torch.nn.Module, name: str, shape: tuple[int, ...], entries: dict, start: int,
                        stop: int, out: torch.Tensor) -> bool:
    """Fill `out`, rows [start, stop) (dim 0, as FSDP2 shards) of parameter `name`, from the tensors
    transformers saved it as; False when `name` is stored as it is or a piece is missing."""
    pieces = saved_pieces(model, name, shape)
    if pieces is None or any(p[0] not in entries for p in pieces):
        return False
    per = math.prod(shape[1:-1])  # flat rows per dim-0 row: 2I or H for experts, 1 for a matrix
    flat_out = out.view(-1, shape[-1])  # ((stop − start)·per, last)
    lo, hi = start * per, stop * per
    for saved_name, first, rows in pieces:
        a, b = max(first, lo), min(first + rows, hi)
        if a < b:
            read_rows(entries[saved_name], a - first, b - first, flat_out[a - lo : b - lo])
    return True
