"""Process-group queries and the global reductions of a training step.

Every quantity that must be global over an optimizer step (aggregation denominators, token counts,
diagnostics sums and maxima) goes through `all_reduce_sum` / `all_reduce_max`, so a multi-process
run (torchrun) reduces exactly where a single process already "reduces" over itself. In one
process these are no-ops and torch.distributed is never initialised.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place and return it (identity in one process)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise max of `t` over ranks in place and return it (identity in one process)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t
