"""The demo summary's generated verdicts: from the comparisons' numbers, never written in advance."""

from __future__ import annotations

import pytest

from resrl_analysis.stats import welch_difference
from trainer.demo import _ceiling_notes, _headline, aggregate, summary_markdown


def _rows(values: dict[str, list[float]], key: str = "lld/batch_frac") -> list[dict]:
    return [{"algorithm": a, "seed": s, key: v} for a, vs in values.items() for s, v in enumerate(vs)]


@pytest.mark.unit
def test_verdicts_follow_the_intervals():
    rows = _rows({"psr": [0.20, 0.21, 0.22], "nsr": [0.30, 0.31, 0.32], "resrl": [0.36, 0.37, 0.35],
                  "grpo": [0.30, 0.40, 0.20]})
    agg = aggregate(rows, ("grpo", "psr", "nsr", "resrl"))
    lines = {line.split(",")[0]: line for line in _headline(agg, 3) if line.startswith("- ")}
    nsr_psr = lines["- The negative gradient displaces positives (NSR above the control PSR)"]
    assert ": shown, NSR − PSR = 0.100" in nsr_psr
    assert "the opposite is shown" in lines["- ResRL displaces positives less than NSR"]
    iv = welch_difference([0.36, 0.37, 0.35], [0.30, 0.40, 0.20])
    assert not iv.excludes_zero and "not shown" in lines["- ResRL displaces positives less than GRPO"]


@pytest.mark.unit
def test_one_seed_cannot_be_judged_and_the_summary_says_so():
    agg = aggregate(_rows({"psr": [0.2], "nsr": [0.3]}), ("psr", "nsr"))
    assert "cannot be judged (no interval)" in _headline(agg, 1)[3]
    md = summary_markdown(agg, seconds=60.0, settings={"preset": "p", "task": "t", "steps": 1, "save_every": 1,
                                                         "seeds": [0], "jobs": 1, "samples": 4})
    assert "## What the numbers show" in md and "one seed: no interval" in md


@pytest.mark.unit
def test_ceiling_note_only_when_every_algorithm_is_at_the_ceiling():
    full = {"a": {"pass@n_end": {"mean": 1.0}}, "b": {"pass@n_end": {"mean": 0.999}}}
    assert "pass@16 (last) is at least 0.99" in _ceiling_notes({"algorithms": full}, 16)[1]
    part = {"a": {"pass@n_end": {"mean": 1.0}}, "b": {"pass@n_end": {"mean": 0.9}}}
    assert _ceiling_notes({"algorithms": part}, 16) == []


@pytest.mark.unit
def test_committed_demo_summary_regenerates_from_its_numbers():
    """figures/SUMMARY.md is what its figures/summary.json's per-run numbers give, through `resrl compare`."""
    import json
    from pathlib import Path

    from resrl_analysis.compare import DEMO_SPEC, summary_from_payload

    root = Path(__file__).resolve().parents[1] / "figures"
    payload = json.loads((root / "summary.json").read_text(encoding="utf-8"))
    assert summary_from_payload(payload, DEMO_SPEC) == (root / "SUMMARY.md").read_text(encoding="utf-8")
    agg = aggregate(payload["runs"], tuple(payload["settings"]["algorithms"]))
    assert agg["algorithms"] == payload["algorithms"] and agg["comparisons"] == payload["comparisons"]


@pytest.mark.unit
def test_committed_study_summary_regenerates_from_its_numbers():
    """figures/study/summary.md (the committed `resrl study`) is what its summary.json's per-run numbers give:
    8 algorithms × 5 seeds, through the study's spec."""
    import json
    from pathlib import Path

    from resrl_analysis.compare import summary_from_payload
    from trainer.study import STUDY_ALGORITHMS, study_spec

    root = Path(__file__).resolve().parents[1] / "figures" / "study"
    payload = json.loads((root / "summary.json").read_text(encoding="utf-8"))
    s = payload["settings"]
    assert tuple(s["algorithms"]) == STUDY_ALGORITHMS and len(s["seeds"]) >= 5
    assert len(payload["runs"]) == len(STUDY_ALGORITHMS) * len(s["seeds"])
    spec = study_spec(int(s["steps"]), int(s.get("heldout_prompts", 64)))
    assert summary_from_payload(payload, spec) == (root / "summary.md").read_text(encoding="utf-8")


def _fake_run(path, algo, seed, values):
    import json

    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"algorithm: {algo}\nseed: {seed}\n", encoding="utf-8")
    rows = [{"step": i + 1, "lld/batch_frac": v, "reward/mean": 0.5} for i, v in enumerate(values)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.mark.e2e
def test_compare_groups_runs_by_algorithm_and_seed(tmp_path):
    """`resrl compare` on run directories: per-algorithm means over seeds, each run's value its live mean over
    steps, the difference recomputed here, and the CLI prints the same summary and writes it."""
    import json
    import subprocess
    import sys

    from resrl_analysis.stats import mean_interval

    vals = {("nsr", 0): [0.3, 0.5], ("nsr", 1): [0.4, 0.4], ("nsr", 2): [0.5, 0.45],
            ("psr", 0): [0.1, 0.2], ("psr", 1): [0.2, 0.2], ("psr", 2): [0.15, 0.25]}
    dirs = []
    for (algo, seed), v in vals.items():
        _fake_run(tmp_path / f"{algo}-s{seed}", algo, seed, v)
        dirs.append(tmp_path / f"{algo}-s{seed}")
    from resrl_analysis.compare import compare

    md, payload = compare(dirs, out=tmp_path / "cmp")
    nsr = payload["algorithms"]["nsr"]["lld/batch_frac"]
    assert nsr["seeds"] == [0.4, 0.4, 0.475] and nsr["seed_ids"] == [0, 1, 2]
    assert nsr["mean"] == mean_interval([0.4, 0.4, 0.475]).mean
    (c,) = [c for c in payload["comparisons"] if c["metric"] == "lld/batch_frac"]
    iv = welch_difference([0.4, 0.4, 0.475], [0.15, 0.2, 0.2])
    assert (c["a"], c["b"]) == ("nsr", "psr") and c["diff"] == iv.mean and c["excludes_zero"] == iv.excludes_zero
    assert "NSR above the control PSR), in-batch LLD fraction: shown" in md
    assert json.loads((tmp_path / "cmp" / "summary.json").read_text())["runs"] == payload["runs"]
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "compare", *map(str, dirs)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == md.strip()
    bad = subprocess.run([sys.executable, "-m", "trainer.cli", "compare", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "nope" in bad.stderr and "no such directory" in bad.stderr


@pytest.mark.unit
def test_entropy_questions_per_algorithm_and_against_w_reinforce(tmp_path):
    """The entropy questions (issue 24): a sign question judged by one algorithm's own interval over seeds, and a
    pair the summary does not list (ResRL vs W-REINFORCE) judged by its own Welch interval, recomputed here."""
    import json

    from resrl_analysis.compare import DEMO_SPEC, compare
    from resrl_analysis.stats import Interval, describe_interval, mean_interval

    neg = {"resrl": [-0.1, -0.12, -0.11], "w-reinforce": [-0.9, -1.0, -0.95], "nsr": [-0.8, -0.7, 0.2]}
    dirs = []
    for algo, vals in neg.items():
        for seed, v in enumerate(vals):
            d = tmp_path / f"{algo}-s{seed}"
            d.mkdir()
            (d / "config.yaml").write_text(f"algorithm: {algo}\nseed: {seed}\n", encoding="utf-8")
            rows = [{"step": s, "entropy/pred_from_neg": v + 0.01 * (s - 1), "entropy/pred_from_pos": -0.5}
                    for s in (1, 2, 3)]
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            dirs.append(d)
    md, payload = compare(dirs, spec=DEMO_SPEC)
    per_seed = [v + 0.01 for v in neg["resrl"]]  # each run's mean over its three steps
    iv = mean_interval(per_seed)
    assert f"- Negative samples raise entropy under ResRL, first-order ΔH from negative samples: the opposite is " \
           f"shown, ResRL = {describe_interval(iv)}." in md
    assert "Negative samples raise entropy under NSR, first-order ΔH from negative samples: not shown" in md
    assert "Positive samples lower entropy under W-REINFORCE" in md and "under PSR" not in md  # PSR did not run
    w = welch_difference([abs(v + 0.01) for v in neg["resrl"]], [abs(v + 0.01) for v in neg["w-reinforce"]])
    line = [x for x in md.splitlines() if x.startswith("- ResRL's negative samples move entropy less than W-REINF")]
    expected = describe_interval(Interval.from_dict(w.to_dict(), n=3))
    assert line == [f"- ResRL's negative samples move entropy less than W-REINFORCE's, |first-order ΔH from negative "
                    f"samples|: shown, ResRL − W-REINFORCE = {expected}."]


@pytest.mark.unit
def test_worker_lines_are_labelled_with_their_run_and_the_eta_counts_down():
    import io

    from trainer.demo import _eta, _Labelled

    buf = io.StringIO()
    out = _Labelled(buf, "run 3/40 nsr-s1")
    out.write("step 10  reward 0.5\nstep 20")
    out.write("  reward 0.6\n")
    print("probing", file=out)
    assert buf.getvalue().splitlines() == ["[run 3/40 nsr-s1] step 10  reward 0.5",
                                           "[run 3/40 nsr-s1] step 20  reward 0.6", "[run 3/40 nsr-s1] probing"]
    import time

    started = time.time() - 600.0  # 10 minutes for 2 runs: 8 left take about 40 minutes
    assert "about 40 min left" in _eta(started, 2, 10, 2)
    assert _eta(started, 0, 10, 2) == "ETA unknown"
