"""Two CPU processes over gloo (torchrun): the FSDP2 code path of multi-GPU runs, resume included.

Marked ``multiprocess`` but not skipped on CPU: it runs in the normal suite wherever gloo is available.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from safetensors.torch import load_file
from trainer_runner import fast_args

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"),
]

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tests" / "trainer_runner.py"


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(RUNNER),
           *fast_args(), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_process_run_resume_and_run_directory(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    # Validation on 1 prompt (rank 1 has none, yet takes part in the collectives) and a KL reference model.
    common = ["--algorithm", "resrl", "--save-every", "2", "--set", "val_every=2", "--set", "val_prompts=1",
              "--set", "val_n=2", "--set", "kl_coef=0.01"]
    torchrun(*common, "--steps", "4", "--output-dir", str(full))
    torchrun(*common, "--steps", "2", "--output-dir", str(part))
    torchrun(*common, "--steps", "4", "--output-dir", str(part), "--resume")

    for run in (full, part):
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000000", "step_000002",
                                                                          "step_000004"]
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines] == [1, 2, 3, 4]  # written once, by rank 0 only
        assert "val/pass@2" in lines[1] and lines[1]["actor/kl"] >= 0
        rows = [json.loads(x) for x in (run / "rollouts" / "step_000002.jsonl").read_text().splitlines()]
        # both ranks' rows, whole groups, group ids unique across ranks
        assert len(rows) == 16 and [r["group_id"] for r in rows] == [g for g in range(4) for _ in range(4)]
    a = load_file(str(full / "checkpoints" / "step_000004" / "model.safetensors"))
    b = load_file(str(part / "checkpoints" / "step_000004" / "model.safetensors"))
    for k in a:
        assert float((a[k] - b[k]).abs().max()) <= 1e-6 * max(float(a[k].abs().max()), 1e-3) + 1e-7, k
    start = load_file(str(full / "checkpoints" / "step_000000" / "model.safetensors"))
    assert any(float((a[k] - start[k]).abs().max()) > 1e-4 for k in a)  # it trained
