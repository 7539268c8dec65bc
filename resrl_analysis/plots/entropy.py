"""Entropy dynamics and token flips: predicted against realised entropy change, and the flip map."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.ticker import FixedLocator, NullLocator

from .style import color_for, new_axes

__all__ = ["plot_entropy_prediction", "plot_flip_map", "FLIP_ROWS"]

#: The rows of :func:`plot_flip_map`: (polarity, part) in drawing order.
FLIP_ROWS = (("positive", "shared"), ("positive", "unique"), ("negative", "shared"), ("negative", "unique"))


def plot_entropy_prediction(frame: pd.DataFrame, *, x: str = "predicted", y: str = "measured", label: str = "label",
                            rho: float | None = None, xlabel: str = "predicted ΔH (nats)",
                            ylabel: str = "realised ΔH (nats)", diagonal: bool = True, ax=None):
    """Each token's predicted against realised entropy change, on symmetric-log axes (the changes span decades and
    both signs), the diagonal y = x when both are in nats, Spearman ``rho`` in the corner.

    >>> t = pd.DataFrame({"predicted": [1e-4, -2e-5, 3e-6], "measured": [1.1e-4, -1.9e-5, 2e-6], "label": "grpo"})
    >>> ax = plot_entropy_prediction(t, rho=1.0); ax.get_xscale()
    'symlog'
    """
    missing = [c for c in (x, y) if c not in frame.columns]
    if missing:
        raise ValueError(f"plot_entropy_prediction: missing columns {missing}")
    d = frame[[x, y] + ([label] if label in frame.columns else [])].dropna(subset=[x, y])
    if d.empty:
        raise ValueError("plot_entropy_prediction: no token with both values")
    fig, ax = new_axes(ax, figsize=(4.2, 4.0))
    colour = color_for(str(d[label].iloc[0])) if label in d.columns else None
    ax.scatter(d[x], d[y], s=5, alpha=0.35, color=colour, linewidths=0, rasterized=True)
    for col, axis, set_scale in ((x, ax.xaxis, ax.set_xscale), (y, ax.yaxis, ax.set_yscale)):
        v = np.abs(d[col].to_numpy(float))
        top = float(v.max()) if v.size and v.max() > 0 else 1.0
        lin = 10.0 ** (np.floor(np.log10(top)) - 3)  # three decades below the largest change are drawn linearly
        set_scale("symlog", linthresh=lin)
        hi = np.floor(np.log10(top))
        ticks = [s * 10.0 ** e for e in (hi - 2, hi) for s in (-1, 1)] + [0.0]
        axis.set_major_locator(FixedLocator(sorted(ticks)))
        axis.set_minor_locator(NullLocator())
    top = float(np.abs(d[[x, y]].to_numpy(float)).max())
    if diagonal:
        ax.plot([-top, top], [-top, top], color="k", lw=0.8, ls="--")
    ax.axhline(0, color="0.6", lw=0.6)
    ax.axvline(0, color="0.6", lw=0.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if rho is not None and np.isfinite(rho):
        ax.text(0.03, 0.97, f"Spearman ρ = {rho:.3f}\n{len(d)} tokens", transform=ax.transAxes, va="top",
                fontsize="small")
    return ax


def plot_flip_map(frame: pd.DataFrame, *, ax=None, title: str = "", colorbar: bool = True, vmin: float = 0.0,
                  vmax: float = 1.0, bins: int = 10):
    """The fraction of tokens whose log-prob rose, by confidence bin before (columns) and polarity × shared/unique
    (rows, :data:`FLIP_ROWS`); each cell annotated with its number of tokens, empty cells blank.

    ``frame``: rows (polarity, part, conf_bin, n_tokens, n_rose), ``part`` ``shared`` or ``unique``.

    >>> f = pd.DataFrame({"polarity": ["positive", "negative"], "part": ["shared", "unique"], "conf_bin": [9, 2],
    ...                   "n_tokens": [10, 4], "n_rose": [7, 1]})
    >>> ax = plot_flip_map(f); len(ax.texts)
    2
    """
    need = {"polarity", "part", "conf_bin", "n_tokens", "n_rose"}
    if not need <= set(frame.columns):
        raise ValueError(f"plot_flip_map: missing columns {sorted(need - set(frame.columns))}")
    g = frame.groupby(["polarity", "part", "conf_bin"])[["n_tokens", "n_rose"]].sum()
    grid = np.full((len(FLIP_ROWS), bins), np.nan)
    counts = np.zeros((len(FLIP_ROWS), bins), dtype=int)
    for i, (pol, part) in enumerate(FLIP_ROWS):
        for b in range(bins):
            if (pol, part, b) in g.index:
                n, r = g.loc[(pol, part, b)]
                counts[i, b] = int(n)
                grid[i, b] = r / n if n else np.nan
    fig, ax = new_axes(ax, figsize=(6.4, 2.6))
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu_r", vmin=vmin, vmax=vmax, aspect="auto")
    for i in range(len(FLIP_ROWS)):
        for b in range(bins):
            if counts[i, b]:
                ax.text(b, i, f"{counts[i, b]}", ha="center", va="center", fontsize=6,
                        color="w" if abs(grid[i, b] - 0.5) > 0.3 else "k")
    ax.set_xticks(range(bins))
    ax.set_xticklabels([f"{b / bins:.1f}" for b in range(bins)], fontsize="x-small")
    ax.set_yticks(range(len(FLIP_ROWS)))
    ax.set_yticklabels([f"{p[:3]}. {s}" for p, s in FLIP_ROWS], fontsize="small")
    ax.set_xlabel("p(y) before (bin's lower edge)")
    ax.set_ylabel("response polarity, token")
    ax.grid(False)
    if title:
        ax.set_title(title, fontsize="small")
    if colorbar:
        cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
        cb.set_label("fraction whose log-prob rose", fontsize="small")
    return ax

