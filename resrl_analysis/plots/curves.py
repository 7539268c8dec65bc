"""pass@k curves and training dynamics."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .bands import overlap_note, seed_bands, seeds_phrase
from .style import color_for, line_styles, new_axes, order_labels

__all__ = ["plot_pass_at_k", "plot_training_dynamics", "plot_seed_bands", "METRIC_LABELS"]

# y labels of the metrics.jsonl keys the figures draw (a key not listed is its own label)
METRIC_LABELS = {
    "reward/mean": "mean reward (training batch)",
    "actor/entropy": "token entropy (nats)",
    "response/length_mean": "response length (tokens)",
    "val/reward_mean": "val pass@1",
    "val/pass@1": "val pass@1",
    "lld/batch_frac": "groups with Δ ≤ 0 (fraction)",
    "lld/batch_delta_mean": "Δ log π(y⁺) per positive (nats)",
    "lld/mixed_groups": "mixed groups in the batch",
    "resrl/weight_mean": "mean ResRL weight ω",
}


def _require(frame: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise ValueError(f"{what}: table lacks column(s) {missing}; has {list(frame.columns)}")
    if frame.empty:
        raise ValueError(f"{what}: nothing to draw (the table has no rows)")


def _pow2_marks(k: np.ndarray) -> list[int]:
    # markers only at k = 1, 2, 4, ...: 64 markers on a log axis would merge into a thick line
    return [i for i, v in enumerate(k) if v > 0 and float(np.log2(v)).is_integer()] or list(range(len(k)))


def plot_pass_at_k(frame: pd.DataFrame, *, label: str = "label", task: str | None = "task", ax=None,
                   legend_title: str | None = None):
    """pass@k against k (log₂ axis): a panel per task, a line per label (algorithm or checkpoint).

    Args:
        frame: columns ``k``, ``pass_at_k``, ``label`` (and optionally ``task``; ``linestyle``, one
            matplotlib line style per label, e.g. ``"--"`` for a start checkpoint; ``lo`` and ``hi``,
            an interval drawn as a band where finite).
        legend_title: a title for the legend (e.g. what solid and dashed mean).

    Returns the Figure.

    >>> f = pd.DataFrame({"k": [1, 2, 4] * 2, "pass_at_k": [.2, .3, .4, .25, .4, .5],
    ...                   "label": ["grpo"] * 3 + ["resrl"] * 3})
    >>> fig = plot_pass_at_k(f); len(fig.axes[0].lines)
    2

    Labels that share a colour (``"step 0"``, ``"step 40"``: the checkpoints of one run) differ in
    line style and marker, and the legend names each.
    """
    _require(frame, ["k", "pass_at_k", label], "plot_pass_at_k")
    tasks = sorted(frame[task].unique()) if task and task in frame.columns else [None]
    if ax is not None and len(tasks) == 1:
        fig, axes = ax.figure, [ax]
    else:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6), squeeze=False)
        axes = list(axes[0])
    cols = [c for c in ("pass_at_k", "lo", "hi") if c in frame.columns]
    for a, t in zip(axes, tasks):
        sub = frame if t is None else frame[frame[task] == t]
        labs = order_labels(list(sub[label].unique()))
        styles = line_styles(labs)  # checkpoints of one run: one colour, a line style and marker each
        for lab in labs:
            rows = sub[sub[label] == lab]
            if "linestyle" in rows.columns:
                styles[lab]["linestyle"] = rows["linestyle"].iloc[0]
            d = rows.groupby("k", as_index=False)[cols].mean().sort_values("k")
            k = d["k"].to_numpy(dtype=float)
            a.plot(k, d["pass_at_k"], ms=4, label=str(lab), markevery=_pow2_marks(k), **styles[lab])
            if "lo" in d.columns and "hi" in d.columns and np.isfinite(d[["lo", "hi"]].to_numpy(dtype=float)).any():
                a.fill_between(k, d["lo"].to_numpy(dtype=float), d["hi"].to_numpy(dtype=float),
                               color=styles[lab]["color"], alpha=0.15, lw=0)
        a.set_xscale("log", base=2)
        a.set_xlabel("k (samples per prompt)")
        a.set_ylabel("pass@k")
        a.set_title(str(t) if t is not None else "pass@k")
        outside = dict(loc="center left", bbox_to_anchor=(1.0, 0.5)) if len(labs) > 3 else {}  # off the curves
        a.legend(frameon=False, fontsize="small", title=legend_title, title_fontsize="small", **outside)
    return fig


def plot_seed_bands(table: pd.DataFrame, x: str = "step", *, label: str = "label", ylabel: str = "", ax=None,
                    zero_line: bool = False, marker: str | None = None, legend: bool = True, unit: str = "seed"):
    """Lines of a :func:`~resrl_analysis.plots.bands.seed_bands` table: the mean over seeds, with its
    interval as a band where it exists (two or more seeds); the legend says how many seeds (``unit``: what
    the table averaged over instead, e.g. ``"prompt"``).

    >>> from resrl_analysis.plots.bands import seed_bands
    >>> f = pd.DataFrame({"label": ["nsr"] * 4, "seed": [0, 1] * 2, "step": [1, 1, 2, 2], "v": [1., 2., 3., 4.]})
    >>> ax = plot_seed_bands(seed_bands(f, "step", "v"), ylabel="v"); ax.get_legend().get_texts()[0].get_text()
    'nsr (2 seeds)'
    """
    _require(table, [x, "mean", "lo", "hi", "n", label], "plot_seed_bands")
    fig, ax = new_axes(ax)
    for lab in order_labels(list(table[label].unique())):
        d = table[table[label] == lab].sort_values(x)
        c = color_for(str(lab))
        ax.plot(d[x].to_numpy(), d["mean"].to_numpy(dtype=float), color=c, lw=1.6, marker=marker, ms=3,
                label=f"{lab} ({seeds_phrase([int(d['n'].max())], unit)})")
        lo, hi = d["lo"].to_numpy(dtype=float), d["hi"].to_numpy(dtype=float)
        ok = np.isfinite(lo) & np.isfinite(hi)
        if ok.any():
            ax.fill_between(d[x].to_numpy(), lo, hi, where=ok, color=c, alpha=0.18, lw=0)
    if zero_line:
        ax.axhline(0.0, color="k", lw=0.8)
    if x == "step":  # optimizer steps are whole numbers: no 2.5 on the axis
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    if legend:
        outside = dict(loc="center left", bbox_to_anchor=(1.0, 0.5)) if table[label].nunique() > 3 else {}
        ax.legend(frameon=False, fontsize="small", **outside)
    return ax


DEFAULT_DYNAMICS = ("reward/mean", "actor/entropy", "response/length_mean", "val/pass@1")


def plot_training_dynamics(
    metrics: pd.DataFrame, *, keys: Sequence[str] = DEFAULT_DYNAMICS, label: str = "label", smooth: int = 1,
    seed: str | None = "seed",
):
    """Metrics over optimizer steps, a panel per key present, a line per label.

    Args:
        metrics: long table with ``step``, ``label`` and one column per metric (metrics.jsonl rows).
        keys: metric columns to draw (absent ones are skipped).
        smooth: rolling-mean window (1 = raw), applied per run before seeds are averaged.
        seed: a column naming each row's seed; when the table has it, each label's line is the mean
            over its seeds with the 95% t interval as a band, and the legend says how many seeds.

    Each panel is titled with its key (and, where the lines lie on one another, says so) and has a y
    label (:data:`METRIC_LABELS`).

    >>> m = pd.DataFrame({"step": [1, 2, 1, 2], "reward/mean": [.1, .2, .1, .3],
    ...                   "label": ["grpo", "grpo", "nsr", "nsr"]})
    >>> fig = plot_training_dynamics(m); len(fig.axes), len(fig.axes[0].lines)
    (1, 2)
    """
    _require(metrics, ["step", label], "plot_training_dynamics")
    present = [k for k in keys if k in metrics.columns and metrics[k].notna().any()]
    if not present:
        raise ValueError(f"plot_training_dynamics: none of {list(keys)} in the metrics table")
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.4), squeeze=False)
    by_seed = seed is not None and seed in metrics.columns
    for a, key in zip(axes[0], present):
        if by_seed:
            parts = []
            for _, d in metrics[metrics[key].notna()].groupby([label, seed], sort=False):
                d = d.sort_values("step")
                parts.append(d.assign(**{key: d[key].rolling(smooth, min_periods=1).mean()}) if smooth > 1 else d)
            table = seed_bands(pd.concat(parts), "step", key, label=label, seed=seed)
            plot_seed_bands(table, "step", label=label, ax=a, legend=False)
            note = overlap_note(table, label=label)
        else:
            note = ""
            for lab in order_labels(list(metrics[label].unique())):
                d = metrics[(metrics[label] == lab) & metrics[key].notna()].sort_values("step")
                y = d[key].rolling(smooth, min_periods=1).mean() if smooth > 1 else d[key]
                a.plot(d["step"], np.asarray(y, dtype=float), color=color_for(lab), label=str(lab), lw=1.6)
        from matplotlib.ticker import MaxNLocator

        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.set_xlabel("step")
        a.set_ylabel(METRIC_LABELS.get(key, key))
        a.set_title(key + (f"\n{note}" if note else ""))
    if metrics[label].nunique() > 3:  # many lines: the legend beside the last panel, off the curves
        axes[0][-1].legend(frameon=False, fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    else:
        axes[0][0].legend(frameon=False, fontsize="small")
    fig.tight_layout()
    return fig
