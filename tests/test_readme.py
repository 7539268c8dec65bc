"""What a newcomer meets: the README's commands work as written, and every path and section it cites exists.

(a) The loop section of README.md runs, line by line as written, in bash, in a fresh copy of the
    repository (the tracked files only) with a fresh HOME and the venv's bin on PATH (as the README
    says: `source .venv/bin/activate`); afterwards the copy's tracked files are unchanged and its run
    directories are ignored by git.
(b) Every file path, `docs/<page>.md#anchor` and `docs/<page>.md § Section` cited by the markdown files (and by
    the docstrings and notebooks that cite docs/) exists.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LOOP_HEADING = "## The loop"
LOOP_TIMEOUT_S = 600  # the loop takes about a minute; a hung command fails instead of stalling the suite


def _tracked(pattern: str | None = None) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", *([pattern] if pattern else [])], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and (ROOT / f).exists()]


def readme_section(heading: str, text: str | None = None) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    text = README.read_text(encoding="utf-8") if text is None else text
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines))
                if re.match(rf"#{{1,{level}}} ", lines[i])), len(lines))
    return "\n".join(lines[start:end])


def loop_commands(section: str) -> list[str]:
    """The lines of the first fenced code block of ``section``, in order, blank lines dropped.

    >>> loop_commands("intro\\n```bash\\nresrl a  # c\\n\\nresrl b\\n```\\nafter")
    ['resrl a  # c', 'resrl b']
    """
    m = re.search(r"^```[a-z]*\n(.*?)^```", section, flags=re.S | re.M)
    assert m, "the loop section has no fenced code block"
    return [ln for ln in m.group(1).splitlines() if ln.strip()]


@pytest.mark.unit
def test_setup_commands_are_make_demo_and_make_test():
    setup = readme_section("## Set up on a fresh machine")
    blocks = [ln.strip() for ln in setup.splitlines() if ln.startswith("    ")]
    assert blocks[:2] == ["make demo", "make test"]
    assert "source .venv/bin/activate" in blocks  # how `resrl` gets on PATH


# ----------------------------------------------------------------------------- (a) the loop, as written


@pytest.fixture()
def repo_copy(tmp_path) -> Path:
    """The tracked files of this working tree (uncommitted edits included) in a fresh git repository."""
    dst = tmp_path / "repo"
    for f in _tracked():
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=dst, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dst, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=dst, check=True)
    return dst


def console_scripts(repo: Path, bin_dir: Path) -> Path:
    """The console scripts that installing ``repo`` would create (its ``[project.scripts]``), for this
    interpreter, in ``bin_dir``: the copy's own entry points, whatever the venv was installed from."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    toml = (repo / "pyproject.toml").read_text(encoding="utf-8")  # tomllib is 3.11+; this table is simple
    table = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[|\Z)", toml, flags=re.S | re.M)
    assert table, "pyproject.toml has no [project.scripts]"
    scripts = dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.]+:\w+)"', table.group(1), flags=re.M))
    assert "resrl" in scripts, table.group(1)
    for name, target in scripts.items():
        module, func = target.split(":")
        f = bin_dir / name
        f.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
        f.chmod(0o755)
    return bin_dir


@pytest.mark.e2e
@pytest.mark.slow
def test_readme_loop_runs_as_written_and_leaves_the_tree_clean(repo_copy, tmp_path):
    from trainer.warmstart import TINY_WARMSTART_DIR

    if not (TINY_WARMSTART_DIR / "config.json").is_file():
        pytest.skip(f"no shipped warm start at {TINY_WARMSTART_DIR}: the tiny preset cannot train")
    commands = loop_commands(readme_section(LOOP_HEADING))
    assert any(c.startswith("resrl figures") for c in commands)
    assert not any(c.startswith("resrl demo") for c in commands), "keep the full demo out of the loop"
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RESRL_", "MPL", "PYTHON"))}
    env.update(HOME=str(home), PYTHONPATH=str(repo_copy),  # the copy's code, not an installed one
               PATH=os.pathsep.join([str(console_scripts(repo_copy, tmp_path / "bin")),
                                     str(Path(sys.executable).parent), env.get("PATH", "")]))
    for cmd in commands:
        proc = subprocess.run(["bash", "-c", cmd], cwd=repo_copy, env=env, capture_output=True, text=True,
                              timeout=LOOP_TIMEOUT_S)
        assert proc.returncode == 0, f"README command failed: {cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        if cmd.startswith("resrl probe"):
            assert "wrote" in proc.stdout and "summary.json" in proc.stdout, proc.stdout  # says where

    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo_copy, capture_output=True, text=True,
                            check=True).stdout
    assert status == "", f"the README loop changed or added files git does not ignore:\n{status}"
    figs = sorted((repo_copy / "runs" / "resrl" / "figures").glob("*.png"))  # beside the input
    assert len(figs) >= 8, figs
    assert (repo_copy / "runs" / "resrl" / "figures" / "pass_at_k.pdf").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert {stat.S_IMODE(f.stat().st_mode) for f in figs} == {0o666 & ~umask}
    assert not list((repo_copy / "figures").glob("*.pdf"))


# ----------------------------------------------------------------------------- (b) citations exist

_EXT = r"(?:md|py|png|pdf|ipynb|sh|json|jsonl|yaml|yml|toml|txt|cfg)"
_PATH = re.compile(rf"(?<![\w./$<{{-])((?:[\w.-]+/)+[\w.-]*\.{_EXT}|[\w-]+\.{_EXT})(?![\w/])")
_DIR = re.compile(r"`((?:[\w.-]+/)+)`")
_ANCHOR = re.compile(r"((?:[\w.-]+/)*[\w.-]+\.md)?#([\w-]+)")
_SECTION = re.compile(r"((?:[\w.-]+/)*[\w.-]+\.md)\s*§\s*([^,;:.)`\n]+)")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens.

    >>> github_anchor("Factorised head gradient"), github_anchor("PPO-clip loss"), github_anchor("Pass@k")
    ('factorised-head-gradient', 'ppo-clip-loss', 'passk')
    """
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(md: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", md.read_text(encoding="utf-8"), flags=re.S | re.M)
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)]


def _top_level() -> set[str]:
    return {f.split("/")[0] for f in _tracked()}


def _resolve(cited: str, source: Path) -> Path | None:
    """The cited path (relative to the citing file, else to the repository root), or None when it is
    not meant to be in the repository (a generated file, a placeholder, an example)."""
    cited = cited.split("#")[0]
    if not cited or "://" in cited or re.search(r"X{3,}|N{3,}|\bRUN_DIR\b|\bRUN/|\.\.\.", cited):
        return None
    for base in (source.parent, ROOT):
        p = (base / cited).resolve()
        if p.exists():
            return p
    first = Path(cited).parts[0]
    return ROOT / cited if first in _top_level() else None  # e.g. demo_out/, runs/: made by commands


def _citing_files() -> list[Path]:
    return [ROOT / f for f in _tracked() if f.endswith((".md", ".py", ".ipynb"))]


@pytest.mark.unit
def test_every_cited_file_exists():
    missing = []
    for src in _citing_files():
        text = src.read_text(encoding="utf-8")
        if src.suffix == ".md":
            cands = {*_PATH.findall(text), *_DIR.findall(text), *_LINK.findall(text)}
        else:  # code and notebooks: only what they cite of the docs
            cands = set(re.findall(r"(?<![\w/])(docs/[\w.-]+\.md)", text))
        for c in sorted(cands):
            p = _resolve(c, src)
            if p is not None and not p.exists():
                missing.append(f"{src.relative_to(ROOT)}: {c}")
    assert not missing, "cited paths that do not exist:\n" + "\n".join(missing)


@pytest.mark.unit
def test_every_cited_section_exists():
    missing, seen = [], 0
    for src in _citing_files():
        text = src.read_text(encoding="utf-8")
        for path, name in _SECTION.findall(text):
            p = _resolve(path, src)
            seen += 1
            if p is None or not p.is_file() or name.strip().lower() not in {h.lower() for h in headings(p)}:
                missing.append(f"{src.relative_to(ROOT)}: {path} § {name.strip()}")
        if src.suffix == ".md":
            for link in _LINK.findall(text):
                m = _ANCHOR.fullmatch(link)
                if m is None:
                    continue
                p = src if m.group(1) is None else _resolve(m.group(1), src)
                seen += 1
                if p is None or m.group(2) not in {github_anchor(h) for h in headings(p)}:
                    missing.append(f"{src.relative_to(ROOT)}: {link}")
        for path, anchor in re.findall(r"(?<![\w/])(docs/[\w.-]+\.md)#([\w-]+)", text):
            p = _resolve(path, src)
            seen += 1
            if p is None or anchor not in {github_anchor(h) for h in headings(p)}:
                missing.append(f"{src.relative_to(ROOT)}: {path}#{anchor}")
    assert seen > 10  # the parser found the citations at all
    assert not missing, "cited sections that do not exist:\n" + "\n".join(missing)


@pytest.mark.unit
def test_no_citation_of_the_private_design_notes():
    # Every tracked text file but this test (which has to name what it looks for).
    files = [src for src in _citing_files() if src.resolve() != Path(__file__).resolve()]
    bad = [f"{src.relative_to(ROOT)}:{i}" for src in files
           for i, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1) if "DESIGN §" in line]
    assert not bad, "cite docs/MATH.md (§ section) or docs/RUN_DIRECTORY.md instead of DESIGN §:\n" + "\n".join(bad)


@pytest.mark.unit
def test_math_doc_names_an_existing_function_for_each_formula():
    """docs/MATH.md says where each formula is implemented: every `module.py` — `name` pair exists."""
    text = (ROOT / "docs" / "MATH.md").read_text(encoding="utf-8")
    checked = 0
    for para in text.split("\n\n"):
        if not para.startswith("Code:"):
            continue
        for module, names in re.findall(r"`([\w/]+\.py)`\s*(?:—|\()([^;]*)", para):
            src = (ROOT / module).read_text(encoding="utf-8")
            for name in re.findall(r"`([A-Za-z_]\w*)(?:\.\w+)?`", names):
                if name in ("torch", "np"):  # a library's function named beside ours
                    continue
                checked += 1
                assert re.search(rf"^\s*(?:def|class) {name}\b|^{name}\b", src, flags=re.M), f"{module}: no {name}"
    assert checked >= 30


# ----------------------------------------------------------------------------- help texts


@pytest.mark.unit
@pytest.mark.parametrize("module, add", [("resrl_analysis.figures", "add_figures_arguments"),
                                         ("trainer.demo", "add_demo_arguments"),
                                         ("resrl_analysis.compare", "add_compare_arguments"),
                                         ("trainer.study", "add_study_arguments"),
                                         ("resrl_analysis.probes.runner", "add_probe_arguments"),
                                         ("resrl_analysis.view.cli", "add_view_arguments")])
def test_help_shows_each_default_once_and_never_an_empty_one(module, add):
    """Whatever formatter the dispatcher gives the subparser (it used ArgumentDefaultsHelpFormatter),
    no option reads "(default: None)", "(default: )" or states its default twice."""
    import argparse
    import importlib

    parser = argparse.ArgumentParser(prog="resrl x", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    getattr(importlib.import_module(module), add)(parser)
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: )" not in text, text
    options = re.split(r"\n  (?=-)", text)
    assert all(o.count("(default") <= 1 for o in options), text
