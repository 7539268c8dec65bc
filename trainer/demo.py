"""`resrl demo`: the main job on the embedded default, end to end on a CPU, with controls, seeds and intervals.

From the preset's warm start (``--preset``, default ``tiny-addition``: 3-digit addition with the carry chain
written out, so right and wrong responses share most tokens), train GRPO, PSR (the control without a negative
gradient), NSR, W-REINFORCE and ResRL, each with every seed of ``--seeds`` (default 0,1,2), as independent runs in
``--jobs`` parallel processes. Each run logs the live in-batch LLD metrics (``lld_in_batch``) and is probed on its
held-out probe set (``--probe-set heldout``: held-out prompts, each with its reference answer and responses of the
starting policy) at every checkpoint, with pass@k from ``--samples`` (≥ 64) samples per prompt at the first and the
last checkpoint. Then:

    OUT/runs/<algorithm>-s<seed>/   the run directories (docs/RUN_DIRECTORY.md), probed
    OUT/figures/                    the figures (PNG + PDF): all seeds (means with 95% bands)
    OUT/summary.json                per algorithm and metric {"mean", "lo", "hi", "seeds"}; the comparisons
    OUT/summary.md                  the same as tables, and one generated sentence per comparison

Every headline number is a mean over seeds with a 95% t interval (:mod:`resrl_analysis.stats`); ResRL vs NSR,
ResRL vs GRPO and NSR vs PSR are compared by Welch's interval of the difference, and the sentence says, from
the numbers, whether it excludes 0. ``--quick`` runs one seed (no intervals: the summary says so).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

__all__ = ["DEMO_ALGORITHMS", "DEMO_SEEDS", "COMPARISONS", "HEADLINE_METRICS", "add_demo_arguments", "run_demo",
           "demo", "summarize_run", "aggregate", "summary_markdown"]

DEMO_ALGORITHMS = ("grpo", "psr", "nsr", "w-reinforce", "resrl")
DEMO_SEEDS = (0, 1, 2)
#: (a, b): the summary reports a − b for every headline metric (when both algorithms ran).
COMPARISONS = (("resrl", "nsr"), ("resrl", "grpo"), ("nsr", "psr"))
#: key → what the summary calls it. Live metrics are means over the run's steps; probe metrics use the held-out set.
HEADLINE_METRICS = {
    "lld/batch_frac": "in-batch LLD fraction (live, mean over steps)",
    "lld/batch_delta_mean": "in-batch Δ log π(y⁺) (live, mean over steps)",
    "lld/shared_token_delta_mean": "in-batch Δ on shared tokens (live)",
    "lld/unique_token_delta_mean": "in-batch Δ on unique tokens (live)",
    "heldout_lld_frac_end": "held-out LLD fraction (last vs step 0)",
    "heldout_delta_end": "held-out Δ log π(y⁺) (last vs step 0)",
    "pass@1_start": "held-out pass@1 (step 0)",
    "pass@1_end": "held-out pass@1 (last)",
    "pass@n_start": "held-out pass@n (step 0)",
    "pass@n_end": "held-out pass@n (last)",
    "reward_last": "training reward (last 5 steps)",
    "cos_mean_end": "mean pos×neg head cos (last)",
}
_LIVE = ("lld/batch_frac", "lld/batch_delta_mean", "lld/shared_token_delta_mean", "lld/unique_token_delta_mean")


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _finite(x: Any) -> float | None:
    return float(x) if x is not None and isinstance(x, (int, float)) and math.isfinite(float(x)) else None


def summarize_run(run_dir: Path) -> dict[str, Any]:
    """Headline numbers of one probed run (each None when the run did not measure it).

    ``pass@n_*`` is pass@k at the largest k (= the samples per prompt), recorded as ``pass_k``.
    """
    from resrl_analysis.figures import load_run

    r = load_run(run_dir)
    out: dict[str, Any] = {"algorithm": str(r.config.get("algorithm", r.label)), "seed": r.config.get("seed")}
    m = r.metrics
    if not m.empty and "reward/mean" in m:
        rew = m.sort_values("step")["reward/mean"].astype(float)
        k = min(5, len(rew))
        out["reward_first"] = _finite(rew.iloc[:k].mean())
        out["reward_last"] = _finite(rew.iloc[-k:].mean())
    for key in _LIVE:  # mean over the steps that had a mixed group (NaN elsewhere)
        out[key] = _finite(m[key].astype(float).mean()) if not m.empty and key in m else None
    div = r.probes.get("diversity")
    if div is not None and len(div.pass_at_k):
        pk = div.pass_at_k
        for tag, s in (("start", int(pk.step.min())), ("end", int(pk.step.max()))):
            d = pk[pk.step == s].sort_values("k")
            out[f"pass@1_{tag}"] = _finite(d.pass_at_k.iloc[0])
            out[f"pass@n_{tag}"] = _finite(d.pass_at_k.iloc[-1])
            out["pass_k"] = int(d.k.iloc[-1])
    lld = r.probes.get("lld")
    if lld is not None and len(lld.deltas):
        d = lld.deltas[lld.deltas.comparison == "vs_initial"]
        if len(d):
            last = d[d.step_to == d.step_to.max()]
            out["heldout_delta_end"] = _finite(last.delta_pos_sum.astype(float).mean())
            flags = last.lld_sum.dropna()
            out["heldout_lld_frac_end"] = _finite(flags.astype(float).mean()) if len(flags) else None
            out["lld_steps"] = [int(d.step_from.min()), int(last.step_to.iloc[0])]
    inter = r.probes.get("interference")
    if inter is not None and len(inter.groups):
        g = inter.groups[inter.groups.status == "ok"] if "status" in inter.groups else inter.groups
        g = g[g.step == g.step.max()] if len(g) else g
        if len(g):
            out["cos_mean_end"] = _finite(g.cos_mean.mean())
    sub = r.probes.get("subspace")
    if sub is not None and len(sub.groups):
        g = sub.groups[sub.groups.status == "ok"]
        out["tight_violations"] = int(g.tight_violations.sum())
        out["pairs_checked"] = int(g.n_pairs.sum())
    return out


def aggregate(rows: list[dict[str, Any]], algorithms: tuple[str, ...]) -> dict[str, Any]:
    """Per algorithm and metric the mean with its 95% t interval across seeds, and the comparisons.

    >>> rows = [{"algorithm": a, "seed": s, "lld/batch_frac": v} for a, s, v in
    ...         [("resrl", 0, 0.1), ("resrl", 1, 0.2), ("resrl", 2, 0.15), ("nsr", 0, 0.4), ("nsr", 1, 0.5),
    ...          ("nsr", 2, 0.45)]]
    >>> agg = aggregate(rows, ("nsr", "resrl"))
    >>> agg["algorithms"]["resrl"]["lld/batch_frac"]["seeds"]
    [0.1, 0.2, 0.15]
    >>> c = agg["comparisons"][0]
    >>> c["a"], c["b"], round(c["diff"], 3), c["excludes_zero"]
    ('resrl', 'nsr', -0.3, True)
    """
    from resrl_analysis.stats import describe_difference, mean_interval, welch_difference

    per: dict[str, dict[str, Any]] = {}
    for algo in algorithms:
        mine = sorted((r for r in rows if r["algorithm"] == algo), key=lambda r: r.get("seed") or 0)
        per[algo] = {}
        for key in HEADLINE_METRICS:
            vals = [_finite(r.get(key)) for r in mine]
            if any(v is not None for v in vals):
                # "seeds": the per-seed values; "seed_ids": which seed each came from.
                per[algo][key] = {**mean_interval(vals).to_dict(),
                                  "seed_ids": [r.get("seed") for r, v in zip(mine, vals) if v is not None]}
    comps = []
    for a, b in COMPARISONS:
        if a not in per or b not in per:
            continue
        for key, name in HEADLINE_METRICS.items():
            # Step-0 numbers are the shared starting policy's: equal across algorithms by construction.
            if key.endswith("_start") or key not in per[a] or key not in per[b]:
                continue
            iv = welch_difference(per[a][key]["seeds"], per[b][key]["seeds"])
            comps.append({"a": a, "b": b, "metric": key, "diff": iv.mean,
                          "lo": iv.lo if math.isfinite(iv.lo) else None, "hi": iv.hi if math.isfinite(iv.hi) else None,
                          "excludes_zero": iv.excludes_zero, "n_seeds": iv.n,
                          "sentence": describe_difference(f"{_NAMES.get(a, a)} − {_NAMES.get(b, b)} {name}", iv,
                                                          names=(_NAMES.get(a, a), _NAMES.get(b, b)))})
    return {"algorithms": per, "comparisons": comps}


_NAMES = {"grpo": "GRPO", "psr": "PSR", "nsr": "NSR", "w-reinforce": "W-REINFORCE", "resrl": "ResRL", "nthr": "NTHR"}


def _cell(d: dict | None) -> str:
    from resrl_analysis.stats import Interval, describe_interval, fmt_number

    if not d or d.get("mean") is None:
        return "–"
    if d["lo"] is None or d["hi"] is None:  # one seed: the table's caption says there is no interval
        return fmt_number(d["mean"])
    return describe_interval(Interval.from_dict(d))


def _with_k(text: str, pass_k: int | None) -> str:
    """``pass@n`` in a label or sentence written as ``pass@<k>`` once the number of samples is known."""
    return text.replace("pass@n", f"pass@{pass_k}") if pass_k else text


def summary_markdown(agg: dict[str, Any], *, seconds: float, settings: dict[str, Any]) -> str:
    """The demo's summary as markdown: one table of means with intervals, then one sentence per comparison."""
    algos = list(agg["algorithms"])
    keys = [k for k in HEADLINE_METRICS if any(k in agg["algorithms"][a] for a in algos)]
    seeds = settings["seeds"]
    pk = settings.get("pass_k")
    lines = ["# resrl demo", "",
             f"Preset `{settings['preset']}` (task {settings['task']}), {settings['steps']} optimizer steps per run, "
             f"seeds {', '.join(map(str, seeds))} for each of {', '.join(_NAMES.get(a, a) for a in algos)}; "
             f"checkpoints every {settings['save_every']} steps; wall time {seconds / 60:.1f} min with "
             f"{settings['jobs']} parallel job(s).", "",
             f"Each cell: mean over {len(seeds)} seed(s) [95% t interval]"
             + (" (one seed: no interval)." if len(seeds) < 2 else "."), ""]
    head = "| metric | " + " | ".join(_NAMES.get(a, a) for a in algos) + " |"
    lines += [head, "|" + "---|" * (len(algos) + 1)]
    for k in keys:
        label = _with_k(HEADLINE_METRICS[k], pk)
        lines.append(f"| {label} | " + " | ".join(_cell(agg["algorithms"][a].get(k)) for a in algos) + " |")
    lines += _headline(agg, len(seeds))
    lines += ["", "## Differences (Welch 95% interval)", ""]
    if not agg["comparisons"]:
        lines.append("No comparison: ResRL, NSR, GRPO and PSR did not all run.")
    listed = agg["comparisons"] if len(seeds) > 1 else []
    if agg["comparisons"] and not listed:
        lines.append(f"No difference has an interval at {len(seeds)} seed, so none can be judged; the "
                     "differences of the means are in summary.json (`comparisons`).")
    for c in listed:  # a difference without an interval (no spread at all) says so in its sentence
        lines.append(f"- {_with_k(c['sentence'], pk)}")
    judged = [c for c in listed if c["lo"] is not None]
    if judged:
        shown = [c for c in judged if c["excludes_zero"]]
        lines += ["", f"{len(shown)} of {len(judged)} differences exclude 0 at {len(seeds)} seeds (of {len(judged)} "
                  f"independent 95% intervals about {0.05 * len(judged):.1f} would exclude 0 by chance alone)."]
    lines += _ceiling_notes(agg, pk)
    lines += ["",
              "Definitions. Live in-batch LLD (trainer, `lld_in_batch`): for each mixed group of a rollout batch, "
              "Δ log π(y⁺) of its own positive responses across that batch's update; the fraction of groups with "
              "summed Δ ≤ 0, the mean Δ per positive response, and that Δ split into tokens a negative response "
              "shares (same token after the same prefix) and the rest; each averaged over the run's steps. "
              "Held-out probe set (`resrl probe --probe-set heldout`): held-out prompts with the reference answer "
              "as a positive plus responses of the starting policy; Δ compares the last checkpoint with step 0; "
              f"pass@k from {settings['samples']} samples per prompt. Training reward: batch mean at the training "
              "temperature. Interference: cosine of the head gradients of positive and negative tokens, averaged "
              f"over mixed groups at the last checkpoint. Figures: all seeds (means with 95% t bands; one-run "
              f"figures: seed {seeds[0]}).", ""]
    return "\n".join(lines)


#: (a, b, sign, claim): the questions the demo exists to answer; sign +1: the claim says a − b > 0.
_CLAIMS = (("nsr", "psr", +1, "The negative gradient displaces positives (NSR above the control PSR)"),
           ("resrl", "nsr", -1, "ResRL displaces positives less than NSR"),
           ("resrl", "grpo", -1, "ResRL displaces positives less than GRPO"))
_LLD_KEYS = ("lld/batch_frac", "heldout_lld_frac_end")


def _headline(agg: dict[str, Any], n_seeds: int) -> list[str]:
    """One generated verdict per question and LLD metric: shown, not shown, or the opposite shown.

    >>> c = {"a": "nsr", "b": "psr", "metric": "lld/batch_frac", "diff": 0.07, "lo": 0.06, "hi": 0.08,
    ...      "excludes_zero": True}
    >>> _headline({"comparisons": [c]}, 3)[3].split(": ")[1]
    'shown, NSR − PSR = 0.070 [0.060, 0.080].'
    """
    from resrl_analysis.stats import Interval, describe_interval

    found = {(c["a"], c["b"], c["metric"]): c for c in agg["comparisons"]}
    out = []
    for a, b, sign, claim in _CLAIMS:
        for key in _LLD_KEYS:
            c = found.get((a, b, key))
            if c is None:
                continue
            if c["lo"] is None or c["hi"] is None:
                verdict = "cannot be judged (no interval)"
            elif not c["excludes_zero"]:
                verdict = "not shown (the interval includes 0)"
            else:
                verdict = "shown" if (c["lo"] > 0) == (sign > 0) else "the opposite is shown"
            iv = Interval.from_dict({"mean": c["diff"], "lo": c["lo"], "hi": c["hi"]}, n=n_seeds)
            what = HEADLINE_METRICS[key].split(" (")[0]
            out.append(f"- {claim}, {what}: {verdict}, {_NAMES.get(a, a)} − {_NAMES.get(b, b)} = "
                       f"{describe_interval(iv)}.")
    if not out:
        return []
    return ["", "## What the numbers show", "", *out]


def _ceiling_notes(agg: dict[str, Any], pass_k: int | None) -> list[str]:
    """Sentences for pass@k metrics at their ceiling for every algorithm (they cannot show a difference there).

    >>> agg = {"algorithms": {"a": {"pass@n_start": {"mean": 1.0}}, "b": {"pass@n_start": {"mean": 0.995}}}}
    >>> _ceiling_notes(agg, 64)[1]
    '- pass@64 (step 0) is at least 0.99 for every algorithm: at its ceiling, it cannot show a difference here.'
    """
    out = []
    for key, what in (("pass@n_start", "step 0"), ("pass@n_end", "last"), ("pass@1_end", "last")):
        means = [d[key]["mean"] for d in agg["algorithms"].values() if d.get(key, {}).get("mean") is not None]
        if means and min(means) >= 0.99:
            name = _with_k(key.split("_")[0], pass_k)
            out.append(f"- {name} ({what}) is at least 0.99 for every algorithm: at its ceiling, it cannot show a "
                       "difference here.")
    return ["", *out] if out else []


def _one_run(preset: str, overrides: dict[str, Any], probe_argv: list[str]) -> str:
    """Train one run and probe it (in a worker process); returns the run directory."""
    import argparse as _ap

    from resrl_analysis.checkpoints import quiet_progress_bars_unless_tty
    from resrl_analysis.probes.runner import add_probe_arguments, run_probe

    quiet_progress_bars_unless_tty()  # a fresh (spawned) interpreter: the dispatcher's setting is not inherited

    from .config import preset_config
    from .loop import train

    cfg = preset_config(preset, **overrides)
    run_dir = Path(cfg.output_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the demo is a fresh experiment each time
    t0 = time.time()
    train(cfg)
    _say(f"trained {run_dir.name} in {time.time() - t0:.0f} s")
    args = add_probe_arguments(_ap.ArgumentParser(prog="resrl probe")).parse_args([str(run_dir), *probe_argv])
    t1 = time.time()
    if run_probe(args) != 0:
        raise RuntimeError(f"resrl probe failed on {run_dir}")
    _say(f"probed {run_dir.name} in {time.time() - t1:.0f} s")
    return str(run_dir)


def demo(out: str | Path = "demo_out", *, algorithms: tuple[str, ...] = DEMO_ALGORITHMS,
         seeds: tuple[int, ...] = DEMO_SEEDS, jobs: int = 2, steps: int = 40, save_every: int = 4,
         preset: str = "tiny-addition", samples: int = 64, figures_dir: str | Path | None = None,
         probe_args: tuple[str, ...] = (), model: str | None = None) -> Path:
    """Run the demo; returns the path of ``summary.md``.

    ``model`` overrides the preset's policy (e.g. ``tiny-random`` for a fast smoke run); ``probe_args`` are
    passed on to `resrl probe` after the demo's own.

    >>> demo("/tmp/x", algorithms=("nope",))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    trainer.config.ConfigError: ...
    """
    import multiprocessing as mp

    from resrl_analysis.figures import draw_all

    from .config import ConfigError, preset_config

    t0 = time.time()
    out = Path(out)
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if samples < 2:
        raise ConfigError(f"--samples must be >= 2, got {samples}")
    runs = [(a, s, {"algorithm": a, "seed": s, "steps": steps, "save_every": save_every,
                    "output_dir": str(out / "runs" / f"{a}-s{s}"), "progress_bar": "off", "log_every": 10,
                    "lld_in_batch": True, "cpu_threads": 1, **({"model": model} if model else {})})
            for a in algorithms for s in seeds]
    cfgs = [preset_config(preset, **o) for _, _, o in runs]  # all validated before anything runs
    # Held-out probe set at every checkpoint (LLD), pass@k from `samples` samples at the first and last one.
    probe_argv = ["--probe-set", "heldout", "--groups", "0", "--samples", str(samples), "--diversity-steps", "ends",
                  "--full-model-steps", "none", "--threads", "1", "--no-progress", "--quiet", *probe_args]
    # The subspace and first-order probes feed only the figures (drawn from the first seed): the other seeds skip
    # them, which keeps the default demo within 20 minutes on 2 cores.
    rest_argv = [*probe_argv, "--probes", "lld,entropy,diversity,interference"]

    def argv_of(seed: int) -> list[str]:
        return probe_argv if seed == seeds[0] else rest_argv

    _say(f"{len(runs)} runs ({len(algorithms)} algorithms × {len(seeds)} seeds), {jobs} at a time")
    done: dict[tuple[str, int], Path] = {}
    if jobs == 1:
        for a, s, o in runs:
            done[(a, s)] = Path(_one_run(preset, o, argv_of(s)))
    else:
        # spawn: a fresh interpreter per worker (torch and fork do not mix). First seeds first: they take longest.
        order = sorted(runs, key=lambda r: r[1] != seeds[0])
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futs = {pool.submit(_one_run, preset, o, argv_of(s)): (a, s) for a, s, o in order}
            for f in as_completed(futs):
                done[futs[f]] = Path(f.result())
    run_dirs = [done[(a, s)] for a, s, _ in runs]
    _say("figures (all seeds)")
    report = draw_all(run_dirs, out / "figures", formats=("png", "pdf"))
    for name, what in report.items():
        _say(f"  {name}: {what}")
    if figures_dir is not None:
        fd = Path(figures_dir)
        fd.mkdir(parents=True, exist_ok=True)
        for f in sorted((out / "figures").glob("*.png")):
            shutil.copy2(f, fd / f.name)
    rows = [summarize_run(r) for r in run_dirs]
    agg = aggregate(rows, algorithms)
    seconds = time.time() - t0
    pass_k = next((r["pass_k"] for r in rows if r.get("pass_k")), None)
    settings = {"preset": preset, "task": cfgs[0].task, "steps": steps, "save_every": save_every,
                "seeds": list(seeds), "jobs": jobs, "samples": samples, "pass_k": pass_k,
                "algorithms": list(algorithms), "interval": "95% t across seeds; differences: Welch"}
    md = summary_markdown(agg, seconds=seconds, settings=settings)
    (out / "summary.md").write_text(md, encoding="utf-8")
    payload = {"settings": settings, "seconds": seconds, **agg, "runs": rows}
    (out / "summary.json").write_text(json.dumps(payload, indent=1, allow_nan=False), encoding="utf-8")
    _say(f"done in {seconds / 60:.1f} min: {out / 'summary.md'}")
    return out / "summary.md"


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `resrl demo`."""
    # Defaults are written in the help texts, so a dispatcher's ArgumentDefaultsHelpFormatter
    # cannot append a second "(default: ...)" to them.
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--out", default="demo_out",
                        help="output directory: runs/, figures/, summary.md, summary.json (default: %(default)s)")
    from .config import ALGORITHM_NAMES

    parser.add_argument("--algorithms", default=",".join(DEMO_ALGORITHMS),
                        help=f"comma-separated algorithms, of {','.join(ALGORITHM_NAMES)} (default: %(default)s)")
    parser.add_argument("--preset", default="tiny-addition",
                        help="the preset every run starts from (default: %(default)s; 'tiny': 2-digit multiplication)")
    parser.add_argument("--seeds", type=_int_list, default=DEMO_SEEDS,
                        help="comma-separated seeds, one run per algorithm and seed (default: 0,1,2)")
    parser.add_argument("--quick", action="store_true",
                        help="one seed (the first of --seeds): no intervals, about half the time")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained and probed in parallel (default: 2)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default: %(default)s)")
    parser.add_argument("--save-every", type=int, default=4,
                        help="checkpoint (and probe) every K steps (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=64,
                        help="samples per held-out prompt for pass@k at the first and last checkpoint "
                             "(default: %(default)s)")
    parser.add_argument("--model", default=None,
                        help="policy to start from (default: the preset's shipped warm start)")
    parser.add_argument("--figures-dir", default=None,
                        help="also copy the PNG figures here (the repository's figures/ is made this way; "
                             "default: no copy)")
    return parser


def run_demo(args: argparse.Namespace) -> int:
    """Run `resrl demo` from parsed arguments; one-line error and exit status 1 on failure."""
    from .config import ConfigError

    algos = tuple(a for a in args.algorithms.split(",") if a)
    seeds = tuple(args.seeds)[:1] if args.quick else tuple(args.seeds)
    try:
        summary = demo(args.out, algorithms=algos, seeds=seeds, jobs=args.jobs, steps=args.steps,
                       save_every=args.save_every, preset=args.preset, samples=args.samples,
                       figures_dir=args.figures_dir, model=args.model)
    except (ConfigError, ValueError, OSError) as e:
        print(f"resrl demo: {e}", file=sys.stderr)
        return 1
    print(summary.read_text(encoding="utf-8"))
    return 0
