"""(hits, total) pairs, the float64 counts every what-if fraction (`topr/truncated_frac`,
`opsm/seq_drop_frac`, ...) is made of: summed over batches and ranks, divided once at the end."""

from __future__ import annotations

from typing import TYPE_CHECKING

from drpo_cli.base.lazy import lazy

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy("torch")


def fraction(hit: Tensor, total: int | Tensor) -> tuple[Tensor, Tensor]:
    """(tokens hit, `total`)."""
    return hit.sum().double(), torch.as_tensor(float(total), dtype=torch.float64)


def seq_fraction(hit: Tensor, seq: Tensor) -> tuple[Tensor, Tensor]:
    """(sequences with at least one hit, sequences)."""
    return (torch.as_tensor(float(torch.unique(seq[hit]).numel()), dtype=torch.float64),
            torch.as_tensor(float(torch.unique(seq).numel()), dtype=torch.float64))
