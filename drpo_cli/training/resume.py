"""`drpo train --resume`: the interrupted run's state, saved and read back without running any code.

`OUT.partial-state/` holds:
- `dcp/`: model and optimizer through torch.distributed.checkpoint (every rank writes its own
  shards, no gather; DCP reshards on load, so a state saved by N ranks resumes under M);
- `rng.safetensors`: the torch RNG state (a uint8 tensor);
- `state.json` (the directory's marker, written last): the next step, the options that must match,
  the report's steps so far, the fp16 loss scaler's state and the world size.

A state directory is input that anyone could have replaced, and DCP's own reader runs code from it:
`dcp/.metadata` is read with `pickle.load`, and non-tensor values (the optimizer's param_groups) with
`torch.load(weights_only=False)`. Here `.metadata` goes through an unpickler that admits only DCP's
metadata classes, `torch.Size`, torch dtypes and paths (`SafeMetadataReader`), non-tensor values
through `torch.load(weights_only=True)` (`SafeLoadPlanner`), every data file the metadata names
must be a regular file directly inside `dcp/`, and the RNG is a safetensors tensor. Anything else is
refused with exit 2 before a byte of it is interpreted.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import warnings
from pathlib import Path

import torch

from drpo_cli.base import outputs
from drpo_cli.base.errors import ConfigError, InputError
from drpo_cli.config import TrainConfig
from drpo_cli.model import distributed

STATE_DCP = "dcp"  # model + optimizer (torch.distributed.checkpoint)
RNG_FILE = "rng.safetensors"
# Options that may differ between an interrupted run and its --resume.
RESUME_FREE = ("resume", "overwrite", "quiet", "tensorboard")

_DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals a DCP `.metadata` file holds; anything else (os.system, eval, ...) is refused."""

    def find_class(self, module: str, name: str):
        if name in _DCP_METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which a checkpoint's metadata never holds")


def _reader_classes():
    """(SafeMetadataReader, SafeLoadPlanner), built on DCP's classes (imported when a state is read)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeMetadataReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:
                raise pickle.UnpicklingError("per-rank metadata files are not written by drpo")
            path = Path(self.path) / ".metadata"
            with open(path, "rb") as fh:
                metadata = _MetadataUnpickler(fh).load()
            if not isinstance(metadata, Metadata):
                raise pickle.UnpicklingError(f"holds a {type(metadata).__name__}, not DCP's Metadata")
            for info in getattr(metadata, "storage_data", {}).values():
                name = getattr(info, "relative_path", None)
                target = Path(self.path) / str(name)
                if (not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", "..")
                        or target.is_symlink() or not target.is_file()):
                    raise pickle.UnpicklingError(f"names the data file {name!r}: expected a regular file in {self.path}")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's default planner, reading non-tensor values with torch.load(weights_only=True)."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._nested_dict import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeMetadataReader, SafeLoadPlanner


def save_state(state_dir: Path, cfg: TrainConfig, model, optimizer, next_step: int, steps: list[dict],
               scaler=None) -> None:
    """Everything --resume needs, written to a temporary sibling and renamed into place.

    Under torchrun every rank writes its own shards into the same temporary directory; rank 0
    creates it, writes the RNG and the marker last, and renames it into place only after every
    rank's shards are written.
    """
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp, error = None, None
    if distributed.rank() == 0:
        tmp = outputs.new_temp_dir(state_dir)
    tmp = distributed.broadcast_object(tmp)
    try:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with _one_process_dcp():
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / STATE_DCP))
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - reported to every rank by agree();
        # a full disk reaches here as DCP's CheckpointException, a BaseException
        error = _cause(err)
    try:
        distributed.agree(error, "saving the resumable state")
        if distributed.rank() == 0:
            save_file({"torch_rng": torch.get_rng_state()}, str(tmp / RNG_FILE))
            # fp16's loss scale goes with the RNG: a resumed run scales its next step as the uninterrupted one.
            outputs.write_marker(tmp, "state", {"next_step": next_step, "config": resume_key(cfg), "steps": steps,
                                                "scaler": scaler.state_dict() if scaler is not None else None,
                                                "world_size": distributed.world_size()})
            outputs.publish_dir(tmp, state_dir, "state", overwrite=True)  # the state replaced is drpo's own
    except BaseException:
        if tmp is not None and distributed.rank() == 0:
            outputs.discard(tmp)
        raise


def load_state(state_dir: Path, cfg: TrainConfig, model, optimizer, scaler=None) -> tuple[int, list[dict]]:
    """Read --resume's state into the (possibly sharded) model and optimizer; returns (next step, steps)."""
    import torch.distributed.checkpoint as dcp
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    marker = state_dir / outputs.DIR_MARKERS["state"]
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
        rng = load_file(str(state_dir / RNG_FILE)).get("torch_rng")
        if not (state_dir / STATE_DCP).is_dir():
            raise OSError(f"no {STATE_DCP}/ (written by an older drpo?)")
    except (OSError, ValueError, SafetensorError) as err:
        raise InputError(f"{state_dir}: unreadable resume state ({type(err).__name__}: {err})") from err
    if not (isinstance(meta, dict) and isinstance(meta.get("config"), dict) and isinstance(meta.get("steps"), list)
            and isinstance(meta.get("next_step"), int)):
        raise InputError(f"{marker}: expected an object with next_step, config and steps (the marker drpo writes)")
    if rng is None or rng.dtype != torch.uint8:
        raise InputError(f"{state_dir / RNG_FILE}: expected the uint8 tensor torch_rng")
    current = resume_key(cfg)
    changed = sorted(k for k in current if meta["config"].get(k) != current[k])
    if changed:
        raise ConfigError(f"--resume: options differ from the interrupted run: {', '.join('--' + k.replace('_', '-') for k in changed)}")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    reader_class, planner_class = _reader_classes()
    reader = reader_class(str(state_dir / STATE_DCP))
    try:  # checked here first, so that a refusal is one line and not a CheckpointException from every rank
        reader.read_metadata()
    except Exception as err:  # crafted bytes can raise anything unpickling does
        raise InputError(f"{state_dir / STATE_DCP / '.metadata'}: refused: {err} (a state drpo wrote holds only "
                         "DCP metadata and tensors; delete the directory and train again)") from err
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _one_process_dcp():
            dcp.load(state, storage_reader=reader, planner=planner_class())
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - e.g. a layout DCP cannot reshard, missing shard files,
        # or a value torch.load(weights_only=True) refuses; CheckpointException is a BaseException
        raise InputError(f"{state_dir}: cannot resume the run saved by {meta.get('world_size', '?')} rank(s) with "
                         f"{distributed.world_size()}: {distributed.one_line(_cause(err))}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    torch.set_rng_state(rng)
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return int(meta["next_step"]), list(meta["steps"])


def _cause(err: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException (a BaseException), else `err`."""
    failures = getattr(err, "failures", None)
    return next(iter(failures.values()))[0] if isinstance(failures, dict) and failures else err


@contextlib.contextmanager
def _one_process_dcp():
    """DCP warns on every call without a process group; in one process that is the intended use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def resume_key(cfg: TrainConfig) -> dict:
    """The options an interrupted run and its --resume must share, as read back from JSON."""
    d = cfg.to_dict()
    for k in RESUME_FREE:
        d.pop(k)
    return json.loads(json.dumps(d))  # tuples -> lists
