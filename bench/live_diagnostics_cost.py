"""What the live diagnostics cost a training run: in-batch LLD, the entropy split, token flips and the head-drift
watch (issue 24), all on against all off.

Whole ``tiny-addition`` runs (ResRL, from the shipped warm start), alternating off, on, off, on, ... so that load on
a shared machine hits both sides alike. Each run's wall time per optimizer step is its ``train()`` wall time, less a
one-step run's (loading, the step-0 checkpoint and the final one: the same on both sides), over the extra steps; the
ratio is of the medians, with the spread of the per-pair ratios. ``timing/step_s`` would not do: the after-update
forward and the watch run after it is measured. The per-part seconds of the "on" runs come from timing each
diagnostic's function in place (:func:`_timed_parts`).

    python -m bench.live_diagnostics_cost [--pairs 3] [--steps 8]

Prints one Markdown table row for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

SWITCHES = ("lld_in_batch", "entropy_in_batch", "entropy_predict_in_batch", "flips_in_batch", "drift_watch")


def _run(on: bool, steps: int, seed: int, out: Path) -> float:
    from trainer.config import preset_config
    from trainer.loop import train

    cfg = preset_config("tiny-addition", algorithm="resrl", steps=steps, save_every=steps, seed=seed,
                        output_dir=str(out), progress_bar="off", log_every=1000, dump_rollouts=False,
                        report_to=["none"], **dict.fromkeys(SWITCHES, on))
    t0 = time.perf_counter()
    train(cfg)
    return time.perf_counter() - t0


@contextmanager
def _timed_parts(acc: dict[str, float]):
    """Wrap the diagnostics' functions so that their seconds add up in ``acc`` (the "on" runs' breakdown)."""
    import trainer.in_batch as ib
    import trainer.loop as loop
    import trainer.update_dynamics as ud
    import trainer.watch as w

    def wrap(obj, name, key):
        fn = getattr(obj, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[key] += time.perf_counter() - t

        setattr(obj, name, timed)
        return obj, name, fn

    saved = [wrap(ib, "after_update", "after-update forward"), wrap(loop, "update_metrics", "all update diagnostics"),
             wrap(w.Watch, "_drift", "drift"), wrap(loop, "param_copy", "parameter copy")]
    # The rollout hook is held by the registry's entry: swap the entry's function.
    d = ib.UPDATE_DIAGNOSTICS["entropy"]
    import dataclasses

    def hook(chunk, _fn=ud.entropy_prediction):
        t = time.perf_counter()
        try:
            return _fn(chunk)
        finally:
            acc["entropy prediction (rollout)"] += time.perf_counter() - t

    ib.UPDATE_DIAGNOSTICS["entropy"] = dataclasses.replace(d, rollout=hook)
    try:
        yield
    finally:
        ib.UPDATE_DIAGNOSTICS["entropy"] = d
        for obj, name, fn in saved:
            setattr(obj, name, fn)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args(argv)
    from resrl_analysis.checkpoints import quiet_progress_bars_unless_tty

    quiet_progress_bars_unless_tty()
    off, on, base = [], [], {}
    parts: dict[str, float] = defaultdict(float)
    with tempfile.TemporaryDirectory() as tmp:
        _run(False, 1, 0, Path(tmp) / "warm")  # imports and first-call overheads out of the measured runs
        for flag in (False, True):  # the fixed cost of a run (loading, checkpoints) on each side
            base[flag] = _run(flag, 1, 0, Path(tmp) / f"one{flag}")
        for i in range(args.pairs):
            off.append((_run(False, args.steps, i, Path(tmp) / f"off{i}") - base[False]) / (args.steps - 1))
            with _timed_parts(parts):
                on.append((_run(True, args.steps, i, Path(tmp) / f"on{i}") - base[True]) / (args.steps - 1))
    ratios = [b / a for a, b in zip(off, on)]
    ratio = statistics.median(on) / statistics.median(off)
    n_steps = args.pairs * args.steps
    breakdown = ", ".join(f"{k} {v / n_steps * 1e3:.0f} ms" for k, v in parts.items())
    verdict = "met" if ratio <= 1.10 else "missed"
    print(f"| Live diagnostics cost | tiny-addition, resrl, {args.steps} steps × 32 prompts × 8, {args.pairs} "
          f"alternating pairs; on: {', '.join(SWITCHES)} | {statistics.median(on):.2f} s/step (on) | "
          f"{statistics.median(off):.2f} s/step (off) | {ratio:.3f}× (pairs {min(ratios):.3f}–{max(ratios):.3f}) | "
          f"≤ 1.10× | {verdict} | per step, on: {breakdown} |")


if __name__ == "__main__":
    main()
