"""Report dicts -> JSON (validated against the schemas in schemas/) and rich tables.

Two reports: `OUT/drpo_report.json` of `drpo train` and `drpo inspect --json`. Metric names are the
SPEC.md §2 names (`tr/outside_frac`, `kl/k3_mean`, ...), the same in the console tables, the JSON
reports and the docs.
"""

from __future__ import annotations

import json
import math
from typing import Any

from drpo_cli.model.histograms import SCHEMA_HISTOGRAM, SCHEMA_WORST_TOKENS
from drpo_cli.objectives.corrections import (
    ANCHORS,
    CORRECTIONS,
    IS_CORRECTIONS,
    IS_LEVELS,
    KL_ESTIMATORS,
    REJECT_MODES,
)
from drpo_cli.objectives.metrics import INSPECT_DATA_METRICS, INSPECT_MODEL_METRICS, WORST_BY

# ---- shared: JSON numbers, validation, atomic writes, console formatting ----------------------


def clean_number(x: Any) -> float | int | None:
    """A JSON-safe number: numpy scalars become Python numbers, NaN/inf become None."""
    if x is None:
        return None
    if isinstance(x, (bool, int)) or (hasattr(x, "dtype") and x.dtype.kind in "iub"):
        return int(x)
    x = float(x)
    return x if math.isfinite(x) else None


def validate_report(report: dict, schema: dict) -> None:
    """Raise RuntimeError naming the first path where `report` breaks `schema` (a bug: exit 1)."""
    import jsonschema

    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(report), key=lambda e: list(e.path))
    if errors:
        where = "/".join(str(p) for p in errors[0].absolute_path) or "/"
        raise RuntimeError(f"{schema['title']} does not match its JSON Schema at {where}: {errors[0].message}")


class NonFiniteReportValue(UserWarning):
    """A NaN or ±inf reached a report and was written as null (a bug where it came from; tests make it an error)."""


def finite_or_null(obj: Any) -> Any:
    """`obj` with every float that is not finite replaced by None (dicts, lists and tuples walked).

    The one sanitising step every report passes on its way to JSON, so that a report is strict JSON
    by construction; each value replaced is named in one NonFiniteReportValue warning.
    """
    found: list[str] = []

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, dict):
            return {k: walk(v, f"{path}/{k}") for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(x)]
        if isinstance(x, float) and not math.isfinite(x):
            found.append(f"{path or '/'} = {x}")
            return None
        return x

    clean = walk(obj, "")
    if found:
        import warnings

        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        warnings.warn(f"non-finite report value(s) written as null: {', '.join(found[:3])}{more}",
                      NonFiniteReportValue, stacklevel=2)
    return clean


def report_json(report: dict) -> str:
    """The report as written to disk: indented, finite-or-null (finite_or_null), strict JSON."""
    return json.dumps(finite_or_null(report), indent=2, allow_nan=False) + "\n"


def write_report(report: dict, path: str, *, overwrite: bool) -> None:
    """Write `report` as JSON to `path` atomically (outputs.write_file: a drpo JSON report); "-" is stdout."""
    import sys

    from drpo_cli.base.outputs import write_file

    text = report_json(report)
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    write_file(path, text, "json", overwrite=overwrite)


def fmt(x: Any) -> str:
    """Compact human formatting of report values."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.4g}" if x == 0 or 1e-3 <= abs(x) < 1e6 else f"{x:.3e}"
    return str(x)


def fmt_cell(x: Any) -> str:
    """A table cell: 3 significant digits and a short exponent ("6.31e-8"), so columns stay narrow."""
    if isinstance(x, float) and not isinstance(x, bool) and math.isfinite(x) and x != 0:
        if 1e-3 <= abs(x) < 1e5:
            short = f"{x:.3g}"
            return f"{x:,.0f}" if "e" in short else short  # 12345.6 -> "12,346", not "1.23e+04"
        mantissa, exponent = f"{x:.2e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return fmt(x)


def number_table(title: str, first: str, columns: list[str], rows: list[list[str]], **kw: Any) -> Any:
    """A rich table whose numbers are never elided: the first (key) column and the headers wrap instead.

    Number columns have a fixed width, that of their widest cell or header word; headers wrap at
    spaces (`_` shown as a space); the key column is the only flexible one and folds, so on a narrow
    terminal the labels give way, never the values.
    """
    from rich.table import Table
    from rich.text import Text

    # Every title, header and cell is Text: values from the data (sample ids, column values) print as they
    # are, never as console markup.
    table = Table(title=Text(title), title_justify="left", **kw)
    table.add_column(Text(first.replace("_", " ")), overflow="fold")
    for j, c in enumerate(columns):
        header = c.replace("_", " ")
        width = max([len(r[j + 1]) for r in rows] + [len(w) for w in header.split()])
        table.add_column(Text(header), justify="right", width=width, overflow="fold")
    for r in rows:
        table.add_row(*(Text(str(cell)) for cell in r))
    return table


def histogram_lines(labels: list[str], counts: list[float], *, width: int = 40, unit: str = "") -> list[str]:
    """Horizontal terminal histogram, one line per bin: `label │█████▍ count (share)`."""
    total = sum(counts) or 1
    peak = max(counts, default=0) or 1
    pad = max((len(s) for s in labels), default=0)
    eighths = " ▏▎▍▌▋▊▉"
    lines = []
    for label, c in zip(labels, counts):
        cells = c / peak * width
        bar = "█" * int(cells) + eighths[int((cells % 1) * 8)].strip()
        share = f" ({c / total:.1%})" if not unit else f" {unit}"
        lines.append(f"{label:>{pad}} │{bar:<{width + 1}} {fmt(c)}{share}")
    return lines


# JSON Schema building blocks shared by both reports.
_NUM: dict = {"type": ["number", "null"]}
_INT: dict = {"type": "integer", "minimum": 0}
_STR: dict = {"type": "string"}


# ---- drpo train report --------------------------------------------------------------------------
# `OUT/drpo_report.json` of `drpo train`; schemas/train-report.schema.json is this dict, kept equal
# by a test.

TRAIN_REPORT_VERSION = 1
# The metrics every step and the closing audit carry (SPEC.md §2); loss-specific fractions
# (clip/mask/weight) come on top under their own namespaced names.
TRAIN_METRICS = ("tr/outside_frac", "tr/harmful_frac", "delta/abs_mean", "delta/abs_max", "ratio/max", "kl/k3_mean")

_TRAIN_METRICS = {
    "type": "object",
    "required": list(TRAIN_METRICS),
    "additionalProperties": _NUM,
    "propertyNames": {"pattern": "^[a-z0-9_]+/[a-z0-9_.]+$"},
}
STALENESS_FILTER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Rows and tokens --max-lag / --min-version left out (rows without a policy_version are kept; "
                   "with token_policy_versions, too-stale tokens leave the loss mask and a row with no trained "
                   "token left drops).",
    "required": ["max_lag", "min_version", "current_version", "rows_dropped", "tokens_dropped", "tokens_masked",
                 "rows_kept", "rows_without_version"],
    "additionalProperties": False,
    "properties": {
        "max_lag": {"type": ["integer", "null"], "minimum": 0},
        "min_version": {"type": ["integer", "null"], "minimum": 0},
        "current_version": {"type": ["integer", "null"]},
        "rows_dropped": _INT,
        "tokens_dropped": {"type": "integer", "minimum": 0,
                           "description": "trained tokens (loss_mask 1) of the dropped rows"},
        "tokens_masked": {"type": "integer", "minimum": 0,
                          "description": "too-stale trained tokens of kept rows, taken out of the loss mask"},
        "rows_kept": _INT,
        "rows_without_version": _INT,
    },
}
TRUNCATION_SCHEMA: dict[str, Any] = {"oneOf": [{"type": "null"}, {
    "type": "object",
    "description": "--truncate: rows longer than the model's context cut to their first max_positions − prompt + 1 "
                   "response tokens (null without --truncate; without it such a row is refused).",
    "required": ["max_positions", "rows_truncated", "rows_dropped", "tokens_dropped", "trained_tokens_dropped"],
    "additionalProperties": False,
    "properties": {
        "max_positions": {"type": "integer", "minimum": 1},
        "rows_truncated": {"type": "integer", "minimum": 0, "description": "rows that kept some response tokens"},
        "rows_dropped": {"type": "integer", "minimum": 0, "description": "rows whose prompt alone is longer"},
        "tokens_dropped": {"type": "integer", "minimum": 0, "description": "response tokens left out"},
        "trained_tokens_dropped": {"type": "integer", "minimum": 0, "description": "of them, with loss_mask 1"},
    }}]}

def _removed_rows_schema(description: str) -> dict:
    """A train report's `filters.rejection` / `filters.veto`: what --reject or --is-veto removed (null: off)."""
    return {"oneOf": [{"type": "null"}, {
        "type": "object", "description": description,
        "required": ["criteria", "tokens_rejected", "token_frac", "sequences_rejected", "seq_frac"],
        "additionalProperties": False,
        "properties": {"criteria": {"type": "array", "items": _STR}, "tokens_rejected": _INT,
                       "token_frac": _NUM, "sequences_rejected": _INT, "seq_frac": _NUM}}]}

TRAIN_REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://github.com/drpo/drpo/schemas/train-report.schema.json",
    "title": "drpo train report",
    "description": "OUT/drpo_report.json written by `drpo train` (SPEC.md §2, §4). Non-finite numbers are null.",
    "type": "object",
    "required": ["report", "report_version", "drpo_version", "config", "input", "output", "loss", "filters",
                 "notes", "steps", "skipped_steps", "final", "seconds"],
    "additionalProperties": False,
    "properties": {
        "report": {"const": "drpo-train"},
        "report_version": {"const": TRAIN_REPORT_VERSION},
        "drpo_version": _STR,
        "config": {"type": "object", "description": "Every TrainConfig field, as run."},
        "input": {
            "type": "object",
            "required": ["model", "policy_version", "rollouts", "rows", "tokens", "trained_tokens", "vocab_size"],
            "additionalProperties": False,
            "properties": {
                "model": _STR,
                "policy_version": {"type": ["integer", "null"], "minimum": 0},
                "rollouts": {"type": "array", "items": _STR},
                "rows": _INT,
                "tokens": {"type": "integer", "minimum": 0, "description": "response tokens"},
                "trained_tokens": {"type": "integer", "minimum": 0, "description": "response tokens with loss_mask 1"},
                "vocab_size": {"type": "integer", "minimum": 1},
                "adapter": {"type": ["string", "null"], "description": "the --adapter directory continued, if any"},
                "trainable_parameters": {"type": "integer", "minimum": 0,
                                         "description": "parameters the optimizer updates (LoRA: the adapter's)"},
            },
        },
        "output": {
            "type": "object",
            "required": ["dir", "policy_version"],
            "additionalProperties": False,
            "properties": {"dir": _STR, "policy_version": _INT},
        },
        "loss": {
            "type": "object",
            "required": ["name", "hparams", "anchor", "is_correction", "agg"],
            "additionalProperties": False,
            "properties": {
                "name": _STR,
                "hparams": {"type": "object", "additionalProperties": _NUM},
                "anchor": {"enum": list(ANCHORS)},
                "is_correction": {"enum": list(IS_CORRECTIONS)},
                "is_level": {"enum": list(IS_LEVELS)},
                "agg": _STR,
                "reference_kl": {"oneOf": [{"type": "null"}, {
                    "type": "object", "required": ["model", "coef", "estimator"], "additionalProperties": False,
                    "properties": {"model": _STR, "coef": {"type": "number", "minimum": 0},
                                   "estimator": {"enum": list(KL_ESTIMATORS)}}}]},
                "entropy_coef": {"type": "number", "minimum": 0},
                "correction": {"enum": list(CORRECTIONS), "description": "--correction as given"},
                "reject_mode": {"enum": list(REJECT_MODES)},
                "is_veto": {"type": ["number", "null"]},
                "is_batch_norm": {"type": "boolean"},
            },
        },
        "filters": {
            "type": "object",
            "required": ["staleness", "rejection"],
            "additionalProperties": False,
            "properties": {"staleness": STALENESS_FILTER_SCHEMA, "truncation": TRUNCATION_SCHEMA,
                           "rejection": _removed_rows_schema(
                               "Tokens and sequences --reject removed from training (decided once, from π_old)."),
                           "veto": _removed_rows_schema(
                               "Sequences --is-veto dropped (a trained token with π_old/μ below it), as rejection.")},
        },
        "notes": {"type": "array", "items": _STR, "description": "Warnings worth reading."},
        "steps": {
            "type": "array",
            "description": "One entry per optimizer step; metrics are measured at the step's forward pass.",
            "items": {
                "type": "object",
                "required": ["step", "epoch", "minibatch", "loss", "grad_norm", "lr", "tokens", "skipped",
                             "seconds", "metrics"],
                "additionalProperties": False,
                "properties": {
                    "step": _INT,
                    "epoch": _INT,
                    "minibatch": _INT,
                    "loss": _NUM,
                    "grad_norm": _NUM,
                    "lr": {"type": "number", "minimum": 0},
                    "tokens": _INT,
                    "skipped": {"type": "boolean", "description": "non-finite loss or gradient norm: not applied"},
                    "seconds": {"type": "number", "minimum": 0},
                    "metrics": _TRAIN_METRICS,
                },
            },
        },
        "skipped_steps": _INT,
        "diverged": {"oneOf": [{"type": "null"}, {
            "type": "object",
            "description": "The step whose update made a weight NaN or ±inf: training stopped after it (exit 1).",
            "required": ["step", "parameter"],
            "additionalProperties": False,
            "properties": {"step": _INT, "parameter": _STR}}]},
        "final": {
            "type": "object",
            "description": "Closing audit: the final weights against μ on the trained rollouts (inference mode).",
            "required": ["metrics", "change_from_first_step", "worst_samples", "mu_pi_histogram", "worst_tokens"],
            "additionalProperties": False,
            "properties": {
                "mu_pi_histogram": SCHEMA_HISTOGRAM,
                "worst_tokens": SCHEMA_WORST_TOKENS,
                "metrics": _TRAIN_METRICS,
                "change_from_first_step": {"type": "object", "additionalProperties": _NUM},
                "worst_samples": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["sample_id", "harmful_frac", "outside_frac", "delta_abs_max", "tokens"],
                        "properties": {
                            "sample_id": _STR,
                            "harmful_frac": _NUM,
                            "outside_frac": _NUM,
                            "delta_abs_max": _NUM,
                            "tokens": _INT,
                        },
                    },
                },
            },
        },
        "seconds": {"type": "number", "minimum": 0},
    },
}


def train_report_json(report: dict) -> str:
    """Validate against TRAIN_REPORT_SCHEMA (a mismatch is a bug: RuntimeError) and serialise."""
    validate_report(report, TRAIN_REPORT_SCHEMA)
    return report_json(report)


def filter_lines(staleness: dict, rejection: dict | None, truncation: dict | None = None) -> list[str]:
    """One line per active row filter (--max-lag / --min-version, --truncate, --reject) for the console."""
    lines = []
    if truncation is not None and (truncation["rows_truncated"] or truncation["rows_dropped"]):
        lines.append(f"--truncate to {truncation['max_positions']:,} positions: cut {truncation['rows_truncated']:,} "
                     f"rows, dropped {truncation['rows_dropped']:,}, {truncation['tokens_dropped']:,} response tokens "
                     f"left out ({truncation['trained_tokens_dropped']:,} trained)")
    if staleness["max_lag"] is not None or staleness["min_version"] is not None:
        given = ", ".join(f"--{k.replace('_', '-')} {staleness[k]}" for k in ("max_lag", "min_version")
                          if staleness[k] is not None)
        masked = f", masked {staleness['tokens_masked']:,} tokens of kept rows" if staleness["tokens_masked"] else ""
        lines.append(f"{given}: dropped {staleness['rows_dropped']:,} rows ({staleness['tokens_dropped']:,} trained "
                     f"tokens){masked}, kept {staleness['rows_kept']:,} (current version "
                     f"{staleness['current_version']})")
    if rejection is not None:
        lines.append(f"--reject {' '.join(rejection['criteria'])}: rejected {rejection['tokens_rejected']:,} tokens "
                     f"({fmt(rejection['token_frac'])}) and {rejection['sequences_rejected']:,} sequences "
                     f"({fmt(rejection['seq_frac'])})")
    return lines


def print_train_summary(report: dict, console, *, max_steps: int = 4) -> None:
    """One table, metrics × steps (first and last steps when there are many) + closing audit; worst samples."""
    from rich.text import Text

    steps, final = report["steps"], report["final"]
    shown = steps if len(steps) <= max_steps else steps[: max_steps // 2] + steps[-max_steps // 2 :]
    keys = [*TRAIN_METRICS, *(k for k in final["metrics"] if is_loss_metric(k, report["loss"]["name"]))]
    gap = len(shown) < len(steps)
    headers = [f"step {s['step']}" + (" skipped" if s["skipped"] else "") for s in shown]
    if gap:
        headers.insert(max_steps // 2, "⋯")

    def cells(values: list[str]) -> list[str]:
        return values[: max_steps // 2] + ["⋯"] + values[max_steps // 2 :] if gap else values

    rows = [[name, *cells([fmt_cell(s[name]) for s in shown]), "", ""] for name in ("loss", "grad_norm", "lr", "tokens")]
    rows += [[k, *cells([fmt_cell(s["metrics"].get(k)) for s in shown]), fmt_cell(final["metrics"].get(k)),
              fmt_cell(final["change_from_first_step"].get(k))] for k in keys]
    console.print(number_table(f"drpo train: {report['loss']['name']}, {len(steps)} optimizer steps", "metric",
                               [*headers, "final audit", "change"], rows))

    if final["worst_samples"]:
        cols = ("harmful_frac", "outside_frac", "delta_abs_max", "tokens")
        console.print(number_table("worst samples (harmful fraction)", "sample_id", list(cols),
                                   [[w["sample_id"], *(fmt_cell(w[c]) for c in cols)] for w in final["worst_samples"]]))
    veto = report["filters"].get("veto")  # optional in the schema
    lines = filter_lines(report["filters"]["staleness"], report["filters"]["rejection"],
                         report["filters"].get("truncation"))  # optional in the schema
    if veto is not None:
        lines.append(f"--is-veto {veto['criteria'][0].removeprefix('rho<')}: dropped {veto['sequences_rejected']:,} "
                     f"sequences ({fmt(veto['seq_frac'])}), {veto['tokens_rejected']:,} tokens")
    for line in lines:
        console.print(line, highlight=False, markup=False)
    for note in report["notes"]:
        console.print(Text(f"note: {note}"))
    if report["skipped_steps"]:
        console.print(Text(f"{report['skipped_steps']} step(s) skipped: non-finite loss or gradient norm", style="yellow"))
    if report.get("diverged"):  # absent from the reports of older versions
        console.print(Text(f"diverged: the update of step {report['diverged']['step']} made "
                           f"{report['diverged']['parameter']} non-finite; training stopped there", style="red"),
                      highlight=False)


def is_loss_metric(key: str, loss: str) -> bool:
    """What the loss in use does to the tokens (`ppo_clip/clip_frac`, `weight/drpo_corrective_frac`, ...) and
    the reference KL (`kl/ref_*`, with --ref-model)."""
    ns = loss.replace("-", "_")
    return key.startswith((f"{ns}/", "kl/ref_", "opsm/", "m2po/")) or (key.startswith(f"weight/{ns}_") and key.endswith("_frac"))


# ---- drpo inspect report ------------------------------------------------------------------------
# `drpo inspect --json`; schemas/inspect-report.schema.json is INSPECT_REPORT_SCHEMA, kept equal by a
# test. Stable metric names (all over response tokens with loss_mask 1) are documented in the
# docs/inspect.md; gates (`--fail-above`) accept exactly these names (objectives/metrics.py lists them).

# The model metrics shown in the console table (every metric is in the JSON report).
INSPECT_HEADLINE = ("tr/outside_frac", "tr/harmful_frac", "delta/abs_mean", "delta/abs_p99", "delta/abs_max",
                    "ratio/min", "ratio/max", "logr/mean", "kl/k1_mean", "kl/k3_mean", "kl/binary_mean",
                    "entropy/mean", "ppo_clip/clip_frac", "dppo_tv/mask_frac", "weight/drpo_corrective_frac",
                    "weight/drpo_attenuated_frac", "moe/routing_mismatch_frac")
# The --against comparisons' rows on the console and the page (every metric is in the JSON report).
AGAINST_SHOWN = ("kl/k1_mean", "kl/k3_mean", "kl/reverse_mean", "delta/abs_mean", "delta/abs_max", "logr/abs_max",
                 "tr/outside_frac", "chi2/token", "is/ess_seq", "ppl/log_diff_mean", "ppo_clip/clip_frac",
                 "dppo_tv/mask_frac", "dppo_kl/mask_frac", "gspo/seq_clip_frac", "cispo/clip_frac",
                 "weight/drpo_corrective_frac", "opsm/token_drop_frac", "m2po/masked_frac",
                 "is/catastrophic_seq_frac")
# The other trainers' dashboard metrics, in their own console table and page section.
PEER_METRICS = ("is/ess_token", "is/ess_seq", "chi2/token", "chi2/seq", "kl/k1_mean", "kl/k3_mean", "kl/reverse_mean",
                "kl/reverse_k3_mean", "kl/js_mean", "kl/k3_over_entropy", "prob/pearson", "prob/mult_error_mean",
                "delta/abs_mean", "delta/abs_std", "delta/abs_max", "logr/abs_mean", "logr/abs_max",
                "ppl/log_diff_mean", "ppl/log_abs_diff_mean", "ppl/log_diff_max", "ppl/log_diff_min", "ppl/ratio_mean",
                "ppl/policy_mean", "ppl/behavior_mean", "is/catastrophic_token_frac", "is/catastrophic_seq_frac")


def evaluate_gates(metrics: dict, gates: list[tuple[str, float]]) -> list[dict]:
    """One record per gate; a gate fails when its metric exceeds the threshold or is unavailable (null)."""
    out = []
    for name, threshold in gates:
        value = metrics.get(name)
        out.append({"metric": name, "threshold": threshold, "value": value,
                    "passed": value is not None and value <= threshold})
    return out


_STATS: dict = {  # count / mean / min / max (+ quantiles) of a column
    "type": "object",
    "required": ["count", "mean", "min", "max"],
    "properties": {"count": _INT},
    "additionalProperties": _NUM,
}


def _records_schema(key: dict, required: list[str], **props: dict) -> dict:
    """Array of flat objects of numbers (a breakdown table) with some typed, required fields."""
    return {"type": "array", "items": {"type": "object", "required": required, "properties": {"key": key, **props},
                                       "additionalProperties": _NUM}}


def _object_schema(props: dict, extra: dict | bool = False) -> dict:
    return {"type": "object", "required": list(props), "properties": props, "additionalProperties": extra}


_BY_VALUE: dict = {"type": ["string", "integer", "null"]}
_DATA_SECTION = _object_schema({
    "rows": _INT,
    "response_tokens": _INT,
    "masked_tokens": _INT,
    "prompt_tokens": _INT,
    "response_length": _STATS,
    "prompt_length": _STATS,
    "behavior": _object_schema({"neg_logmu_mean": _NUM, "rare_frac": _NUM, "rare_threshold": {"type": "number"}}),
    "advantage": _object_schema({
        "source": {"enum": ["advantages", "advantage", "reward+group_id", "mixed"]},
        "stats": _STATS,
        "zero_frac": _NUM,
        "zero_rows": _INT,
    }),
    "reward": {"oneOf": [{"type": "null"}, _STATS]},
    "lag": _object_schema({
        "current_version": {"type": ["integer", "null"]},
        "version_source": {"enum": ["--current-version", "checkpoint", "data-max", "unknown"]},
        "rows_without_version": _INT,
        "histogram": {"type": "array", "items": _object_schema({"lag": {"type": "integer"}, "rows": _INT,
                                                            "tokens": _INT})},
    }),
    "duplicate_sample_ids": _object_schema({"rows": _INT, "ids": _INT, "examples": {"type": "array", "items": _STR}}),
    "token_id_max": {"type": ["integer", "null"]},
    "temperatures": {"type": "array", "items": _object_schema({"temperature": _NUM, "rows": _INT})},
    "staleness_filter": STALENESS_FILTER_SCHEMA,
    "by": {"type": "object", "description": "--by COLUMN: the data audit per value of the column (sorted, null last).",
           "additionalProperties": {"type": "array", "items": {
               "type": "object", "required": ["value", "rows", "tokens"], "additionalProperties": _NUM,
               "properties": {"value": _BY_VALUE, "rows": _INT, "tokens": _INT}}}},
    "truncation": TRUNCATION_SCHEMA,
})
_LOGGING_CHECKS = _object_schema({
    "scope": _STR,
    "rows": _INT,
    "tokens": _INT,
    "fit_tokens": _INT,
    "logr_mean": _NUM,
    "logr_sem": _NUM,
    "offset_suspected": {"type": "boolean"},
    "logged_temperature": _NUM,
    "temperature_fit": {"type": "array", "items": _object_schema({"temperature": {"type": "number"},
                                                             "abs_logr_mean": _NUM, "logr_mean": _NUM})},
    "best_temperature": _NUM,
    "temperature_suspected": {"type": "boolean"},
    "findings": {"type": "array", "items": _STR},
})
_ROUTING = _object_schema({  # mixture of experts with a routed_experts column (moe.py)
    "architecture": _STR, "layers": _INT, "top_k": _INT, "num_experts": _INT, "replayed": {"type": "boolean"},
    "positions": _INT, "unlogged_positions": _INT, "mismatch_frac": _NUM,
    "by_layer": {"type": "array", "items": _object_schema({"layer": _INT, "mismatch_frac": _NUM})},
})
_MODEL_SECTION = _object_schema({
    "checkpoint": _object_schema({"path": _STR, "policy_version": {"type": ["integer", "null"]},
                             "vocab_size": _INT}),
    "device": _STR,
    "dtype": _STR,
    "tokens": _INT,
    "micro_batches": _INT,
    "padding_frac": _NUM,
    "seconds": _NUM,
    "distributions": {"type": "object", "additionalProperties": {"type": "object", "additionalProperties": _NUM}},
    "by_lag": _records_schema(_STR, ["key", "tokens"], tokens=_INT),
    "by_mu_bucket": _records_schema(_STR, ["key", "tokens"], tokens=_INT),
    "by_position": _records_schema(_STR, ["key", "tokens"], tokens=_INT),
    "by": {"type": "object", "description": "--by COLUMN: the by-lag breakdown's metrics per value of the column.",
           "additionalProperties": {"type": "array", "items": {
               "type": "object", "required": ["value", "tokens"], "additionalProperties": _NUM,
               "properties": {"value": _BY_VALUE, "tokens": _INT}}}},
    "worst_by": {"enum": list(WORST_BY), "description": "the metric the worst sequences are ranked by"},
    "losses": {"type": "array", "items": _object_schema({
        "loss": _STR,
        "hparams": {"type": "object", "additionalProperties": _NUM},
        "fractions": {"type": "object", "additionalProperties": _NUM},
    })},
    "drpo_what_if": _records_schema({"type": "number", "exclusiveMinimum": 0},
                               ["delta", "reachable", "corrective_frac", "attenuated_frac"],
                               delta={"type": "number", "exclusiveMinimum": 0}, reachable={"type": "boolean"}),
    "worst_sequences": _records_schema(_STR, ["sample_id", "tokens"], sample_id=_STR, tokens=_INT),
    "mu_pi_histogram": SCHEMA_HISTOGRAM,
    "worst_tokens": SCHEMA_WORST_TOKENS,
    "logging_checks": {"oneOf": [{"type": "null"}, _LOGGING_CHECKS]},
    "routing": {"oneOf": [{"type": "null"}, _ROUTING]},
})
_AGAINST_SECTION = _object_schema({
    "files": {"type": "array", "items": _STR, "description": "--against: B, the other sampler's rollouts"},
    "rows": _INT,
    "mask_differs": {"type": "integer", "minimum": 0, "description": "tokens trained in one file, not the other"},
    "temperature_differs": {"type": "integer", "minimum": 0,
                            "description": "rows sampled at another temperature in B than in A (a note says so)"},
    "comparisons": {"type": "array", "items": _object_schema({
        "label": _STR, "pi": {"enum": ["model", "B"]}, "mu": {"enum": ["A", "B"]},
        "tokens": {"type": "integer", "minimum": 0, "description": "tokens trained in both files"},
        "metrics": {"type": "object", "additionalProperties": _NUM,
                    "description": "the inspect metrics with π and μ as named (B vs A: π = B's log-probs)"}})},
})
INSPECT_REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://github.com/drpo/drpo/schemas/inspect-report.schema.json",
    "title": "drpo inspect report",
    "description": "Written by `drpo inspect --json` (SPEC.md §2, §4); metric names are stable (docs/inspect.md). "
                   "Non-finite numbers are null.",
    "type": "object",
    "required": ["report", "report_version", "drpo_version", "mode", "inputs", "settings", "metrics", "data",
                 "model", "against", "notes", "gates"],
    "additionalProperties": False,
    "properties": {
        "report": {"const": "drpo-inspect"},
        "report_version": {"const": 1},
        "drpo_version": _STR,
        "mode": {"enum": ["data", "model"]},
        "inputs": _object_schema({"rollouts": {"type": "array", "items": _STR, "minItems": 1},
                             "model": {"type": ["string", "null"]},
                             "columns": {"type": "object", "additionalProperties": _STR}}),
        "settings": {"type": "object", "description": "Every InspectConfig field that shaped the report."},
        "metrics": {"type": "object", "required": list(INSPECT_DATA_METRICS), "additionalProperties": _NUM,
                    "propertyNames": {"pattern": "^[a-z0-9_]+/[a-z0-9_.@]+$"}},
        "data": _DATA_SECTION,
        "model": {"oneOf": [{"type": "null"}, _MODEL_SECTION]},
        "against": {"oneOf": [{"type": "null"}, _AGAINST_SECTION]},
        "notes": {"type": "array", "items": _STR, "description": "Plain-language observations worth reading."},
        "gates": {"type": "array", "items": _object_schema({"metric": _STR, "threshold": {"type": "number"},
                                                        "value": _NUM, "passed": {"type": "boolean"}})},
    },
    "if": {"properties": {"mode": {"const": "model"}}},
    "then": {"properties": {"model": {"type": "object"},
                            "metrics": {"required": list(INSPECT_DATA_METRICS) + list(INSPECT_MODEL_METRICS)}}},
    "else": {"properties": {"model": {"type": "null"}}},
}


def render_inspect(report: dict, console: Any) -> None:
    """Human view of an inspect report: rich tables and terminal histograms (every value as Text: no markup)."""
    from rich.table import Table
    from rich.text import Text

    data, model = report["data"], report["model"]
    rl, pl, adv = data["response_length"], data["prompt_length"], data["advantage"]
    table = Table(title=Text(f"drpo inspect: {fmt(data['rows'])} rows"), show_header=False, title_justify="left")
    rows = [
        ("response tokens (loss_mask 1)", f"{fmt(data['response_tokens'])} ({fmt(data['masked_tokens'])})"),
        ("prompt tokens", fmt(data["prompt_tokens"])),
        ("response length mean / p50 / p90 / max", " / ".join(fmt(rl.get(k)) for k in ("mean", "p50", "p90", "max"))),
        ("prompt length mean / max", f"{fmt(pl['mean'])} / {fmt(pl['max'])}"),
        ("rare sampled tokens (μ ≤ 0.01)", fmt(data["behavior"]["rare_frac"])),
        ("mean −log μ", fmt(data["behavior"]["neg_logmu_mean"])),
        (f"advantage ({adv['source']}) mean / std / min / max",
         " / ".join(fmt(adv["stats"].get(k)) for k in ("mean", "std", "min", "max"))),
        ("zero-advantage token share (rows)", f"{fmt(adv['zero_frac'])} ({fmt(adv['zero_rows'])})"),
        ("duplicate sample ids (extra rows)",
         f"{fmt(data['duplicate_sample_ids']['ids'])} ({fmt(data['duplicate_sample_ids']['rows'])})"),
        ("largest token id", fmt(data["token_id_max"])),
        ("temperatures", ", ".join(f"{fmt(t['temperature'])} ({fmt(t['rows'])} rows)" for t in data["temperatures"])),
    ]
    if data["reward"] is not None:
        rows.append(("reward mean / std / min / max",
                     " / ".join(fmt(data["reward"].get(k)) for k in ("mean", "std", "min", "max"))))
    for label, value in rows:
        table.add_row(Text(label), Text(value))
    console.print(table)

    lag = data["lag"]
    if lag["histogram"]:
        console.print(Text.assemble(("Staleness lag", "bold"), f" (tokens; current version {lag['current_version']} "
                                    f"from {lag['version_source']})"))
        for line in histogram_lines([f"lag {h['lag']}" for h in lag["histogram"]],
                                    [h["tokens"] for h in lag["histogram"]]):
            console.print(line, highlight=False, markup=False)
    for line in filter_lines(data["staleness_filter"], None, data["truncation"]):
        console.print(line, highlight=False, markup=False)
    for name, records in data["by"].items():
        for table in by_tables(f"Data by {name}", records):
            console.print(table)
    if model is not None:
        _render_inspect_model(model, report["metrics"], console)
        if report["settings"]["reject"]:
            console.print(f"--reject {' '.join(report['settings']['reject'])} would reject "
                          f"{fmt(report['metrics']['reject/token_frac'])} of the tokens and "
                          f"{fmt(report['metrics']['reject/seq_frac'])} of the sequences"
                          f"{_positive_share(report['metrics']['reject/dropped_pos_adv_frac'])}", highlight=False,
                          markup=False)
        settings, m = report["settings"], report["metrics"]
        if settings["correction"] != "none":
            console.print(f"--correction {settings['correction']} would mask {fmt(m['reject/seq_frac'])} of the "
                          "sequences", highlight=False, markup=False)
        if settings["is_veto"] is not None:
            console.print(f"--is-veto {settings['is_veto']:g} would drop {fmt(m['veto/seq_frac'])} of the sequences "
                          f"({fmt(m['veto/token_frac'])} of the tokens below it)"
                          f"{_positive_share(m['veto/dropped_pos_adv_frac'])}", highlight=False, markup=False)
        if settings["is_batch_norm"]:
            console.print(f"--is-batch-norm would divide the weights by {fmt(m['is/batch_norm_factor'])}",
                          highlight=False, markup=False)
    against = report["against"]
    if against is not None:
        comps = against["comparisons"]
        console.print(f"Two samplers on the same tokens: A = {', '.join(report['inputs']['rollouts'])}, "
                      f"B = {', '.join(against['files'])}; {fmt(against['rows'])} rows matched by sample_id, "
                      f"{fmt(against['mask_differs'])} tokens trained in one file only left out; every metric of "
                      "each pair is in the JSON report", highlight=False, markup=False)
        console.print(number_table("Each pair as π vs μ, r = π/μ", "metric",
                                   [c["label"] for c in comps],
                                   [["tokens", *(fmt_cell(c["tokens"]) for c in comps)]]
                                   + [[name, *(fmt_cell(c["metrics"].get(name)) for c in comps)]
                                      for name in AGAINST_SHOWN]))
    for note in report["notes"]:
        console.print(Text.assemble(("note:", "yellow"), f" {note}"), highlight=False)
    for gate in report["gates"]:
        verdict = ("pass", "green") if gate["passed"] else ("FAIL", "red")
        console.print(Text.assemble(f"gate {gate['metric']} = {fmt(gate['value'])} (limit {fmt(gate['threshold'])}): ",
                                    verdict))


def _positive_share(frac: float | None) -> str:
    """What a rejection drops that had A > 0, as a clause (empty when it drops nothing)."""
    return "" if frac is None else f"; {fmt(frac)} of the tokens it drops have A > 0"


def _render_inspect_model(model: dict, metrics: dict, console: Any) -> None:
    from rich.table import Table
    from rich.text import Text

    console.print(number_table(f"Current model vs sampler: {fmt(model['tokens'])} tokens, lag from version "
                               f"{model['checkpoint']['policy_version']}", "metric", ["value"],
                               [[name, fmt_cell(metrics.get(name))] for name in INSPECT_HEADLINE]))
    if model["distributions"]:
        keys = ["mean", "p50", "p90", "p99", "p99.9", "max"]
        console.print(number_table("Distributions over tokens", "quantity", keys,
                                   [[name, *(fmt_cell(q.get(k)) for k in keys)]
                                    for name, q in model["distributions"].items()]))
    what_if = [{k: w.get(k) for k in ("delta", "reachable", "corrective_frac", "attenuated_frac", "min", "max")}
               for w in model["drpo_what_if"]]
    console.print(number_table("Mismatch as other trainers report it (docs/inspect.md maps their names)", "metric",
                               ["value"], [[name, fmt_cell(metrics.get(name))] for name in PEER_METRICS]))
    for title, records, first in [("By staleness lag", model["by_lag"], "key"),
                                  ("By behavior probability μ", model["by_mu_bucket"], "key"),
                                  ("By position in the response", model["by_position"], "key"),
                                  ("DRPO what-if over δ (w = 1 − sign(A)·Δ/δ)", what_if, "delta"),
                                  (f"Worst sequences by {model['worst_by']}", _worst_rows(model), "sample_id")]:
        if records:
            console.print(_records_table(title, records, first))
    for name, records in model["by"].items():
        for table in by_tables(f"Current model vs sampler by {name}", records):
            console.print(table)
    losses = Table(title=Text("What each loss would do to these tokens"), title_justify="left")
    for col in ("loss", "hyper-parameters", "effect"):
        losses.add_column(col)
    for entry in model["losses"]:
        losses.add_row(Text(entry["loss"]), Text(", ".join(f"{k}={fmt(v)}" for k, v in entry["hparams"].items()) or "–"),
                       Text(", ".join(f"{k} {fmt(v)}" for k, v in entry["fractions"].items()) or "–"))
    console.print(losses)
    checks = model["logging_checks"]
    if checks is not None:
        console.print(Text.assemble(("Logging checks", "bold"), f" ({checks['scope']}: {fmt(checks['rows'])} rows, "
                                    f"{fmt(checks['tokens'])} tokens; mean |log r| by temperature, shorter is a better fit)"))
        fit = checks["temperature_fit"]
        for line in histogram_lines([f"T={f['temperature']:g}" for f in fit],
                                    [f["abs_logr_mean"] or 0.0 for f in fit], width=30, unit="nats"):
            console.print("  " + line, highlight=False, markup=False)
        for finding in checks["findings"]:
            console.print(Text(f"  • {finding}"), highlight=False)
    routing = model["routing"]
    if routing is not None:
        console.print(Text.assemble(
            ("MoE routing", "bold"), f" ({routing['architecture']}, {routing['layers']} MoE layers, top-"
            f"{routing['top_k']} of {routing['num_experts']}{', replayed' if routing['replayed'] else ''}): "
            f"the router's own top-k set differs from the logged one at {fmt(routing['mismatch_frac'])} of "
            f"{fmt(routing['positions'])} trained positions × layers"))
        for line in histogram_lines([f"layer {r['layer']}" for r in routing["by_layer"]],
                                    [r["mismatch_frac"] or 0.0 for r in routing["by_layer"]], width=30, unit="share"):
            console.print("  " + line, highlight=False, markup=False)


WORST_SHOWN = ("sample_id", "tokens", "score", "harmful_frac", "outside_frac", "delta_abs_max", "k3_mean", "lag")
# --worst-by metrics whose per-sequence value is one of WORST_SHOWN's columns already (no score column then).
_WORST_COLUMN = {"tr/harmful_frac": "harmful_frac", "tr/outside_frac": "outside_frac",
                 "delta/abs_max": "delta_abs_max", "kl/k3_mean": "k3_mean"}


def _worst_rows(model: dict) -> list[dict]:
    """The worst sequences' console rows: the score under its metric's name, unless a column shows it already."""
    by = model["worst_by"]
    return [{(by if k == "score" else k): w.get(k) for k in WORST_SHOWN if not (k == "score" and by in _WORST_COLUMN)}
            for w in model["worst_sequences"]]
BY_SHOWN = 25  # values of a --by column shown on the console (the JSON report and the page have every value)


def by_tables(title: str, records: list[dict]) -> list:
    """A --by breakdown's console table: the BY_SHOWN values with the most tokens, in value order."""
    if not records:
        return []
    shown = sorted(sorted(records, key=lambda r: -r["tokens"])[:BY_SHOWN], key=records.index)
    more = f" ({len(records) - len(shown)} more values in the JSON report)" if len(shown) < len(records) else ""
    rows = [{"value": "null" if r["value"] is None else str(r["value"]), **{k: v for k, v in r.items() if k != "value"}}
            for r in shown]
    return [_records_table(title + more, rows, "value")]


def _records_table(title: str, records: list[dict], first: str) -> Any:
    columns = [k for k in records[0] if k != first]
    return number_table(title, first, columns, [[fmt(r.get(first)), *(fmt_cell(r.get(c)) for c in columns)]
                                                for r in records])
