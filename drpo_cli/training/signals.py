"""Interrupts of `drpo train`: SIGINT/SIGTERM set a flag once the update loop runs; the current optimizer step
stops within seconds (checked before every forward pass, and in one process before every decoder layer), its
gradients dropped, and the resumable state goes to `OUT.partial-state/` (resume.py); the run exits 130. A
second signal, or one while loading, aborts at once. Test hooks: DRPO_INTERRUPT_AFTER_STEP,
DRPO_INTERRUPT_IN_STEP (hooks.py).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from types import SimpleNamespace

from drpo_cli.base import hooks
from drpo_cli.base.errors import Aborted, ConfigError, DrpoError, Interrupted
from drpo_cli.config import TrainConfig
from drpo_cli.model import distributed
from drpo_cli.training.resume import save_state


@contextlib.contextmanager
def signals_request_stop():
    """Yields a flag that SIGINT/SIGTERM set once `stop.defer` is on (checked at step boundaries).

    Before that (loading: nothing to save) and on a second signal, the signal aborts at once.
    """
    stop = SimpleNamespace(requested=False, defer=False, step=None)  # step: the optimizer step in progress

    def handle(signum, frame):
        if stop.requested or not stop.defer:
            raise KeyboardInterrupt
        stop.requested = True

    saved = {}
    if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
        for sig in (signal.SIGINT, signal.SIGTERM):
            saved[sig] = signal.signal(sig, handle)
    try:
        yield stop
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


class StepInterrupted(Exception):
    """A signal stopped an optimizer step in its middle (its gradients are dropped; it reruns on --resume)."""


@contextlib.contextmanager
def interruptible(model, stop, sharded: bool):
    """Yields the check accumulate_gradients runs before every pass: StepInterrupted once a signal set
    `stop.requested`, so that a long step stops in seconds (the pass at work, not the whole step).

    Under torchrun the check is a collective (any rank's flag), so every rank stops before the same
    pass; in one process each decoder layer also checks before its forward (a pre-hook), so a long
    forward stops between layers. The hook also serves DRPO_INTERRUPT_IN_STEP (hooks.py).
    """
    def check() -> None:
        if distributed.any_rank(stop.requested) if sharded else stop.requested:
            raise StepInterrupted

    def before_layer(module, args) -> None:
        if stop.step is None:
            return  # the π_old, reference and closing passes: a signal there acts as before
        if hooks.interrupt_in_step(stop.step) and not stop.requested:
            signal.raise_signal(signal.SIGTERM)  # the test hook: a signal inside the step's forward
        if stop.requested and not sharded:  # under FSDP every rank must stop before the same pass: check()
            raise StepInterrupted

    try:
        layers = distributed.decoder_layers(model)
    except ConfigError:  # an architecture without declared blocks: the checks between passes remain
        layers = []
    handles = [layer.register_forward_pre_hook(before_layer) for layer in layers]
    try:
        yield check
    finally:
        for handle in handles:
            handle.remove()


def interrupted(state_dir: Path, cfg: TrainConfig, model, optimizer, next_step: int, steps: list[dict], scaler,
                 total_steps: int, when: str) -> DrpoError:
    """Save the resumable state (the next step to run: `next_step`) and return the error that says so:
    Interrupted (exit 130), or Aborted (exit 4) when the state could not be saved (e.g. a full disk)."""
    try:
        save_state(state_dir, cfg, model, optimizer, next_step, steps, scaler)
    except Exception as err:  # noqa: BLE001 - said in one line, nothing half-written (save_state cleans up)
        return Aborted(f"interrupted {when} of {total_steps}, but the resumable state could not be saved to "
                       f"{state_dir} ({distributed.one_line(err)}): nothing was kept; rerun the command")
    return Interrupted(f"interrupted {when} of {total_steps}; state saved to {state_dir}; rerun the same command "
                       "with --resume to continue")
