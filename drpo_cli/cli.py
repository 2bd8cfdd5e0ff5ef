"""The command-line layer: the only module that imports typer.

Heavy modules (torch, transformers) are imported inside command bodies so that `drpo --help`
and `drpo schema` stay fast. Every DrpoError becomes one line on stderr and its exit code;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

import typer

from drpo_cli import __version__
from drpo_cli.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, DrpoError

app = typer.Typer(
    name="drpo",
    help="Offline replay trainer for LLM RL: audit stale rollouts and run trust-region off-policy updates.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}
T = TypeVar("T")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"drpo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    _state["debug"] = debug


def run_guarded(fn: Callable[[], T]) -> T:
    """Run a command body, turning domain errors into one line on stderr and an exit code."""
    try:
        return fn()
    except DrpoError as err:
        if _state["debug"]:
            raise
        typer.echo(f"error: {err.message}", err=True)
        for line in err.details:
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        if _state["debug"]:
            raise
        typer.echo("interrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as err:  # noqa: BLE001 - last line of defence: one line, exit 1
        if _state["debug"]:
            raise
        typer.echo(f"error: {type(err).__name__}: {err} (run with --debug for the traceback)", err=True)
        raise typer.Exit(EXIT_RUNTIME) from None


# ---- commands -------------------------------------------------------------------------------
# Each command parses options, builds its config (validated before any heavy import) and calls
# into the library inside run_guarded().


def main() -> None:
    app(prog_name="drpo")


if __name__ == "__main__":
    sys.exit(main())
