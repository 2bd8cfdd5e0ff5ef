"""The command-line layer: the only module that imports typer.

Heavy modules (torch, transformers) are imported inside command bodies so that `drpo --help`
and `drpo schema` stay fast. Every DrpoError becomes one line on stderr and its exit code;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import MISSING
from typing import TypeVar

import typer

from drpo_cli import __version__
from drpo_cli.base.errors import EXIT_ABORTED, EXIT_RUNTIME, DrpoError
from drpo_cli.base.launch import launched, launched_rank, leads, rank_exit
from drpo_cli.config import (
    InspectConfig,
    TrainConfig,
    TrainLaunch,
    command_line_fields,
    option_flags,
    option_help,
)

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
    ok = False
    try:
        result = fn()
        ok = True
        return result
    except DrpoError as err:
        if _state["debug"]:
            raise
        typer.echo(f"error: {_rank_tag()}{err.message}", err=True)
        for line in err.details:
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:  # a signal before anything resumable was saved (train's saved state is Interrupted)
        if _state["debug"]:
            raise
        typer.echo(f"error: {_rank_tag()}interrupted: nothing was kept (no output written, nothing to resume); "
                   "rerun the command", err=True)
        raise typer.Exit(EXIT_ABORTED) from None
    except (typer.Exit, typer.Abort, SystemExit, GeneratorExit):
        raise
    except BaseException as err:
        # (CheckpointException): one line, exit 1
        if _state["debug"]:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        typer.echo(f"error: {_rank_tag()}{type(err).__name__}: {first} (run with --debug for the traceback)", err=True)
        raise typer.Exit(EXIT_RUNTIME) from None
    finally:
        _leave_process_group(ok)


def _rank_tag() -> str:
    r = launched_rank()
    return "" if r is None else f"[rank {r}] "


def _leave_process_group(ok: bool) -> None:
    """Under torchrun: leave the process group before exiting (best effort; see distributed.shutdown)."""
    distributed = sys.modules.get("drpo_cli.model.distributed")
    if distributed is not None:
        with contextlib.suppress(Exception):  # the command's own outcome is what gets reported
            distributed.shutdown(ok=ok)


# ---- commands -------------------------------------------------------------------------------
# Each command parses options, builds its config (validated before any heavy import) and calls
# into the library inside run_guarded(). `drpo train` and `drpo inspect` take one option per field of
# TrainConfig / InspectConfig (config.option: type, default, flags, help, panel), derived below.


def config_parameters(*classes) -> list[inspect.Parameter]:
    """One Typer parameter per command-line field of the config `classes` (command_line_fields' order)."""
    hints = {name: kind for cls in classes for name, kind in typing.get_type_hints(cls).items()}
    params = []
    for f in command_line_fields(*classes):
        meta, kind, default = f.metadata, hints[f.name], f.default
        if meta["cli"] is not None:
            kind = meta["cli"]
        elif typing.get_origin(kind) is tuple and typing.get_args(kind)[1:] == (Ellipsis,):
            kind = list[typing.get_args(kind)[0]]  # a tuple field: a repeatable option
        if isinstance(default, tuple):  # a repeatable option, or one text that the field's `parse` splits
            default = list(default) if typing.get_origin(kind) is list else None
        if meta["argument"]:
            info = typer.Argument(... if default is MISSING else default, help=option_help(f))
        else:
            info = typer.Option(default, *option_flags(f), help=option_help(f), rich_help_panel=meta["panel"],
                                min=meta["minimum"])
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=kind))
    return params


def config_values(cls, given: dict) -> dict:
    """The command-line values of config class `cls`'s fields, as the fields hold them."""
    values = {}
    for f in command_line_fields(cls):
        value, parse = given[f.name], f.metadata["parse"]
        values[f.name] = parse(value) if parse is not None else tuple(value) if isinstance(value, list) else value
    return values


def with_options(*classes, context: bool = False):
    """Give a command `(**params)` the signature Typer reads: the fields of `classes` (and the context)."""
    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        ctx = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)] if context else []
        command.__signature__ = inspect.Signature(ctx + config_parameters(*classes))
        return command

    return decorate


# ---- drpo schema / drpo validate --------------------------------------------------------------


@app.command("schema")
def schema_command(
    as_json: bool = typer.Option(False, "--json", help="Print the machine-readable schema (schemas/rollout-v1.json)."),
) -> None:
    """Show the rollout schema v1: columns, canonical types, what is required."""

    def body() -> None:
        from drpo_cli.rollouts import schema

        if as_json:
            typer.echo(schema.schema_json(), nl=False)
            return
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(title=f"drpo rollout schema v{schema.SCHEMA_VERSION}: one row per sampled response")
        table.add_column("column", no_wrap=True)
        table.add_column("type", no_wrap=True)
        table.add_column("required")
        table.add_column("meaning")
        for c in schema.COLUMNS:
            table.add_row(c.name, schema.type_name(c.arrow_type), c.required, Text(c.description))
        console = Console(markup=False, highlight=False)
        console.print(table)
        console.print("Also accepted, cast once on read: list or large_list, any integer width for ids and "
                      "versions, float16/float64 for floats, integer loss_mask (non-zero = 1), integer "
                      "group_id / sample_id. Rename logged columns with --column LOGGED=DRPO.")
        console.print("Formats: Arrow IPC file or stream, Parquet; files or directories of "
                      + ", ".join(f"*{s}" for s in schema.ROLLOUT_SUFFIXES) + ".")
        console.print("Metadata: " + "; ".join(f"{k}: {v}" for k, v in schema.METADATA_KEYS.items()))

    run_guarded(body)


@app.command("validate")
def validate_command(
    files: list[str] = typer.Argument(..., help="Rollout files or directories."),
    column: list[str] = typer.Option([], "--column", help="Rename a rollout column: LOGGED=DRPO (repeatable)."),
    max_problems: int = typer.Option(20, "--max-problems", min=1, help="Problems to list (the rest are counted)."),
) -> None:
    """Check rollout files against schema v1 and list every problem (exit 0 valid, 2 invalid)."""

    def body() -> None:
        from drpo_cli.base.errors import InputError
        from drpo_cli.rollouts.files import open_rollouts
        from drpo_cli.rollouts.schema import parse_column_map
        from drpo_cli.rollouts.validate import validate_rollouts

        source = open_rollouts(files, parse_column_map(column), strict=False)
        problems = validate_rollouts(source, limit=max_problems)
        if problems.total:
            more = problems.total - len(problems)
            raise InputError(f"invalid rollouts: {problems.summary()}",
                             details=[str(p) for p in problems] + ([f"... and {more} more"] if more else []))
        if leads():
            typer.echo(f"ok: {problems.files} file(s), {problems.rows:,} rows, {problems.tokens:,} response tokens "
                       f"(schema v1)")

    run_guarded(body)


# ---- drpo convert -------------------------------------------------------------------------------


@app.command("convert")
def convert_command(
    inputs: list[str] = typer.Argument(..., help="JSONL files, one response (or rollout row, or with --stream one "
                                       "stream event) per line."),
    out: str = typer.Option(..., "--out", "-o", help="Output Arrow IPC file (schema v1)."),
    fmt: str = typer.Option("jsonl", "--format", help="jsonl (schema v1 fields) | vllm | openai | sglang | llamacpp."),
    column: list[str] = typer.Option([], "--column", help="Rename a JSON field: SRC=CANONICAL (repeatable)."),
    temperature: float | None = typer.Option(None, help="Sampling temperature (drpo.temperature metadata)."),
    top_p: float | None = typer.Option(None, help="Sampler top-p (drpo.top_p metadata)."),
    top_k: int | None = typer.Option(None, help="Sampler top-k (drpo.top_k metadata)."),
    min_p: float | None = typer.Option(None, help="Sampler min-p (checks raw log-probs and SGLang truncation; not recorded)."),
    logprobs: str | None = typer.Option(
        None, help="processed | raw: the log-probs' kind (required for vllm, openai and sglang; default processed)."
    ),
    sampler: str | None = typer.Option(None, help="Free text recorded as drpo.sampler, e.g. 'vllm 0.11'."),
    allow_raw_logprobs: bool = typer.Option(
        False, "--allow-raw-logprobs", help="Accept raw log-probs at T != 1 or with top-p/top-k (wrong μ)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    version_map: list[str] = typer.Option(
        [], "--version-map", help="Map an engine weight-version label to a policy version: LABEL=N (repeatable)."
    ),
    run_prefix: list[str] = typer.Option(
        [], "--run-prefix", help="Prefix sample ids, e.g. run-7: once for all inputs or once per input (vLLM offline "
        "request ids count from 0 in every process)."
    ),
    stream: bool = typer.Option(
        False, "--stream", help="Each line is one event of a streamed response (an SSE 'data:' line or its JSON): "
        "each stream's events are joined into one row per response (see docs/rollouts.md)."
    ),
) -> None:
    """Convert JSONL dumps (schema v1 fields, vLLM, OpenAI-compatible, SGLang or llama-server responses, or with
    --stream their streamed events) into a rollout file."""

    def body() -> None:
        from drpo_cli.rollouts.convert import ConvertConfig, convert

        cfg = ConvertConfig(inputs=tuple(inputs), out=out, format=fmt, columns=tuple(column),
                            temperature=temperature, top_p=top_p, top_k=top_k, logprobs=logprobs,
                            sampler=sampler, allow_raw_logprobs=allow_raw_logprobs, overwrite=overwrite,
                            min_p=min_p, version_map=tuple(version_map), run_prefix=tuple(run_prefix),
                            stream=stream).check()
        path, lines, rows = convert(cfg)
        typer.echo(f"wrote {path}: {rows:,} rows from {lines:,} lines (schema v1)")

    run_guarded(body)


# ---- drpo inspect -------------------------------------------------------------------------------


@app.command("inspect")
@with_options(InspectConfig)
def inspect_command(**options) -> None:
    """Audit rollouts for staleness and trust-region violations (data-only, or per token with --model)."""
    quiet, json_out = options["quiet"], options["json_out"]

    def body() -> None:
        from drpo_cli.base.errors import GateError

        cfg = InspectConfig(**config_values(InspectConfig, options)).check()
        from rich.console import Console

        from drpo_cli.audit.inspect_data import inspect_and_write, run_inspect
        from drpo_cli.reports.report_format import render_inspect

        lead = leads()  # under torchrun every rank audits, rank 0 alone writes
        err = Console(stderr=True)
        with _ProgressBar(err, enabled=not quiet and err.is_terminal and lead) as progress:
            report = inspect_and_write(cfg, progress) if lead else run_inspect(cfg)
        if not quiet and json_out != "-" and lead:
            render_inspect(report, Console())
        failed = [g for g in report["gates"] if not g["passed"]]
        if failed:
            raise GateError("gate failed: " + "; ".join(
                f"{g['metric']} = {g['value']} > {g['threshold']}" for g in failed))

    run_guarded(body)


class _ProgressBar:
    """A rich progress bar on stderr as a callback `(phase, advance, total)`; a no-op when disabled."""

    def __init__(self, console, *, enabled: bool):
        self.enabled, self.console, self.bar, self.tasks = enabled, console, None, {}

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=self.console, transient=True)
        self.bar.__enter__()
        return self

    def __call__(self, phase: str, advance: int, total: int | None = None) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.bar.add_task(phase, total=total)
        self.bar.update(self.tasks[phase], advance=advance, total=total)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


# ---- drpo train ---------------------------------------------------------------------------------


@app.command("train")
@with_options(TrainLaunch, TrainConfig, context=True)
def train_command(ctx: typer.Context, config: str | None, nproc: int | None, **given) -> None:
    """Run off-policy update passes on rollouts and write an updated checkpoint with a trust-region report."""

    def body() -> None:
        options = config_values(TrainConfig, given)
        if config is None:
            cfg = TrainConfig(**options).check()
        else:
            from drpo_cli.config_file import train_config

            cfg = train_config(config, _given(ctx, options)).check()
        if nproc is not None and not launched():  # not yet under a launcher: start one
            from drpo_cli.model.distributed import run_torchrun

            raise typer.Exit(run_torchrun(nproc, without_nproc(sys.argv[1:])))
        from drpo_cli.training.train import train

        result = train(cfg)
        if leads():
            typer.echo(f"wrote {result.out_dir} (policy version {result.policy_version})")

    run_guarded(body)


@app.command("report")
def report_command(
    runs: list[str] = typer.Argument(..., help="drpo train output directories (or their drpo_report.json files)."),
    out: str = typer.Option(..., "--out", "-o", help="The HTML page to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing page drpo wrote."),
) -> None:
    """Draw the metrics of many runs (a pipeline's rounds) on one self-contained HTML page."""

    def body() -> None:
        from drpo_cli.base import outputs
        from drpo_cli.reports.html_pages import read_run, runs_page

        inputs, page = [("RUNS", r) for r in runs], [outputs.Output("--out", out, "html")]
        with outputs.claimed(inputs, page):
            outputs.check_paths(inputs, page, overwrite=overwrite)
            reports = [(r, read_run(r)) for r in runs]
            outputs.write_file(out, runs_page(reports), "html", overwrite=overwrite)
        typer.echo(f"wrote {out} ({len(reports)} run(s))")

    run_guarded(body)


def _given(ctx: typer.Context, options: dict) -> dict:
    """The entries of `options` (field name -> value) set on the command line or by environment variable."""
    def explicit(param: str) -> bool:  # by name: typer may bring its own copy of click's enum
        source = ctx.get_parameter_source(param)
        return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")

    return {p: options[p] for p in ctx.params if p in options and explicit(p)}


def without_nproc(argv: list[str]) -> list[str]:
    """The command-line arguments minus `--nproc N` / `--nproc=N` (what torchrun's ranks run)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def main() -> None:
    if not launched():
        app(prog_name="drpo")
        return
    # FSDP ranks gather and free layer-sized tensors all through the work: hand them back to the system
    # (allocator.py). One process keeps glibc's default, which is faster there (fewer page faults).
    from drpo_cli.base.allocator import return_freed_memory

    return_freed_memory()
    # Under torchrun the process group has been left by now, but gloo's and autograd's C++ threads
    # can still abort the interpreter's teardown (SIGABRT after a successful run): skip it.
    try:
        app(prog_name="drpo")
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    rank_exit(code)
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
