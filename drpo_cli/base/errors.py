"""Domain errors. Library code raises these; the CLI turns each into one line and an exit code.

Exit codes (SPEC.md §4): 0 success, 1 runtime failure, 2 bad usage or bad input,
3 a gate failed, 4 interrupted with nothing kept (no output, nothing to resume: rerun the command),
130 interrupted with the state kept (`drpo train --resume` continues).
"""

from __future__ import annotations

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_GATE = 3
EXIT_ABORTED = 4
EXIT_INTERRUPTED = 130


class DrpoError(Exception):
    """Base class: an actionable one-line message and the exit code it maps to."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, *, details: list[str] | None = None):
        super().__init__(message)
        self.message = message
        # Further lines (e.g. every schema problem) shown below the one-line summary.
        self.details = list(details or [])


class InputError(DrpoError):
    """Bad rollout files: unreadable, wrong schema, invalid values. Exit 2."""

    exit_code = EXIT_USAGE


class ConfigError(DrpoError):
    """Bad option values or combinations. Exit 2."""

    exit_code = EXIT_USAGE


class CheckpointError(DrpoError):
    """A model directory that cannot be loaded or does not fit the data. Exit 2."""

    exit_code = EXIT_USAGE


class GateError(DrpoError):
    """A `--fail-above` gate failed (the report was written first). Exit 3."""

    exit_code = EXIT_GATE


class ReportError(DrpoError):
    """The checkpoint was written but a report file (or TensorBoard's events) could not be. Exit 1."""


class Aborted(DrpoError):
    """Interrupted, and nothing was kept (no output, no resumable state): rerun the command. Exit 4."""

    exit_code = EXIT_ABORTED


class Interrupted(DrpoError):
    """SIGINT/SIGTERM during training; resumable state was saved. Exit 130."""

    exit_code = EXIT_INTERRUPTED
