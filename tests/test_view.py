"""`resrl view`, the Python side: what is read from a run (ours, TRL, verl) against the files themselves, shared
prefixes against a slow reference, the size cap, the per-token scores table, and the command in a subprocess.
What a reader sees in a real browser: tests/test_view_browser.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from view_runs import TOKEN_FIELDS, read_dump, slow_shared

from resrl_analysis.errors import ProbeError
from resrl_analysis.results import ScoresResult, load_results
from resrl_analysis.view import (
    Quantity,
    build_view,
    choose,
    read_run,
    register,
    shared_prefix_lengths,
    show,
    unregister,
    view_data,
)
from resrl_analysis.view.data import num
from resrl_analysis.view.page import evenly, render_html
from resrl_analysis.view.quantities import PAPER_REPRESENTATION, QUANTITIES

ROOT = Path(__file__).resolve().parents[1]


def _by_field() -> dict[str, str]:
    return {q.dump_field: q.key for q in QUANTITIES if q.dump_field}


def _scores_tokens(run: Path) -> pd.DataFrame:
    return load_results(run / "probes")["scores"].tokens


# ----------------------------------------------------------------------------- unit: pure functions


@pytest.mark.unit
def test_shared_prefix_lengths_match_a_slow_reference():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 7))
        ids = [[int(x) for x in rng.integers(0, 3, int(rng.integers(0, 6)))] for _ in range(n)]
        pos = [bool(x) for x in rng.integers(0, 2, n)]
        assert shared_prefix_lengths(ids, pos) == slow_shared(ids, pos), (ids, pos)


@pytest.mark.unit
def test_choose_keeps_groups_then_steps_within_the_budget():
    rng = np.random.default_rng(1)
    for _ in range(200):
        sizes = {f"s{i}": [int(x) for x in rng.integers(1, 50, int(rng.integers(1, 9)))]
                 for i in range(int(rng.integers(1, 12)))}
        budget = int(rng.integers(1, 1500))
        keys, g, over = choose(sizes, budget)
        used = sum(sum(sizes[k][:g]) for k in keys)
        assert keys == [k for k in sizes if k in keys] and keys[0] == next(iter(sizes))
        assert over == (used > budget)
        if not over:
            # Nothing more of the same kind would have fitted: one more group per step, or one more step.
            most = max(len(v) for v in sizes.values())
            if len(keys) == len(sizes) and g < most:
                assert sum(sum(sizes[k][:g + 1]) for k in keys) > budget or g < 4
            if len(keys) < len(sizes):
                assert g == min(4, most) or g < min(4, most)
        else:
            assert len(keys) == 1 and g == 1
    assert choose({"a": [5, 5]}, None, max_groups=1) == (["a"], 1, False)
    assert evenly(list(range(40)), 10)[-1] == 39 and len(evenly(list(range(40)), 10)) == 10


@pytest.mark.unit
def test_the_paper_representation_is_the_subspace_probes():
    from resrl_analysis.probes.subspace import PAPER_REPRESENTATION as rep

    assert PAPER_REPRESENTATION == rep.name


@pytest.mark.unit
def test_data_cannot_close_its_script_block():
    data = {"meta": {"title": "x"}, "quantities": [], "steps": [],
            "runs": [{"name": "</script><script>alert(1)</script><!--", "entries": {}}]}
    page = render_html(data)
    assert page.count("<script") == 2 and "alert(1)</script>" not in page
    blob = re.search(r'id="resrl-view-data">(.*?)</script>', page, flags=re.S).group(1)
    assert json.loads(blob) == data


# ----------------------------------------------------------------------------- our run


@pytest.mark.integration
def test_our_run_entries_hold_exactly_the_dumps(view_fixture_runs):
    run = view_fixture_runs["ours"]
    rv = read_run(run)
    assert [e.key for e in rv.entries] == ["rollouts:0", "rollouts:1"]
    fields = _by_field()
    for e in rv.entries:
        rows = read_dump(Path(e.source))
        assert sum(len(g.responses) for g in e.groups) == len(rows)
        flat = [r for g in e.groups for r in g.responses]
        for row, resp in zip(rows, flat):
            assert resp.ids == row["response_ids"] and resp.reward == row["reward"]
            assert resp.advantage == row["advantage"]
            for f in TOKEN_FIELDS:
                assert resp.values[fields[f]] == row[f], f
            assert resp.shared == slow_shared(
                [r["response_ids"] for r in rows if r["group_id"] == row["group_id"]],
                [r["reward"] > 0 for r in rows if r["group_id"] == row["group_id"]])[
                [r for r in rows if r["group_id"] == row["group_id"]].index(row)]


@pytest.mark.integration
def test_probe_set_deltas_and_lld_flags_come_from_resrl_probe(view_fixture_runs):
    run = view_fixture_runs["ours"]
    rv = read_run(run)
    tok = _scores_tokens(run)
    lld = load_results(run / "probes")["lld"].deltas
    assert rv.pairs == [(0, 1), (0, 2), (1, 2)]
    step0, step1 = rv.entries
    assert all(g.probed for g in step0.groups) and not any(g.probed for g in step1.groups)
    checked = 0
    for g in step0.groups:
        for k, r in enumerate(g.responses):
            for a, b in rv.pairs:
                at = {s: tok[(tok.step == s) & (tok.group_id == g.group_id) & (tok.response_index == k)]
                      .sort_values("position") for s in (a, b)}
                assert r.ids == at[a].token_id.tolist() == at[b].token_id.tolist()
                want = at[b].logp.to_numpy() - at[a].logp.to_numpy()
                assert np.allclose(r.deltas["delta_logp"][f"{a}-{b}"], want, atol=0)
                checked += len(want)
        for a, b in rv.pairs:
            row = lld[(lld.step_from == a) & (lld.step_to == b) & (lld.group_id == g.group_id)].iloc[0]
            flag = None if pd.isna(row.lld_sum) else bool(row.lld_sum)
            assert g.lld[f"{a}-{b}"] == flag and g.delta[f"{a}-{b}"] == num(row.delta_pos_sum)
    assert checked > 100


@pytest.mark.integration
def test_a_dump_rewritten_after_probing_is_not_given_the_old_deltas(view_fixture_runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(view_fixture_runs["ours"], run)
    dump = run / "rollouts" / "step_000000.jsonl"
    rows = read_dump(dump)
    rows[0]["response_ids"] = rows[0]["response_ids"][:-1] + [7]
    for f in TOKEN_FIELDS:
        rows[0][f] = rows[0][f][:len(rows[0]["response_ids"])]
    dump.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "probes" / "summary.json").write_text(
        (run / "probes" / "summary.json").read_text().replace(str(view_fixture_runs["ours"]), str(run)))
    rv = read_run(run)
    g0 = rv.entries[0].groups[0]
    assert not g0.probed and not g0.responses[0].deltas and all(g.probed for g in rv.entries[0].groups[1:])
    assert any("hold other tokens" in n for n in rv.notes)


@pytest.mark.integration
def test_bad_dump_fields_are_one_line_errors(view_fixture_runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(view_fixture_runs["ours"], run, ignore=shutil.ignore_patterns("probes"))
    dump = run / "rollouts" / "step_000001.jsonl"
    rows = read_dump(dump)
    rows[2]["token_logprobs"] = rows[2]["token_logprobs"][:-1]
    dump.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ProbeError, match=r"step_000001\.jsonl:3: field 'token_logprobs' has \d+ entries, expected"):
        read_run(run)
    assert read_run(run, steps=[0]).entries[0].key == "rollouts:0"  # the other steps still open
    with pytest.raises(ProbeError, match=r"nothing to show at steps \[5\]"):
        read_run(run, steps=[5])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProbeError, match="empty: not a run directory"):
        read_run(tmp_path / "empty")


@pytest.mark.integration
def test_a_new_quantity_is_one_registration(view_fixture_runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(view_fixture_runs["ours"], run, ignore=shutil.ignore_patterns("probes"))
    dump = run / "rollouts" / "step_000000.jsonl"
    rows = read_dump(dump)
    for i, r in enumerate(rows):
        r["entropy_change"] = [0.01 * i] * len(r["response_ids"])
    dump.write_text("".join(json.dumps(r) + "\n" for r in rows))
    register(Quantity("entropy_change", "predicted entropy change", "nats", "diverging", "a toy entry",
                      dump_field="entropy_change"))
    try:
        data = view_data(run, steps=[0])
    finally:
        unregister("entropy_change")
    q = next(q for q in data["quantities"] if q["key"] == "entropy_change")
    assert q["units"] == "nats" and q["domain"][0] == -q["domain"][1] > -0.5
    groups = data["runs"][0]["entries"]["rollouts:0"]["groups"]
    assert [r["q"]["entropy_change"][0] for g in groups for r in g["r"]] == [num(0.01 * i) for i in range(len(rows))]
    assert all(x.key != "entropy_change" for x in QUANTITIES)


# ----------------------------------------------------------------------------- size cap


@pytest.mark.integration
def test_the_budget_keeps_fewer_groups_then_fewer_steps_and_says_so(view_fixture_runs):
    run = view_fixture_runs["ours"]
    full = view_data(run, budget_mb=None)
    assert full["meta"]["omitted"] == []

    def size(g: dict) -> int:
        return len(json.dumps(g, separators=(",", ":"), ensure_ascii=False))

    sizes = {k: [size(g) for g in e["groups"]] for k, e in full["runs"][0]["entries"].items()}
    four = sum(sum(v[:4]) for v in sizes.values())
    capped = view_data(run, budget_mb=(four + 10) / 1e6)  # 4 groups per step fit, 5 do not
    entries = capped["runs"][0]["entries"]
    assert sorted(entries) == ["rollouts:0", "rollouts:1"]
    assert all(len(e["groups"]) == 4 for e in entries.values())
    assert sum(size(g) for e in entries.values() for g in e["groups"]) <= four + 10
    assert any("at most 4 prompt groups per step (the size budget): 2 group(s) left out" in o
               for o in capped["meta"]["omitted"])
    # Kept first: the probe set's groups (all of step 0 here), then mixed ones, then the rest in run order.
    assert all(g["probed"] for g in entries["rollouts:0"]["groups"])
    step1 = full["runs"][0]["entries"]["rollouts:1"]["groups"]
    mixed = [g["id"] for g in step1 if g["status"] == "mixed"]
    assert len(mixed) == 3 and [g["id"] for g in entries["rollouts:1"]["groups"]] == \
        mixed + [g["id"] for g in step1 if g["status"] != "mixed"][:1]
    one = view_data(run, budget_mb=(sum(sizes["rollouts:0"][:4]) + 10) / 1e6)  # then one step only
    assert list(one["runs"][0]["entries"]) == ["rollouts:0"]
    assert any("1 of 2 steps left out" in o and "rollouts 1" in o for o in one["meta"]["omitted"])
    assert any(o.endswith("4 of 10 groups embedded") for o in one["meta"]["omitted"])
    few = view_data(run, max_groups=2, budget_mb=None)
    assert all(len(e["groups"]) == 2 for e in few["runs"][0]["entries"].values())
    assert any("--max-groups 2" in o for o in few["meta"]["omitted"])


@pytest.mark.integration
def test_two_runs_keep_the_same_prompts(view_fixture_runs):
    ours = view_fixture_runs["ours"]
    data = view_data([ours, ours], max_groups=3, budget_mb=None, names=["a", "b"])
    for key in ("rollouts:0", "rollouts:1"):
        a, b = (r["entries"][key]["groups"] for r in data["runs"])
        assert [g["k"] for g in a] == [g["k"] for g in b] and len(a) == 3


# ----------------------------------------------------------------------------- foreign runs


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["trl", "verl"])
def test_foreign_runs_show_what_resrl_probe_computed(view_fixture_runs, kind):
    run = view_fixture_runs[kind]
    rv = read_run(run)
    r = load_results(run / "probes")
    tok, resp, inter = r["scores"].tokens, r["scores"].responses, r["interference"].tokens
    assert rv.kind == kind and [e.key for e in rv.entries] == ["probe:0", "probe:1", "probe:2"]
    assert rv.pairs == [(0, 1), (0, 2), (1, 2)] and rv.tokenizer_path is not None
    n_weights = 0
    for e in rv.entries:
        s = e.step
        assert sum(len(g.responses) for g in e.groups) == int((resp.step == s).sum())
        for g in e.groups:
            prompt = r["scores"].prompts
            assert g.prompt == prompt[(prompt.step == s) & (prompt.group_id == g.group_id)].prompt.item()
            for x in g.responses:
                t = tok[(tok.step == s) & (tok.group_id == g.group_id) & (tok.response_index == x.index)]
                assert x.ids == t.token_id.tolist() and x.values["logp"] == t.logp.tolist()
                assert x.values["entropy"] == t.entropy.tolist()
                w = inter[(inter.step == s) & (inter.group_id == g.group_id) & (inter.response_index == x.index)]
                if x.is_positive:
                    assert "nthr_weight" not in x.values and len(w) == 0
                elif len(w):
                    got = [x.values["nthr_weight"][p] for p in w.position]
                    assert got == w.nthr_weight.tolist()
                    n_weights += len(w)
    assert n_weights > 0


@pytest.mark.integration
def test_a_foreign_run_without_probes_has_nothing_to_show(view_fixture_runs, tmp_path):
    import shutil

    run = tmp_path / "trl"
    shutil.copytree(view_fixture_runs["trl"], run, ignore=shutil.ignore_patterns("probes"))
    with pytest.raises(ProbeError, match=r"trl: nothing to show: no rollout dump .* no per-token probe scores"):
        read_run(run)
    # A `resrl probe` output directory opens by itself too.
    assert [e.key for e in read_run(view_fixture_runs["trl"] / "probes").entries][0] == "probe:0"


# ----------------------------------------------------------------------------- the per-token scores table


@pytest.mark.integration
def test_scores_tokens_against_a_plain_forward(view_fixture_runs):
    import torch
    from transformers import AutoModelForCausalLM

    from resrl_analysis.probe_sets import ProbeSet

    run = view_fixture_runs["ours"]
    ps = ProbeSet.from_run(run)
    tok = _scores_tokens(run)
    model = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step_000002").double().eval()
    g = ps.groups[0]
    for k, ids in enumerate(g.response_ids):
        x = torch.tensor([list(g.prompt_ids) + list(ids)])  # (1, P + R)
        with torch.no_grad():
            logp = torch.log_softmax(model(x).logits.double(), -1)[0, len(g.prompt_ids) - 1: -1]  # (R, V)
        want_lp = logp[torch.arange(len(ids)), torch.tensor(ids)].numpy()
        want_ent = -(logp.exp() * logp).sum(-1).numpy()
        t = tok[(tok.step == 2) & (tok.group_id == g.group_id) & (tok.response_index == k)].sort_values("position")
        assert t.token_id.tolist() == list(ids)
        assert np.allclose(t.logp, want_lp, atol=2e-5) and np.allclose(t.entropy, want_ent, atol=2e-5)


@pytest.mark.integration
def test_results_saved_before_the_token_table_still_load(view_fixture_runs, tmp_path):
    import shutil

    src = view_fixture_runs["ours"] / "probes" / "scores"
    old = tmp_path / "scores"
    shutil.copytree(src, old)
    (old / "tokens.parquet").unlink()
    (old / "prompts.parquet").unlink()
    r = ScoresResult.load(old)
    assert r.tokens.empty and r.prompts.empty and list(r.tokens.columns)[:3] == ["step", "group_id", "response_index"]
    assert len(r.responses) == len(ScoresResult.load(src).responses)


# ----------------------------------------------------------------------------- the command, and notebooks


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.cli", "view", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


@pytest.mark.e2e
def test_resrl_view_command(view_fixture_runs, tmp_path):
    out = tmp_path / "v.html"
    proc = _cli(str(view_fixture_runs["ours"]), str(view_fixture_runs["trl"]), "--out", str(out), "--max-groups", "3")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "2 run(s)" in proc.stdout
    page = out.read_text(encoding="utf-8")
    blob = json.loads(re.search(r'id="resrl-view-data">(.*?)</script>', page, flags=re.S).group(1))
    assert [r["kind"] for r in blob["runs"]] == ["resrl", "trl"]
    assert {s["key"] for s in blob["steps"]} == {"rollouts:0", "rollouts:1", "probe:0", "probe:1", "probe:2"}
    assert "http://" not in page and "https://" not in page and "src=" not in page
    proc = _cli(str(tmp_path / "nope"), "--out", str(out))
    assert proc.returncode == 2 and proc.stderr == f"resrl view: error: {tmp_path / 'nope'}: no such run directory\n"


@pytest.mark.integration
def test_resrl_view_bad_input_is_one_line_and_writes_nothing(view_fixture_runs, tmp_path, capsys):
    from resrl_analysis.view.cli import main

    out = tmp_path / "v.html"
    assert main([str(view_fixture_runs["verl"]), "--out", str(out)]) == 0
    before = out.read_bytes()
    ours = str(view_fixture_runs["ours"])
    for args, what in (([ours, "--steps", "7"], "nothing to show at steps [7]"),
                       ([ours, "--max-groups", "-1"], "--max-groups must be >= 0"),
                       ([ours, "--max-mb", "-2"], "--max-mb must be >= 0"),
                       ([ours, "--out", str(tmp_path)], "is a directory")):
        capsys.readouterr()
        assert main([*args, *(["--out", str(out)] if "--out" not in args else [])]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("resrl view: error: ") and err.count("\n") == 1 and what in err, err
    assert out.read_bytes() == before  # a failed run leaves the earlier page as it was
    with pytest.raises(SystemExit) as e:
        main([ours, "--steps", "x"])
    assert e.value.code == 2 and "comma-separated steps" in capsys.readouterr().err


@pytest.mark.integration
def test_show_returns_an_inline_frame(view_fixture_runs):
    h = show(view_fixture_runs["verl"], height=300)
    assert type(h).__name__ == "HTML" and h.data.startswith("<div><iframe srcdoc=\"&lt;!doctype html&gt;")
    assert "height:300px" in h.data and "<script" not in h.data  # all of it escaped inside srcdoc
    assert build_view(view_fixture_runs["verl"]).startswith("<!doctype html>")


@pytest.mark.unit
def test_the_colour_page_describes_every_quantity():
    text = (ROOT / "docs" / "VIEW.md").read_text(encoding="utf-8")
    for q in QUANTITIES:
        assert f"| {q.label} | {q.units or '—'} |" in text, q.key


@pytest.mark.integration
def test_the_page_logs_to_wandb_unchanged(view_fixture_runs):
    wandb = pytest.importorskip("wandb")
    page = build_view(view_fixture_runs["verl"])
    assert wandb.Html(page, inject=False).html == page


@pytest.mark.integration
def test_a_run_the_trainer_wrote(tmp_path):
    # The trainer's own dump (ResRL: weights, residuals, the rollout log-probs and entropies) read as written.
    from trainer_runner import FAST, train_easy

    from trainer.config import TrainConfig

    run = train_easy(TrainConfig(**{**FAST, "output_dir": str(tmp_path / "run"), "steps": 1, "save_every": 1,
                                    "algorithm": "resrl"}))
    rv = read_run(run)
    assert [e.key for e in rv.entries] == ["rollouts:0", "rollouts:1"] and rv.tokenizer_path is not None
    fields = _by_field()
    for e in rv.entries:
        rows = read_dump(Path(e.source))
        flat = [r for g in e.groups for r in g.responses]
        assert len(flat) == len(rows)
        for row, resp in zip(rows, flat):
            assert resp.ids == row["response_ids"]
            for f, key in fields.items():
                if isinstance(row.get(f), list):
                    assert resp.values[key] == row[f], f
            assert len(resp.values["logp"]) == len(resp.ids) and len(resp.values["entropy"]) == len(resp.ids)
    page = build_view(run)
    assert "rollouts:1" in page and "resrl_weight" in page
