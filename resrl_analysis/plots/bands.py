"""Across-seed means and 95% t intervals for the figures (pandas and :mod:`..stats` only, no drawing).

A per-step curve of several seeds is drawn as the mean over the seeds at each x with the interval of
:func:`resrl_analysis.stats.mean_interval` as its band; one seed gives the plain value and no band. Any other
unit works the same way (``seed=`` names its column: the prompts of one run, for a band over prompts): the
plots draw the intervals :mod:`resrl_analysis.stats` computed and compute none of their own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..stats import mean_interval

__all__ = ["seed_bands", "seeds_phrase", "overlap_note"]


def seed_bands(frame: pd.DataFrame, x: str, value: str, *, label: str = "label", seed: str = "seed") -> pd.DataFrame:
    """Per ``label`` and ``x``: the mean of ``value`` over seeds with its 95% t interval.

    ``frame`` holds one row per (label, seed, x) (rows repeating a seed are averaged first, so a table of
    per-prompt rows gives the seed's mean per x). Non-finite values are dropped; an x where one seed has
    a finite value gets that value and NaN ends.

    Returns columns ``label, x, mean, lo, hi, n`` (n: seeds with a value at that x), sorted by label and x.

    >>> f = pd.DataFrame({"label": ["a"] * 4, "seed": [0, 1, 0, 1], "step": [1, 1, 2, 2],
    ...                   "v": [1.0, 3.0, 2.0, float("nan")]})
    >>> seed_bands(f, "step", "v")[["step", "mean", "n"]].to_dict("list")
    {'step': [1, 2], 'mean': [2.0, 2.0], 'n': [2, 1]}
    """
    missing = [c for c in (x, value, label) if c not in frame.columns]
    if missing:
        raise ValueError(f"seed_bands: table lacks column(s) {missing}; has {list(frame.columns)}")
    d = frame.assign(_seed=frame[seed] if seed in frame.columns else 0)
    d = d[np.isfinite(pd.to_numeric(d[value], errors="coerce").astype(float))]
    per_seed = d.groupby([label, "_seed", x], as_index=False, sort=False, dropna=False)[value].mean()
    rows = []
    for (lab, xv), g in per_seed.groupby([label, x], sort=True):
        iv = mean_interval(g[value].tolist())
        rows.append({label: lab, x: xv, "mean": iv.mean, "lo": iv.lo, "hi": iv.hi, "n": iv.n})
    return pd.DataFrame(rows, columns=[label, x, "mean", "lo", "hi", "n"])


def seeds_phrase(counts: Sequence[int], unit: str = "seed") -> str:
    """How many seeds (or units of another ``unit``) a figure averages, for its title: ``"3 seeds"``, ``"1 seed"``,
    ``"1–3 seeds"``.

    >>> seeds_phrase([3, 3]), seeds_phrase([1]), seeds_phrase([1, 3]), seeds_phrase([12], "prompt")
    ('3 seeds', '1 seed', '1–3 seeds', '12 prompts')
    """
    lo, hi = min(counts), max(counts)
    if lo == hi:
        return f"{lo} {unit}{'s' if lo != 1 else ''}"
    return f"{lo}–{hi} {unit}s"


def overlap_note(table: pd.DataFrame, x: str = "step", *, label: str = "label", rel: float = 0.02) -> str:
    """A title's warning when the labels' mean lines of a :func:`seed_bands` table lie on one another:
    every pair within ``rel`` of the range drawn (lines and bands), at every shared x; else ``""``.

    >>> t = pd.DataFrame({"label": ["a", "a", "b", "b"], "step": [0, 1, 0, 1], "mean": [1.0, 2.0, 1.0, 2.001]})
    >>> overlap_note(t)
    'lines overlap (within 0.001)'
    >>> overlap_note(t.assign(mean=[1.0, 2.0, 1.5, 2.5]))
    ''
    """
    wide = table.pivot_table(index=x, columns=label, values="mean").dropna()
    if wide.shape[1] < 2 or wide.empty:
        return ""
    spread = float((wide.max(axis=1) - wide.min(axis=1)).max())
    # the range drawn: the lines and, where there are, their bands (what the axis spans)
    drawn = table[[c for c in ("mean", "lo", "hi") if c in table.columns]].to_numpy(dtype=float)
    span = float(np.nanmax(drawn) - np.nanmin(drawn))
    return f"lines overlap (within {spread:.2g})" if spread <= rel * max(span, 1e-12) else ""
