"""``resrl probe --probe-set heldout|train|batch`` on a tiny run of the embedded default.

The probe sets' rewards are checked against the trainer's own task reward (both call resrl_analysis.rewards), and the
in-batch LLD against log-likelihoods computed directly from the two checkpoints with a plain forward.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from resrl_analysis import rundir
from resrl_analysis.errors import ProbeError
from resrl_analysis.probe_sets import from_run_prompts
from resrl_analysis.probes.runner import main
from resrl_analysis.results import LLDResult
from resrl_analysis.rewards import final_answer_reward
from trainer.config import preset_config
from trainer.loop import train
from trainer.setup import limit_prompts
from trainer.tasks import make_task

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin") / "run"
    cfg = preset_config("tiny", algorithm="grpo", steps=2, save_every=1, seed=0, output_dir=str(out),
                        progress_bar="off", log_every=1000, probe_prompts=6, prompts_per_step=8, mini_batch_size=8,
                        cpu_threads=1)
    return train(cfg), cfg


def test_setup_writes_the_task_prompts_with_reference_responses(run):
    run_dir, cfg = run
    task = limit_prompts(make_task("multiplication"), cfg.train_prompts)
    tok = AutoTokenizer.from_pretrained(rundir.step_dir(run_dir, 0))
    for name, want in ((rundir.PROMPTS_HELDOUT, task.validation_prompts()[:6]),
                       (rundir.PROMPTS_TRAIN, [task.train_item(i * task.num_train // 6) for i in range(6)])):
        rows = [obj for _, obj in rundir.read_jsonl(run_dir / name)]
        assert [r["uid"] for r in rows] == [p.uid for p in want]
        for r, p in zip(rows, want):
            assert tuple(r) == rundir.PROMPT_FIELDS and r["prompt"] == p.text
            assert r["reference_ids"][-1] == tok.eos_token_id
            text = tok.decode(r["reference_ids"], skip_special_tokens=True)
            assert text == r["reference_response"] and task.reward(text, p.ground_truth) == 1.0
    # Training and held-out prompts never overlap (the task's split on unordered pairs).
    held = {obj["uid"] for _, obj in rundir.read_jsonl(run_dir / rundir.PROMPTS_HELDOUT)}
    assert not held & {p.uid for p in (task.train_item(i) for i in range(task.num_train))}


@pytest.mark.parametrize("which", ["heldout", "train"])
def test_prompt_probe_sets_score_samples_like_the_trainer(run, which):
    run_dir, _ = run
    ckpt = rundir.step_dir(run_dir, 0)
    tok = AutoTokenizer.from_pretrained(ckpt)
    ps = from_run_prompts(run_dir, which, tok, ckpt, n_samples=5, seed=3)
    task = make_task("multiplication")
    assert ps.n_groups == 6 and all(len(g.response_ids) == 6 for g in ps.groups)
    assert any(n.startswith("rewards: recomputed") for n in ps.notes)
    for g in ps.groups:
        assert g.rewards[0] == 1.0 and g.responses[0] == g.ground_truth  # the reference answer, a positive
        for text, r in zip(g.responses[1:], g.rewards[1:]):
            assert r == task.reward(text, g.ground_truth)  # the trainer's reward agrees
    again = from_run_prompts(run_dir, which, tok, ckpt, n_samples=5, seed=3)
    assert again.groups == ps.groups  # seeded


def test_final_answer_reward_matches_worked_solutions():
    assert final_answer_reward("7+5=12;4+8+1=13;3+2+1=6;=632", "632") == 1.0
    assert final_answer_reward("7+5=12;4+8+1=13;3+2+1=6;=633", "632") == 0.0
    assert final_answer_reward("632=", "632") == 0.0


def test_cli_heldout_probe_and_missing_prompt_files(run, tmp_path, capsys):
    run_dir, _ = run
    out = tmp_path / "p"
    assert main([str(run_dir), "--probe-set", "heldout", "--groups", "0", "--probes", "lld,diversity",
                 "--samples", "4", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["probe_set"]["source"].endswith("prompts/heldout.jsonl")
    assert summary["probe_set"]["n_groups"] == 6
    lld = LLDResult.load(out / "lld")
    assert set(lld.deltas.prompt_uid) == {obj["uid"] for _, obj in rundir.read_jsonl(run_dir / rundir.PROMPTS_HELDOUT)}
    bare = tmp_path / "bare"
    bare.mkdir()
    for sub in ("checkpoints", "rollouts"):
        (bare / sub).symlink_to(run_dir / sub)
    (bare / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    assert main([str(bare), "--probe-set", "train", "--out", str(tmp_path / "q"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prompts/train.jsonl: not found" in err[0]
    with pytest.raises(ProbeError, match="expected 'heldout' or 'train'"):
        from_run_prompts(run_dir, "batch", None, rundir.step_dir(run_dir, 0))


def _logp_sum(model, prompt_ids, response_ids) -> float:
    # Slow reference: one plain forward of prompt + response, log-softmax, gather the response tokens.
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()  # (T, V)
    lp = torch.log_softmax(logits[:-1], dim=-1)  # (T-1, V): position t predicts token t+1
    targets = ids[0, 1:]
    return float(lp.gather(-1, targets[:, None])[len(prompt_ids) - 1:].sum())


def test_batch_probe_set_is_in_batch_lld_between_consecutive_checkpoints(run, tmp_path):
    run_dir, _ = run
    out = tmp_path / "b"
    assert main([str(run_dir), "--probe-set", "batch", "--groups", "0", "--out", str(out),
                 "--no-progress"]) == 0
    lld = LLDResult.load(out / "lld_batch").deltas
    assert set(zip(lld.step_from, lld.step_to)) == {(0, 1), (1, 2)} and set(lld.comparison) == {"in_batch"}
    models = {s: AutoModelForCausalLM.from_pretrained(rundir.step_dir(run_dir, s)).eval() for s in (0, 1, 2)}
    checked = 0
    for a, b in ((0, 1), (1, 2)):
        rows = [obj for _, obj in rundir.read_jsonl(rundir.rollout_path(run_dir, a))]
        for gid in sorted({r["group_id"] for r in rows}):
            pos = [r for r in rows if r["group_id"] == gid and r["reward"] > 0]
            got = lld[(lld.step_from == a) & (lld.group_id == gid)]
            if not pos:
                assert got.empty or got.delta_pos_sum.isna().all()
                continue
            want = sum(_logp_sum(models[b], r["prompt_ids"], r["response_ids"])
                       - _logp_sum(models[a], r["prompt_ids"], r["response_ids"]) for r in pos) / len(pos)
            assert float(got.delta_pos_sum.iloc[0]) == pytest.approx(want, abs=1e-4)
            assert bool(got.lld_sum.iloc[0]) == (want <= 0)
            checked += 1
    assert checked >= 4
    assert main([str(run_dir), "--probe-set", "batch", "--probes", "interference", "--out", str(tmp_path / "c"),
                 "--no-progress"]) == 2  # batch is the lld probe only, said in one line
