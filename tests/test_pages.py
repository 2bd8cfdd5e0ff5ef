"""HTML pages: inspect --html, train's report.html, drpo report; structure here, a real browser (slow) below."""

from __future__ import annotations

import html
import html.parser
import json
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import TOY, write_rollout_table
from typer.testing import CliRunner

from drpo_cli.cli import app
from drpo_cli.reports.html_pages import decode_tokens
from drpo_cli.reports.report_format import fmt_cell

VOID = {"meta", "br", "img", "input", "link", "hr", "line", "rect", "circle", "polyline"}


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Path]:
    """The three pages of one pipeline: an audit (broken down by group_id, the worst sequences by chi2/seq, against
    a second sampler's log-probs of the same rows), two rounds of training, the history of the rounds."""
    d = tmp_path_factory.mktemp("pages")
    runner = CliRunner()
    a = pa.ipc.open_file(str(TOY / "rollouts.arrow")).read_all()
    moved = pc.cast(pc.min_element_wise(pc.add(a.column("behavior_logprobs").combine_chunks().flatten(), 0.01), 0.0),
                    pa.float32())  # B: the same rows, each log-prob 0.01 higher (at most 0)
    b = a.set_column(a.schema.get_field_index("behavior_logprobs"), "behavior_logprobs",
                     pa.ListArray.from_arrays(a.column("behavior_logprobs").combine_chunks().offsets, moved))
    write_rollout_table(b, d / "b.arrow")
    inspect = runner.invoke(app, ["inspect", str(TOY / "rollouts.arrow"), "--model", str(TOY / "model"), "-q",
                                  "--by", "group_id", "--worst-by", "chi2/seq", "--against", str(d / "b.arrow"),
                                  "--html", str(d / "inspect.html"), "--json", str(d / "inspect.json")])
    assert inspect.exit_code == 0, inspect.output
    model = TOY / "model"
    for name in ("v9", "v10"):
        res = runner.invoke(app, ["train", "-r", str(TOY / "rollouts.arrow"), "-m", str(model), "--out", str(d / name),
                                  "-q", "--minibatches", "2", "--lr", "1e-3", "--micro-batch-tokens", "512"])
        assert res.exit_code == 0, res.output
        model = d / name
    res = runner.invoke(app, ["report", str(d / "v10"), str(d / "v9"), "--out", str(d / "runs.html")])
    assert res.exit_code == 0 and "2 run(s)" in res.stdout, res.output
    return {"inspect": d / "inspect.html", "train": d / "v10" / "report.html", "runs": d / "runs.html"}


class _Checker(html.parser.HTMLParser):
    """Balanced tags, and every URL the page could fetch."""

    def __init__(self):
        super().__init__()
        self.stack, self.urls, self.tags = [], [], {}

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def _check(path: Path) -> tuple[str, _Checker]:
    text = path.read_text(encoding="utf-8")
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert not checker.stack, f"unclosed {checker.stack}"
    assert not checker.urls and "<script" not in text and "@import" not in text  # self-contained
    assert "Content-Security-Policy" in text and "default-src 'none'" in text  # and the browser enforces it
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text)
    return text, checker


def test_inspect_page_draws_the_trust_region_and_the_worst_tokens(pages):
    text, c = _check(pages["inspect"])
    report = json.loads(pages["inspect"].with_suffix(".json").read_text())
    hist = report["model"]["mu_pi_histogram"]
    # One heatmap per advantage sign; each non-empty (μ, π) bin is one rect with its count on hover.
    for key in ("positive", "negative"):
        total = sum(map(sum, hist[key]))
        assert f"{total:,} tokens</text>" in text
    cells = sum(1 for key in ("positive", "negative") for row in hist[key] for v in row if v)
    assert text.count(" tokens</title></rect>") == cells
    assert "PPO-clip: π/μ = 0.8 and 1.28" in text and "DPPO Binary-TV: |π − μ| = 0.15" in text
    assert "DRPO δ = 12.5: unreachable" in text
    assert c.tags["svg"] >= 6 and "mean |Δ| by lag" in text and "by behavior probability μ" in text
    # The peers' metrics, --by group_id (model and data), --worst-by's score column, the --against table.
    assert "<h2>Mismatch as other trainers report it</h2>" in text and "<td class=t>is/ess_seq</td>" in text
    for title in ("Current model vs sampler by group_id", "Data by group_id", "Worst sequences by chi2/seq"):
        assert f"<h2>{title}</h2>" in text, title
    assert "<th>chi2/seq</th>" in text and "k3_mean by value" in text
    assert len(report["model"]["by"]["group_id"]) == len(report["data"]["by"]["group_id"]) == 24
    assert "<h2>Two samplers on the same tokens: A = " in text
    assert all(f"<th>{label}</th>" in text for label in ("model vs A", "model vs B", "B vs A"))
    # Worst sequences decoded by the checkpoint's tokenizer, one span per token, its trace (π, μ, Δ, r) on hover.
    worst = report["model"]["worst_tokens"][0]
    decoded = decode_tokens(str(TOY / "model"), [worst["token_ids"]])[0]
    for i, (tid, token) in enumerate(zip(worst["token_ids"], decoded)):
        trace = ", ".join(f"{label} = {fmt_cell(worst[key][i])}" for label, key in
                          (("π", "pi"), ("μ", "mu"), ("Δ", "delta"), ("r", "ratio")))
        assert f'title="token {i}: id {tid}, {html.escape(trace)}">{html.escape(token)}</span>' in text


def test_train_page_and_the_history_of_rounds(pages):
    text, _ = _check(pages["train"])
    assert "Metrics per step" in text and "tr/harmful_frac" in text and "Trust region after training" in text
    report = json.loads((pages["train"].parent / "drpo_report.json").read_text())
    assert f'{sum(map(sum, report["final"]["mu_pi_histogram"]["positive"])):,} tokens</text>' in text
    runs, _ = _check(pages["runs"])
    # Rounds v8 -> v9 and v9 -> v10 on one axis: global steps 16, 17 then 18, 19.
    for step in (16, 17, 18, 19):
        assert f"loss step {step}:" in runs
    assert runs.index("8 → 9") < runs.index("9 → 10")


def test_report_command_errors(tmp_path, pages):
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(app, ["report", str(tmp_path / "empty"), "--out", str(tmp_path / "p.html")])
    assert res.exit_code == 2 and "drpo_report.json" in res.stderr and not (tmp_path / "p.html").exists()
    run = pages["train"].parent
    res = CliRunner().invoke(app, ["report", str(run), "--out", str(run / "page.html")])  # inside an input
    assert res.exit_code == 2 and "inside" in res.stderr and not (run / "page.html").exists()
    other = tmp_path / "other.html"
    other.write_text("<html>mine</html>", encoding="utf-8")  # not drpo's: never replaced
    res = CliRunner().invoke(app, ["report", str(run), "--out", str(other), "--overwrite"])
    assert res.exit_code == 2 and other.read_text(encoding="utf-8") == "<html>mine</html>"
    res = CliRunner().invoke(app, ["report", str(run), "--out", str(pages["runs"]), "--overwrite"])
    assert res.exit_code == 0  # a page drpo wrote is replaced


def _browser(page: Path, shot: Path) -> list[str]:
    """Render in headless chromium; returns the console messages (errors, CSP violations, ...)."""
    run = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          "--window-size=1280,2400", f"--screenshot={shot}", "--enable-logging=stderr", "--v=0",
                          page.as_uri()], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    return [line for line in run.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.browser
def test_pages_render_in_a_real_browser_without_console_errors(pages, tmp_path):
    from PIL import Image

    assert shutil.which("chromium"), "the browser tier needs chromium (Debian: apt-get install chromium)"

    bad = tmp_path / "bad.html"  # the harness does see console errors and blocked fetches
    bad.write_text((pages["inspect"].read_text(encoding="utf-8"))
                   .replace("</body>", '<img src="http://example.invalid/x.png"></body>'), encoding="utf-8")
    assert any("Content Security Policy" in m for m in _browser(bad, tmp_path / "bad.png"))
    for name, page in pages.items():
        shot = tmp_path / f"{name}.png"
        assert _browser(page, shot) == [], name
        image = Image.open(shot).convert("RGB")
        assert image.size == (1280, 2400)
        colors = image.resize((64, 120)).getcolors(64 * 120)
        assert colors is not None and len(colors) > 20, name  # drawn, not a blank page
