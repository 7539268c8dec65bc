"""Probing runs we did not write: a real TRL GRPOTrainer run, a verl-shaped directory, plain lists
of checkpoints; probe sets from TRL / verl dumps and RLVR datasets; never a second BOS."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from resrl_analysis.errors import ProbeError
from resrl_analysis.probe_sets import (
    detect_format,
    encode_prompt,
    from_dataset,
    load_probe_set,
    render_prompt,
    reward_origin,
)
from resrl_analysis.probes.runner import main as probe_main
from resrl_analysis.results import load_results
from resrl_analysis.runs import discover_run, run_checkpoints

BASE = Path(__file__).resolve().parents[1] / "trainer" / "assets" / "tiny_warmstart"
PAIRS = [(12, 34), (23, 47), (56, 78), (31, 42)]
LIVE = ["--probes", "lld,entropy,interference", "--no-progress", "--groups", "0"]
CHAT = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def multiplication_reward(completions, solution, **kwargs):
    """TRL reward function of the tiny multiplication task: exact match of the stripped answer."""
    return [float(c.strip() == s) for c, s in zip(completions, solution)]


def grpo_run(out: Path, callbacks=(), steps: int = 4):
    """A real TRL GRPOTrainer run on CPU: tiny warm-started model, saves every step, logs completions."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(BASE)
    model = AutoModelForCausalLM.from_pretrained(BASE)
    ds = Dataset.from_dict({"prompt": [f"{a}*{b}=" for a, b in PAIRS], "solution": [str(a * b) for a, b in PAIRS]})
    cfg = GRPOConfig(output_dir=str(out), per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
                     max_steps=steps, save_steps=1, logging_steps=1, log_completions=True, report_to="none",
                     use_cpu=True, learning_rate=1e-3, seed=0, save_only_model=True, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=multiplication_reward, args=cfg, train_dataset=ds,
                          processing_class=tok, callbacks=list(callbacks))
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def trl_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("trl") / "run"
    grpo_run(out)
    return out


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def reference_logp(ckpt: Path, prompt_ids, response_ids) -> float:
    """log π(y|x) by a plain full forward and a per-token gather (the slow reference)."""
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])  # (1, P + R)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), -1)[0]  # (P + R, V)
    p = len(prompt_ids)
    return float(sum(logp[p - 1 + t, tok] for t, tok in enumerate(response_ids)))


# ----------------------------------------------------------------------------- discovery


@pytest.mark.integration
def test_discover_trl_run(trl_run):
    info = discover_run(trl_run, base_model=BASE)
    assert info.kind == "trl" and info.steps == (0, 1, 2, 3, 4) and info.checkpoints[0][1] == BASE
    assert info.checkpoints[-1][1] == trl_run / "checkpoint-4" and info.probes_dir == trl_run / "probes"
    assert [m["step"] for m in info.metrics if "reward" in m] == [1, 2, 3, 4]  # trainer_state.json log_history
    assert [p.name for p in info.probe_set_sources] == [f"completions_{s:05d}.parquet" for s in (1, 2, 3, 4)]
    assert [s for s, _ in run_checkpoints(trl_run)] == [1, 2, 3, 4]  # the Python loader, without a base
    with pytest.raises(ProbeError, match="config.json"):
        discover_run(trl_run, base_model=trl_run / "completions")


@pytest.mark.integration
def test_checkpoint_lists_keep_their_order(trl_run, tmp_path):
    a, c = trl_run / "checkpoint-1", trl_run / "checkpoint-3"
    info = discover_run([a, c], base_model=BASE)
    assert info.kind == "checkpoints" and info.steps == (0, 1, 3) and info.probes_dir == trl_run / "probes"
    x, y = tmp_path / "first", tmp_path / "second"
    shutil.copytree(c, x)
    shutil.copytree(a, y)
    assert discover_run([x, y]).steps == (0, 1)  # no step in the names: the list's order
    assert discover_run([x, y], base_model=BASE).steps == (0, 1, 2)
    with pytest.raises(ProbeError, match="not a checkpoint directory"):
        discover_run([x, tmp_path])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProbeError, match="empty: not a run directory"):
        discover_run(tmp_path / "empty")


# ----------------------------------------------------------------------------- probe sets


@pytest.mark.integration
def test_trl_completions_probe_set(trl_run):
    tok = AutoTokenizer.from_pretrained(BASE)
    f = trl_run / "completions" / "completions_00001.parquet"
    assert detect_format(f) == "trl_completions"
    ps = load_probe_set(f, tok)
    logged = pd.read_parquet(f)
    assert ps.n_groups == logged.prompt.nunique() and ps.n_responses == len(logged) and ps.step == 1
    assert reward_origin(ps) == "as_logged" and "reward = multiplication_reward" in ps.notes
    for g in ps.groups:
        rows = logged[logged.prompt == g.prompt]
        assert list(g.rewards) == rows.multiplication_reward.tolist()  # TRL names the column after the function
        # TRL tokenises a text prompt with the tokenizer's special tokens: exactly one BOS.
        assert g.prompt_ids == tuple(tok(g.prompt)["input_ids"]) and g.prompt_ids.count(tok.bos_token_id) == 1
        assert all(r[-1] == tok.eos_token_id for r in g.response_ids)
    assert load_probe_set(trl_run / "completions", tok).source == str(f)  # a directory: its oldest dump
    assert load_probe_set(trl_run / "completions", tok, step=3).step == 3


@pytest.mark.integration
def test_chat_templated_prompts_get_one_bos(tmp_path):
    tok = AutoTokenizer.from_pretrained(BASE)
    tok.chat_template = CHAT
    bos = tok.bos_token_id
    assert tok("12*3=")["input_ids"][0] == bos  # a tokenizer that adds BOS
    msgs = [{"role": "user", "content": "12*3="}]
    text, templated = render_prompt(tok, msgs)
    assert text.startswith(tok.bos_token) and templated
    once = encode_prompt(tok, text, templated=True)
    assert once.count(bos) == 1 and once[0] == bos
    assert encode_prompt(tok, text) == once  # the rendered string as a dump holds it: still one BOS
    # A conversational TRL log (prompt and completion as message lists) and a verl dump of the rendered text.
    pd.DataFrame({"step": [1, 1], "prompt": [msgs, msgs], "completion": [[{"role": "assistant", "content": "36"}],
                  [{"role": "assistant", "content": "35"}]], "accuracy": [1.0, 0.0], "advantage": [0.7, -0.7]}
                 ).to_parquet(tmp_path / "completions_00001.parquet")
    (tmp_path / "1.jsonl").write_text("".join(json.dumps({"input": text, "output": o, "score": s, "step": 1}) + "\n"
                                              for o, s in (("36", 1.0), ("35", 0.0))))
    (tmp_path / "user.jsonl").write_text(json.dumps({"prompt": text, "responses": ["36", "35"], "rewards": [1, 0]}))
    for f in ("completions_00001.parquet", "1.jsonl", "user.jsonl"):
        g = load_probe_set(tmp_path / f, tok).groups[0]
        assert g.prompt_ids == once, f
        assert g.rewards == (1.0, 0.0) and tok.decode(g.response_ids[0][:-1]) == "36"


@pytest.mark.integration
def test_verl_rollout_dump_rewards(tmp_path):
    tok = AutoTokenizer.from_pretrained(BASE)
    rows = [{"input": "12*3=", "output": "36", "score": 0.0, "gts": "36", "step": 7, "data_source": "multiplication"},
            {"input": "12*3=", "output": "35", "score": 0.0, "gts": "36", "step": 7, "data_source": "multiplication"},
            {"input": "11*2=", "output": "22", "score": 1.0, "gts": "22", "step": 7, "data_source": "multiplication"}]
    (tmp_path / "7.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ps = load_probe_set(tmp_path, tok)
    assert ps.step == 7 and ps.n_groups == 2 and ps.n_mixed == 0
    assert ps.groups[0].rewards == (0.0, 0.0) and reward_origin(ps) == "as_logged"  # what the run optimised
    ps = load_probe_set(tmp_path, tok, rescore=True)
    assert ps.n_mixed == 1 and ps.groups[0].rewards == (1.0, 0.0)  # --rescore: recomputed from the ground truth
    assert reward_origin(ps) == "recomputed" and "exact_match_reward" in ps.notes[0] and "--rescore" in ps.notes[0]
    for r in rows:
        del r["gts"]
    rows[0]["uid"] = rows[1]["uid"] = "a"
    rows[2]["uid"] = "b"
    (tmp_path / "7.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ps = load_probe_set(tmp_path / "7.jsonl", tok)
    assert ps.groups[0].rewards == (0.0, 0.0) and reward_origin(ps) == "as_logged"  # no ground truth: as logged
    assert [g.prompt_uid for g in ps.groups] == ["a", "b"]
    (tmp_path / "7.jsonl").write_text('{"input": "x", "output": 3, "score": 1}\n')
    with pytest.raises(ProbeError, match=r"7\.jsonl:1: fields 'input' and 'output'"):
        load_probe_set(tmp_path / "7.jsonl", tok)
    (tmp_path / "8.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(ProbeError, match=r"8\.jsonl:1: unknown probe-set format"):
        load_probe_set(tmp_path / "8.jsonl", tok)


@pytest.mark.integration
def test_dataset_layouts_are_sampled_and_scored(tmp_path, one_thread):
    from resrl_analysis.rewards import exact_match_reward

    tok = AutoTokenizer.from_pretrained(BASE)
    tok.chat_template = CHAT
    model = AutoModelForCausalLM.from_pretrained(BASE).eval()
    verl = pd.DataFrame({"data_source": ["multiplication"] * 2,
                         "prompt": [[{"role": "user", "content": f"{a}*{b}="}] for a, b in PAIRS[:2]],
                         "reward_model": [{"style": "rule", "ground_truth": str(a * b)} for a, b in PAIRS[:2]]})
    verl.to_parquet(tmp_path / "train.parquet")
    (tmp_path / "trl.jsonl").write_text("".join(json.dumps({"prompt": f"{a}*{b}=", "answer": str(a * b)}) + "\n"
                                                for a, b in PAIRS[:2]))
    assert detect_format(tmp_path / "train.parquet") == "dataset"
    with pytest.raises(ProbeError, match="base model"):
        load_probe_set(tmp_path / "train.parquet", tok)
    state = torch.get_rng_state()
    ps = load_probe_set(tmp_path / "train.parquet", tok, model=model, n_samples=4, max_new_tokens=6)
    assert torch.equal(torch.get_rng_state(), state)  # sampling leaves the global RNG as it was
    assert ps.n_groups == 2 and all(g.n_responses == 4 for g in ps.groups) and reward_origin(ps) == "recomputed"
    for g in ps.groups:
        assert g.prompt_ids.count(tok.bos_token_id) == 1 and g.prompt_ids[0] == tok.bos_token_id
        assert g.rewards == tuple(exact_match_reward(t, g.ground_truth) for t in g.responses)
    again = load_probe_set(tmp_path / "train.parquet", tok, model=model, n_samples=4, max_new_tokens=6)
    assert [g.response_ids for g in again.groups] == [g.response_ids for g in ps.groups]  # seeded
    trl = from_dataset(tmp_path / "trl.jsonl", tok, model, answer_column="answer", n_samples=2, max_new_tokens=6)
    assert [g.ground_truth for g in trl.groups] == [str(a * b) for a, b in PAIRS[:2]]
    assert [g.prompt_ids for g in trl.groups] == [tuple(tok(f"{a}*{b}=")["input_ids"]) for a, b in PAIRS[:2]]


# ----------------------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_resrl_probe_and_figures_on_a_trl_run(trl_run, tmp_path):
    parquet = trl_run / "completions" / "completions_00001.parquet"
    proc = _cli("probe", str(trl_run), "--base-model", str(BASE), "--probe-set", str(parquet), *LIVE)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((trl_run / "probes" / "summary.json").read_text())
    assert summary["mode"] == "trl" and [c["step"] for c in summary["checkpoints"]] == [0, 1, 2, 3, 4]
    lld = load_results(trl_run / "probes")["lld"].deltas
    vs0 = lld[lld.comparison == "vs_initial"]
    assert sorted(vs0.step_to.unique()) == [1, 2, 3, 4] and set(vs0.step_from) == {0}
    assert sorted(lld[lld.comparison == "step_to_step"].step_to.unique()) == [1, 2, 3, 4]
    # Δ(x) at the last checkpoint against a plain forward of the base model and of checkpoint-4.
    ps = load_probe_set(parquet, AutoTokenizer.from_pretrained(BASE))
    g = next(g for g in ps.groups if g.n_positive)
    pos = [r for r, ok in zip(g.response_ids, g.is_positive) if ok]
    want = sum(reference_logp(trl_run / "checkpoint-4", g.prompt_ids, r) - reference_logp(BASE, g.prompt_ids, r)
               for r in pos) / len(pos)
    got = vs0[(vs0.step_to == 4) & (vs0.group_id == g.group_id)].delta_pos_sum.item()
    assert got == pytest.approx(want, abs=1e-4)
    figs = tmp_path / "figs"
    proc = _cli("figures", str(trl_run), "--out", str(figs), "--only", "lld_over_steps,training_dynamics",
                "--formats", "png")
    assert proc.returncode == 0, proc.stderr
    assert (figs / "lld_over_steps.png").stat().st_size > 1000 and (figs / "training_dynamics.png").is_file()


@pytest.mark.integration
def test_trl_run_defaults_to_its_completion_log_and_takes_lists(trl_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert probe_main([str(trl_run), "--base-model", str(BASE), "--out", str(out), "--steps", "0,4", *LIVE]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["probe_set"]["source"].endswith("completions_00001.parquet")
    assert [c["step"] for c in summary["checkpoints"]] == [0, 4]
    a, b = trl_run / "checkpoint-2", trl_run / "checkpoint-4"
    for form in ([str(a), str(b)], ["--checkpoints", f"{a},{b}"]):
        assert probe_main([*form, "--base-model", str(BASE), "--out", str(out), *LIVE]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["mode"] == "checkpoints" and [c["step"] for c in summary["checkpoints"]] == [0, 2, 4]
    # issue 24's probes on a TRL run's checkpoints and completion log
    assert probe_main([str(trl_run), "--base-model", str(BASE), "--out", str(out), "--steps", "0,4", "--probes",
                       "entropy_dynamics,flips", "--no-progress", "--groups", "0"]) == 0
    r = load_results(out)
    assert sorted(r["entropy_dynamics"].groups.step.unique()) == [0, 4] and len(r["flips"].counts)
    # Without --base-model a TRL run has no step 0: LLD is measured against its first checkpoint.
    assert probe_main([str(trl_run), "--out", str(out), *LIVE]) == 0
    d = load_results(out)["lld"].deltas
    assert set(d[d.comparison == "vs_initial"].step_from) == {1}
    assert probe_main([str(trl_run / "checkpoint-1"), "--base-model", str(trl_run / "nope"), *LIVE]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("resrl probe: error: ") and "nope" in err and "\n" not in err


@pytest.mark.e2e
def test_verl_shaped_directory(tmp_path, one_thread):
    run = tmp_path / "verl"
    tok = AutoTokenizer.from_pretrained(BASE)
    for step in (1, 2):
        m = AutoModelForCausalLM.from_pretrained(BASE)
        with torch.no_grad():
            m.lm_head.weight.add_(0.05 * step * torch.randn(m.lm_head.weight.shape,
                                                            generator=torch.Generator().manual_seed(step)))
        hf = run / f"global_step_{step}" / "actor" / "huggingface"
        m.save_pretrained(hf)
        tok.save_pretrained(hf)
    (run / "global_step_3" / "actor").mkdir(parents=True)  # an FSDP shard checkpoint, not merged yet
    dump = tmp_path / "rollout_data" / "1.jsonl"
    dump.parent.mkdir()
    dump.write_text("".join(json.dumps({"input": f"{a}*{b}=", "output": o, "score": 0.0, "gts": str(a * b), "step": 1,
                                        "data_source": "multiplication"}) + "\n"
                            for a, b in PAIRS[:2] for o in (str(a * b), str(a * b + 1))))
    proc = _cli("probe", str(run), "--base-model", str(BASE), "--probe-set", str(dump.parent), *LIVE)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    actor = run / "global_step_3" / "actor"
    assert f"python -m verl.model_merger merge --backend fsdp --local_dir {actor} --target_dir {actor}/huggingface" \
        in proc.stderr
    shutil.rmtree(run / "global_step_3")
    with_entropy = [LIVE[0], LIVE[1] + ",entropy_dynamics,flips", *LIVE[2:]]
    proc = _cli("probe", str(run), "--base-model", str(BASE), "--probe-set", str(dump.parent), "--rescore",
                *with_entropy)
    assert proc.returncode == 0, proc.stderr
    assert "--rescore: the logged reward replaced" in proc.stdout + proc.stderr
    r = load_results(run / "probes")
    ed, fl = r["entropy_dynamics"], r["flips"]  # issue 24's probes on a verl run
    assert sorted(ed.groups.step.unique()) == [0, 1, 2] and ed.tokens.actual_head.notna().any()
    assert sorted(fl.counts.step_to.unique()) == [1, 2] and fl.counts.n_tokens.sum() > 0
    vs0 = r["lld"].deltas[r["lld"].deltas.comparison == "vs_initial"]
    assert sorted(vs0.step_to.unique()) == [1, 2] and vs0.delta_pos_sum.notna().all()
    assert r["scores"].meta["probe_set"]["n_mixed"] == 2  # --rescore: recomputed from gts, one right, one wrong
    g = load_probe_set(dump, tok).groups[0]
    assert g.prompt_ids.count(tok.bos_token_id) == 1
    proc = _cli("figures", str(run), "--out", str(tmp_path / "figs"), "--only", "lld_over_steps", "--formats", "png")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "figs" / "lld_over_steps.png").is_file()


@pytest.mark.integration
def test_cli_samples_a_dataset_probe_set_with_the_first_checkpoint(trl_run, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}*{b}=", "solution": str(a * b), "data_source": "multiplication"})
                            + "\n" for a, b in PAIRS))
    out = tmp_path / "out"
    assert probe_main([str(BASE), str(trl_run / "checkpoint-4"), "--probe-set", str(data), "--samples", "4",
                       "--max-new-tokens", "6", "--out", str(out), *LIVE]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [c["step"] for c in summary["checkpoints"]] == [0, 1]  # BASE has no step in its name: list order
    assert summary["probe_set"]["n_responses"] == 16
    assert "rewards: recomputed with exact_match_reward" in summary["probe_set"]["notes"]


@pytest.mark.integration
def test_our_run_directory_with_damaged_metrics_is_still_probed(tmp_path):
    for s in (0, 5):
        (tmp_path / "checkpoints" / f"step_{s:06d}").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "reward/mea\n')
    info = discover_run(tmp_path)
    assert info.kind == "resrl" and info.steps == (0, 5) and info.probes_dir == tmp_path / "probes"
    assert info.metrics == () and "metrics.jsonl:2: bad JSON" in info.notes[0]
    with pytest.raises(ProbeError, match="already has a step-0 checkpoint"):
        discover_run(tmp_path, base_model=BASE)
