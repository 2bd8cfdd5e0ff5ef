"""The import rules of docs/architecture.md, checked on the code: every drpo_cli module sits in one
layer and imports (at module level or inside a function) only from its own layer or those below."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "drpo_cli"
# Lowest first. Within a layer modules may import each other; across layers only downward.
LAYERS: list[tuple[str, set[str]]] = [
    ("foundations", {"errors", "hooks", "elementwise", "loss_options", "allocator", "launch", "routing", "value_table"}),
    ("files", {"outputs", "schema"}),
    ("rollouts in", {"rollouts", "writer", "checkpoint", "adapters", "adapters.common", "adapters.hf",
                     "adapters.openai_compat", "adapters.sglang", "adapters.streams", "adapters.vllm", "llamacpp",
                     "convert"}),
    ("objectives", {"losses", "losses_extra", "divergence"}),
    ("model runtime", {"batching", "distributed", "moe", "logprobs", "lora", "histograms", "vocab_parallel"}),
    ("options and reports", {"config", "config_file", "report_format", "options_doc", "html_pages"}),
    ("commands", {"inspect_data", "inspect_model", "inspect_against", "train", "resume"}),
    ("entry points", {"cli", "__main__", "__init__"}),
]
LEVEL = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    return {"adapters.__init__": "adapters"}.get(name, name)


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "drpo_cli":
            if node.module == "drpo_cli":
                out |= {a.name for a in node.names if a.name != "__version__"}
            else:
                out.add(node.module.removeprefix("drpo_cli."))
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("drpo_cli.") for a in node.names if a.name.startswith("drpo_cli.")}
    return out


def test_every_module_has_a_layer_and_imports_only_downward():
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    assert set(modules) == set(LEVEL), f"modules without a layer: {set(modules) - set(LEVEL)}; " \
                                       f"layers naming no module: {set(LEVEL) - set(modules)}"
    upward = [f"{m} ({LAYERS[LEVEL[m]][0]}) imports {dep} ({LAYERS[LEVEL[dep]][0]})"
              for m, path in modules.items() for dep in sorted(imports(path) - {m})
              if dep in LEVEL and LEVEL[dep] > LEVEL[m]]
    assert not upward, "upward imports: " + "; ".join(upward)


def test_no_module_but_cli_imports_typer_and_the_documented_ones_never_import_torch():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if module_name(path) != "cli":
            assert not re.search(r"^\s*(import typer|from typer)", text, re.MULTILINE), path.name
    for name in ("errors", "hooks", "loss_options", "launch", "outputs", "schema", "rollouts", "writer",
                 "routing", "options_doc"):
        text = (PACKAGE / f"{name}.py").read_text(encoding="utf-8")
        assert not re.search(r"^(import torch|from torch)", text, re.MULTILINE), f"{name}.py imports torch at module level"


def test_the_layers_table_in_the_docs_is_this_one():
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    for name, mods in LAYERS:
        row = next((line for line in doc.splitlines() if line.startswith(f"| {name} |")), None)
        assert row is not None, f"docs/architecture.md has no row for layer {name!r}"
        assert set(re.findall(r"`([\w.]+)`", row)) == mods, name
