"""What the live in-batch LLD measurement (``lld_in_batch``) costs a training run.

Whole tiny-preset runs with the switch off and on, alternating (off, on, off, on, ...) so that load on a
shared machine hits both sides alike. The wall time of each whole ``train()`` call (loading and
checkpoints included, the same on both sides) is compared as a ratio of medians, with the spread of the
per-pair ratios.

    python -m bench.lld_in_batch_cost [--pairs 3] [--steps 6]

Prints one Markdown table row for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def _run(lld: bool, steps: int, seed: int, out: Path) -> float:
    from trainer.config import preset_config
    from trainer.loop import train

    cfg = preset_config("tiny", algorithm="resrl", steps=steps, save_every=steps, seed=seed, lld_in_batch=lld,
                        prompts_per_step=32, mini_batch_size=32, output_dir=str(out), progress_bar="off",
                        log_every=1000, dump_rollouts=False, report_to=["none"])
    t0 = time.perf_counter()
    train(cfg)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args(argv)
    from resrl_analysis.checkpoints import quiet_progress_bars_unless_tty

    quiet_progress_bars_unless_tty()
    off, on = [], []
    with tempfile.TemporaryDirectory() as tmp:
        _run(False, 1, 0, Path(tmp) / "warm")  # imports and first-call overheads out of the measured runs
        for i in range(args.pairs):
            off.append(_run(False, args.steps, i, Path(tmp) / f"off{i}"))
            on.append(_run(True, args.steps, i, Path(tmp) / f"on{i}"))
    ratios = [b / a for a, b in zip(off, on)]
    ratio = statistics.median(on) / statistics.median(off)
    print(f"| In-batch LLD cost | tiny preset, resrl, {args.steps} steps × 32 prompts × 8, {args.pairs} alternating "
          f"pairs | {statistics.median(on):.1f} s (on) | {statistics.median(off):.1f} s (off) | {ratio:.3f}× "
          f"(pairs {min(ratios):.3f}–{max(ratios):.3f}) | report | info | one extra no-grad forward of the mixed "
          "groups' positives per rollout batch |")


if __name__ == "__main__":
    main()
