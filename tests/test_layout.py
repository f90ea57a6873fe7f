"""The package's layering, checked on the source (issue 23): one door to model-specific code.

- no import cycles between pg_tune's modules (imports inside functions count; ``TYPE_CHECKING``
  blocks do not: they never run);
- ``pg_tune.config`` imports nothing of pg_tune above it (only ``pg_tune.tasks``);
- nothing outside a model family's folder imports from it: generic code reaches a family through
  ``pg_tune.models.family`` (``family_for`` / ``load_family``) and the interface alone;
- generic code never branches on a model type or family name.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pg_tune"
FAMILY_FOLDERS = ("pg_tune.models.paligemma", "pg_tune.models.chat")
BRANCH_EXEMPT = {
    "pg_tune.models.family",  # the door itself: the registry maps model types and names to families
    # Visible, named exemptions: a generic module that still branches on the model until its issue lands.
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(tree: ast.Module, module: str, known: set[str]) -> set[str]:
    """pg_tune modules ``tree`` imports, at any depth, outside ``if TYPE_CHECKING:`` blocks."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative
                base = ".".join(module.split(".")[: -node.level] + ([node.module] if node.module else []))
            if base.startswith("pg_tune"):
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in known else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pg_tune"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    # Importing a.b.c runs the package __init__s a and a.b too, but those import nothing circular here;
    # edges go to the named module itself.
    return {m for m in found if m in known and m != module}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(tree, name, known) for name, tree in modules.items()}


def test_no_import_cycles():
    graph = _graph()
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_config_imports_nothing_above_it():
    graph = _graph()
    offenders = {
        name: sorted(m for m in deps if not m.startswith(("pg_tune.config", "pg_tune.tasks")))
        for name, deps in graph.items()
        if name.startswith("pg_tune.config")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_nothing_outside_a_family_folder_imports_from_it():
    graph = _graph()
    offenders = []
    for name, deps in graph.items():
        own = next((f for f in FAMILY_FOLDERS if name == f or name.startswith(f + ".")), None)
        for dep in deps:
            folder = next((f for f in FAMILY_FOLDERS if dep == f or dep.startswith(f + ".")), None)
            if folder is not None and folder != own:
                offenders.append(f"{name} imports {dep}")
    assert offenders == []


def test_generic_code_never_branches_on_the_model():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        if name.startswith(FAMILY_FOLDERS) or name in BRANCH_EXEMPT:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Compare):
                continue
            text = ast.unparse(node)
            if "model_type" in text or "family.name" in text or "PaliGemma" in text:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {text}")
    assert offenders == []


def _missing_imports(tree: ast.Module) -> list[str]:
    """``from pg_tune.x import y`` statements (at any depth) whose module or name does not exist."""
    import importlib

    missing = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pg_tune")):
            continue
        try:
            module = importlib.import_module(node.module)
        except ImportError:
            missing.append(f"{node.lineno}: {node.module}")
            continue
        for alias in node.names:
            if hasattr(module, alias.name):
                continue
            try:
                importlib.import_module(f"{node.module}.{alias.name}")
            except ImportError:
                missing.append(f"{node.lineno}: {node.module}.{alias.name}")
    return missing


def test_benchmark_scripts_import_what_exists():
    """``benchmarks/*.py`` run in their own worker processes, outside the test suite: every pg_tune name
    they import (inside functions too) exists, so a moved module fails here, not in a worker."""
    benchmarks = PACKAGE.parent / "benchmarks"
    missing = {
        path.name: found
        for path in sorted(benchmarks.glob("*.py"))
        if (found := _missing_imports(ast.parse(path.read_text(encoding="utf-8"))))
    }
    assert missing == {}
    moved = ast.parse("def worker():\n    from pg_tune.data.collate import PaliGemmaCollator\n")
    assert _missing_imports(moved) == ["2: pg_tune.data.collate.PaliGemmaCollator"]  # the guard can fail


def test_the_layering_checks_see_a_planted_violation(tmp_path):
    """The guards can fail: a cycle, a config import and a family import planted in source are seen."""
    a = ast.parse("from pg_tune.b import x\n")
    b = ast.parse("def f():\n    from pg_tune.a import y\n")
    known = {"pg_tune.a", "pg_tune.b"}
    assert _imports(a, "pg_tune.a", known) == {"pg_tune.b"} and _imports(b, "pg_tune.b", known) == {
        "pg_tune.a"
    }
    guarded = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pg_tune.b import x\n")
    assert _imports(guarded, "pg_tune.a", known) == set()
    edges = defaultdict(set, {"pg_tune.data.x": {"pg_tune.models.paligemma.family"}})
    assert any(d.startswith(FAMILY_FOLDERS) for d in edges["pg_tune.data.x"])
