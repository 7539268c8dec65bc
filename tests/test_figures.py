"""`resrl figures`: every figure drawn from a probed run's measured tables (integration + e2e)."""

from __future__ import annotations

import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
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
    assert bad.returncode == 2 and "nope: no such directory" in bad.stderr and bad.stderr.count("\n") == 1  # bad input


# ============================================================================ seeds and readable figures


def _metrics_run(path, algo: str, seed: int, rng, *, config: dict | None = None) -> figures.RunData:
    steps = np.arange(1, 7)
    frac = rng.uniform(0, 1, len(steps))
    frac[2] = np.nan  # a step without a mixed group: no in-batch LLD
    m = pd.DataFrame({"step": steps, "reward/mean": rng.uniform(0, 1, len(steps)), "lld/batch_frac": frac,
                      "lld/batch_delta_mean": rng.normal(0, 1, len(steps)), "lld/mixed_groups": 5.0,
                      "lld/shared_token_delta_mean": rng.normal(-1, 1, len(steps)),
                      "lld/unique_token_delta_mean": rng.normal(1, 1, len(steps)),
                      **{k: rng.normal(0, 1e-3, len(steps)) for k in figures.ENTROPY_KEYS},
                      "update/kl_k3": rng.uniform(1e-4, 1e-3, len(steps)),
                      "update/pos_delta_per_kl": rng.normal(50, 10, len(steps)),
                      "update/selectivity_ratio": rng.normal(0.1, 0.05, len(steps)),
                      "resrl/weight_shared": rng.uniform(0.1, 0.2, len(steps)),
                      "resrl/weight_first_divergent": rng.uniform(0.1, 0.2, len(steps)),
                      "resrl/weight_after": rng.uniform(0.5, 0.7, len(steps))})
    m["update/groups"] = [[[g, float(c), float(p), 1e-3] for g, (c, p) in
                           enumerate(zip(rng.normal(0.02, 0.01, 4), rng.uniform(0.1, 1.0, 4)))] for _ in steps]
    cfg = {"algorithm": algo, "seed": seed, "lr": 1e-5, "output_dir": str(path), **(config or {})}
    return figures.RunData(path / f"{algo}-s{seed}", algo, cfg, m, seed=seed)


def test_runs_of_one_algorithm_and_config_are_seeds_others_keep_their_directory(tmp_path):
    rng = np.random.default_rng(0)
    runs = [_metrics_run(tmp_path, "grpo", s, rng) for s in range(3)]
    runs += [_metrics_run(tmp_path, "nsr", 0, rng), _metrics_run(tmp_path, "nsr", 1, rng, config={"lr": 1e-4})]
    foreign = [figures.RunData(tmp_path / d, "trl", {"algorithm": "trl"}, pd.DataFrame()) for d in ("a", "b")]
    figures._unique_labels(runs + foreign)
    assert [r.label for r in runs] == ["grpo"] * 3 + ["nsr-nsr-s0", "nsr-nsr-s1"]  # distinct lr: not seeds
    assert [r.label for r in foreign] == ["trl-a", "trl-b"]  # no seed: two runs, as before


def test_curves_over_steps_are_seed_means_with_t_bands(tmp_path):
    from resrl_analysis.stats import mean_interval

    rng = np.random.default_rng(1)
    runs = [_metrics_run(tmp_path, "grpo", s, rng) for s in range(3)] + [_metrics_run(tmp_path, "resrl", 0, rng)]
    fig = figures.fig_dynamics(runs)
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.lines}
    assert set(lines) == {"grpo (3 seeds)", "resrl (1 seed)"} and "1–3 seeds" in fig._suptitle.get_text()
    per_step = np.array([r.metrics["reward/mean"].to_numpy() for r in runs[:3]])  # (seeds, steps)
    np.testing.assert_allclose(lines["grpo (3 seeds)"].get_ydata(), per_step.mean(0))
    band = np.concatenate([p.vertices[:, 1] for c in ax.collections for p in c.get_paths()])
    for col in per_step.T:
        iv = mean_interval(col.tolist())
        assert np.isclose(band, iv.lo).any() and np.isclose(band, iv.hi).any()
    # in-batch LLD: the NaN step is skipped, not drawn as a gap or a zero; a zero line on the Δ panel
    fig = figures.fig_in_batch_lld(runs)
    assert [a.get_title().split("\n")[0] for a in fig.axes] == list(figures.IN_BATCH_KEYS)
    xs = {ln.get_label(): list(ln.get_xdata()) for ln in fig.axes[0].lines}
    assert xs["resrl (1 seed)"] == [1, 2, 4, 5, 6] and xs["grpo (3 seeds)"] == [1, 2, 4, 5, 6]
    assert any(list(ln.get_ydata()) == [0, 0] for ln in fig.axes[1].lines)
    # shared vs unique bars: each the mean over seeds of the runs' means over steps
    ax = figures.fig_lld_shared_unique(runs).axes[0]
    want = np.mean([r.metrics["lld/unique_token_delta_mean"].mean() for r in runs[:3]])
    heights = [p.get_height() for p in ax.patches]
    assert np.isclose(heights, want).any() and ax.get_ylabel().endswith("(nats)")


def _resrl_rollout_run(probed_runs) -> tuple[figures.RunData, list[list[bool]]]:
    """The probed ResRL fake run with a hand-made rollout dump: one group, a 30-token negative response
    sharing its first 7 tokens with a positive one; returns the run and the expected shared flags."""
    pos = [4 + (i % 10) for i in range(30)]  # digits of the fake run's character tokenizer
    neg = pos[:7] + [14 + (i % 5) for i in range(23)]
    rows = [{"group_id": 0, "prompt": "1+2=", "response": "x", "ground_truth": "3", "is_positive": True, "reward": 1.0,
             "response_ids": pos, "resrl_weights": [1.0] * 30, "resrl_residuals": [None] * 30},
            {"group_id": 0, "prompt": "1+2=", "response": "y", "ground_truth": "3", "is_positive": False,
             "reward": 0.0, "response_ids": neg, "resrl_weights": list(np.linspace(0.1, 1, 30)),
             "resrl_residuals": list(np.linspace(0, 1, 30))}]
    run = figures.load_run(probed_runs[1])
    run.rollouts = {2: rows}
    # slow reference: a negative token is shared when some positive has the same tokens up to it
    shared = [any(p["response_ids"][:t + 1] == neg[:t + 1] for p in rows if p["is_positive"]) for t in range(30)]
    return run, [shared]


def test_token_heatmap_draws_the_whole_response_and_marks_shared_tokens(probed_runs):
    run, (shared,) = _resrl_rollout_run(probed_runs)
    fig = figures.fig_token_heatmap([run])
    ax = fig.axes[0]
    assert len(ax.texts) == 30 and sum(shared) == 7
    assert [t.get_bbox_patch().get_edgecolor()[3] > 0 for t in ax.texts] == shared
    cbar = [a for a in fig.axes if hasattr(a, "_colorbar")]
    assert len(cbar) == 1 and "ω" in cbar[0].get_ylabel()


def test_pass_at_k_draws_start_and_end_in_distinct_styles(probed_runs):
    runs = [figures.load_run(p) for p in probed_runs]
    ax = figures.fig_pass_at_k(runs).axes[0]
    styles = {ln.get_label(): ln.get_linestyle() for ln in ax.lines}
    ends = {lab for lab in styles if "step 0" not in lab}
    starts = set(styles) - ends
    assert ends == {"grpo", "resrl"} and starts  # both checkpoints drawn ...
    assert {styles[s] for s in starts} == {"--"} and {styles[e] for e in ends} == {"-"}  # ... told apart
    assert "dashed: step 0" in ax.get_legend().get_title().get_text()


def test_every_axis_of_every_figure_has_a_y_label(probed_runs, tmp_path):
    rng = np.random.default_rng(2)
    runs = [figures.load_run(p) for p in probed_runs]
    heat, _ = _resrl_rollout_run(probed_runs)
    extra = [_metrics_run(tmp_path, "grpo", s, rng) for s in (5, 6)]
    drawn = 0
    live = ("in_batch_lld", "lld_shared_unique", "collateral_vs_pushdown", "weight_by_class", "lld_per_kl",
            "entropy_by_polarity")
    for r in runs:  # a stratified held-out set: the prompts' uids name their stratum
        div = r.probes["diversity"]
        uids = [f"s{g % 2}/{u}" for g, u in zip(div.prompts.group_id, div.prompts.prompt_uid)]
        object.__setattr__(div, "prompts", div.prompts.assign(prompt_uid=uids))
    for name, fn in figures.FIGURES.items():
        pool = [heat] if name == "token_heatmap" else runs + (extra if name in live else [])
        got = fn(pool)
        if isinstance(got, str):
            assert name == "residual_weight_hist", f"{name}: {got}"  # fake dumps hold no residuals
            continue
        fig = got if hasattr(got, "savefig") else got.figure
        for ax in fig.axes:
            if hasattr(ax, "_colorbar") or not ax.get_visible():
                continue
            assert ax.get_ylabel().strip(), f"{name}: an axis without a y label ({ax.get_title()!r})"
        drawn += 1
        matplotlib.pyplot.close(fig)
    assert drawn == len(figures.FIGURES) - 1


def test_entropy_and_flip_figures_draw_the_probe_tables(probed_runs):
    runs = [figures.load_run(p) for p in probed_runs]
    fig = figures.fig_entropy_prediction(runs)
    t = runs[0].probes["entropy_dynamics"].tokens
    t = t[(t.algorithm == "grpo") & t.actual_head.notna()]
    xy = fig.axes[0].collections[0].get_offsets()  # the grpo run's column, top: predicted vs realised
    np.testing.assert_allclose(np.asarray(xy), t[["predicted", "actual_head"]].to_numpy(), rtol=1e-12)
    fig = figures.fig_flip_map(runs)
    c = runs[0].probes["flips"].counts
    c = c[(c.comparison == "step_to_step") & (c.polarity == "positive") & (c.token_class == "shared")]
    img = np.ma.filled(fig.axes[0].images[0].get_array(), np.nan)  # rows: pos. shared first
    g = c.groupby("conf_bin")[["n_rose", "n_tokens"]].sum()
    want = np.full(10, np.nan)
    want[g.index.to_numpy()] = (g.n_rose / g.n_tokens).to_numpy()
    np.testing.assert_allclose(img[0], want, equal_nan=True)
    assert np.isfinite(want).any()
    matplotlib.pyplot.close("all")
