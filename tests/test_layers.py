"""The package's layering: every import (lazy ones included, ``if TYPE_CHECKING:`` aside) points
down the layer order below, and no set of modules imports each other in a cycle.

A module's layer is the entry of its longest matching prefix; a new module must be given one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "transferlab"

# Lower index = lower layer. A module may import from its own layer (no cycles) and those below.
LAYERS: list[tuple[str, ...]] = [
    # basics
    # (evaluation.stats: numpy statistics, the CIs that rank's probe uses too)
    (
        "transferlab",
        "errors",
        "progress",
        "system",
        "storage",
        "config",
        "preprocess",
        "figures",
        "evaluation.stats",
    ),  # fmt: skip
    # data in, augmentation, the feature cache
    ("data", "augment", "cache"),
    # networks and how they run
    ("training", "model", "backbones", "heads", "scratch", "runtime", "extract"),
    # the training engine
    ("engine",),
    # strategies
    # strategies, and choosing among backbones (rank uses the strategies' feature path)
    ("strategies", "selection"),
    # the run folder, prediction, metrics and plots
    (
        "runs",
        "run_listing",
        "run_schema",
        "provenance",
        "tracking",
        "predict",
        "evaluation",
        "evaluation.metrics",
        "evaluation.plots",
        "evaluation.run_data",
        "evaluation.scoring",
        "evaluation.exported",
        "evaluation.explain",  # below the API: Classifier.explain draws with it
    ),
    # the Python API
    ("api",),
    # workflows over the API
    (
        "evaluation.analysis",
        "evaluation.compare",
        "evaluation.report",
        "export",
        "serve",
        "ladder",
        "lr_find",
        "doctor",
        "cache_admin",
        "learning_curve",
    ),  # fmt: skip
    # the command line
    ("cli", "cli_see", "cli_ship", "cli_runs", "cli_choose", "cli_scale", "__main__"),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    rel = module.removeprefix("transferlab.") if module != "transferlab" else "transferlab"
    best, best_len = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (rel == name or rel.startswith(name + ".")) and len(name) > best_len:
                best, best_len = i, len(name)
    if best is None:
        raise AssertionError(f"{module} has no layer in tests/test_layers.py's LAYERS")
    return best


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def imports_of(path: Path, module: str) -> set[str]:
    """transferlab modules that ``path`` imports anywhere (``from pkg import sub`` counts as
    importing ``pkg.sub`` when that is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".")[
                    : len(module.split(".")) - node.level + path.name.count("__init__")
                ]
                base = ".".join([*pkg, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return {m for m in found if m == "transferlab" or m.startswith("transferlab.")}


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def _graph() -> dict[str, set[str]]:
    return {m: imports_of(p, m) - {m} for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    for m in MODULES:
        layer_of(m)


def test_imports_point_down():
    uphill = [
        f"{m} (layer {layer_of(m)}) imports {dep} (layer {layer_of(dep)})"
        for m, deps in _graph().items()
        for dep in sorted(deps)
        if dep in MODULES and layer_of(dep) > layer_of(m)
    ]
    assert not uphill, "imports pointing up the layers:\n" + "\n".join(uphill)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles():
    assert find_cycles(_graph()) == []


def test_the_checker_catches_what_it_should(tmp_path):
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("transferlab.engine.loop") == layer_of("transferlab.engine")
    assert layer_of("transferlab.evaluation.metrics") < layer_of("transferlab.api")
    assert layer_of("transferlab.api") < layer_of("transferlab.evaluation.report")
    with pytest.raises(AssertionError, match="has no layer"):
        layer_of("transferlab.nowhere")
    lazy = tmp_path / "m.py"
    lazy.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from transferlab.api import Classifier\n"
        "def f():\n    from transferlab.cli import app\n"
    )
    assert imports_of(lazy, "transferlab.m") == {"transferlab.cli"}
