"""The command-line layer: the only module that imports typer.

Heavy modules (torch, transformers) are imported inside command bodies so that `drpo --help`
and `drpo schema` stay fast. Every DrpoError becomes one line on stderr and its exit code;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from typing import TypeVar

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
    except KeyboardInterrupt:
        if _state["debug"]:
            raise
        typer.echo("interrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as err:  # last line of defence: one line, exit 1
        if _state["debug"]:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        typer.echo(f"error: {_rank_tag()}{type(err).__name__}: {first} (run with --debug for the traceback)", err=True)
        raise typer.Exit(EXIT_RUNTIME) from None
    finally:
        _leave_process_group(ok)


def _launched_rank() -> int | None:
    """This process's rank under torchrun with several processes (from the environment), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        return int(os.environ["RANK"])
    return None


def _rank_tag() -> str:
    r = _launched_rank()
    return "" if r is None else f"[rank {r}] "


def _leave_process_group(ok: bool) -> None:
    """Under torchrun: leave the process group before exiting (best effort; see distributed.shutdown)."""
    distributed = sys.modules.get("drpo_cli.distributed")
    if distributed is not None:
        with contextlib.suppress(Exception):  # the command's own outcome is what gets reported
            distributed.shutdown(ok=ok)


# ---- commands -------------------------------------------------------------------------------
# Each command parses options, builds its config (validated before any heavy import) and calls
# into the library inside run_guarded().


# ---- drpo schema / drpo validate --------------------------------------------------------------


@app.command("schema")
def schema_command(
    as_json: bool = typer.Option(False, "--json", help="Print the machine-readable schema (schemas/rollout-v1.json)."),
) -> None:
    """Show the rollout schema v1: columns, canonical types, what is required."""

    def body() -> None:
        from drpo_cli import schema

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
        from drpo_cli.errors import InputError
        from drpo_cli.schema import open_rollouts, parse_column_map, validate_rollouts

        source = open_rollouts(files, parse_column_map(column), strict=False)
        problems = validate_rollouts(source, limit=max_problems)
        if problems.total:
            more = problems.total - len(problems)
            raise InputError(f"invalid rollouts: {problems.summary()}",
                             details=[str(p) for p in problems] + ([f"... and {more} more"] if more else []))
        typer.echo(f"ok: {problems.files} file(s), {problems.rows:,} rows, {problems.tokens:,} response tokens "
                   f"(schema v1)")

    run_guarded(body)


# ---- drpo convert -------------------------------------------------------------------------------


@app.command("convert")
def convert_command(
    inputs: list[str] = typer.Argument(..., help="JSONL files, one response (or rollout row) per line."),
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
) -> None:
    """Convert JSONL dumps (schema v1 fields, vLLM, OpenAI-compatible or SGLang responses) into a rollout file."""

    def body() -> None:
        from drpo_cli.convert import ConvertConfig, convert

        cfg = ConvertConfig(inputs=tuple(inputs), out=out, format=fmt, columns=tuple(column),
                            temperature=temperature, top_p=top_p, top_k=top_k, logprobs=logprobs,
                            sampler=sampler, allow_raw_logprobs=allow_raw_logprobs, overwrite=overwrite,
                            min_p=min_p, version_map=tuple(version_map), run_prefix=tuple(run_prefix)).check()
        path, lines, rows = convert(cfg)
        typer.echo(f"wrote {path}: {rows:,} rows from {lines:,} lines (schema v1)")

    run_guarded(body)


# ---- drpo inspect -------------------------------------------------------------------------------


@app.command("inspect")
def inspect_command(
    rollouts: list[str] = typer.Argument(..., help="Rollout files or directories (Arrow IPC or Parquet)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Checkpoint for per-token diagnostics (else data-only)."),
    current_version: int | None = typer.Option(
        None, help="Policy version of the current model (default: the checkpoint's, else the data's max)."
    ),
    delta: list[str] = typer.Option([], "--delta", help="DRPO δ values for a what-if table, e.g. 0.1,0.2,12.5."),
    tr_delta: float = typer.Option(0.2, help="Trust-region yardstick: a token is outside when |π − μ| > tr_delta."),
    temperature: float | None = typer.Option(None, help="Sampling temperature when the rollouts give none."),
    column: list[str] = typer.Option([], "--column", help="Rename a rollout column: LOGGED=DRPO (repeatable)."),
    top: int = typer.Option(10, help="Worst sequences to list by sample_id."),
    json_out: str | None = typer.Option(None, "--json", help="Write the JSON report to PATH ('-': stdout only)."),
    per_token: str | None = typer.Option(None, "--per-token", help="Write per-token diagnostics (Arrow IPC) to PATH."),
    html: str | None = typer.Option(None, "--html", help="Write a self-contained HTML page of the report to PAGE."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing --json/--per-token/--html file drpo wrote."
    ),
    fail_above: list[str] = typer.Option(
        [], "--fail-above", help="Gate METRIC=VALUE: exit 3 when the metric exceeds VALUE (repeatable)."
    ),
    reject: list[str] = typer.Option(
        [], "--reject", help="Report what a rejection criterion LEVEL_kN>X would reject, e.g. seq_mean_k3>0.01 (repeatable)."
    ),
    is_veto: float | None = typer.Option(None, "--is-veto", help="Report what a veto at ρ = π/μ < THRESH would drop."),
    correction: str = typer.Option("none", help="Report what a named correction would mask: none | seq-mask-tis."),
    is_correction: str = typer.Option("none", help="Behavior weight for --is-batch-norm: none | is | tis | mis."),
    is_cap: float | None = typer.Option(None, help="Cap of tis (2.0)."),
    is_band: tuple[float, float] | None = typer.Option(None, help="Band LO HI of mis (0.5 2.0) / seq-mask-tis."),
    is_level: str = typer.Option("token", help="ρ of the behavior weight: token | sequence | geometric."),
    is_batch_norm: bool = typer.Option(False, "--is-batch-norm", help="Report the weights' batch mean (normaliser)."),
    reject_mode: str | None = typer.Option(None, help="mask (rejected tokens leave the mean) | zero (weight 0)."),
    max_lag: int | None = typer.Option(None, "--max-lag", help="Leave out rows (or tokens) whose staleness lag exceeds N."),
    min_version: int | None = typer.Option(None, "--min-version", help="Leave out rows (or tokens) whose policy version is below V."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    dtype: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32 weights."),
    micro_batch_tokens: int = typer.Option(4096, help="Token budget per forward pass."),
    replay_routing: bool = typer.Option(
        False, "--replay-routing", help="MoE: route through the experts the sampler logged (routed_experts column)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no tables."),
    allow_unsafe_weights: bool = typer.Option(False, "--allow-unsafe-weights", help="Allow pickle weights."),
) -> None:
    """Audit rollouts for staleness and trust-region violations (data-only, or per token with --model)."""

    def body() -> None:
        from drpo_cli.config import InspectConfig
        from drpo_cli.errors import ConfigError, GateError

        try:
            deltas = tuple(float(d) for spec in delta for d in spec.split(",") if d.strip())
        except ValueError:
            raise ConfigError(f"--delta {','.join(delta)!r}: expected numbers separated by commas, "
                              "e.g. 0.1,0.2,12.5") from None
        cfg = InspectConfig(
            rollouts=tuple(rollouts), model=model, current_version=current_version, deltas=deltas,
            tr_delta=tr_delta, temperature=temperature, columns=tuple(column), top=top, json_out=json_out,
            per_token=per_token, html=html, fail_above=tuple(fail_above), overwrite=overwrite, reject=tuple(reject),
            max_lag=max_lag, min_version=min_version, device=device, dtype=dtype,
            micro_batch_tokens=micro_batch_tokens, quiet=quiet, allow_unsafe_weights=allow_unsafe_weights,
            is_veto=is_veto, correction=correction, is_correction=is_correction, is_cap=is_cap, is_band=is_band,
            is_level=is_level, is_batch_norm=is_batch_norm, reject_mode=reject_mode,
            replay_routing=replay_routing,
        ).check()
        from rich.console import Console

        from drpo_cli.audit import inspect_and_write, run_inspect
        from drpo_cli.report import render_inspect

        lead = _launched_rank() in (None, 0)  # under torchrun every rank audits, rank 0 alone writes
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
def train_command(
    ctx: typer.Context,
    config: str | None = typer.Option(
        None, "--config", help="TOML or JSON file of options (a drpo_checkpoint.json reruns its run); flags override it."
    ),
    rollouts: list[str] = typer.Option([], "--rollouts", "-r", help="Rollout file or directory (repeatable)."),
    model: str = typer.Option("", "--model", "-m", help="Input Hugging Face checkpoint directory."),
    out: str | None = typer.Option(None, "--out", "-o", help="Output directory (default: a sibling MODEL-v<N+1>)."),
    loss: str = typer.Option("drpo", help="pg-is | ppo-clip | spo | dppo-tv | dppo-kl | drpo | gspo | cispo."),
    delta: float | None = typer.Option(None, help="δ of drpo (12.5), dppo-tv (0.15), dppo-kl (0.05)."),
    eps: float | None = typer.Option(None, help="ε of spo (0.2)."),
    eps_low: float | None = typer.Option(None, help="ε_low of ppo-clip (0.2), gspo (3e-4), cispo (off)."),
    eps_high: float | None = typer.Option(None, help="ε_high of ppo-clip (0.28), gspo (4e-4), cispo (4)."),
    dual_clip: float | None = typer.Option(None, help="Dual-clip c > 1 of ppo-clip (off)."),
    ratio_cap: float | None = typer.Option(None, help="Ratio cap C of dppo-tv / dppo-kl (20)."),
    anchor: str = typer.Option("behavior", help="Anchor log-probs: behavior | proximal."),
    is_correction: str = typer.Option("none", help="Behavior correction with --anchor proximal: none | tis | mis | is."),
    is_cap: float | None = typer.Option(None, help="Cap of tis (2.0)."),
    is_band: tuple[float, float] | None = typer.Option(None, help="Kept band LO HI of mis (0.5 2.0)."),
    is_level: str = typer.Option("token", help="ρ of tis / mis per token | sequence (product) | geometric (mean)."),
    reject: list[str] = typer.Option(
        [], "--reject", help="Reject tokens/sequences by LEVEL_kN>X on π_old vs μ, e.g. seq_mean_k3>0.01 (repeatable)."
    ),
    is_veto: float | None = typer.Option(
        None, "--is-veto", help="Drop a sequence when a token has π_old/μ below THRESH (slime: 1e-4)."
    ),
    is_batch_norm: bool = typer.Option(
        False, "--is-batch-norm", help="Self-normalise the behavior weights to mean 1 over each step."
    ),
    correction: str = typer.Option("none", help="Named correction: none | seq-mask-tis (needs --anchor proximal)."),
    reject_mode: str | None = typer.Option(
        None, help="Rejected/vetoed tokens: mask (leave the denominators; default) | zero (weight 0)."
    ),
    ref_model: str | None = typer.Option(None, "--ref-model", help="Reference checkpoint for a KL(π‖π_ref) penalty."),
    kl_coef: float | None = typer.Option(None, help="β of the reference KL penalty (0.001 with --ref-model)."),
    kl_estimator: str = typer.Option("k3", help="Per-token KL estimator: k1 | k2 | k3."),
    entropy_coef: float = typer.Option(0.0, help="Entropy bonus c: each token's loss gets −c·H(π)."),
    max_lag: int | None = typer.Option(None, "--max-lag", help="Drop rows (or mask tokens) whose staleness lag exceeds N."),
    min_version: int | None = typer.Option(None, "--min-version", help="Drop rows (or mask tokens) whose policy version is below V."),
    agg: str = typer.Option(
        "token-mean", help="token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm."
    ),
    horizon: int = typer.Option(8192, help="Horizon of seq-mean-token-sum-norm."),
    adv_norm: str = typer.Option("none", help="Group advantages from reward: none | std."),
    epochs: int = typer.Option(1, help="Passes over the rollouts."),
    minibatches: int = typer.Option(1, help="Optimizer steps per pass."),
    micro_batch_tokens: int = typer.Option(4096, help="Token budget per forward/backward."),
    lr: float = typer.Option(1e-6, help="AdamW learning rate."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay."),
    max_grad_norm: float = typer.Option(1.0, help="Gradient-norm clip."),
    warmup_steps: int = typer.Option(0, help="Linear warmup steps."),
    seed: int = typer.Option(0, help="Shuffle seed."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    dtype: str = typer.Option("auto", help="auto | bf16 | fp16 (autocast, fp32 master weights; fp16 loss-scaled) | fp32."),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="Recompute activations."),
    replay_routing: bool = typer.Option(
        False, "--replay-routing", help="MoE: route through the experts the sampler logged (routed_experts column)."
    ),
    cpu_offload: bool = typer.Option(
        False, "--cpu-offload", help="Under torchrun on CUDA: keep sharded weights, grads and optimizer state in CPU memory."
    ),
    nproc: int | None = typer.Option(
        None, "--nproc", min=1, help="Run under torchrun with N processes on this machine (FSDP2; one per GPU)."
    ),
    lora_r: int | None = typer.Option(None, "--lora-r", help="Train a LoRA adapter of rank R (peft; head frozen)."),
    lora_alpha: float | None = typer.Option(None, "--lora-alpha", help="LoRA alpha: update (alpha / r)·BA (2R)."),
    lora_targets: str | None = typer.Option(
        None, "--lora-targets", help="Comma-separated module names (default: attention and MLP projections)."
    ),
    adapter: str | None = typer.Option(None, "--adapter", help="Continue training this peft LoRA adapter directory."),
    merge: bool = typer.Option(False, "--merge", help="With LoRA: write merged full weights instead of the adapter."),
    tr_delta: float = typer.Option(0.2, help="Trust-region yardstick of the diagnostics: |π − μ| > tr_delta."),
    temperature: float | None = typer.Option(None, help="Sampling temperature when the rollouts give none."),
    column: list[str] = typer.Option([], "--column", help="Rename a rollout column: LOGGED=DRPO (repeatable)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out that drpo wrote."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run (OUT.partial-state/)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary tables."),
    tensorboard: str | None = typer.Option(
        None, "--tensorboard", help="Write every step's metrics as TensorBoard events to DIR (rounds form one curve)."
    ),
    allow_unsafe_weights: bool = typer.Option(False, "--allow-unsafe-weights", help="Allow pickle weights."),
) -> None:
    """Run off-policy update passes on rollouts and write an updated checkpoint with a trust-region report."""

    def body() -> None:
        from drpo_cli.config import TrainConfig

        options = dict(  # noqa: C408 -- the keyword form TrainConfig(...) takes
            rollouts=tuple(rollouts), model=model, out=out, loss=loss, delta=delta, eps=eps,
            eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, ratio_cap=ratio_cap, anchor=anchor,
            is_correction=is_correction, is_cap=is_cap, is_band=is_band, is_level=is_level, reject=tuple(reject),
            is_veto=is_veto, is_batch_norm=is_batch_norm, correction=correction, reject_mode=reject_mode,
            ref_model=ref_model, kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
            max_lag=max_lag, min_version=min_version, agg=agg, horizon=horizon,
            adv_norm=adv_norm, epochs=epochs, minibatches=minibatches, micro_batch_tokens=micro_batch_tokens,
            lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm, warmup_steps=warmup_steps,
            seed=seed, device=device, dtype=dtype, grad_checkpointing=grad_checkpointing, cpu_offload=cpu_offload,
            tr_delta=tr_delta, temperature=temperature, columns=tuple(column), overwrite=overwrite, resume=resume,
            quiet=quiet, tensorboard=tensorboard, allow_unsafe_weights=allow_unsafe_weights, lora_r=lora_r, lora_alpha=lora_alpha,
            lora_targets=tuple(t.strip() for t in (lora_targets or "").split(",") if t.strip()), adapter=adapter,
            merge=merge, replay_routing=replay_routing,
        )
        if config is None:
            cfg = TrainConfig(**options).check()
        else:
            from drpo_cli.config_file import train_config

            cfg = train_config(config, _given(ctx, options, {"column": "columns"})).check()
        if nproc is not None and "WORLD_SIZE" not in os.environ:  # not yet under a launcher: start one
            import subprocess

            from drpo_cli.distributed import torchrun_argv

            command = torchrun_argv(nproc, without_nproc(sys.argv[1:]))
            raise typer.Exit(subprocess.run(command, check=False).returncode)
        from drpo_cli.train import train

        result = train(cfg)
        if _launched_rank() in (None, 0):
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
        from drpo_cli import outputs
        from drpo_cli.pages import read_run, runs_page

        outputs.check_paths([("RUNS", r) for r in runs], [outputs.Output("--out", out, "html")], overwrite=overwrite)
        reports = [(r, read_run(r)) for r in runs]
        outputs.write_file(out, runs_page(reports), "html", overwrite=overwrite)
        typer.echo(f"wrote {out} ({len(reports)} run(s))")

    run_guarded(body)


def _given(ctx: typer.Context, options: dict, renames: dict[str, str]) -> dict:
    """The entries of `options` (field name -> value) set on the command line or by environment variable."""
    def explicit(param: str) -> bool:  # by name: typer may bring its own copy of click's enum
        source = ctx.get_parameter_source(param)
        return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")

    return {renames.get(p, p): options[renames.get(p, p)] for p in ctx.params
            if renames.get(p, p) in options and explicit(p)}


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
    from drpo_cli.allocator import return_freed_memory

    return_freed_memory()
    if _launched_rank() is None:
        app(prog_name="drpo")
        return
    # Under torchrun the process group has been left by now, but gloo's and autograd's C++ threads
    # can still abort the interpreter's teardown (SIGABRT after a successful run): skip it.
    try:
        app(prog_name="drpo")
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
