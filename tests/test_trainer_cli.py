"""End to end: ``resrl train`` in a subprocess (the CLI of DESIGN §4), bad input, and a SIGKILL + resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from trainer_runner import FAST, EasyTask, fast_args

import trainer.loop as loop
from trainer.checkpointing import list_checkpoints
from trainer.config import TrainConfig
from trainer.metrics_log import read_metrics

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]


def resrl(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "trainer.cli", "train", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_trains_two_steps(tmp_path):
    out = tmp_path / "run"
    proc = resrl("--preset", "tiny", "--algorithm", "grpo", "--steps", "2", "--save-every", "2",
                 "--micro-batch-size", "8", "--seed", "3", "--output-dir", str(out), *fast_args())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run directory: {out}" in proc.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000000", "step_000002"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    cfg = (out / "config.yaml").read_text()
    assert "algorithm: grpo" in cfg and "seed: 3" in cfg and "micro_batch_size: 8" in cfg


def test_cli_bad_data_fails_with_one_line(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"prompt": "1+1", "reward_model": {"ground_truth": "2"}}\n{"prompt": "2+2", oops}\n')
    out = tmp_path / "run"
    proc = resrl("--output-dir", str(out), "--set", "task=math", "--set", f"train_files=[{bad}]", *fast_args())
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("resrl train: error: ") and f"{bad}:2: invalid JSON" in err[0]
    assert not out.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "resrl_q_low=0.9", "--set", "resrl_q_high=0.5"], "resrl_q_low=0.9 must be below resrl_q_high=0.5"),
    (["--set", "learning_rate=1"], "unknown key 'learning_rate'"),
    (["--steps", "0"], "steps=0 must be >= 1"),
    (["--model", "/no/such/model"], "model=/no/such/model: not a Hugging Face model directory"),
])
def test_cli_bad_settings_fail_with_one_line(tmp_path, capsys, args, message):
    from trainer.cli import main

    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    settings = dict(FAST, algorithm="resrl", steps=16, save_every=2)
    killed = tmp_path / "killed"
    args = ["--output-dir", str(killed), *fast_args(), "--set", "algorithm=resrl", "--steps", "16",
            "--save-every", "2"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "trainer_runner.py"), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step_000002").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(0).uniform(0.0, 0.5))  # some steps later, possibly inside a checkpoint write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list_checkpoints(killed)[-1][0] < 16, "the run finished before it could be killed"

    monkeypatch.setattr(loop, "_build_task", lambda cfg, tok: EasyTask())
    loop.train(TrainConfig(**settings, output_dir=str(killed), resume=True))
    reference = loop.train(TrainConfig(**settings, output_dir=str(tmp_path / "reference")))

    assert not [p for p in (killed / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 17))  # no torn or duplicated line
    a = load_file(str(reference / "checkpoints" / "step_000016" / "model.safetensors"))
    b = load_file(str(killed / "checkpoints" / "step_000016" / "model.safetensors"))
    for k in a:
        assert float((a[k] - b[k]).abs().max()) <= 1e-6 * max(float(a[k].abs().max()), 1e-3) + 1e-7, k
