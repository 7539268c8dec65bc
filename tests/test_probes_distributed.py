"""``resrl probe`` on two CPU processes (torchrun, gloo): the files equal a one-process run's, with the model
replicated or sharded with FSDP2; raw verl FSDP shards probe as the merged model; a rank that raises or dies leaves
the output directory as it was.

Tolerance: with replicas the tables are bit-identical to one process's (every group is forwarded and probed alone,
by the same code, and the rows are put back in the probe set's group order). Sharded, everything computed from a
group's forward is bit-identical too (FSDP2 gathers the exact weights); only the whole-model gradients, reduced
across the ranks in another order, differ by float round-off: the cosines (interference ``full_update_cosine``,
``full_head_cosine``) by at most 1e-6, and first_order's real whole-model step ``actual_full`` (a difference of two
float32 sums of log π over a response) by at most 2e-5.

Marked ``multiprocess`` but not skipped on CPU: it runs in the normal suite wherever gloo is available.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from probe_runner import register_fault_probe

from resrl_analysis.checkpoints import load_checkpoint
from resrl_analysis.probes.config import add_probe_arguments, config_from_args
from resrl_analysis.probes.registry import unregister_probe
from resrl_analysis.probes.runner import PROBES, launch_torchrun, main
from resrl_analysis.probes.synthetic import write_fake_run
from resrl_analysis.results import load_results

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"),
]

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tests" / "probe_runner.py"
#: Columns of the whole-model gradients and their tolerance under sharding (the module docstring says why).
SHARDED_TOLERANCE = {("interference", "full_update_cosine"): 1e-6, ("interference", "full_head_cosine"): 1e-6,
                     ("first_order", "actual_full"): 2e-5}
COMMON = ["--no-progress", "--quiet", "--threads", "1", "--probes", ",".join(PROBES)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    # 5 groups: rank 0 probes 3, rank 1 two (and, sharded, runs one dummy forward); the last two are not mixed.
    return write_fake_run(tmp_path_factory.mktemp("dist") / "run", steps=(0, 1), n_groups=5, group_size=4,
                          debris=False)


@pytest.fixture(scope="module")
def one(run) -> Path:
    """The one-process pass every multi-process one is compared with."""
    out = run.parent / "one"
    assert main([str(run), "--out", str(out), *COMMON]) == 0
    return out


def assert_same_results(a_dir: Path, b_dir: Path, tolerance: dict | None = None, apart: frozenset = frozenset()
                        ) -> None:
    """Every table of every result equal (floats bit for bit, NaN where NaN) but the columns in ``tolerance``
    (``(result, column) -> max |difference|``) and the results in ``apart`` (checked by the caller), and the same
    skipped lists."""
    a, b = load_results(a_dir), load_results(b_dir)
    assert sorted(a) == sorted(b) == sorted(["scores", "lld", "first_order", "interference", "subspace", "diversity",
                                             "entropy_dynamics", "flips", "fidelity"])
    tolerance = tolerance or {}
    checked = 0
    for name in a:
        if name in apart:
            continue
        assert a[name].skipped == b[name].skipped, name
        for table, da in a[name].frames().items():
            db = b[name].frames()[table]
            assert list(da.columns) == list(db.columns) and len(da) == len(db), (name, table)
            for c in da.columns:
                x, y = da[c].to_numpy(), db[c].to_numpy()
                tol = tolerance.get((name, c))
                if tol is not None:
                    finite = np.isfinite(x.astype(float))
                    assert (finite == np.isfinite(y.astype(float))).all() and finite.any(), (name, c)
                    assert np.abs(x[finite] - y[finite]).max() <= tol, (name, c, np.abs(x[finite] - y[finite]).max())
                    checked += 1
                elif da[c].dtype.kind == "f":
                    assert np.array_equal(x, y, equal_nan=True), (name, table, c)
                else:
                    assert da[c].equals(db[c]), (name, table, c)
    assert checked == len(tolerance)


def test_two_processes_write_the_files_of_one(run, one, tmp_path):
    """``resrl probe --nproc 2`` (the launcher, through the CLI): bit-identical tables for every probe."""
    out = tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "trainer", "probe", str(run), "--out", str(out), "--nproc", "2",
                        *COMMON], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "OMP_NUM_THREADS" not in r.stderr, r.stderr[-2000:]  # torchrun's noise gone
    assert_same_results(one, out)
    summary = (out / "summary.json").read_text()
    assert '"ranks": 2' in summary and '"parallel": "replica"' in summary


def test_sharded_model_equals_the_replica(run, one, tmp_path):
    """torchrun with ``--parallel shard``: FSDP2 across the two ranks; the whole-model cosine and the real whole-model
    steps (collective jobs) equal the one-process computation within float round-off, the rest bit for bit."""
    out = tmp_path / "shard"
    r = torchrun("-m", "resrl_analysis.probes.runner", str(run), "--out", str(out), "--parallel", "shard", *COMMON)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_same_results(one, out, SHARDED_TOLERANCE, apart=frozenset({"entropy_dynamics"}))
    # entropy_dynamics on a sharded model: the head-only step as one process computes it, no whole-model step.
    e1, e2 = load_results(one)["entropy_dynamics"], load_results(out)["entropy_dynamics"]
    assert "sharded" in e2.meta["full_step_not_run"] and e2.groups.actual_full.isna().all()
    assert e1.groups.actual_full.notna().any()
    cols = [c for c in e1.groups.columns if not c.startswith("actual_full")]
    pd.testing.assert_frame_equal(e1.groups[cols], e2.groups[cols], check_exact=True)
    fo = load_results(out)["first_order"].predictions
    assert fo.actual_full.notna().sum() > 0 and fo.actual_full.abs().max() > 1e-3  # real steps were taken


def test_raw_verl_shards_probe_as_the_merged_model(run, tmp_path):
    """verl's layout (global_step_N/actor/model_world_size_2_rank_R.pt + a config-only huggingface/), written by our
    FSDP2 under torchrun: discovered as a verl run, read weights-only, equal weights, equal probe results."""
    verl = tmp_path / "verl"
    pairs = []
    for step in (0, 1):
        pairs += [str(run / "checkpoints" / f"step_{step:06d}"), str(verl / f"global_step_{step}" / "actor")]
    r = torchrun(str(RUNNER), "verl-shards", *pairs)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    hf = verl / "global_step_1" / "actor" / "huggingface"
    assert not any(hf.glob("*.safetensors")) and (verl / "global_step_1" / "actor" / "fsdp_config.json").is_file()
    merged = load_checkpoint(run / "checkpoints" / "step_000001", tokenizer=False).model.state_dict()
    raw = load_checkpoint(hf, tokenizer=False).model.state_dict()
    assert sorted(raw) == sorted(merged) and all(torch.equal(raw[k], merged[k]) for k in merged)

    dump = str(run / "rollouts" / "step_000000.jsonl")
    ckpts = [str(run / "checkpoints" / f"step_{s:06d}") for s in (0, 1)]
    assert main([*ckpts, "--probe-set", dump, "--out", str(tmp_path / "merged"), *COMMON]) == 0
    assert main([str(verl), "--probe-set", dump, "--out", str(tmp_path / "raw"), *COMMON]) == 0
    assert_same_results(tmp_path / "merged", tmp_path / "raw")


@pytest.fixture()
def fault_probe():
    register_fault_probe()
    yield
    unregister_probe("fault")


@pytest.mark.parametrize("fault", ["raise", "kill"])
def test_a_failing_rank_stops_every_rank_and_writes_nothing(run, one, tmp_path, fault_probe, fault, capfd):
    """Rank 1 raises (or is killed) in its first group batch: every rank ends, one line names rank 1 and the cause,
    the exit status is non-zero, and the output directory (holding an earlier pass) is exactly as it was."""
    out = tmp_path / "out"
    assert main([str(run), "--out", str(out), "--probes", "entropy", "--no-progress", "--quiet"]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    args = add_probe_arguments(argparse.ArgumentParser()).parse_args(
        [str(run), "--out", str(out), "--nproc", "2", "--probes", "fault,entropy", "--fault", fault,
         "--no-progress", "--quiet", "--threads", "1"])
    capfd.readouterr()
    code = launch_torchrun(config_from_args(args), entry=[str(RUNNER), "probe"])
    err = capfd.readouterr().err
    assert code == 1
    ours = [ln for ln in err.splitlines() if ln.startswith("resrl probe: error: rank 1 of 2")]
    cause = "RuntimeError: injected fault" if fault == "raise" else "killed by SIGKILL"
    assert len(ours) == 1 and cause in ours[0], err[-3000:]
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]
    after = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    after.pop(Path(".lock"), None)  # the lock file of the killed writer (its lock died with it)
    assert after == before
    assert not [p for p in out.iterdir() if p.name.startswith((".staging", ".tmp", ".old"))]
