"""The import rules of docs/architecture.md, checked on the code: the package's folders are its layers;
a module imports (at module level or inside a function) only from its own layer or those below, and the
import graph has no circle, within a layer or across."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "drpo_cli"
# Lowest first: (layer, the folders or top-level modules that make it). Across layers imports go only downward.
LAYERS: list[tuple[str, set[str]]] = [
    ("base", {"base"}),
    ("rollouts", {"rollouts"}),
    ("objectives", {"objectives"}),
    ("model", {"model"}),
    ("options", {"config", "config_file"}),
    ("reports", {"reports"}),
    ("commands", {"audit", "training"}),
    ("entry points", {"cli", "__main__", "__init__"}),
]
LEVEL = {part: i for i, (_, parts) in enumerate(LAYERS) for part in parts}
# Never import torch at module level (drpo validate / convert / --help and a sampler's RolloutWriter start
# without it; the loss modules use base.lazy): these folders and top-level modules, but the exceptions.
TORCH_FREE = {"base", "rollouts", "objectives", "reports", "config", "config_file", "cli"}
TORCH_AT_IMPORT = {"objectives.divergence"}  # the diagnostics accumulator: torch tensors throughout


def module_name(path: Path) -> str:
    """drpo_cli/model/moe.py -> "model.moe"; a package's __init__ is the package itself."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def layer(module: str) -> int:
    return LEVEL[module.split(".")[0]]


def imports(path: Path, modules: set[str]) -> set[str]:
    """The drpo_cli modules `path` imports anywhere in it (`from drpo_cli.model import moe` -> model.moe)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "drpo_cli":
            base = node.module.removeprefix("drpo_cli").lstrip(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                out.add(sub if sub in modules else base)
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("drpo_cli.") for a in node.names if a.name.startswith("drpo_cli.")}
    return {m for m in out if m}


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: imports(p, set(paths)) - {m} for m, p in paths.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer_and_imports_only_downward():
    edges = graph()
    homeless = sorted(m for m in edges if m.split(".")[0] not in LEVEL)
    assert not homeless, f"modules outside every layer: {homeless}"
    named = {part for _, parts in LAYERS for part in parts}
    assert named <= {m.split(".")[0] for m in edges}, f"layers naming nothing: {named - {m.split('.')[0] for m in edges}}"
    upward = [f"{m} ({LAYERS[layer(m)][0]}) imports {dep} ({LAYERS[layer(dep)][0]})"
              for m, deps in edges.items() for dep in sorted(deps) if dep in edges and layer(dep) > layer(m)]
    assert not upward, "upward imports: " + "; ".join(upward)


def test_the_commands_do_not_import_each_other():
    edges = graph()
    across = [f"{m} imports {dep}" for m, deps in edges.items() for dep in deps
              if m.split(".")[0] in {"audit", "training"} and dep.split(".")[0] in {"audit", "training"}
              and dep.split(".")[0] != m.split(".")[0]]
    assert not across, "; ".join(across)


def test_the_import_graph_has_no_circle():
    assert cycles(graph()) == []


def test_the_circle_finder_finds_circles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_another_modules_private_names():
    private = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("drpo_cli"):
                private += [f"{module_name(path)}: {a.name} from {node.module}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    assert not private, "; ".join(private)


def test_no_module_but_cli_imports_typer_and_the_documented_ones_never_import_torch():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if module_name(path) != "cli":
            assert not re.search(r"^\s*(import typer|from typer)", text, re.MULTILINE), path.name
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if name.split(".")[0] in TORCH_FREE and name not in TORCH_AT_IMPORT:
            text = path.read_text(encoding="utf-8")
            assert not re.search(r"^(import torch|from torch)", text, re.MULTILINE), f"{name} imports torch at module level"


def test_the_layers_table_in_the_docs_is_this_one():
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    for name, parts in LAYERS:
        row = next((line for line in doc.splitlines() if line.startswith(f"| {name} |")), None)
        assert row is not None, f"docs/architecture.md has no row for layer {name!r}"
        folders = {p.rstrip("/") for p in re.findall(r"`([\w./]+)`", row.split("|")[2])}
        assert folders == parts, name
