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
    """What one run directory holds, loaded for drawing."""

    path: Path
    label: str
    config: dict
    metrics: pd.DataFrame
    probes: dict[str, ProbeResult] = field(default_factory=dict)
    rollouts: dict[int, list[dict]] = field(default_factory=dict)


# TRL's log_history names → ours, so the training-dynamics figure reads a TRL run as it reads ours.
_TRL_METRICS = {"reward": "reward/mean", "entropy": "actor/entropy", "completions/mean_length": "response/length_mean"}


def _load_foreign_run(p: Path, label: str | None) -> RunData | None:
    # A TRL / verl run or checkpoint folder (resrl_analysis.runs): metrics from its own logs, probe
    # tables from where `resrl probe` and ProbeCallback write them.
    from .checkpoints import ProbeError
    from .runs import discover_run

    try:
        info = discover_run(p)
        kind, rows, probes_dir = info.kind, info.metrics, info.probes_dir
    except ProbeError:
        if not (p / "probes" / "summary.json").is_file():  # live probes of a run that saved no checkpoint
            return None
        kind, rows, probes_dir = "run", (), p / "probes"
    metrics = pd.DataFrame(list(rows)).rename(columns=_TRL_METRICS) if rows else pd.DataFrame()
    probes = load_results(probes_dir) if (probes_dir / "summary.json").is_file() else {}
    return RunData(p, label or kind, {"algorithm": kind}, metrics, probes, {})


def load_run(path: str | Path, label: str | None = None) -> RunData:
    """Load a run directory's config, metrics, probe results and rollout dumps.

    A TRL output directory (``checkpoint-N/``) or a verl one (``global_step_N/``) is read too: its
    metrics from TRL's ``trainer_state.json``, its probe tables from ``<dir>/probes``.

    >>> load_run("/nonexistent")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: /nonexistent: not a run directory (no config.yaml)
    """
    p = Path(path)
    cfg_path = p / CONFIG
    if not cfg_path.is_file() and p.is_dir() and (foreign := _load_foreign_run(p, label)) is not None:
        return foreign
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{p}: not a run directory (no config.yaml)")
    try:
        config = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{cfg_path}: not valid YAML ({e})") from None
    metrics = pd.DataFrame([r for _, r in read_jsonl(p / METRICS)]) if (p / METRICS).is_file() else pd.DataFrame()
    probes = load_results(p / PROBES) if (p / PROBES / "summary.json").is_file() else {}
    rollouts = {step: [r for _, r in read_jsonl(f)] for step, f in list_rollouts(p)}
    return RunData(p, label or str(config.get("algorithm", p.name)), config, metrics, probes, rollouts)


def _unique_labels(runs: Sequence[RunData]) -> None:
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in runs:
        if seen[r.label] > 1:  # two runs of one algorithm: keep the colour prefix, add the directory
            r.label = f"{r.label}-{r.path.name}"


def _cat(runs: Sequence[RunData], probe: str, table: str) -> pd.DataFrame:
    parts = [getattr(r.probes[probe], table).assign(label=r.label) for r in runs
             if probe in r.probes and len(getattr(r.probes[probe], table))]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


# ----------------------------------------------------------------------------- one function per figure
# Each returns a Figure, or a string saying why it was skipped.


def fig_pass_at_k(runs: Sequence[RunData]):
    d = _cat(runs, "diversity", "pass_at_k")
    if d.empty:
        return "no diversity probe results (run `resrl probe` with the diversity probe)"
    if len(runs) == 1:  # one run: a line per checkpoint
        d = d.assign(label=[f"step {s}" for s in d.step])
    else:  # several: each run at its last sampled checkpoint
        d = d[d.step == d.groupby("label").step.transform("max")]
    tasks = {r.label: str(r.config.get("task", "task")) for r in runs}
    d = d.assign(task=[tasks.get(lab, next(iter(tasks.values()))) for lab in d.label])
    return plots.plot_pass_at_k(d)


def fig_lld_bars(runs: Sequence[RunData]):
    d = _cat(runs, "lld", "deltas")
    if d.empty:
        return "no LLD results (needs at least two probed checkpoints)"
    d = d[(d.comparison == "vs_initial") & d.delta_pos_sum.notna()]
    d = d[d.step_to == d.groupby("label").step_to.transform("max")]
    return plots.plot_lld_bars(d.rename(columns={"delta_pos_sum": "delta"}))


def fig_lld_over_steps(runs: Sequence[RunData]):
    d = _cat(runs, "lld", "deltas")
    if d.empty:
        return "no LLD results (needs at least two probed checkpoints)"
    d = d[(d.comparison == "vs_initial") & d.delta_pos_sum.notna()]
    ax = plots.plot_lld_over_steps(d.rename(columns={"step_to": "step", "delta_pos_sum": "delta"}))
    ax.set_title("Δ log π(y⁺|x) against step 0")
    return ax.figure


def fig_cosines(runs: Sequence[RunData]):
    d = _cat(runs, "interference", "cosine_samples")
    if d.empty:
        return "no interference results with mixed groups"
    d = d[d.step == d.groupby("label").step.transform("max")]
    ax = plots.plot_cosine_distribution(d)
    ax.set_title("token-level head-gradient cosines, last checkpoint")
    return ax.figure


def fig_group_cosine(runs: Sequence[RunData]):
    d = _cat(runs, "interference", "groups")
    if d.empty or "head_update_cosine" not in d or d.head_update_cosine.notna().sum() == 0:
        return "no group-level interference results"
    d = d[d.head_update_cosine.notna()]
    return plots.plot_group_cosine_over_steps(d.rename(columns={"head_update_cosine": "group_cosine"})).figure


def fig_bound(runs: Sequence[RunData]):
    d = _cat(runs, "subspace", "pairs")
    if d.empty:
        return "no subspace results with mixed groups"
    d = d[d.representation == PAPER_REPRESENTATION]
    if d.empty:
        return f"the subspace probe did not measure {PAPER_REPRESENTATION}"
    ax = plots.plot_bound_validation(d.rename(columns={"true_abs": "true", "tight_bound": "bound"}), hue="label")
    ax.set_title(f"tight bound, {PAPER_REPRESENTATION}: " + ax.get_title())
    return ax.figure


def fig_proxy(runs: Sequence[RunData]):
    d = _cat(runs, "subspace", "tokens")
    c = _cat(runs, "subspace", "correlation")
    if d.empty or c.empty:
        return "no subspace results with mixed groups"
    last = int(d.step.max())
    d, c = d[d.step == last], c[c.step == last]
    rho = c.groupby("representation").spearman_sum.mean().to_dict()
    fig = plots.plot_proxy_vs_interference(
        d.rename(columns={"residual_energy": "residual", "interference_sum_abs": "interference"}), rho=rho)
    fig.suptitle(f"proxy (residual energy) vs true head interference, step {last}, pooled over runs", y=1.03)
    return fig


def fig_explained_variance(runs: Sequence[RunData]):
    d = _cat(runs, "subspace", "explained_variance")
    if d.empty:
        return "no subspace results with mixed groups"
    d = d[(d.representation == PAPER_REPRESENTATION) & (d.step == d.groupby("label").step.transform("min"))]
    ax = plots.plot_explained_variance(d.rename(columns={"explained_variance": "explained"}))
    ax.set_title(f"positive subspace, {PAPER_REPRESENTATION}")
    return ax.figure


def _resrl_run(runs: Sequence[RunData]) -> RunData | None:
    return next((r for r in runs if str(r.config.get("algorithm")) == "resrl" and r.rollouts), None)


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
    fig.suptitle(f"{r.label}: negative tokens of every dumped step (quantiles pooled; the trainer's are per group)",
                 y=1.04, fontsize="small")
    return fig


def fig_token_heatmap(runs: Sequence[RunData]):
    r = _resrl_run(runs)
    if r is None:
        return "no ResRL run with rollout dumps"
    from .checkpoints import load_tokenizer  # transformers only here, outside the plots package

    tok = load_tokenizer(step_dir(r.path, 0))
    step = max(r.rollouts)
    cands = [row for row in r.rollouts[step] if not row.get("is_positive") and row.get("resrl_residuals")
             and any(v is not None for v in row["resrl_residuals"])]
    if not cands:
        return f"{r.path}: no negative response with ResRL weights at step {step}"
    import matplotlib.pyplot as plt

    seen: set[tuple] = set()  # distinct responses only
    cands = [c for c in cands if not (tuple(c["response_ids"]) in seen or seen.add(tuple(c["response_ids"])))][:4]
    fig, axes = plt.subplots(len(cands), 1, figsize=(8, 1.3 * len(cands) + 0.4), squeeze=False)
    for i, (ax, row) in enumerate(zip(axes[:, 0], cands)):
        toks = [tok.convert_ids_to_tokens(t) for t in row["response_ids"]]
        plots.plot_token_heatmap(toks, row["resrl_weights"], ax=ax, vmin=0.0, vmax=1.0, cmap="magma",
                                 colorbar=i == 0, title=f"{row['prompt']!r} → ω per token (reward {row['reward']:g})")
    fig.suptitle(f"{r.label}, step {step}: ResRL weight of each negative token", fontsize="small")
    return fig


def fig_dynamics(runs: Sequence[RunData]):
    parts = [r.metrics.assign(label=r.label) for r in runs if not r.metrics.empty]
    if not parts:
        return "no metrics.jsonl"
    m = pd.concat(parts, ignore_index=True)
    keys = ("reward/mean", "actor/entropy", "response/length_mean", "val/reward_mean")
    fig = plots.plot_training_dynamics(m, keys=keys)
    for ax in fig.axes:
        if ax.get_title() == "val/reward_mean":
            ax.set_title("val pass@1")
    return fig


def fig_first_order(runs: Sequence[RunData]):
    d = _cat(runs, "first_order", "predictions")
    if d.empty:
        return "no first-order results with mixed groups"
    algo = {r.label: str(r.config.get("algorithm")) for r in runs}
    d = d[(d.algorithm == d.label.map(algo)) & d.is_positive & d.actual_head.notna()]
    if d.empty:
        return "no first-order prediction for the runs' own algorithms"
    ax = plots.plot_first_order(d.rename(columns={"actual_head": "measured"}))
    ax.set_title("one SGD step of the head, positives")
    return ax.figure


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
    "first_order": fig_first_order,
}


def draw_all(run_dirs: Sequence[str | Path], out: str | Path, *, formats: Sequence[str] = ("png", "pdf"),
             only: Sequence[str] | None = None) -> dict[str, str]:
    """Draw every figure (or ``only`` those) for the runs into ``out``; returns name → path or skip reason."""
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
    except (FileNotFoundError, ValueError) as e:
        print(f"resrl figures: {e}", file=sys.stderr)
        return 1
    for name, what in report.items():
        print(f"{name:>24}: {what}")
    return 0
