"""pass@k curves and training dynamics."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .style import color_for, line_styles, order_labels

__all__ = ["plot_pass_at_k", "plot_training_dynamics"]


def _require(frame: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise ValueError(f"{what}: table lacks column(s) {missing}; has {list(frame.columns)}")
    if frame.empty:
        raise ValueError(f"{what}: nothing to draw (the table has no rows)")


def plot_pass_at_k(frame: pd.DataFrame, *, label: str = "label", task: str | None = "task", ax=None):
    """pass@k against k (log₂ axis): a panel per task, a line per label (algorithm or checkpoint).

    Args:
        frame: columns ``k``, ``pass_at_k``, ``label`` (and optionally ``task``).

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
    for a, t in zip(axes, tasks):
        sub = frame if t is None else frame[frame[task] == t]
        labs = order_labels(list(sub[label].unique()))
        styles = line_styles(labs)  # checkpoints of one run: one colour, a line style and marker each
        for lab in labs:
            d = sub[sub[label] == lab].groupby("k", as_index=False)["pass_at_k"].mean().sort_values("k")
            a.plot(d["k"], d["pass_at_k"], ms=4, label=str(lab), **styles[lab])
        a.set_xscale("log", base=2)
        a.set_xlabel("k")
        a.set_ylabel("pass@k")
        a.set_title(str(t) if t is not None else "pass@k")
        a.legend(frameon=False, fontsize="small")
    return fig


DEFAULT_DYNAMICS = ("reward/mean", "actor/entropy", "response/length_mean", "val/pass@1")


def plot_training_dynamics(
    metrics: pd.DataFrame, *, keys: Sequence[str] = DEFAULT_DYNAMICS, label: str = "label", smooth: int = 1
):
    """Metrics over optimizer steps, a panel per key present, a line per label.

    Args:
        metrics: long table with ``step``, ``label`` and one column per metric (metrics.jsonl rows).
        keys: metric columns to draw (absent ones are skipped).
        smooth: rolling-mean window (1 = raw).

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
    for a, key in zip(axes[0], present):
        for lab in order_labels(list(metrics[label].unique())):
            d = metrics[(metrics[label] == lab) & metrics[key].notna()].sort_values("step")
            y = d[key].rolling(smooth, min_periods=1).mean() if smooth > 1 else d[key]
            a.plot(d["step"], np.asarray(y, dtype=float), color=color_for(lab), label=str(lab), lw=1.6)
        a.set_xlabel("step")
        a.set_title(key)
    axes[0][0].legend(frameon=False, fontsize="small")
    fig.tight_layout()
    return fig
