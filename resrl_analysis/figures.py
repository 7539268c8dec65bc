"""`resrl figures RUN_DIR [RUN_DIR ...] [--out DIR]`: every paper-style figure from runs on disk.

Without ``--out`` the figures go beside the input, into ``FIRST_RUN_DIR/figures``.

Reads what the trainer and `resrl probe` wrote (docs/RUN_DIRECTORY.md): ``config.yaml`` for the
algorithm's name, ``metrics.jsonl``, ``rollouts/`` and ``probes/``; draws with :mod:`.plots` only.
A figure whose data is missing is skipped with the reason, never drawn from anything else.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from . import plots
from .plots.style import paper_style, save_figure
from .results import ProbeResult, load_results
from .rundir import CONFIG, METRICS, PROBES, list_rollouts, read_jsonl, step_dir

__all__ = ["RunData", "load_run", "draw_all", "default_out", "add_figures_arguments", "run_figures"]

PAPER_REPRESENTATION = "penultimate/ln/centred"


@dataclass
class RunData:
    """What one run directory holds, loaded for drawing.

    ``label`` names the run's experiment in the figures (its algorithm); runs that differ only in
    ``seed`` share it, and their curves are drawn as a mean over seeds with an interval.
    """

    path: Path
    label: str
    config: dict
    metrics: pd.DataFrame
    probes: dict[str, ProbeResult] = field(default_factory=dict)
    rollouts: dict[int, list[dict]] = field(default_factory=dict)
    seed: int | None = None


# TRL's log_history names → ours, so the training-dynamics figure reads a TRL run as it reads ours.
_TRL_METRICS = {"reward": "reward/mean", "entropy": "actor/entropy", "completions/mean_length": "response/length_mean"}


def _load_foreign_run(p: Path, label: str | None) -> RunData | None:
    # A TRL / verl run or checkpoint folder (resrl_analysis.runs): metrics from its own logs, probe
    # tables from where `resrl probe` and ProbeCallback write them.
    from .errors import ProbeError
    from .runs import discover_run

    try:
        info = discover_run(p)
        kind, rows, probes_dir = info.kind, info.metrics, info.probes_dir
    except ProbeError:
        if not (p / PROBES / "summary.json").is_file():  # live probes of a run that saved no checkpoint
            return None
        kind, rows, probes_dir = "run", (), p / PROBES  # a ProbeCallback's tables: a transformers/TRL run
    metrics = pd.DataFrame(list(rows)).rename(columns=_TRL_METRICS) if rows else pd.DataFrame()
    probes = load_results(probes_dir) if (probes_dir / "summary.json").is_file() else {}
    return RunData(p, label or kind, {"algorithm": kind, "writer": "TRL" if kind in ("trl", "run") else kind},
                   metrics, probes, {})


def load_run(path: str | Path, label: str | None = None) -> RunData:
    """Load a run directory's config, metrics, probe results and rollout dumps.

    A TRL output directory (``checkpoint-N/``) or a verl one (``global_step_N/``) is read too: its
    metrics from TRL's ``trainer_state.json``, its probe tables from ``<dir>/probes``.

    >>> load_run("/nonexistent")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: /nonexistent: no such directory
    """
    p = Path(path)
    cfg_path = p / CONFIG
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such directory")
    if not cfg_path.is_file() and (foreign := _load_foreign_run(p, label)) is not None:
        return foreign
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{p}: holds no run: not one of ours (config.yaml), a TRL output directory "
                                "(checkpoint-N/), a verl one (global_step_N/), a checkpoint (config.json) nor "
                                "probe results (probes/summary.json)")
    try:
        config = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{cfg_path}: not valid YAML ({e})") from None
    metrics = pd.DataFrame([r for _, r in read_jsonl(p / METRICS)]) if (p / METRICS).is_file() else pd.DataFrame()
    probes = load_results(p / PROBES) if (p / PROBES / "summary.json").is_file() else {}
    rollouts = {step: [r for _, r in read_jsonl(f)] for step, f in list_rollouts(p)}
    seed = config.get("seed")
    return RunData(p, label or str(config.get("algorithm", p.name)), config, metrics, probes, rollouts,
                   int(seed) if isinstance(seed, int) and not isinstance(seed, bool) else None)


# Settings that say where and how a run ran, not what it computes: two runs that differ only in these
# (and in the seed) are seeds of one experiment.
_RUN_ONLY_KEYS = frozenset({"seed", "output_dir", "resume", "resume_from", "progress_bar", "log_every", "cpu_threads",
                            "report_to", "tensorboard"})


def _experiment_key(r: RunData) -> str:
    return yaml.safe_dump({k: v for k, v in r.config.items() if k not in _RUN_ONLY_KEYS}, sort_keys=True)


def _unique_labels(runs: Sequence[RunData]) -> None:
    """Runs sharing a label keep it when they are seeds of one experiment (one configuration apart from
    the seed and run-only settings, distinct seeds); any other runs sharing a label (foreign runs without
    a seed, distinct configurations) get their directory name appended."""
    by_label: dict[str, list[RunData]] = {}
    for r in runs:
        by_label.setdefault(r.label, []).append(r)
    for label, rs in by_label.items():
        seeds = [r.seed for r in rs]
        if len(rs) == 1 or (None not in seeds and len(set(seeds)) == len(rs)
                            and len({_experiment_key(r) for r in rs}) == 1):
            continue
        for r in rs:  # two runs of one algorithm: keep the colour prefix, add the directory
            r.label = f"{label}-{r.path.name}"


def _seed_id(r: RunData) -> object:
    return r.seed if r.seed is not None else str(r.path)


def _run_name(r: RunData) -> str:
    """How a figure's title names one run: its label and seed, or its directory."""
    return f"{r.label}, seed {r.seed}" if r.seed is not None else f"{r.label} ({r.path.name})"


def _groups(runs: Sequence[RunData]) -> dict[str, list[RunData]]:
    """label → its runs (seeds), labels in the order given, runs by seed."""
    out: dict[str, list[RunData]] = {}
    for r in runs:
        out.setdefault(r.label, []).append(r)
    return {k: sorted(v, key=lambda r: (r.seed is None, r.seed if r.seed is not None else 0)) for k, v in out.items()}


def _first_runs(runs: Sequence[RunData], has: Callable[[RunData], bool]) -> list[RunData]:
    """Per label, the first run (lowest seed) that has the data: figures of one run per algorithm."""
    return [next(r for r in rs if has(r)) for rs in _groups(runs).values() if any(has(r) for r in rs)]


def _has_table(probe: str, table: str) -> Callable[[RunData], bool]:
    return lambda r: probe in r.probes and len(getattr(r.probes[probe], table)) > 0


def _cat(runs: Sequence[RunData], probe: str, table: str) -> pd.DataFrame:
    parts = [getattr(r.probes[probe], table).assign(label=r.label, seed=_seed_id(r)) for r in runs
             if probe in r.probes and len(getattr(r.probes[probe], table))]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _phrase(frame: pd.DataFrame) -> str:
    """"3 seeds" (or "1–3 seeds"): how many seeds each label of a table holds."""
    return plots.seeds_phrase(frame.groupby("label")["seed"].nunique().tolist())


def _which_runs(rs: Sequence[RunData]) -> str:
    seeds = {r.seed for r in rs}
    if len(seeds) == 1 and None not in seeds:
        return f"the seed-{next(iter(seeds))} run of each algorithm"
    return "runs " + ", ".join(r.path.name for r in rs)


def _band(frame: pd.DataFrame, what: str = "band") -> str:
    """``(band: 95% t)`` when some label has two or more seeds, else ``(one seed each: no band)``.

    >>> _band(pd.DataFrame({"label": ["a", "a"], "seed": [0, 1]})), _band(pd.DataFrame({"label": ["a"], "seed": [0]}))
    ('(band: 95% t interval)', '(one seed each: no band)')
    """
    many = "seed" in frame and len(frame) and int(frame.groupby("label").seed.nunique().max()) > 1
    return f"({what}: 95% t interval)" if many else f"(one seed each: no {what})"


def _mean_bar(frame: pd.DataFrame) -> str:
    many = "seed" in frame and len(frame) and int(frame.groupby("label").seed.nunique().max()) > 1
    return "the mean with its 95% t interval" if many else "the mean (one seed each: no interval)"


def _suptitle(fig, text: str, **kw) -> None:
    """A figure title, with the panels laid out again beneath it (tight_layout makes room for it)."""
    fig.suptitle(text, **kw)
    fig.tight_layout()


def _same_curves(curves: Sequence[pd.Series], tol: float = 1e-9) -> bool:
    """True when every curve (a Series over x) equals the first: series that would hide each other."""
    first = curves[0]
    return all(c.index.equals(first.index) and float((c - first).abs().max()) <= tol for c in curves[1:])


# ----------------------------------------------------------------------------- one function per figure
# Each returns a Figure, or a string saying why it was skipped.


def fig_pass_at_k(runs: Sequence[RunData]):
    d = _cat(runs, "diversity", "pass_at_k")
    if d.empty:
        ran = [r for r in runs if "diversity" in r.probes]
        if ran:  # it ran, but scored no correctness: say why, in the probe's words (e.g. no ground truth)
            why = next((s["reason"] for r in ran for s in r.probes["diversity"].skipped), "no correct/incorrect scores")
            return f"the diversity probe ran but pass@k has nothing to count: {why}"
        return "no diversity probe results (run `resrl probe` with the diversity probe)"
    tasks = {r.label: str(r.config.get("task", "task")) for r in runs}
    d = d.assign(task=[tasks.get(lab, next(iter(tasks.values()))) for lab in d.label])
    if len(runs) == 1:  # one run: a line per checkpoint
        return plots.plot_pass_at_k(d.assign(label=[f"step {s}" for s in d.step]))
    # Several: each algorithm at its last checkpoint (solid, mean over seeds with a band) and at its
    # first (dashed). Algorithms that start from one policy have one start curve: drawn once, and said.
    first = d[d.step == d.groupby("label").step.transform("min")]
    last = d[d.step == d.groupby("label").step.transform("max")]
    end = plots.seed_bands(last, "k", "pass_at_k").rename(columns={"mean": "pass_at_k"}).assign(linestyle="-")
    end = end.assign(task=end.label.map(tasks))
    start = plots.seed_bands(first, "k", "pass_at_k").rename(columns={"mean": "pass_at_k"})
    start = start.assign(task=start.label.map(tasks), linestyle="--")
    s0, s1 = sorted(first.step.unique()), sorted(last.step.unique())
    s0_txt = f"step {s0[0]}" if len(s0) == 1 else "first checkpoint"
    parts = [end]
    for _, st in start.groupby("task"):
        curves = [g.set_index("k").pass_at_k for _, g in st.groupby("label")]
        if len(curves) > 1 and _same_curves(curves):
            lab = f"{s0_txt}: all {len(curves)} (one start policy)"
            parts.append(st[st.label == st.label.iloc[0]].assign(label=lab, lo=float("nan"), hi=float("nan")))
        else:
            parts.append(st.assign(label=st.label + f" {s0_txt}"))
    counts = last.groupby("label").seed.nunique()
    if counts.nunique() > 1:  # the title cannot give one number of seeds: each legend entry gives its own
        for i, p in enumerate(parts):
            parts[i] = p.assign(label=[f"{lab} ({plots.seeds_phrase([int(counts[lab])])})" if lab in counts else lab
                                       for lab in p.label])
    legend = (f"solid: step {s1[0]}" if len(s1) == 1 else "solid: last checkpoint") + f"; dashed: {s0_txt}"
    fig = plots.plot_pass_at_k(pd.concat(parts, ignore_index=True), legend_title=legend)
    for a in fig.axes:
        a.set_title(f"{a.get_title()}: pass@k on held-out prompts, {_phrase(d)}")
    return fig


def fig_lld_bars(runs: Sequence[RunData]):
    d = _cat(runs, "lld", "deltas")
    if d.empty:
        return "no LLD results (needs at least two probed checkpoints)"
    d = d[(d.comparison == "vs_initial") & d.delta_pos_sum.notna()]
    if d.empty:
        return "no LLD comparison against the first checkpoint"
    d = d[d.step_to == d.groupby("label").step_to.transform("max")]
    # Per-prompt bars of one run per algorithm; the LLD fraction of every seed in the panel's title.
    chosen = {r.label: r for r in _first_runs(runs, _has_table("lld", "deltas"))}
    one = pd.concat([d[(d.label == lab) & (d.seed == _seed_id(r))] for lab, r in chosen.items()], ignore_index=True)
    if one.empty:
        return "no LLD comparison against the first checkpoint"
    pairs = sorted({(int(a), int(b)) for a, b in zip(one.step_from, one.step_to)})
    cmp = f"step {pairs[0][0]} → {pairs[0][1]}" if len({p[1] for p in pairs}) == 1 else "step 0 → last checkpoint"
    fig = plots.plot_lld_bars(one.rename(columns={"delta_pos_sum": "delta"}),
                              ylabel=f"Δ log π(y⁺|x), {cmp} (nats)")
    fracs = d.assign(lld=d.delta_pos_sum <= 0).groupby(["label", "seed"]).lld.mean()
    for a, lab in zip(fig.axes, plots.style.order_labels(list(one.label.unique()))):
        title = a.get_title().replace(lab, _run_name(chosen[lab]), 1)
        f = fracs.loc[lab].tolist()
        if len(f) > 1:
            from .stats import mean_interval

            iv = mean_interval(f)
            # a fraction: the t interval's ends are shown within [0, 1]
            title += f"\n{len(f)} seeds: LLD {iv.mean:.0%} [{max(iv.lo, 0.0):.0%}, {min(iv.hi, 1.0):.0%}]"
        a.set_title(title, fontsize="small")
    for a in fig.axes[1:]:  # the first panel's label says it all; the others repeat it short
        a.set_ylabel("Δ log π(y⁺|x) (nats)")
    _suptitle(fig, f"held-out prompts: Δ log π of the positive responses, {cmp}, sorted (red: LLD, Δ ≤ 0)")
    return fig


def fig_lld_over_steps(runs: Sequence[RunData]):
    d = _cat(runs, "lld", "deltas")
    if d.empty:
        return "no LLD results (needs at least two probed checkpoints)"
    d = d[(d.comparison == "vs_initial") & d.delta_pos_sum.notna()]
    if d.empty:
        return "no LLD comparison against the first checkpoint"
    t = plots.seed_bands(d, "step_to", "delta_pos_sum").rename(columns={"step_to": "step"})
    ax = plots.plot_seed_bands(t, "step", ylabel="mean Δ log π(y⁺|x) vs step 0 (nats)", zero_line=True, marker="o")
    note = plots.overlap_note(t)
    ax.set_title(f"held-out positives against step 0: mean over prompts, {_phrase(d)} {_band(d)}"
                 + (f"\n{note}" if note else ""), fontsize="small")
    return ax.figure


def fig_cosines(runs: Sequence[RunData]):
    d = _cat(runs, "interference", "cosine_samples")
    if d.empty:
        return "no interference results with mixed groups"
    d = d[d.step == d.groupby("label").step.transform("max")]
    # Per run: the mean token-pair cosine and the share of pairs with cos > 0.5 (the pairs that interfere); the
    # whole distributions look alike across algorithms (a spike at 0, tails to ±1), their means need not.
    per = d.groupby(["label", "seed"]).cosine.agg(mean="mean", high=lambda c: float((c > 0.5).mean())).reset_index()
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6))
    plots.plot_seed_means(per.rename(columns={"mean": "value"}), ax=axes[0],
                          ylabel="mean cos(∇ log p⁺, ∇ log p⁻) (head)")
    plots.plot_seed_means(per.rename(columns={"high": "value"}), ax=axes[1], ylabel="share of pairs with cos > 0.5")
    axes[0].axhline(0.0, color="k", lw=0.7)
    axes[1].set_ylim(0.0, max(float(per.high.max()) * 1.2, 1e-3))  # from 0: a difference is seen at its size
    _suptitle(fig, f"token-level head-gradient cosines at the last checkpoint, per run ({_phrase(d)}; dots: seeds, "
                   f"black: {_mean_bar(d)})")
    return fig


def fig_group_cosine(runs: Sequence[RunData]):
    d = _cat(runs, "interference", "groups")
    if d.empty or "head_update_cosine" not in d or d.head_update_cosine.notna().sum() == 0:
        return "no group-level interference results"
    d = d[d.head_update_cosine.notna()]
    t = plots.seed_bands(d, "step", "head_update_cosine")
    ax = plots.plot_seed_bands(t, "step", ylabel="cos(Σ g⁺, Σ A⁻ g⁻)  (head)", zero_line=True, marker="o")
    note = plots.overlap_note(t)
    ax.set_title(f"group-level interference, mean over held-out groups, {_phrase(d)} {_band(d)}"
                 + (f"\n{note}" if note else ""), fontsize="small")
    return ax.figure


def _panels(n: int, width: float = 3.4, height: float = 3.3):
    import matplotlib.pyplot as plt

    ncols = min(n, 5)
    fig, axes = plt.subplots(-(-n // ncols), ncols, figsize=(width * ncols, height * -(-n // ncols)), squeeze=False)
    for a in axes.flat[n:]:
        a.set_visible(False)
    return fig, list(axes.flat[:n])


def fig_bound(runs: Sequence[RunData]):
    chosen = _first_runs(runs, _has_table("subspace", "pairs"))
    d = _cat(chosen, "subspace", "pairs")
    if d.empty:
        return "no subspace results with mixed groups"
    d = d[d.representation == PAPER_REPRESENTATION]
    if d.empty:
        return f"the subspace probe did not measure {PAPER_REPRESENTATION}"
    import matplotlib.pyplot as plt

    # One panel, every algorithm's pairs pooled: the bound is a theorem, the same for every policy; what a reader
    # needs is whether any pair violates it (counted per algorithm) and how tight it is (true / bound).
    viol = (d.true_abs > d.tight_bound * (1 + 1e-5) + 1e-12).groupby(d.label).sum()
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0))
    hb = axes[0].hexbin(d.tight_bound, d.true_abs, gridsize=45, bins="log", mincnt=1, cmap="viridis")
    hi = float(max(d.tight_bound.max(), d.true_abs.max()))
    axes[0].plot([0, hi], [0, hi], color="k", ls="--", lw=0.9, label="y = x (the bound)")
    axes[0].set_xlabel("tight bound")
    axes[0].set_ylabel("|<x⁻, x⁺>|")
    axes[0].legend(frameon=False, fontsize="small", loc="upper left")
    fig.colorbar(hb, ax=axes[0], label="pairs (log)")
    ratio = (d.true_abs / d.tight_bound.where(d.tight_bound > 0)).dropna()
    axes[1].hist(ratio, bins=60, range=(0, 1.0001), color="0.4")
    axes[1].set_xlabel("|<x⁻, x⁺>| / bound (1 = tight)")
    axes[1].set_ylabel("pairs")
    axes[1].set_title(f"median {ratio.median():.2f}; {float((ratio > 0.9).mean()):.1%} of pairs above 0.9",
                      fontsize="small")
    counts = ", ".join(f"{lab} {int(viol[lab])}/{int((d.label == lab).sum())}"
                       for lab in plots.style.order_labels(list(viol.index)))
    axes[0].set_title(f"violations: {counts}", fontsize="x-small")
    _suptitle(fig, f"tight alignment bound, {PAPER_REPRESENTATION}, every probed checkpoint, pooled over "
                   f"{_which_runs(chosen)}")
    return fig


def fig_proxy(runs: Sequence[RunData]):
    chosen = _first_runs(runs, _has_table("subspace", "tokens"))
    d = _cat(chosen, "subspace", "tokens")
    c = _cat(chosen, "subspace", "correlation")
    if d.empty or c.empty:
        return "no subspace results with mixed groups"
    last = int(d.step.max())
    d = d[(d.step == last) & (d.representation == PAPER_REPRESENTATION)]
    c = c[(c.step == last) & (c.representation == PAPER_REPRESENTATION)]
    if d.empty:
        return f"the subspace probe did not measure {PAPER_REPRESENTATION}"
    import matplotlib.pyplot as plt

    # Tokens whose residual is ~0 lie inside the positives' span (ResRL gives them the floor weight): drawn apart,
    # as a distribution, instead of as a wall of points at the axis' floor.
    floor = 1e-7
    inside = d.residual_energy <= floor
    rho = float(c.spearman_sum.mean()) if len(c) else float("nan")
    p_max = float(c.spearman_sum_p.max()) if len(c) else float("nan")
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.6), gridspec_kw={"width_ratios": [3, 1.2]}, sharey=True)
    out = d[~inside]
    y_floor = plots.log_floor(d.interference_sum_abs)
    axes[0].scatter(out.residual_energy, out.interference_sum_abs.clip(lower=y_floor), s=4, alpha=0.3, lw=0,
                    rasterized=True)
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("residual energy e(x⁻) (tokens above 1e-7)")
    axes[0].set_ylabel("Σ over positive tokens |<g⁺, g⁻>|")
    parts = [d[inside].interference_sum_abs.clip(lower=y_floor), out.interference_sum_abs.clip(lower=y_floor)]
    axes[1].boxplot([p.to_numpy() for p in parts], showfliers=False, widths=0.6)
    axes[1].set_xticks([1, 2], [f"e ≤ 1e-7\n{int(inside.sum())} tokens", f"e > 1e-7\n{int((~inside).sum())}"])
    axes[1].set_yscale("log")
    axes[1].set_ylabel("(the same)")
    # ResRL down-weights low-residual tokens as the interfering ones: the proxy works when ρ < 0.
    if rho < 0 and p_max < 0.05:
        verdict = "ρ < 0 in every run (p < 0.05): low residual, more interference, as ResRL assumes"
    elif rho > 0 and p_max < 0.05:
        verdict = "ρ > 0 in every run (p < 0.05): the opposite of what ResRL assumes (it needs ρ < 0)"
    else:
        verdict = "not shown to be below 0: the proxy does not rank tokens as ResRL assumes (it needs ρ < 0)"
    axes[0].set_title(f"Spearman ρ(residual, interference) = {rho:.2f} (mean over runs)\n{verdict}",
                      fontsize="small")
    axes[1].set_title("interference by residual", fontsize="small")
    _suptitle(fig, f"the single-forward proxy vs the true head interference of each negative token, "
                   f"{PAPER_REPRESENTATION}, step {last}, {_which_runs(chosen)}")
    return fig


def fig_explained_variance(runs: Sequence[RunData]):
    chosen = _first_runs(runs, _has_table("subspace", "explained_variance"))
    d = _cat(chosen, "subspace", "explained_variance")
    if d.empty:
        return "no subspace results with mixed groups"
    d = d[d.representation == PAPER_REPRESENTATION]
    if d.empty:
        return f"the subspace probe did not measure {PAPER_REPRESENTATION}"
    # The algorithms' curves lie within a few thousandths of one another: one curve per checkpoint (the mean over
    # runs, the spread across them stated), and the rank that reaches 90% and 99% marked.
    first = d[d.step == d.groupby("label").step.transform("min")]
    last = d[d.step == d.groupby("label").step.transform("max")]
    s0, s1 = int(first.step.min()), int(last.step.max())
    ax = None
    notes = []
    for frame, name, ls in ((last, f"step {s1}", "-"), (first, f"step {s0}", "--")):
        per = frame.groupby(["label", "rank"]).explained_variance.mean().unstack(0)  # (rank, run)
        mean = per.mean(axis=1)
        spread = float((per.max(axis=1) - per.min(axis=1)).max()) if per.shape[1] > 1 else 0.0
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6.4, 4.0))
        ax.plot(mean.index, mean.to_numpy(), ls=ls, color="k", lw=1.4, label=f"{name} (runs within {spread:.3f})")
        ranks = [str(int(mean[mean >= q].index[0])) if (mean >= q).any() else "–" for q in (0.9, 0.99)]
        notes.append(f"{name}: 90% at rank {ranks[0]}, 99% at rank {ranks[1]}")
    assert ax is not None
    ax.axhline(0.9, color="0.7", lw=0.7)
    ax.axhline(0.99, color="0.7", lw=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("rank k")
    ax.set_ylabel("explained variance")
    ax.legend(frameon=False, fontsize="x-small", loc="lower right")
    ax.set_title(f"positive subspace ({PAPER_REPRESENTATION}), mean over groups and {_which_runs(chosen)}\n"
                 + "; ".join(notes), fontsize="x-small")
    return ax.figure


def _resrl_run(runs: Sequence[RunData]) -> RunData | None:
    cands = [r for r in runs if str(r.config.get("algorithm")) == "resrl" and r.rollouts]
    return min(cands, key=lambda r: (r.seed is None, r.seed or 0), default=None)


def fig_residual_weights(runs: Sequence[RunData]):
    r = _resrl_run(runs)
    if r is None:
        return "no ResRL run with rollout dumps"
    res, w = [], []
    for rows in r.rollouts.values():
        for row in rows:
            if not row.get("is_positive") and row.get("resrl_residuals"):
                res += [v for v in row["resrl_residuals"] if v is not None]
                w += [v for v, e in zip(row["resrl_weights"], row["resrl_residuals"]) if e is not None]
    if not res:
        return f"{r.path}: the rollout dumps hold no ResRL residuals (no mixed groups?)"
    # config.yaml is a TrainConfig: the quantiles are its resrl_q_low / resrl_q_high.
    fig = plots.plot_residual_weight_hist(res, w, q_low=float(r.config.get("resrl_q_low", 0.2)),
                                          q_high=float(r.config.get("resrl_q_high", 0.8)))
    _suptitle(fig, f"{_run_name(r)}: negative tokens of every dumped step (quantiles pooled; the trainer's are per "
              "group)", fontsize="small")
    return fig


def _shared_with_positives(row: dict, positives: Sequence[dict]) -> list[bool]:
    """Per token of a negative response: does a positive response of its group have the same token after
    the same prefix (the in-batch LLD's definition of a shared token, resrl_analysis.displacement)?"""
    import torch

    from .displacement import shared_prefix_mask

    neg = torch.tensor([row["response_ids"]])  # (1, T)
    if not positives or neg.shape[1] == 0:
        return [False] * neg.shape[1]
    width = max(len(p["response_ids"]) for p in positives)
    pos = torch.zeros(len(positives), width, dtype=neg.dtype)  # (P, T'), right-padded
    pos_mask = torch.zeros(len(positives), width, dtype=torch.bool)
    for i, p in enumerate(positives):
        pos[i, :len(p["response_ids"])] = torch.tensor(p["response_ids"])
        pos_mask[i, :len(p["response_ids"])] = True
    return shared_prefix_mask(neg, torch.ones_like(neg, dtype=torch.bool), pos, pos_mask)[0].tolist()


def fig_token_heatmap(runs: Sequence[RunData]):
    r = _resrl_run(runs)
    if r is None:
        return "no ResRL run with rollout dumps"
    from .checkpoints import load_tokenizer  # transformers only here, outside the plots package

    tok = load_tokenizer(step_dir(r.path, 0))
    step = max(r.rollouts)
    rows = r.rollouts[step]
    cands = [row for row in rows if not row.get("is_positive") and row.get("resrl_residuals")
             and any(v is not None for v in row["resrl_residuals"])]
    if not cands:
        return f"{r.path}: no negative response with ResRL weights at step {step}"
    import matplotlib.pyplot as plt

    seen: set[tuple] = set()  # distinct responses only
    cands = [c for c in cands if not (tuple(c["response_ids"]) in seen or seen.add(tuple(c["response_ids"])))]
    shared = [_shared_with_positives(c, [p for p in rows if p.get("is_positive") and p["group_id"] == c["group_id"]])
              for c in cands]
    # Responses with both shared and unique tokens first (what the figure is about), then the longest.
    order = sorted(range(len(cands)), key=lambda i: (not (0 < sum(shared[i]) < len(shared[i])),
                                                     -len(cands[i]["response_ids"]), i))[:3]
    per_line = 16
    heights = [max(1, -(-len(cands[i]["response_ids"]) // per_line)) for i in order]
    fig, axes = plt.subplots(len(order), 1, figsize=(9.5, sum(0.55 * h + 1.0 for h in heights) + 0.4),
                             squeeze=False, gridspec_kw={"height_ratios": [h + 1.2 for h in heights]})
    for j, (ax, i) in enumerate(zip(axes[:, 0], order)):
        row = cands[i]
        toks = [tok.convert_ids_to_tokens(t) for t in row["response_ids"]]
        truth = f", truth {row['ground_truth']}" if row.get("ground_truth") not in (None, "") else ""
        plots.plot_token_heatmap(toks, row["resrl_weights"], ax=ax, vmin=0.0, vmax=1.0, cmap="magma",
                                 colorbar=False, shared=shared[i], per_line=per_line,
                                 ylabel=f"response {j + 1}\nreward {row['reward']:g}",
                                 title=f"{row['prompt']!r} → {row['response']!r}{truth}")
        ax.title.set_fontsize("small")
    cb = fig.colorbar(plt.cm.ScalarMappable(norm=plt.Normalize(0.0, 1.0), cmap="magma"), ax=list(axes[:, 0]),
                      fraction=0.03, pad=0.02)
    cb.set_label("ResRL weight ω of the token")
    fig.suptitle(f"{_run_name(r)}, step {step}: ResRL weight of each token of whole negative responses\n"
                 "blue outline: a shared token (a positive response of the group has the same token after the same "
                 "prefix)", fontsize="small")
    return fig


def fig_dynamics(runs: Sequence[RunData]):
    parts = [r.metrics.assign(label=r.label, seed=_seed_id(r)) for r in runs if not r.metrics.empty]
    if not parts:
        return _no_metrics(runs)
    m = pd.concat(parts, ignore_index=True)
    keys = ("reward/mean", "actor/entropy", "response/length_mean", "val/reward_mean")
    fig = plots.plot_training_dynamics(m, keys=keys)
    for ax in fig.axes:
        if ax.get_title() == "val/reward_mean":
            ax.set_title("val pass@1")
    _suptitle(fig, f"training: mean over {_phrase(m)} per algorithm {_band(m)}")
    return fig


IN_BATCH_KEYS = ("lld/batch_frac", "lld/batch_delta_mean", "lld/mixed_groups")
IN_BATCH_SMOOTH = 5


def _no_in_batch(runs: Sequence[RunData], what: str, setting: str = "lld_in_batch") -> str:
    """Why there are no in-batch metrics, in words that fit who wrote the runs: they are metrics of our trainer,
    which a TRL or verl run does not log, so only our runs are told which setting to turn on.

    >>> _no_in_batch([], "no in-batch LLD metrics")
    'no in-batch LLD metrics (train with lld_in_batch: true)'
    """
    foreign = sorted({str(r.config.get("writer")) for r in runs if r.config.get("writer")})
    if runs and all(r.config.get("writer") for r in runs):
        return f"{what}: a metric our trainer logs (resrl train, {setting}: true); {'/'.join(foreign)} runs log none"
    return f"{what} (train with {setting}: true)"


def _no_metrics(runs: Sequence[RunData]) -> str:
    """No training metrics, said for the runs at hand (a TRL run keeps them in trainer_state.json)."""
    if runs and all(r.config.get("writer") for r in runs):
        return ("no training metrics (a TRL run's are in checkpoint-N/trainer_state.json, log_history; verl and plain "
                "checkpoints keep none beside the weights)")
    return "no metrics.jsonl"


def fig_in_batch_lld(runs: Sequence[RunData]):
    parts = [r.metrics.assign(label=r.label, seed=_seed_id(r)) for r in runs
             if "lld/batch_frac" in r.metrics and r.metrics["lld/batch_frac"].notna().any()]
    if not parts:
        return _no_in_batch(runs, "no in-batch LLD metrics")
    m = pd.concat(parts, ignore_index=True)
    m = m[m["lld/batch_frac"].notna()]  # steps without a mixed group have no in-batch LLD
    # One step's value comes from ~20 groups: a rolling mean over 5 steps per run makes the trend readable.
    fig = plots.plot_training_dynamics(m, keys=IN_BATCH_KEYS, smooth=IN_BATCH_SMOOTH)
    for ax in fig.axes:
        if ax.get_title().startswith("lld/batch_delta_mean"):
            ax.axhline(0.0, color="k", lw=0.8)
    _suptitle(fig, "in-batch LLD: each mixed group's positives across that step's update (steps without a mixed group "
              f"skipped)\nrolling mean over {IN_BATCH_SMOOTH} steps per run, then mean over {_phrase(m)} "
              f"{_band(m)}")
    return fig


def fig_lld_shared_unique(runs: Sequence[RunData]):
    keys = {"shared with a negative": "lld/shared_token_delta_mean", "unique": "lld/unique_token_delta_mean"}
    rows = []
    for r in runs:
        if all(k in r.metrics for k in keys.values()):
            for part, k in keys.items():
                v = pd.to_numeric(r.metrics[k], errors="coerce").mean()  # the run's mean over its steps
                if pd.notna(v):
                    rows.append({"label": r.label, "seed": _seed_id(r), "part": part, "value": float(v)})
    if not rows:
        return _no_in_batch(runs, "no in-batch LLD metrics split into shared and unique tokens")
    d = pd.DataFrame(rows)
    ax = plots.plot_lld_shared_unique(d, ylabel="in-batch Δ log π(y⁺) per positive (nats)")
    ax.set_title(f"positive tokens a negative shares vs the rest: each run's mean over steps, {_phrase(d)}\n"
                 f"{_band(d, 'error bars')}; shared + unique = the in-batch Δ", fontsize="small")
    return ax.figure


def fig_first_order(runs: Sequence[RunData]):
    chosen = _first_runs(runs, _has_table("first_order", "predictions"))
    d = _cat(chosen, "first_order", "predictions")
    if d.empty:
        return "no first-order results with mixed groups"
    algo = {r.label: str(r.config.get("algorithm")) for r in runs}
    d = d[(d.algorithm == d.label.map(algo)) & d.actual_head.notna()]
    if d.empty:
        return "no first-order prediction for the runs' own algorithms"
    import matplotlib.pyplot as plt

    named = {r.label: r for r in chosen}
    labs = plots.style.order_labels(list(d.label.unique()))
    # One scale for every panel (the algorithms' steps differ in size: that is part of what is shown), and the
    # positives (green) apart from the negatives (red): the docs' split of the prediction by polarity.
    lim = float(np.nanmax(np.abs(d[["predicted", "actual_head"]].to_numpy()))) * 1.05
    ncols = min(len(labs), 5)
    fig, axes = plt.subplots(-(-len(labs) // ncols), ncols, figsize=(3.3 * ncols, 3.3 * -(-len(labs) // ncols)),
                             squeeze=False, sharex=True, sharey=True)
    for a in axes.flat[len(labs):]:
        a.set_visible(False)
    for a, lab in zip(axes.flat, labs):
        e = d[d.label == lab]
        for pos, color, name in ((True, "#1b9e77", "positive responses"), (False, "#d95f02", "negative responses")):
            f = e[e.is_positive == pos]
            a.scatter(f.predicted, f.actual_head, s=10, alpha=0.7, color=color, label=name, lw=0)
        a.plot([-lim, lim], [-lim, lim], color="k", ls="--", lw=0.8)
        err = float((e.actual_head - e.predicted).abs().max())
        a.set_title(f"{_run_name(named[lab])}\nmax |measured − predicted| {err:.1e}", fontsize="small")
        a.set_xlim(-lim, lim)
        a.set_ylim(-lim, lim)
        from matplotlib.ticker import MaxNLocator

        a.xaxis.set_major_locator(MaxNLocator(3))
        a.ticklabel_format(style="sci", scilimits=(-2, 2))
    for a in axes[-1]:
        a.set_xlabel("predicted Δ log π (first order)")
    for a in axes.flat:
        a.set_ylabel("measured Δ log π (head step)")
    axes.flat[0].legend(frameon=False, fontsize="x-small", loc="upper left")
    _suptitle(fig, "one SGD step of the head from each probed checkpoint: Δ log π of each response, predicted vs "
                   "measured (on y = x: the first-order prediction holds)")
    return fig


# ------------------------------------------------------------------------------ the study's figures


def _live_frame(runs: Sequence[RunData], keys: Sequence[str]) -> pd.DataFrame:
    parts = [r.metrics.assign(label=r.label, seed=_seed_id(r)) for r in runs
             if any(k in r.metrics and r.metrics[k].notna().any() for k in keys)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def fig_collateral(runs: Sequence[RunData]):
    rows = []
    for r in runs:
        if "update/groups" not in r.metrics:
            continue
        for groups in r.metrics["update/groups"].dropna():
            for g in groups:  # [group_id, collateral, push_down, kl]
                rows.append({"label": r.label, "seed": _seed_id(r), "collateral": g[1], "push_down": g[2]})
    if not rows:
        return _no_in_batch(runs, "no per-group collateral", "collateral_in_batch")
    d = pd.DataFrame(rows)
    fig = plots.plot_collateral_vs_pushdown(d)
    _suptitle(fig, f"each mixed group's update: collateral on the positives' shared tokens vs push-down of the "
                   f"negatives, {_phrase(d)} pooled\nline: least squares; slope interval: 95% t over the per-seed "
                   "slopes (smaller slope: less collateral per unit push-down)")
    return fig


_CLASSES = {"resrl/weight_shared": "shared", "resrl/weight_first_divergent": "first divergent",
            "resrl/weight_after": "after"}


def fig_weight_by_class(runs: Sequence[RunData]):
    rows = []
    for r in runs:
        for key, cls in _CLASSES.items():
            if key in r.metrics and r.metrics[key].notna().any():
                rows.append({"label": r.label, "seed": _seed_id(r), "class": cls,
                             "value": float(pd.to_numeric(r.metrics[key], errors="coerce").mean())})
    if not rows:
        return "no ω by token class (a ResRL-family run with collateral_in_batch: true)"
    d = pd.DataFrame(rows)
    ax = plots.plot_seed_means(d, group="class", groups=list(_CLASSES.values()), ylabel="mean ω of negative tokens",
                               annotate=False)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"where the weight falls: ω by the negative token's class, each run's mean over steps, {_phrase(d)}"
                 f"\n(dots: seeds; black: {_mean_bar(d)})", fontsize="small")
    return ax.figure


def fig_lld_per_kl(runs: Sequence[RunData]):
    keys = ("update/pos_delta_per_kl", "update/selectivity_ratio", "update/kl_k3")
    m = _live_frame(runs, keys)
    if m.empty:
        return _no_in_batch(runs, "no step-size-free metrics", "collateral_in_batch")
    m = m[m["update/kl_k3"].notna()]
    fig = plots.plot_training_dynamics(m, keys=keys, smooth=IN_BATCH_SMOOTH)
    for ax in fig.axes:
        ax.axhline(0.0, color="k", lw=0.7)
    _suptitle(fig, f"per unit of the update's size: Δ log π(y⁺) per unit KL (k3), collateral per unit push-down, "
                   f"and the KL itself\nrolling mean over {IN_BATCH_SMOOTH} steps per run, then mean over "
                   f"{_phrase(m)} {_band(m)}")
    return fig


def fig_pass_at_k_strata(runs: Sequence[RunData]):
    from .ops import pass_at_k_by_stratum, stratum_of

    rows = []
    for r in runs:
        div = r.probes.get("diversity")
        if div is None or div.prompts is None or not len(div.prompts):
            continue
        p = div.prompts.dropna(subset=["n_correct"])
        if not len(p) or not any(stratum_of(u) for u in p.prompt_uid):
            continue
        for when, step in (("step 0", int(p.step.min())), ("last", int(p.step.max()))):
            e = p[p.step == step].sort_values("group_id")  # the probe set's order: the task's strata in turn
            n = int(e.n_samples.min())
            for s, curve in pass_at_k_by_stratum(n, e.prompt_uid.tolist(), e.n_correct.astype(int).tolist()).items():
                rows += [{"label": r.label, "seed": _seed_id(r), "stratum": s, "when": when, "k": k + 1,
                          "v": float(v)} for k, v in enumerate(curve)]
    if not rows:
        return "no held-out prompts with strata (the diversity probe on a stratified held-out set)"
    d = pd.DataFrame(rows)
    t = pd.concat([plots.seed_bands(g, "k", "v").assign(stratum=s, when=w)
                   for (s, w), g in d.groupby(["stratum", "when"])], ignore_index=True)
    order = [s for s in dict.fromkeys(d.stratum) if s != "all"] + ["all"]  # as the task lists them
    fig = plots.plot_pass_at_k_strata(t, strata=order)
    _suptitle(fig, f"pass@k on the held-out strata and all prompts, {_phrase(d)} "
                   f"{_band(d)}")
    return fig


ENTROPY_KEYS = {"entropy/pred_from_pos": "predicted ΔH from positive samples\n(nats per unit step, head SGD)",
                "entropy/pred_from_neg": "predicted ΔH from negative samples\n(nats per unit step, head SGD)",
                "entropy/delta_pos_mean": "realised ΔH on positive responses' tokens\n(nats, the update)",
                "entropy/delta_neg_mean": "realised ΔH on negative responses' tokens\n(nats, the update)"}


def fig_entropy_by_polarity(runs: Sequence[RunData]):
    parts = [r.metrics.assign(label=r.label, seed=_seed_id(r)) for r in runs
             if any(k in r.metrics and r.metrics[k].notna().any() for k in ENTROPY_KEYS)]
    if not parts:
        return _no_in_batch(runs, "no live entropy metrics", "entropy_in_batch")
    m = pd.concat(parts, ignore_index=True)
    fig = plots.plot_training_dynamics(m, keys=tuple(ENTROPY_KEYS), smooth=IN_BATCH_SMOOTH)
    for ax in fig.axes:
        key = ax.get_title().split("\n")[0]
        if key in ENTROPY_KEYS:
            ax.set_ylabel(ENTROPY_KEYS[key], fontsize="small")
            ax.axhline(0.0, color="k", lw=0.8)
    _suptitle(fig, "entropy change by polarity, each rollout batch: the first-order change of one SGD step of the "
              "head caused by the\ngroups' positive and negative samples, and the realised change across the update "
              f"on each polarity's tokens; rolling mean over {IN_BATCH_SMOOTH} steps, {_phrase(m)} (band: 95% t)")
    return fig


def fig_entropy_prediction(runs: Sequence[RunData]):
    chosen = _first_runs(runs, _has_table("entropy_dynamics", "tokens"))
    d = _cat(chosen, "entropy_dynamics", "tokens")
    if d.empty:
        return "no entropy_dynamics token rows (run `resrl probe` with the entropy_dynamics probe)"
    algo = {r.label: str(r.config.get("algorithm")) for r in runs}
    d = d[(d.algorithm == d.label.map(algo)) & d.actual_head.notna()]
    if d.empty:
        return "no entropy_dynamics rows for the runs' own algorithms with a real head step"
    corr = _cat(chosen, "entropy_dynamics", "correlation")
    named = {r.label: r for r in chosen}
    labs = plots.style.order_labels(list(d.label.unique()))
    fig, axes = _grid(len(labs))  # a column per algorithm: the prediction above, the proxy below
    for j, lab in enumerate(labs):
        t = d[d.label == lab].assign(cov_proxy=lambda x: -x.cov_centred)
        c = corr[(corr.label == lab) & (corr.scope == "run") & (corr.level == "token") & (corr.target == "actual_head")
                 & (corr.algorithm == algo[lab])]
        rho = {p: float(c[c.predictor == p].spearman.iloc[0]) if (c.predictor == p).any() else None
               for p in ("predicted", "cov_proxy")}
        a1, a2 = axes[j], axes[len(labs) + j]
        plots.plot_entropy_prediction(t.rename(columns={"actual_head": "measured"}), rho=rho["predicted"], ax=a1)
        a1.set_title(f"{_run_name(named[lab])}: first-order prediction", fontsize="small")
        plots.plot_entropy_prediction(t.rename(columns={"actual_head": "measured"}), x="cov_proxy",
                                      rho=rho["cov_proxy"], diagonal=False, ax=a2,
                                      xlabel="−(A − Ā)(log π − mean log π)")
        a2.set_title(f"{_run_name(named[lab])}: covariance proxy (Cui et al.)", fontsize="small")
    lr = sorted({float(v) for r in chosen for v in [r.probes["entropy_dynamics"].meta.get("lr")] if v is not None})
    _suptitle(fig, "one SGD step of the head (η = "
              f"{', '.join(f'{x:g}' for x in lr)}), probe set's first groups,\nevery probed checkpoint: each "
              "token's realised ΔH (float64)\nagainst the first-order prediction (top) and\nthe covariance proxy's "
              "per-token term (bottom);\nρ: Spearman over the run's tokens", fontsize="small")
    return fig


def _grid(n: int):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, n, figsize=(3.3 * n, 6.6), squeeze=False)
    return fig, list(axes[0]) + list(axes[1])


def fig_flip_map(runs: Sequence[RunData]):
    chosen = _first_runs(runs, _has_table("flips", "counts"))
    d = _cat(chosen, "flips", "counts")
    if d.empty:
        return "no flips results (needs the flips probe over at least two checkpoints)"
    d = d[(d.comparison == "step_to_step") & d.token_class.isin(["shared", "first_divergent", "after"])]
    if d.empty:
        return "no tokens of mixed groups in the flips results"
    d = d.assign(part=np.where(d.token_class == "shared", "shared", "unique"))
    named = {r.label: r for r in chosen}
    labs = plots.style.order_labels(list(d.label.unique()))
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(labs), 1, figsize=(7.0, 2.2 * len(labs) + 0.6), squeeze=False)
    for a, lab in zip(axes[:, 0], labs):
        t = d[d.label == lab]
        pairs = t.groupby(["step_from", "step_to"]).ngroups
        plots.plot_flip_map(t, ax=a, title=f"{_run_name(named[lab])}: {pairs} consecutive checkpoint pairs pooled, "
                                           f"{int(t.n_tokens.sum())} tokens")
    _suptitle(fig, "token flips between consecutive probed checkpoints (mixed groups of the probe set): the fraction "
              "of tokens whose log-prob rose,\nby p(y) at the earlier checkpoint and by polarity × shared/unique "
              "(shared: a response of the other polarity has the same token after the same prefix); number: tokens",
              fontsize="small")
    return fig


FIGURES: dict[str, Callable[[Sequence[RunData]], object]] = {
    "pass_at_k": fig_pass_at_k,
    "lld_bars": fig_lld_bars,
    "lld_over_steps": fig_lld_over_steps,
    "interference_cosines": fig_cosines,
    "group_cosine_over_steps": fig_group_cosine,
    "bound_validation": fig_bound,
    "proxy_vs_interference": fig_proxy,
    "explained_variance": fig_explained_variance,
    "residual_weight_hist": fig_residual_weights,
    "token_heatmap": fig_token_heatmap,
    "training_dynamics": fig_dynamics,
    "in_batch_lld": fig_in_batch_lld,
    "lld_shared_unique": fig_lld_shared_unique,
    "first_order": fig_first_order,
    "entropy_by_polarity": fig_entropy_by_polarity,
    "entropy_prediction": fig_entropy_prediction,
    "flip_map": fig_flip_map,
    "collateral_vs_pushdown": fig_collateral,
    "weight_by_class": fig_weight_by_class,
    "lld_per_kl": fig_lld_per_kl,
    "pass_at_k_strata": fig_pass_at_k_strata,
}


def draw_all(run_dirs: Sequence[str | Path], out: str | Path, *, formats: Sequence[str] = ("png", "pdf"),
             only: Sequence[str] | None = None) -> dict[str, str]:
    """Draw every figure (or ``only`` those) for the runs into ``out``; returns name → path or skip reason.

    Runs of one algorithm that differ only in their seed are one experiment: curves over steps show the
    mean over its seeds with a 95% t interval (:func:`resrl_analysis.stats.mean_interval`) as a band,
    and figures of one run per algorithm use its first seed's run that has the data (their titles say
    which). Any other runs sharing an algorithm are labelled apart by their directory names.
    """
    runs = [load_run(p) for p in run_dirs]
    _unique_labels(runs)
    out = Path(out)
    report: dict[str, str] = {}
    for name, fn in FIGURES.items():
        if only and name not in only:
            continue
        with paper_style():
            try:
                got = fn(runs)
            except ValueError as e:  # a plot refuses data it cannot draw (e.g. no rows left): say why
                got = str(e)
            if isinstance(got, str):
                report[name] = f"skipped: {got}"
                continue
            fig = got.figure if hasattr(got, "figure") and not hasattr(got, "savefig") else got
            paths = save_figure(fig, out / name, formats)
        report[name] = str(paths[0])
    return report


def default_out(run_dirs: Sequence[str | Path]) -> Path:
    """Where `resrl figures` writes without ``--out``: beside its input, ``FIRST_RUN_DIR/figures``.

    >>> default_out(["runs/resrl", "runs/grpo"]).as_posix()
    'runs/resrl/figures'
    """
    return Path(run_dirs[0]) / "figures"


def add_figures_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `resrl figures`.

    >>> p = add_figures_arguments(argparse.ArgumentParser(prog="resrl figures"))
    >>> "(default: )" in p.format_help() or "(default: None)" in p.format_help()
    False
    """
    # Defaults are written in the help texts, so a dispatcher's ArgumentDefaultsHelpFormatter
    # cannot append "(default: None)" or "(default: )" to them.
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (probed with `resrl probe`)")
    parser.add_argument("--out", default=None,
                        help="output directory (default: FIRST_RUN_DIR/figures, beside the first run's probes)")
    parser.add_argument("--only", default="",
                        help=f"comma-separated subset of: {', '.join(FIGURES)} (default: all of them)")
    parser.add_argument("--formats", default="png,pdf", help="comma-separated output formats (default: %(default)s)")
    return parser


def run_figures(args: argparse.Namespace) -> int:
    """Run `resrl figures`; prints one line per figure (its path, or why it was skipped)."""
    only = [s for s in args.only.split(",") if s]
    unknown = [s for s in only if s not in FIGURES]
    if unknown:
        print(f"resrl figures: unknown figure(s) {unknown}; choose from {list(FIGURES)}", file=sys.stderr)
        return 2
    try:
        out = Path(args.out) if args.out else default_out(args.run_dirs)
        report = draw_all(args.run_dirs, out, formats=[s for s in args.formats.split(",") if s], only=only)
    except (FileNotFoundError, ValueError) as e:  # bad input, as every command: exit 2
        print(f"resrl figures: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output could not be written
        print(f"resrl figures: error: {e}", file=sys.stderr)
        return 1
    if not any((Path(d) / PROBES / "summary.json").is_file() for d in args.run_dirs):
        # Said once, rather than one puzzling "no ... results" per probe figure.
        print(f"resrl figures: note: no probe results yet in {', '.join(map(str, args.run_dirs))}: the probe figures "
              "are skipped; run `resrl probe RUN_DIR` first (TRL and verl runs: docs/FOREIGN_RUNS.md)")
    for name, what in report.items():
        print(f"{name:>24}: {what}")
    return 0
