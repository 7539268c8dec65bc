"""The notebooks run top to bottom (nbclient) against a small run, and are stored without outputs.

Notebooks 02-05 read their run from ``RESRL_RUN_DIR``: one short ResRL run of the tiny preset made
once for the module (a fake run from :func:`write_fake_run` when the shipped warm start is absent);
notebook 01 trains its own. The kernel is this interpreter, registered under a private kernelspec
in a temporary directory, so whatever ``python3`` kernel the machine may have (or lack) does not
matter: a fresh ``.venv`` with the ``dev`` extra is enough. Notebooks 02-05 also open foreign runs
(a verl-shaped directory here) with ``RESRL_PROBE_SET``, and train only when no run is given.
"""

from __future__ import annotations

import json
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
    "05_entropy_dynamics.ipynb",
)
QUICKSTART = EXPECTED[0]
ANALYSIS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb") if p.name != QUICKSTART)
KERNEL = "resrl-notebook-tests"
TRAINS = "no run given"  # what the opening cell prints before it trains a run itself
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
    """One short run for notebooks 02-05: the tiny preset (ResRL, a checkpoint every step) when the
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


def test_the_notebooks_exist():
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
    # One call shows the token page inline: the whole page inside the cell's HTML output (a srcdoc iframe).
    pages = [o["data"]["text/html"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
             if "text/html" in o.get("data", {}) and "srcdoc=" in o["data"]["text/html"]]
    assert len(pages) == 1 and "resrl-view-data" in pages[0] and "rollouts:4" in pages[0]
    print(f"{QUICKSTART}: {seconds:.1f} s")


@pytest.mark.slow
@pytest.mark.parametrize("name", ANALYSIS)
def test_analysis_notebook_runs(name, kernel, small_run, monkeypatch):
    monkeypatch.setenv("RESRL_RUN_DIR", str(small_run))
    for var in ("RESRL_BASE_MODEL", "RESRL_PROBE_SET"):  # the run's own probe set, whatever the shell has set
        monkeypatch.delenv(var, raising=False)
    nb, seconds = execute(name, kernel)
    assert_figures_shown(nb, name)
    assert_no_progress_warning(nb, name)
    first = nb.cells[next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")]
    assert str(small_run) in first.outputs[-1]["data"]["text/plain"], "the notebook did not read RESRL_RUN_DIR"
    print(f"{name}: {seconds:.1f} s")


# ----------------------------------------------------------------------------- runs we did not write


def opening_cell(name: str) -> str:
    """The first code cell: it decides which run the notebook reads (plain Python, no magics)."""
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    return next(c.source for c in nb.cells if c.cell_type == "code")


def run_opening_cell(name: str, monkeypatch, **env: str) -> dict:
    """Execute the notebook's opening cell here, in notebooks/ (as the kernel would), with ``env`` set
    and the other RESRL_* variables unset; returns its namespace."""
    for var in ("RESRL_RUN_DIR", "RESRL_BASE_MODEL", "RESRL_PROBE_SET"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.chdir(NOTEBOOK_DIR)
    namespace: dict = {}
    exec(compile(opening_cell(name), f"{name}:cell 1", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("name", ANALYSIS)
def test_opening_cell_opens_foreign_runs_and_refuses_other_paths(name, tmp_path, monkeypatch, capsys):
    from resrl_analysis.errors import ProbeError

    # Layouts only: discovery reads names and config.json, never weights.
    verl = tmp_path / "verl"
    for step in (0, 2):
        hf = verl / f"global_step_{step}" / "actor" / "huggingface"
        hf.mkdir(parents=True)
        (hf / "config.json").write_text("{}")
        (hf / "model.safetensors").write_bytes(b"")
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"prompt": "1*2=", "responses": ["2", "3"], "rewards": [1, 0]}) + "\n")
    ns = run_opening_cell(name, monkeypatch, RESRL_RUN_DIR=str(verl), RESRL_PROBE_SET=str(probes))
    assert ns["info"].kind == "verl" and ns["info"].steps == (0, 2) and ns["PROBE_SET"] == str(probes)
    out = capsys.readouterr().out
    assert f"verl run {verl}: checkpoints at steps [0, 2]" in out and TRAINS not in out

    trl, base = tmp_path / "trl", tmp_path / "base"
    (trl / "checkpoint-3").mkdir(parents=True)
    (trl / "completions").mkdir()
    (trl / "completions" / "completions_00003.parquet").write_bytes(b"")
    base.mkdir()
    (base / "config.json").write_text("{}")
    ns = run_opening_cell(name, monkeypatch, RESRL_RUN_DIR=str(trl), RESRL_BASE_MODEL=str(base))
    assert ns["info"].steps == (0, 3) and ns["info"].checkpoints[0][1] == base
    assert ns["PROBE_SET"] == trl / "completions" / "completions_00003.parquet"  # the run's own completion log

    with pytest.raises(ProbeError, match=r"RESRL_PROBE_SET") as e:  # verl keeps no probe set of its own
        run_opening_cell(name, monkeypatch, RESRL_RUN_DIR=str(verl))
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProbeError, match=r"empty: not a run directory") as e:  # never a run trained in its place
        run_opening_cell(name, monkeypatch, RESRL_RUN_DIR=str(tmp_path / "empty"))
    assert "\n" not in str(e.value) and TRAINS not in capsys.readouterr().out


@pytest.fixture(scope="module")
def verl_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run, probe set): a verl-shaped checkpoint directory, the tiny warm start merged to HF weights
    at global_step_0 and, head perturbed, at global_step_2; and a JSONL of prompt/responses/rewards."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.warmstart import TINY_WARMSTART_DIR

    if not (TINY_WARMSTART_DIR / "config.json").is_file():
        pytest.skip(f"no shipped warm start at {TINY_WARMSTART_DIR}")
    root = tmp_path_factory.mktemp("verl")
    tok = AutoTokenizer.from_pretrained(TINY_WARMSTART_DIR)
    for step in (0, 2):
        model = AutoModelForCausalLM.from_pretrained(TINY_WARMSTART_DIR)
        with torch.no_grad():  # a different policy at step 2, so that Δ log π is not zero
            noise = torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(step))
            model.lm_head.weight.add_(0.05 * step * noise)  # (V, d)
        hf = root / "ckpts" / f"global_step_{step}" / "actor" / "huggingface"
        model.save_pretrained(hf)
        tok.save_pretrained(hf)
    probes = root / "probes.jsonl"
    pairs = [(12, 34), (23, 47), (56, 78), (31, 42)]
    probes.write_text("".join(json.dumps({"prompt": f"{a}*{b}=", "responses": [str(a * b), str(a * b + 1), "7"],
                                          "rewards": [1, 0, 0]}) + "\n" for a, b in pairs))
    return root / "ckpts", probes


@pytest.mark.slow
def test_lld_notebook_runs_on_a_verl_run(kernel, verl_run, monkeypatch):
    run, probes = verl_run
    monkeypatch.setenv("RESRL_RUN_DIR", str(run))
    monkeypatch.setenv("RESRL_PROBE_SET", str(probes))
    monkeypatch.delenv("RESRL_BASE_MODEL", raising=False)
    name = "02_lazy_likelihood_displacement.ipynb"
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    # Appended here only: what the kernel scored, and whether it ever imported the trainer's loop.
    nb.cells.append(nbformat.v4.new_code_cell(
        'import sys\nprint("scored steps", sorted({int(s) for s in scores.to_frame().step}), '
        '"trained", "trainer.loop" in sys.modules)'))
    client = nbclient.NotebookClient(nb, kernel_name=kernel, timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    t0 = time.perf_counter()
    client.execute()
    assert_figures_shown(nb, name)
    text = ["".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in c.outputs)
            for c in nb.cells if c.cell_type == "code"]
    assert f"verl run {run}: checkpoints at steps [0, 2]; probe set {probes}" in text[0]
    assert TRAINS not in "".join(text)
    shown = " ".join(text[2].split())  # run.label, the checkpoint steps, the probe set (pretty-printed)
    assert shown.startswith(f"('verl', [0, 2], {{'source': '{probes}'") and "'n_mixed': 4" in shown
    assert text[-1].strip() == "scored steps [0, 2] trained False"
    print(f"{name} on a verl run: {time.perf_counter() - t0:.1f} s")
