"""Figures of the study: per-seed means with intervals, collateral against push-down, pass@k per stratum.

Drawing only (tables in, Axes/Figures out); the numbers come from :mod:`resrl_analysis.stats`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..stats import mean_interval, ols_slope
from .curves import _require
from .style import color_for, new_axes, order_labels

__all__ = ["plot_collateral_vs_pushdown", "plot_pass_at_k_strata", "plot_seed_means"]


def plot_seed_means(frame: pd.DataFrame, *, value: str = "value", label: str = "label", seed: str = "seed",
                    group: str | None = None, groups: Sequence[str] | None = None, ylabel: str = "", ax=None,
                    annotate: bool = True):
    """One dot per seed and the mean with its 95% t interval (a bar), per label (and per ``group`` beside it).

    >>> f = pd.DataFrame({"label": ["a"] * 3 + ["b"] * 3, "seed": [0, 1, 2] * 2, "value": [1., 2., 3., 2., 2., 2.]})
    >>> ax = plot_seed_means(f); [t.get_text() for t in ax.get_xticklabels()]
    ['a', 'b']
    """
    _require(frame, [value, label, seed], "plot_seed_means")
    fig, ax = new_axes(ax, (max(4.0, 1.1 * frame[label].nunique() * (1 if group is None else 2)), 3.6))
    labs = order_labels(list(frame[label].unique()))
    gs = list(groups) if groups is not None else ([None] if group is None else list(dict.fromkeys(frame[group])))
    width = 0.8 / len(gs)
    markers = ["o", "s", "^", "D", "v"]
    for j, g in enumerate(gs):
        for i, lab in enumerate(labs):
            d = frame[(frame[label] == lab) & ((frame[group] == g) if g is not None else True)]
            v = d[value].dropna().astype(float).tolist()
            if not v:
                continue
            x = i + (j - (len(gs) - 1) / 2) * width
            c = color_for(str(lab))
            ax.scatter(np.full(len(v), x) + np.linspace(-0.08, 0.08, len(v)) * width / 0.8, v, s=14, color=c,
                       alpha=0.6, marker=markers[j % len(markers)], lw=0,
                       label=str(g) if (g is not None and i == 0) else None)
            iv = mean_interval(v)
            if math.isfinite(iv.lo):
                ax.errorbar([x + 0.2 * width], [iv.mean], yerr=[[iv.mean - iv.lo], [iv.hi - iv.mean]], color="k",
                            capsize=3, lw=1.1, marker="_", ms=10)
            else:
                ax.scatter([x + 0.2 * width], [iv.mean], color="k", marker="_", s=80)
            if annotate:
                ax.annotate(f"{iv.mean:.3g}", (x + 0.2 * width, iv.mean), xytext=(4, 0), textcoords="offset points",
                            fontsize="x-small", va="center")
    ax.set_xticks(range(len(labs)), labs, rotation=20 if len(labs) > 5 else 0)
    ax.set_ylabel(ylabel)
    if group is not None:
        ax.legend(frameon=False, fontsize="small", title=group, title_fontsize="small")
    return ax


def plot_collateral_vs_pushdown(frame: pd.DataFrame, *, label: str = "label", seed: str = "seed",
                                x: str = "push_down", y: str = "collateral", max_points: int = 4000):
    """A panel per label: each mixed group's collateral against its push-down (seeds pooled), the least-squares
    line through all points, and in the title the slope with the 95% t interval of the per-seed slopes.

    >>> f = pd.DataFrame({"label": ["a"] * 6, "seed": [0, 0, 0, 1, 1, 1], "push_down": [1., 2., 3.] * 2,
    ...                   "collateral": [.1, .2, .3, .2, .4, .6]})
    >>> fig = plot_collateral_vs_pushdown(f); fig.axes[0].get_title().splitlines()[1]
    'slope 0.150 [−0.485, 0.785] (2 seeds)'
    """
    from ..stats import describe_interval

    _require(frame, [label, seed, x, y], "plot_collateral_vs_pushdown")
    labs = order_labels(list(frame[label].unique()))
    ncols = min(len(labs), 4)
    nrows = -(-len(labs) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.3 * nrows), squeeze=False, sharex=True,
                             sharey=True)
    for a in axes.flat[len(labs):]:
        a.set_visible(False)
    for a, lab in zip(axes.flat, labs):
        d = frame[frame[label] == lab].dropna(subset=[x, y])
        shown = d if len(d) <= max_points else d.sample(max_points, random_state=0)
        a.scatter(shown[x], shown[y], s=5, alpha=0.35, color=color_for(str(lab)), lw=0, rasterized=True)
        b, c = ols_slope(d[x].astype(float).tolist(), d[y].astype(float).tolist())
        per_seed = [ols_slope(g[x].astype(float).tolist(), g[y].astype(float).tolist())[0] for _, g in d.groupby(seed)]
        per_seed = [s for s in per_seed if math.isfinite(s)]
        if math.isfinite(b):
            xs = np.linspace(float(d[x].min()), float(d[x].max()), 20)
            a.plot(xs, c + b * xs, color="k", lw=1.2)
        iv = mean_interval(per_seed) if per_seed else None
        slope = (describe_interval(iv) + f" ({len(per_seed)} seeds)") if iv is not None and len(per_seed) > 1 else \
            (f"{b:.3g} (one seed)" if math.isfinite(b) else "–")
        a.set_title(f"{lab}: {len(d)} groups\nslope {slope}", fontsize="small")
        a.axhline(0.0, color="0.6", lw=0.7)
        a.axvline(0.0, color="0.6", lw=0.7)
    for a in axes[-1]:
        a.set_xlabel("push-down of the negatives (nats)")
    for a in axes.flat:
        a.set_ylabel("collateral on shared\npositive tokens (nats)")
    fig.tight_layout()
    return fig


def plot_pass_at_k_strata(frame: pd.DataFrame, *, label: str = "label", stratum: str = "stratum",
                          strata: Sequence[str] | None = None):
    """A panel per stratum: pass@k against k (log scale) per label, solid at the last checkpoint (mean over seeds,
    band: 95% t where there are seeds to make one), dashed at step 0.

    ``frame``: ``stratum``, ``label``, ``when`` ("last" or "step 0"), ``k``, ``mean``, ``lo``, ``hi``.

    >>> f = pd.DataFrame({"stratum": ["s"] * 4, "label": ["a"] * 4, "when": ["last"] * 2 + ["step 0"] * 2,
    ...                   "k": [1, 2, 1, 2], "mean": [.2, .3, .1, .2], "lo": [.1, .2, None, None],
    ...                   "hi": [.3, .4, None, None]})
    >>> len(plot_pass_at_k_strata(f).axes)
    1
    """
    _require(frame, [label, stratum, "when", "k", "mean", "lo", "hi"], "plot_pass_at_k_strata")
    ss = list(strata) if strata is not None else list(dict.fromkeys(frame[stratum]))
    ss = [s for s in ss if (frame[stratum] == s).any()]
    fig, axes = plt.subplots(1, len(ss), figsize=(3.5 * len(ss), 3.4), squeeze=False, sharey=True)
    for a, s in zip(axes[0], ss):
        d = frame[frame[stratum] == s]
        for lab in order_labels(list(d[label].unique())):
            c = color_for(str(lab))
            for when, ls in (("last", "-"), ("step 0", "--")):
                e = d[(d[label] == lab) & (d["when"] == when)].sort_values("k")
                if e.empty:
                    continue
                a.plot(e["k"], e["mean"], color=c, ls=ls, lw=1.5 if ls == "-" else 1.0,
                       label=str(lab) if when == "last" else None)
                lo, hi = e["lo"].to_numpy(dtype=float), e["hi"].to_numpy(dtype=float)
                ok = np.isfinite(lo) & np.isfinite(hi)
                if ok.any():
                    a.fill_between(e["k"].to_numpy(), lo, hi, where=ok, color=c, alpha=0.15, lw=0)
        a.set_xscale("log", base=2)
        a.set_title(str(s), fontsize="small")
        a.set_xlabel("k")
        a.set_ylim(-0.02, 1.02)
    for a in axes[0]:
        a.set_ylabel("pass@k (held-out)")
    axes[0][-1].legend(frameon=False, fontsize="x-small", loc="center left", bbox_to_anchor=(1.0, 0.5),
                       title="solid: last; dashed: step 0", title_fontsize="x-small")
    fig.tight_layout()
    return fig
