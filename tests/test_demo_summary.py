"""The demo summary's generated verdicts: from the comparisons' numbers, never written in advance."""

from __future__ import annotations

from resrl_analysis.stats import welch_difference
from trainer.demo import _ceiling_notes, _headline, aggregate, summary_markdown


def _rows(values: dict[str, list[float]], key: str = "lld/batch_frac") -> list[dict]:
    return [{"algorithm": a, "seed": s, key: v} for a, vs in values.items() for s, v in enumerate(vs)]


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


def test_one_seed_cannot_be_judged_and_the_summary_says_so():
    agg = aggregate(_rows({"psr": [0.2], "nsr": [0.3]}), ("psr", "nsr"))
    assert "cannot be judged (no interval)" in _headline(agg, 1)[3]
    md = summary_markdown(agg, seconds=60.0, settings={"preset": "p", "task": "t", "steps": 1, "save_every": 1,
                                                         "seeds": [0], "jobs": 1, "samples": 4})
    assert "## What the numbers show" in md and "one seed: no interval" in md


def test_ceiling_note_only_when_every_algorithm_is_at_the_ceiling():
    full = {"a": {"pass@n_end": {"mean": 1.0}}, "b": {"pass@n_end": {"mean": 0.999}}}
    assert "pass@16 (last) is at least 0.99" in _ceiling_notes({"algorithms": full}, 16)[1]
    part = {"a": {"pass@n_end": {"mean": 1.0}}, "b": {"pass@n_end": {"mean": 0.9}}}
    assert _ceiling_notes({"algorithms": part}, 16) == []
