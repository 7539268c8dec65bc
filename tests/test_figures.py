"""`resrl figures`: every figure drawn from a probed run's measured tables (integration + e2e)."""

from __future__ import annotations

import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from resrl_analysis import figures  # noqa: E402
from resrl_analysis.probes.synthetic import write_fake_run  # noqa: E402
from trainer.cli import main as resrl_main  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def probed_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    runs = []
    for seed, algo in enumerate(["grpo", "resrl"]):
        p = write_fake_run(root / algo, steps=[0, 1, 2], seed=seed)
        cfg = yaml.safe_load((p / "config.yaml").read_text())
        cfg["algorithm"] = algo
        (p / "config.yaml").write_text(yaml.safe_dump(cfg))
        assert resrl_main(["probe", str(p), "--no-progress", "--samples", "4"]) == 0
        runs.append(p)
    return runs


def test_figures_show_the_probe_tables(probed_runs):
    runs = [figures.load_run(p) for p in probed_runs]
    assert [r.label for r in runs] == ["grpo", "resrl"]
    fig = figures.fig_lld_bars(runs)
    deltas = runs[0].probes["lld"].deltas
    last = deltas[(deltas.comparison == "vs_initial") & (deltas.step_to == 2) & deltas.delta_pos_sum.notna()]
    drawn = sorted(p.get_height() for p in fig.axes[0].patches)
    np.testing.assert_allclose(drawn, sorted(last.delta_pos_sum), rtol=1e-6)
    fig = figures.fig_pass_at_k(runs)
    pk = runs[1].probes["diversity"].pass_at_k
    line = [ln for ln in fig.axes[0].lines if ln.get_label() == "resrl"][0]
    np.testing.assert_allclose(line.get_ydata(), pk[pk.step == pk.step.max()].sort_values("k").pass_at_k)
    # No ResRL residuals in a fake run's dumps: the figure says so instead of drawing something else.
    assert "no ResRL residuals" in figures.fig_residual_weights(runs)


def test_resrl_figures_cli_writes_png_and_pdf(probed_runs, tmp_path):
    out = tmp_path / "figs"
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "figures", *map(str, probed_runs),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ["pass_at_k", "lld_bars", "bound_validation", "proxy_vs_interference", "training_dynamics"]:
        assert (out / f"{name}.png").stat().st_size > 1000 and (out / f"{name}.pdf").is_file()
    assert "residual_weight_hist: skipped:" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "trainer.cli", "figures", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "not a run directory" in bad.stderr and bad.stderr.count("\n") == 1
