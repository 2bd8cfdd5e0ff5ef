"""Whether this process is one of torchrun's ranks: the one definition every command uses (no torch).

torchrun (or any launcher that sets WORLD_SIZE and RANK) makes a process a rank, also with a single
process: `drpo train` then shards with FSDP2 (e.g. for --cpu-offload on one GPU), `drpo inspect`
loads the model the same way and splits the rows, and only rank 0 writes and prints.

`drpo train --nproc N` runs torchrun itself and gives it RANK_EXIT_DIR: each rank leaves its exit
code there (`rank_exit`), so that the launching process can tell a preempted run (every rank 130 with
its state saved, or 4 with nothing kept; torchrun 1) from a failure (`launcher_exit_code`).
"""

from __future__ import annotations

import os
from pathlib import Path

from drpo_cli.base.errors import EXIT_ABORTED, EXIT_INTERRUPTED

RANK_EXIT_DIR = "DRPO_RANK_EXIT_DIR"


def launched_rank() -> int | None:
    """This process's rank when a launcher started it (WORLD_SIZE and RANK set), else None."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["RANK"])
    return None


def launched() -> bool:
    """True when started by torchrun (or any launcher that sets WORLD_SIZE and RANK), with any number of processes."""
    return launched_rank() is not None


def leads() -> bool:
    """True in the process that writes and prints: a plain process, or rank 0."""
    return launched_rank() in (None, 0)


def rank_exit(code: int) -> None:
    """Under `drpo train --nproc`: record this rank's exit code for the launching process (best effort)."""
    where, rank = os.environ.get(RANK_EXIT_DIR), launched_rank()
    if where and rank is not None:
        try:
            (Path(where) / f"rank{rank}").write_text(str(code), encoding="utf-8")
        except OSError:
            pass  # the launcher then reports torchrun's own code


def launcher_exit_code(torchrun_code: int, where: str | os.PathLike) -> int:
    """What `drpo train --nproc` exits with: 130 when the ranks that ended did so interrupted with their
    state saved, 4 when some were interrupted with nothing kept (and none failed otherwise), else
    torchrun's own code (torchrun exits 1 whenever a rank exits non-zero)."""
    codes = []
    for f in Path(where).glob("rank*"):
        try:
            codes.append(int(f.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return torchrun_code
    interrupted = set(codes) - {0}
    if torchrun_code == 0 or not interrupted or not interrupted <= {EXIT_ABORTED, EXIT_INTERRUPTED}:
        return torchrun_code
    return EXIT_ABORTED if EXIT_ABORTED in interrupted else EXIT_INTERRUPTED
