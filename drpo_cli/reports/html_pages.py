"""Self-contained HTML pages of the reports: `inspect --html`, train's report.html, `drpo report` (no torch).

One file each, nothing fetched (a Content-Security-Policy forbids it); plots are inline SVG written
here (no plotting library), hover text is SVG <title>, no script. What the pages draw:
- the trust-region picture: every token's (μ, π) as a 2-D histogram per advantage sign, with the
  PPO-clip ratio band π = (1 ± ε)·μ, the DPPO Binary-TV band |π − μ| ≤ δ and DRPO's δ;
- |Δ| and log r by staleness lag; the breakdown tables; the worst sequences' tokens (decoded by the
  checkpoint's tokenizer when it has a tokenizer.json) colored by Δ = π − μ;
- for train, each metric per step; for `drpo report`, the metrics of many runs on one global-step axis.
"""

from __future__ import annotations

import html
import itertools
import json
import math
import os
from typing import Any

from drpo_cli.base.outputs import HTML_MARKER
from drpo_cli.config import LOSS_HPARAMS
from drpo_cli.reports.report_format import AGAINST_SHOWN, INSPECT_HEADLINE, PEER_METRICS, fmt_cell

_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#1d2430;
padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde2ea;padding-bottom:4px}
.sub{color:#5b6677;margin:0 0 12px}.grid{display:flex;flex-wrap:wrap;gap:14px}.card{border:1px solid #dde2ea;
border-radius:6px;padding:8px 10px;background:#fbfcfe}table{border-collapse:collapse;font-variant-numeric:tabular-nums}
td,th{padding:3px 9px;border-bottom:1px solid #eceff4;text-align:right;white-space:nowrap}th{background:#f2f4f8}
td:first-child,th:first-child,td.t{text-align:left}.note{background:#fff8e6;border-left:3px solid #e0a800;padding:6px 10px;
margin:6px 0}.tokens{font:12px/1.9 ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-all}
.tok{padding:1px 0;border-radius:2px}.masked{opacity:.45;text-decoration:line-through}.legend{color:#5b6677;font-size:12px}
"""
_PALETTE = ((0.0, (247, 251, 255)), (0.25, (158, 202, 225)), (0.5, (66, 146, 198)), (0.75, (8, 81, 156)),
            (1.0, (8, 29, 88)))
_SERIES = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")


# ---- page scaffolding ---------------------------------------------------------------------------


def _page(title: str, subtitle: str, sections: list[str]) -> str:
    return (f'<!DOCTYPE html>\n{HTML_MARKER}\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>{_e(title)}</title>'
            f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1><p class=sub>{_e(subtitle)}</p>"
            + "".join(sections) + "</body></html>\n")


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _section(title: str, *parts: str) -> str:
    return f"<h2>{_e(title)}</h2>" + "".join(parts)


def _table(columns: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f'<td class=t>{_e(v)}</td>' if isinstance(v, str) else f"<td>{_e(fmt_cell(v))}</td>"
                                    for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _records(records: list[dict], first: str) -> str:
    if not records:
        return "<p class=sub>none</p>"
    columns = [first] + [k for k in records[0] if k != first]
    return _table(columns, [[str(r.get(first)), *(r.get(c) for c in columns[1:])] for r in records])


def _all_metrics(metrics: dict) -> str:
    """Every metric, in a collapsed block, three tables side by side."""
    items = list(metrics.items())
    third = -(-len(items) // 3)
    cols = "".join(f"<div class=card>{_table(['metric', 'value'], [list(kv) for kv in items[i:i + third]])}</div>"
                   for i in range(0, len(items), third or 1))
    return f"<h2>All metrics</h2><details><summary>{len(items)} metrics</summary><div class=grid>{cols}</div></details>"


def _notes(notes: list[str]) -> str:
    return "".join(f"<div class=note>{_e(n)}</div>" for n in notes)


# ---- SVG plots ----------------------------------------------------------------------------------


def _color(t: float) -> str:
    for (a, ca), (b, cb) in itertools.pairwise(_PALETTE):
        if t <= b:
            w = (t - a) / (b - a) if b > a else 0.0
            return "#" + "".join(f"{round(x + (y - x) * w):02x}" for x, y in zip(ca, cb))
    return "#" + "".join(f"{x:02x}" for x in _PALETTE[-1][1])


def _svg(width: int, height: int, body: str, label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}"'
            f' role="img" aria-label="{_e(label)}" font-family="system-ui,sans-serif" font-size="11">{body}</svg>')


def mu_pi_svg(counts: list[list[int]], title: str, bands: list[tuple[str, str, list]], size: int = 300) -> str:
    """2-D histogram of (μ, π) (log color scale) with band lines; bands: (label, color, [(μ0, π0, μ1, π1), ...])."""
    m, n = 50, len(counts)
    peak = max((c for row in counts for c in row), default=0)
    cell = size / n
    parts = [f'<text x="{m}" y="14" font-size="12" font-weight="600">{_e(title)}</text>',
             f'<rect x="{m}" y="22" width="{size}" height="{size}" fill="#f7fbff" stroke="#9aa5b5"/>']
    for i, row in enumerate(counts):  # i: μ bin (x), j: π bin (y, upwards)
        for j, c in enumerate(row):
            if c:
                t = math.log1p(c) / math.log1p(peak)
                x, y = m + i * cell, 22 + size - (j + 1) * cell
                parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{cell + 0.3:.1f}" height="{cell + 0.3:.1f}" '
                             f'fill="{_color(0.15 + 0.85 * t)}"><title>μ ∈ [{i / n:.3f}, {(i + 1) / n:.3f}), '
                             f'π ∈ [{j / n:.3f}, {(j + 1) / n:.3f}): {c:,} tokens</title></rect>')

    def px(mu: float, pi: float) -> tuple[float, float]:
        return m + mu * size, 22 + (1 - pi) * size

    parts.append(_segment(px(0, 0), px(1, 1), 'stroke="#555" stroke-dasharray="2 3"'))
    for k, (label, color, segments) in enumerate(bands):
        for mu0, pi0, mu1, pi1 in segments:
            parts.append(_segment(px(mu0, pi0), px(mu1, pi1), f'stroke="{color}" stroke-width="1.6"'))
        parts.append(f'<rect x="{m + size + 12}" y="{30 + 16 * k}" width="10" height="3" fill="{color}"/>'
                     f'<text x="{m + size + 26}" y="{34 + 16 * k}">{_e(label)}</text>')
    for v in (0, 0.5, 1):
        x, y = px(v, v)
        parts.append(f'<text x="{x:.1f}" y="{22 + size + 14}" text-anchor="middle">{v:g}</text>'
                     f'<text x="{m - 6}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
    parts.append(f'<text x="{m + size / 2}" y="{22 + size + 30}" text-anchor="middle">μ (sampler)</text>'
                 f'<text x="14" y="{22 + size / 2}" transform="rotate(-90 14 {22 + size / 2})" '
                 f'text-anchor="middle">π (current)</text>')
    return _svg(m + size + 250, size + 62, "".join(parts), title)


def _segment(a: tuple[float, float], b: tuple[float, float], style: str) -> str:
    return f'<line x1="{a[0]:.1f}" y1="{a[1]:.1f}" x2="{b[0]:.1f}" y2="{b[1]:.1f}" {style}/>'


def _clip_line(f, lo: float = 0.0, hi: float = 1.0, steps: int = 64) -> list[tuple]:
    """Segments of π = f(μ) inside the unit square."""
    pts = [(lo + (hi - lo) * s / steps, f(lo + (hi - lo) * s / steps)) for s in range(steps + 1)]
    return [(a, pa, b, pb) for (a, pa), (b, pb) in itertools.pairwise(pts) if 0 <= pa <= 1 and 0 <= pb <= 1]


def trust_region_bands(ppo: dict, tv_delta: float, drpo_delta: float) -> list[tuple[str, str, list]]:
    lo, hi = 1 - ppo["eps_low"], 1 + ppo["eps_high"]
    bands = [(f"PPO-clip: π/μ = {lo:g} and {hi:g}", "#e6550d",
              _clip_line(lambda u: lo * u) + _clip_line(lambda u: hi * u)),
             (f"DPPO Binary-TV: |π − μ| = {tv_delta:g}", "#31a354",
              _clip_line(lambda u: u + tv_delta) + _clip_line(lambda u: u - tv_delta))]
    if drpo_delta < 1:
        bands.append((f"DRPO: |π − μ| = δ = {drpo_delta:g} (w = 0)", "#d6216b",
                      _clip_line(lambda u: u + drpo_delta) + _clip_line(lambda u: u - drpo_delta)))
    else:
        bands.append((f"DRPO δ = {drpo_delta:g}: unreachable (δ ≥ 1)", "#d6216b", []))
    return bands


def bars_svg(labels: list[str], series: list[tuple[str, list]], title: str, width: int = 360, height: int = 190) -> str:
    """Grouped bars, one group per label; negative values hang below the zero line."""
    m, top, bottom = 46, 22, 34
    values = [v for _, ys in series for v in ys if v is not None] or [0.0]
    vmax, vmin = max(max(values), 0.0), min(min(values), 0.0)
    span = (vmax - vmin) or 1.0
    ph, pw = height - top - bottom, width - m - 10
    zero = top + ph * vmax / span
    gw = pw / max(len(labels), 1)
    bw = gw * 0.8 / max(len(series), 1)
    parts = [f'<text x="{m}" y="14" font-size="12" font-weight="600">{_e(title)}</text>',
             f'<line x1="{m}" y1="{zero:.1f}" x2="{m + pw}" y2="{zero:.1f}" stroke="#777"/>',
             f'<text x="{m - 4}" y="{top + 4}" text-anchor="end">{_e(fmt_cell(vmax))}</text>',
             f'<text x="{m - 4}" y="{top + ph:.1f}" text-anchor="end">{_e(fmt_cell(vmin))}</text>']
    for g, label in enumerate(labels):
        for k, (name, ys) in enumerate(series):
            v = ys[g]
            if v is None:
                continue
            h = abs(v) / span * ph
            y = zero - h if v >= 0 else zero
            parts.append(f'<rect x="{m + g * gw + gw * 0.1 + k * bw:.1f}" y="{y:.1f}" width="{bw:.1f}" '
                         f'height="{max(h, 0.5):.1f}" fill="{_SERIES[k % len(_SERIES)]}"><title>{_e(name)} '
                         f'at {_e(label)}: {_e(fmt_cell(v))}</title></rect>')
        parts.append(f'<text x="{m + g * gw + gw / 2:.1f}" y="{height - bottom + 14}" text-anchor="middle">'
                     f'{_e(label)}</text>')
    for k, (name, _) in enumerate(series):
        parts.append(f'<rect x="{m + k * 120}" y="{height - 12}" width="9" height="9" fill="{_SERIES[k]}"/>'
                     f'<text x="{m + k * 120 + 13}" y="{height - 4}">{_e(name)}</text>')
    return _svg(width, height, "".join(parts), title)


def lines_svg(series: list[tuple[str, list[float], list]], title: str, width: int = 360, height: int = 170,
              marks: list[float] = ()) -> str:
    """One line chart; series: (label, xs, ys) (None ys skipped); `marks` draws vertical guides (rounds)."""
    m, top, bottom = 52, 22, 30
    xs = [x for _, sx, _ in series for x in sx] or [0.0]
    ys = [y for _, _, sy in series for y in sy if y is not None] or [0.0]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if y1 == y0:
        y0, y1 = y0 - (abs(y0) or 1) * 0.05, y1 + (abs(y1) or 1) * 0.05
    pw, ph = width - m - 10, height - top - bottom

    def px(x, y):
        return m + (x - x0) / ((x1 - x0) or 1) * pw, top + (1 - (y - y0) / (y1 - y0)) * ph

    parts = [f'<text x="{m}" y="14" font-size="12" font-weight="600">{_e(title)}</text>',
             f'<rect x="{m}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#c9d0da"/>',
             f'<text x="{m - 4}" y="{top + 4}" text-anchor="end">{_e(fmt_cell(y1))}</text>',
             f'<text x="{m - 4}" y="{top + ph:.1f}" text-anchor="end">{_e(fmt_cell(y0))}</text>',
             f'<text x="{m}" y="{height - 12}">{_e(fmt_cell(x0))}</text>',
             f'<text x="{m + pw}" y="{height - 12}" text-anchor="end">{_e(fmt_cell(x1))}</text>']
    for x in marks:
        a, _ = px(x, y0)
        parts.append(f'<line x1="{a:.1f}" y1="{top}" x2="{a:.1f}" y2="{top + ph}" stroke="#dde2ea"/>')
    for k, (label, sx, sy) in enumerate(series):
        color = _SERIES[k % len(_SERIES)]
        pts = [px(x, y) for x, y in zip(sx, sy) if y is not None]
        if len(pts) > 1:
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="'
                         + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
        for (a, b), x, y in zip(pts, [x for x, y in zip(sx, sy) if y is not None], [y for y in sy if y is not None]):
            parts.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.2" fill="{color}"><title>{_e(label)} step '
                         f'{_e(fmt_cell(x))}: {_e(fmt_cell(y))}</title></circle>')
        if len(series) > 1:
            parts.append(f'<text x="{m + 4 + k * 110}" y="{top + 12}" fill="{color}">{_e(label)}</text>')
    return _svg(width, height, "".join(parts), title)


# ---- tokens colored by Δ --------------------------------------------------------------------------


def decode_tokens(model_dir: str | None, sequences: list[list[int]]) -> list[list[str]] | None:
    """Per-token text with the checkpoint's tokenizer.json (the `tokenizers` library), or None."""
    path = os.path.join(model_dir, "tokenizer.json") if model_dir else None
    if path is None or not os.path.isfile(path):
        return None
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(path)
        return [[tok.decode([t]) for t in ids] for ids in sequences]
    except Exception:  # noqa: BLE001 -- tokenizers raises plain Exception; the page shows token ids instead
        return None


def _delta_color(d: float | None) -> str:
    if d is None:
        return "transparent"
    t = min(abs(d) / 0.5, 1.0)  # full color at |Δ| = 0.5
    r, g, b = (214, 39, 40) if d > 0 else (31, 119, 180)
    return f"rgba({r},{g},{b},{0.08 + 0.8 * t:.2f})"


def tokens_html(worst: list[dict], model_dir: str | None) -> str:
    if not worst:
        return "<p class=sub>none</p>"
    texts = decode_tokens(model_dir, [w["token_ids"] for w in worst])
    out = ['<p class=legend>Background: Δ = π − μ of each sampled token, <span style="background:rgba(214,39,40,.6)">'
           'π above μ</span> / <span style="background:rgba(31,119,180,.6)">π below μ</span> (full color at |Δ| = 0.5); '
           'struck-through tokens have loss_mask 0 (untrained: no Δ). Hover a token for its values.'
           + ("" if texts is not None else " (no tokenizer.json in the checkpoint: token ids shown)") + "</p>"]
    for k, w in enumerate(worst):
        spans = []
        for i, (tid, d, keep) in enumerate(zip(w["token_ids"], w["delta"], w["mask"])):
            text = texts[k][i] if texts is not None else f"#{tid} "
            cls = "tok" if keep else "tok masked"
            values = ", ".join(f"{label} = {fmt_cell(w[key][i])}" for label, key in
                               (("π", "pi"), ("μ", "mu"), ("Δ", "delta"), ("r", "ratio")) if key in w)
            spans.append(f'<span class="{cls}" style="background:{_delta_color(d)}" title="token {i}: id {tid}, '
                         f'{_e(values)}">{_e(text)}</span>')
        out.append(f'<div class=card><b>{_e(w["sample_id"])}</b> <span class=legend>A = {_e(fmt_cell(w["advantage"]))}'
                   f'</span><div class=tokens>{"".join(spans)}</div></div>')
    return "".join(out)


# ---- the pages ----------------------------------------------------------------------------------


def _picture(hist: dict, bands: list) -> str:
    return ('<div class=grid>' + "".join(
        f'<div class=card>{mu_pi_svg(hist[key], f"{label}: {sum(map(sum, hist[key])):,} tokens", bands)}</div>'
        for key, label in (("positive", "A > 0 (harmful: π above the band)"),
                           ("negative", "A < 0 (harmful: π below the band)"))) + "</div>")


def _hparams(losses: dict[str, dict]) -> tuple[dict, float, float]:
    """(ppo-clip ε's, DPPO-TV δ, DRPO δ) from the report's hyper-parameters, defaults where absent."""
    ppo = {**LOSS_HPARAMS["ppo-clip"], **losses.get("ppo-clip", {})}
    tv = losses.get("dppo-tv", {}).get("delta") or LOSS_HPARAMS["dppo-tv"]["delta"]
    drpo = losses.get("drpo", {}).get("delta") or LOSS_HPARAMS["drpo"]["delta"]
    return ppo, float(tv), float(drpo)


def inspect_page(report: dict) -> str:
    """The page of a `drpo inspect` report (data-only reports get the data sections)."""
    data, model, metrics = report["data"], report["model"], report["metrics"]
    headline = [k for k in INSPECT_HEADLINE if k in metrics] or list(metrics)[:12]
    sections = [_section("Headline metrics", _table(["metric", "value"], [[k, metrics[k]] for k in headline]))]
    lag = data["lag"]
    if lag["histogram"]:
        sections.append(_section(
            f"Staleness (current version {lag['current_version']}, from {lag['version_source']})",
            bars_svg([str(h["lag"]) for h in lag["histogram"]], [("tokens", [h["tokens"] for h in lag["histogram"]])],
                     "tokens by staleness lag")))
    if model is not None:
        ppo, tv, drpo = _hparams({e["loss"]: e["hparams"] for e in model["losses"]})
        sections.append(_section("Trust region: every token's μ against π", _picture(model["mu_pi_histogram"],
                                 trust_region_bands(ppo, tv, drpo))))
        by_lag = model["by_lag"]
        sections.append(_section("|Δ| and log r by staleness lag", '<div class=grid>' + "".join(
            f"<div class=card>{bars_svg([r['key'] for r in by_lag], [(name, [r.get(name) for r in by_lag])], title)}</div>"
            for name, title in (("delta_abs_mean", "mean |Δ| by lag"), ("logr_mean", "mean log r by lag"),
                                ("harmful_frac", "harmful share by lag"))) + "</div>"))
        sections.append(_section("Mismatch as other trainers report it", _table(
            ["metric", "value"], [[k, metrics.get(k)] for k in PEER_METRICS if k in metrics]),
            "<p class=legend>docs/inspect.md maps each to verl's, NeMo-RL's, slime's, prime-rl's and TRL's names.</p>"))
        sections.append(_section("Breakdowns", "<div class=grid>" + "".join(
            f"<div class=card><b>{_e(t)}</b>{_records(r, 'key')}</div>" for t, r in (
                ("by staleness lag", by_lag), ("by behavior probability μ", model["by_mu_bucket"]),
                ("by position", model["by_position"]))) + "</div>"))
        sections.append(_section("Distributions over tokens", _table(
            ["quantity", "mean", "p50", "p90", "p99", "p99.9", "max"],
            [[name, *(q.get(k) for k in ("mean", "p50", "p90", "p99", "p99.9", "max"))]
             for name, q in model["distributions"].items()])))
        sections.append(_section("What each loss would do", _table(["loss", "hyper-parameters", "effect"], [
            [e["loss"], ", ".join(f"{k}={fmt_cell(v)}" for k, v in e["hparams"].items()) or "–",
             ", ".join(f"{k} {fmt_cell(v)}" for k, v in e["fractions"].items()) or "–"] for e in model["losses"]])
            + _records(model["drpo_what_if"], "delta")))
        checks = model["logging_checks"]
        if checks is not None:
            fit = checks["temperature_fit"]
            sections.append(_section(f"Logging checks ({checks['scope']})", bars_svg(
                [f"{f['temperature']:g}" for f in fit], [("mean |log r|", [f["abs_logr_mean"] for f in fit])],
                "mean |log r| by temperature (lowest fits)"), _notes(checks["findings"])))
        routing = model["routing"]
        if routing is not None:
            sections.append(_section(
                f"MoE routing mismatch ({routing['architecture']}, top-{routing['top_k']} of {routing['num_experts']}"
                f"{', replayed' if routing['replayed'] else ''}): {fmt_cell(routing['mismatch_frac'])} of "
                f"{routing['positions']:,} trained positions × layers",
                bars_svg([str(r["layer"]) for r in routing["by_layer"]],
                         [("mismatch share", [r["mismatch_frac"] for r in routing["by_layer"]])],
                         "share of positions whose top-k set differs, by layer")))
        for name, records in model["by"].items():
            sections.append(_section(f"Current model vs sampler by {name}", _by_chart(records, "k3_mean"),
                                     _records(_by_rows(records), "value")))
        worst = [{(model["worst_by"] if k == "score" else k): v for k, v in w.items()} for w in model["worst_sequences"]]
        sections.append(_section(f"Worst sequences by {model['worst_by']}", _records(worst, "sample_id"),
                                 tokens_html(model["worst_tokens"], model["checkpoint"]["path"])))
    for name, records in data["by"].items():
        sections.append(_section(f"Data by {name}", _records(_by_rows(records), "value")))
    against = report["against"]
    if against is not None:
        comps = against["comparisons"]
        sections.append(_section(
            f"Two samplers on the same tokens: A = {', '.join(report['inputs']['rollouts'])}, "
            f"B = {', '.join(against['files'])}",
            _table(["metric", *(c["label"] for c in comps)], [["tokens", *(c["tokens"] for c in comps)]]
                   + [[name, *(c["metrics"].get(name) for c in comps)] for name in AGAINST_SHOWN]),
            f"<p class=legend>{against['rows']:,} rows matched by sample_id; {against['mask_differs']:,} tokens "
            "trained in one file only are left out; every metric of each comparison is in the JSON report.</p>"))
    sections.append(_section("Notes", _notes(report["notes"]) or "<p class=sub>none</p>"))
    sections.append(_all_metrics(metrics))
    subtitle = (f"{data['rows']:,} rows, {data['response_tokens']:,} response tokens"
                + (f"; model {model['checkpoint']['path']}" if model else "; data only"))
    return _page("drpo inspect", subtitle, sections)


BY_PAGE = 200  # values of a --by column on the page (the JSON report has every value)


def _by_rows(records: list[dict]) -> list[dict]:
    """A --by breakdown's rows for a page table: the BY_PAGE values with the most tokens, value as text."""
    shown = sorted(sorted(records, key=lambda r: -r["tokens"])[:BY_PAGE], key=records.index)
    return [{**r, "value": "null" if r["value"] is None else str(r["value"])} for r in shown]


def _by_chart(records: list[dict], key: str) -> str:
    """Bars of one metric per value (the 30 values with the most tokens)."""
    shown = _by_rows(records)[:30] if len(records) <= 30 else sorted(_by_rows(records), key=lambda r: -r["tokens"])[:30]
    return bars_svg([r["value"][:12] for r in shown], [(key, [r.get(key) for r in shown])], f"{key} by value",
                    width=max(360, 24 * len(shown)))


def _step_series(steps: list[dict], key: str, base: int = 0) -> tuple[list, list]:
    xs = [base + s["step"] for s in steps]
    ys = [s.get(key) if key in ("loss", "grad_norm", "lr", "tokens") else s["metrics"].get(key) for s in steps]
    return xs, ys


def _metric_keys(steps: list[dict], loss: str) -> tuple[list[str], list[str]]:
    """(the headline keys: loss, grad norm, lr, SPEC.md §2 metrics, what the loss does; every other metric)."""
    from drpo_cli.reports.report_format import TRAIN_METRICS, is_loss_metric

    present = []
    for s in steps:
        present += [k for k in s["metrics"] if k not in present]
    head = ["loss", "grad_norm", "lr", *(k for k in present if k in TRAIN_METRICS or is_loss_metric(k, loss))]
    return head, [k for k in present if k not in head]


def _charts(keys: list[str], series) -> str:
    return "<div class=grid>" + "".join(f"<div class=card>{series(k)}</div>" for k in keys) + "</div>"


def _more(keys: list[str], series) -> str:
    return f"<details><summary>{len(keys)} more metrics</summary>{_charts(keys, series)}</details>" if keys else ""


def train_page(report: dict) -> str:
    """OUT/report.html of `drpo train`: metrics per step, the closing audit's trust-region picture, worst tokens."""
    steps, final, loss = report["steps"], report["final"], report["loss"]
    head, rest = _metric_keys(steps, loss["name"])

    def series(k: str) -> str:
        return lines_svg([(k, *_step_series(steps, k))], k)

    losses = {name: {} for name in LOSS_HPARAMS}
    losses[loss["name"]] = loss["hparams"]
    ppo, tv, drpo = _hparams(losses)
    sections = [
        _section("Metrics per step", _charts(head, series), _more(rest, series)),
        _section("Closing audit: the final weights against μ", _table(
            ["metric", "final", "change from step 0"],
            [[k, v, final["change_from_first_step"].get(k)] for k, v in final["metrics"].items()])),
        _section("Trust region after training: every token's μ against π",
                 _picture(final["mu_pi_histogram"], trust_region_bands(ppo, tv, drpo))),
        _section("Worst samples", _records(final["worst_samples"], "sample_id"),
                 tokens_html(final["worst_tokens"], report["output"]["dir"])),
        _section("Notes", _notes(report["notes"]) or "<p class=sub>none</p>"),
    ]
    hp = ", ".join(f"{k}={fmt_cell(v)}" for k, v in loss["hparams"].items())
    return _page(f"drpo train: {loss['name']}", f"{report['input']['model']} (v{report['input']['policy_version']}) → "
                 f"{report['output']['dir']} (v{report['output']['policy_version']}); {len(steps)} steps; {hp}", sections)


def runs_page(runs: list[tuple[str, dict]]) -> str:
    """`drpo report DIRS...`: the metrics of many runs' drpo_report.json on one global-step axis.

    Global step = input policy version × steps of the run + step (as --tensorboard), so a pipeline's
    rounds (v → v + 1) join into one curve; a vertical guide marks where each round starts.
    """
    runs = sorted(runs, key=lambda r: (r[1]["input"]["policy_version"] or 0, r[0]))
    head, rest = [], []
    for _, rep in runs:
        h, r = _metric_keys(rep["steps"], rep["loss"]["name"])
        head += [k for k in h if k not in head]
        rest += [k for k in r if k not in rest and k not in head]
    bases = [(rep["input"]["policy_version"] or 0) * len(rep["steps"]) for _, rep in runs]

    def series(k: str) -> str:
        xs, ys = [], []
        for (_, rep), base in zip(runs, bases):
            x, y = _step_series(rep["steps"], k, base)
            xs += x
            ys += y
        return lines_svg([(k, xs, ys)], k, marks=bases)

    finals = [k for k in runs[0][1]["final"]["metrics"]] if runs else []
    final_charts = "".join(
        f"<div class=card>{lines_svg([(k, [rep['output']['policy_version'] for _, rep in runs], [rep['final']['metrics'].get(k) for _, rep in runs])], f'{k} (closing audit, by output version)')}</div>"
        for k in finals if not k.startswith("data/"))
    table = _table(["run", "loss", "in → out version", "steps", "tokens", "tr/harmful_frac (final)", "seconds"], [
        [d, rep["loss"]["name"], f"{rep['input']['policy_version']} → {rep['output']['policy_version']}",
         len(rep["steps"]), rep["input"]["trained_tokens"], rep["final"]["metrics"].get("tr/harmful_frac"),
         rep["seconds"]] for d, rep in runs])
    return _page("drpo report", f"{len(runs)} run(s); x = global step (input policy version × steps + step)",
                 [_section("Runs", table), _section("Metrics per step", _charts(head, series), _more(rest, series)),
                  _section("Closing audit per round", f"<div class=grid>{final_charts}</div>")])


def read_run(path: str) -> dict:
    """DIR/drpo_report.json (or the file itself); InputError naming the file when unreadable."""
    from drpo_cli.base.errors import InputError

    file = os.path.join(path, "drpo_report.json") if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            report = json.load(f)
    except OSError as err:
        raise InputError(f"{file}: {err.strerror or err} (expected a drpo train output directory)") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{file}: line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})") from None
    if not isinstance(report, dict) or report.get("report") != "drpo-train":
        raise InputError(f"{file}: not a drpo train report (expected \"report\": \"drpo-train\")")
    return report
