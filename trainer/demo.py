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
    OUT/view.html                   every token of the first seed's runs, side by side (`resrl view`)
    OUT/summary.json                per algorithm and metric {"mean", "lo", "hi", "seeds"}; the comparisons
    OUT/summary.md                  the same as tables, and one generated sentence per comparison

Every headline number is a mean over seeds with a 95% t interval (:mod:`resrl_analysis.stats`); ResRL vs NSR,
ResRL vs GRPO and NSR vs PSR are compared by Welch's interval of the difference, and the sentence says, from
the numbers, whether it excludes 0. ``--quick`` runs one seed (no intervals: the summary says so).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from resrl_analysis.compare import DEMO_SPEC, METRICS, NAMES, _ceiling_notes, compare, verdicts  # noqa: F401
from resrl_analysis.compare import aggregate as _aggregate
from resrl_analysis.compare import summarize_run as _summarize_run
from resrl_analysis.compare import summary_markdown as _summary_markdown

__all__ = ["DEMO_ALGORITHMS", "DEMO_SEEDS", "COMPARISONS", "HEADLINE_METRICS", "add_demo_arguments", "run_demo",
           "demo", "summarize_run", "aggregate", "summary_markdown"]

DEMO_ALGORITHMS = ("grpo", "psr", "nsr", "w-reinforce", "resrl")
DEMO_SEEDS = (0, 1, 2)
#: (a, b): the summary reports a − b for every headline metric (when both algorithms ran).
COMPARISONS = DEMO_SPEC.pairs
#: key → what the summary calls it (the demo's metrics of :data:`resrl_analysis.compare.METRICS`).
HEADLINE_METRICS = {k: METRICS[k].label for k in DEMO_SPEC.metrics}
_NAMES = NAMES


_WHO = "demo"


def _say(msg: str) -> None:
    print(f"[{_WHO} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class _Labelled:
    """A text stream that starts every line with a label: a worker's lines stay readable when two runs interleave."""

    def __init__(self, stream: Any, label: str) -> None:
        self._stream, self._label, self._at_start = stream, label, True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            if self._at_start:
                out.append(f"[{self._label}] ")
            out.append(piece)
            self._at_start = piece.endswith("\n")
        self._stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _eta(started: float, done: int, total: int, jobs: int) -> str:
    """``ETA hh:mm`` from the runs done so far (each slot finishes about one run per mean duration × jobs).

    >>> _eta(0.0, 0, 4, 2)
    'ETA unknown'
    """
    if done == 0:
        return "ETA unknown"
    left = (time.time() - started) / done * (total - done)
    return f"ETA {time.strftime('%H:%M', time.localtime(time.time() + left))} (about {left / 60:.0f} min left)"


def summarize_run(run_dir: Path) -> dict[str, Any]:
    """Headline numbers of one probed run (each None when the run did not measure it): the demo's metrics of
    :func:`resrl_analysis.compare.summarize_run`."""
    return _summarize_run(run_dir, DEMO_SPEC.metrics)


def aggregate(rows: list[dict[str, Any]], algorithms: tuple[str, ...]) -> dict[str, Any]:
    """Per algorithm and metric the mean with its 95% t interval across seeds, and the demo's comparisons
    (:func:`resrl_analysis.compare.aggregate` with :data:`resrl_analysis.compare.DEMO_SPEC`).

    >>> rows = [{"algorithm": a, "seed": s, "lld/batch_frac": v} for a, s, v in
    ...         [("resrl", 0, 0.1), ("resrl", 1, 0.2), ("resrl", 2, 0.15), ("nsr", 0, 0.4), ("nsr", 1, 0.5),
    ...          ("nsr", 2, 0.45)]]
    >>> c = aggregate(rows, ("nsr", "resrl"))["comparisons"][0]
    >>> c["a"], c["b"], round(c["diff"], 3), c["excludes_zero"]
    ('resrl', 'nsr', -0.3, True)
    """
    return _aggregate(rows, algorithms, DEMO_SPEC)


def summary_markdown(agg: dict[str, Any], *, seconds: float, settings: dict[str, Any]) -> str:
    """The demo's summary as markdown (:func:`resrl_analysis.compare.summary_markdown` with the demo's spec)."""
    return _summary_markdown(agg, seconds=seconds, settings=settings, spec=DEMO_SPEC)


def _headline(agg: dict[str, Any], n_seeds: int) -> list[str]:
    """The verdicts section: one generated line per question (shown, not shown, or the opposite shown).

    >>> c = {"a": "nsr", "b": "psr", "metric": "lld/batch_frac", "diff": 0.07, "lo": 0.06, "hi": 0.08,
    ...      "excludes_zero": True}
    >>> _headline({"comparisons": [c], "algorithms": {}}, 3)[3].split(": ")[1]
    'shown, NSR − PSR = 0.070 [0.060, 0.080].'
    """
    out = verdicts(agg, DEMO_SPEC, n_seeds)
    return ["", "## What the numbers show", "", *out] if out else []


def run_plan(out: Path, algorithms: Sequence[str], seeds: Sequence[int], *, jobs: int, samples: int, steps: int,
             save_every: int, model: str | None, **extra: Any) -> list[tuple[str, int, dict[str, Any]]]:
    """The runs of the demo or the study, one (algorithm, seed, config overrides) each: ``OUT/runs/<algo>-s<seed>``,
    with the live in-batch and update diagnostics on and one CPU thread per run; ``extra`` overrides more fields.
    Refuses no seeds, fewer than one job or fewer than two samples (``ConfigError``)."""
    from .config import ConfigError

    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if samples < 2:
        raise ConfigError(f"--samples must be >= 2, got {samples}")
    return [(a, s, {"algorithm": a, "seed": s, "steps": steps, "save_every": save_every,
                    "output_dir": str(out / "runs" / f"{a}-s{s}"), "progress_bar": "off", "log_every": 10,
                    "lld_in_batch": True, "collateral_in_batch": True, "cpu_threads": 1,
                    **({"model": model} if model else {}), **extra})
            for a in algorithms for s in seeds]


def _one_run(preset: str, overrides: dict[str, Any], probe_argv: list[str], label: str = "", who: str = "demo"
             ) -> str:
    """Train one run and probe it (in a worker process); returns the run directory. Every line it prints starts
    with ``[label]`` (``run k/N algorithm-sSEED``)."""
    import argparse as _ap

    from resrl_analysis.checkpoints import quiet_progress_bars_unless_tty
    from resrl_analysis.probes.runner import add_probe_arguments, run_probe

    global _WHO
    _WHO = who
    quiet_progress_bars_unless_tty()  # a fresh (spawned) interpreter: the dispatcher's setting is not inherited
    if label:  # a worker runs several runs in turn: label the original streams, not the last run's wrappers
        out, err = (getattr(x, "_stream", x) for x in (sys.stdout, sys.stderr))
        sys.stdout = _Labelled(out, label)  # type: ignore[assignment]
        sys.stderr = _Labelled(err, label)  # type: ignore[assignment]

    from .config import preset_config
    from .loop import train

    cfg = preset_config(preset, **overrides)
    run_dir = Path(cfg.output_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the demo is a fresh experiment each time
    t0 = time.time()
    _say(f"training {cfg.algorithm}, seed {cfg.seed}: {cfg.steps} steps")
    train(cfg)
    _say(f"trained {run_dir.name} in {time.time() - t0:.0f} s")
    args = add_probe_arguments(_ap.ArgumentParser(prog="resrl probe")).parse_args([str(run_dir), *probe_argv])
    n_ckpt = len(list((run_dir / "checkpoints").glob("step_*")))
    which = args.probes if isinstance(args.probes, str) else ",".join(args.probes or ["every probe"])
    _say(f"probing {run_dir.name}: {which} on "
         f"{args.probe_set} prompts at {n_ckpt} checkpoints, pass@k from {args.samples} samples per prompt at the "
         "first and last (a few minutes, silent)")
    t1 = time.time()
    if run_probe(args) != 0:
        raise RuntimeError(f"resrl probe failed on {run_dir}")
    _say(f"probed {run_dir.name} in {time.time() - t1:.0f} s")
    return str(run_dir)


def _finished(o: dict[str, Any]) -> bool:
    """Whether a run of an interrupted demo or study is complete: its last checkpoint and its probes' summary."""
    run = Path(o["output_dir"])
    last = run / "checkpoints" / f"step_{int(o['steps']):06d}"
    return last.is_dir() and (run / "probes" / "summary.json").is_file()


def run_all(out: Path, runs: list[tuple[str, int, dict[str, Any]]], preset: str, argv_of: Any, jobs: int,
            who: str, reuse: bool = False) -> dict[tuple[str, int], Path]:
    """Train and probe every (algorithm, seed, overrides) of ``runs``, ``jobs`` at a time (spawned workers), the
    first seed first, each probed with ``argv_of(algorithm, seed)``; prints run k of N with an ETA as runs finish.
    Returns the run directories."""
    import multiprocessing as mp

    global _WHO
    _WHO = who
    total = len(runs)
    labels = {(a, s): f"run {k}/{total} {a}-s{s}" for k, (a, s, _) in enumerate(runs, 1)}
    done: dict[tuple[str, int], Path] = {}
    if reuse:  # an interrupted study goes on: its complete runs are kept, the others run again from scratch
        done = {(a, s): Path(o["output_dir"]) for a, s, o in runs if _finished(o)}
        if done:
            _say(f"reusing {len(done)} complete run(s) of {out}: {', '.join(p.name for p in done.values())}")
        runs = [r for r in runs if (r[0], r[1]) not in done]
        total = len(runs)
    started = time.time()
    if jobs == 1:
        for a, s, o in runs:
            done[(a, s)] = Path(_one_run(preset, o, argv_of(a, s), labels[(a, s)], who))
            k = total - sum((r[0], r[1]) not in done for r in runs)
            _say(f"{k} of {total} runs done ({a}-s{s}); {_eta(started, k, total, jobs)}")
        return done
    # spawn: a fresh interpreter per worker (torch and fork do not mix). First seeds first: they take longest.
    if not runs:
        return done
    first = min(s for _, s, _ in runs)
    order = sorted(runs, key=lambda r: r[1] != first)
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_die_with_parent,
                               initargs=(os.getpid(),))
    with _terminate_raises():
        try:
            futs = {pool.submit(_one_run, preset, o, argv_of(a, s), labels[(a, s)], who): (a, s)
                    for a, s, o in order}
            for f in as_completed(futs):
                a, s = futs[f]
                done[(a, s)] = Path(f.result())
                k = total - sum((r[0], r[1]) not in done for r in runs)
                _say(f"{k} of {total} runs done ({a}-s{s}); {_eta(started, k, total, jobs)}")
        except BaseException as e:
            # Interrupted (Ctrl-C, SIGTERM) or a run failed: stop the runs still training rather than leave them
            # writing into the output directory after this process has gone.
            busy = mp.active_children()
            for p in busy:
                p.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            for p in busy:
                p.join(timeout=10)
            if isinstance(e, (KeyboardInterrupt, _Terminated)):
                _say(f"stopped ({'SIGTERM' if isinstance(e, _Terminated) else 'interrupted'}): {len(done)} of "
                     f"{total} runs had finished; the unfinished ones were stopped")
            raise
        pool.shutdown(wait=True)
    return done


class _Terminated(SystemExit):
    """SIGTERM in the dispatcher of ``run_all``: unwinds it (stopping its workers), then exits 143."""


@contextlib.contextmanager
def _terminate_raises() -> Iterator[None]:
    """SIGTERM raises :class:`_Terminated` here (in the main thread) instead of ending the process on the spot."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: object) -> None:
        raise _Terminated(128 + signum)

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _die_with_parent(parent: int) -> None:
    """A worker's initializer: on Linux the kernel sends the worker SIGTERM when the dispatcher dies, however it
    dies (``kill -9`` included), so that no run trains on unattended into the output directory."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # no prctl: the dispatcher's own handler is what stops the worker
    if os.getppid() != parent:  # the dispatcher died before the line above took effect
        os._exit(1)


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
    from resrl_analysis.figures import draw_all

    from .config import preset_config

    t0 = time.time()
    out = Path(out)
    runs = run_plan(out, algorithms, seeds, jobs=jobs, samples=samples, steps=steps, save_every=save_every,
                    model=model)
    cfgs = [preset_config(preset, **o) for _, _, o in runs]  # all validated before anything runs
    # Held-out probe set at every checkpoint (LLD), pass@k from `samples` samples at the first and last one.
    probe_argv = ["--probe-set", "heldout", "--groups", "0", "--samples", str(samples), "--diversity-steps", "ends",
                  "--full-model-steps", "none", "--threads", "1", "--no-progress", "--quiet", *probe_args]
    # The subspace, first-order and flips probes feed only the figures (drawn from the first seed): the other seeds
    # skip them, which keeps the default demo near 20 minutes on 2 cores (21.2 measured). entropy_dynamics runs on
    # every seed: the summary reports its rank correlation with a real head step (its Gram is interference's, shared).
    rest_argv = [*probe_argv, "--probes", "lld,entropy,diversity,interference,entropy_dynamics"]

    def argv_of(seed: int) -> list[str]:
        return probe_argv if seed == seeds[0] else rest_argv

    _say(f"{len(runs)} runs ({len(algorithms)} algorithms × {len(seeds)} seeds), {jobs} at a time")
    done = run_all(out, runs, preset, lambda _a, s: argv_of(s), jobs, "demo")
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
    # The token-level page: every algorithm's run of the first seed side by side on the same prompts.
    from resrl_analysis.view import write_view

    page = write_view([done[(a, seeds[0])] for a in algorithms], out / "view.html",
                      names=[f"{NAMES.get(a, a)} seed {seeds[0]}" for a in algorithms],
                      title=f"resrl demo: {', '.join(NAMES.get(a, a) for a in algorithms)} (seed {seeds[0]})")
    _say(f"token view: {page} (open it in a browser)")
    seconds = time.time() - t0
    settings = {"preset": preset, "task": cfgs[0].task, "steps": steps, "save_every": save_every,
                "seeds": list(seeds), "jobs": jobs, "samples": samples,
                "algorithms": list(algorithms), "interval": "95% t across seeds; differences: Welch"}
    compare(run_dirs, spec=DEMO_SPEC, out=out, settings=settings, seconds=seconds)
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
    """Run `resrl demo` from parsed arguments; a one-line error, exit status 2 on bad input and 1 when a file cannot
    be written."""
    from .config import ConfigError

    algos = tuple(a for a in args.algorithms.split(",") if a)
    seeds = tuple(args.seeds)[:1] if args.quick else tuple(args.seeds)
    try:
        summary = demo(args.out, algorithms=algos, seeds=seeds, jobs=args.jobs, steps=args.steps,
                       save_every=args.save_every, preset=args.preset, samples=args.samples,
                       figures_dir=args.figures_dir, model=args.model)
    except (ConfigError, ValueError) as e:  # bad input: exit 2, as every command
        print(f"resrl demo: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"resrl demo: error: {e}", file=sys.stderr)
        return 1
    print(summary.read_text(encoding="utf-8"))
    return 0
