"""`drpo inspect`: the staleness and trust-region audit of logged rollouts (SPEC.md §2), from the files to the
report. The data pass streams canonical record batches through a `DataAudit` (data_audit.py; bounded
memory, merged exactly across ranks); model mode (inspect_model.py) adds the per-token diagnostics.

The module is not called `inspect` so that no script run from this directory can shadow the
standard library's `inspect`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import pyarrow.compute as pc

from drpo_cli import __version__
from drpo_cli.audit.checks import list_parts, loss_mask, raise_first_break, versions
from drpo_cli.audit.columns import DATA_COLUMNS, VERSION_COLUMNS, extra_columns
from drpo_cli.audit.data_audit import DataAudit
from drpo_cli.base.errors import InputError
from drpo_cli.base.outputs import atomic_file, claimed, write_together
from drpo_cli.base.value_table import breakdown_type_problem
from drpo_cli.config import InspectConfig
from drpo_cli.reports.report_format import (
    INSPECT_REPORT_SCHEMA,
    clean_number,
    evaluate_gates,
    finite_or_null,
    report_json,
    validate_report,
    write_report,
)
from drpo_cli.rollouts.files import RolloutSource, open_rollouts
from drpo_cli.rollouts.rows import Context, file_temperature
from drpo_cli.rollouts.validate import file_problems

Progress = Callable[..., None]  # (phase, advance, total | None), e.g. the CLI's progress bar


def data_metrics(section: dict) -> dict:
    """The data/* metrics of the report (SPEC.md §2 data-only audit), from the data section."""
    m = section["masked_tokens"]
    lag = section["lag"]
    stale = sum(h["tokens"] for h in lag["histogram"] if h["lag"] > 0)
    return {
        "data/rows": section["rows"],
        "data/tokens": m,
        "data/response_tokens": section["response_tokens"],
        "data/zero_adv_frac": section["advantage"]["zero_frac"] or 0.0,
        "data/rare_token_frac": section["behavior"]["rare_frac"] or 0.0,
        "data/neg_logmu_mean": section["behavior"]["neg_logmu_mean"] or 0.0,
        "data/adv_abs_mean": section["advantage"]["stats"]["abs_mean"] or 0.0,
        "data/response_len_mean": section["response_length"]["mean"] or 0.0,
        "data/response_len_max": section["response_length"]["max"] or 0,
        "data/duplicate_ids": section["duplicate_sample_ids"]["rows"],
        "data/stale_frac": stale / m if m else 0.0,
        "data/lag_max": max((h["lag"] for h in lag["histogram"]), default=0),
    }


# ---- orchestration ---------------------------------------------------------------------------------


def check_source(source: RolloutSource) -> None:
    """Schema-level checks before streaming (validate.file_problems): InputError listing them all."""
    problems = file_problems(source)
    if problems:
        raise InputError(str(problems[0]), details=[str(p) for p in problems[1:]])


def resolve_by(source: RolloutSource, names) -> dict[str, str]:
    """{--by name: the batch column holding it}: a schema column (or one renamed to it with --column) by its
    canonical name, any other column of the files as logged. InputError (one line: file, column, expected,
    found) when a file lacks it or it is not a string or integer column, before any work."""
    from drpo_cli.rollouts.schema import COLUMN_BY_NAME

    read = {}
    for name in names:
        canonical = source.column_map.get(name, name)
        for rf in source.files:
            if canonical in COLUMN_BY_NAME:
                found = COLUMN_BY_NAME[canonical].arrow_type if canonical in rf.present else None
            else:
                index = rf.schema.get_field_index(name)  # −1 when missing (or named twice)
                found = rf.schema.field(index).type if index >= 0 else None
            expected = "a string or integer column to break the audit down by (--by)"
            if found is None:
                raise InputError(f"{rf.path}: column {name}: expected {expected}, found no such column "
                                 f"(columns: {', '.join(rf.schema.names)})")
            problem = breakdown_type_problem(found)
            if problem is not None:
                raise InputError(f"{rf.path}: column {name}: expected {expected}, found {problem}")
        read[name] = canonical if canonical in COLUMN_BY_NAME else name
    return read


def filter_version(source: RolloutSource, cfg: InspectConfig) -> int | None:
    """The current version --max-lag counts from, known before streaming: --current-version, else the
    checkpoint's recorded version, else the newest policy_version in the data (one pass over that column)."""
    if cfg.max_lag is None:
        return cfg.current_version
    if cfg.current_version is not None:
        return cfg.current_version
    if cfg.model is not None:
        from drpo_cli.model.checkpoint import read_policy_version

        version = read_policy_version(cfg.model)
        if version is not None:
            return version
    newest = -1
    for sb in source.iter_batches(VERSION_COLUMNS):
        names = sb.batch.schema.names
        if "token_policy_versions" in names:  # the newest trained token (the audit's checks come later)
            off, _ = list_parts(sb.batch.column("token_policy_versions"))
            try:
                raise_first_break(sb, VERSION_COLUMNS)
                _, _, top = versions(sb, off, loss_mask(sb, off))
            except InputError:
                continue  # the audit names the problem
            newest = max(newest, int(top.max(initial=-1)))
        elif "policy_version" in names:
            top = pc.max(sb.batch.column("policy_version")).as_py()
            newest = max(newest, -1 if top is None else int(top))
    return newest if newest >= 0 else None


def audit_data(source: RolloutSource, cfg: InspectConfig, progress: Progress | None = None,
               current: int | None = None, shard=None, by: dict[str, str] | None = None,
               context: Context | None = None) -> DataAudit:
    """Stream every record batch through a DataAudit (bounded memory), minus the rows the stale-row filters drop.

    With the model's `context` every kept row's length is checked against it (DataAudit.fit_context).

    Under torchrun (`shard`: this rank's pieces, schema.Shard) each rank audits its share and the
    shares are merged exactly; a bad row found by one rank stops every rank with its error.
    """
    check_source(source)
    by = by or {}
    audit = DataAudit().break_down(by)
    temps = {rf.path: file_temperature(rf.metadata, cfg.temperature) for rf in source.files}
    filtering = cfg.max_lag is not None or cfg.min_version is not None
    error = None
    try:
        for sb in source.iter_batches(DATA_COLUMNS, shard=shard, extra=extra_columns(by)):
            if filtering and (sb := audit.drop_stale(sb, current, cfg.max_lag, cfg.min_version)) is None:
                continue
            if context is not None:
                audit.fit_context(sb, context, cfg.truncate)
            _, tokens = audit.update(sb, temps[sb.path])
            if progress is not None:
                progress("reading rollouts (tokens)", tokens, None)
    except InputError as err:
        if shard is None:
            raise
        error = err
    if shard is None:
        audit.finish_groups()
        return audit
    from drpo_cli.model.distributed import agree

    agree(error, "auditing the rollouts")
    audit.all_reduce_()
    return audit


def run_inspect(cfg: InspectConfig, progress: Progress | None = None, per_token_path: str | None = None) -> dict:
    """The whole audit; returns the report dict (validated against its JSON Schema).

    Writes nothing but `per_token_path` (the caller's temporary file) in model mode.
    """
    start = time.perf_counter()
    source = open_rollouts(list(cfg.rollouts), cfg.column_map())
    by = resolve_by(source, cfg.by)  # a missing or unusable --by column is refused before any work
    against = None
    if cfg.against:  # unmatched rows or other tokens are refused before any work too
        from drpo_cli.audit.inspect_against import Against

        against = Against(source, cfg)
    context = None
    if cfg.model is not None:  # a broken model directory is found in seconds, before the data pass
        from drpo_cli.model.checkpoint import check_model, model_context

        context = model_context(check_model(cfg.model, cfg.allow_unsafe_weights), cfg.model)
    shard = _join_ranks(cfg, source)
    filter_current = filter_version(source, cfg)
    audit = audit_data(source, cfg, progress, filter_current, shard, by, context)
    if audit.rows == 0 and audit.dropped_rows:
        raise InputError(f"--max-lag {cfg.max_lag} / --min-version {cfg.min_version}: every one of the "
                         f"{audit.dropped_rows} rows is too stale (current version {filter_current}); nothing is left")
    notes: list[str] = []
    model_section, model_metrics, against_section = None, {}, None
    current, version_source = cfg.current_version, "--current-version"
    if cfg.model is not None:
        from drpo_cli.audit.inspect_model import audit_model

        model_section, model_metrics, current, version_source, model_notes = audit_model(
            cfg, source, progress, per_token_path, shard, by, against, context)
        against_section = model_section.pop("against")
        notes += model_notes
        if model_section.get("logging_checks"):
            model_section["logging_checks"]["findings"].append(logprobs_kind_note(source.metadata))
    elif against is not None:
        from drpo_cli.audit.inspect_against import compare_without_model

        against_section = compare_without_model(cfg, source, against, shard)
    if against_section is not None and against_section["temperature_differs"]:
        notes.append(f"--against: {against_section['temperature_differs']} row(s) were sampled at another temperature "
                     f"in {', '.join(cfg.against)} than in {', '.join(cfg.rollouts)}: their log-probs are of other "
                     "distributions, so B vs A mixes the temperature's effect with the samplers' mismatch")
    data = audit.section(current, version_source)
    data["staleness_filter"] = audit.staleness_filter(cfg, filter_current)
    data["truncation"] = audit.truncation(context, cfg.truncate)
    notes = data_notes(data, source.metadata) + notes
    metrics = {k: clean_number(v) for k, v in {**data_metrics(data), **model_metrics}.items()}
    report = {
        "report": "drpo-inspect",
        "report_version": 1,
        "drpo_version": __version__,
        "mode": "model" if cfg.model is not None else "data",
        "inputs": {"rollouts": list(cfg.rollouts), "model": cfg.model, "columns": cfg.column_map()},
        "settings": {"tr_delta": cfg.tr_delta, "deltas": list(cfg.deltas), "chosen_delta": cfg.chosen_delta(),
                     "temperature": cfg.temperature, "current_version": cfg.current_version, "top": cfg.top,
                     "device": cfg.device, "dtype": cfg.dtype, "micro_batch_tokens": cfg.micro_batch_tokens,
                     "reject": list(cfg.reject), "max_lag": cfg.max_lag, "min_version": cfg.min_version,
                     "is_veto": cfg.is_veto, "correction": cfg.correction, "is_correction": cfg.is_correction,
                     "is_cap": cfg.is_cap, "is_band": cfg.is_band and list(cfg.is_band), "is_level": cfg.is_level,
                     "is_batch_norm": cfg.is_batch_norm, "reject_mode": cfg.reject_mode, "by": list(cfg.by),
                     "worst_by": cfg.worst_by, "against": list(cfg.against),
                     "seconds": round(time.perf_counter() - start, 3)},
        "metrics": metrics,
        "data": data,
        "model": model_section,
        "against": against_section,
        "notes": notes,
        "gates": evaluate_gates(metrics, cfg.gates()),
    }
    report = finite_or_null(report)  # what the console, the page and the JSON all show
    validate_report(report, INSPECT_REPORT_SCHEMA)
    return report


def _join_ranks(cfg: InspectConfig, source: RolloutSource):
    """Under torchrun: join the process group (the model's device in model mode, else gloo on the
    CPU) and return this rank's share of the rows (files.Shard); None in one process."""
    from drpo_cli.base.launch import launched

    if not launched():
        return None
    import torch

    from drpo_cli.model import distributed
    from drpo_cli.model.logprobs import pick_device

    distributed.init(pick_device(cfg.device) if cfg.model is not None else torch.device("cpu"))
    return distributed.data_shard(source)


def inspect_and_write(cfg: InspectConfig, progress: Progress | None = None) -> dict:
    """Run the audit, then write --per-token, --json and --html atomically (outputs.py), nothing on error.

    Gates are evaluated in the report; raising on a failed gate is the caller's job, after this
    returns, so the report is always written first.
    """
    with claimed(*cfg.paths()):
        return _inspect_and_write(cfg, progress)


def _inspect_and_write(cfg: InspectConfig, progress: Progress | None) -> dict:
    with contextlib.ExitStack() as together:  # every output renamed in at the end, or none (outputs.write_together)
        tmp = together.enter_context(atomic_file(cfg.per_token, "arrow", overwrite=cfg.overwrite)) if cfg.per_token else None
        report = run_inspect(cfg, progress, None if tmp is None else str(tmp))
        files = []
        if cfg.json_out not in (None, "-"):
            files.append(("--json", cfg.json_out, report_json(report), "json"))
        if cfg.html is not None:
            from drpo_cli.reports.html_pages import inspect_page

            files.append(("--html", cfg.html, inspect_page(report), "html"))
        write_together(files, overwrite=cfg.overwrite, stack=together)
    if cfg.json_out == "-":
        write_report(report, "-", overwrite=False)
    return report


def logprobs_kind_note(metadata: dict[str, str]) -> str:
    """What the file says about its log-probs (drpo.logprobs, SPEC.md §3), in one sentence."""
    kind = metadata.get("drpo.logprobs")
    if kind == "raw":
        return ("drpo.logprobs = raw: the sampler logged log-probs before temperature / top-k / top-p, which "
                "are not the sampled distribution at T != 1 or with truncation (vLLM: "
                "logprobs_mode=processed_logprobs)")
    if kind == "processed":
        return "drpo.logprobs = processed: the sampler logged the distribution it sampled from"
    return ("drpo.logprobs is not recorded: make sure the sampler logged processed log-probs (vLLM V1 logs raw "
            "ones unless logprobs_mode=processed_logprobs)")


def data_notes(data: dict, metadata: dict[str, str]) -> list[str]:
    """Plain-language observations about the data alone."""
    notes = []
    dup = data["duplicate_sample_ids"]
    if dup["rows"]:
        notes.append(f"{dup['ids']} sample_id(s) repeat on {dup['rows']} row(s), e.g. {', '.join(dup['examples'][:3])}")
    lag = data["lag"]
    if lag["rows_without_version"]:
        notes.append(f"{lag['rows_without_version']} row(s) have no policy_version; their staleness is unknown")
    if any(h["lag"] < 0 for h in lag["histogram"]):
        notes.append(f"some rows come from a policy newer than the current version {lag['current_version']} "
                     "(negative lag): check --current-version")
    if data["advantage"]["zero_frac"] and data["advantage"]["zero_frac"] > 0.5:
        notes.append(f"{data['advantage']['zero_frac']:.0%} of the tokens have zero advantage and carry no gradient")
    notes.append(logprobs_kind_note(metadata))
    truncation = {k: v for k, v in metadata.items() if k in ("drpo.top_p", "drpo.top_k") and _cuts(k, v)}
    if truncation:
        notes.append("the sampler truncated its distribution (" + ", ".join(f"{k}={v}" for k, v in truncation.items())
                     + "); logged log-probs may be renormalised over the kept tokens")
    return notes


def _cuts(key: str, value: str) -> bool:
    """Whether metadata drpo.top_p / drpo.top_k = `value` truncates the distribution (an unreadable value may)."""
    from drpo_cli.rollouts.writer import truncates

    try:
        return truncates(float(value), None) if key == "drpo.top_p" else truncates(None, int(float(value)))
    except ValueError:
        return True
