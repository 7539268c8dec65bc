"""Every plot function renders with Agg and draws exactly the data it was given."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from resrl_analysis import plots  # noqa: E402
from resrl_analysis.plots.style import ALGORITHM_COLORS, save_figure  # noqa: E402

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_pass_at_k_lines_carry_the_data_and_fixed_colours():
    ks = [1, 2, 4, 8]
    f = pd.DataFrame({"k": ks * 2, "pass_at_k": [.1, .2, .3, .4, .2, .3, .5, .6],
                      "label": ["resrl"] * 4 + ["grpo"] * 4, "task": ["mul"] * 8})
    fig = plots.plot_pass_at_k(f)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    lines = {ln.get_label(): ln for ln in ax.lines}
    assert list(lines) == ["grpo", "resrl"]  # canonical order
    np.testing.assert_allclose(lines["resrl"].get_ydata(), [.1, .2, .3, .4])
    assert matplotlib.colors.to_rgb(lines["grpo"].get_color()) == pytest.approx(ALGORITHM_COLORS["grpo"])


def test_training_dynamics_panels_and_values():
    m = pd.DataFrame({"step": [1, 2, 3] * 2, "reward/mean": [.1, .2, .4, .3, .3, .2],
                      "actor/entropy": [1.0, .9, .8, 1.0, 1.0, 1.0], "label": ["nsr"] * 3 + ["grpo"] * 3})
    fig = plots.plot_training_dynamics(m)
    assert [a.get_title() for a in fig.axes] == ["reward/mean", "actor/entropy"]
    nsr = [ln for ln in fig.axes[0].lines if ln.get_label() == "nsr"][0]
    np.testing.assert_allclose(nsr.get_ydata(), [.1, .2, .4])
    with pytest.raises(ValueError, match="none of"):
        plots.plot_training_dynamics(m[["step", "label"]])


def test_lld_bars_sorted_and_flagged():
    f = pd.DataFrame({"delta": [0.3, -0.2, 0.1, -0.5, 0.0], "label": ["grpo"] * 3 + ["resrl"] * 2})
    fig = plots.plot_lld_bars(f)
    heights = [sorted(p.get_height() for p in a.patches) for a in fig.axes]
    assert heights == [[-0.2, 0.1, 0.3], [-0.5, 0.0]]
    assert "LLD 33%" in fig.axes[0].get_title() and "LLD 100%" in fig.axes[1].get_title()


def test_mean_band_plots_average_per_step():
    f = pd.DataFrame({"step": [0, 0, 0, 10, 10, 10], "delta": [1, 2, 3, 4, 5, 9.0], "label": ["nsr"] * 6})
    ax = plots.plot_lld_over_steps(f)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [2.0, 6.0])
    g = f.rename(columns={"delta": "group_cosine"})
    ax2 = plots.plot_group_cosine_over_steps(g, ax=plt.subplots()[1])
    np.testing.assert_allclose(ax2.lines[0].get_ydata(), [2.0, 6.0])


def test_cosine_violin_one_per_label():
    rng = np.random.default_rng(0)
    f = pd.DataFrame({"cosine": rng.uniform(-1, 1, 60), "label": ["grpo", "nsr", "resrl"] * 20})
    ax = plots.plot_cosine_distribution(f)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["grpo", "nsr", "resrl"]
    assert len(ax.collections) >= 3


def test_bound_validation_counts_violations():
    f = pd.DataFrame({"true": [0.1, 0.5, 2.0, 3.0], "bound": [1.0, 0.5, 1.0, 4.0]})
    ax = plots.plot_bound_validation(f)
    assert ax.get_title() == "violations: 1 / 4"
    offsets = np.concatenate([c.get_offsets() for c in ax.collections])
    assert len(offsets) == 4  # every pair drawn once (ok or violation)


def test_proxy_panels_use_given_rho():
    f = pd.DataFrame({"residual": [1, 2, 3, 1, 2, 3], "interference": [1, 2, 3, 3, 1, 2],
                      "representation": ["head_input"] * 3 + ["penultimate+ln"] * 3})
    fig = plots.plot_proxy_vs_interference(f, rho={"head_input": 0.9})
    assert fig.axes[0].get_title() == "head_input  (ρ = 0.90)"
    assert fig.axes[1].get_title() == "penultimate+ln  (ρ = -0.50)"
    assert len(fig.axes[0].collections[0].get_offsets()) == 3


def test_subspace_and_heatmap_and_first_order(tmp_path):
    ax = plots.plot_explained_variance(pd.DataFrame({"rank": [1, 2, 1, 2], "explained": [.4, .9, .6, 1.0],
                                                     "label": ["a", "a", "b", "b"]}))
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [.4, .9])
    fig = plots.plot_residual_weight_hist([0.0, 1.0, 2.0, 3.0, 4.0], [0.1, 0.5, 1.0], q_low=0.25, q_high=0.75)
    assert [ln.get_xdata()[0] for ln in fig.axes[0].lines] == [1.0, 3.0]
    assert sum(p.get_height() for p in fig.axes[0].patches) == 5
    ax = plots.plot_token_heatmap(list("12*3"), [0.1, None, 0.5, 1.0], title="ω")
    assert [t.get_text() for t in ax.texts] == list("12*3")
    with pytest.raises(ValueError, match="tokens"):
        plots.plot_token_heatmap(["a"], [1.0, 2.0])
    ax = plots.plot_first_order(pd.DataFrame({"predicted": [.1, .2], "measured": [.1, .3], "label": ["grpo"] * 2}))
    np.testing.assert_allclose(ax.collections[0].get_offsets(), [[.1, .1], [.2, .3]])
    paths = save_figure(ax.figure, tmp_path / "fo")
    assert all(p.stat().st_size > 0 for p in paths) and not list(tmp_path.glob(".*"))


def test_pass_at_k_checkpoints_of_one_run_are_distinguishable():
    # One run, a line per checkpoint: one colour, but each step its own line style and marker,
    # in step order (4 before 40), and the legend names the step.
    ks = [1, 2, 4]
    labels = ["step 40", "step 0", "step 4"]
    f = pd.DataFrame({"k": ks * 3, "pass_at_k": np.linspace(.1, .9, 9), "label": np.repeat(labels, 3)})
    ax = plots.plot_pass_at_k(f).axes[0]
    assert [ln.get_label() for ln in ax.lines] == ["step 0", "step 4", "step 40"]
    styles = {(ln.get_linestyle(), ln.get_marker()) for ln in ax.lines}
    assert len(styles) == 3
    assert len({matplotlib.colors.to_rgb(ln.get_color()) for ln in ax.lines}) == 1
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["step 0", "step 4", "step 40"]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), f[f.label == "step 0"].pass_at_k)


def test_pass_at_k_two_runs_of_one_algorithm_differ_in_style():
    f = pd.DataFrame({"k": [1, 2] * 3, "pass_at_k": [.1, .2, .3, .4, .5, .6],
                      "label": ["resrl-a"] * 2 + ["resrl-b"] * 2 + ["grpo"] * 2})
    lines = {ln.get_label(): ln for ln in plots.plot_pass_at_k(f).axes[0].lines}
    a, b = lines["resrl-a"], lines["resrl-b"]
    assert matplotlib.colors.to_rgb(a.get_color()) == pytest.approx(ALGORITHM_COLORS["resrl"])
    assert a.get_color() == b.get_color() and a.get_linestyle() != b.get_linestyle()
    assert lines["grpo"].get_linestyle() == "-"


def test_saved_figures_get_the_ordinary_file_mode(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        paths = save_figure(plt.subplots()[0], tmp_path / "m", ("png", "pdf"))
    finally:
        os.umask(old)
    assert [stat.S_IMODE(p.stat().st_mode) for p in paths] == [0o644, 0o644]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pdf", "m.png"]  # no temporary file left
