"""One writer per run directory: ``resrl train`` and ``resrl probe`` hold an OS lock (``flock`` on ``DIR/.lock``).

Real processes throughout: a live ``resrl train`` (the test runner script, a random tiny model) holds its run
directory while a second one is started; the holder is then killed with SIGKILL and the lock must be free at
once (the kernel drops it; no stale lock). The same for two ``resrl probe`` on one output directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from trainer_runner import fast_args

from resrl_analysis.probes.runner import main as probe_main
from resrl_analysis.probes.synthetic import write_fake_run
from resrl_analysis.rundir import LOCK, RunLock, RunLocked

pytestmark = [pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tests" / "trainer_runner.py"
TIMEOUT = 240


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _wait_for(pred, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"the holder exited ({proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def test_lock_is_reentrant_in_process_and_removed_on_release(tmp_path):
    with RunLock(tmp_path, "a") as outer:
        with RunLock(tmp_path, "b"):
            pass
        assert (tmp_path / LOCK).read_text().split()[0] == str(os.getpid())  # still held by the outer one
        assert outer.path.exists()
    assert not (tmp_path / LOCK).exists()


def test_second_train_is_refused_while_the_first_runs_and_the_lock_dies_with_it(tmp_path):
    run = tmp_path / "run"
    # A run long enough to be alive throughout (killed below).
    first = subprocess.Popen([sys.executable, str(RUNNER), "--output-dir", str(run), "--steps", "2000",
                              "--save-every", "1000", *fast_args()], cwd=tmp_path, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (run / "checkpoints" / "step_000000").is_dir(), first, "its first checkpoint")
        assert (run / LOCK).read_text().split()[:2] == [str(first.pid), "resrl"]
        for extra in (["--resume"], []):  # a resume and a fresh start are both refused, before reading anything
            second = subprocess.run([sys.executable, str(RUNNER), "--output-dir", str(run), "--steps", "4",
                                     *fast_args(), *extra], cwd=tmp_path, env=_env(), capture_output=True,
                                    text=True, timeout=TIMEOUT)
            assert second.returncode == 2, second.stderr[-2000:]
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("resrl train: error: "), second.stderr[-2000:]
            assert f"in use by another process (PID {first.pid}, resrl train)" in lines[0]
        assert first.poll() is None  # the holder ran on, untouched
        # In-process too: the lock is held by another process.
        with pytest.raises(RunLocked, match=f"PID {first.pid}"):
            RunLock(run).acquire()
    finally:
        _kill(first)
    # SIGKILL leaves the file (with the dead PID) but no lock: the directory is free at once.
    assert (run / LOCK).read_text().split()[0] == str(first.pid)
    with RunLock(run, "test") as lock:
        assert lock.path.read_text().split()[0] == str(os.getpid())


_HOLDING_PROBE = textwrap.dedent("""
    import sys, time
    import resrl_analysis.probes.runner as runner

    def hold(*args, **kwargs):  # the lock is taken; stay inside the probe until killed
        print("probing", flush=True)
        time.sleep(600)

    runner.probe_and_write = hold
    raise SystemExit(runner.main(sys.argv[1:]))
""")


def test_two_probes_on_one_output_directory(tmp_path, capsys):
    run = write_fake_run(tmp_path / "run", steps=(0, 1))
    out = tmp_path / "probes"
    args = [str(run), "--out", str(out), "--probes", "lld", "--no-progress"]
    first = subprocess.Popen([sys.executable, "-c", _HOLDING_PROBE, *args], cwd=tmp_path, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None
        lines: list[str] = []  # the holder may say other things first (e.g. where its tokens come from)
        while not lines or lines[-1] != "probing":
            line = first.stdout.readline()
            if not line:  # it ended: say why (reading stderr before it ends would wait for it)
                raise AssertionError(f"{lines} {first.stderr.read()[-2000:]}")
            lines.append(line.strip())
        capsys.readouterr()
        assert probe_main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"in use by another process (PID {first.pid}, resrl probe)" in err[0], err
        assert not (out / "summary.json").exists()
    finally:
        _kill(first)
    assert probe_main(args) == 0  # the killed holder's lock went with it
    assert (out / "summary.json").is_file() and not (out / LOCK).exists()
