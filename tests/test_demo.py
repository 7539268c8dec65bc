"""`resrl demo` end to end in a subprocess, shortened (the full demo is the README's main job)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_demo_shortened_writes_runs_figures_and_summary(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "demo", "--out", str(out), "--steps", "2", "--save-every", "1",
         "--algorithms", "grpo,resrl", "--figures-dir", str(tmp_path / "figs")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[demo" in proc.stdout and "| algorithm |" in proc.stdout
    for algo in ("grpo", "resrl"):
        run = out / "runs" / algo
        assert (run / "checkpoints" / "step_000002" / "model.safetensors").is_file()
        assert (run / "probes" / "summary.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert [r["algorithm"] for r in summary["runs"]] == ["grpo", "resrl"]
    assert all(r["tight_violations"] == 0 for r in summary["runs"])
    assert (out / "figures" / "training_dynamics.png").is_file()
    assert (tmp_path / "figs" / "training_dynamics.png").is_file()
    assert "| grpo |" in (out / "summary.md").read_text()


def test_demo_rejects_unknown_algorithm(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "demo", "--out", str(tmp_path / "d"),
                           "--algorithms", "grpo,ppo"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "ppo" in proc.stderr
    assert not (tmp_path / "d").exists()
