"""In-batch lazy likelihood displacement: the shared/unique split on hand-made groups (against a slow
per-pair prefix comparison), and the trainer's live ``lld/*`` metrics against log-likelihoods computed
directly from the two checkpoints around one rollout batch's update."""

from __future__ import annotations

import json
import math

import pytest
import torch

from resrl_analysis.checkpoints import load_checkpoint
from resrl_analysis.displacement import (
    GroupDisplacement,
    group_displacements,
    in_batch_lld_metrics,
    shared_prefix_mask,
)
from resrl_analysis.forward import pack_rows, response_forward
from trainer.config import preset_config
from trainer.loop import train


def _slow_shared(pos: list[int], negs: list[list[int]]) -> list[bool]:
    """Token t of ``pos`` is shared iff some negative starts with pos[:t+1] (a plain Python reference)."""
    return [any(len(n) > t and n[: t + 1] == pos[: t + 1] for n in negs) for t in range(len(pos))]


def _pad(rows: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    return ids, mask


@pytest.mark.unit
def test_shared_prefix_mask_on_a_hand_made_group():
    pos = [[4, 5, 6, 7, 2], [4, 9, 6, 2], [8, 8, 2]]
    negs = [[4, 5, 6, 0, 2], [4, 9, 2], [3, 8, 2, 9, 9, 9]]
    pid, pm = _pad(pos, 5)
    nid, nm = _pad(negs, 6)
    got = shared_prefix_mask(pid, pm, nid, nm)  # (3, 5)
    want = [_slow_shared(p, negs) + [False] * (5 - len(p)) for p in pos]
    assert got.tolist() == want
    # by hand: the first positive shares "4 5 6" with the first negative; the second "4 9" with the second;
    # the third shares nothing (its first token differs from every negative's)
    assert want == [[True, True, True, False, False], [True, True, False, False, False],
                    [False, False, False, False, False]]
    # padding equal to a negative's padding is never shared; no negatives: nothing shared
    assert not shared_prefix_mask(pid, pm, nid[:0], nm[:0]).any()


@pytest.mark.unit
def test_group_displacements_split_exactly_and_skip_unmixed_groups():
    g = torch.Generator().manual_seed(0)
    ids, mask = _pad([[4, 5, 6, 2], [4, 5, 7, 2], [4, 9, 2], [3, 3, 2], [3, 3, 2]], 4)
    old, new = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 1])  # group 1 has no negative: not mixed
    (d,) = group_displacements(old, new, ids, mask, rewards, groups)
    delta = (new.double() - old.double()) * mask
    shared = [_slow_shared([4, 5, 6, 2], [[4, 5, 7, 2]]), _slow_shared([4, 9, 2], [[4, 5, 7, 2]]) + [False]]
    want_delta = (delta[0].sum() + delta[2].sum()) / 2
    want_shared = (sum(delta[0, t] for t in range(4) if shared[0][t]) + sum(
        delta[2, t] for t in range(4) if shared[1][t])) / 2
    assert d.group_id == 0 and d.num_positive == 2
    assert math.isclose(d.delta, float(want_delta), rel_tol=1e-12, abs_tol=1e-12)
    assert math.isclose(d.shared, float(want_shared), rel_tol=1e-12, abs_tol=1e-12)
    assert math.isclose(d.shared + d.unique, d.delta, rel_tol=1e-12, abs_tol=1e-12)
    m = in_batch_lld_metrics([d, GroupDisplacement(7, 0.0, 0.0, 0.0, 1)])
    assert m["lld/batch_frac"] == (0.5 if d.delta > 0 else 1.0)  # Δ = 0 counts as displaced (Δ ≤ ε)
    assert in_batch_lld_metrics([])["lld/batch_delta_mean"] is None


def _logp_sums(model: torch.nn.Module, rows: list[dict], temperature: float) -> list[torch.Tensor]:
    """Token log-probs of each dumped row under ``model``, one row at a time (no batching effects)."""
    out = []
    with torch.no_grad():
        for r in rows:
            packed = pack_rows(torch.tensor([r["prompt_ids"]]), torch.ones(1, len(r["prompt_ids"]), dtype=torch.bool),
                               torch.tensor([r["response_ids"]]),
                               torch.ones(1, len(r["response_ids"]), dtype=torch.bool))
            out.append(response_forward(model, packed, temperature=temperature).logp[0].double())
    return out


@pytest.mark.integration
def test_live_in_batch_lld_equals_the_two_checkpoints(tmp_path):
    # One update per rollout batch (mini_batch = prompts_per_step), a large lr so the update moves log-probs
    # far beyond float round-off; checkpoints before and after the first batch's update.
    cfg = preset_config("tiny", algorithm="nsr", steps=1, save_every=1, prompts_per_step=8, mini_batch_size=8,
                        lr=3e-3, output_dir=str(tmp_path / "run"), progress_bar="off", log_every=100)
    assert cfg.lld_in_batch and cfg.updates_per_rollout == 1
    run = train(cfg)
    (metrics,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (run / "rollouts" / "step_000000.jsonl").read_text().splitlines()]
    before = load_checkpoint(run / "checkpoints" / "step_000000", tokenizer=False).model
    after = load_checkpoint(run / "checkpoints" / "step_000001", tokenizer=False).model
    lp0, lp1 = _logp_sums(before, rows, cfg.temperature), _logp_sums(after, rows, cfg.temperature)
    per_group: dict[int, list[tuple[float, float]]] = {}
    for i, r in enumerate(rows):
        group = [x for x in rows if x["group_id"] == r["group_id"]]
        if not r["is_positive"] or all(x["is_positive"] for x in group):
            continue
        negs = [x["response_ids"] for x in group if not x["is_positive"]]
        d = lp1[i] - lp0[i]  # (T,)
        shared = torch.tensor(_slow_shared(r["response_ids"], negs))
        per_group.setdefault(r["group_id"], []).append((float(d.sum()), float(d[shared].sum())))
    assert per_group, "the batch has no mixed group: the test would check nothing"
    means = [(sum(a for a, _ in v) / len(v), sum(b for _, b in v) / len(v)) for v in per_group.values()]
    want_delta = sum(a for a, _ in means) / len(means)
    want_shared = sum(b for _, b in means) / len(means)
    assert metrics["lld/mixed_groups"] == len(per_group)
    assert abs(want_delta) > 1e-2  # the update moved them: a real comparison, not 0 == 0
    assert metrics["lld/batch_delta_mean"] == pytest.approx(want_delta, abs=1e-4)
    assert metrics["lld/shared_token_delta_mean"] == pytest.approx(want_shared, abs=1e-4)
    assert metrics["lld/shared_token_delta_mean"] + metrics["lld/unique_token_delta_mean"] == pytest.approx(
        metrics["lld/batch_delta_mean"], abs=1e-9)
    assert metrics["lld/batch_frac"] == pytest.approx(sum(a <= 0 for a, _ in means) / len(means))


@pytest.mark.integration
def test_in_batch_lld_off_writes_none(tmp_path):
    cfg = preset_config("tiny", steps=1, save_every=1, prompts_per_step=4, mini_batch_size=4, lld_in_batch=False,
                        output_dir=str(tmp_path / "run"), progress_bar="off", log_every=100, dump_rollouts=False)
    run = train(cfg)
    (metrics,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics["lld/batch_delta_mean"] is None and "lld/batch_frac" in metrics
