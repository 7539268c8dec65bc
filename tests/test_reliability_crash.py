"""Issue 7.1: SIGKILL ``resrl train`` at seeded random moments, and in the middle of a checkpoint write, then
``--resume`` to the end; the result must be indistinguishable from an uninterrupted run.

Every run is the real console script (``resrl train --preset tiny``, the shipped warm start, so groups are
mixed and the parameters really move) in a subprocess, killed with SIGKILL from outside:

- ``random``: killed at a seeded random moment during training, resumed, the resumed process killed again at a
  seeded random moment, then resumed to completion (a resume of a resume).
- ``mid-write``: killed while ``checkpoints/.tmp-step_000004-*`` exists. The window (tens of ms) is hit
  deterministically: the run directory is polled every ~1 ms, the process is frozen with SIGSTOP as soon as the
  temporary directory appears (after a seeded extra delay, so the freeze lands at a random point of the write),
  the directory is inspected while frozen, and only if the write is still incomplete is SIGKILL sent (else
  SIGCONT and wait for the next save). The partial checkpoint is left on disk as real crash debris, and
  ``resrl probe`` is run on the crashed run before it is resumed, to show readers ignore it too.
- ``first-save``: killed while the very first checkpoint (``step_000000``) is being written, so the run
  directory holds a config and no complete checkpoint; ``--resume`` must start from scratch.

After the final resume: no ``.tmp*`` left anywhere; every ``step_XXXXXX`` loads with the Auto classes and its
trainer state; ``metrics.jsonl`` has exactly one strictly well-formed line per step 1..N; the rollout dumps and
the parameters of every checkpoint equal the uninterrupted reference run's (parameters to 1e-6 relative).

The trainer has no crash-injection hook (checkpointing.py has none), so the kills come from outside only.
Timing: one reference run and seven killed/resumed processes, ~10 s each to start; ~1.5-2 min on 2 busy cores.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from trainer.checkpointing import list_checkpoints, load_trainer_state

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS = 6
SAVE_EVERY = 2
SAVED = [0, 2, 4, 6]
#: ``resrl train --preset tiny`` with a small batch: the shipped warm start solves about half the prompts, so
#: ResRL has mixed groups and every step moves the parameters (a random model gets reward 0 everywhere and
#: would make "equal to the uninterrupted run" vacuous).
ARGS = ["--preset", "tiny", "--algorithm", "resrl", "--steps", str(STEPS), "--save-every", str(SAVE_EVERY),
        "--seed", "5", "--set", "prompts_per_step=4", "--set", "mini_batch_size=4", "--set", "n=4",
        "--set", "max_response_length=5", "--set", "lr=3e-4", "--set", "progress_bar=off",
        "--set", "log_every=1", "--set", "cpu_threads=1"]
TIMEOUT = 240  # seconds for any one process (startup is ~10 s on two busy cores)
_STEP_LINE = re.compile(r"^step\s+(\d+)\s")
_RESUME_LINE = re.compile(r"^resuming .* from checkpoint step (\d+) \(target (\d+) steps\)")


def _resrl() -> list[str]:
    script = Path(sys.executable).with_name("resrl")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "trainer.cli"]


class Train:
    """``resrl train`` in a subprocess; a thread collects its stdout lines (summary lines are flushed per step)."""

    def __init__(self, run: Path, *, resume: bool = False, full_args: bool = True, log: Path | None = None):
        args = [*_resrl(), "train", "--output-dir", str(run)]
        if full_args:
            args += ARGS
        if resume:
            args.append("--resume")
        self.stderr_path = log or run.with_name(run.name + f".stderr-{time.monotonic_ns()}")
        self._err = open(self.stderr_path, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(args, cwd=run.parent, stdout=subprocess.PIPE, stderr=self._err, text=True,
                                     bufsize=1, env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._done = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def wait_line(self, pattern: re.Pattern, pred=lambda m: True, timeout: float = TIMEOUT) -> re.Match | None:
        """The first stdout line matching ``pattern`` (and ``pred``); None if the process ended first."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = pattern.match(line)
                    if m and pred(m):
                        return m
                seen = len(self.lines)
                if self._done:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {pattern.pattern!r}; stdout: {self.lines[-5:]}")
                self._cond.wait(min(left, 1.0))

    def resumed_from(self) -> int | None:
        m = self.wait_line(_RESUME_LINE)
        return None if m is None else int(m.group(1))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)

    def wait(self) -> int:
        try:
            rc = self.proc.wait(timeout=TIMEOUT)
        finally:
            self._err.close()
        with self._cond:
            while not self._done:
                self._cond.wait(1.0)
        return rc

    def stderr(self) -> str:
        return self.stderr_path.read_text()[-3000:]


def _complete(run: Path) -> list[int]:
    return [s for s, _ in list_checkpoints(run)]


def _debris(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.name.startswith(".tmp"))


def _finish(run: Path, *, full_args: bool) -> Train:
    """Resume ``run`` to completion; checks it resumed from its latest *complete* checkpoint (or from scratch)."""
    latest = (_complete(run) or [None])[-1]
    t = Train(run, resume=True, full_args=full_args)
    rc = t.wait()
    assert rc == 0, t.stderr()
    m = next((_RESUME_LINE.match(x) for x in t.lines if _RESUME_LINE.match(x)), None)
    if latest is None:
        assert m is None, t.lines  # nothing complete to resume from: a fresh start
    else:
        assert m is not None and int(m.group(1)) == latest and int(m.group(2)) == STEPS, t.lines
    return t


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, started at once in the background (it overlaps the first scenario)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    t = Train(run)
    done: dict[str, Path] = {}

    def get() -> Path:
        if not done:
            assert t.wait() == 0, t.stderr()
            done["run"] = run
        return run

    yield get
    if t.proc.poll() is None:
        t.kill()
        t.wait()


def _assert_like_reference(run: Path, ref: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # 1. No crash debris survives the resume, and no partial checkpoint became a step_ directory.
    assert _debris(run) == [], _debris(run)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [f"step_{s:06d}" for s in SAVED], names
    # 2. Every checkpoint loads (Auto classes + trainer state) and equals the uninterrupted run's.
    for s in SAVED:
        ck = run / "checkpoints" / f"step_{s:06d}"
        AutoModelForCausalLM.from_pretrained(ck)
        AutoTokenizer.from_pretrained(ck)
        assert load_trainer_state(ck)["step"] == s
        a = load_file(str(ref / "checkpoints" / f"step_{s:06d}" / "model.safetensors"))
        b = load_file(str(ck / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            scale = max(float(a[k].abs().max()), 1e-3)
            assert float((a[k] - b[k]).abs().max()) <= 1e-6 * scale + 1e-7, (s, k)
    # The comparison is not vacuous: training moved the parameters far beyond the tolerance.
    a0 = load_file(str(ref / "checkpoints" / "step_000000" / "model.safetensors"))
    a6 = load_file(str(ref / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors"))
    assert max(float((a0[k] - a6[k]).abs().max()) for k in a0) > 1e-4
    # 3. metrics.jsonl: exactly one strictly well-formed JSON line per step, nothing torn or duplicated.
    raw = (run / "metrics.jsonl").read_text(encoding="utf-8")
    assert raw.endswith("\n")
    lines = [json.loads(x) for x in raw.split("\n")[:-1]]  # json.loads raises on a torn line
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1))
    ref_lines = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(lines, ref_lines):
        assert x.keys() == y.keys()
        assert x["reward/mean"] == y["reward/mean"] and x["train/skipped_steps"] == 0, x["step"]
        for key in ("actor/pg_loss", "actor/grad_norm", "resrl/weight_mean", "actor/entropy"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)
    # 4. The rollout dumps (what each saved policy sampled) are the reference's, byte for byte.
    dumps = sorted(p.name for p in (run / "rollouts").iterdir())
    assert dumps == sorted(p.name for p in (ref / "rollouts").iterdir()) == [f"step_{s:06d}.jsonl" for s in SAVED]
    for name in dumps:
        assert (run / "rollouts" / name).read_bytes() == (ref / "rollouts" / name).read_bytes(), name


def test_sigkill_at_random_moments_twice_then_resume(tmp_path, reference):
    rng = random.Random(20260507)
    run = tmp_path / "run"
    # Kill 1: somewhere after step j1 was logged (j1 in 1..4), a random fraction of a step later.
    j1, d1 = rng.randint(1, 4), rng.uniform(0.0, 0.4)
    t = Train(run)
    assert t.wait_line(_STEP_LINE, lambda m: int(m.group(1)) >= j1) is not None, t.stderr()
    time.sleep(d1)
    t.kill()
    assert t.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    first = {"after_step": j1, "delay_s": round(d1, 3), "complete": _complete(run), "debris": _debris(run)}
    assert first["complete"] and first["complete"][-1] < STEPS

    # Kill 2: the resumed process, after it logged its first or a later new step.
    t = Train(run, resume=True)
    start = t.resumed_from()
    assert start == first["complete"][-1], (start, first)  # the latest *complete* checkpoint, never debris
    j2, d2 = rng.randint(start + 1, STEPS - 1), rng.uniform(0.0, 0.3)
    hit = t.wait_line(_STEP_LINE, lambda m: int(m.group(1)) >= j2)
    time.sleep(d2)
    t.kill()
    rc = t.wait()
    second = {"resumed_from": start, "after_step": j2, "delay_s": round(d2, 3), "rc": rc,
              "complete": _complete(run), "debris": _debris(run)}
    assert hit is not None or rc == 0, t.stderr()
    print("kills:", first, second)

    _finish(run, full_args=True)
    _assert_like_reference(run, reference())


def _freeze_inside_write(t: Train, run: Path, targets: list[int], want: str | None = None,
                         delay: float = 0.0) -> dict:
    """Poll for ``.tmp-step_XXXXXX-*`` of a target step (and, with ``want``, for that file inside it); freeze the
    process there; SIGKILL it only if the checkpoint is still incomplete, else let it go on to the next target
    (at the last target any moment of the write will do). Returns what was on disk when it was killed."""
    ck = run / "checkpoints"
    pid = t.proc.pid
    deadline = time.monotonic() + TIMEOUT
    remaining = list(targets)
    while remaining and t.proc.poll() is None and time.monotonic() < deadline:
        step = remaining[0]
        need = want if len(remaining) > 1 else None
        try:
            tmp = [n for n in os.listdir(ck) if n.startswith(f".tmp-step_{step:06d}-")]
            ready = bool(tmp) and (need is None or need in os.listdir(ck / tmp[0]))
        except FileNotFoundError:
            tmp, ready = [], False
        if not ready:
            if (ck / f"step_{step:06d}").exists():  # missed this save: try the next one
                remaining.pop(0)
            time.sleep(0.0005)
            continue
        time.sleep(delay)
        os.kill(pid, signal.SIGSTOP)
        try:
            still = [n for n in os.listdir(ck) if n.startswith(f".tmp-step_{step:06d}-")]
            if still and not (ck / f"step_{step:06d}").exists():
                inside = {p.name: p.stat().st_size for p in (ck / still[0]).iterdir()}
                t.kill()
                return {"step": step, "tmp": still[0], "files_in_tmp": inside}
        finally:
            os.kill(pid, signal.SIGCONT)  # harmless after SIGKILL; resumes the process otherwise
        remaining.pop(0)
    raise AssertionError(f"never caught a checkpoint write of steps {targets} in progress")


def test_sigkill_during_a_checkpoint_write_then_resume(tmp_path, reference):
    from resrl_analysis.probes.runner import main as probe_main

    rng = random.Random(7)
    run = tmp_path / "run"
    t = Train(run)
    # Frozen once trainer_state.pt (written last, after the weights) has appeared in the temporary directory:
    # the weights are complete there, the state partial or complete, the rename not yet done.
    hit = _freeze_inside_write(t, run, [4, 6], want="trainer_state.pt", delay=rng.uniform(0.0, 0.005))
    assert t.wait() == -signal.SIGKILL
    print("killed inside the write:", hit)
    # The crash left the partial checkpoint as debris; the complete ones are untouched.
    assert (run / "checkpoints" / hit["tmp"]).is_dir()
    assert _complete(run) == [s for s in SAVED if s < hit["step"]]
    assert not (run / "checkpoints" / f"step_{hit['step']:06d}").exists()
    # metrics.jsonl may run past the last complete checkpoint (step 4 was logged before its save began).
    logged = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, hit["step"] + 1))
    # A reader (resrl probe) of the crashed run sees only complete checkpoints.
    out = tmp_path / "probes"
    assert probe_main([str(run), "--out", str(out), "--probes", "entropy", "--no-progress", "--groups", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [c["step"] for c in summary["checkpoints"]] == _complete(run)

    _finish(run, full_args=False)  # `resrl train --resume --output-dir RUN`: the run's own config.yaml
    assert (run / "metrics.jsonl").read_text().count("\n") == STEPS  # steps past the checkpoint re-run once
    _assert_like_reference(run, reference())


def test_sigkill_during_the_first_checkpoint_write_then_resume_starts_over(tmp_path, reference):
    run = tmp_path / "run"
    t = Train(run)
    hit = _freeze_inside_write(t, run, [0])  # as early in the write as the poll sees it
    assert t.wait() == -signal.SIGKILL
    assert _complete(run) == [] and (run / "config.yaml").is_file() and hit["step"] == 0
    _finish(run, full_args=True)
    _assert_like_reference(run, reference())
