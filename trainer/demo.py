"""`resrl demo`: the main job on the embedded default, end to end on a CPU.

From the shipped warm start, train GRPO, NSR, W-REINFORCE and ResRL with the same seed and budget,
probe every checkpoint of each run, draw every figure and write a short markdown summary:

    OUT/runs/<algorithm>/     the four run directories (docs/RUN_DIRECTORY.md), probed
    OUT/figures/              the figures (PNG + PDF)
    OUT/summary.md            per algorithm: reward, pass@1, pass@k, LLD fraction, interference, bound

The figures under the repository's ``figures/`` are this command's output:
``resrl demo --out demo_out --figures-dir figures``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["DEMO_ALGORITHMS", "add_demo_arguments", "run_demo", "demo", "summarize_run", "summary_markdown"]

DEMO_ALGORITHMS = ("grpo", "nsr", "w-reinforce", "resrl")


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _nan_to_none(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def summarize_run(run_dir: Path) -> dict[str, Any]:
    """Headline numbers of one probed run (each None when the run did not measure it)."""
    from resrl_analysis.figures import PAPER_REPRESENTATION, load_run

    r = load_run(run_dir)
    out: dict[str, Any] = {"algorithm": r.label}
    m = r.metrics
    if not m.empty and "reward/mean" in m:
        rew = m.sort_values("step")["reward/mean"].astype(float)
        k = min(5, len(rew))
        out["reward_first"] = float(rew.iloc[:k].mean())
        out["reward_last"] = float(rew.iloc[-k:].mean())
    div = r.probes.get("diversity")
    if div is not None and len(div.pass_at_k):
        pk = div.pass_at_k
        for tag, s in (("start", int(pk.step.min())), ("end", int(pk.step.max()))):
            d = pk[pk.step == s].sort_values("k")
            out[f"pass@1_{tag}"] = float(d.pass_at_k.iloc[0])
            out[f"pass@{int(d.k.iloc[-1])}_{tag}"] = float(d.pass_at_k.iloc[-1])
    lld = r.probes.get("lld")
    if lld is not None and len(lld.deltas):
        f = lld.fraction()
        f = f[(f.comparison == "vs_initial") & (f.variant == "sum")]
        if len(f):
            out["lld_frac_end"] = _nan_to_none(float(f.sort_values("step_to").frac_lld.iloc[-1]))
    inter = r.probes.get("interference")
    if inter is not None and len(inter.groups):
        g = inter.groups[inter.groups.status == "ok"] if "status" in inter.groups else inter.groups
        g = g[g.step == g.step.max()] if len(g) else g
        if len(g):
            out["cos_mean_end"] = _nan_to_none(float(g.cos_mean.mean()))
            out["cos_frac_positive_end"] = _nan_to_none(float(g.cos_frac_positive.mean()))
    sub = r.probes.get("subspace")
    if sub is not None and len(sub.groups):
        g = sub.groups[sub.groups.status == "ok"]
        out["tight_violations"] = int(g.tight_violations.sum())
        out["pairs_checked"] = int(g.n_pairs.sum())
        paper = g[g.representation == PAPER_REPRESENTATION]
        out["head_violations_paper_rep"] = int(paper.head_tight_violations.sum())
        c = sub.correlation[sub.correlation.representation == PAPER_REPRESENTATION]
        if len(c):
            out["spearman_paper_rep"] = _nan_to_none(float(c.spearman_sum.mean()))
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def summary_markdown(rows: list[dict[str, Any]], *, seconds: float, settings: dict[str, Any]) -> str:
    """The demo's summary table as markdown."""
    cols = [("algorithm", "algorithm"), ("reward_first", "reward (first 5 steps)"),
            ("reward_last", "reward (last 5 steps)"), ("pass@1_end", "pass@1 (end)")]
    pk = sorted({k for r in rows for k in r if k.startswith("pass@") and k.endswith("_end") and k != "pass@1_end"})
    cols += [(k, f"{k[:-4]} (end)") for k in pk]
    cols += [("lld_frac_end", "LLD fraction (vs step 0)"), ("cos_mean_end", "mean pos×neg head cos"),
             ("cos_frac_positive_end", "frac cos > 0"), ("tight_violations", "tight-bound violations"),
             ("pairs_checked", "pairs checked"), ("spearman_paper_rep", "Spearman ρ(residual, interference)")]
    lines = ["# resrl demo", "",
             f"Embedded default (tiny model, 2-digit multiplication), {settings['steps']} optimizer steps per "
             f"algorithm, seed {settings['seed']}, checkpoints every {settings['save_every']} steps; "
             f"wall time {seconds / 60:.1f} min.", "",
             "| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k, _ in cols) + " |")
    lines += ["", "Rewards are training-batch means (sampled at the training temperature); pass@k comes from "
              "the diversity probe's samples on the probe set's prompts at the first and last probed checkpoint. "
              "LLD: fraction of prompts whose positive responses lost log-likelihood (summed Δ ≤ 0) against step "
              "0. Interference: token-level cosine between the head gradients of positive and negative tokens, "
              "averaged over mixed groups at the last checkpoint. Bound: the tight alignment bound over every "
              "positive×negative pair of every representation (0 violations expected up to float tolerance); ρ: "
              "the paper representation's Spearman correlation between a negative token's residual energy and "
              "its summed |<g⁺, g⁻>| (the paper predicts it negative).", ""]
    return "\n".join(lines)


def demo(out: str | Path = "demo_out", *, algorithms: tuple[str, ...] = DEMO_ALGORITHMS, steps: int = 40,
         save_every: int = 4, seed: int = 0, figures_dir: str | Path | None = None,
         probe_args: tuple[str, ...] = (), model: str | None = None) -> Path:
    """Run the demo; returns the path of ``summary.md``.

    ``model`` overrides the tiny preset's policy (e.g. ``tiny-random`` for a fast smoke run);
    ``probe_args`` are passed on to `resrl probe`.

    >>> demo("/tmp/x", algorithms=("nope",))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    trainer.config.ConfigError: ...
    """
    from resrl_analysis.figures import draw_all
    from resrl_analysis.probes.runner import add_probe_arguments, run_probe

    from .config import preset_config
    from .loop import train

    t0 = time.time()
    out = Path(out)
    configs = [preset_config("tiny", algorithm=a, steps=steps, save_every=save_every, seed=seed,
                             output_dir=str(out / "runs" / a), progress_bar="off", log_every=5,
                             **({"model": model} if model else {}))
               for a in algorithms]  # all validated before anything runs
    runs = []
    for i, cfg in enumerate(configs, 1):
        _say(f"train {i}/{len(configs)}: {cfg.algorithm}, {steps} steps")
        run_dir = Path(cfg.output_dir)
        if run_dir.exists():
            shutil.rmtree(run_dir)  # the demo is a fresh experiment each time
        runs.append(train(cfg))
    for i, run_dir in enumerate(runs, 1):
        _say(f"probe {i}/{len(runs)}: {run_dir.name}")
        p = add_probe_arguments(argparse.ArgumentParser(prog="resrl probe"))
        args = p.parse_args([str(run_dir), "--no-progress", *probe_args])
        if run_probe(args) != 0:
            raise RuntimeError(f"resrl probe failed on {run_dir}")
    _say("figures")
    report = draw_all(runs, out / "figures", formats=("png", "pdf"))
    for name, what in report.items():
        _say(f"  {name}: {what}")
    if figures_dir is not None:
        fd = Path(figures_dir)
        fd.mkdir(parents=True, exist_ok=True)
        for f in sorted((out / "figures").glob("*.png")):
            shutil.copy2(f, fd / f.name)
    rows = [summarize_run(r) for r in runs]
    seconds = time.time() - t0
    md = summary_markdown(rows, seconds=seconds, settings={"steps": steps, "seed": seed, "save_every": save_every})
    (out / "summary.md").write_text(md, encoding="utf-8")
    (out / "summary.json").write_text(json.dumps({"runs": rows, "seconds": seconds}, indent=1), encoding="utf-8")
    _say(f"done in {seconds / 60:.1f} min: {out / 'summary.md'}")
    return out / "summary.md"


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `resrl demo`."""
    # Defaults are written in the help texts, so a dispatcher's ArgumentDefaultsHelpFormatter
    # cannot append a second "(default: ...)" to them.
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--out", default="demo_out",
                        help="output directory: runs/, figures/, summary.md (default: %(default)s)")
    from .config import ALGORITHM_NAMES

    parser.add_argument("--algorithms", default=",".join(DEMO_ALGORITHMS),
                        help=f"comma-separated algorithms, of {','.join(ALGORITHM_NAMES)} (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per algorithm (default: %(default)s)")
    parser.add_argument("--save-every", type=int, default=4,
                        help="checkpoint (and probe) every K steps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="one seed for every run (default: %(default)s)")
    parser.add_argument("--model", default=None,
                        help="policy to start from (default: the tiny preset's shipped warm start)")
    parser.add_argument("--figures-dir", default=None,
                        help="also copy the PNG figures here (the repository's figures/ is made this way; "
                             "default: no copy)")
    return parser


def run_demo(args: argparse.Namespace) -> int:
    """Run `resrl demo` from parsed arguments; one-line error and exit status 1 on failure."""
    from .config import ConfigError

    algos = tuple(a for a in args.algorithms.split(",") if a)
    try:
        summary = demo(args.out, algorithms=algos, steps=args.steps, save_every=args.save_every, seed=args.seed,
                       figures_dir=args.figures_dir, model=args.model)
    except (ConfigError, ValueError, OSError) as e:
        print(f"resrl demo: {e}", file=sys.stderr)
        return 1
    print(summary.read_text(encoding="utf-8"))
    return 0
