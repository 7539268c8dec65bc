"""`resrl demo` end to end in a subprocess, shortened (the full demo is the README's main job): two algorithms,
two seeds, a few steps; the summary's structure, and its sentences recomputed from its own numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from resrl_analysis.stats import describe_difference, welch_difference
from trainer.demo import _NAMES, HEADLINE_METRICS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_demo_shortened_writes_runs_figures_and_a_summary_with_intervals(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "demo", "--out", str(out), "--steps", "2", "--save-every", "1",
         "--algorithms", "nsr,resrl", "--seeds", "0,1", "--jobs", "2", "--samples", "4",
         "--figures-dir", str(tmp_path / "figs")],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[demo" in proc.stdout and "| metric |" in proc.stdout
    for algo in ("nsr", "resrl"):
        for seed in (0, 1):
            run = out / "runs" / f"{algo}-s{seed}"
            assert (run / "checkpoints" / "step_000002" / "model.safetensors").is_file()
            probes = json.loads((run / "probes" / "summary.json").read_text())
            assert probes["probe_set"]["source"].endswith("prompts/heldout.jsonl")
            assert probes["diversity_steps"] == [0, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert sorted((r["algorithm"], r["seed"]) for r in summary["runs"]) == [
        ("nsr", 0), ("nsr", 1), ("resrl", 0), ("resrl", 1)]
    assert summary["settings"]["seeds"] == [0, 1] and summary["settings"]["pass_k"] == 4
    for algo in ("nsr", "resrl"):
        per = summary["algorithms"][algo]
        for key in ("lld/batch_delta_mean", "heldout_delta_end", "pass@1_end", "pass@n_end"):
            d = per[key]
            assert set(d) >= {"mean", "lo", "hi", "seeds"} and len(d["seeds"]) == 2
            assert d["mean"] == pytest.approx(sum(d["seeds"]) / 2)
            runs = sorted((r for r in summary["runs"] if r["algorithm"] == algo), key=lambda r: r["seed"])
            assert d["seeds"] == [r[key] for r in runs]
            if d["lo"] is not None:
                assert d["lo"] <= d["mean"] <= d["hi"]
    comps = summary["comparisons"]
    assert comps and {(c["a"], c["b"]) for c in comps} == {("resrl", "nsr")}
    md = (out / "summary.md").read_text()
    for c in comps:  # each sentence follows from the per-seed numbers, recomputed here
        iv = welch_difference(summary["algorithms"]["resrl"][c["metric"]]["seeds"],
                              summary["algorithms"]["nsr"][c["metric"]]["seeds"])
        assert c["excludes_zero"] == iv.excludes_zero and c["diff"] == pytest.approx(iv.mean)
        want = describe_difference(f"{_NAMES['resrl']} − {_NAMES['nsr']} {HEADLINE_METRICS[c['metric']]}", iv,
                                   names=("ResRL", "NSR"))
        assert c["sentence"] == want
        assert want.replace("pass@n", "pass@4") in md
    assert (out / "figures" / "training_dynamics.png").is_file()
    page = (out / "view.html").read_text(encoding="utf-8")  # the seed-0 runs side by side, nothing else
    blob = json.loads(page.split('id="resrl-view-data">', 1)[1].split("</script>", 1)[0])
    assert [(r["name"], Path(r["path"]).name) for r in blob["runs"]] == [("NSR seed 0", "nsr-s0"),
                                                                           ("ResRL seed 0", "resrl-s0")]
    assert {s["key"] for s in blob["steps"]} >= {"rollouts:0", "probe:0", "probe:2"}
    assert (tmp_path / "figs" / "training_dynamics.png").is_file()
    assert "| in-batch LLD fraction (live, mean over steps) |" in md


def test_demo_rejects_unknown_algorithm(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "demo", "--out", str(tmp_path / "d"),
                           "--algorithms", "grpo,ppo"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "ppo" in proc.stderr
    assert not (tmp_path / "d").exists()


def _children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(d.name))
    return out


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_text(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_killing_the_demo_stops_its_workers(tmp_path, sig):
    """Ending the dispatcher of `resrl demo --jobs 2` (SIGTERM: its handler; SIGKILL: the workers' parent-death
    signal) ends the two runs it was training: nothing trains on into the output directory."""
    import signal
    import time

    out = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.cli", "demo", "--out", str(out), "--steps", "500", "--save-every", "100",
         "--algorithms", "nsr,resrl", "--seeds", "0", "--jobs", "2", "--samples", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        workers: list[int] = []
        while time.monotonic() < deadline and proc.poll() is None:  # both workers are training
            workers = [c for c in _children(proc.pid) if "spawn_main" in _cmdline(c)]  # not the resource tracker
            if len(workers) == 2 and all((out / "runs" / r / "checkpoints").is_dir() for r in ("nsr-s0", "resrl-s0")):
                break
            time.sleep(0.5)
        assert proc.poll() is None and len(workers) == 2, "the demo did not start two training workers"
        proc.send_signal(getattr(signal, sig))
        text, _ = proc.communicate(timeout=60)
        deadline = time.monotonic() + 30
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [w for w in workers if _alive(w)], f"workers still running after {sig} to the demo"
        if sig == "SIGTERM":
            assert proc.returncode == 143, text[-2000:]
            assert "stopped (SIGTERM): 0 of 2 runs had finished" in text
        else:
            assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
