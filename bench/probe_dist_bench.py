"""A probe pass on N processes (torchrun) against one process: the speed-up of ``resrl probe`` under torchrun.

The same pass (every probe, 8 groups of 16 responses, the whole-model gradients at every checkpoint, sampling on the
first and last) over a fake run (checkpoints 0-3 of a d = 256, 4-layer Qwen3-shaped model), once in one process and
once as ``python -m torch.distributed.run --standalone --nproc_per_node=N -m resrl_analysis.probes.runner`` (the
README's command; the groups split across the ranks, each rank a replica), alternating (one, N, one, N, ...) so that
load on a shared machine hits both alike. Each side runs in fresh processes with ``--threads 1`` and
``OMP_NUM_THREADS=1`` on CPU (one GPU per rank on CUDA). The pass time is ``summary.json``'s ``timing_s.total``
less its ``timing_s.import`` (from the command's start after its imports to the files written: loading, plan,
probing, gathering, writing; the import of the model's transformers code, a few seconds per process that every rank
pays at once and that does not grow with checkpoints or groups, is start-up). The wall time of the whole command
(interpreter, torch and model-code imports, the process group) is reported beside it.

    python -m bench.probe_dist_bench [--nproc 2] [--rounds 3] [--device cpu]

Prints one Markdown table row for bench/RESULTS.md (target: ≥ 1.7× faster on 2 CPU processes); ``row()`` is the
same row for ``bench/gpu_bench.py`` (N GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO_ROOT, Row, fmt_seconds

TARGET = 1.7


def fake_run(root: Path, *, quick: bool = False) -> Path:
    """The benchmark's run: 8 groups of 16 responses, checkpoints 0-3 of a d = 256, 4-layer Qwen3-shaped model (a
    toy one with ``quick``)."""
    from resrl_analysis.probes.synthetic import write_fake_run

    if quick:
        return write_fake_run(root / "run", steps=(0, 1), n_groups=8, group_size=4, debris=False)
    return write_fake_run(root / "run", steps=(0, 1, 2, 3), n_groups=8, group_size=16, hidden=256, layers=4,
                          debris=False)


def _pass(run: Path, out: Path, nproc: int, device: str) -> tuple[float, float]:
    """(pass seconds from summary.json, wall seconds of the command) of one ``resrl probe`` on ``nproc`` processes."""
    args = [str(run), "--out", str(out), "--threads", "1", "--quiet", "--no-progress", "--device", device,
            "--full-model-steps", "all"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "resrl_analysis.probes.runner", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "resrl_analysis.probes.runner", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"resrl probe on {nproc} process(es) failed: {r.stderr.strip().splitlines()[-1:]}")
    timing = json.loads((out / "summary.json").read_text())["timing_s"]
    return float(timing["total"]) - float(timing.get("import", 0.0)), wall


def measure(nproc: int = 2, rounds: int = 3, device: str = "cpu", quick: bool = False) -> dict:
    """Alternating one-process and ``nproc``-process passes; their times and the per-round ratios."""
    one, many, one_wall, many_wall = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        run = fake_run(Path(tmp), quick=quick)
        for i in range(rounds):
            for n, times, walls in ((1, one, one_wall), (nproc, many, many_wall)):
                t, w = _pass(run, Path(tmp) / f"out{n}_{i}", n, device)
                times.append(t)
                walls.append(w)
    ratios = [a / b for a, b in zip(one, many)]
    return {"nproc": nproc, "rounds": rounds, "one": one, "many": many, "one_wall": one_wall,
            "many_wall": many_wall, "ratios": ratios, "ratio": statistics.median(one) / statistics.median(many),
            "wall_ratio": statistics.median(one_wall) / statistics.median(many_wall)}


def row(m: dict, setting: str, target: float | None = TARGET) -> Row:
    """The results-table row of :func:`measure`'s numbers (``target`` None: report only)."""
    n, ratio = m["nproc"], m["ratio"]
    status = "info" if target is None else ("met" if ratio >= target else "missed")
    note = (f"per-round ratios {', '.join(f'{r:.2f}' for r in m['ratios'])} (spread {min(m['ratios']):.2f}–"
            f"{max(m['ratios']):.2f}); whole command with start-up {fmt_seconds(statistics.median(m['many_wall']))}"
            f" vs {fmt_seconds(statistics.median(m['one_wall']))} ({m['wall_ratio']:.2f}×)")
    return Row(f"Probe pass on {n} processes", setting, f"{fmt_seconds(statistics.median(m['many']))} ({n} processes)",
               f"{fmt_seconds(statistics.median(m['one']))} (1 process)", f"{ratio:.2f}× faster",
               "report" if target is None else f"≥ {target}× faster", status, note, data=m)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="toy model: checks the code path, not numbers")
    a = p.parse_args(argv)
    m = measure(a.nproc, a.rounds, a.device, a.quick)
    setting = (f"every probe (whole-model gradients at every checkpoint), 8 groups × {4 if a.quick else 16} responses, "
               f"checkpoints 0-{1 if a.quick else 3} of a {'toy' if a.quick else 'd=256, 4-layer'} Qwen3-shaped model, "
               f"fp32 {a.device}, 1 thread per process, {a.rounds} alternating rounds")
    r = row(m, setting)
    print("| " + " | ".join([r.benchmark, r.setting, r.ours, r.reference, r.ratio, r.target, r.status, r.note]) + " |")


if __name__ == "__main__":
    main()
