"""The direction of imports (docs/ARCHITECTURE.md: the core never imports the trainer, not even lazily): checked twice,
statically over the source of every ``resrl_analysis`` module, and by importing each of them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "resrl_analysis"


def _is_trainer(name: str | None) -> bool:
    return name is not None and (name == "trainer" or name.startswith("trainer."))


def trainer_imports(source: str, filename: str = "<string>") -> list[str]:
    """``file:line: what`` for every way ``source`` reaches the trainer: ``import trainer...``,
    ``from trainer... import``, and ``importlib.import_module`` / ``__import__`` / ``find_spec`` called
    with a string starting with "trainer"."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [f"{filename}:{node.lineno}: import {a.name}" for a in node.names if _is_trainer(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_trainer(node.module):
            found.append(f"{filename}:{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if name in ("import_module", "__import__", "find_spec") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("trainer"):
                    found.append(f"{filename}:{node.lineno}: {name}({arg.value!r})")
    return found


@pytest.mark.unit
def test_the_scanner_finds_every_form():
    src = ("import trainer\nimport os, trainer.loop as l\nfrom trainer.config import X\n"
           "import importlib\nimportlib.import_module('trainer.cli')\n__import__('trainer')\n"
           "def f():\n    from trainer import loop\n"
           "from trainers import y\nimport_module('resrl_analysis.x')\nfrom . import trainer\n")
    assert [x.split(": ", 1)[1] for x in trainer_imports(src)] == [
        "import trainer", "import trainer.loop", "from trainer.config import ...", "import_module('trainer.cli')",
        "__import__('trainer')", "from trainer import ..."]


@pytest.mark.unit
def test_core_source_never_imports_the_trainer():
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 10
    found = [x for f in files for x in trainer_imports(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert found == []


@pytest.mark.integration
def test_importing_every_core_module_loads_no_trainer_module():
    code = (
        "import importlib, pkgutil, sys\n"
        "import resrl_analysis\n"
        "mods = pkgutil.walk_packages(resrl_analysis.__path__, 'resrl_analysis.')\n"
        "names = ['resrl_analysis'] + [m.name for m in mods]\n"
        "for n in names:\n"
        "    importlib.import_module(n)\n"
        "bad = sorted(m for m in sys.modules if m == 'trainer' or m.startswith('trainer.'))\n"
        "print(len(names), bad)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, bad = proc.stdout.strip().split(" ", 1)
    assert int(count) > 10 and bad == "[]"


@pytest.mark.unit
def test_the_dispatcher_lives_in_the_trainer():
    assert not (CORE / "cli.py").exists()
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'resrl = "trainer.cli:main"' in text


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
