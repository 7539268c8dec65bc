"""No import circles anywhere: the import graph of ``resrl_analysis`` and ``trainer``, read from the source with
``ast``, has no cycle (issue 20).

Every import counts, at module level and inside functions (a function-level import still ties the two modules
together: it only defers the circle to the first call), relative or absolute, and ``importlib.import_module`` /
``__import__`` with a literal name. Imports under ``if TYPE_CHECKING:`` never run and do not count. An edge goes
to the module named (``from pkg import sub`` to ``pkg.sub`` when that is a module, else to ``pkg``); the packages
above it that Python initialises on the way are left out for the importing module's own ancestors (every
submodule "imports" its package, harmlessly) and kept for the others.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("resrl_analysis", "trainer")

def modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` file of ``packages`` under ``root``."""
    out = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imported_names(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The absolute names ``name`` (at ``path``) imports, anywhere in the file but ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
               for stmt in node.body for n in ast.walk(stmt)}
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            parent = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:
                out.add(f"{parent}.{a.name}" if f"{parent}.{a.name}" in mods else parent)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            out.add(node.args[0].value)
    return out


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the package modules it imports (see the module docstring for what counts)."""
    mods = modules(root, packages)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}  # its ancestor packages
        targets = set()
        for target in imported_names(name, path, mods):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # the module and the packages initialised on the way to it
                t = ".".join(parts[:i])
                if t in mods and t != name and (i == len(parts) or t not in own):
                    targets.add(t)
        graph[name] = targets
    return graph


def circular_groups(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of two or more modules: each module of one imports, through the others,
    every other one (sorted names; the printed message shows one circle of each, :func:`circle`)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the package has ~100 modules, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def circle(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """A shortest circle ``[a, b, ..., a]`` through the first module of a :func:`circular_groups` group."""
    comp = set(group)
    start = min(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no circle in component {sorted(comp)}")  # pragma: no cover - Tarjan gave one


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_graph_sees_every_kind_of_import(tmp_path):
    # A made-up package: each kind of import the docstring promises, and one that must not count.
    _write(tmp_path, {
        "pkg/__init__.py": "from .a import f\n",
        "pkg/a.py": "from . import b\ndef f():\n    from .sub import c\n",
        "pkg/b.py": "import importlib\ndef g():\n    return importlib.import_module('pkg.sub.d')\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import f\n",
        "pkg/sub/d.py": "from ..b import g\n",
    })
    g = import_graph(tmp_path, ("pkg",))
    assert g["pkg"] == {"pkg.a"}
    assert g["pkg.a"] == {"pkg.b", "pkg.sub", "pkg.sub.c"}  # `from . import b`; function level, via pkg.sub
    assert g["pkg.b"] == {"pkg.sub", "pkg.sub.d"}  # importlib with a literal name
    assert g["pkg.sub.c"] == set()  # TYPE_CHECKING only
    assert circular_groups(g) == [["pkg.b", "pkg.sub.d"]]
    assert circle(g, ["pkg.b", "pkg.sub.d"]) == ["pkg.b", "pkg.sub.d", "pkg.b"]  # importlib, then `from ..b`


def test_no_import_circles():
    g = import_graph()
    found = circular_groups(g)
    assert not found, "import circles (the modules of each; one circle through them):\n" + "\n".join(
        f"{c}: {' -> '.join(circle(g, c))}" for c in found)


def test_the_real_graph_is_read():
    # Guard against a graph that finds nothing because it reads nothing: known edges of both halves are there.
    g = import_graph()
    assert "resrl_analysis.rundir" in g["resrl_analysis.probe_sets"]
    assert "resrl_analysis.rewards" in g["trainer.tasks.multiplication"]
    assert "resrl_analysis.probe_sets" in g["resrl_analysis.probes.lld"]
    assert not any(t.startswith("trainer") for m, ts in g.items() if m.startswith("resrl_analysis") for t in ts)
