"""Scale-out: torchrun process groups, FSDP2 sharding, global reductions, the rank-0 streamed save.

Every quantity that must be global over an optimizer step (aggregation denominators, token counts,
diagnostics sums and maxima) goes through `all_reduce_sum` / `all_reduce_max`, so a multi-process
run (torchrun) reduces exactly where a single process already "reduces" over itself. In one
process these are no-ops and torch.distributed is never initialised.

Under torchrun (`WORLD_SIZE`, `RANK`, `LOCAL_RANK` in the environment) `init` joins the process
group (nccl on CUDA, gloo on CPU) with a finite timeout, so a rank whose peer died fails instead
of waiting forever, and `shard_model` applies FSDP2 (`fully_shard` per decoder layer, then the
root). Gradients are SUMMED over ranks, not averaged: every loss is divided by its global
denominator already (SPEC.md §1), so the sum of the ranks' gradients is the single-process one up to
float summation order.

Saving: `save_full_checkpoint` takes the sharded state dict from torch.distributed.checkpoint's
`get_model_state_dict`, gathers one entry at a time (`DTensor.full_tensor`; the helper's own
`full_state_dict=True` would hold the whole model on rank 0 at once) and rank 0 streams it into a
`CheckpointWriter`; the rename into place happens only after every rank has reported success.

Its test hook (DRPO_TEST_FAIL_RANK) is documented in hooks.py.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from drpo_cli.base import hooks
from drpo_cli.base.errors import CheckpointError, ConfigError, DrpoError, InputError
from drpo_cli.base.launch import RANK_EXIT_DIR, launched, launcher_exit_code

TIMEOUT_ENV = "DRPO_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 900  # one collective may wait this long for a slow peer (e.g. rank 0 writing a shard)
ENGINE_METHOD = "drpo_engine"  # the log-prob engine's entry point on a sharded model (logprobs.run_engine)
HEAD_METHOD = "drpo_head"  # its entry point on an untied output head sharded on its own (logprobs.run_head)


# ---- process group ---------------------------------------------------------------------------


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group (once) and return this rank's device; identity outside torchrun.

    nccl for CUDA (one GPU per local rank), gloo for CPU. The timeout bounds every collective, so a
    rank whose peer died ends with an error instead of hanging (torchrun also stops the others).
    """
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    return device


def shutdown(*, ok: bool = True) -> None:
    """Leave the process group at the end of a torchrun command; a no-op when none was joined.

    A process that exits without leaving can abort in gloo's teardown (SIGABRT at exit). After
    success a barrier first makes sure no peer still has a collective in flight; after a failure
    gloo still tears down locally, while nccl, which could block on a dead peer, is left to the
    process exit.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if ok:
        dist.barrier()
    elif dist.get_backend() == "nccl":
        return
    dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place and return it (identity in one process)."""
    return _all_reduce(t, dist.ReduceOp.SUM) if is_distributed() else t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise max of `t` over ranks in place and return it (identity in one process)."""
    return _all_reduce(t, dist.ReduceOp.MAX) if is_distributed() else t


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    device = _comm_device()
    if t.device == device:
        dist.all_reduce(t, op=op)
    else:  # nccl reduces GPU memory only: round-trip CPU tensors through the current GPU
        buf = t.to(device)
        dist.all_reduce(buf, op=op)
        t.copy_(buf)
    return t


def max_count(n: int) -> int:
    """The largest `n` over ranks: FSDP ranks must run the same number of forward passes."""
    if not is_distributed():
        return n
    return int(all_reduce_max(torch.tensor([n], dtype=torch.int64)).item())


def filler_passes(local_passes: int) -> list:
    """Micro-batches (one token, results to be dropped) a rank runs after its own `local_passes`.

    FSDP ranks gather parameters together in every pass, so every rank must run the same number:
    the largest count over ranks. Empty in one process. A rank that holds no row at all still runs them.
    A collective: call it before the rank's first pass, never between passes (another rank would be
    in a pass's parameter gather).
    """
    from drpo_cli.model.batching import filler_batch

    return [filler_batch()] * (max_count(local_passes) - local_passes)


def exchange(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (`[obj]` in one process): a collective."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def data_shard(source):
    """This rank's share of `source`'s rows (files.Shard), or None in one process."""
    if not is_distributed():
        return None
    from drpo_cli.rollouts.files import Shard

    return Shard.of(rank(), world_size(), source.count_rows())


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (e.g. a stop signal that reached one rank first)."""
    if not is_distributed():
        return flag
    return bool(all_reduce_max(torch.tensor([int(flag)], dtype=torch.int64)).item())


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (identity in one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_rank0(obj):
    """A list of every rank's `obj` on rank 0 (None elsewhere); `[obj]` in one process."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size() if rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def agree(error: BaseException | None, what: str) -> None:
    """Every rank reports whether `what` succeeded; if any failed, every rank raises.

    The failing rank re-raises its own error; the others raise a one-line DrpoError naming the
    first failing rank and its message, so every rank's exit says why the run stopped.
    """
    agree_any(error, what, False)


def agree_any(error: BaseException | None, what: str, flag: bool) -> bool:
    """`agree(error, what)` and `any_rank(flag)` in one collective: raises as agree, else returns any rank's flag.

    For a loop whose ranks both check each step and may run out of work at different times.
    """
    if not is_distributed():
        if error is not None:
            raise error
        return flag
    message = None if error is None else (type(error).__name__, one_line(error))
    shares: list = [None] * world_size()
    dist.all_gather_object(shares, (message, bool(flag)))
    failed = [(r, m) for r, (m, _) in enumerate(shares) if m is not None]
    if not failed:
        return any(f for _, f in shares)
    if error is not None:
        raise error
    r, (kind, m) = failed[0]
    bad_input = {"InputError": InputError, "ConfigError": ConfigError, "CheckpointError": CheckpointError}
    if kind in bad_input:  # a bad input found in one rank's share: the same error everywhere
        raise bad_input[kind](m)
    raise DrpoError(f"{what} stopped: rank {r} of {world_size()} failed: {m}")


def one_line(error: BaseException) -> str:
    """The error as one line: a DrpoError's message, else `Type: message`."""
    message = error.message if isinstance(error, DrpoError) else f"{type(error).__name__}: {error}"
    return message.strip().splitlines()[0] if message.strip() else type(error).__name__


def _comm_device() -> torch.device:
    """Where collective buffers live: the current GPU under nccl, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_test_failure(phase: str = "save") -> None:
    """The test hook DRPO_TEST_FAIL_RANK=r (hooks.py) makes rank r fail here."""
    target = hooks.failing_rank()
    if target is not None and launched() and target == os.environ.get("RANK"):
        raise RuntimeError(f"failure injected by {hooks.FAIL_RANK}={target} during {phase}")


# ---- FSDP2 -----------------------------------------------------------------------------------


def shard_model(model: torch.nn.Module, device: torch.device, *, param_dtype: torch.dtype | None = None,
                cpu_offload: bool = False, inference: bool = False) -> torch.nn.Module:
    """FSDP2: `fully_shard` each decoder layer, then the root; returns the model (sharded in place).

    param_dtype (bf16 / fp16): parameters gathered in it for compute, gradients reduced in float32 (CUDA, or
    CPU with gloo); the sharded fp32 parameters stay the master weights.
    cpu_offload: sharded parameters, gradients and optimizer state stay in CPU memory between uses.
    inference (passes without gradients only, e.g. inspect): each decoder layer's large children (its
    attention, its MLP or experts) are units of their own, so a rank gathers one of them at a time.
    The log-prob engine runs the decoder body and the output head itself rather than
    `model.forward`, so it enters through a method registered with FSDP (ENGINE_METHOD): that is
    what gathers the root's own parameters (final norm, tied embeddings) and hooks their gradient
    reduce-scatter.

    Untied input embeddings and output head are units of their own, so that no rank ever holds
    both vocabulary matrices gathered (the root is gathered from the first forward to the end of
    backward): the embedding is gathered for its forward only (its backward needs no weight), the
    head through its own registered method (HEAD_METHOD) and kept until its gradient is
    reduce-scattered. Tied, the one matrix stays in the root.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    if cpu_offload and device.type != "cuda":
        raise ConfigError(f"--cpu-offload: needs CUDA devices, found {device.type} (parameters already live in CPU memory)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype is not None
          else MixedPrecisionPolicy())
    kwargs = {"mesh": mesh, "mp_policy": mp, "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy()}
    for layer in decoder_layers(model):
        if inference:  # no backward to overlap with: gather a layer's attention, then its MLP, not both at once
            size = sum(p.numel() for p in layer.parameters())
            for child in layer.children():
                if 8 * sum(p.numel() for p in child.parameters()) >= size:
                    fully_shard(child, **kwargs)
        fully_shard(layer, **kwargs)
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    untied = (isinstance(head, torch.nn.Linear) and embeddings is not None
              and head.weight is not getattr(embeddings, "weight", None))
    if untied:
        fully_shard(embeddings, **kwargs)
        embeddings.set_unshard_in_backward(False)
        # Kept gathered until its backward (the engine's may recompute with it); h goes in as it is.
        head_mp = MixedPrecisionPolicy(param_dtype=mp.param_dtype, reduce_dtype=mp.reduce_dtype,
                                       cast_forward_inputs=False)
        fully_shard(head, reshard_after_forward=False, **{**kwargs, "mp_policy": head_mp})
        setattr(head, HEAD_METHOD, types.MethodType(_engine_entry, head))
        register_fsdp_forward_method(head, HEAD_METHOD)
    fully_shard(model, **kwargs)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            # Sum, not mean: each rank's loss already carries the global 1/denominator. Plain SUM
            # collectives (gloo has no PREMUL_SUM); the post-division by 1.0 is exact.
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    setattr(model, ENGINE_METHOD, types.MethodType(_engine_entry, model))
    register_fsdp_forward_method(model, ENGINE_METHOD)
    return model


def load_sharded_model(path: str | os.PathLike, device: torch.device, *, dtype: str = "float32",
                       allow_unsafe: bool = False, param_dtype: torch.dtype | None = None, cpu_offload: bool = False,
                       prepare=None, inference: bool = False):
    """One weight copy per node: the model built on the meta device, sharded, then each rank reads its rows.

    Every rank builds the architecture with its parameters on the meta device (no memory), applies
    FSDP2 (`shard_model`), allocates only its own shards (`to_empty`) and fills them from the
    safetensors files, reading only the bytes of the rows of each tensor it holds (plain reads, no
    memory map): the ranks of
    a node together read each weight once, so CPU memory for weights stays one model copy whatever
    the number of local ranks. Non-persistent buffers (rotary `inv_freq`) are computed by the
    constructors on the CPU, kept aside across `to_empty` (which leaves them uninitialised), and
    put back. Tied weights stay one parameter through sharding and are read once.

    prepare(model) -> {name: full CPU tensor} | None: called on the meta model before sharding (e.g. to
    add LoRA layers); returns the values of parameters the checkpoint does not hold (e.g. adapter
    weights). Every other parameter missing from the files is an error.
    Returns (model, CheckpointInfo).
    """
    from drpo_cli.model.checkpoint import (
        check_weights,
        checkpoint_info,
        empty_model,
        read_config,
        read_policy_version,
        resolve_dtype,
    )

    path = Path(path)
    torch_dtype = resolve_dtype(dtype, device.type)
    config = read_config(path, allow_unsafe)
    entries = check_weights(path, config)  # config.json against the files, before anything is built
    if not entries:
        raise CheckpointError(f"{path}: sharded loading (torchrun) reads safetensors weights only; convert the "
                              "pickle weights to safetensors first")
    policy_version = read_policy_version(path)
    model = empty_model(config, torch_dtype)
    extra_values = (prepare(model) if prepare is not None else None) or {}
    computed = {(mod_name, name): buf.detach().clone() for mod_name, mod in model.named_modules()
                for name, buf in mod._buffers.items() if buf is not None and name in mod._non_persistent_buffers_set}
    shard_model(model, device, param_dtype=param_dtype, cpu_offload=cpu_offload, inference=inference)
    model.to_empty(device="cpu" if cpu_offload else device)
    _fill_shards(model, path, entries, extra_values)
    with torch.no_grad():
        for (mod_name, name), value in computed.items():
            model.get_submodule(mod_name)._buffers[name].copy_(value)
    return model.eval(), checkpoint_info(path, policy_version, model)


def _fill_shards(model: torch.nn.Module, path: Path, entries: dict, extra_values: dict) -> None:
    """Copy each rank's rows of every parameter (and persistent buffer) from the files, in place."""
    from torch.distributed.tensor import DTensor

    from drpo_cli.model.checkpoint import non_finite_at, non_finite_error, read_converted_rows, read_rows

    aliases: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        aliases.setdefault(id(t), []).append(name)
        tensors[id(t)] = t
    persistent = set(model.state_dict(keep_vars=True))
    missing, non_finite = [], None
    with torch.no_grad():
        for key, names in aliases.items():
            t = tensors[key]
            names = [n for n in names if n in persistent]
            if not names:
                continue  # a non-persistent buffer: restored by the caller
            local = t.to_local() if isinstance(t, DTensor) else t
            start, stop = 0, (t.shape[0] if t.dim() else 1)
            if isinstance(t, DTensor) and local.dim() > 0 and local.shape[0] != t.shape[0]:
                # FSDP2 shards dim 0 like torch.chunk: ceil(n / world) rows per rank, the last ones shorter.
                start = min(rank() * -(-t.shape[0] // world_size()), t.shape[0])
                stop = start + local.shape[0]
            # A layer wrapped by an adapter (peft's `base_layer`) keeps its weight under the plain name on disk.
            found = next((n for n in (m.replace(".base_layer.", ".") for m in names) if n in entries), None)
            if found is not None:
                read_rows(entries[found], start, stop, local)
            elif read_converted_rows(model, names[0], tuple(t.shape), entries, start, stop, local):
                pass  # converted on load (MoE experts fused, renamed)
            elif names[0] in extra_values:
                full = extra_values[names[0]]
                local.copy_(full[start:stop] if full.dim() else full)
            else:
                missing.append(names[0])
                continue
            bad = non_finite_at(local) if non_finite is None else None  # the rows just read
            if bad is not None:
                row = local[0].numel() if local.dim() and len(local) else 0
                non_finite = non_finite_error(str(entries[found].file if found else path), names[0], tuple(t.shape),
                                              (bad[0] + start * row, bad[1]))  # its index in the full tensor
    if missing:
        raise CheckpointError(f"{path}: weights missing from the checkpoint: {', '.join(sorted(missing)[:3])}"
                              + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""))
    agree(non_finite, "reading the weights")  # only the rank holding the bad rows saw it


def _engine_entry(self, fn, *args, **kwargs):
    return fn(self, *args, **kwargs)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks: the classes a transformers model declares unsplittable."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if not layers:
        layers = list(getattr(model.get_decoder(), "layers", ()))
    if not layers:
        raise ConfigError(f"{type(model).__name__}: no decoder layers found to shard with FSDP")
    return layers


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model computes: a sharded model's mesh device, even when its shards sit in CPU memory."""
    from torch.distributed.tensor import DTensor

    p = next(model.parameters())
    if isinstance(p, DTensor):
        kind = p.device_mesh.device_type
        return torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device(kind)
    return p.device


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (e.g. clip_grad_norm_'s global norm); other tensors unchanged."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_tensors(model: torch.nn.Module, keep=None) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(name, full CPU tensor on rank 0 / None elsewhere), one state-dict entry at a time.

    Collective: every rank must iterate to the end, in the same order. Peak memory on rank 0 is
    one full tensor beyond what the caller keeps. The names and the sharded values come from
    torch.distributed.checkpoint's state-dict helper (canonical FQNs, nothing gathered yet); each
    entry is then gathered alone, since `full_state_dict=True` would gather the whole model at once.
    keep(name) -> bool: only these entries (e.g. the LoRA matrices) are gathered.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    sharded = get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))
    for name, value in sharded.items():
        if keep is not None and not keep(name):
            continue
        if isinstance(value, DTensor):
            if value.device.type != value.device_mesh.device_type:  # CPU-offloaded shard under nccl
                value = value.to(value.device_mesh.device_type)
            value = value.full_tensor()
        yield name, (value.detach().cpu() if rank() == 0 else None)


def save_full_checkpoint(model: torch.nn.Module, *, out_dir: Path, keep=None, transform=None, convert=None,
                         **writer_kwargs) -> Path:
    """One Hugging Face checkpoint from a sharded model: gathered per tensor, written by rank 0 only.

    Atomic across ranks: the writer's temporary directory is renamed into `out_dir` only after
    every rank has reported success, and removed otherwise; other ranks write nothing.
    keep(name): gather only these entries; transform(stream) -> stream: e.g. a LoRA merge;
    convert(name, tensor) -> [(saved name, tensor)] (default: `checkpoint.saved_format(model)`).
    """
    from drpo_cli.model.checkpoint import CheckpointWriter, saved_format

    writer, error = None, None
    if rank() == 0:
        try:
            writer = CheckpointWriter(out_dir, config=model.config, **writer_kwargs)
        except Exception as err:  # noqa: BLE001 - reported to every rank by agree()
            error = err
    try:
        convert = convert or saved_format(model)
        stream = full_tensors(model, keep)
        for name, tensor in (transform(stream) if transform else stream):  # every rank gathers, even after an error
            if writer is not None and error is None:
                try:
                    for key, value in convert(name, tensor):
                        writer.add(key, value)
                except Exception as err:  # noqa: BLE001
                    error = err
        if error is None:
            try:
                check_test_failure("save")
            except RuntimeError as err:
                error = err
        agree(error, "saving the checkpoint")
        commit_error = None
        if writer is not None:
            try:
                writer.commit()
            except Exception as err:  # noqa: BLE001
                commit_error = err
        agree(commit_error, "renaming the checkpoint into place")
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return Path(os.path.abspath(out_dir))


# ---- launching -------------------------------------------------------------------------------


def torchrun_argv(nproc: int, args: list[str]) -> list[str]:
    """The command that runs `drpo <args>` under torchrun on this machine with `nproc` processes."""
    if nproc < 1:
        raise ConfigError(f"--nproc: expected an integer ≥ 1, found {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "drpo_cli", *args]


def run_torchrun(nproc: int, args: list[str]) -> int:
    """Run `drpo <args>` under torchrun with `nproc` processes; what `drpo train --nproc` exits with.

    torchrun gets a session of its own, so that a signal reaches the ranks once, through it: SIGINT
    or SIGTERM sent to this process is passed to torchrun, which passes it to every rank and waits
    for them (its shutdown timeout, 30 s by default) before it kills them. Every rank exits 130 after
    saving its state, torchrun then exits 1, and this process 130 (launch.launcher_exit_code).
    """
    import signal
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="drpo-ranks-") as where:
        proc = subprocess.Popen(torchrun_argv(nproc, args), env={**os.environ, RANK_EXIT_DIR: where},
                                start_new_session=True)
        saved = {s: signal.signal(s, lambda signum, frame: proc.send_signal(signum))
                 for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = proc.wait()
        finally:
            for s, handler in saved.items():
                signal.signal(s, handler)
        return launcher_exit_code(code if code >= 0 else 128 - code, where)  # killed by signal k: 128 + k
