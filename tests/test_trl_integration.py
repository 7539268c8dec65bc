"""ProbeCallback inside a real TRL GRPOTrainer run (CPU, tiny model): live probes logged through the
trainer's loggers, tables that `resrl figures` draws without conversion, training undisturbed."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from test_foreign_runs import BASE, PAIRS, grpo_run, reference_logp
from transformers import TrainerCallback

from resrl_analysis.integrations.trl import ProbeCallback
from resrl_analysis.results import load_results


class Recorder(TrainerCallback):
    """Stands for a report_to backend: placed before ProbeCallback, it sees what every logger sees."""

    def __init__(self):
        self.logs: list[tuple[int, dict]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs or {})))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("trl-cb")
    dataset = root / "probe_prompts.jsonl"  # TRL's dataset layout: sampled once with the starting policy
    dataset.write_text("".join(json.dumps({"prompt": f"{a}*{b}=", "solution": str(a * b)}) + "\n" for a, b in PAIRS))
    rec = Recorder()
    cb = ProbeCallback(str(dataset), every=2, probe_set_options={"n_samples": 6, "max_new_tokens": 6})
    live = grpo_run(root / "live", callbacks=[rec, cb])
    plain = grpo_run(root / "plain")
    return {"root": root, "live": live, "plain": plain, "cb": cb, "rec": rec}


@pytest.mark.integration
def test_training_is_not_disturbed(runs):
    live, plain = runs["live"].model, runs["plain"].model
    for (name, a), (_, b) in zip(live.named_parameters(), plain.named_parameters()):
        assert torch.equal(a, b), name
    assert live.training == plain.training

    def trainer_logs(t):  # the trainer's own entries, without wall-clock keys
        return [{k: v for k, v in e.items() if "time" not in k and "per_second" not in k}
                for e in t.state.log_history if not any(k.startswith("probe/") for k in e)]

    assert trainer_logs(runs["live"]) == trainer_logs(runs["plain"])
    assert len(list((runs["root"] / "live" / "completions").glob("*.parquet"))) == 4  # every log still happened
    # ProbeCallback records the ids TRL generated (record_token_ids=True by default): exact tokens for `resrl probe`.
    log = pd.read_parquet(runs["root"] / "live" / "completions" / "completions_00001.parquet")
    tok = runs["live"].processing_class
    assert all(tok.decode(list(c), skip_special_tokens=True) == t for c, t in zip(log.completion_ids, log.completion))
    assert "completion_ids" not in pd.read_parquet(runs["root"] / "plain" / "completions" / "completions_00001.parquet")


@pytest.mark.integration
def test_headline_numbers_reach_every_logger(runs):
    probed = [e for e in runs["live"].state.log_history if "probe/entropy" in e]
    assert [e["step"] for e in probed] == [0, 1, 2, 3, 4]  # step 0, every 2 steps, and each save (every step)
    assert [h["step"] for h in runs["cb"].history] == [0, 1, 2, 3, 4]
    seen = [(s, d) for s, d in runs["rec"].logs if "probe/entropy" in d]
    assert [s for s, _ in seen] == [0, 1, 2, 3, 4]  # a logger placed before the callback sees them too
    assert all("probe/lld_delta_mean" in d and "probe/interference_cos_mean" in d for _, d in seen[1:])
    saved = json.loads((runs["root"] / "live" / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert any("probe/lld_delta_mean" in e for e in saved)


@pytest.mark.integration
def test_tables_match_the_saved_checkpoints(runs):
    out = runs["root"] / "live" / "probes"
    r = load_results(out)
    assert set(r) == {"scores", "lld", "interference"}
    d = r["lld"].deltas
    vs0 = d[d.comparison == "vs_initial"]
    assert sorted(vs0.step_to.unique()) == [1, 2, 3, 4] and set(vs0.step_from) == {0}
    ps = runs["cb"].probe_set
    assert ps.n_mixed >= 1 and all(g.prompt_ids.count(1) == 1 and g.prompt_ids[0] == 1 for g in ps.groups)
    # The live scores at step 3 are those of the checkpoint saved at step 3 (a plain forward), against the base.
    g = next(g for g in ps.groups if g.n_positive)
    pos = [x for x, ok in zip(g.response_ids, g.is_positive) if ok]
    want = sum(reference_logp(runs["root"] / "live" / "checkpoint-3", g.prompt_ids, x)
               - reference_logp(BASE, g.prompt_ids, x) for x in pos) / len(pos)
    got = vs0[(vs0.step_to == 3) & (vs0.group_id == g.group_id)].delta_pos_sum.item()
    assert got == pytest.approx(want, abs=1e-4)
    ok = r["interference"].groups
    assert set(ok[ok.status == "ok"].step) == {0, 1, 2, 3, 4}


@pytest.mark.e2e
def test_resrl_figures_reads_the_output_dir(runs, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "figures", str(runs["root"] / "live"),
                           "--out", str(tmp_path), "--only", "lld_over_steps,interference_cosines", "--formats", "png"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "lld_over_steps.png").stat().st_size > 1000 and (tmp_path / "interference_cosines.png").is_file()


@pytest.mark.integration
def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown probes"):
        ProbeCallback("x.jsonl", probes=("lld", "subspace"))
    with pytest.raises(ValueError, match="every must be a positive int"):
        ProbeCallback("x.jsonl", every=0)


@pytest.mark.integration
def test_resrl_view_opens_the_live_run(runs, tmp_path):
    # What the callback wrote is enough for the token page: the probe set at every probed step, per-token
    # log-probs from the live scores, Δ between steps, LLD flags as the callback's lld table has them.
    from resrl_analysis.view import read_run, write_view

    live = runs["root"] / "live"
    rv = read_run(live)
    r = load_results(live / "probes")
    tok = r["scores"].tokens
    assert rv.kind == "trl" and [e.key for e in rv.entries] == [f"probe:{s}" for s in range(5)]
    assert len(tok) == sum(len(x.ids) for e in rv.entries for g in e.groups for x in g.responses)
    assert (0, 4) in rv.pairs and all(g.probed for e in rv.entries for g in e.groups)
    d = r["lld"].deltas
    g = rv.entries[-1].groups[0]
    want = d[(d.step_from == 0) & (d.step_to == 4) & (d.group_id == g.group_id)].lld_sum.iloc[0]
    assert g.lld["0-4"] == (None if want is pd.NA else bool(want))
    assert write_view([live], tmp_path / "live.html").stat().st_size > 10_000
