"""The run-directory module (resrl_analysis/rundir.py) and docs/RUN_DIRECTORY.md, checked against each other and
against what a real run writes."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
from trainer_runner import FAST, EasyTask  # noqa: E402

import trainer.loop as loop  # noqa: E402
from resrl_analysis import figures, rundir  # noqa: E402
from resrl_analysis.rundir import (  # noqa: E402
    METRIC_KEYS,
    OPTIONAL_METRIC_KEYS,
    ROLLOUT_FIELDS,
    RUN_ENTRIES,
    JsonlError,
    atomic_write,
    atomic_write_json,
    list_checkpoints,
    list_rollouts,
    move_aside,
    parse_step,
    read_jsonl,
    step_dir,
)
from trainer.config import TrainConfig  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "RUN_DIRECTORY.md"


def _sections() -> dict[str, str]:
    out, name = {}, ""
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            name = line[3:].strip()
        out[name] = out.get(name, "") + line + "\n"
    return out


def _table_keys(text: str) -> set[str]:
    return set(re.findall(r"^\| `([^`]+)` \|", text, flags=re.M))


# ================================================================================== the page and the module


@pytest.mark.unit
def test_doc_lists_every_metric_key_and_no_other():
    metrics = _sections()["Metrics"]
    assert _table_keys(metrics) == set(METRIC_KEYS) | set(OPTIONAL_METRIC_KEYS)


@pytest.mark.unit
def test_doc_lists_every_rollout_field_in_order():
    rows = re.findall(r"^\| `([^`]+)` \|", _sections()["Rollouts"], flags=re.M)
    assert tuple(rows) == ROLLOUT_FIELDS


@pytest.mark.unit
def test_doc_tree_names_every_entry_and_no_other():
    tree = [line for line in DOC.read_text(encoding="utf-8").splitlines() if re.match(r"^ {6}\S", line)]
    top = {line.split()[0].split("/")[0] for line in tree}
    assert top == set(RUN_ENTRIES)
    assert rundir.TRAINER_STATE in DOC.read_text(encoding="utf-8")
    assert f"`{rundir.TMP_PREFIX}`" in DOC.read_text(encoding="utf-8")


@pytest.mark.unit
def test_a_real_run_writes_what_the_page_says(tmp_path):
    cfg = TrainConfig(**{**FAST, "output_dir": str(tmp_path / "run"), "steps": 2, "save_every": 2,
                         "val_every": 1, "val_prompts": 2, "val_n": 2, "kl_coef": 0.01, "blowup_update_norm": 1e9})
    run = loop.train(cfg, task=EasyTask())
    assert {p.name for p in run.iterdir()} <= set(RUN_ENTRIES)
    assert not (run / rundir.LOCK).exists()  # released and removed at the end
    documented = set(METRIC_KEYS) | set(OPTIONAL_METRIC_KEYS)
    for _, line in read_jsonl(run / rundir.METRICS):
        keys = {re.sub(r"^val/pass@\d+$", "val/pass@N", k) for k in line}
        assert set(METRIC_KEYS) <= keys and keys <= documented, keys ^ documented
        assert keys == documented - {"perf/peak_memory_gb"}  # every other optional key applies here (CPU)
    for step, path in list_rollouts(run):
        assert step in (0, 2)
        assert all(tuple(obj) == ROLLOUT_FIELDS for _, obj in read_jsonl(path))
    assert [s for s, _ in list_checkpoints(run, with_trainer_state=True)] == [0, 2]
    assert (step_dir(run, 2) / rundir.TRAINER_STATE).is_file()


# ================================================================================== paths and listing


@pytest.mark.unit
def test_step_names_round_trip():
    assert parse_step(step_dir("r", 123456)) == 123456
    assert parse_step(rundir.rollout_path("r", 7)) == 7
    assert parse_step("step_12") is None and parse_step(".tmp-step_000001-x") is None


@pytest.mark.unit
def test_list_checkpoints_one_meaning(tmp_path):
    assert list_checkpoints(tmp_path) == []  # not a run: nothing, not an error (runs.run_checkpoints raises for probes)
    for name in ("step_000004", "step_000000", ".tmp-step_000008-x", "step_9", "notes"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_000002").write_text("a file, not a checkpoint")
    (step_dir(tmp_path, 4) / rundir.TRAINER_STATE).write_bytes(b"")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [0, 4]
    assert [s for s, _ in list_checkpoints(tmp_path, with_trainer_state=True)] == [4]


# ================================================================================== JSONL


@pytest.mark.unit
def test_read_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_bytes(b'{"step": 1}\n\n[1, 2]\n{"step": 3}\n\xff\xfe\n{"step"')
    with pytest.raises(JsonlError, match=rf"^{re.escape(str(f))}:3: expected a JSON object, got list$"):
        read_jsonl(f)
    f.write_bytes(b'{"step": 1}\n\xff\n')
    with pytest.raises(JsonlError, match=r":2: not UTF-8$"):
        read_jsonl(f)
    f.write_bytes(b'{"step": 1}\n{"step": 2}\n{"st')
    with pytest.raises(JsonlError, match=r":3: bad JSON \(JSONDecodeError: "):
        read_jsonl(f)
    assert read_jsonl(f, skip_invalid=True) == [(1, {"step": 1}), (2, {"step": 2})]


# ================================================================================== atomic writes


@pytest.mark.unit
def test_atomic_write_text_bytes_json_and_mode(tmp_path):
    old = os.umask(0o022)
    try:
        a = atomic_write(tmp_path / "a.txt", "é")
        b = atomic_write(tmp_path / "b.bin", b"\x00\x01")
        c = atomic_write_json(tmp_path / "c.json", {"x": [1]})
    finally:
        os.umask(old)
    assert a.read_text(encoding="utf-8") == "é" and b.read_bytes() == b"\x00\x01"
    assert json.loads(c.read_text()) == {"x": [1]}
    assert {oct(p.stat().st_mode & 0o777) for p in (a, b, c)} == {oct(0o644)}  # not mkstemp's 0600
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "c.json", {"x": float("nan")})
    assert json.loads(c.read_text()) == {"x": [1]}  # a refused write leaves the old file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.json"]


@pytest.mark.unit
def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    p = atomic_write(tmp_path / "s.json", "old")

    def fail(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rundir.os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        atomic_write(p, "new")
    assert p.read_text() == "old" and [q.name for q in tmp_path.iterdir()] == ["s.json"]


@pytest.mark.unit
def test_move_aside_keeps_relative_paths_and_never_overwrites(tmp_path):
    (tmp_path / "checkpoints" / "step_000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_000004" / "w").write_text("4")
    first = move_aside(tmp_path, [tmp_path / "checkpoints" / "step_000004"], lines={"metrics.jsonl": ['{"step": 5}']})
    (tmp_path / "checkpoints" / "step_000004").mkdir()
    second = move_aside(tmp_path, [tmp_path / "checkpoints" / "step_000004"])
    assert first != second and first.parent == second.parent == tmp_path / rundir.SUPERSEDED
    assert (first / "checkpoints" / "step_000004" / "w").read_text() == "4"
    assert read_jsonl(first / "metrics.jsonl") == [(1, {"step": 5})]
    assert move_aside(tmp_path, []) is None


# ================================================================================== figures read the run's quantiles


@pytest.mark.unit
def test_residual_histogram_marks_the_runs_own_quantiles(tmp_path):
    rows = [{"is_positive": False, "resrl_residuals": [0.1 * i, None, 0.05 * i], "resrl_weights": [0.5, 1.0, 0.3]}
            for i in range(1, 20)]
    run = figures.RunData(tmp_path, "resrl", {"algorithm": "resrl", "resrl_q_low": 0.3, "resrl_q_high": 0.7},
                          pd.DataFrame(), rollouts={0: rows})
    fig = figures.fig_residual_weights([run])
    titles = [ax.get_title() for ax in fig.axes]
    assert any("q_low=0.3" in t and "q_high=0.7" in t for t in titles), titles  # it used to say 0.2/0.8
    matplotlib.pyplot.close(fig)
