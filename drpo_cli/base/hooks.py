"""The environment variables drpo reads that exist for its tests: fault injection, nothing a user sets.

- DRPO_INTERRUPT_AFTER_STEP=k: `drpo train` sends itself SIGTERM right after optimizer step k (0-based),
  so tests exercise the real preemption handler (a partial state saved, exit 130, `--resume` continues);
  `k*2`: two signals there (the second aborts before the state is saved: exit 4, nothing kept);
  `load`: one signal once the model is loaded, before the first step (nothing to save: exit 4).
- DRPO_INTERRUPT_IN_STEP=k: `drpo train` sends itself SIGTERM inside optimizer step k's first forward (a
  decoder layer's pre-hook), so tests see a long step stop at once: its gradients dropped, the state saved at
  its start, exit 130, `--resume` reruns it.
- DRPO_TEST_FAIL_RANK=r: under torchrun, rank r raises right before the save's success vote, so tests see
  every rank agree on the failure and nothing half-written.

Every other DRPO_* variable is a user setting, documented where it is read (DRPO_DIST_TIMEOUT_S in
distributed.py; DRPO_RANK_EXIT_DIR, set by `drpo train --nproc` for its ranks, in launch.py).
"""

from __future__ import annotations

import os

INTERRUPT_AFTER_STEP = "DRPO_INTERRUPT_AFTER_STEP"
INTERRUPT_IN_STEP = "DRPO_INTERRUPT_IN_STEP"
FAIL_RANK = "DRPO_TEST_FAIL_RANK"


def interrupt_signals(step: int | str) -> int:
    """How many SIGTERMs the DRPO_INTERRUPT_AFTER_STEP hook sends at `step` (an optimizer step, or "load")."""
    value = os.environ.get(INTERRUPT_AFTER_STEP, "")
    at, _, times = value.partition("*")
    return (int(times) if times else 1) if at == str(step) else 0


def interrupt_in_step(step: int) -> bool:
    """True when the DRPO_INTERRUPT_IN_STEP hook names this step."""
    return os.environ.get(INTERRUPT_IN_STEP) == str(step)


def failing_rank() -> str | None:
    """The rank DRPO_TEST_FAIL_RANK names, if any."""
    return os.environ.get(FAIL_RANK)
