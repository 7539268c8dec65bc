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


# ============================================================================ seeds, log axes, whole responses


def _band_ys(ax) -> np.ndarray:
    """The y values of the vertices of the band(s) drawn by fill_between on ``ax``."""
    return np.concatenate([p.vertices[:, 1] for c in ax.collections for p in c.get_paths()])


def test_seed_bands_equal_mean_interval_and_are_drawn():
    from resrl_analysis.stats import mean_interval

    rng = np.random.default_rng(0)
    rows = [{"label": lab, "seed": s, "step": t, "v": float(rng.normal(t, 1.0))}
            for lab in ("grpo", "resrl") for s in range(3) for t in (1, 2, 3)]
    rows += [{"label": "grpo", "seed": 0, "step": 4, "v": float("nan")}]  # a step without a value: skipped
    f = pd.DataFrame(rows)
    t = plots.seed_bands(f, "step", "v")
    assert list(t.step[t.label == "grpo"]) == [1, 2, 3]
    for _, row in t.iterrows():
        iv = mean_interval(f[(f.label == row.label) & (f.step == row.step)].v.tolist())
        assert (row["mean"], row.lo, row.hi, row.n) == pytest.approx((iv.mean, iv.lo, iv.hi, 3))
    ax = plots.plot_seed_bands(t, ylabel="v")
    lines = {ln.get_label(): ln for ln in ax.lines}
    assert list(lines) == ["grpo (3 seeds)", "resrl (3 seeds)"]
    g = t[t.label == "grpo"]
    np.testing.assert_allclose(lines["grpo (3 seeds)"].get_ydata(), g["mean"])
    ys = _band_ys(ax)
    for v in [*g.lo, *g.hi]:  # every end of every interval is a vertex of a band
        assert np.isclose(ys, v).any()


def test_one_seed_is_a_plain_line_that_says_1_seed():
    f = pd.DataFrame({"label": ["nsr"] * 3, "seed": [0] * 3, "step": [1, 2, 3], "v": [.1, .2, .3]})
    t = plots.seed_bands(f, "step", "v")
    assert t.lo.isna().all() and t.hi.isna().all()
    ax = plots.plot_seed_bands(t, ylabel="v")
    assert [ln.get_label() for ln in ax.lines] == ["nsr (1 seed)"] and not ax.collections


def test_training_dynamics_with_seeds_draws_mean_and_band_and_y_labels():
    from resrl_analysis.stats import mean_interval

    m = pd.DataFrame({"step": [1, 2] * 3, "seed": [0, 0, 1, 1, 2, 2], "label": ["grpo"] * 6,
                      "reward/mean": [.1, .2, .3, .5, .2, .2], "response/length_mean": [4.0] * 6})
    fig = plots.plot_training_dynamics(m, keys=("reward/mean", "response/length_mean"))
    assert all(a.get_ylabel() for a in fig.axes)
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), [0.2, 0.3])
    iv = mean_interval([.2, .5, .2])
    assert np.isclose(_band_ys(fig.axes[0]), iv.lo).any() and np.isclose(_band_ys(fig.axes[0]), iv.hi).any()


def test_overlapping_lines_are_said_so():
    m = pd.DataFrame({"step": [1, 2] * 4, "seed": [0, 0, 1, 1] * 2, "label": ["grpo"] * 4 + ["nsr"] * 4,
                      "reward/mean": [.1, .5, .2, .6, .1, .5, .2, .6], "actor/entropy": [1, 2, 1, 2, 3, 4, 3, 4]})
    fig = plots.plot_training_dynamics(m, keys=("reward/mean", "actor/entropy"))
    assert "lines overlap" in fig.axes[0].get_title() and "overlap" not in fig.axes[1].get_title()


def test_proxy_scatter_on_log_axes_keeps_zeros_at_a_stated_floor():
    f = pd.DataFrame({"residual": [0.0, 1e-15, 0.01, 0.5, 2.0], "interference": [0.0, 3.0, 1e-20, 2.0, 5.0],
                      "representation": ["a"] * 5})
    fig = plots.plot_proxy_vs_interference(f, log=True)
    ax = fig.axes[0]
    assert ax.get_xscale() == ax.get_yscale() == "log"
    xy = ax.collections[0].get_offsets()
    assert len(xy) == 5 and np.all(np.isfinite(xy)) and np.all(np.asarray(xy) > 0)  # every token drawn
    fx, fy = plots.log_floor(f.residual), plots.log_floor(f.interference)
    assert (fx, fy) == (1e-6, 1e-6)
    np.testing.assert_allclose(np.asarray(xy)[:, 0], np.maximum(f.residual, fx))
    np.testing.assert_allclose(np.asarray(xy)[:, 1], np.maximum(f.interference, fy))
    assert "2 of 5 ≤ 1e-06" in ax.get_xlabel() and "(2 ≤ 1e-06" in ax.get_ylabel()


def test_heatmap_draws_a_whole_30_token_response_with_shared_tokens_outlined():
    toks = [str(i % 10) for i in range(30)]
    shared = [i < 7 for i in range(30)]
    fig, ax = plt.subplots()
    plots.plot_token_heatmap(toks, np.linspace(0, 1, 30), ax=ax, shared=shared, colorbar_label="ω", vmin=0, vmax=1)
    assert [t.get_text() for t in ax.texts] == toks  # every token, in order
    assert len({round(t.get_position()[1], 6) for t in ax.texts}) == 2  # wrapped over two rows of 24
    outlined = [t.get_bbox_patch().get_edgecolor()[3] > 0 for t in ax.texts]
    assert outlined == shared and "7 of 30" in ax.get_title()
    cbar = [a for a in fig.axes if a is not ax]
    assert len(cbar) == 1 and cbar[0].get_ylabel() == "ω"


def test_explained_variance_stops_at_the_rank_that_matters():
    f = pd.DataFrame({"rank": list(range(1, 41)) * 2, "explained": [min(1.0, r / 5) for r in range(1, 41)]
                      + [min(1.0, r / 8) for r in range(1, 41)], "label": ["grpo"] * 40 + ["nsr"] * 40})
    ax = plots.plot_explained_variance(f, upto=0.99, max_rank=20)
    assert max(max(ln.get_xdata()) for ln in ax.lines[:2]) == 8 and "k = 8" in ax.get_xlabel()


def test_shared_unique_bars_are_seed_means_with_t_intervals():
    from resrl_analysis.stats import mean_interval

    f = pd.DataFrame({"label": ["grpo"] * 6, "seed": [0, 1, 2] * 2, "part": ["shared"] * 3 + ["unique"] * 3,
                      "value": [-.1, -.3, -.2, .5, .4, .9]})
    ax = plots.plot_lld_shared_unique(f)
    assert [round(p.get_height(), 6) for p in ax.patches] == [-0.2, 0.6]
    iv = mean_interval([.5, .4, .9])
    bars = [seg for c in ax.containers if isinstance(c, matplotlib.container.ErrorbarContainer)
            for seg in c.lines[2][0].get_segments()]  # each error bar: [(x, lo), (x, hi)]
    assert len(bars) == 2
    np.testing.assert_allclose(bars[1][:, 1], [iv.lo, iv.hi])
    dots = np.concatenate([c.get_offsets()[:, 1] for c in ax.collections if len(c.get_offsets()) == 3])
    np.testing.assert_allclose(sorted(dots), sorted(f.value))  # each seed's value drawn
    assert ax.get_ylabel() and any(list(ln.get_ydata()) == [0, 0] for ln in ax.lines)  # the zero line
