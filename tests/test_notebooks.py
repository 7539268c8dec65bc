"""The notebooks run top to bottom (nbclient) against a small run, and are stored without outputs.

Notebooks 02-04 read their run from ``RESRL_RUN_DIR``: one short ResRL run of the tiny preset made
once for the module (a fake run from :func:`write_fake_run` when the shipped warm start is absent);
notebook 01 trains its own. The kernel is this interpreter, registered under a private kernelspec
in a temporary directory, so whatever ``python3`` kernel the machine may have (or lack) does not
matter: a fresh ``.venv`` with the ``dev`` extra is enough.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.integration

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
EXPECTED = (
    "01_quickstart.ipynb",
    "02_lazy_likelihood_displacement.ipynb",
    "03_gradient_interference_and_bound.ipynb",
    "04_entropy_diversity_passk.ipynb",
)
QUICKSTART = EXPECTED[0]
ANALYSIS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb") if p.name != QUICKSTART)
KERNEL = "resrl-notebook-tests"
CELL_TIMEOUT_S = 300  # a hung cell fails instead of stalling the suite; the notebooks take well under a minute


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A kernelspec for this interpreter in a temporary JUPYTER_PATH; IPython profile and connection
    files in temporary directories too (nothing is read from or written to the user's home)."""
    from ipykernel.kernelspec import install

    root = tmp_path_factory.mktemp("jupyter")
    install(prefix=str(root), kernel_name=KERNEL)  # argv: [sys.executable, "-m", "ipykernel_launcher", ...]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(root / "share" / "jupyter"), prepend=os.pathsep)
        mp.setenv("IPYTHONDIR", str(root / "ipython"))
        mp.setenv("JUPYTER_RUNTIME_DIR", str(root / "runtime"))
        yield KERNEL


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """One short run for notebooks 02-04: the tiny preset (ResRL, a checkpoint every step) when the
    warm start is shipped, else a fake run with mixed groups."""
    from trainer.warmstart import TINY_WARMSTART_DIR

    out = tmp_path_factory.mktemp("notebook-run") / "resrl"
    if (TINY_WARMSTART_DIR / "config.json").is_file():
        from trainer.config import preset_config
        from trainer.loop import train

        return train(preset_config("tiny", algorithm="resrl", steps=3, save_every=1, output_dir=str(out),
                                   progress_bar="off", log_every=100))
    from resrl_analysis.probes.synthetic import write_fake_run

    return write_fake_run(out, steps=(0, 1, 2, 3))


def execute(name: str, kernel_name: str) -> tuple[object, float]:
    """Run a notebook in NOTEBOOK_DIR (its working directory); raises CellExecutionError on any error."""
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    t0 = time.perf_counter()
    client.execute()
    return nb, time.perf_counter() - t0


def assert_figures_shown(nb, name: str) -> None:
    """Every cell that draws (``with paper_style():``) displays a PNG: the figure reached the page."""
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "with paper_style():" in cell.source:
            shown = any("image/png" in out.get("data", {}) for out in cell.outputs)
            assert shown, f"{name}: cell {i} drew no figure:\n{cell.source}"


def assert_no_progress_warning(nb, name: str) -> None:
    """tqdm's "IProgress not found" warning means the environment lacks ipywidgets (in the dev and
    notebooks extras): the bars fall back to text and every notebook prints a warning."""
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            assert "TqdmWarning" not in out.get("text", ""), f"{name}: cell {i}: {out.get('text')}"


def test_the_four_notebooks_exist():
    assert set(EXPECTED) <= {p.name for p in NOTEBOOK_DIR.glob("*.ipynb")}


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")))
def test_notebook_is_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{name}: cell {i} holds outputs; strip them before committing "
                f"(jupyter nbconvert --clear-output --inplace notebooks/{name})")


@pytest.mark.slow
def test_quickstart_notebook_runs(kernel, tmp_path, monkeypatch):
    from trainer.warmstart import TINY_WARMSTART_DIR

    if not (TINY_WARMSTART_DIR / "config.json").is_file():
        pytest.skip(f"no shipped warm start at {TINY_WARMSTART_DIR}: the tiny preset cannot train")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook trains into tempfile.mkdtemp()
    monkeypatch.delenv("RESRL_RUN_DIR", raising=False)
    nb, seconds = execute(QUICKSTART, kernel)
    assert_figures_shown(nb, QUICKSTART)
    assert_no_progress_warning(nb, QUICKSTART)
    # the batch shape is printed from the config, not written by hand
    from trainer.config import preset_config

    cfg = preset_config("tiny")
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"{cfg.prompts_per_step} prompts × {cfg.n} responses per step" in printed
    print(f"{QUICKSTART}: {seconds:.1f} s")


@pytest.mark.slow
@pytest.mark.parametrize("name", ANALYSIS)
def test_analysis_notebook_runs(name, kernel, small_run, monkeypatch):
    monkeypatch.setenv("RESRL_RUN_DIR", str(small_run))
    nb, seconds = execute(name, kernel)
    assert_figures_shown(nb, name)
    assert_no_progress_warning(nb, name)
    first = nb.cells[next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")]
    assert str(small_run) in first.outputs[-1]["data"]["text/plain"], "the notebook did not read RESRL_RUN_DIR"
    print(f"{name}: {seconds:.1f} s")
