"""The shared after-update forward of the live update diagnostics (trainer/in_batch.py) and the token classes of
a group (resrl_analysis/displacement.py: shared / first divergent / after), against slow references."""

from __future__ import annotations

import random

import pytest
import torch

from resrl_analysis.displacement import AFTER, FIRST_DIVERGENT, SHARED, token_classes
from resrl_analysis.distributed import DistContext
from resrl_analysis.forward import pack_rows, response_forward
from trainer.config import TrainConfig
from trainer.in_batch import (
    UPDATE_DIAGNOSTICS,
    UpdateDiagnostic,
    after_update,
    needs_rollout_entropy,
    register_update_diagnostic,
    update_metrics,
)
from trainer.models import build_tiny_model
from trainer.rollout import ScoredBatch


def _slow_classes(rows: list[list[int]], rewards: list[float], groups: list[int], width: int) -> list[list[int]]:
    """Per token, by plain Python: shared iff some response of the other polarity in the group starts with the
    same tokens through t; then the first unshared token, then the rest."""
    out = []
    for i, r in enumerate(rows):
        others = [rows[j] for j in range(len(rows)) if groups[j] == groups[i] and (rewards[j] > 0) != (rewards[i] > 0)]
        if not others:
            out.append([0] * width)
            continue
        shared = [any(len(o) > t and o[: t + 1] == r[: t + 1] for o in others) for t in range(len(r))]
        d = sum(shared)
        assert shared == [True] * d + [False] * (len(r) - d)  # shared positions are a prefix
        out.append([SHARED] * d + ([FIRST_DIVERGENT] if d < len(r) else []) + [AFTER] * max(0, len(r) - d - 1)
                   + [0] * (width - len(r)))
    return out


@pytest.mark.unit
@pytest.mark.parametrize("seed", range(5))
def test_token_classes_against_a_slow_reference(seed):
    rnd = random.Random(seed)
    rows, rewards, groups = [], [], []
    for g in range(4):
        stem = [rnd.randint(3, 6) for _ in range(4)]
        for _ in range(rnd.randint(1, 5)):
            cut = rnd.randint(0, 4)
            rows.append(stem[:cut] + [rnd.randint(3, 6) for _ in range(rnd.randint(1, 4))])
            rewards.append(float(rnd.random() < 0.5))
            groups.append(g)
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    got = token_classes(ids, mask, torch.tensor(rewards), torch.tensor(groups))
    assert got.tolist() == _slow_classes(rows, rewards, groups, width)


def _batch(model) -> ScoredBatch:
    g = torch.Generator().manual_seed(0)
    B, Tp, Tr = 6, 3, 5
    prompt = torch.randint(4, 30, (B, Tp), generator=g)
    resp = torch.randint(4, 30, (B, Tr), generator=g)
    rmask = torch.ones(B, Tr, dtype=torch.bool)
    rmask[1, 3:] = False
    rmask[4, 2:] = False
    data = ScoredBatch(prompt_ids=prompt, prompt_mask=torch.ones(B, Tp, dtype=torch.bool), response_ids=resp,
                       response_mask=rmask, finished=torch.ones(B, dtype=torch.bool),
                       group_ids=torch.tensor([0, 0, 0, 1, 1, 1]), rewards=torch.tensor([1.0, 0.0, 1.0, 0, 0, 0]),
                       old_logp=torch.zeros(B, Tr), advantages=torch.zeros(B), token_advantages=torch.zeros(B, Tr))
    return data


def _direct(model, data: ScoredBatch, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    packed = pack_rows(data.prompt_ids[row : row + 1], data.prompt_mask[row : row + 1],
                       data.response_ids[row : row + 1], data.response_mask[row : row + 1])
    with torch.no_grad():
        fo = response_forward(model.eval(), packed, entropy=True)
    n = int(data.response_mask[row].sum())
    return fo.logp[0, :n], fo.entropy[0, :n]


@pytest.mark.integration
def test_after_update_scores_every_row_and_keeps_lld_rows_as_they_were():
    model, ctx, cfg = build_tiny_model(seed=0), DistContext.single(torch.device("cpu")), TrainConfig()
    data = _batch(model)
    lld_only = after_update(model, data, cfg, ctx)
    every = after_update(model, data, cfg, ctx, rows="all", entropy=True)
    assert lld_only.scored.tolist() == [True, False, True, False, False, False]  # positives of the mixed group
    assert every.scored.all() and every.entropy is not None
    # The positives of mixed groups are re-scored on their own either way: bit for bit the same.
    assert torch.equal(every.logp[data.rewards > 0], lld_only.logp[data.rewards > 0])
    for row in range(data.num_rows):
        lp, ent = _direct(model, data, row)
        n = lp.numel()
        torch.testing.assert_close(every.logp[row, :n], lp.float(), rtol=0, atol=1e-5)
        torch.testing.assert_close(every.entropy[row, :n], ent.float(), rtol=0, atol=1e-5)
        assert not every.logp[row, n:].any()  # padding stays 0
    d = every.delta_logp
    assert d.dtype == torch.float64 and torch.equal(d[~data.response_mask], torch.zeros_like(d[~data.response_mask]))


@pytest.mark.integration
def test_a_registered_diagnostic_gets_the_batch_before_and_after():
    model, ctx = build_tiny_model(seed=0), DistContext.single(torch.device("cpu"))
    data = _batch(model)
    seen = {}

    def metrics(after, cfg, ctx):
        seen["after"] = after
        return {"toy/scored_rows": int(after.scored.sum())}

    register_update_diagnostic(UpdateDiagnostic("toy", lambda cfg: cfg.seed == 123, "all", True, metrics))
    try:
        off = {"lld_in_batch": False, "entropy_in_batch": False, "flips_in_batch": False}
        assert needs_rollout_entropy(TrainConfig(seed=123, **off))
        assert not needs_rollout_entropy(TrainConfig(seed=1, **off))
        m = update_metrics(model, data, TrainConfig(seed=123, **{**off, "lld_in_batch": True}), ctx)
        assert m["toy/scored_rows"] == 6 and m["lld/mixed_groups"] == 1
        assert seen["after"].entropy is not None
        assert update_metrics(model, data, TrainConfig(seed=1, **off), ctx) == {}
    finally:
        UPDATE_DIAGNOSTICS.pop("toy")
