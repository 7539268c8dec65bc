"""Unit tests of trainer.losses on hand-computed cases, and the micro-batch decomposition of the loss."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.losses import LossNorm, aggregate, kl_k3, policy_loss, ppo_clip_token_losses

pytestmark = pytest.mark.unit


def _ppo(ratio: float, adv: float, dual: float = 3.0) -> tuple[float, bool]:
    loss, clipped, _ = ppo_clip_token_losses(
        torch.tensor([[math.log(ratio)]]), torch.tensor([[0.0]]), torch.tensor([[adv]]), dual_clip=dual
    )
    return loss.item(), bool(clipped.item())


@pytest.mark.parametrize(
    ("ratio", "adv", "expected", "clipped"),
    [
        (1.1, 2.0, -2.2, False),  # inside the trust region: -A·ρ
        (1.5, 2.0, -2.4, True),  # A > 0, ρ > 1 + ε: clipped at 1.2
        (0.5, 2.0, -1.0, False),  # A > 0, ρ < 1 − ε: the unclipped term is the max (pessimistic)
        (0.5, -2.0, 1.6, True),  # A < 0, ρ < 1 − ε: clipped at 0.8
        (1.5, -2.0, 3.0, False),  # A < 0, ρ > 1 + ε: unclipped 1.5·2 = 3 (below the dual bound 6)
        (5.0, -2.0, 6.0, False),  # A < 0, ρ = 5: 10 capped by the dual clip at c·|A| = 6
    ],
)
def test_ppo_clip_and_dual_clip_hand_cases(ratio, adv, expected, clipped):
    loss, was_clipped = _ppo(ratio, adv)
    assert loss == pytest.approx(expected, rel=1e-6)
    assert was_clipped == clipped


def test_dual_clip_off_leaves_loss_unbounded():
    assert _ppo(5.0, -2.0, dual=0.0)[0] == pytest.approx(10.0, rel=1e-6)


def test_asymmetric_clip_ratios():
    loss, _, _ = ppo_clip_token_losses(torch.tensor([[math.log(1.5)]]), torch.zeros(1, 1), torch.ones(1, 1),
                                       clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(-1.28, rel=1e-6)
    loss, _, _ = ppo_clip_token_losses(torch.tensor([[math.log(0.5)]]), torch.zeros(1, 1), -torch.ones(1, 1),
                                       clip_low=0.1, clip_high=0.28)
    assert loss.item() == pytest.approx(0.9, rel=1e-6)


def test_aggregations_hand_values():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]]).bool()
    norm = LossNorm(tokens=4, seqs=2)
    assert aggregate(v, m, "token-mean", norm).item() == pytest.approx(10 / 4)
    assert aggregate(v, m, "seq-mean-token-mean", norm).item() == pytest.approx((2 + 4) / 2)
    assert aggregate(v, m, "seq-mean-token-sum", norm).item() == pytest.approx((6 + 4) / 2)
    # normalised by the mini-batch's counts, not the micro-batch's
    assert aggregate(v, m, "token-mean", LossNorm(tokens=8, seqs=4)).item() == pytest.approx(10 / 8)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregate(v, m, "sum", norm)


def test_k3_kl_hand_value():
    # log π = log 0.5, log π_ref = log 0.25: r = log 0.5, e^r − r − 1 = 0.5 + ln 2 − 1
    kl = kl_k3(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert kl.item() == pytest.approx(0.5 + math.log(2) - 1, rel=1e-6)
    assert kl_k3(torch.tensor([0.3]), torch.tensor([0.3])).item() == 0.0


def test_policy_loss_kl_and_entropy_terms():
    lp = torch.log(torch.tensor([[0.5, 0.5]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    ent = torch.tensor([[1.0, 3.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv = torch.tensor([[1.0, -1.0]])
    norm = LossNorm(tokens=2, seqs=1)
    base = policy_loss(lp, lp, adv, mask, norm=norm).loss.item()
    assert base == pytest.approx(0.0)  # ratio 1: −1 + 1 over 2 tokens
    out = policy_loss(lp, lp, adv, mask, norm=norm, ref_logp=ref, kl_coef=0.5, entropy=ent, entropy_coef=0.1)
    kl_mean = (0.5 + math.log(2) - 1) / 2
    assert out.loss.item() == pytest.approx(0.5 * kl_mean - 0.1 * 2.0, rel=1e-5)
    assert out.stats["kl"].item() == pytest.approx(kl_mean, rel=1e-5)
    assert out.stats["entropy"].item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(lp, lp, adv, mask, norm=norm, kl_coef=0.1)


def test_policy_loss_gradient_matches_formula():
    # Unclipped token: d/dlogp (−A ρ / N) = −A ρ / N; clipped token (A>0, ρ>1.2): zero gradient.
    lp = torch.tensor([[0.05, 0.5]], requires_grad=True)
    old = torch.zeros(1, 2)
    adv = torch.tensor([[2.0, 2.0]])
    out = policy_loss(lp, old, adv, torch.ones(1, 2, dtype=torch.bool), norm=LossNorm(tokens=2, seqs=1))
    out.loss.backward()
    assert lp.grad[0, 0].item() == pytest.approx(-2.0 * math.exp(0.05) / 2, rel=1e-6)
    assert lp.grad[0, 1].item() == 0.0
    assert out.stats["pg_clipfrac"].item() == pytest.approx(0.5)
    assert out.stats["ppo_kl"].item() == pytest.approx(-(0.05 + 0.5) / 2, rel=1e-6)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batch_shares_sum_to_the_mini_batch_loss(mode):
    g = torch.Generator().manual_seed(0)
    B, T = 6, 5
    lp = torch.randn(B, T, generator=g) * 0.3
    old = torch.randn(B, T, generator=g) * 0.3
    adv = torch.randn(B, T, generator=g)
    lengths = torch.tensor([5, 1, 3, 4, 2, 5])
    mask = torch.arange(T)[None] < lengths[:, None]
    norm = LossNorm(tokens=float(mask.sum()), seqs=float(B))
    full = policy_loss(lp, old, adv, mask, norm=norm, agg=mode)
    for size in (1, 2, 4):
        parts = [policy_loss(lp[s : s + size], old[s : s + size], adv[s : s + size], mask[s : s + size],
                             norm=norm, agg=mode) for s in range(0, B, size)]
        assert sum(p.loss for p in parts).item() == pytest.approx(full.loss.item(), rel=1e-6)
        for key in ("pg_clipfrac", "ppo_kl"):
            assert sum(p.stats[key] for p in parts).item() == pytest.approx(full.stats[key].item(), rel=1e-6)


def test_scale_multiplies_the_loss_only():
    lp = torch.zeros(1, 1)
    out = policy_loss(lp, lp, torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool),
                      norm=LossNorm(tokens=1, seqs=1, scale=4.0))
    assert out.loss.item() == -4.0 and out.stats["pg_loss"].item() == -1.0
