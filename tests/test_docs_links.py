"""README.md and docs/*.md: every relative link resolves to a file and every #anchor to a heading of
its page (GitHub's slugs), and every `drpo ...` command line in their shell blocks names an existing
subcommand and only options that subcommand has."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from drpo_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[|\]\([^)]*\)", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for line in text.splitlines():
        if m := re.match(r"#{1,6} (.+)", line):
            s = slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8")))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        dest = page if not path else (page.parent / path).resolve()
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_checker_finds_a_broken_link_and_anchor(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Title\n\n## Two words\n\n[a](missing.md) [b](#two-words) [c](#nope)\n")
    assert anchors(page) == {"title", "two-words"}
    assert links(page) == ["missing.md", "#two-words", "#nope"]
    assert not (tmp_path / "missing.md").exists()


def commands(page: Path) -> list[list[str]]:
    """Every `drpo ...` command of the page's bash / shell blocks, continuation lines joined."""
    out = []
    for lang, body in FENCE.findall(page.read_text(encoding="utf-8")):
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        pending = ""
        for line in body.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(pending + line, posix=True, punctuation_chars=True)  # comments dropped
            lexer.whitespace_split = True
            try:
                tokens = list(lexer)
            except ValueError:  # a quote that closes on a later line
                pending += line + "\n"
                continue
            pending = ""
            words: list[str] = []
            for word in [*tokens, ";"]:
                if word in ("|", "||", "&&", ";", "&"):
                    if words[:1] == ["drpo"]:
                        out.append(words[1:])
                    words = []
                else:
                    words.append(word)
    return out


def _command(args: list[str]):
    group = typer.main.get_command(app)
    words = [w for w in args if w != "--debug"]
    if not words:
        return None, []
    return getattr(group, "commands", {}).get(words[0]), words[1:]


def unknown_options(args: list[str]) -> list[str]:
    cmd, rest = _command(args)
    if cmd is None:
        return [f"no subcommand {args[:1]}"]
    known = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}
    return [w.split("=")[0] for w in rest if w.startswith("-") and w != "-" and w.split("=")[0] not in known]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_drpo_command_in_the_docs_exists_with_its_options(page):
    bad = {" ".join(c): unknown_options(c) for c in commands(page)}
    bad = {c: u for c, u in bad.items() if u}
    assert not bad, f"{page.name}: commands drifted from the CLI: {bad}"


def test_the_command_check_fails_on_an_unknown_option_or_command():
    assert unknown_options(["train", "-r", "x.arrow", "--loss", "drpo"]) == []
    assert unknown_options(["train", "--no-such-flag"]) == ["--no-such-flag"]
    assert unknown_options(["frobnicate"]) == ["no subcommand ['frobnicate']"]
