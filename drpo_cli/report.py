"""Report dicts -> JSON (validated against the schemas in schemas/) and rich tables.

Metric names are the SPEC.md §2 names (`tr/outside_frac`, `kl/k3_mean`, ...), the same in the
console tables, the JSON reports and the docs.
"""

from __future__ import annotations

import json
import math
from typing import Any

# ==== drpo train report ==========================================================================
# `OUT/drpo_report.json` of `drpo train`; schemas/train-report.schema.json is this dict, kept equal
# by a test.

TRAIN_REPORT_VERSION = 1
# The metrics every step and the closing audit carry (SPEC.md §2); loss-specific fractions
# (clip/mask/weight) come on top under their own namespaced names.
TRAIN_METRICS = ("tr/outside_frac", "tr/harmful_frac", "delta/abs_mean", "delta/abs_max", "ratio/max", "kl/k3_mean")

_NUM = {"type": ["number", "null"]}
_METRICS = {
    "type": "object",
    "required": list(TRAIN_METRICS),
    "additionalProperties": _NUM,
    "propertyNames": {"pattern": "^[a-z0-9_]+/[a-z0-9_.]+$"},
}
TRAIN_REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://github.com/drpo/drpo/schemas/train-report.schema.json",
    "title": "drpo train report",
    "description": "OUT/drpo_report.json written by `drpo train` (SPEC.md §2, §4). Non-finite numbers are null.",
    "type": "object",
    "required": ["report", "report_version", "drpo_version", "config", "input", "output", "loss", "notes",
                 "steps", "skipped_steps", "final", "seconds"],
    "additionalProperties": False,
    "properties": {
        "report": {"const": "drpo-train"},
        "report_version": {"const": TRAIN_REPORT_VERSION},
        "drpo_version": {"type": "string"},
        "config": {"type": "object", "description": "Every TrainConfig field, as run."},
        "input": {
            "type": "object",
            "required": ["model", "policy_version", "rollouts", "rows", "tokens", "trained_tokens", "vocab_size"],
            "additionalProperties": False,
            "properties": {
                "model": {"type": "string"},
                "policy_version": {"type": ["integer", "null"], "minimum": 0},
                "rollouts": {"type": "array", "items": {"type": "string"}},
                "rows": {"type": "integer", "minimum": 0},
                "tokens": {"type": "integer", "minimum": 0, "description": "response tokens"},
                "trained_tokens": {"type": "integer", "minimum": 0, "description": "response tokens with loss_mask 1"},
                "vocab_size": {"type": "integer", "minimum": 1},
            },
        },
        "output": {
            "type": "object",
            "required": ["dir", "policy_version"],
            "additionalProperties": False,
            "properties": {"dir": {"type": "string"}, "policy_version": {"type": "integer", "minimum": 0}},
        },
        "loss": {
            "type": "object",
            "required": ["name", "hparams", "anchor", "is_correction", "agg"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string"},
                "hparams": {"type": "object", "additionalProperties": _NUM},
                "anchor": {"enum": ["behavior", "proximal"]},
                "is_correction": {"enum": ["none", "tis", "mis"]},
                "agg": {"type": "string"},
            },
        },
        "notes": {"type": "array", "items": {"type": "string"}, "description": "Warnings worth reading."},
        "steps": {
            "type": "array",
            "description": "One entry per optimizer step; metrics are measured at the step's forward pass.",
            "items": {
                "type": "object",
                "required": ["step", "epoch", "minibatch", "loss", "grad_norm", "lr", "tokens", "skipped",
                             "seconds", "metrics"],
                "additionalProperties": False,
                "properties": {
                    "step": {"type": "integer", "minimum": 0},
                    "epoch": {"type": "integer", "minimum": 0},
                    "minibatch": {"type": "integer", "minimum": 0},
                    "loss": _NUM,
                    "grad_norm": _NUM,
                    "lr": {"type": "number", "minimum": 0},
                    "tokens": {"type": "integer", "minimum": 0},
                    "skipped": {"type": "boolean", "description": "non-finite loss or gradient norm: not applied"},
                    "seconds": {"type": "number", "minimum": 0},
                    "metrics": _METRICS,
                },
            },
        },
        "skipped_steps": {"type": "integer", "minimum": 0},
        "final": {
            "type": "object",
            "description": "Closing audit: the final weights against μ on the trained rollouts (inference mode).",
            "required": ["metrics", "change_from_first_step", "worst_samples"],
            "additionalProperties": False,
            "properties": {
                "metrics": _METRICS,
                "change_from_first_step": {"type": "object", "additionalProperties": _NUM},
                "worst_samples": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["sample_id", "harmful_frac", "outside_frac", "delta_abs_max", "tokens"],
                        "properties": {
                            "sample_id": {"type": "string"},
                            "harmful_frac": _NUM,
                            "outside_frac": _NUM,
                            "delta_abs_max": _NUM,
                            "tokens": {"type": "integer", "minimum": 0},
                        },
                    },
                },
            },
        },
        "seconds": {"type": "number", "minimum": 0},
    },
}


def finite_or_none(x: float | None) -> float | None:
    """JSON has no NaN/inf: non-finite numbers are reported as null."""
    return None if x is None or not math.isfinite(x) else float(x)


def train_report_json(report: dict) -> str:
    """Validate against TRAIN_REPORT_SCHEMA and serialise; a mismatch is a bug, raised as ValueError."""
    import jsonschema

    try:
        jsonschema.validate(report, TRAIN_REPORT_SCHEMA)
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path)
        raise ValueError(f"train report does not match its schema at {where or '/'}: {err.message}") from None
    return json.dumps(report, indent=2, allow_nan=False) + "\n"


def print_train_summary(report: dict, console, *, max_steps: int = 4) -> None:
    """One table, metrics × steps (first and last steps when there are many) + closing audit; worst samples."""
    from rich.table import Table

    steps, final = report["steps"], report["final"]
    shown = steps if len(steps) <= max_steps else steps[: max_steps // 2] + steps[-max_steps // 2 :]
    keys = [*TRAIN_METRICS, *(k for k in final["metrics"] if _is_loss_metric(k, report["loss"]["name"]))]
    table = Table(title=f"drpo train: {report['loss']['name']}, {len(steps)} optimizer steps", title_justify="left")
    table.add_column("metric", no_wrap=True, min_width=max(len(k) for k in keys))
    for i, s in enumerate(shown):
        if len(shown) < len(steps) and i == max_steps // 2:
            table.add_column("…")
        table.add_column(f"step {s['step']}" + (" skipped" if s["skipped"] else ""), justify="right")
    table.add_column("final audit", justify="right")
    table.add_column("change", justify="right")
    gap = [""] if len(shown) < len(steps) else []

    def cells(values: list[str]) -> list[str]:
        return values[: max_steps // 2] + gap + values[max_steps // 2 :] if gap else values

    for name in ("loss", "grad_norm", "lr", "tokens"):
        table.add_row(name, *cells([_fmt(s[name]) for s in shown]), "", "")
    for k in keys:
        table.add_row(k, *cells([_fmt(s["metrics"].get(k)) for s in shown]), _fmt(final["metrics"].get(k)),
                      _fmt(final["change_from_first_step"].get(k)))
    console.print(table)

    if final["worst_samples"]:
        worst = Table(title="worst samples (harmful fraction)", title_justify="left")
        for col in ("sample_id", "harmful_frac", "outside_frac", "delta_abs_max", "tokens"):
            worst.add_column(col, justify="right" if col != "sample_id" else "left")
        for w in final["worst_samples"]:
            worst.add_row(w["sample_id"], _fmt(w["harmful_frac"]), _fmt(w["outside_frac"]),
                          _fmt(w["delta_abs_max"]), str(w["tokens"]))
        console.print(worst)
    for note in report["notes"]:
        console.print(f"note: {note}")
    if report["skipped_steps"]:
        console.print(f"[yellow]{report['skipped_steps']} step(s) skipped: non-finite loss or gradient norm[/]")


def _is_loss_metric(key: str, loss: str) -> bool:
    """What the loss in use does to the tokens: `ppo_clip/clip_frac`, `weight/drpo_corrective_frac`, ..."""
    ns = loss.replace("-", "_")
    return key.startswith(f"{ns}/") or (key.startswith(f"weight/{ns}_") and key.endswith("_frac"))


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.4g}"


# ==== end of drpo train report ===================================================================


# ==== drpo inspect report ========================================================================
# `drpo inspect --json`; schemas/inspect-report.schema.json is INSPECT_REPORT_SCHEMA, kept equal by a
# test. Stable metric names (all over response tokens with loss_mask 1) are documented in the
# README's "Auditing rollouts" section; gates (`--fail-above`) accept exactly these names.

INSPECT_DATA_METRICS: dict[str, str] = {
    "data/rows": "rollout rows",
    "data/tokens": "response tokens with loss_mask 1",
    "data/response_tokens": "all response tokens",
    "data/zero_adv_frac": "share of tokens whose advantage is exactly 0 (no gradient)",
    "data/rare_token_frac": "share of tokens the sampler drew with μ ≤ 0.01",
    "data/neg_logmu_mean": "mean −log μ of the sampled tokens",
    "data/adv_abs_mean": "mean |A|",
    "data/response_len_mean": "mean response length (tokens, all rows)",
    "data/response_len_max": "longest response (tokens)",
    "data/duplicate_ids": "rows whose sample_id repeats an earlier row's",
    "data/stale_frac": "share of tokens with staleness lag > 0 (0 when versions are unknown)",
    "data/lag_max": "largest staleness lag (0 when versions are unknown)",
}
INSPECT_MODEL_METRICS: dict[str, str] = {
    "tr/outside_frac": "share of tokens with |Δ| > tr_delta",
    "tr/harmful_frac": "share outside in the advantage's direction (A>0 ∧ Δ>δ or A<0 ∧ Δ<−δ)",
    "tr/outside_up_frac": "share with Δ > tr_delta",
    "tr/outside_down_frac": "share with Δ < −tr_delta",
    "delta/abs_mean": "mean |Δ| = |π − μ|",
    "delta/abs_max": "max |Δ|",
    **{f"delta/abs_{q}": f"{q} of |Δ|" for q in ("p50", "p90", "p99", "p999")},
    "ratio/mean": "mean r = π/μ (log r clamped to ±20)",
    "ratio/min": "min r",
    "ratio/max": "max r",
    **{f"ratio/{q}": f"{q} of r" for q in ("p1", "p50", "p90", "p99", "p999")},
    "logr/mean": "mean log r = log π − log μ",
    "logr/std": "standard deviation of log r",
    "logr/abs_max": "the log r of largest magnitude",
    "kl/k1_mean": "mean k1 = −log r, estimates KL(μ‖π)",
    "kl/k2_mean": "mean k2 = ½ log² r",
    "kl/k3_mean": "mean k3 = (r − 1) − log r",
    "kl/binary_mean": "mean Binary-KL D(μ‖π) of the sampled token",
    "kl/binary_max": "max Binary-KL",
    "tv/binary_mean": "mean Binary-TV |Δ| (same as delta/abs_mean)",
    "entropy/mean": "mean entropy of π over the vocabulary (at the sampling temperature)",
    "ppo_clip/clip_frac": "share ppo-clip zeroes (clipped in the harmful direction) at its defaults",
    "dppo_tv/mask_frac": "share dppo-tv masks at its default δ",
    "dppo_kl/mask_frac": "share dppo-kl masks at its default δ",
    "weight/drpo_corrective_frac": "share with DRPO weight w < 0 at the chosen δ (first --delta, else 12.5)",
    "weight/drpo_attenuated_frac": "share with DRPO weight w < 0.5 at the chosen δ",
    "weight/spo_corrective_frac": "share with SPO weight w < 0 at its default ε",
    "weight/spo_attenuated_frac": "share with SPO weight w < 0.5 at its default ε",
    **{f"weight/{loss}_{k}": f"{k} of the {loss.upper()} weight w" for loss in ("drpo", "spo")
       for k in ("mean", "min", "max", "p1", "p10", "p50", "p90", "p99")},
}


# The model metrics shown in the console table (every metric is in the JSON report).
INSPECT_HEADLINE = ("tr/outside_frac", "tr/harmful_frac", "delta/abs_mean", "delta/abs_p99", "delta/abs_max",
                    "ratio/min", "ratio/max", "logr/mean", "kl/k1_mean", "kl/k3_mean", "kl/binary_mean",
                    "entropy/mean", "ppo_clip/clip_frac", "dppo_tv/mask_frac", "weight/drpo_corrective_frac",
                    "weight/drpo_attenuated_frac")


def inspect_metric_names(with_model: bool) -> list[str]:
    return list(INSPECT_DATA_METRICS) + (list(INSPECT_MODEL_METRICS) if with_model else [])


def _short_names(name: str, candidates) -> list[str]:
    """Metrics whose name after the namespace is `name`, with or without `_frac` (`harmful`)."""
    return [m for m in candidates if name in (m.split("/", 1)[1], m.split("/", 1)[1].removesuffix("_frac"))]


def resolve_metric(name: str, with_model: bool) -> str:
    """A gate's metric name -> its stable name; unique short forms work (`harmful` -> tr/harmful_frac).

    Raises ConfigError listing the valid names for this mode.
    """
    from drpo_cli.errors import ConfigError

    valid = inspect_metric_names(with_model)
    if name in valid:
        return name
    short = _short_names(name, valid)
    if len(short) == 1:
        return short[0]
    if not with_model and (name in INSPECT_MODEL_METRICS or _short_names(name, INSPECT_MODEL_METRICS)):
        raise ConfigError(f"--fail-above {name}: needs --model (data-only metrics: {', '.join(valid)})")
    reason = f"ambiguous ({', '.join(short)})" if short else "unknown metric"
    raise ConfigError(f"--fail-above {name}: {reason}; valid names: {', '.join(valid)}")


def evaluate_gates(metrics: dict, gates: list[tuple[str, float]]) -> list[dict]:
    """One record per gate; a gate fails when its metric exceeds the threshold or is unavailable (null)."""
    out = []
    for name, threshold in gates:
        value = metrics.get(name)
        out.append({"metric": name, "threshold": threshold, "value": value,
                    "passed": value is not None and value <= threshold})
    return out


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
        raise RuntimeError(f"report does not match its JSON Schema at {where}: {errors[0].message}")


def write_json_atomic(report: dict, path: str) -> None:
    """Write `report` to `path` atomically (temp file in the same directory + rename); "-" is stdout."""
    import os
    import sys
    import tempfile

    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    fd, tmp = tempfile.mkstemp(prefix=".drpo-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def publish(tmp: str, path: str) -> None:
    """Give a finished temp file the usual permissions (mkstemp makes it 0600) and rename it to `path`."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


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


_I_NUM: dict = {"type": ["number", "null"]}
_I_INT: dict = {"type": "integer", "minimum": 0}
_I_STR: dict = {"type": "string"}
_I_STATS: dict = {
    "type": "object",
    "required": ["count", "mean", "min", "max"],
    "properties": {"count": _I_INT},
    "additionalProperties": _I_NUM,
}


def _i_records(key: dict, required: list[str], **props: dict) -> dict:
    """Array of flat objects of numbers (a breakdown table) with some typed, required fields."""
    return {"type": "array", "items": {"type": "object", "required": required, "properties": {"key": key, **props},
                                       "additionalProperties": _I_NUM}}


def _i_object(props: dict, extra: dict | bool = False) -> dict:
    return {"type": "object", "required": list(props), "properties": props, "additionalProperties": extra}


_I_DATA_SECTION = _i_object({
    "rows": _I_INT,
    "response_tokens": _I_INT,
    "masked_tokens": _I_INT,
    "prompt_tokens": _I_INT,
    "response_length": _I_STATS,
    "prompt_length": _I_STATS,
    "behavior": _i_object({"neg_logmu_mean": _I_NUM, "rare_frac": _I_NUM, "rare_threshold": {"type": "number"}}),
    "advantage": _i_object({
        "source": {"enum": ["advantages", "advantage", "reward+group_id", "mixed"]},
        "stats": _I_STATS,
        "zero_frac": _I_NUM,
        "zero_rows": _I_INT,
    }),
    "reward": {"oneOf": [{"type": "null"}, _I_STATS]},
    "lag": _i_object({
        "current_version": {"type": ["integer", "null"]},
        "version_source": {"enum": ["--current-version", "checkpoint", "data-max", "unknown"]},
        "rows_without_version": _I_INT,
        "histogram": {"type": "array", "items": _i_object({"lag": {"type": "integer"}, "rows": _I_INT,
                                                            "tokens": _I_INT})},
    }),
    "duplicate_sample_ids": _i_object({"rows": _I_INT, "ids": _I_INT, "examples": {"type": "array", "items": _I_STR}}),
    "token_id_max": {"type": ["integer", "null"]},
    "temperatures": {"type": "array", "items": _i_object({"temperature": _I_NUM, "rows": _I_INT})},
})
_I_LOGGING_CHECKS = _i_object({
    "scope": _I_STR,
    "rows": _I_INT,
    "tokens": _I_INT,
    "logr_mean": _I_NUM,
    "logr_sem": _I_NUM,
    "offset_suspected": {"type": "boolean"},
    "logged_temperature": _I_NUM,
    "temperature_fit": {"type": "array", "items": _i_object({"temperature": {"type": "number"},
                                                             "abs_logr_mean": _I_NUM, "logr_mean": _I_NUM})},
    "best_temperature": _I_NUM,
    "temperature_suspected": {"type": "boolean"},
    "findings": {"type": "array", "items": _I_STR},
})
_I_MODEL_SECTION = _i_object({
    "checkpoint": _i_object({"path": _I_STR, "policy_version": {"type": ["integer", "null"]},
                             "vocab_size": _I_INT}),
    "device": _I_STR,
    "dtype": _I_STR,
    "tokens": _I_INT,
    "micro_batches": _I_INT,
    "padding_frac": _I_NUM,
    "seconds": _I_NUM,
    "distributions": {"type": "object", "additionalProperties": {"type": "object", "additionalProperties": _I_NUM}},
    "by_lag": _i_records(_I_STR, ["key", "tokens"], tokens=_I_INT),
    "by_mu_bucket": _i_records(_I_STR, ["key", "tokens"], tokens=_I_INT),
    "by_position": _i_records(_I_STR, ["key", "tokens"], tokens=_I_INT),
    "losses": {"type": "array", "items": _i_object({
        "loss": _I_STR,
        "hparams": {"type": "object", "additionalProperties": _I_NUM},
        "fractions": {"type": "object", "additionalProperties": _I_NUM},
    })},
    "drpo_what_if": _i_records({"type": "number", "exclusiveMinimum": 0},
                               ["delta", "reachable", "corrective_frac", "attenuated_frac"],
                               delta={"type": "number", "exclusiveMinimum": 0}, reachable={"type": "boolean"}),
    "worst_sequences": _i_records(_I_STR, ["sample_id", "tokens"], sample_id=_I_STR, tokens=_I_INT),
    "logging_checks": {"oneOf": [{"type": "null"}, _I_LOGGING_CHECKS]},
})
INSPECT_REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://github.com/drpo/drpo/schemas/inspect-report.schema.json",
    "title": "drpo inspect report",
    "description": "Written by `drpo inspect --json` (SPEC.md §2, §4); metric names are stable (README, "
                   "'Auditing rollouts'). Non-finite numbers are null.",
    "type": "object",
    "required": ["report", "report_version", "drpo_version", "mode", "inputs", "settings", "metrics", "data",
                 "model", "notes", "gates"],
    "additionalProperties": False,
    "properties": {
        "report": {"const": "drpo-inspect"},
        "report_version": {"const": 1},
        "drpo_version": _I_STR,
        "mode": {"enum": ["data", "model"]},
        "inputs": _i_object({"rollouts": {"type": "array", "items": _I_STR, "minItems": 1},
                             "model": {"type": ["string", "null"]},
                             "columns": {"type": "object", "additionalProperties": _I_STR}}),
        "settings": {"type": "object", "description": "Every InspectConfig field that shaped the report."},
        "metrics": {"type": "object", "required": list(INSPECT_DATA_METRICS), "additionalProperties": _I_NUM,
                    "propertyNames": {"pattern": "^[a-z0-9_]+/[a-z0-9_.@]+$"}},
        "data": _I_DATA_SECTION,
        "model": {"oneOf": [{"type": "null"}, _I_MODEL_SECTION]},
        "notes": {"type": "array", "items": _I_STR, "description": "Plain-language observations worth reading."},
        "gates": {"type": "array", "items": _i_object({"metric": _I_STR, "threshold": {"type": "number"},
                                                        "value": _I_NUM, "passed": {"type": "boolean"}})},
    },
    "if": {"properties": {"mode": {"const": "model"}}},
    "then": {"properties": {"model": {"type": "object"},
                            "metrics": {"required": list(INSPECT_DATA_METRICS) + list(INSPECT_MODEL_METRICS)}}},
    "else": {"properties": {"model": {"type": "null"}}},
}


def render_inspect(report: dict, console: Any) -> None:
    """Human view of an inspect report: rich tables and terminal histograms."""
    from rich.table import Table

    data, model = report["data"], report["model"]
    rl, pl, adv = data["response_length"], data["prompt_length"], data["advantage"]
    table = Table(title=f"drpo inspect: {fmt(data['rows'])} rows", show_header=False, title_justify="left")
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
        table.add_row(label, value)
    console.print(table)

    lag = data["lag"]
    if lag["histogram"]:
        console.print(f"[bold]Staleness lag[/bold] (tokens; current version {lag['current_version']} "
                      f"from {lag['version_source']})")
        for line in histogram_lines([f"lag {h['lag']}" for h in lag["histogram"]],
                                    [h["tokens"] for h in lag["histogram"]]):
            console.print(line, highlight=False, markup=False)
    if model is not None:
        _render_inspect_model(model, report["metrics"], console)
    for note in report["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    for gate in report["gates"]:
        verdict = "[green]pass[/green]" if gate["passed"] else "[red]FAIL[/red]"
        console.print(f"gate {gate['metric']} = {fmt(gate['value'])} (limit {fmt(gate['threshold'])}): {verdict}")


def _render_inspect_model(model: dict, metrics: dict, console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"Current model vs sampler: {fmt(model['tokens'])} tokens, lag from version "
                        f"{model['checkpoint']['policy_version']}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name in INSPECT_HEADLINE:
        table.add_row(name, fmt(metrics.get(name)))
    console.print(table)
    if model["distributions"]:
        keys = ["mean", "p50", "p90", "p99", "p99.9", "max"]
        dist = Table(title="Distributions over tokens", title_justify="left")
        dist.add_column("quantity")
        for k in keys:
            dist.add_column(k, justify="right")
        for name, q in model["distributions"].items():
            dist.add_row(name, *(fmt(q.get(k)) for k in keys))
        console.print(dist)
    what_if = [{k: w.get(k) for k in ("delta", "reachable", "corrective_frac", "attenuated_frac", "min", "max")}
               for w in model["drpo_what_if"]]
    for title, records, first in [("By staleness lag", model["by_lag"], "key"),
                                  ("By behavior probability μ", model["by_mu_bucket"], "key"),
                                  ("By position in the response", model["by_position"], "key"),
                                  ("DRPO what-if over δ (w = 1 − sign(A)·Δ/δ)", what_if, "delta"),
                                  ("Worst sequences", model["worst_sequences"], "sample_id")]:
        if records:
            console.print(_records_table(title, records, first))
    losses = Table(title="What each loss would do to these tokens", title_justify="left")
    for col in ("loss", "hyper-parameters", "effect"):
        losses.add_column(col)
    for entry in model["losses"]:
        losses.add_row(entry["loss"], ", ".join(f"{k}={fmt(v)}" for k, v in entry["hparams"].items()) or "–",
                       ", ".join(f"{k} {fmt(v)}" for k, v in entry["fractions"].items()) or "–")
    console.print(losses)
    checks = model["logging_checks"]
    if checks is not None:
        console.print(f"[bold]Logging checks[/bold] ({checks['scope']}: {fmt(checks['rows'])} rows, "
                      f"{fmt(checks['tokens'])} tokens; mean |log r| by temperature, shorter is a better fit)")
        fit = checks["temperature_fit"]
        for line in histogram_lines([f"T={f['temperature']:g}" for f in fit],
                                    [f["abs_logr_mean"] or 0.0 for f in fit], width=30, unit="nats"):
            console.print("  " + line, highlight=False, markup=False)
        for finding in checks["findings"]:
            console.print(f"  • {finding}", highlight=False)


def _records_table(title: str, records: list[dict], first: str) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    columns = [first] + [k for k in records[0] if k != first]
    for c in columns:
        table.add_column(c, justify="left" if c == first else "right")
    for r in records:
        table.add_row(*(fmt(r.get(c)) for c in columns))
    return table


# ==== end of drpo inspect report =================================================================
