"""Recovery from a run that blew up: ``--resume-from STEP``, the blow-up watch, and the divergence message.

- ``lr=1e30`` (the real CLI, the tiny preset): step 1 is finite and throws the weights to ~1e30, the next steps
  are non-finite; the run must stop naming step 0 (the only checkpoint with sane weights) and print a command
  that, run exactly as printed, resumes from it and trains to the end with finite numbers.
- ``--resume-from`` moves later checkpoints, rollout dumps and metrics lines aside (never deletes them), and
  the resumed run equals the original one bit for bit.
- The run of non-finite steps starts again at 0 on resume.
- ``lr=10`` collapses the policy (entropy and grad norm 0): reported, counted, and stops the run.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from trainer_runner import FAST, train_easy

import trainer.loop as loop
from resrl_analysis.rundir import SUPERSEDED, list_checkpoints, read_jsonl
from trainer.config import TrainConfig
from trainer.loop import SetupError, TrainingDiverged
from trainer.metrics_log import read_metrics
from trainer.setup import last_sane_checkpoint, suggest_lr

TIMEOUT = 300


def _resrl() -> list[str]:
    return [sys.executable, "-m", "trainer.cli"]  # the `resrl` console script, of this checkout


def _cfg(out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**FAST, "output_dir": str(out), **kw})


def _params(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


# ================================================================================== units


@pytest.mark.integration
def test_suggest_lr_scales_with_the_worst_jump():
    assert suggest_lr(3e-4, None, 1.5) == 3e-5
    assert suggest_lr(10.0, 101.0, 1.5) == 0.005  # 10 * 0.1 * 0.5 / 100
    assert suggest_lr(10.0, 1.2, 1.5) == 1.0  # below the bound: just ten times lower


@pytest.mark.integration
def test_last_sane_checkpoint_skips_non_finite_and_huge_weights(tmp_path):
    for step, w in ((0, 1.0), (2, 5e4), (4, float("nan")), (6, 2.0)):
        d = tmp_path / "checkpoints" / f"step_{step:06d}"
        d.mkdir(parents=True)
        save_file({"w": torch.full((3,), w), "ids": torch.arange(3)}, str(d / "model.safetensors"))
        torch.save({"step": step}, d / "trainer_state.pt")
    assert last_sane_checkpoint(tmp_path, before=None, max_abs=1e4) == 6
    assert last_sane_checkpoint(tmp_path, before=6, max_abs=1e4) == 0  # 4 NaN, 2 too large
    assert last_sane_checkpoint(tmp_path, before=6, max_abs=1e5) == 2
    assert last_sane_checkpoint(tmp_path, before=0, max_abs=1e4) is None


# ================================================================================== lr=1e30, end to end


@pytest.mark.e2e
@pytest.mark.slow
def test_blown_up_run_names_step_0_and_its_printed_command_recovers(tmp_path):
    run = tmp_path / "run"
    args = ["--preset", "tiny", "--algorithm", "resrl", "--steps", "8", "--save-every", "2", "--seed", "5",
            "--output-dir", str(run)]
    for kv in ("prompts_per_step=4", "mini_batch_size=4", "n=4", "max_response_length=5", "lr=1e30",
               "progress_bar=off", "log_every=1", "cpu_threads=1"):
        args += ["--set", kv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([*_resrl(), "train", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=TIMEOUT)
    assert first.returncode == 1, first.stderr[-3000:]
    assert "step 1: warning: blow-up" in first.stdout  # the finite step that threw the weights out
    err = first.stderr.strip().splitlines()[-1]
    assert err.startswith("resrl train: error: ") and "non-finite steps in a row" in err, err
    assert "the last one with sane weights (finite, max |w| < 10000) is step 0" in err, err
    saved_before = [s for s, _ in list_checkpoints(run)]
    assert saved_before[0] == 0 and len(saved_before) > 1  # blown-up checkpoints were written after step 0
    command = re.search(r"resume from it: (resrl train .*)$", err).group(1)
    argv = shlex.split(command)
    assert argv[:4] == ["resrl", "train", "--resume-from", "0"] and "--output-dir" in argv
    lr = float(argv[argv.index("--set") + 1].removeprefix("lr="))
    assert 0 < lr < 1  # scaled by the size of the blow-up, not just 1e30 / 10
    # Run it exactly as printed (only "resrl" resolved to this environment's script).
    second = subprocess.run([*_resrl(), *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming" in second.stdout and "from checkpoint step 0 (target 8 steps)" in second.stdout
    assert "blow-up" not in second.stdout and "non-finite" not in second.stdout
    lines = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in lines] == list(range(1, 9))
    assert all(r["train/skipped_steps"] == 0 and r["train/blowup_steps"] == 0 for r in lines)
    assert all(math.isfinite(r["actor/grad_norm"]) and math.isfinite(r["actor/pg_loss"]) for r in lines)
    assert last_sane_checkpoint(run, before=None, max_abs=1e4) == 8  # every checkpoint now sane
    # The blown-up checkpoints were moved aside, not deleted.
    (aside,) = (run / SUPERSEDED).iterdir()
    assert [s for s, _ in list_checkpoints(aside)] == saved_before[1:]


# ================================================================================== --resume-from


@pytest.mark.integration
def test_resume_refuses_a_target_below_the_last_step_and_a_directory_without_a_run(tmp_path):
    """Issue 23: a run directory never lies. `--resume --steps 2` on a 4-step run trained nothing and rewrote `steps: 2`
    into config.yaml; `--resume` on a mistyped directory trained a fresh run there. Both are refused in one line."""
    run = tmp_path / "run"
    train_easy(_cfg(run, steps=4, save_every=2))
    before = {f: (run / f).read_bytes() for f in ("config.yaml", "metrics.jsonl")}
    with pytest.raises(SetupError, match=r"^--resume: steps 2 is below the run's checkpoint step 4 in .*run; "):
        train_easy(_cfg(run, steps=2, save_every=2, resume=True))
    assert {f: (run / f).read_bytes() for f in before} == before  # config.yaml still says steps: 4
    with pytest.raises(SetupError, match=r"--resume: steps 1 is below the run.s checkpoint step 2 "):
        train_easy(_cfg(run, steps=1, save_every=2, resume=True, resume_from=2))
    assert not (run / SUPERSEDED).exists()
    nope = tmp_path / "nope"
    with pytest.raises(SetupError, match=r"^--resume: .*nope does not exist; check --output-dir"):
        train_easy(_cfg(nope, steps=2, resume=True))
    assert not nope.exists()  # nothing created there, not even a lock file
    (tmp_path / "empty").mkdir()
    with pytest.raises(SetupError, match=r"empty holds no run \(no config.yaml, checkpoint or metrics\)"):
        train_easy(_cfg(tmp_path / "empty", steps=2, resume=True))
    assert not any((tmp_path / "empty").iterdir())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # ours
    proc = subprocess.run([*_resrl(), "train", "--preset", "tiny", "--resume", "--output-dir", str(nope)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr, proc.stderr
    assert not nope.exists()


@pytest.mark.integration
def test_resume_from_moves_later_files_aside_and_equals_the_original(tmp_path):
    run = tmp_path / "run"
    train_easy(_cfg(run, algorithm="resrl", steps=6, save_every=2))
    original = [(r["step"], r["actor/pg_loss"]) for r in read_metrics(run / "metrics.jsonl")]
    refused = r"--resume-from 3: .* no complete checkpoint step_000003 \(have \[0, 2, 4, 6\]\)"
    with pytest.raises(SetupError, match=refused):
        train_easy(_cfg(run, algorithm="resrl", steps=6, save_every=2, resume_from=3))
    assert not (run / SUPERSEDED).exists()  # a refused resume moves nothing
    train_easy(_cfg(run, algorithm="resrl", steps=6, save_every=2, resume_from=2))
    (aside,) = (run / SUPERSEDED).iterdir()
    assert re.fullmatch(r"\d{8}T\d{6}Z", aside.name)
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step_000004", "step_000006"]
    assert sorted(p.name for p in (aside / "rollouts").iterdir()) == ["step_000004.jsonl", "step_000006.jsonl"]
    assert [o["step"] for _, o in read_jsonl(aside / "metrics.jsonl")] == [3, 4, 5, 6]
    # The run re-made them, each step once, and bit for bit as before.
    assert [s for s, _ in list_checkpoints(run)] == [0, 2, 4, 6]
    assert [(r["step"], r["actor/pg_loss"]) for r in read_metrics(run / "metrics.jsonl")] == original
    for step in (4, 6):
        name = f"step_{step:06d}"
        old, new = _params(aside / "checkpoints" / name), _params(run / "checkpoints" / name)
        assert all(torch.equal(old[k], new[k]) for k in old)
    dump = "rollouts/step_000004.jsonl"
    assert (run / dump).read_bytes() == (aside / dump).read_bytes()
    # config.yaml does not remember the roll-back (a later plain --resume must not roll back again).
    assert "resume_from: -1" in (run / "config.yaml").read_text()


@pytest.mark.integration
def test_non_finite_streak_starts_again_on_resume(tmp_path, monkeypatch):
    real = loop.policy_loss
    bad = {"steps": set(range(1, 100)), "n": 0}

    def poisoned(*a, **kw):
        bad["n"] += 1  # one micro-batch per step
        out = real(*a, **kw)
        if bad["n"] in bad["steps"]:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(loop, "policy_loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"5 non-finite steps in a row \(steps 1-5\)"):
        train_easy(_cfg(run, algorithm="grpo", steps=8, save_every=2))
    assert [s for s, _ in list_checkpoints(run)] == [0, 2, 4]  # step 4 saved with 4 non-finite steps in a row
    # Resumed from step 4 with two more non-finite steps: the streak restarts, so the run goes on to the end
    # (it used to stop after 1 step, counting 4 + 1).
    bad.update(n=0, steps={1, 2})
    train_easy(_cfg(run, algorithm="grpo", steps=8, save_every=2, resume=True))
    lines = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in lines] == list(range(1, 9))
    assert [r["train/skipped_steps"] for r in lines] == [1, 2, 3, 4, 5, 6, 6, 6]  # the run's total carries over


# ================================================================================== collapse (lr=10)


@pytest.mark.integration
def test_collapse_is_reported_counted_and_stops_the_run(tmp_path, capsys):
    run = tmp_path / "report"
    train_easy(_cfg(run, algorithm="grpo", lr=10.0, steps=6, save_every=2, max_blowup_steps=0))  # report only
    out = capsys.readouterr().out
    assert "warning: blow-up" in out and "the policy has collapsed" in out
    lines = read_metrics(run / "metrics.jsonl")
    assert lines[-1]["actor/entropy"] < 1e-4 and lines[-1]["actor/grad_norm"] < 1e-8
    counts = [r["train/blowup_steps"] for r in lines]
    assert counts == sorted(counts) and counts[-1] >= 3
    assert lines[0]["actor/param_norm_ratio"] > 1.5  # the first step's jump is what started it
    run = tmp_path / "stop"
    with pytest.raises(TrainingDiverged, match=r"3 blow-up steps .* is step 0: .* resrl train --resume-from 0 "):
        train_easy(_cfg(run, algorithm="grpo", lr=10.0, steps=6, save_every=2))
    assert [r["train/blowup_steps"] for r in read_metrics(run / "metrics.jsonl")][-1] == 3


@pytest.mark.integration
def test_update_norm_bound(tmp_path, capsys):
    run = tmp_path / "run"
    train_easy(_cfg(run, algorithm="grpo", steps=2, save_every=2, blowup_update_norm=1e-12, max_blowup_steps=0))
    lines = read_metrics(run / "metrics.jsonl")
    assert all(r["actor/update_norm"] > 1e-12 for r in lines if r["actor/grad_norm"] > 0)
    assert "update norm" in capsys.readouterr().out
    json.dumps(lines)  # strict JSON
