"""The layout's rules, read from the code: the core names no task and no task's metric, and no
modules import each other in a circle (function-level imports count)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from pipeline.tasks import TASKS, builtin_tasks

ROOT = Path(__file__).resolve().parents[1]
# The core: everything but the task packages (which the core knows only through their declarations).
CORE = sorted(p for d in ("pipeline", "stages", "export") for p in (ROOT / d).rglob("*.py")
              if "tasks" not in p.relative_to(ROOT).parts)


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (prose, not values the code uses)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def _literals(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal in a file but its docstrings (f-string pieces included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _docstrings(tree)
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip]


def test_the_core_names_no_task_and_no_metric_of_a_task():
    tasks = builtin_tasks()
    assert {t.name for t in tasks} == set(TASKS) and len(TASKS) >= 3
    metrics = {m.name for t in tasks for m in t.quality} | {t.history_metric for t in tasks}
    task_word = re.compile(r"\b(" + "|".join(map(re.escape, TASKS)) + r")\b")
    found = []
    for path in CORE:
        for line, text in _literals(path):
            if text in metrics or task_word.search(text):
                found.append(f"{path.relative_to(ROOT)}:{line}: {text[:70]!r}")
    assert not found, "task or metric names in the core (declare them in the task instead):\n" + "\n".join(found)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The core modules a file imports (at any depth of the file: function-level imports count)."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import module` imports the module, not the package's own code
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
            names = subs if len(subs) == len(node.names) else [node.module, *subs]
        out |= {n for n in names if n in modules}
    return out


def test_modules_import_each_other_without_a_circle():
    everything = sorted(p for d in ("pipeline", "stages", "export") for p in (ROOT / d).rglob("*.py"))
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in everything}
    graph = {m: _imports(p, set(modules)) - {m} for m, p in modules.items()}
    state: dict[str, int] = {}
    circles = []

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                circles.append(" -> ".join(trail[trail.index(n):] + [n]) if n in trail else f"{m} -> {n}")
            elif n not in state:
                visit(n, trail + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_a_task_imports_no_other_task():
    found = []
    for name in TASKS:
        others = {f"pipeline.tasks.{t}" for t in TASKS if t != name}
        for path in (ROOT / "pipeline" / "tasks" / name).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                found += [f"{path.relative_to(ROOT)} imports {m}" for m in mods
                          if any(m == o or m.startswith(o + ".") for o in others)]
    assert not found, "shared pieces belong in pipeline/tasks/common/:\n" + "\n".join(found)
