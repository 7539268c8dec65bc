"""`resrl probe`: end to end in a subprocess, options, a foreign checkpoint, and bad input (issue 4 / issue 7.5)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from resrl_analysis.probes.runner import PROBES, main
from resrl_analysis.probes.synthetic import char_tokenizer, tiny_model, write_fake_run
from resrl_analysis.results import load_results

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--no-progress", "--samples", "3", "--algorithms", "grpo,resrl"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return write_fake_run(tmp_path_factory.mktemp("run"), steps=(0, 1, 2))


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("probes"))
    return dst


@pytest.mark.e2e
def test_cli_subprocess_end_to_end(run, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "probe", str(run), "--out", str(out), *FAST],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = load_results(out)
    assert sorted(results) == ["diversity", "entropy_dynamics", "fidelity", "first_order", "flips", "interference",
                               "lld", "scores", "subspace"]
    summary = json.loads((out / "summary.json").read_text())
    assert [c["step"] for c in summary["checkpoints"]] == [0, 1, 2]
    assert summary["full_model_steps"] == [0, 2] and summary["diversity_steps"] == [0, 2]
    assert summary["probe_set"]["n_groups"] == 4 and summary["probe_set"]["n_mixed"] == 2
    # The two unmixed groups are skipped, with their reason, by every probe that needs mixed groups.
    reasons = {(s["probe"], s["reason"]) for s in summary["skipped"]}
    assert {("interference", "no_negative"), ("interference", "no_positive"), ("subspace", "no_positive")} <= reasons
    lld = results["lld"]
    assert set(lld.deltas.comparison) == {"vs_initial", "step_to_step"}
    assert set(results["scores"].responses.step) == {0, 1, 2}
    inter = results["interference"].groups
    full = inter[(inter.status == "ok") & inter.step.isin([0, 2])]
    assert full.full_update_cosine.notna().all() and inter[inter.step == 1].full_update_cosine.isna().all()
    assert set(results["diversity"].pass_at_k.k) == {1, 2, 3}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary debris
    # The model's code is imported (and timed) once, before the first checkpoint's load.
    t = summary["timing_s"]
    assert 0 < t["import"] and 0 < t["load"] and t["import"] + t["load"] <= t["total"]


@pytest.mark.integration
def test_import_model_code_returns_the_checkpoints_class(run):
    from transformers import AutoConfig

    from resrl_analysis.checkpoints import import_model_code

    ck = run / "checkpoints" / "step_000000"
    cls = import_model_code(ck)
    assert cls is not None and cls.__name__ == AutoConfig.from_pretrained(ck).architectures[0]
    assert import_model_code(run / "no_such_checkpoint") is None


@pytest.mark.integration
def test_help_documents_the_options():
    from trainer.cli import build_parser

    sub = build_parser("probe")._subparsers._group_actions[0].choices["probe"]
    text = sub.format_help()
    for opt in ("--out", "--probes", "--steps", "--every", "--probe-set-step", "--probe-set", "--groups", "--samples",
                "--temperature", "--full-model-steps", "--diversity-steps", "--eps", "--lr", "--threads"):
        assert opt in text
    for p in PROBES:
        assert p in text


@pytest.mark.integration
def test_step_selection_and_probe_choice(run, tmp_path):
    out = tmp_path / "a"
    assert main([str(run), "--out", str(out), "--steps", "0,2", "--probes", "lld,entropy", *FAST]) == 0
    r = load_results(out)
    assert sorted(r) == ["lld", "scores"] and set(r["scores"].responses.step) == {0, 2}
    out = tmp_path / "b"
    assert main([str(run), "--out", str(out), "--every", "2", "--probes", "entropy", *FAST]) == 0
    assert set(load_results(out)["scores"].responses.step) == {0, 2}
    assert sorted(load_results(out)) == ["scores"]


@pytest.mark.integration
def test_quiet_prints_nothing_but_writes_the_same(run, tmp_path, capsys):
    assert main([str(run), "--out", str(tmp_path / "loud"), "--probes", "entropy", *FAST]) == 0
    loud = capsys.readouterr().out
    assert "memory plan" in loud and "resrl probe: wrote" in loud
    assert main([str(run), "--out", str(tmp_path / "q"), "--probes", "entropy", "--quiet", *FAST]) == 0
    assert capsys.readouterr().out == ""
    assert sorted(load_results(tmp_path / "q")) == ["scores"]


@pytest.mark.integration
def test_csv_format(run, tmp_path):
    out = tmp_path / "csv"
    assert main([str(run), "--out", str(out), "--probes", "subspace", "--steps", "1", "--format", "csv", *FAST]) == 0
    assert (out / "subspace" / "groups.csv").is_file()
    assert len(load_results(out)["subspace"].groups) == 4 * 8


@pytest.mark.integration
def test_plain_checkpoint_with_user_probe_set(tmp_path, capsys):
    ck = tmp_path / "hf-model"
    tiny_model(seed=7).save_pretrained(ck)
    char_tokenizer().save_pretrained(ck)
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps(o) + "\n" for o in [
        {"prompt": "12*3=", "responses": ["36", "35", "3"], "rewards": [1, 0, 0], "ground_truth": "36"},
        {"prompt": "11*2=", "responses": ["22", "22", "21"], "rewards": [1, 1, 0], "ground_truth": "22"},
    ]))
    out = tmp_path / "out"
    assert main([str(ck), "--probe-set", str(probe), "--out", str(out), *FAST]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "checkpoint" and summary["probe_set"]["n_mixed"] == 2
    r = load_results(out)
    assert len(r["lld"].deltas) == 0 and "two checkpoints" in r["lld"].skipped[0]["reason"]
    assert (r["interference"].groups.status == "ok").all()
    # Without a probe set, a lone checkpoint is an error, not a crash.
    assert main([str(ck), "--out", str(tmp_path / "x"), *FAST]) == 2
    assert "--probe-set" in capsys.readouterr().err


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("resrl probe: error: ") and "\n" not in err
    return err


@pytest.mark.integration
def test_truncated_checkpoint_fails_before_any_work(run, tmp_path, capsys):
    r = _copy(run, tmp_path)
    f = r / "checkpoints" / "step_000002" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert main([str(r), *FAST]) == 2
    assert str(f) in _error(capsys)
    assert not (r / "probes").exists()


@pytest.mark.integration
def test_missing_checkpoint_file(run, tmp_path, capsys):
    r = _copy(run, tmp_path)
    (r / "checkpoints" / "step_000001" / "config.json").unlink()
    assert main([str(r), *FAST]) == 2
    assert "step_000001/config.json" in _error(capsys)


@pytest.mark.integration
def test_mismatched_tokenizers(run, tmp_path, capsys):
    r = _copy(run, tmp_path)
    char_tokenizer("9876543210*=+-. ").save_pretrained(r / "checkpoints" / "step_000001")
    assert main([str(r), *FAST]) == 2
    assert "tokenizer" in _error(capsys) and not (r / "probes").exists()


@pytest.mark.integration
def test_bad_options(run, tmp_path, capsys):
    assert main([str(run), "--out", str(tmp_path / "o"), "--probes", "lld,nope"]) == 2
    assert "nope" in _error(capsys)
    assert main([str(run), "--out", str(tmp_path / "o"), "--steps", "0,5"]) == 2
    assert "[5]" in _error(capsys)
    (tmp_path / "file").write_text("")
    assert main([str(run), "--out", str(tmp_path / "file" / "sub"), *FAST]) == 2
    assert "not writable" in _error(capsys)
    assert main([str(tmp_path), *FAST]) == 2
    _error(capsys)


@pytest.mark.integration
def test_no_mixed_groups(run, tmp_path):
    r = _copy(run, tmp_path)
    f = r / "rollouts" / "step_000000.jsonl"
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    f.write_text("".join(json.dumps(o) + "\n" for o in rows if o["group_id"] >= 2))  # the unmixed pair only
    assert main([str(r), "--steps", "0,1", *FAST]) == 0
    summary = json.loads((r / "probes" / "summary.json").read_text())
    assert summary["probe_set"]["n_mixed"] == 0
    for probe in ("interference", "subspace"):
        assert {s["reason"] for s in summary["skipped"] if s["probe"] == probe} == {"no_positive", "no_negative"}
    res = load_results(r / "probes")
    assert len(res["interference"].tokens) == 0 and len(res["subspace"].correlation) == 0
    assert len(res["lld"].deltas) == 4  # LLD still runs: 2 groups × (vs_initial, step_to_step) 0 → 1
    assert res["lld"].deltas.lld_sum.isna().sum() == 2  # NA for the group without positives


@pytest.mark.integration
def test_failure_mid_pass_leaves_no_partial_results(run, tmp_path, monkeypatch):
    import resrl_analysis.probes.subspace as sub

    real = sub.subspace_probe

    def failing(*a, step=0, **kw):
        if step == 1:
            raise RuntimeError("boom")
        return real(*a, step=step, **kw)

    monkeypatch.setattr(sub, "subspace_probe", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        main([str(run), "--out", str(out), *FAST])
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.integration
def test_group_batches_give_the_same_tables(run, tmp_path):
    """Probing one group at a time (bounded memory) changes nothing, pooled correlations included."""
    outs = []
    for gb in (1, 8):
        out = tmp_path / f"gb{gb}"
        assert main([str(run), "--out", str(out), "--steps", "0,1", "--probes", "entropy,first_order,interference,"
                     "subspace", "--group-batch", str(gb), *FAST]) == 0
        outs.append(load_results(out))
    a, b = outs
    for name in a:
        for table, df in a[name].frames().items():
            other = b[name].frames()[table]
            pd.testing.assert_frame_equal(df, other, check_exact=False, rtol=1e-6, atol=1e-9, obj=f"{name}.{table}")
    assert len(a["subspace"].correlation) == 2 * 8 and (a["subspace"].correlation.n_groups == 2).all()


@pytest.mark.integration
def test_first_order_real_steps_on_the_probe_sets_first_groups_whatever_the_batching(tmp_path):
    """The default real-step subsample is the probe set's first 4 groups, not the first 4 of every group batch."""
    run = write_fake_run(tmp_path / "run6", steps=(0, 1), n_groups=6, unmixed_groups=False)
    stepped = []
    for gb in (1, 2, 8):
        out = tmp_path / f"gb{gb}"
        assert main([str(run), "--out", str(out), "--steps", "1", "--probes", "first_order", "--group-batch",
                     str(gb), *FAST]) == 0
        fo = load_results(out)["first_order"].to_frame()
        stepped.append(sorted(set(fo[fo.actual_head.notna()].group_id)))
    assert stepped[0] == stepped[1] == stepped[2]
    assert len(stepped[0]) == 4
