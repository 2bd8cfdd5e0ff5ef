"""Console tables: numbers are never elided on an 80-column terminal; the key column wraps instead."""

from __future__ import annotations

import io

from rich.console import Console

from drpo_cli.reports.report_format import TRAIN_METRICS, fmt_cell, number_table, print_train_summary


def _render(fn, width=80) -> str:
    console = Console(width=width, file=io.StringIO(), color_system=None)
    fn(console)
    return console.file.getvalue()


def test_fmt_cell_is_short_and_exact_to_three_digits():
    assert fmt_cell(0.000571) == "5.71e-4"
    assert fmt_cell(-3.9123e-14) == "-3.91e-14"
    assert fmt_cell(0.06516) == "0.0652"
    assert fmt_cell(123456.0) == "1.23e5" and fmt_cell(12345.6) == "12,346" and fmt_cell(999.94) == "1,000"
    assert fmt_cell(0.0) == "0" and fmt_cell(1234) == "1,234" and fmt_cell(None) == "–"
    assert fmt_cell(float("nan")) == "nan"


def test_train_summary_keeps_every_number_at_80_columns():
    # Worst case: long metric names, eight columns, the widest values each column can hold.
    metrics = {k: -1.23456e-12 for k in TRAIN_METRICS}
    metrics |= {"weight/drpo_corrective_frac": 0.123456, "weight/drpo_attenuated_frac": 0.98765}
    steps = [{"step": i, "skipped": False, "loss": -0.0012345, "grad_norm": 12345.678, "lr": 1e-6,
              "tokens": 1_234_567, "metrics": metrics} for i in range(10)]
    report = {"steps": steps, "loss": {"name": "drpo"}, "notes": [], "skipped_steps": 0,
              "filters": {"staleness": {"max_lag": None, "min_version": None}, "rejection": None},
              "final": {"metrics": metrics, "change_from_first_step": dict.fromkeys(metrics, -9.87e-11),
                        "worst_samples": [{"sample_id": "a-rather-long-sample-identifier-0001", "harmful_frac": 0.5,
                                           "outside_frac": 0.25, "delta_abs_max": 0.333, "tokens": 1024}]}}
    text = _render(lambda c: print_train_summary(report, c))
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    for value in ("-1.23e-12", "-9.87e-11", "12,346", "1,234,567", "-0.00123", "0.988", "0.333", "1,024"):
        assert value in text, value
    assert "step 0" in text and "step 9" in text and "⋯" in text


def test_number_table_wraps_headers_and_folds_the_key():
    rows = [["x" * 60, "0.123", "-4.56e-7"]]
    text = _render(lambda c: c.print(number_table("t", "a_long_key_name", ["harmful_frac", "delta_abs_mean"], rows)),
                   width=40)
    assert "…" not in text and "-4.56e-7" in text and "harmful" in text and "frac" in text
    assert max(len(line) for line in text.splitlines()) <= 40
