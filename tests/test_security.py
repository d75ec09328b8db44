"""Static checks over the code: no unpickling, no eval, checkpoints only with weights_only=True."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("pipeline", "stages", "export", "benchmarks", "tests") for p in (ROOT / d).rglob("*.py"))
SOURCES += [ROOT / "noxfile.py"]


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def violations(source: str, filename: str = "<src>") -> list[str]:
    """Unsafe deserialisation or evaluation in one file's source."""
    found = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for m in mods:
                if m.split(".")[0] in ("pickle", "cPickle", "dill", "marshal", "shelve"):
                    found.append(f"{filename}:{node.lineno}: imports {m}")
    for call in _calls(tree):
        name = _name(call.func)
        if isinstance(call.func, ast.Name) and call.func.id in ("eval", "exec"):  # not model.eval()
            found.append(f"{filename}:{call.lineno}: {name}()")
        if name.endswith("torch.load"):
            wo = _kw(call, "weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                found.append(f"{filename}:{call.lineno}: torch.load without weights_only=True")
        if name.endswith("np.load") or name.endswith("numpy.load"):
            ap = _kw(call, "allow_pickle")
            if isinstance(ap, ast.Constant) and ap.value is True:
                found.append(f"{filename}:{call.lineno}: np.load(allow_pickle=True)")
        if name.endswith("yaml.load"):
            found.append(f"{filename}:{call.lineno}: yaml.load (use yaml.safe_load)")
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unsafe_deserialisation(path):
    assert violations(path.read_text(), str(path.relative_to(ROOT))) == []


@pytest.mark.parametrize("bad", [
    "import torch\ntorch.load('x.pt')",
    "import torch\ntorch.load('x.pt', weights_only=False)",
    "import pickle\n",
    "from pickle import loads\n",
    "eval('1+1')",
    "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
])
def test_the_checker_catches(bad):
    assert violations(bad)


def test_the_checker_accepts_safe_loading():
    assert violations("import torch\ntorch.load('x.pt', map_location='cpu', weights_only=True)") == []
