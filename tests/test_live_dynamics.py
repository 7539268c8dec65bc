"""The trainer's live entropy/*, flips/* and drift/* metrics (trainer/update_dynamics.py, trainer/watch.py) against
direct computations, and in a real run (metrics.jsonl and TensorBoard)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from trainer_runner import FAST, EasyTask

import trainer.loop as loop
from resrl_analysis.distributed import DistContext
from resrl_analysis.entropy_dynamics import predict_entropy_change
from resrl_analysis.forward import pack_rows, response_forward
from resrl_analysis.interference import group_grams
from trainer.config import ConfigError, TrainConfig
from trainer.in_batch import AfterUpdate, RolloutChunk
from trainer.metrics_log import read_metrics
from trainer.models import build_tiny_model
from trainer.rollout import ScoredBatch
from trainer.update_dynamics import entropy_metrics, entropy_prediction, flips_metrics
from trainer.watch import DRIFT_MIN_HISTORY, HeadJumps, Watch, drift_norms, param_copy

CTX = DistContext.single(torch.device("cpu"))


def _batch(seed: int = 0) -> ScoredBatch:
    g = torch.Generator().manual_seed(seed)
    B, Tp, Tr = 8, 3, 6
    prompt = torch.randint(4, 30, (B, Tp), generator=g)
    resp = torch.randint(4, 9, (B, Tr), generator=g)  # a small alphabet: identical tokens across responses
    resp[1, :3] = resp[0, :3]  # a negative sharing a positive's prefix
    rmask = torch.ones(B, Tr, dtype=torch.bool)
    rmask[1, 4:] = False
    rmask[6, 3:] = False
    return ScoredBatch(prompt_ids=prompt, prompt_mask=torch.ones(B, Tp, dtype=torch.bool), response_ids=resp,
                       response_mask=rmask, finished=torch.ones(B, dtype=torch.bool),
                       group_ids=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]),
                       rewards=torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0]),
                       old_logp=torch.zeros(B, Tr), advantages=torch.zeros(B),
                       token_advantages=torch.randn(B, Tr, generator=g) * rmask)


@pytest.mark.integration
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_hook_is_each_groups_own_prediction(temperature):
    model = build_tiny_model(seed=0).eval()
    data = _batch()
    rows = pack_rows(data.prompt_ids, data.prompt_mask, data.response_ids, data.response_mask)
    with torch.no_grad():
        fo = response_forward(model, rows, temperature=temperature, capture={"head_input": "head_input"},
                              return_logits=True)
    cfg = TrainConfig(temperature=temperature)
    got = entropy_prediction(RolloutChunk(fo, rows, data.token_advantages, data.rewards, data.group_ids, cfg))
    for g in (0, 1):  # each group alone, sliced out of the batch
        r = (data.group_ids == g).nonzero().flatten()
        h, z = fo.captured["head_input"][r], fo.logits[r]
        gr = group_grams(h, z, data.response_ids[r], data.response_mask[r], data.rewards[r] > 0,
                         temperature=temperature, entropy=True)
        split = predict_entropy_change(gr, data.token_advantages[r][gr.row, gr.pos], lr=1 / temperature**2)
        torch.testing.assert_close(got["entropy_pred_pos"][r][gr.row, gr.pos], split.from_pos.float())
        torch.testing.assert_close(got["entropy_pred_neg"][r][gr.row, gr.pos], split.from_neg.float())
    assert not got["entropy_pred_pos"][~data.response_mask].any()


def _after(data: ScoredBatch, seed: int = 1) -> AfterUpdate:
    g = torch.Generator().manual_seed(seed)
    m = data.response_mask
    data.old_logp = torch.log(torch.rand(m.shape, generator=g).clamp(0.02, 1.0)) * m
    data.entropy = torch.rand(m.shape, generator=g) * m
    data.live = {"entropy_pred_pos": torch.randn(m.shape, generator=g) * m,
                 "entropy_pred_neg": torch.randn(m.shape, generator=g) * m}
    logp = (data.old_logp + 0.2 * torch.randn(m.shape, generator=g)) * m
    ent = (data.entropy + 0.1 * torch.randn(m.shape, generator=g)) * m
    return AfterUpdate(data=data, logp=logp, entropy=ent, scored=torch.ones(data.num_rows, dtype=torch.bool))


@pytest.mark.unit
def test_entropy_metrics_equal_a_direct_computation():
    after = _after(_batch())
    d, m = after.data, after.data.response_mask
    got = entropy_metrics(after, TrainConfig(), CTX)
    h0, h1 = d.entropy[m].double().numpy(), after.entropy[m].double().numpy()
    dh, pos = h1 - h0, (d.rewards > 0)[:, None].expand_as(m)[m].numpy()
    lp, a = d.old_logp[m].double().numpy(), d.token_advantages[m].double().numpy()
    c = (a - a.mean()) * (lp - lp.mean())
    pp, pn = d.live["entropy_pred_pos"][m].double().numpy(), d.live["entropy_pred_neg"][m].double().numpy()
    want = {"entropy/before_mean": h0.mean(), "entropy/after_mean": h1.mean(), "entropy/delta_mean": dh.mean(),
            "entropy/delta_pos_mean": dh[pos].mean(), "entropy/delta_neg_mean": dh[~pos].mean(),
            "entropy/cov": c.mean(), "entropy/cov_rank_corr": stats.spearmanr(-c, dh).statistic,
            "entropy/pred_from_pos": pp.mean(), "entropy/pred_from_neg": pn.mean(),
            "entropy/pred_mean": (pp + pn).mean(),
            "entropy/pred_rank_corr": stats.spearmanr(pp + pn, dh).statistic}
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(float(v), abs=1e-12), k


@pytest.mark.unit
def test_entropy_metrics_without_entropies_or_predictions_are_none():
    after = _after(_batch())
    after.data.live = {}
    got = entropy_metrics(after, TrainConfig(), CTX)
    assert got["entropy/pred_from_pos"] is None and got["entropy/delta_mean"] is not None
    after.entropy = None
    assert all(v is None for v in entropy_metrics(after, TrainConfig(), CTX).values())


@pytest.mark.unit
def test_flips_metrics_equal_a_count():
    after = _after(_batch())
    d, m = after.data, after.data.response_mask
    got = flips_metrics(after, TrainConfig(), CTX)
    rose, fell = (after.logp > d.old_logp) & m, (after.logp < d.old_logp) & m
    pos = (d.rewards > 0)[:, None] & m
    assert got["flips/rose_frac"] == pytest.approx(float(rose.sum() / m.sum()))
    assert got["flips/fell_frac"] == pytest.approx(float(fell.sum() / m.sum()))
    assert got["flips/pos_rose_frac"] == pytest.approx(float((rose & pos).sum() / pos.sum()))
    assert got["flips/neg_fell_frac"] == pytest.approx(float((fell & ~pos & m).sum() / (~pos & m).sum()))
    p = d.old_logp.exp()
    top = m & (p >= 0.9)
    assert got["flips/rose_frac_conf9"] == pytest.approx(float((rose & top).sum() / top.sum()))
    assert got["flips/coupled_low_pairs"] >= 0 and "flips/other_low_same_dir_frac" in got


@pytest.mark.unit
def test_head_jumps_need_a_history_and_a_factor():
    j = HeadJumps(factor=3.0, window=4)
    seen = [j.observe(x) for x in (1.0, 1.0, 1.0, 1.0, 2.9, 3.5, 1.0)]
    assert [s[1] for s in seen] == [False, False, False, False, False, True, False]
    assert seen[3][0] is None and seen[4][0] == 1.0  # no level before min(DRIFT_MIN_HISTORY, window) values
    assert len(j.history) == 4 and DRIFT_MIN_HISTORY == 5
    short = HeadJumps(factor=2.0, window=2)
    assert [short.observe(x)[1] for x in (1.0, 1.0, 5.0)] == [False, False, True]


class _Log:
    def __init__(self):
        self.lines: list[str] = []

    def info(self, msg: str) -> None:
        self.lines.append(msg)


@pytest.mark.integration
def test_drift_watch_measures_head_and_body_and_warns_on_a_jump(tmp_path):
    model = build_tiny_model(seed=0)
    cfg = TrainConfig(drift_jump_factor=4.0, drift_window=10, blowup_param_ratio=0)
    log = _Log()
    watch = Watch(cfg, tmp_path, CTX, log)  # type: ignore[arg-type]
    head = model.get_output_embeddings().weight
    out = []
    for k, f in enumerate([1e-3] * 6 + [2e-2, 1e-3]):
        before = param_copy(model)
        with torch.no_grad():
            head.mul_(1 + f)
            for p in model.model.parameters():
                p.mul_(1 + 1e-3)
        out.append(watch.observe(k + 1, True, {"actor/lr": 1e-4}, model, before))
    assert out[0]["drift/head_rel_update"] == pytest.approx(1e-3, rel=1e-4)
    assert out[0]["drift/body_rel_update"] == pytest.approx(1e-3, rel=1e-4)
    assert out[0]["drift/head_body_ratio"] == pytest.approx(1.0, rel=1e-4)
    assert out[4]["drift/head_rel_level"] is None and out[5]["drift/head_rel_level"] == pytest.approx(1e-3, rel=1e-4)
    assert [o["drift/head_jumps"] for o in out] == [0] * 6 + [1, 1]
    warned = [x for x in log.lines if "LM head drift" in x]
    assert len(warned) == 1 and warned[0].startswith("step 7: warning")
    assert "actor/update_norm" not in out[0] and out[0]["train/blowup_steps"] == 0  # drift alone is no blow-up
    d = drift_norms(model, param_copy(model), CTX)
    assert d.head_update == 0 and d.body_update == 0


@pytest.mark.unit
def test_config_checks_the_drift_and_flips_settings():
    for bad in ({"drift_jump_factor": 1.0}, {"drift_window": 0}, {"flips_low_confidence": 0.0}):
        with pytest.raises(ConfigError):
            TrainConfig(**bad)
    from trainer.config import preset_config

    paper = preset_config("qwen3-1.7b-math", model="/m", train_files=["t.parquet"])
    assert not (paper.entropy_in_batch or paper.flips_in_batch or paper.drift_watch or paper.entropy_predict_in_batch)


@pytest.mark.e2e
def test_a_run_logs_every_live_key_to_metrics_and_tensorboard(tmp_path):
    from test_loggers import tb_scalars

    cfg = TrainConfig(**{**FAST, "output_dir": str(tmp_path / "run"), "steps": 2, "save_every": 2,
                         "report_to": ["tensorboard"], "algorithm": "grpo"})
    run = loop.train(cfg, task=EasyTask())
    lines = read_metrics(run / "metrics.jsonl")
    live = [k for k in lines[0] if k.split("/")[0] in ("entropy", "flips", "drift")]
    assert len(live) == 11 + 22 + 5
    for k in ("entropy/delta_mean", "entropy/pred_from_neg", "flips/rose_frac", "drift/head_rel_update"):
        assert all(r[k] is not None for r in lines), k
    tb = tb_scalars(run / "tb")
    assert [s for s, _ in tb["entropy/delta_mean"]] == [1, 2]
    assert np.allclose([v for _, v in tb["flips/rose_frac"]], [r["flips/rose_frac"] for r in lines])
