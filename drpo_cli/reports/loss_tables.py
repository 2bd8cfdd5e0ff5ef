"""The loss tables of docs/losses.md and SPEC.md §1, rendered from the loss registry (each loss's
LossDoc); no torch. Each table sits between two marker lines in its page:

    python -m drpo_cli.reports.loss_tables docs     # rewrite both tables in docs/losses.md and docs/SPEC.md

tests/test_options.py fails when a committed table differs from what this renders.
"""

from __future__ import annotations

import sys
from pathlib import Path

from drpo_cli.objectives.catalog import LOSSES

COMMAND = "python -m drpo_cli.reports.loss_tables docs"
BEGIN = f"<!-- loss table: generated from the loss registry by `{COMMAND}`; edit the losses, not this table -->"
END = "<!-- end of the generated loss table -->"


def guide_table() -> list[str]:
    """docs/losses.md's table: name, paper, loss, gradient weight, defaults, when to use it."""
    rows = [f"| `{name}` | {d.paper} | {d.loss} | {d.weight} | {d.defaults} | {d.use} |"
            for name, d in ((name, spec.doc) for name, spec in LOSSES.items())]
    return ["| name | paper | per-token loss (minimise) | gradient weight w | defaults | when to use it |",
            "|---|---|---|---|---|---|", *rows]


def spec_table() -> list[str]:
    """SPEC.md §1's table: name, loss, gradient weight, default hyper-parameters, source."""
    rows = [f"| `{name}` | {d.spec_loss} | {d.spec_weight} | {d.spec_defaults} | {d.source} |"
            for name, d in ((name, spec.doc) for name, spec in LOSSES.items())]
    return ["| name | per-token loss (minimise) | gradient weight w_t | default hyper-parameters | source |",
            "|---|---|---|---|---|", *rows]


PAGES = {"losses.md": guide_table, "SPEC.md": spec_table}


def with_table(page: str, table: list[str]) -> str:
    """`page` with the lines between its BEGIN and END markers replaced by `table`."""
    lines = page.split("\n")
    if lines.count(BEGIN) != 1 or lines.count(END) != 1:
        raise ValueError(f"expected one line {BEGIN!r} and one line {END!r}")
    start, end = lines.index(BEGIN), lines.index(END)
    return "\n".join(lines[:start + 1] + table + lines[end:])


def main(argv: list[str]) -> None:
    docs = Path(argv[0] if argv else "docs")
    for name, table in PAGES.items():
        path = docs / name
        path.write_text(with_table(path.read_text(encoding="utf-8"), table()), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1:])
