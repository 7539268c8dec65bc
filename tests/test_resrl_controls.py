"""The controls of ResRL (docs/MATH.md § Controls of ResRL): each against what it is defined to be, computed
independently, and each resumable bit for bit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_runner import FAST, train_easy

import trainer.loop as loop
from resrl_analysis.advantages import AdvantageParams, AlgoInputs, get_algorithm
from resrl_analysis.weighting import ResRLWeightConfig, resrl_weight_details
from trainer.config import TrainConfig

pytestmark = pytest.mark.integration


def _batch(seed: int = 0, d: int = 16) -> AlgoInputs:
    """Two mixed groups of 5 responses (lengths 3-7) whose negatives share prefixes with the positives."""
    g = torch.Generator().manual_seed(seed)
    B, T = 10, 7
    ids = torch.randint(4, 9, (B, T), generator=g)
    ids[:, :2] = 5  # every response starts alike: shared prefixes
    lengths = torch.tensor([7, 6, 5, 7, 3, 6, 7, 4, 7, 5])
    mask = torch.arange(T)[None] < lengths[:, None]
    ids = ids.masked_fill(~mask, 0)
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    return AlgoInputs(rewards=rewards, group_ids=torch.tensor([0] * 5 + [1] * 5), response_ids=ids,
                      response_mask=mask, params=AdvantageParams(resrl=ResRLWeightConfig(rank=3)),
                      hidden=torch.randn(B, T, d, generator=g),
                      hidden_own=torch.randn(B, T, d, generator=g), generator=torch.Generator().manual_seed(3))


def _fresh(b: AlgoInputs) -> AlgoInputs:
    return dataclasses.replace(b, generator=torch.Generator().manual_seed(3))


def _neg_tokens(b: AlgoInputs, gid: int) -> torch.Tensor:
    return (b.group_ids == gid)[:, None] & (b.rewards <= 0)[:, None] & b.response_mask


def test_shuffled_is_a_permutation_of_resrl_within_each_groups_negative_tokens():
    b = _batch()
    ref = get_algorithm("resrl").fn(_fresh(b))
    out = get_algorithm("resrl-shuffled").fn(_fresh(b))
    w, w0 = out.extras["resrl_weights"], ref.extras["resrl_weights"]
    moved = 0
    for gid in (0, 1):
        sel = _neg_tokens(b, gid)
        assert torch.equal(w[sel].sort().values, w0[sel].sort().values)
        moved += int((w[sel] != w0[sel]).sum())
    assert moved > 0  # it is not ResRL itself
    pos = b.response_mask & (b.rewards > 0)[:, None]
    assert (w[pos] == 1).all() and torch.equal(out.advantages, ref.advantages)
    assert torch.equal(out.token_advantages, torch.where(b.response_mask, ref.advantages[:, None] * w,
                                                         torch.zeros(())))
    again = get_algorithm("resrl-shuffled").fn(_fresh(b))  # seeded: the same draw
    assert torch.equal(again.extras["resrl_weights"], w)


def test_uniform_is_constant_per_group_with_resrls_mean():
    b = _batch()
    w0 = get_algorithm("resrl").fn(_fresh(b)).extras["resrl_weights"]
    w = get_algorithm("resrl-uniform").fn(_fresh(b)).extras["resrl_weights"]
    for gid in (0, 1):
        sel = _neg_tokens(b, gid)
        assert torch.allclose(w[sel], torch.full_like(w[sel], float(w0[sel].double().mean())), atol=1e-7)
        assert float(w0[sel].std()) > 0.05  # ResRL's own weights do vary: the control changes something
    assert (w[~b.response_mask] == 1).all()


def test_own_state_equals_a_direct_computation_from_captured_hidden_states():
    """The trainer's path (own-position capture) against HF's output_hidden_states read at the token's own index."""
    from trainer.models import build_tiny_model

    model = build_tiny_model(seed=0, num_hidden_layers=2).eval()
    g = torch.Generator().manual_seed(1)
    G, Tp, Tr = 6, 4, 6
    prompt = torch.randint(4, 100, (1, Tp), generator=g).expand(G, -1)
    resp = torch.randint(4, 100, (G, Tr), generator=g)
    resp[:, :3] = resp[0, :3]  # a shared prefix
    cfg = TrainConfig(algorithm="resrl-own-state", resrl_rank=4, seed=2)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    pm, rm = torch.ones(G, Tp, dtype=torch.bool), torch.ones(G, Tr, dtype=torch.bool)
    with torch.no_grad():
        rows = loop.pack_rows(prompt, pm, resp, rm)
        fo = loop.response_forward(model, rows, capture_own={"hidden_own": "penultimate"})
        inp = loop.algo_inputs(cfg, 5, loop.params_from_config(cfg), rows, fo, rewards,
                               torch.zeros(G, dtype=torch.long))
        out = get_algorithm("resrl-own-state").fn(inp)
        hs = model(input_ids=rows.input_ids, output_hidden_states=True).hidden_states[-2]  # (G, L, d)
    own = hs[:, -Tr:]  # (G, Tr, d): position Tp + t holds the state after response token t is read
    assert torch.equal(fo.captured["hidden_own"], own)
    params = loop.params_from_config(cfg)
    direct = resrl_weight_details(own, rm, rewards > 0, torch.zeros(G, dtype=torch.long),
                                  generator=loop.generator(cfg.seed, "resrl", 5),
                                  **dataclasses.asdict(params.resrl)).weights
    assert torch.equal(out.extras["resrl_weights"], direct)
    predicting = hs[:, -Tr - 1 : -1]  # what ResRL reads: different states, different weights
    ref = resrl_weight_details(predicting, rm, rewards > 0, torch.zeros(G, dtype=torch.long),
                               generator=loop.generator(cfg.seed, "resrl", 5), **dataclasses.asdict(params.resrl))
    assert not torch.equal(ref.weights, direct)


def test_shared_mask_is_the_prefix_masks_floor_one_pattern():
    b = _batch()
    out = get_algorithm("shared-mask").fn(b)
    w = out.extras["resrl_weights"]
    ids, mask = b.response_ids.tolist(), b.response_mask.tolist()
    floor = b.params.resrl.min_weight
    n_floor = 0
    for i in range(len(ids)):  # slow reference: token t is shared when a positive of the group has ids[:t+1]
        for t in range(len(ids[i])):
            if not mask[i][t] or b.rewards[i] > 0:
                want = 1.0
            else:
                want = 1.0
                for j in range(len(ids)):
                    if b.group_ids[j] == b.group_ids[i] and b.rewards[j] > 0 and all(mask[j][: t + 1]) \
                            and ids[j][: t + 1] == ids[i][: t + 1]:
                        want = floor
            n_floor += want == floor
            assert float(w[i, t]) == pytest.approx(want), (i, t)
    assert n_floor >= 4
    ref = get_algorithm("resrl").fn(_fresh(b))
    assert torch.equal(out.advantages, ref.advantages)  # ResRL's positive weight and GRPO's advantages


def _params(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


class _Crash(Exception):
    pass


@pytest.mark.parametrize("algorithm", ["resrl-shuffled", "resrl-uniform", "resrl-own-state", "shared-mask"])
def test_controls_resume_bit_exactly(algorithm, tmp_path, monkeypatch):
    def cfg(out: Path, **kw) -> TrainConfig:
        return TrainConfig(**{**FAST, "output_dir": str(out), "algorithm": algorithm, "steps": 2, "save_every": 1,
                              "resrl_rank": 4, "collateral_in_batch": True, **kw})

    ref = train_easy(cfg(tmp_path / "ref"))
    real_log = loop.MetricsLog.log

    def log_then_crash(self, metrics):
        real_log(self, metrics)
        if metrics["step"] == 2:
            raise _Crash  # after step 2 is logged, before its checkpoint

    monkeypatch.setattr(loop.MetricsLog, "log", log_then_crash)
    with pytest.raises(_Crash):
        train_easy(cfg(tmp_path / "run"))
    monkeypatch.setattr(loop.MetricsLog, "log", real_log)
    run = train_easy(cfg(tmp_path / "run", resume=True))
    a, b = _params(ref, 2), _params(run, 2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (run / "rollouts" / "step_000002.jsonl").read_text() == (ref / "rollouts" / "step_000002.jsonl").read_text()
