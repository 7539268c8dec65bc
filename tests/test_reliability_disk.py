"""Issue 7.7 (and the disk side of 7.5): an output directory that cannot be written, and writes that fail midway.

Already covered elsewhere, not repeated: ``torch.save`` raising ``OSError`` in a checkpoint write, then resume
(tests/test_trainer_loop.py::test_crash_while_writing_a_checkpoint_leaves_earlier_ones_intact), an output
directory under a file in-process (test_trainer_loop.py::test_run_directory_guards), ``resrl probe --out``
under a file (tests/test_probes_runner.py::test_bad_options).

Here: the unwritable output directory through a ``resrl train`` subprocess; ``save_pretrained`` failing after a
partial write and the final rename failing; *real* operating-system write failures (RLIMIT_FSIZE makes the
kernel refuse a write past N bytes, as a full disk would, so the trainer's own writers fail the way they fail in
production: torch.save with RuntimeError, safetensors with SafetensorError); a failed rollout dump; a failed
replacement of an existing checkpoint; and a probe pass whose result writing fails midway.

Tests run as root, so ``chmod`` cannot make a directory unwritable; a path whose parent is a regular file can.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_runner import fast_args

import trainer.checkpointing as checkpointing
import trainer.loop as loop
from trainer.checkpointing import CheckpointError, list_checkpoints, save_checkpoint
from trainer.cli import main as resrl_main
from trainer.metrics_log import read_metrics

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def _resrl() -> list[str]:
    script = Path(sys.executable).with_name("resrl")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "trainer.cli"]


def _one_error_line(stderr: str, prefix: str) -> str:
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1, stderr[-2000:]
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


def _names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def _train(out: Path, *extra: str) -> int | BaseException:
    """``resrl train`` in-process; an exception escaping the entry point is returned (the console script would
    print its traceback and exit 1)."""
    try:
        return resrl_main(["train", "--output-dir", str(out), *fast_args(), "--algorithm", "grpo", *extra])
    except Exception as exc:  # noqa: BLE001 - the test reports what escaped
        return exc


def _assert_step0_intact(run: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.models import build_tiny_model

    ck = run / "checkpoints" / "step_000000"
    AutoModelForCausalLM.from_pretrained(ck)
    AutoTokenizer.from_pretrained(ck)
    start = build_tiny_model(seed=0).state_dict()
    saved = load_file(str(ck / "model.safetensors"))
    assert all(torch.equal(saved[k], start[k]) for k in saved)


# ================================================================================== unwritable output directory


@pytest.mark.e2e
def test_output_dir_under_a_regular_file_subprocess(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file\n")
    proc = subprocess.run([*_resrl(), "train", "--output-dir", str(blocker / "run"), *fast_args(), "--steps", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = _one_error_line(proc.stderr, "resrl train: error: ")
    assert f"cannot write to the output directory {blocker / 'run'}: Not a directory" in line
    assert blocker.read_text() == "a regular file\n" and sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


@pytest.mark.integration
def test_output_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "run"
    target.write_text("not a directory")
    assert _train(target, "--steps", "1") == 2
    assert "cannot write to the output directory" in _one_error_line(capsys.readouterr().err, "resrl train: error: ")
    assert target.read_text() == "not a directory"


@pytest.mark.integration
def test_disk_full_at_start_is_a_clear_error(tmp_path, capsys, monkeypatch):
    # config.yaml is the first file written. NOTE (docs/RELIABILITY.md): the run directory and its empty
    # checkpoints/ stay behind, and the same command run again is refused ("already holds a run; pass --resume").
    monkeypatch.setattr(loop, "save_config_yaml", lambda cfg, path: (_ for _ in ()).throw(ENOSPC))
    out = tmp_path / "run"
    assert _train(out, "--steps", "1") == 2
    line = _one_error_line(capsys.readouterr().err, "resrl train: error: ")
    assert f"cannot write to the output directory {out}: No space left on device" in line
    assert [p.name for p in out.rglob("*")] == ["checkpoints"] and not (out / "metrics.jsonl").exists()


# ================================================================================== checkpoint writes that fail


@pytest.mark.integration
def test_save_pretrained_failing_midway(tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    real = PreTrainedModel.save_pretrained

    def half_then_fail(self, save_directory, *a, **kw):
        if ".tmp-step_000002" in str(save_directory):
            (Path(save_directory) / "model.safetensors").write_bytes(b"\0" * 1000)  # a partial file
            raise ENOSPC
        return real(self, save_directory, *a, **kw)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", half_then_fail)
    run = tmp_path / "run"
    assert _train(run, "--steps", "4", "--save-every", "2") == 1
    line = _one_error_line(capsys.readouterr().err, "resrl train: error: ")
    assert "step_000002 failed: No space left on device; earlier checkpoints are intact" in line
    assert _names(run) == ["step_000000"]  # no step_000002, no .tmp debris
    _assert_step0_intact(run)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real)
    assert _train(run, "--steps", "4", "--save-every", "2", "--resume") == 0
    assert [s for s, _ in list_checkpoints(run)] == [0, 2, 4]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]


def _write_files(d: Path) -> None:
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"weights")


@pytest.mark.unit
def test_final_rename_failing(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 0, _write_files, {"step": 0})
    real = os.replace

    def failing(src, dst):
        if Path(dst).name == "step_000003":
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(checkpointing.os, "replace", failing)
    with pytest.raises(CheckpointError, match=r"step_000003 failed: Input/output error; earlier checkpoints are"):
        save_checkpoint(tmp_path, 3, _write_files, {"step": 3})
    assert _names(tmp_path) == ["step_000000"]
    assert checkpointing.load_trainer_state(tmp_path / "checkpoints" / "step_000000")["step"] == 0


@pytest.mark.unit
def test_failed_replacement_keeps_the_existing_checkpoint(tmp_path, monkeypatch):
    """When a checkpoint of the same step exists, save_checkpoint moves it into a ``.tmp-old-…`` directory and then
    renames the new one into place; if that second rename fails, the old one must be put back (docs/RELIABILITY.md
    bug 4: it was left in ``.tmp-old-…``, which the next resume deletes as debris)."""
    save_checkpoint(tmp_path, 2, _write_files, {"step": 2, "tag": "old"})
    real = os.replace
    calls = {"n": 0}

    def second_fails(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(checkpointing.os, "replace", second_fails)
    with pytest.raises(CheckpointError):
        save_checkpoint(tmp_path, 2, _write_files, {"step": 2, "tag": "new"})
    assert calls["n"] >= 2  # the failing rename happened
    assert _names(tmp_path) == ["step_000002"], _names(tmp_path)
    assert checkpointing.load_trainer_state(tmp_path / "checkpoints" / "step_000002")["tag"] == "old"


@contextlib.contextmanager
def _file_size_limit(limit: int):
    """The kernel refuses (EFBIG) any write past ``limit`` bytes of a file: a write failing midway, from the OS."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the process is killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


@pytest.mark.integration
@pytest.mark.parametrize(("limit", "fails_in"), [(1_000_000, "model.safetensors"), (4_000_000, "trainer_state.pt")])
def test_real_write_failure_in_a_checkpoint_is_a_clear_error(tmp_path, capsys, monkeypatch, limit, fails_in):
    """On a real failed write torch.save raises RuntimeError ("unexpected pos …") and safetensors raises
    SafetensorError ("File too large (os error 27)"), not OSError; both must become the one-line CheckpointError
    (docs/RELIABILITY.md bug 3: only OSError was converted, and the run died with a traceback)."""
    real = loop.save_checkpoint
    hit = []

    def limited(run_dir, step, write_model, state):
        if step < 2:
            return real(run_dir, step, write_model, state)

        def spy(d: Path) -> None:
            write_model(d)
            hit.append(sorted(p.name for p in d.iterdir()))

        with _file_size_limit(limit):
            return real(run_dir, step, spy, state)

    monkeypatch.setattr(loop, "save_checkpoint", limited)
    run = tmp_path / "run"
    rc = _train(run, "--steps", "2", "--save-every", "2")
    err = capsys.readouterr().err
    # What holds already: the failed checkpoint left nothing, step 0 is intact, the run resumes.
    assert bool(hit) == (fails_in == "trainer_state.pt")  # the weights were written before the state failed
    assert _names(run) == ["step_000000"]
    _assert_step0_intact(run)
    # What the issue asks: a clear one-line error (exit 1), not a traceback.
    assert rc == 1, f"{type(rc).__name__}: {rc} escaped `resrl train`"
    line = _one_error_line(err, "resrl train: error: ")
    assert "step_000002" in line and "earlier checkpoints are intact" in line


@pytest.mark.integration
@pytest.mark.parametrize("what", ["rollouts/step_000002.jsonl", "metrics.jsonl"])
def test_run_file_write_failing_midway_is_a_clear_error(tmp_path, capsys, monkeypatch, what):
    """A rollout dump, or a metrics.jsonl line, refused by the kernel midway (RLIMIT_FSIZE): one line, exit 1,
    earlier checkpoints intact, and --resume completes with a clean metrics.jsonl.

    (docs/RELIABILITY.md bug 5: the OSError used to escape `resrl train` as a traceback.)"""
    run = tmp_path / "run"
    if what == "metrics.jsonl":
        real_log = loop.MetricsLog.log

        def log(self, metrics):
            if metrics["step"] != 3:
                return real_log(self, metrics)
            with _file_size_limit((run / "metrics.jsonl").stat().st_size + 40):  # the line is torn after 40 bytes
                return real_log(self, metrics)

        monkeypatch.setattr(loop.MetricsLog, "log", log)
    else:
        real_write = loop.write_rollouts

        def write(path, rows):
            if Path(path).name != "step_000002.jsonl":
                return real_write(path, rows)
            with _file_size_limit(2000):
                return real_write(path, rows)

        monkeypatch.setattr(loop, "write_rollouts", write)
    rc = _train(run, "--steps", "4", "--save-every", "2")
    err = capsys.readouterr().err
    assert _names(run) == ["step_000000", "step_000002"]  # earlier checkpoints intact
    assert not list((run / "rollouts").glob(".tmp*"))
    assert rc == 1, f"{type(rc).__name__}: {rc} escaped `resrl train`"
    line = _one_error_line(err, "resrl train: error: ")
    assert f"{run / what}" in line and "File too large" in line
    monkeypatch.undo()
    assert _train(run, "--steps", "4", "--save-every", "2", "--resume") == 0
    raw = (run / "metrics.jsonl").read_text()
    assert [json.loads(x)["step"] for x in raw.splitlines()] == [1, 2, 3, 4]
    assert sorted(p.name for p in (run / "rollouts").iterdir()) == [f"step_{s:06d}.jsonl" for s in (0, 2, 4)]


# ================================================================================== probe results


@pytest.mark.integration
def test_probe_results_failing_to_write_midway(tmp_path, capsys, monkeypatch):
    """BUG 6 (docs/RELIABILITY.md): `resrl probe` writes its results one after another; when one fails (here the
    interference tables, disk full) the OSError escapes as a traceback, and the output directory mixes the new
    scores/lld/first_order with the previous pass's interference/subspace/diversity and summary.json, which
    load_results reads back without complaint."""
    import pandas as pd

    from resrl_analysis.probes.runner import main as probe_main
    from resrl_analysis.probes.synthetic import write_fake_run
    from resrl_analysis.results import load_results

    run = write_fake_run(tmp_path / "run", steps=(0, 1, 2))
    opts = ["--no-progress", "--samples", "2", "--algorithms", "grpo"]
    assert probe_main([str(run), "--steps", "0,1", *opts]) == 0
    out = run / "probes"
    before = {p.name for p in out.iterdir()}
    real = pd.DataFrame.to_parquet

    def failing(self, path, *a, **kw):
        if "interference" in str(path):
            raise ENOSPC
        return real(self, path, *a, **kw)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", failing)
    try:
        rc = probe_main([str(run), "--steps", "0,2", *opts])
    except Exception as exc:  # noqa: BLE001
        rc = exc
    monkeypatch.setattr(pd.DataFrame, "to_parquet", real)
    assert {p.name for p in out.iterdir()} == before  # no temporary debris left
    summary_steps = [c["step"] for c in json.loads((out / "summary.json").read_text())["checkpoints"]]
    results = load_results(out)
    steps_per_result = {"scores": sorted(set(results["scores"].responses.step.astype(int))),
                        "interference": sorted(set(results["interference"].groups.step.astype(int)))}
    # One pass's results, all of them (old or new), never a mix.
    assert all(s == summary_steps for s in steps_per_result.values()), (summary_steps, steps_per_result)
    assert rc in (1, 2), f"{type(rc).__name__}: {rc} escaped `resrl probe`"
    assert "No space left on device" in _one_error_line(capsys.readouterr().err, "resrl probe: error: ")



# ================================================================================== a full disk, named as such


@contextlib.contextmanager
def _small_filesystem(path: Path, size: str):
    """A real file system of ``size`` (tmpfs) at ``path``: writes past it fail with ENOSPC as on a full disk.
    Needs the right to mount (root in a container); skipped elsewhere."""
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.integration
def test_disk_full_in_a_checkpoint_write_is_named_with_the_space_needed(tmp_path, capsys):
    """Issue 14.4: on a full disk torch.save raised "[enforce fail at inline_container.cc:672] . unexpected pos …"
    (safetensors "… (os error 28)"), and that was the whole message. A real 8 MiB file system: config.yaml and the
    3 MiB step_000000 fit, the 9 MiB step_000002 (weights and AdamW state) does not."""
    with _small_filesystem(tmp_path / "small", "8m") as fs:
        run = fs / "run"
        rc = _train(run, "--steps", "2", "--save-every", "2", "--set", "tensorboard=false")
        line = _one_error_line(capsys.readouterr().err, "resrl train: error: ")
        assert rc == 1, f"{type(rc).__name__}: {rc} escaped `resrl train`"
        assert f"writing checkpoint {run / 'checkpoints' / 'step_000002'} failed: no space left on device" in line
        assert re.search(rf"\(on {re.escape(str(fs))}: at least \d+\.\d MiB needed, [\d.]+ (KiB|B|MiB) free\)", line)
        assert "earlier checkpoints are intact" in line and "unexpected pos" not in line
        assert _names(run) == ["step_000000"]
        _assert_step0_intact(run)
        # With room made, the run resumes from step 0 and completes.
        subprocess.run(["mount", "-o", "remount,size=64m", str(fs)], check=True)
        assert _train(run, "--steps", "2", "--save-every", "2", "--set", "tensorboard=false", "--resume") == 0
        assert _names(run) == ["step_000000", "step_000002"]


@pytest.mark.integration
def test_disk_full_reported_by_torch_as_runtime_error_is_named(tmp_path, capsys, monkeypatch):
    """Without the right to mount: the kernel refuses the write midway (RLIMIT_FSIZE, so torch.save raises its
    RuntimeError "unexpected pos", not an OSError) while the file system reports no free space, as a full disk
    does. The error must name the full disk, the checkpoint and the space needed."""
    real_save = loop.save_checkpoint
    real_usage = shutil.disk_usage

    def full_disk(path):
        return real_usage(path)._replace(free=0)

    def limited(run_dir, step, write_model, state):
        if step < 2:
            return real_save(run_dir, step, write_model, state)
        with _file_size_limit(4_000_000), monkeypatch.context() as mp:
            mp.setattr(shutil, "disk_usage", full_disk)
            return real_save(run_dir, step, write_model, state)

    monkeypatch.setattr(loop, "save_checkpoint", limited)
    run = tmp_path / "run"
    assert _train(run, "--steps", "2", "--save-every", "2") == 1
    line = _one_error_line(capsys.readouterr().err, "resrl train: error: ")
    assert f"writing checkpoint {run / 'checkpoints' / 'step_000002'} failed: no space left on device (on " in line
    assert re.search(r"at least \d+\.\d MiB needed, 0 B free\); earlier checkpoints are intact", line), line
    assert _names(run) == ["step_000000"]


@pytest.mark.integration
@pytest.mark.parametrize("what", ["rollouts/step_000002.jsonl", "metrics.jsonl"])
def test_disk_full_in_a_run_file_write_is_named(tmp_path, capsys, what):
    """A rollout dump or a metrics line on a (real) disk that fills up just before it: one line naming the file,
    the full disk and the space needed; exit 1."""
    with _small_filesystem(tmp_path / "small", "32m") as fs:
        run = fs / "run"
        ballast = fs / "ballast"
        real = loop.write_rollouts if what.startswith("rollouts") else loop.MetricsLog.log

        def fill_then(*args):  # the disk fills up just before this write
            rows_or_metrics = args[-1]
            step = rows_or_metrics["step"] if isinstance(rows_or_metrics, dict) else Path(args[0]).stem
            # (metrics: the first line, as a later one may fit in the slack of the file's last page)
            if step in (1, "step_000002"):
                with open(ballast, "wb", buffering=0) as f, contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * 4096)
            return real(*args)

        with pytest.MonkeyPatch.context() as mp:
            if what.startswith("rollouts"):
                mp.setattr(loop, "write_rollouts", fill_then)
            else:
                mp.setattr(loop.MetricsLog, "log", fill_then)
            rc = _train(run, "--steps", "4", "--save-every", "2", "--set", "tensorboard=false")
        assert rc == 1, f"{type(rc).__name__}: {rc} escaped `resrl train`"
        line = _one_error_line(capsys.readouterr().err, "resrl train: error: ")
        assert f"writing {run / what} failed: no space left on device (on {fs}: at least " in line, line
        assert "needed" in line and "earlier checkpoints are intact" in line


@pytest.mark.unit
def test_write_failure_reason_names_only_a_full_disk(tmp_path, monkeypatch):
    from trainer.metrics_log import write_failure_reason

    efbig = OSError(errno.EFBIG, "File too large")
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4263360 vs 4263248")
    assert write_failure_reason(efbig, tmp_path / "x") == "File too large"  # plenty of space: its own message
    assert write_failure_reason(torch_error, tmp_path / "x").startswith("[enforce fail at")
    # ENOSPC while the disk has ample space (a quota; space freed since): the system's words, no contradicting numbers
    assert write_failure_reason(ENOSPC, tmp_path / "no" / "such" / "dir") == "No space left on device"
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=512 * 1024))
    assert write_failure_reason(torch_error, tmp_path / "x", needed=5 * 2**20).endswith(
        "at least 5.0 MiB needed, 512.0 KiB free)")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=2 * 2**20))
    assert write_failure_reason(torch_error, tmp_path / "x").startswith("[enforce")  # 2 MiB free, nothing needed
    assert write_failure_reason(torch_error, tmp_path / "x", needed=3 * 2**20).startswith("no space left")
    assert write_failure_reason(ENOSPC, tmp_path / "x", needed=3 * 2**20).startswith("no space left on device (on ")
