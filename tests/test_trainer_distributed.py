"""Two CPU processes over gloo (torchrun): the FSDP2 code path of multi-GPU runs, resume included.

Marked ``multiprocess`` but not skipped on CPU: it runs in the normal suite wherever gloo is available.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from safetensors.torch import load_file
from trainer_runner import fast_args

from resrl_analysis.distributed import GLOO_SERIAL, setup_distributed, teardown_distributed

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


@pytest.mark.e2e
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


def _gloo_worker_threads() -> int:
    """Threads of this process that are gloo worker loops (torch names them ``pt_gloo_runloop``)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
    return names.count("pt_gloo_runloop")


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc (Linux)")
def test_cpu_group_has_one_worker_thread_and_teardown_drains_it(monkeypatch):
    """The SIGABRT at exit (docs/RELIABILITY.md): a gloo worker thread releasing a finished collective's tensors
    while the interpreter finalized. The group must run its collectives on one worker thread, and a normal
    teardown must end with a barrier (which that thread runs after releasing everything before it); a teardown
    during an exception must not (the other ranks may never reach it)."""
    import torch

    barriers = []
    real_barrier = dist.barrier
    monkeypatch.setattr(dist, "barrier", lambda *a, **kw: (barriers.append(1), real_barrier(*a, **kw))[1])
    for failing in (False, True):
        before = _gloo_worker_threads()  # groups other tests leaked stay alive (their mesh holds them)
        ctx = setup_distributed("cpu", "on")  # one process: a one-rank group on an in-memory store
        with contextlib.suppress(RuntimeError):
            try:  # as in train(): teardown in `finally`
                assert ctx.owns_group and dist.get_backend() == GLOO_SERIAL
                dist.broadcast(torch.ones(3), src=0)  # gloo starts its threads with the first collective
                assert _gloo_worker_threads() - before == 1
                if failing:
                    raise RuntimeError("a failing rank")
            finally:
                teardown_distributed(ctx)
        assert not dist.is_initialized() and not ctx.owns_group
        assert len(barriers) == 1  # the normal teardown drained; the one during the exception did not
