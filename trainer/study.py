"""`resrl study`: is it the projection? ResRL against its controls, over 5 seeds, with a step-size-free measure.

From the ``tiny-addition`` warm start, train ResRL, its four controls (``resrl-shuffled``, ``resrl-uniform``,
``resrl-own-state``, ``shared-mask``: docs/MATH.md § Controls of ResRL), W-REINFORCE (ResRL's positive weight,
ω = 1), NSR and PSR, each with every seed of ``--seeds`` (default 0-4), with the live in-batch LLD and the
step-size-free metrics of each update (``collateral_in_batch``: the update's KL, collateral per unit of push-down,
where ResRL's weight falls); probe every run on the stratified held-out set (pass@k up to k = 64 per stratum at
step 0 and the end; held-out LLD); then summarise through :func:`resrl_analysis.compare.compare` with the
questions of :data:`STUDY_QUESTIONS` and draw the figures:

    OUT/runs/<algorithm>-s<seed>/   the run directories
    OUT/figures/                    the figures (PNG + PDF)
    OUT/summary.json, OUT/summary.md   means with 95% intervals, Welch differences, generated verdicts

About 60-90 minutes on 2 CPU cores (``--jobs 2``). ``--steps``/``--seeds``/``--algorithms`` shorten it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from resrl_analysis.compare import UPDATE_METRICS, Question, SummarySpec, name_of
from resrl_analysis.compare import register_stratum_metrics as _register_strata

from .demo import _int_list, run_all, run_plan

__all__ = ["STUDY_ALGORITHMS", "STUDY_QUESTIONS", "STUDY_SEEDS", "STUDY_SPEC", "add_study_arguments", "resummarize",
           "run_study", "study", "study_spec"]

STUDY_ALGORITHMS = ("resrl", "resrl-shuffled", "resrl-uniform", "resrl-own-state", "shared-mask", "w-reinforce",
                    "nsr", "psr")
STUDY_SEEDS = (0, 1, 2, 3, 4)
#: The held-out strata of the tiny-addition task (trainer/tasks/addition.py), easiest first.
STRATA = ("nocarry", "carry", "chain", "short")

_LIVE = UPDATE_METRICS
_STRATUM_KEYS = _register_strata(STRATA, ks=(1, 8, 64))

_CTRL = ("resrl-shuffled", "resrl-uniform")
#: The four questions of issue 25, as claims with an expected sign of a − b.
STUDY_QUESTIONS: tuple[Question, ...] = (
    # 1. Is it the projection or the step size? Same weights, selectivity destroyed.
    *(Question("resrl", c, "update/selectivity_ratio", -1,
               f"Q1 ResRL's selectivity lowers collateral per unit push-down (below {name_of(c)})") for c in _CTRL),
    *(Question("resrl", c, "update/pos_delta_per_kl", +1,
               f"Q1 ResRL's selectivity raises Δ log π(y⁺) per unit KL (above {name_of(c)})") for c in _CTRL),
    *(Question("resrl", c, "lld/batch_frac", -1, f"Q1 ResRL displaces positives less than {name_of(c)}")
      for c in _CTRL),
    # 2. Collateral per unit of intended effect, against the projection-free twin and NSR.
    *(Question("resrl", c, "update/selectivity_ratio", -1,
               f"Q2 ResRL has less collateral per unit push-down than {name_of(c)}") for c in ("w-reinforce", "nsr")),
    *(Question("resrl", c, "update/pos_delta_per_kl", +1,
               f"Q2 ResRL raises the positives more per unit KL than {name_of(c)}") for c in ("w-reinforce", "nsr")),
    # 3. Does the projection spare the right tokens?
    Question("resrl", "resrl-own-state", "resrl/weight_first_divergent", -1,
             "Q3 ResRL's projection spares the first divergent token (lower ω there than own-state)"),
    Question("resrl", "resrl-own-state", "pass@1_end", -1,
             "Q3 Sparing the first divergent token costs ResRL held-out pass@1 (below own-state)"),
    Question("resrl", "shared-mask", "update/selectivity_ratio", +1,
             "Q3 The exact shared-token mask is more selective than ResRL's projection"),
    # 4. Diversity: pass@k per stratum against NSR.
    *(Question("resrl", "nsr", f"pass@{k}_end/{s}", +1, f"Q4 ResRL's pass@{k} on the {s} stratum is above NSR's")
      for s in STRATA for k in (1, 8, 64)),
)

_STUDY_METRICS = ("lld/batch_frac", "lld/batch_delta_mean", *_LIVE, "heldout_lld_frac_end", "heldout_delta_end",
                  "pass@1_start", "pass@1_end", "pass@n_start", "pass@n_end", *_STRATUM_KEYS, "reward_last")

_SCALE_NOTE = (
    "What the toy scale cannot show. These runs train a 2-layer, ~0.2M-parameter model on 3-digit addition "
    "(responses of 23-31 tokens that diverge late) for {steps} optimizer steps. The paper's results are at "
    "Qwen3-4B on competition math, with responses of thousands of tokens that can diverge early, where a wrong "
    "first step is followed by a long wrong continuation: the share of first divergent tokens, the size of the "
    "positive subspace against d, and pass@k at k = 128 are all of another kind there. To test the same "
    "questions at scale (GPU, the paper's preset; every algorithm and metric here is the trainer's own): "
    "`resrl train --preset qwen3-4b-math --model /models/Qwen3-4B --config my_math.yaml --set "
    "algorithm=resrl-shuffled --set collateral_in_batch=true --output-dir runs/q4b-shuffled-s0` for each "
    "algorithm and seed, `resrl probe RUN --probe-set heldout`, then `resrl compare runs/q4b-*`.")

_DEFINITIONS = (
    "Definitions (docs/MATH.md § Controls of ResRL, § Collateral per unit of push-down). Live metrics are each "
    "run's mean over its rollout batches. KL: the k3 estimate of KL(π_before ‖ π_after) per sampled token of "
    "the batch (an estimate on the batch's own tokens, not an exact KL). Collateral: minus the positives' "
    "Δ log π on tokens a negative of the group shares; push-down: minus the negatives' Δ log π; their ratio is "
    "the ratio of the means over a batch's mixed groups (smaller: more selective). ω by class: the negatives' "
    "tokens shared with a positive, the first divergent token, the tokens after it (ResRL-family runs; "
    "shared-mask's ω is its mask). Held-out set: the first {heldout} held-out prompts, the 4 strata in turn "
    "(nocarry, carry: 1-2 carries, chain: every column carries, short: a 2-digit second operand the training pool "
    "never shows), each with pass@k from {samples} samples at the end (unbiased estimator); at step 0 every "
    "run starts from the same policy, sampled once (in the first run: the other runs' step-0 cells are "
    "empty). Q1-Q4 are the four questions "
    "of the study; every difference is Welch's 95% interval across seeds.")

#: The study's summary: its metrics, ResRL against each control and twin (and NSR against PSR), its questions.
STUDY_SPEC = SummarySpec(
    title="resrl study: is it the projection?",
    metrics=_STUDY_METRICS,
    pairs=(*(("resrl", c) for c in STUDY_ALGORITHMS if c not in ("resrl", "psr")), ("nsr", "psr")),
    questions=STUDY_QUESTIONS,
    definitions=_DEFINITIONS)


def _say(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def study_spec(steps: int, heldout: int = 64) -> SummarySpec:
    """:data:`STUDY_SPEC` with its note on what the toy scale cannot show (``steps`` and the number of held-out
    prompts filled in)."""
    return replace(STUDY_SPEC, notes=(_SCALE_NOTE.format(steps=steps),),
                   definitions=_DEFINITIONS.replace("{heldout}", str(heldout)))


def study(out: str | Path = "study_out", *, algorithms: tuple[str, ...] = STUDY_ALGORITHMS,
          seeds: tuple[int, ...] = STUDY_SEEDS, jobs: int = 2, steps: int = 40, save_every: int = 8,
          preset: str = "tiny-addition", samples: int = 64, figures_dir: str | Path | None = None,
          model: str | None = None, prompts_per_step: int | None = None, heldout_prompts: int = 64,
          reuse: bool = False) -> Path:
    """Run the study; returns the path of ``summary.md``.

    ``prompts_per_step`` (default: the preset's) sets the rollout batch and the update's size alike (one optimizer
    step per rollout batch); ``heldout_prompts`` probes the first N held-out prompts (the strata in turn). pass@k
    at step 0 is the shared starting policy's: sampled once, in the first run (the others sample their last
    checkpoint only). ``reuse``: keep the complete runs of an interrupted study in ``out`` (the wall time then
    counts from its first run's start).

    >>> study("/tmp/x", seeds=())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    trainer.config.ConfigError: --seeds: give at least one seed
    """
    from resrl_analysis.compare import compare
    from resrl_analysis.figures import draw_all

    from .config import preset_config

    t0 = time.time()
    out = Path(out)
    # The entropy and flips diagnostics and the drift watch answer issue 24's questions, which the demo asks; here
    # they would cost 40 runs' time for questions the study does not ask.
    runs = run_plan(out, algorithms, seeds, jobs=jobs, samples=samples, steps=steps, save_every=save_every,
                    model=model, entropy_in_batch=False, entropy_predict_in_batch=False, flips_in_batch=False,
                    drift_watch=False,
                    **({"prompts_per_step": prompts_per_step, "mini_batch_size": prompts_per_step}
                       if prompts_per_step else {}))
    cfgs = [preset_config(preset, **o) for _, _, o in runs]  # all validated before anything runs
    # Held-out LLD at every checkpoint, pass@k from `samples` samples at the first and last; the other probes feed
    # only the demo's figures.
    argv = ["--probe-set", "heldout", "--groups", str(heldout_prompts), "--samples", str(samples),
            "--full-model-steps", "none", "--threads", "1", "--no-progress", "--quiet", "--probes", "lld,diversity"]
    first = (algorithms[0], seeds[0])

    def argv_of(a: str, s: int) -> list[str]:  # step 0 is every run's starting policy: sampled once
        return [*argv, "--diversity-steps", "ends" if (a, s) == first else str(steps)]

    _say(f"{len(runs)} runs ({len(algorithms)} algorithms × {len(seeds)} seeds), {jobs} at a time; "
         "about 1.5-2 minutes of a core per run")
    if reuse:  # the wall time of an interrupted study counts from its first run's start
        starts = [(Path(o["output_dir"]) / "config.yaml").stat().st_mtime for _, _, o in runs
                  if (Path(o["output_dir"]) / "config.yaml").is_file()]
        t0 = min([t0, *starts])
    done = run_all(out, runs, preset, argv_of, jobs, "study", reuse=reuse)
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
    seconds = time.time() - t0
    settings = {"preset": preset, "task": cfgs[0].task, "steps": steps, "save_every": save_every,
                "seeds": list(seeds), "jobs": jobs, "samples": samples, "algorithms": list(algorithms),
                "interval": "95% t across seeds; differences: Welch", "machine": _machine(),
                "prompts_per_step": cfgs[0].prompts_per_step, "heldout_prompts": heldout_prompts}
    compare(run_dirs, spec=study_spec(steps, heldout_prompts), out=out, settings=settings, seconds=seconds)
    _say(f"done in {seconds / 60:.1f} min: {out / 'summary.md'}")
    return out / "summary.md"


def _machine() -> str:
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} CPU cores, load average {load:.1f} at the end: other jobs shared them"


def resummarize(out: str | Path, figures_dir: str | Path | None = None) -> Path:
    """Re-draw the figures and rewrite the summary of a finished study from ``OUT/runs`` (its settings and wall
    time from ``OUT/summary.json``): what a change of the summary or the figures needs, without training again."""
    import json

    from resrl_analysis.compare import compare
    from resrl_analysis.figures import draw_all

    out = Path(out)
    old = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    settings = old["settings"]
    run_dirs = [out / "runs" / f"{a}-s{s}" for a in settings["algorithms"] for s in settings["seeds"]]
    missing = [str(d) for d in run_dirs if not d.is_dir()]
    if missing:
        raise FileNotFoundError(f"{out}: missing run directories {missing[:3]}")
    draw_all(run_dirs, out / "figures", formats=("png", "pdf"))
    if figures_dir is not None:
        fd = Path(figures_dir)
        fd.mkdir(parents=True, exist_ok=True)
        for f in sorted((out / "figures").glob("*.png")):
            shutil.copy2(f, fd / f.name)
    keep = {k: v for k, v in settings.items() if k not in ("n_runs", "pairs", "pass_k")}
    compare(run_dirs, spec=study_spec(int(settings["steps"]), int(settings.get("heldout_prompts", 64))), out=out,
            settings=keep, seconds=old["seconds"])
    return out / "summary.md"


def add_study_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `resrl study`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    from .config import ALGORITHM_NAMES

    parser.add_argument("--out", default="study_out",
                        help="output directory: runs/, figures/, summary.md, summary.json (default: %(default)s)")
    parser.add_argument("--algorithms", default=",".join(STUDY_ALGORITHMS),
                        help=f"comma-separated algorithms, of {','.join(ALGORITHM_NAMES)} (default: %(default)s)")
    parser.add_argument("--seeds", type=_int_list, default=STUDY_SEEDS,
                        help="comma-separated seeds, one run per algorithm and seed (default: 0,1,2,3,4)")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained and probed in parallel (default: 2)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default: %(default)s)")
    parser.add_argument("--save-every", type=int, default=8,
                        help="checkpoint (and held-out LLD probe) every K steps (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=64,
                        help="samples per held-out prompt for pass@k at the first and last checkpoint "
                             "(default: %(default)s)")
    parser.add_argument("--prompts-per-step", type=int, default=None,
                        help="prompts per rollout batch and per update (default: the preset's, 32)")
    parser.add_argument("--heldout-prompts", type=int, default=64,
                        help="held-out prompts probed (the first N, the strata in turn; default: %(default)s)")
    parser.add_argument("--preset", default="tiny-addition",
                        help="the preset every run starts from (default: %(default)s)")
    parser.add_argument("--model", default=None, help="policy to start from (default: the preset's warm start)")
    parser.add_argument("--figures-dir", default=None, help="also copy the PNG figures here (default: no copy)")
    parser.add_argument("--reuse", action="store_true",
                        help="go on with an interrupted study in --out: keep its complete runs, redo the others")
    parser.add_argument("--resummarize", action="store_true",
                        help="train nothing: re-draw the figures and rewrite the summary of the study in --out")
    return parser


def run_study(args: argparse.Namespace) -> int:
    """Run `resrl study` from parsed arguments; a one-line error, exit status 2 on bad input and 1 when a file cannot
    be written."""
    from .config import ConfigError

    try:
        if args.resummarize:
            summary = resummarize(args.out, args.figures_dir)
            print(summary.read_text(encoding="utf-8"))
            return 0
        summary = study(args.out, algorithms=tuple(a for a in args.algorithms.split(",") if a),
                        seeds=tuple(args.seeds), jobs=args.jobs, steps=args.steps, save_every=args.save_every,
                        preset=args.preset, samples=args.samples, figures_dir=args.figures_dir, model=args.model,
                        prompts_per_step=args.prompts_per_step, heldout_prompts=args.heldout_prompts,
                        reuse=args.reuse)
    except (ConfigError, ValueError, KeyError) as e:  # bad input: exit 2, as every command
        print(f"resrl study: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"resrl study: error: {e}", file=sys.stderr)
        return 1
    print(summary.read_text(encoding="utf-8"))
    return 0

