"""Figures of the probes: LLD, interference, the bound, the subspace, token heatmaps, first order.

Each takes a tidy table (a probe result's ``to_frame()`` or a slice of it) with the columns named in
its docstring, draws on ``ax`` (or a new figure) and returns the Axes or Figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import colormaps
from matplotlib.colors import Normalize

from .curves import _require
from .style import color_for, new_axes, order_labels

__all__ = [
    "log_floor",
    "plot_lld_bars",
    "plot_lld_shared_unique",
    "plot_cosine_distribution",
    "plot_bound_validation",
    "plot_proxy_vs_interference",
    "plot_explained_variance",
    "plot_residual_weight_hist",
    "plot_token_heatmap",
    "plot_first_order",
]


# ----------------------------------------------------------------------------- lazy likelihood displacement


def plot_lld_bars(frame: pd.DataFrame, *, value: str = "delta", label: str = "label", epsilon: float = 0.0,
                  ylabel: str = "Δ log π(y⁺|x) (nats)"):
    """Per-prompt Δ(x) as sorted bars, a panel per label; bars at or below ε (LLD) in red.

    Args:
        frame: one row per prompt: ``label``, ``delta`` (Δ log-likelihood of the positives).
        ylabel: the y label of every panel (say which checkpoints Δ compares, e.g. "step 0 → 40").

    >>> f = pd.DataFrame({"delta": [0.3, -0.1, 0.2], "label": ["grpo"] * 3})
    >>> fig = plot_lld_bars(f); [round(float(p.get_height()), 2) for p in fig.axes[0].patches]
    [-0.1, 0.2, 0.3]
    """
    _require(frame, [value, label], "plot_lld_bars")
    labels = order_labels(list(frame[label].unique()))
    fig, axes = plt.subplots(1, len(labels), figsize=(3.6 * len(labels), 3.2), squeeze=False, sharey=True)
    for a, lab in zip(axes[0], labels):
        d = np.sort(frame.loc[frame[label] == lab, value].to_numpy(dtype=float))
        colors = ["#c0392b" if v <= epsilon else color_for(lab) for v in d]
        a.bar(np.arange(len(d)), d, color=colors, width=0.9)
        a.axhline(epsilon, color="k", lw=0.8)
        frac = float(np.mean(d <= epsilon)) if len(d) else float("nan")
        a.set_title(f"{lab}  (LLD {frac:.0%})")
        a.set_xlabel("prompt (sorted)")
        a.set_ylabel(ylabel)
    fig.tight_layout()
    return fig


def plot_lld_shared_unique(frame: pd.DataFrame, *, value: str = "value", part: str = "part", label: str = "label",
                           seed: str = "seed", ax=None, ylabel: str = "Δ log π(y⁺) per positive response (nats)"):
    """Grouped bars per label: the mean over seeds of Δ log π on each ``part`` of the positive tokens
    (``"shared"`` with a negative response, ``"unique"``), error bars the 95% t interval across seeds,
    each seed's value a dot; a zero line.

    Args:
        frame: one row per label, seed and part (e.g. a run's mean of ``lld/shared_token_delta_mean``).

    >>> f = pd.DataFrame({"label": ["nsr"] * 4, "seed": [0, 1, 0, 1], "part": ["shared"] * 2 + ["unique"] * 2,
    ...                   "value": [-1.0, -3.0, 1.0, 2.0]})
    >>> ax = plot_lld_shared_unique(f); [round(float(p.get_height()), 2) for p in ax.patches]
    [-2.0, 1.5]
    """
    from .bands import seed_bands, seeds_phrase

    _require(frame, [value, part, label], "plot_lld_shared_unique")
    fig, ax = new_axes(ax, (1.2 * frame[label].nunique() + 2.2, 3.6))
    table = seed_bands(frame, part, value, label=label, seed=seed)
    labels = order_labels(list(table[label].unique()))
    parts = list(dict.fromkeys(frame[part]))
    width = 0.8 / len(parts)
    hatches = ["//", "", "..", "xx"]
    for j, pt in enumerate(parts):
        for i, lab in enumerate(labels):
            row = table[(table[label] == lab) & (table[part] == pt)]
            if row.empty:
                continue
            m, lo, hi = (float(row[c].iloc[0]) for c in ("mean", "lo", "hi"))
            x = i - 0.4 + width * (j + 0.5)
            c = color_for(str(lab))
            ax.bar(x, m, width * 0.92, color=c if hatches[j % 4] == "" else "white", edgecolor=c,
                   hatch=hatches[j % 4], lw=1.2, label=pt if i == 0 else None)
            if np.isfinite(lo) and np.isfinite(hi):
                ax.errorbar(x, m, yerr=[[m - lo], [hi - m]], color="k", lw=1, capsize=3)
            pts = frame[(frame[label] == lab) & (frame[part] == pt)][value].to_numpy(dtype=float)
            ax.scatter(np.full(len(pts), x), pts, s=10, color="k", zorder=3, lw=0)
    ax.axhline(0.0, color="k", lw=0.8)
    n_of = table.groupby(label)["n"].max()
    n = n_of.tolist()
    ax.set_xticks(range(len(labels)))
    # seed counts that differ between labels are given under each label
    ax.set_xticklabels([f"{lab}\n({seeds_phrase([int(n_of[lab])])})" if len(set(n)) > 1 else lab for lab in labels])
    ax.set_ylabel(ylabel)
    leg = ax.legend(frameon=False, fontsize="small", title=f"bars: mean of {seeds_phrase(n)}; dots: seeds",
                    title_fontsize="x-small")
    for h in leg.legend_handles:  # legend patches in grey: the colours are the algorithms'
        h.set_edgecolor("0.3")
        if h.get_facecolor()[:3] != (1.0, 1.0, 1.0):
            h.set_facecolor("0.5")
    return ax


# ----------------------------------------------------------------------------- interference


def plot_cosine_distribution(frame: pd.DataFrame, *, value: str = "cosine", label: str = "label", ax=None):
    """Distribution (violin) of token-level positive×negative head-gradient cosines per label.

    Args:
        frame: ``label``, ``cosine`` (one row per sampled token pair).

    >>> f = pd.DataFrame({"cosine": [.1, -.2, .3, .0], "label": ["grpo", "grpo", "resrl", "resrl"]})
    >>> ax = plot_cosine_distribution(f); [t.get_text() for t in ax.get_xticklabels()]
    ['grpo', 'resrl']
    """
    _require(frame, [value, label], "plot_cosine_distribution")
    fig, ax = new_axes(ax)
    order = order_labels(list(frame[label].astype(str).unique()))
    data = frame.assign(**{label: frame[label].astype(str)})
    sns.violinplot(data=data, x=label, y=value, order=order, hue=label, hue_order=order,
                   palette={o: color_for(o) for o in order}, cut=0, inner="quartile", ax=ax, legend=False)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel("")
    ax.set_ylabel("cos(∇ log p⁺, ∇ log p⁻)  (head)")
    return ax


# ----------------------------------------------------------------------------- the bound


def plot_bound_validation(
    frame: pd.DataFrame, *, true: str = "true", bound: str = "bound", hue: str | None = None,
    rtol: float = 1e-5, ax=None, max_points: int = 20_000, seed: int = 0,
):
    """True |<x⁻, x⁺>| (or |<g⁺, g⁻>|) against its bound, with y = x; violations marked ×.

    Args:
        frame: ``true``, ``bound`` (one row per positive×negative pair), optional ``hue`` column.

    >>> f = pd.DataFrame({"true": [0.5, 1.0, 2.5], "bound": [1.0, 1.0, 2.0]})
    >>> ax = plot_bound_validation(f); ax.get_title()
    'violations: 1 / 3'
    """
    _require(frame, [true, bound], "plot_bound_validation")
    fig, ax = new_axes(ax, (4.2, 4.0))
    d = frame if len(frame) <= max_points else frame.sample(max_points, random_state=seed)
    viol = d[true] > d[bound] * (1 + rtol) + 1e-12
    groups = [(None, d)] if not hue or hue not in d.columns else list(d.groupby(hue))
    for name, g in groups:
        ok = g[~viol.loc[g.index]]
        ax.scatter(ok[bound], ok[true], s=6, alpha=0.5, color=color_for(str(name)) if name is not None else None,
                   label=None if name is None else str(name), rasterized=True)
    bad = d[viol]
    if len(bad):
        ax.scatter(bad[bound], bad[true], marker="x", s=30, color="#c0392b", label="violation")
    hi = float(max(d[bound].max(), d[true].max(), 1e-12))
    ax.plot([0, hi], [0, hi], color="k", lw=0.9, ls="--", label="y = x")
    n_viol = int((frame[true] > frame[bound] * (1 + rtol) + 1e-12).sum())
    ax.set_title(f"violations: {n_viol} / {len(frame)}")
    ax.set_xlabel("bound")
    ax.set_ylabel("|<x⁻, x⁺>|")
    ax.legend(frameon=False, fontsize="small")
    return ax


def log_floor(values: Sequence[float] | np.ndarray, decades: float = 6.0) -> float:
    """The floor of a log axis: a power of ten ``decades`` below the largest finite value (1.0 if none).

    Values at or below it (zeros, round-off residuals of 1e-15) are drawn at the floor, so that a log axis
    keeps them instead of dropping them; the axis label says so.

    >>> log_floor([0.0, 1e-15, 0.3, 250.0])
    0.0001
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if not len(v):
        return 1.0
    return float(10.0 ** (np.floor(np.log10(v.max())) - decades))


def plot_proxy_vs_interference(
    frame: pd.DataFrame, *, proxy: str = "residual", interference: str = "interference",
    representation: str = "representation", rho: Mapping[str, float] | None = None, log: bool = False,
    decades: float = 6.0,
):
    """Each negative token's proxy (residual energy) against its true head interference with the
    positives, a panel per representation, Spearman ρ in the title.

    ``rho`` maps representation → ρ as the probe measured it; when absent, ρ is the rank correlation
    of the plotted data. ``log=True`` draws both axes on a log scale; values below a floor ``decades``
    powers of ten under each panel's largest value (zeros included) are drawn at that floor, and the
    axis labels state the floor and how many tokens sit on it.

    >>> f = pd.DataFrame({"residual": [1, 2, 3], "interference": [3, 2, 1], "representation": ["a"] * 3})
    >>> fig = plot_proxy_vs_interference(f); fig.axes[0].get_title()
    'a  (ρ = -1.00)'
    >>> g = f.assign(residual=[0.0, 2.0, 3.0])
    >>> plot_proxy_vs_interference(g, log=True).axes[0].get_xlabel().splitlines()[1]
    '(1 of 3 ≤ 1e-06, drawn there)'
    """
    _require(frame, [proxy, interference, representation], "plot_proxy_vs_interference")
    reps = list(dict.fromkeys(frame[representation]))
    ncols = min(4, len(reps))
    nrows = -(-len(reps) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, (3.5 if log else 3.2) * nrows), squeeze=False)
    for a in axes.flat[len(reps):]:
        a.set_visible(False)
    for a, rep in zip(axes.flat, reps):
        d = frame[frame[representation] == rep]
        r = rho.get(rep) if rho else None
        if r is None:
            r = float(d[proxy].rank().corr(d[interference].rank())) if len(d) > 1 else float("nan")
        xs, ys = d[proxy].to_numpy(dtype=float), d[interference].to_numpy(dtype=float)
        xlabel, ylabel = "residual energy e(x⁻)", "Σ|<g⁺, g⁻>|  (head)"
        if log:
            fx, fy = log_floor(xs, decades), log_floor(ys, decades)
            nx, ny = int((xs <= fx).sum()), int((ys <= fy).sum())
            xs, ys = np.maximum(xs, fx), np.maximum(ys, fy)
            a.set_xscale("log")
            a.set_yscale("log")
            xlabel += f"\n({nx} of {len(xs)} ≤ {fx:.0e}, drawn there)"
            ylabel += f"\n({ny} ≤ {fy:.0e}, drawn there)"
        a.scatter(xs, ys, s=6, alpha=0.4, rasterized=True, lw=0)
        a.set_title(f"{rep}  (ρ = {r:.2f})")
        a.set_xlabel(xlabel)
        a.set_ylabel(ylabel)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- subspace


def plot_explained_variance(frame: pd.DataFrame, *, label: str | None = "label", ax=None, upto: float | None = None,
                            max_rank: int | None = None):
    """Cumulative explained variance of the positive matrix against rank.

    Args:
        frame: ``rank``, ``explained`` (optionally ``label``; several rows per rank are averaged;
            ``linestyle``, one line style per label).
        upto: draw only the ranks that matter: up to the first rank where every curve reaches this
            fraction (e.g. 0.99, marked by a dotted line), said in the x label.
        max_rank: draw no rank above this one (said in the x label when it cuts a curve short).

    >>> f = pd.DataFrame({"rank": [1, 2, 3], "explained": [.5, .8, 1.]})
    >>> ax = plot_explained_variance(f, label=None); [float(v) for v in ax.lines[0].get_ydata()]
    [0.5, 0.8, 1.0]
    >>> ax = plot_explained_variance(f, label=None, upto=0.75); ax.get_xlabel()
    'rank k (up to k = 2, where every curve reaches 75%)'
    """
    _require(frame, ["rank", "explained"], "plot_explained_variance")
    fig, ax = new_axes(ax)
    groups = [(None, frame)] if not label or label not in frame.columns else [
        (lab, frame[frame[label] == lab]) for lab in order_labels(list(frame[label].unique()))
    ]
    means = [(lab, d, d.groupby("rank")["explained"].mean()) for lab, d in groups]
    top = int(max(m.index.max() for _, _, m in means))
    xlabel = "rank k"
    if upto is not None:
        reach = [int(m.index[m.to_numpy() >= upto - 1e-12].min()) if (m.to_numpy() >= upto - 1e-12).any() else top
                 for _, _, m in means]
        top = max(reach)
        xlabel = f"rank k (up to k = {top}, where every curve reaches {upto:.0%})"
    if max_rank is not None and top > max_rank:
        top = max_rank
        xlabel = f"rank k (the first {max_rank})"
    for lab, d, m in means:
        m = m[m.index <= top]
        style = d["linestyle"].iloc[0] if "linestyle" in d.columns else "-"
        ax.plot(m.index, m.to_numpy(), color=color_for(str(lab)) if lab is not None else None, ls=style,
                marker="o" if top <= 20 else None, ms=3, label=None if lab is None else str(lab))
    if upto is not None:
        ax.axhline(upto, color="k", lw=0.7, ls=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("explained variance")
    ax.set_ylim(0, 1.02)
    if top <= 20:
        ax.set_xticks(range(1, top + 1, 1 if top <= 10 else 2))
    if len(groups) > 1:
        ax.legend(frameon=False, fontsize="small")
    return ax


def plot_residual_weight_hist(
    residuals: Sequence[float] | np.ndarray, weights: Sequence[float] | np.ndarray,
    *, lo: float | None = None, hi: float | None = None, q_low: float = 0.2, q_high: float = 0.8, bins: int = 40,
    log: bool | None = None,
):
    """Histograms of negative-token residual energy (q_low/q_high quantiles marked) and ResRL weights.

    ``lo``/``hi`` default to the quantiles of the residuals given (pooled over groups: the trainer's
    are per group, so pass them when plotting one group). ``log`` bins the residuals on a log axis
    (default: when they span more than three decades); residuals below :func:`log_floor` (zeros, round-off)
    are counted at the floor, as the x label says.

    >>> fig = plot_residual_weight_hist([0.1, 0.2, 0.3, 0.9], [0.1, 0.4, 0.7, 1.0])
    >>> len(fig.axes), len(fig.axes[0].lines), fig.axes[0].get_xscale()
    (2, 2, 'linear')
    >>> plot_residual_weight_hist([0.0, 1e-14, 0.2, 0.3], [0.1, 0.1, 0.7, 1.0]).axes[0].get_xscale()
    'log'
    """
    r = np.asarray(residuals, dtype=float)
    r = r[np.isfinite(r)]
    w = np.asarray(weights, dtype=float)
    w = w[np.isfinite(w)]
    if lo is None or hi is None:
        lo, hi = (np.quantile(r, [q_low, q_high]) if len(r) else (np.nan, np.nan))
    pos = r[r > 0]
    if log is None:
        log = len(pos) > 0 and (len(pos) < len(r) or pos.max() > 1e3 * pos.min())
    fig, (a, b) = plt.subplots(1, 2, figsize=(8.4, 3.2))
    xlabel = "residual energy e(x⁻)"
    if log and len(pos):
        floor = log_floor(pos)
        n_low = int((r <= floor).sum())
        r = np.maximum(r, floor)
        edges = np.logspace(np.log10(floor), np.log10(max(r.max(), floor * 10)), bins + 1)
        a.hist(r, bins=edges, color=color_for("resrl"), alpha=0.8)
        a.set_xscale("log")
        xlabel += f" (log; {n_low} of {len(r)} ≤ {floor:.0e}, counted there)"
        lo, hi = max(lo, floor), max(hi, floor)
    else:
        a.hist(r, bins=bins, color=color_for("resrl"), alpha=0.8)
    a.axvline(lo, color="k", ls="--", lw=1)
    a.axvline(hi, color="k", ls=":", lw=1)
    a.set_xlabel(xlabel, fontsize="small" if log else None)
    a.set_ylabel("negative tokens")
    a.set_title(f"q_low={q_low:g} (--), q_high={q_high:g} (··)")
    b.hist(w, bins=bins, color=color_for("resrl"), alpha=0.8)
    b.set_xlabel("ResRL weight ω")
    b.set_ylabel("negative tokens")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- tokens


SHARED_EDGE = "#00b4ff"  # the outline of shared tokens: a blue no colour map here uses for values


def plot_token_heatmap(
    tokens: Sequence[str], values: Sequence[float | None], *, title: str = "", cmap: str = "viridis",
    vmin: float | None = None, vmax: float | None = None, per_line: int = 24, ax=None, colorbar: bool = True,
    shared: Sequence[bool] | None = None, colorbar_label: str = "", ylabel: str = "",
):
    """A whole response, each token boxed and coloured by a value (weight, residual, NTHR score),
    wrapped over rows of ``per_line`` tokens.

    Tokens with a missing value (None/NaN) are drawn grey. ``shared`` (one flag per token) outlines the
    flagged tokens in blue (e.g. a negative response's tokens that a positive response of its group
    shares: the same token after the same prefix) and says so, with their count, in the title. ``colorbar_label`` names
    the colour bar's quantity; ``ylabel`` labels the panel (e.g. which response it is).

    >>> ax = plot_token_heatmap(["1", "2", "<eos>"], [0.1, 1.0, None]); len(ax.texts)
    3
    >>> ax = plot_token_heatmap(list("abc"), [0.1, 0.2, 0.3], shared=[True, False, False], ylabel="r0")
    >>> [t.get_bbox_patch().get_edgecolor() != (0, 0, 0, 0) for t in ax.texts]
    [True, False, False]
    """
    vals = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    if len(tokens) != len(vals):
        raise ValueError(f"plot_token_heatmap: {len(tokens)} tokens but {len(vals)} values")
    if shared is not None and len(shared) != len(tokens):
        raise ValueError(f"plot_token_heatmap: {len(tokens)} tokens but {len(shared)} shared flags")
    finite = vals[np.isfinite(vals)]
    norm = Normalize(vmin if vmin is not None else (finite.min() if len(finite) else 0.0),
                     vmax if vmax is not None else (finite.max() if len(finite) else 1.0))
    cm = colormaps[cmap]
    rows = max(1, int(np.ceil(len(tokens) / per_line)))
    fig, ax = new_axes(ax, (min(12.0, 0.5 * min(len(tokens), per_line) + 1.5), 0.55 * rows + 0.8))
    for i, (tok, v) in enumerate(zip(tokens, vals)):
        r, c = divmod(i, per_line)
        face = cm(norm(v)) if np.isfinite(v) else (0.85, 0.85, 0.85, 1.0)
        lum = 0.299 * face[0] + 0.587 * face[1] + 0.114 * face[2]
        edge = dict(ec=SHARED_EDGE, lw=2.0) if shared is not None and shared[i] else dict(ec="none")
        text = "�" if tok is None else str(tok).replace("\n", "⏎") or "␣"  # None: an id the tokenizer lacks
        ax.text(c + 0.5, rows - r - 0.5, text, ha="center", va="center", fontsize=9,
                family="monospace", color="white" if lum < 0.5 else "black",
                bbox=dict(boxstyle="square,pad=0.25", fc=face, **edge))
    ax.set_xlim(0, per_line if rows > 1 else max(len(tokens), 12))  # compact, left-aligned boxes
    ax.set_ylim(0, rows)
    # no ticks, spines or grid, but the axis stays on so that its y label (which response) shows
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for sp in ax.spines.values():
        sp.set_visible(False)
    ax.set_ylabel(ylabel, rotation=0, ha="right", va="center", fontsize="small")
    if shared is not None:
        n = int(np.sum(np.asarray(shared, dtype=bool)))
        title = f"{title}   [blue outline: shared, {n} of {len(tokens)}]".strip()
    ax.set_title(title)
    if colorbar:
        cb = ax.figure.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cm), ax=ax, fraction=0.03, pad=0.01)
        cb.set_label(colorbar_label)
    return ax


# ----------------------------------------------------------------------------- first order


def plot_first_order(frame: pd.DataFrame, *, predicted: str = "predicted", measured: str = "measured",
                     label: str | None = "label", ax=None):
    """First-order predicted Δ log π(y⁺) against the measured change, with y = x.

    >>> f = pd.DataFrame({"predicted": [0.1, -0.2], "measured": [0.12, -0.18]})
    >>> ax = plot_first_order(f, label=None); len(ax.collections[0].get_offsets())
    2
    """
    _require(frame, [predicted, measured], "plot_first_order")
    fig, ax = new_axes(ax, (4.2, 4.0))
    groups = [(None, frame)] if not label or label not in frame.columns else [
        (lab, frame[frame[label] == lab]) for lab in order_labels(list(frame[label].unique()))
    ]
    for lab, d in groups:
        ax.scatter(d[predicted], d[measured], s=12, alpha=0.7, color=color_for(str(lab)) if lab is not None else None,
                   label=None if lab is None else str(lab))
    lim = float(np.nanmax(np.abs(frame[[predicted, measured]].to_numpy()))) if len(frame) else 1.0
    ax.plot([-lim, lim], [-lim, lim], color="k", ls="--", lw=0.9)
    ax.set_xlabel("predicted Δ log π(y⁺) (first order, head)")
    ax.set_ylabel("measured Δ log π(y⁺)")
    if label and label in frame.columns:
        ax.legend(frameon=False, fontsize="small")
    return ax
