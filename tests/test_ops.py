"""Unit tests of resrl_analysis.ops against slow, independent references."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resrl_analysis.ops import (
    avg_at_n,
    chunk_tokens_for_budget,
    group_advantages,
    masked_mean,
    masked_var,
    pass_at_k,
    pass_at_k_curve,
    softmax_probs,
    token_entropy,
    token_logprobs,
    token_logprobs_and_entropy,
)

pytestmark = pytest.mark.unit


# ----------------------------------------------------------------------------- log-probs and entropy


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_logprobs_entropy_match_full_softmax_and_autograd(temperature, chunk):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 17, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 17, (2, 5), generator=g)
    w1, w2 = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)

    lp, ent = token_logprobs_and_entropy(logits, labels, temperature=temperature, chunk_tokens=chunk)
    (gl,) = torch.autograd.grad((lp * w1 + ent * w2).sum(), logits)

    ref_logits = logits.detach().clone().requires_grad_(True)
    logq = torch.log_softmax(ref_logits / temperature, -1)
    ref_lp = logq.gather(-1, labels[..., None]).squeeze(-1)
    ref_ent = -(logq.exp() * logq).sum(-1)
    (gref,) = torch.autograd.grad((ref_lp * w1 + ref_ent * w2).sum(), ref_logits)

    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gl, gref, atol=1e-5, rtol=1e-4)


def test_logprobs_bf16_logits_gradient_dtype():
    logits = torch.randn(4, 9, dtype=torch.bfloat16, requires_grad=True)
    lp = token_logprobs(logits, torch.tensor([0, 1, 2, 3]))
    lp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


def test_entropy_and_softmax_helpers():
    z = torch.randn(3, 4, 11)
    ref = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    torch.testing.assert_close(token_entropy(z), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(softmax_probs(z.reshape(-1, 11)), torch.softmax(z.reshape(-1, 11), -1))


def test_chunk_budget_bounds_memory():
    c = chunk_tokens_for_budget(151_936, 64)
    assert c * 151_936 * 4 * 3 <= 64 * 2**20 < (c + 1) * 151_936 * 4 * 3
    with pytest.raises(ValueError):
        chunk_tokens_for_budget(0)
    with pytest.raises(ValueError):
        token_logprobs(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


# ----------------------------------------------------------------------------- masked reductions


def test_masked_reductions_match_python():
    x = torch.tensor([[1.0, 2.0, 4.0], [3.0, float("inf"), 0.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    assert masked_mean(x, m).item() == pytest.approx((1 + 2 + 4 + 3) / 4)
    assert masked_mean(x, m, dim=1).tolist() == pytest.approx([7 / 3, 3.0])
    assert masked_var(x, m, dim=1).tolist() == pytest.approx([np.var([1, 2, 4], ddof=1), 0.0])
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0


# ----------------------------------------------------------------------------- advantages


def _grpo_reference(rewards, groups, eps=1e-6):
    out = []
    for r, gid in zip(rewards, groups):
        rs = [rr for rr, gg in zip(rewards, groups) if gg == gid]
        mean = sum(rs) / len(rs)
        std = math.sqrt(sum((v - mean) ** 2 for v in rs) / (len(rs) - 1)) if len(rs) > 1 else 0.0
        out.append((r - mean) / (std + eps))
    return out


def test_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    gids = torch.tensor([5, 5, 5, 5, 9, 9, 9, 9])
    # group 5: mean 0.5, unbiased std sqrt(1/3); group 9: all wrong, std 0 -> zero advantages
    a = group_advantages(r, gids, "grpo")
    s = math.sqrt(1 / 3)
    assert a.tolist() == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0], rel=1e-5)
    assert group_advantages(r, gids, "psr").tolist() == [1, 0, 0, 1, 0, 0, 0, 0]
    assert group_advantages(r, gids, "nsr").tolist() == [0, -1, -1, 0, -1, -1, -1, -1]
    assert group_advantages(r, gids, "w-reinforce").tolist() == pytest.approx([0.1, -1, -1, 0.1, -1, -1, -1, -1])
    assert group_advantages(r, gids, "w-reinforce", w_lambda=0.5)[0].item() == 0.5
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        group_advantages(r, gids, "ppo")


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 4), st.sampled_from([0.0, 1.0, 0.7])), min_size=2, max_size=24),
)
def test_grpo_matches_reference_any_layout(rows):
    groups = [g for g, _ in rows]
    rewards = [r for _, r in rows]
    a = group_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(groups), "grpo")
    assert a.tolist() == pytest.approx(_grpo_reference(rewards, groups), rel=1e-9, abs=1e-9)
    perm = torch.randperm(len(rows))
    ap = group_advantages(torch.tensor(rewards, dtype=torch.float64)[perm], torch.tensor(groups)[perm])
    torch.testing.assert_close(ap, a[perm])


# ----------------------------------------------------------------------------- pass@k


def _pass_at_k_exact(n, c, k):
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(0, n))))
def test_pass_at_k_matches_comb(nck):
    n, c, k = nck
    assert float(pass_at_k(n, c, k)) == pytest.approx(float(_pass_at_k_exact(n, c, k)), abs=1e-12)


def test_pass_at_k_broadcast_and_large_n():
    n = 1024
    c = np.array([0, 1, 100, 1024])
    k = np.array([[1], [16], [512]])
    got = pass_at_k(n, c, k)
    assert got.shape == (3, 4)
    for i, kk in enumerate(k[:, 0]):
        for j, cc in enumerate(c):
            assert got[i, j] == pytest.approx(float(_pass_at_k_exact(n, int(cc), int(kk))), abs=1e-10)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_pass_at_k_curve_and_avg():
    counts = [0, 3, 8]
    curve = pass_at_k_curve(8, counts)
    assert len(curve) == 8
    assert curve[0] == pytest.approx(np.mean([0, 3 / 8, 1.0]))
    assert np.all(np.diff(curve) >= -1e-12)  # pass@k never decreases in k
    assert curve[-1] == pytest.approx(2 / 3)
    assert avg_at_n(np.array([[1, 0, 0, 1]])) == 0.5


def test_float32_logits_are_not_modified_and_double_backward_works():
    # Regression: in-place arithmetic on a float32 chunk must never touch the caller's logits.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 11, generator=g, requires_grad=True)
    before = logits.detach().clone()
    labels = torch.randint(0, 11, (6,), generator=g)
    lp, ent = token_logprobs_and_entropy(logits, labels, temperature=0.7, chunk_tokens=4)
    loss = (lp + 0.3 * ent).sum()
    (g1,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, logits)
    assert torch.equal(logits.detach(), before)
    ref = before.double().requires_grad_(True)
    logq = torch.log_softmax(ref / 0.7, -1)
    ref_loss = (logq.gather(-1, labels[:, None]).squeeze(-1) - 0.3 * (logq.exp() * logq).sum(-1)).sum()
    (gref,) = torch.autograd.grad(ref_loss, ref)
    torch.testing.assert_close(g1.double(), gref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g1, g2)
