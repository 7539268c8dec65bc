"""Collateral per unit of push-down (docs/MATH.md § Collateral per unit of push-down): the core functions against a
slow reference, and the trainer's live ``update/*`` and ``resrl/weight_*`` against an independent computation from
two checkpoints and the rollout dump."""

from __future__ import annotations

import json
import math

import pytest
import torch
from trainer_runner import FAST, train_easy

from resrl_analysis.checkpoints import load_checkpoint
from resrl_analysis.displacement import group_updates, update_selectivity_metrics
from resrl_analysis.forward import pack_rows, response_forward
from trainer.config import TrainConfig
from trainer.metrics_log import read_metrics


def _shared(ids: list[int], others: list[list[int]], t: int) -> bool:
    return any(len(o) > t and o[: t + 1] == ids[: t + 1] for o in others)


def _reference(rows: list[dict], old: list[list[float]], new: list[list[float]]) -> dict:
    """Slow reference: plain Python over the rows (ids, reward, group, weights) and per-token log-probs."""
    kl_sum, n_tok = 0.0, 0
    for o, n in zip(old, new):
        for a, b in zip(o, n):
            d = b - a
            kl_sum += math.exp(d) - 1 - d
            n_tok += 1
    groups = sorted({r["group_id"] for r in rows})
    coll, push, parts, ws = [], [], {1: [], 2: [], 3: []}, {1: [], 2: [], 3: []}
    for g in groups:
        idx = [i for i, r in enumerate(rows) if r["group_id"] == g]
        pos = [i for i in idx if rows[i]["reward"] > 0]
        neg = [i for i in idx if rows[i]["reward"] <= 0]
        if not pos or not neg:
            continue
        pos_ids = [rows[i]["response_ids"] for i in pos]
        neg_ids = [rows[i]["response_ids"] for i in neg]
        c = 0.0
        for i in pos:
            ids = rows[i]["response_ids"]
            c += -sum(new[i][t] - old[i][t] for t in range(len(ids)) if _shared(ids, neg_ids, t))
        coll.append(c / len(pos))
        p, split = 0.0, {1: 0.0, 2: 0.0, 3: 0.0}
        for i in neg:
            ids = rows[i]["response_ids"]
            d_shared = sum(_shared(ids, pos_ids, t) for t in range(len(ids)))  # shared positions: a prefix
            for t in range(len(ids)):
                cls = 1 if t < d_shared else (2 if t == d_shared else 3)
                split[cls] += -(new[i][t] - old[i][t])
                if rows[i].get("resrl_weights") is not None:
                    ws[cls].append(rows[i]["resrl_weights"][t])
            p += -sum(new[i][t] - old[i][t] for t in range(len(ids)))
        push.append(p / len(neg))
        for k in split:
            parts[k].append(split[k] / len(neg))
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    out = {"kl": kl_sum / n_tok, "collateral": mean(coll), "push_down": mean(push),
           "ratio": sum(coll) / sum(push) if push and sum(push) else None, "groups": len(coll),
           "push_shared": mean(parts[1]), "push_first": mean(parts[2]), "push_after": mean(parts[3])}
    for k, name in ((1, "shared"), (2, "first_divergent"), (3, "after")):
        out[f"w_{name}"] = mean(ws[k])
    return out


@pytest.mark.unit
def test_group_updates_against_a_slow_reference():
    g = torch.Generator().manual_seed(0)
    B, T = 8, 6
    ids = torch.randint(4, 7, (B, T), generator=g)
    ids[:, 0] = 5  # every response starts alike, several go on alike
    ids[::2, 1] = 6
    lengths = torch.tensor([6, 5, 6, 4, 6, 6, 3, 5])
    mask = torch.arange(T)[None] < lengths[:, None]
    ids = ids.masked_fill(~mask, 0)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])  # group 1 (rows 4-7) mixed, group 0 too
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    old = -torch.rand(B, T, generator=g) * 3
    new = old + 0.2 * torch.randn(B, T, generator=g)
    old, new = old * mask, new * mask
    weights = torch.where(mask, 0.1 + 0.9 * torch.rand(B, T, generator=g), torch.ones(()))
    ups = group_updates(old, new, ids, mask, rewards, groups, weights)
    kl_tok = torch.where(mask, torch.expm1(new.double() - old.double()) - (new.double() - old.double()), 0.0)
    m = update_selectivity_metrics(ups, float(kl_tok.sum()), int(mask.sum()), weighted=True)
    rows = [{"group_id": int(groups[i]), "reward": float(rewards[i]), "response_ids": ids[i, : lengths[i]].tolist(),
             "resrl_weights": weights[i, : lengths[i]].tolist()} for i in range(B)]
    o = [old[i, : lengths[i]].double().tolist() for i in range(B)]
    n = [new[i, : lengths[i]].double().tolist() for i in range(B)]
    ref = _reference(rows, o, n)
    assert m["update/mixed_groups"] == ref["groups"] == 2
    for key, want in (("update/kl_k3", ref["kl"]), ("update/collateral_mean", ref["collateral"]),
                      ("update/push_down_mean", ref["push_down"]), ("update/selectivity_ratio", ref["ratio"]),
                      ("update/push_down_shared", ref["push_shared"]),
                      ("update/push_down_first_divergent", ref["push_first"]),
                      ("update/push_down_after", ref["push_after"])):
        assert m[key] == pytest.approx(want, rel=1e-6, abs=1e-9), key
    assert ref["push_shared"] != 0  # the synthetic negatives do share prefixes with the positives
    # ω by class: the negatives' tokens of mixed groups, pooled (positives' weights are not counted).
    for name in ("shared", "first_divergent", "after"):
        assert m[f"resrl/weight_{name}"] == pytest.approx(ref[f"w_{name}"], rel=1e-6), name
    assert m["update/pos_delta_per_kl"] == pytest.approx(m["update/pos_delta_mean"] / ref["kl"])


@pytest.mark.integration
def test_live_metrics_equal_an_independent_computation_from_checkpoints_and_the_dump(tmp_path):
    cfg = TrainConfig(**{**FAST, "output_dir": str(tmp_path / "run"), "algorithm": "resrl", "steps": 1,
                         "save_every": 1, "resrl_rank": 4, "collateral_in_batch": True, "temperature": 0.9})
    run = train_easy(cfg)
    (line,) = read_metrics(run / "metrics.jsonl")
    rows = [json.loads(x) for x in (run / "rollouts" / "step_000000.jsonl").read_text().splitlines()]
    # The batch as the trainer packs it (left-padded prompts, right-padded responses), re-scored by the policy
    # before (checkpoint 0) and after (checkpoint 1) the update.
    B = len(rows)
    Tp = max(len(r["prompt_ids"]) for r in rows)
    Tr = max(len(r["response_ids"]) for r in rows)
    pids, pm = torch.zeros(B, Tp, dtype=torch.long), torch.zeros(B, Tp, dtype=torch.bool)
    rids, rm = torch.zeros(B, Tr, dtype=torch.long), torch.zeros(B, Tr, dtype=torch.bool)
    for i, r in enumerate(rows):
        p, y = r["prompt_ids"], r["response_ids"]
        pids[i, Tp - len(p):], pm[i, Tp - len(p):] = torch.tensor(p), True
        rids[i, : len(y)], rm[i, : len(y)] = torch.tensor(y), True
    logp = {}
    for step in (0, 1):
        model = load_checkpoint(run / "checkpoints" / f"step_00000{step}", tokenizer=False).model
        with torch.no_grad():
            lp = response_forward(model, pack_rows(pids, pm, rids, rm), temperature=cfg.temperature).logp
        logp[step] = [lp[i, : len(r["response_ids"])].double().tolist() for i, r in enumerate(rows)]
    # The dump's log-probs are the rollout's own (rounded): the re-score of checkpoint 0 reproduces them.
    for i, r in enumerate(rows):
        assert logp[0][i] == pytest.approx(r["token_logprobs"], abs=2e-5)
    ref = _reference(rows, logp[0], logp[1])
    assert ref["groups"] == line["update/mixed_groups"] >= 1
    assert line["update/kl_k3"] == pytest.approx(ref["kl"], rel=2e-3)
    assert line["update/kl_k3"] > 0
    for key, want in (("update/collateral_mean", ref["collateral"]), ("update/push_down_mean", ref["push_down"]),
                      ("update/push_down_first_divergent", ref["push_first"]),
                      ("update/push_down_after", ref["push_after"])):
        assert line[key] == pytest.approx(want, rel=2e-3, abs=1e-6), key
    if ref["ratio"] is not None:
        assert line["update/selectivity_ratio"] == pytest.approx(ref["ratio"], rel=5e-3, abs=1e-6)
    # resrl/* ω split: a direct count from the dump's weights (rounded to 6 significant digits there).
    for name in ("shared", "first_divergent", "after"):
        want = ref[f"w_{name}"]
        assert (line[f"resrl/weight_{name}"] is None) == (want is None), name
        if want is not None:
            assert line[f"resrl/weight_{name}"] == pytest.approx(want, rel=1e-5), name
    assert line["resrl/weight_first_divergent"] is not None and line["resrl/first_divergent_tokens"] >= 1
