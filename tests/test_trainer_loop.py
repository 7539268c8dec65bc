"""Integration tests of the training loop on a tiny random model (CPU, seconds each).

Micro-batch invariance, exact resume, checkpoint atomicity, metrics after resume, the rollout dump schema,
non-finite steps, bad data, and the FSDP2 code path in one process.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_runner import FAST, train_easy

import trainer.checkpointing as checkpointing
import trainer.loop as loop
from resrl_analysis.distributed import DistContext
from resrl_analysis.forward import pack_rows, response_forward
from trainer.checkpointing import CheckpointError, latest_checkpoint
from trainer.config import TrainConfig
from trainer.loop import SetupError, TrainingDiverged, train
from trainer.metrics_log import METRIC_KEYS, ROLLOUT_FIELDS, read_metrics
from trainer.models import build_tiny_model
from trainer.rollout import ScoredBatch
from trainer.tasks import DataError

pytestmark = pytest.mark.integration


def cfg_for(out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**FAST, "output_dir": str(out), **kw})


def params_of(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        scale = max(float(a[k].abs().max()), 1e-3)
        assert float((a[k] - b[k]).abs().max()) <= rtol * scale + 1e-7, k


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted ResRL run: 4 steps, checkpoints at 0, 2, 4."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train_easy(cfg_for(out, algorithm="resrl", steps=4, save_every=2))
    return out


# ------------------------------------------------------------------------------------ micro-batch invariance


def _synthetic_minibatch(model: torch.nn.Module, B: int = 8) -> ScoredBatch:
    g = torch.Generator().manual_seed(0)
    tp, tr = 6, 7
    plen = torch.randint(2, tp + 1, (B,), generator=g)
    rlen = torch.randint(1, tr + 1, (B,), generator=g)
    pmask = torch.arange(tp)[None] >= (tp - plen)[:, None]  # left padded
    rmask = torch.arange(tr)[None] < rlen[:, None]  # right padded
    pids = torch.randint(4, 100, (B, tp), generator=g).masked_fill(~pmask, 0)
    rids = torch.randint(4, 100, (B, tr), generator=g).masked_fill(~rmask, 0)
    with torch.no_grad():
        lp = response_forward(model, pack_rows(pids, pmask, rids, rmask)).logp
    old = torch.zeros(B, tr)
    old[:, : lp.shape[1]] = lp + 0.3 * torch.randn(lp.shape, generator=g)  # off-policy: clipping is active
    adv = torch.randn(B, tr, generator=g).masked_fill(~rmask, 0.0)
    return ScoredBatch(prompt_ids=pids, prompt_mask=pmask, response_ids=rids, response_mask=rmask,
                    finished=torch.ones(B, dtype=torch.bool), group_ids=torch.arange(B) // 4,
                    rewards=torch.zeros(B), old_logp=old, advantages=adv[:, 0], token_advantages=adv,
                    ref_logp=old - 0.1)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_update_does_not_depend_on_micro_batch_size(mode):
    base = build_tiny_model(seed=0, num_hidden_layers=2)
    mb = _synthetic_minibatch(base)
    ctx = DistContext.single(torch.device("cpu"))
    results = {}
    for micro, tokens in [(8, 0), (1, 0), (2, 0), (3, 0), (4, 0), (0, 40)]:
        model = copy.deepcopy(base)
        cfg = TrainConfig(**{**FAST, "loss_agg_mode": mode, "micro_batch_size": micro or 8,
                             "micro_batch_tokens": tokens, "kl_coef": 0.05, "entropy_coef": 0.01})
        # SGD with lr 1: the parameter change *is* the accumulated gradient. (Adam's first step,
        # ≈ lr·sign(g), would magnify float round-off on gradients that are ~0 into ~lr.)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        n_micro = len(loop.micro_slices(mb, cfg))
        out = loop.optimizer_step(model, opt, sched, mb, cfg, ctx)
        assert out["finite"] and out["metrics"]["actor/pg_clipfrac"] > 0
        results[(micro, tokens, n_micro)] = ({k: v.detach().clone() for k, v in model.state_dict().items()},
                                             out["metrics"])
    (ref_params, ref_metrics), *others = results.values()
    moved = max(float((ref_params[k] - v).abs().max()) for k, v in base.state_dict().items())
    assert moved > 1e-3  # the update is not trivial
    for params, metrics in others:
        assert_same_params(ref_params, params)
        for key in ("actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/entropy", "actor/kl",
                    "actor/grad_norm"):
            assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5, abs=1e-7), key
    assert {k[2] for k in results} >= {1, 3, 8}  # the token budget split the batch too


# ------------------------------------------------------------------------------------ resume, checkpoints, metrics


class _Crash(Exception):
    pass


def test_interrupted_and_resumed_run_equals_uninterrupted(reference_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_log = loop.MetricsLog.log

    def log_then_crash(self, metrics):
        real_log(self, metrics)
        if metrics["step"] == 3:
            raise _Crash  # after step 3 is logged, before the step-4 checkpoint

    monkeypatch.setattr(loop.MetricsLog, "log", log_then_crash)
    with pytest.raises(_Crash):
        train_easy(cfg_for(run, algorithm="resrl", steps=4, save_every=2))
    monkeypatch.setattr(loop.MetricsLog, "log", real_log)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    # Crash debris: a half-written checkpoint and a hand-made directory without trainer state.
    debris = run / "checkpoints" / ".tmp-step_000004-abc"
    debris.mkdir()
    (debris / "model.safetensors").write_bytes(b"garbage")
    (run / "checkpoints" / "step_000009").mkdir()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "reward/me')  # a torn line
    assert latest_checkpoint(run)[0] == 2

    train_easy(cfg_for(run, algorithm="resrl", steps=4, save_every=2, resume=True))

    assert not debris.exists()
    assert_same_params(params_of(reference_run, 4), params_of(run, 4))
    lines = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4  # the torn line is gone too
    ref_lines = read_metrics(reference_run / "metrics.jsonl")
    for a, b in zip(ref_lines, lines):
        for key in ("reward/mean", "actor/pg_loss", "actor/grad_norm", "resrl/weight_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    # ScoredBatch of the resumed part are identical too.
    assert (run / "rollouts" / "step_000004.jsonl").read_text() == (
        reference_run / "rollouts" / "step_000004.jsonl").read_text()


def test_resume_to_a_larger_step_count_continues(reference_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    # A resume may lower the learning rate (what the divergence message advises); nothing else may change.
    train_easy(cfg_for(run, algorithm="resrl", steps=6, save_every=2, resume=True, lr=1e-4))
    assert [s for s, _ in checkpointing.list_checkpoints(run)] == [0, 2, 4, 6]
    lines = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in lines] == list(range(1, 7))
    assert [r["actor/lr"] for r in lines] == [FAST["lr"]] * 4 + [1e-4] * 2
    assert_same_params(params_of(reference_run, 4), params_of(run, 4))


def test_crash_while_writing_a_checkpoint_leaves_earlier_ones_intact(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_save = checkpointing.torch.save

    def failing_save(obj, path, *a, **kw):
        if "step_000002" in str(path):
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(checkpointing.torch, "save", failing_save)
    with pytest.raises(CheckpointError, match="No space left on device; earlier checkpoints are intact"):
        train_easy(cfg_for(run, algorithm="grpo", steps=2, save_every=2))
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_000000"]  # no partial step_000002, no .tmp debris
    monkeypatch.setattr(checkpointing.torch, "save", real_save)
    train_easy(cfg_for(run, algorithm="grpo", steps=2, save_every=2, resume=True))
    assert [s for s, _ in checkpointing.list_checkpoints(run)] == [0, 2]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]


def test_run_directory_guards(reference_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    with pytest.raises(SetupError, match="already holds a run; pass --resume"):
        train_easy(cfg_for(run, algorithm="resrl", steps=4, save_every=2))
    with pytest.raises(SetupError, match=r"settings differ .*algorithm \('resrl' → 'grpo'\)"):
        train_easy(cfg_for(run, algorithm="grpo", steps=4, save_every=2, resume=True))
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with pytest.raises(SetupError, match="cannot write to the output directory"):
        train_easy(cfg_for(blocked / "run", steps=1))


def test_checkpoints_load_with_auto_classes(reference_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ck = reference_run / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step_000000", "step_000002", "step_000004"]
    model = AutoModelForCausalLM.from_pretrained(ck / "step_000004")
    tok = AutoTokenizer.from_pretrained(ck / "step_000004")
    assert tok.decode(tok("12*34=")["input_ids"], skip_special_tokens=True) == "12*34="
    assert model.config.architectures == ["Qwen3ForCausalLM"]
    # step_000000 is the starting policy
    start = build_tiny_model(seed=0)
    assert_same_params(start.state_dict(), params_of(reference_run, 0), rtol=0)
    state = checkpointing.load_trainer_state(ck / "step_000002")
    assert state["step"] == 2 and state["data_position"] == 8 and "optimizer" in state and "rng" in state
    yaml_cfg = (reference_run / "config.yaml").read_text()
    assert "algorithm: resrl" in yaml_cfg and "resrl_layer: penultimate" in yaml_cfg


def test_metrics_keys(reference_run):
    lines = read_metrics(reference_run / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    for r in lines:
        assert set(METRIC_KEYS) <= set(r)
        assert 0 <= r["reward/mean"] <= 1 and r["train/skipped_steps"] == 0
        assert r["timing/step_s"] > 0 and r["perf/tokens_per_s"] > 0 and r["actor/lr"] == FAST["lr"]
        assert 0.1 <= r["resrl/weight_q10"] <= r["resrl/weight_q50"] <= r["resrl/weight_q90"] <= 1
        assert r["nthr/downweighted_frac"] is None


def test_rollout_dump_schema(reference_run):
    files = sorted(p.name for p in (reference_run / "rollouts").iterdir())
    assert files == ["step_000000.jsonl", "step_000002.jsonl", "step_000004.jsonl"]
    rows = [json.loads(line) for line in (reference_run / "rollouts" / "step_000002.jsonl").read_text().splitlines()]
    assert len(rows) == FAST["prompts_per_step"] * FAST["n"]
    assert [r["group_id"] for r in rows] == sorted(r["group_id"] for r in rows)  # groups contiguous
    types = {"step": int, "group_id": int, "prompt_uid": str, "data_source": str, "prompt": str,
             "prompt_ids": list, "response": str, "response_ids": list, "ground_truth": str, "reward": float,
             "is_positive": bool, "finished": bool, "advantage": float, "token_advantages": list,
             "resrl_weights": list, "resrl_residuals": list}
    mixed = 0
    for r in rows:
        assert tuple(r) == ROLLOUT_FIELDS
        for k, t in types.items():
            assert isinstance(r[k], t), k
        assert r["step"] == 2 and r["nthr_weights"] is None and r["nthr_scores"] is None
        n = len(r["response_ids"])
        assert len(r["token_advantages"]) == len(r["resrl_weights"]) == len(r["resrl_residuals"]) == n
        assert r["is_positive"] == (r["reward"] > 0)
        assert r["prompt"].endswith("=") and 0 not in r["prompt_ids"]  # no padding
        for a, w in zip(r["token_advantages"], r["resrl_weights"]):
            assert a == pytest.approx(r["advantage"] * w, rel=1e-5, abs=1e-7)
        if r["is_positive"]:
            assert all(w == 1.0 for w in r["resrl_weights"]) and all(x is None for x in r["resrl_residuals"])
        elif all(x is None for x in r["resrl_residuals"]):  # a group ResRL leaves alone (e.g. < 4 positive tokens)
            assert all(w == 1.0 for w in r["resrl_weights"])
        else:  # a negative of a weighted group
            mixed += 1
            assert r["advantage"] < 0
            assert all(0.1 - 1e-6 <= w <= 1 for w in r["resrl_weights"])
            assert all(isinstance(x, float) and x >= 0 for x in r["resrl_residuals"])
    assert mixed > 0


def test_rollout_dump_token_logprobs_and_entropies_are_the_rollout_policys(reference_run):
    """token_logprobs / token_entropies of every dump equal an independent float64 computation (one unpadded
    row at a time through the checkpoint of the dump's step, log_softmax of logits / temperature), aligned with
    response_ids and rounded to 6 significant digits."""
    from transformers import AutoModelForCausalLM

    cfg = cfg_for(reference_run)
    for step in (0, 2, 4):  # step 4: the final policy's dump, written after the last update
        model = AutoModelForCausalLM.from_pretrained(reference_run / "checkpoints" / f"step_{step:06d}").eval()
        rows = [json.loads(x) for x in (reference_run / "rollouts" / f"step_{step:06d}.jsonl").read_text().splitlines()]
        for r in rows:
            n, p = len(r["response_ids"]), len(r["prompt_ids"])
            assert len(r["token_logprobs"]) == len(r["token_entropies"]) == n
            assert all(v == float(f"{v:.6g}") for v in r["token_logprobs"] + r["token_entropies"])
            with torch.no_grad():
                logits = model(torch.tensor([r["prompt_ids"] + r["response_ids"]])).logits[0, p - 1 : p + n - 1]
            logq = torch.log_softmax(logits.double() / cfg.temperature, dim=-1)  # (n, V)
            want_lp = logq.gather(-1, torch.tensor(r["response_ids"])[:, None]).squeeze(-1)
            want_h = -(logq.exp() * logq).sum(-1)
            assert r["token_logprobs"] == pytest.approx(want_lp.tolist(), rel=1e-4, abs=1e-5), (step, r["group_id"])
            assert r["token_entropies"] == pytest.approx(want_h.tolist(), rel=1e-4, abs=1e-5), (step, r["group_id"])


def test_old_rollout_dumps_without_token_fields_still_read(reference_run, tmp_path):
    """Dumps written before token_logprobs / token_entropies existed: the probe-set reader takes them as before."""
    from resrl_analysis.probe_sets import ProbeSet
    from resrl_analysis.rundir import ROLLOUT_FIELDS_ADDED_LATER

    src = reference_run / "rollouts" / "step_000002.jsonl"
    old = tmp_path / "step_000002.jsonl"
    rows = [json.loads(x) for x in src.read_text().splitlines()]
    old.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in ROLLOUT_FIELDS_ADDED_LATER}) + "\n"
                           for r in rows))
    a, b = ProbeSet.from_rollouts(src), ProbeSet.from_rollouts(old)
    assert [(g.group_id, g.response_ids, g.rewards) for g in a.groups] == [
        (g.group_id, g.response_ids, g.rewards) for g in b.groups]


# ------------------------------------------------------------------------------------ numerics and bad input


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch):
    real = loop.policy_loss
    calls = {"n": 0, "bad": {2}}

    def poisoned(*a, **kw):
        calls["n"] += 1
        out = real(*a, **kw)
        if calls["n"] in calls["bad"]:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(loop, "policy_loss", poisoned)
    run = tmp_path / "one"
    train_easy(cfg_for(run, algorithm="grpo", steps=3, save_every=3))  # one micro-batch per step
    lines = read_metrics(run / "metrics.jsonl")
    assert [r["train/skipped_steps"] for r in lines] == [0, 1, 1]
    assert lines[1]["actor/grad_norm"] is None and lines[2]["actor/grad_norm"] > 0  # NaN is written as null
    # Every step non-finite: five in a row stop the run; the last checkpoint (step 0) stays intact.
    calls.update(n=0, bad=set(range(1, 100)))
    run = tmp_path / "diverged"
    with pytest.raises(TrainingDiverged, match="5 non-finite steps in a row .*last checkpoint .* is intact"):
        train_easy(cfg_for(run, algorithm="grpo", steps=10, save_every=10))
    assert [s for s, _ in checkpointing.list_checkpoints(run)] == [0]
    assert [r["train/skipped_steps"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_bad_data_fails_before_anything_is_written(tmp_path):
    data = tmp_path / "train.jsonl"
    good = {"prompt": "1+1=?", "reward_model": {"ground_truth": "2"}, "data_source": "toy"}
    data.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "2+2=?", "data_source": "toy"}) + "\n")
    run = tmp_path / "run"
    with pytest.raises(DataError, match=r"train.jsonl:2: missing field 'reward_model.ground_truth'"):
        train(cfg_for(run, task="math", train_files=[str(data)]))
    assert not run.exists()
    with pytest.raises(DataError, match="no such file"):
        train(cfg_for(run, task="math", train_files=[str(tmp_path / "missing.jsonl")]))
    assert not run.exists()


def test_math_task_end_to_end_from_jsonl(tmp_path):
    data = tmp_path / "train.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"{a}+{a}="}], "reward_model": {"ground_truth": str(2 * a)},
             "data_source": "toy", "uid": f"u{a}"} for a in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = train(cfg_for(tmp_path / "run", task="math", train_files=[str(data)], algorithm="nthr", steps=1))
    dumped = [json.loads(x) for x in (run / "rollouts" / "step_000000.jsonl").read_text().splitlines()]
    assert {r["data_source"] for r in dumped} == {"toy"} and dumped[0]["prompt_uid"].startswith("u")
    assert dumped[0]["nthr_weights"] is not None and dumped[0]["resrl_weights"] is None


# ------------------------------------------------------------------------------------ model plumbing


def test_hook_capture_matches_output_hidden_states():
    model = build_tiny_model(seed=1, num_hidden_layers=3)
    rows = pack_rows(torch.tensor([[0, 5, 6], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]]).bool(),
                     torch.tensor([[10, 11, 0], [12, 13, 14]]), torch.tensor([[1, 1, 0], [1, 1, 1]]).bool())
    with torch.no_grad():
        fo = response_forward(model, rows, capture={"pen": "penultimate", "head": "head_input", "emb": 0})
        hs = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, position_ids=rows.position_ids,
                   output_hidden_states=True).hidden_states
    sl = slice(rows.input_ids.shape[1] - 4, rows.input_ids.shape[1] - 1)
    torch.testing.assert_close(fo.captured["pen"], hs[-2][:, sl])
    torch.testing.assert_close(fo.captured["head"], hs[-1][:, sl])
    torch.testing.assert_close(fo.captured["emb"], hs[0][:, sl])


def test_fsdp2_single_process_matches_plain_module(tmp_path):
    # The FSDP2 path (one-rank gloo group on CPU) gives the plain module's trajectory, with the KL
    # penalty's reference model (also sharded) in play.
    kw = dict(algorithm="grpo", steps=2, save_every=2, kl_coef=0.05)
    plain = train_easy(cfg_for(tmp_path / "plain", fsdp="off", **kw))
    sharded = train_easy(cfg_for(tmp_path / "fsdp", fsdp="on", **kw))
    assert_same_params(params_of(plain, 2), params_of(sharded, 2), rtol=1e-5)
    assert not torch.distributed.is_initialized()  # the group made for the run is gone
    kl = [r["actor/kl"] for r in read_metrics(plain / "metrics.jsonl")]
    assert kl[0] == pytest.approx(0.0, abs=1e-9) and kl[1] > 0  # π = π_ref before the first update


def test_several_updates_per_rollout_batch_resume_exactly(tmp_path, monkeypatch):
    # 4 prompts, mini-batches of 2, 2 epochs: 4 optimizer steps per rollout batch.
    kw = dict(algorithm="nthr", prompts_per_step=4, mini_batch_size=2, ppo_epochs=2, steps=8, save_every=4)
    full = train_easy(cfg_for(tmp_path / "full", **kw))
    lines = read_metrics(full / "metrics.jsonl")
    assert [r["step"] for r in lines] == list(range(1, 9))
    assert lines[0]["timing/rollout_s"] > 0 and lines[1]["timing/rollout_s"] == 0  # one rollout per 4 steps
    assert lines[0]["reward/mean"] == lines[3]["reward/mean"] != lines[4]["reward/mean"]
    assert sorted(p.name for p in (full / "rollouts").iterdir()) == [
        "step_000000.jsonl", "step_000004.jsonl", "step_000008.jsonl"]
    part = tmp_path / "part"
    real_log = loop.MetricsLog.log

    def log_then_crash(self, metrics):
        real_log(self, metrics)
        if metrics["step"] == 6:
            raise _Crash

    monkeypatch.setattr(loop.MetricsLog, "log", log_then_crash)
    with pytest.raises(_Crash):
        train_easy(cfg_for(part, **kw))
    monkeypatch.setattr(loop.MetricsLog, "log", real_log)
    train_easy(cfg_for(part, resume=True, **kw))
    assert_same_params(params_of(full, 8), params_of(part, 8))
    assert [r["step"] for r in read_metrics(part / "metrics.jsonl")] == list(range(1, 9))


def test_weights_do_not_depend_on_the_no_grad_forward_chunking(tmp_path):
    # The no-grad pass runs in chunks of whole groups; ResRL's weights must not see the chunking.
    a = train_easy(cfg_for(tmp_path / "a", algorithm="resrl", steps=1, logprob_micro_batch_size=3))  # → 1 group
    b = train_easy(cfg_for(tmp_path / "b", algorithm="resrl", steps=1))  # all groups at once
    rows_a = [json.loads(x) for x in (a / "rollouts" / "step_000000.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (b / "rollouts" / "step_000000.jsonl").read_text().splitlines()]
    for ra, rb in zip(rows_a, rows_b):
        assert ra["response_ids"] == rb["response_ids"]
        assert ra["resrl_weights"] == pytest.approx(rb["resrl_weights"], rel=1e-5, abs=1e-6)


def test_validation_metrics(tmp_path):
    run = train_easy(cfg_for(tmp_path / "run", algorithm="psr", steps=2, val_every=2, val_prompts=4, val_n=3))
    lines = read_metrics(run / "metrics.jsonl")
    assert "val/reward_mean" not in lines[0]
    assert 0 <= lines[1]["val/reward_mean"] <= lines[1]["val/pass@3"] <= 1
