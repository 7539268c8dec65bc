"""The mathematics of entropy dynamics and token flips (docs/MATH.md § Entropy dynamics, § Token flips) against
independent references: float64 autograd (``torch.func.jvp``) for the first-order entropy change of a head step,
per-token formulas for the fused entropy Gram, numpy for the covariance proxy, hand counts for flips and coupling."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.func import jvp

from resrl_analysis.displacement import token_classes
from resrl_analysis.entropy_dynamics import (
    covariance_proxy,
    grams_columns,
    predict_entropy_change,
    source_entropy_effects,
)
from resrl_analysis.flips import coupling_counts, flip_counts
from resrl_analysis.interference import entropy_head_inner, group_grams

pytestmark = pytest.mark.unit


def _group(seed: int, G: int = 4, T: int = 6, V: int = 17, d: int = 5, dtype=torch.float64, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(G, T, d, generator=g, dtype=dtype)  # (G, T, d)
    W = scale * torch.randn(V, d, generator=g, dtype=dtype)  # (V, d)
    y = torch.randint(0, V, (G, T), generator=g)
    mask = torch.rand(G, T, generator=g) > 0.25
    mask[:, 0] = True
    pos = torch.tensor([i % 2 == 0 for i in range(G)])
    return h, W, y, mask, pos


@pytest.mark.parametrize("seed,budget", [(0, 256.0), (1, 1e-4), (2, 3e-3)])
def test_entropy_gram_equals_the_per_token_formula(seed, budget):
    h, W, y, mask, pos = _group(seed)
    z = h @ W.T  # (G, T, V)
    gr = group_grams(h, z, y, mask, pos, memory_budget_mb=budget, entropy=True)
    H, P = h[gr.row, gr.pos], torch.softmax(z, -1)[gr.row, gr.pos]  # (N, d), (N, V)
    ref = entropy_head_inner(H, P, H, P, gr.y)  # (N, N), rows the affected token, columns the sample
    assert torch.allclose(gr.entropy_inner, ref, rtol=0, atol=1e-12 * float(ref.abs().max()))
    assert torch.allclose(gr.entropy, -(P * P.log()).sum(-1), rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("budget", [256.0, 1e-4])
def test_the_gram_is_bit_identical_with_its_entropy_part(dtype, budget):
    h, W, y, mask, pos = _group(3, G=6, T=9, V=41, d=7, dtype=torch.float32)
    z = (h @ W.T).to(dtype)
    a = group_grams(h.to(dtype), z, y, mask, pos, memory_budget_mb=budget)
    b = group_grams(h.to(dtype), z, y, mask, pos, memory_budget_mb=budget, entropy=True)
    assert a.entropy_inner is None and b.entropy_inner is not None
    for f in ("inner", "logit_sqnorm", "rep_sqnorm", "row", "pos", "y"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def _advantages(mask: torch.Tensor, pos: torch.Tensor, seed: int) -> torch.Tensor:
    """Response-level ±1 advantages with token-level weights (a ResRL-like shape)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.where(pos, 0.7, -1.3).double()[:, None].expand(mask.shape)
    return base * (0.1 + torch.rand(mask.shape, generator=g, dtype=torch.float64)) * mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prediction_is_the_directional_derivative_of_entropy_along_the_head_update(seed):
    """ΔH predicted = d/dε H(W + ε ΔW) at ε = 0 with ΔW = −η ∇_W L (float64 jvp), to 1e-9 relative; the parts
    from positive and negative samples are the derivatives along the two halves of the update."""
    h, W, y, mask, pos = _group(seed)
    lr = 0.37
    gr = group_grams(h, h @ W.T, y, mask, pos, entropy=True)
    A = _advantages(mask, pos, seed)
    a = grams_columns(gr, A)  # (N,)
    split = predict_entropy_change(gr, a, lr=lr)
    Ht, yt = h[gr.row, gr.pos], gr.y  # (N, d), (N,)
    N = yt.shape[0]
    tok_pos = torch.arange(N) < gr.n_pos

    def entropies(Wm):
        p = torch.softmax(Ht @ Wm.T, -1)  # (N, V)
        return -(p * torch.log(p)).sum(-1)  # (N,)

    def update(weights):
        Wv = W.clone().requires_grad_(True)
        lp = torch.log_softmax(Ht @ Wv.T, -1)[torch.arange(N), yt]  # (N,)
        loss = -(weights * lp).sum() / N  # token-mean over the group
        (g,) = torch.autograd.grad(loss, Wv)
        return -lr * g  # one SGD step

    for got, w in ((split.total, a), (split.from_pos, a * tok_pos), (split.from_neg, a * ~tok_pos)):
        _, ref = jvp(entropies, (W,), (update(w),))
        assert float((got - ref).abs().max()) <= 1e-9 * float(ref.abs().max()), float((got - ref).abs().max())
    assert float(split.from_pos.abs().max()) > 0 and float(split.from_neg.abs().max()) > 0
    tol = 1e-12 * float(split.total.abs().max())
    assert torch.allclose(split.from_pos + split.from_neg, split.total, rtol=0, atol=tol)


def test_every_advantage_column_at_once_and_source_effects_sum_to_the_mean():
    h, W, y, mask, pos = _group(5)
    gr = group_grams(h, h @ W.T, y, mask, pos, entropy=True)
    A = torch.stack([_advantages(mask, pos, s) for s in range(3)])  # (3, G, T)
    cols = grams_columns(gr, A)  # (N, 3)
    many = predict_entropy_change(gr, cols, lr=0.1)
    for k in range(3):
        one = predict_entropy_change(gr, cols[:, k], lr=0.1)
        assert torch.allclose(many.total[:, k], one.total, atol=1e-15)
        src = source_entropy_effects(gr, cols[:, k], lr=0.1)
        assert abs(float(src.sum() - one.total.mean())) < 1e-13


def test_prediction_refuses_a_gram_without_its_entropy_part():
    h, W, y, mask, pos = _group(0)
    gr = group_grams(h, h @ W.T, y, mask, pos)
    with pytest.raises(ValueError, match="entropy=True"):
        predict_entropy_change(gr, torch.ones(int(mask.sum())), lr=1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_covariance_proxy_equals_numpy(seed):
    rng = np.random.default_rng(seed)
    lp = -rng.exponential(1.0, (5, 7))
    adv = rng.normal(size=(5, 7))
    mask = rng.random((5, 7)) > 0.3
    c, cov = covariance_proxy(torch.tensor(lp, dtype=torch.float32), torch.tensor(adv), torch.tensor(mask))
    lp32 = lp.astype(np.float32).astype(np.float64)  # what the float32 input holds
    a, lv = adv[mask], lp32[mask]
    ref = (a - a.mean()) * (lv - lv.mean())
    np.testing.assert_allclose(c.numpy()[mask], ref, rtol=1e-12, atol=1e-15)
    assert (c.numpy()[~mask] == 0).all()
    assert abs(cov - ref.mean()) < 1e-12 and abs(cov - np.cov(a, lv, bias=True)[0, 1]) < 1e-12


def test_covariance_proxy_without_tokens_is_nan():
    c, cov = covariance_proxy(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool))
    assert np.isnan(cov) and not c.any()


def _random_batch(seed: int, B: int = 8, T: int = 7, V: int = 4):
    """Groups of 4 rows with small-vocabulary responses sharing prefixes (identical tokens in both polarities)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 3 + V, (B, T), generator=g)
    ids[1::4, :3] = ids[0::4, :3]  # a negative sharing a positive's first three tokens
    lens = torch.randint(2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lens[:, None]
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])[:B]
    group_ids = torch.arange(B) // 4
    before = torch.log(torch.rand(B, T, generator=g, dtype=torch.float64).clamp(1e-3, 1.0))
    after = before + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    after = torch.where(torch.rand(B, T, generator=g) < 0.1, before, after)  # some unchanged
    # Identical contexts hold identical log-probs (one prediction): copy them over the shared prefixes.
    for i in range(B):
        for j in range(B):
            if group_ids[i] == group_ids[j] and i != j:
                k = 0
                while k < T and mask[i, k] and mask[j, k] and ids[i, k] == ids[j, k]:
                    before[j, k], after[j, k] = before[i, k], after[i, k]
                    k += 1
    return before, after, ids, mask, rewards, group_ids


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flip_counts_equal_a_count_token_by_token(seed):
    before, after, ids, mask, rewards, group_ids = _random_batch(seed)
    classes = token_classes(ids, mask, rewards, group_ids)
    got = flip_counts(before, after, mask, rewards > 0, classes)
    ref = np.zeros((2, 4, 10, 3), dtype=np.int64)
    for i, t in itertools.product(range(ids.shape[0]), range(ids.shape[1])):
        if not mask[i, t]:
            continue
        b, a = float(before[i, t]), float(after[i, t])
        out = 0 if a > b else 1 if a < b else 2
        conf = min(9, int(np.exp(b) * 10))
        ref[0 if rewards[i] > 0 else 1, int(classes[i, t]), conf, out] += 1
    np.testing.assert_array_equal(got.numpy(), ref)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_coupling_counts_equal_an_enumeration_of_pairs(seed):
    before, after, ids, mask, rewards, group_ids = _random_batch(seed)
    low = 0.5
    got = coupling_counts(before, after, ids, mask, rewards, group_ids, low_confidence=low)
    ref = np.zeros((3, 2), dtype=np.int64)
    sign = np.sign((after - before).numpy())
    p = before.exp().numpy()
    for g in group_ids.unique().tolist():
        rows = (group_ids == g).nonzero().flatten().tolist()
        P = [i for i in rows if rewards[i] > 0]
        Nn = [i for i in rows if rewards[i] <= 0]
        for i, j in itertools.product(P, Nn):
            for s, t in itertools.product(range(ids.shape[1]), repeat=2):
                if not (mask[i, s] and mask[j, t]):
                    continue
                same_ctx = s == t and bool((ids[i, : s + 1] == ids[j, : t + 1]).all())
                identical = int(ids[i, s]) == int(ids[j, t])
                both_low, both_high = p[i, s] < low and p[j, t] < low, p[i, s] >= low and p[j, t] >= low
                together = sign[i, s] == sign[j, t] != 0
                kind = (0 if both_low else 1 if both_high else None) if identical and not same_ctx else \
                    (2 if both_low and not identical else None)
                if kind is not None:
                    ref[kind] += (1, int(together))
    np.testing.assert_array_equal(got.numpy(), ref)
    assert ref[0, 0] > 0  # the case is exercised


def test_at_a_sampling_temperature_the_prediction_carries_one_over_tau_squared():
    """p = softmax(W h / τ): the head's gradients carry 1/τ each; the Gram of the tempered probabilities times
    η/τ² is the derivative of the tempered entropy along the tempered loss's step (float64 jvp)."""
    h, W, y, mask, pos = _group(7)
    tau, lr = 0.6, 0.2
    gr = group_grams(h, h @ W.T, y, mask, pos, temperature=tau, entropy=True)
    a = grams_columns(gr, _advantages(mask, pos, 7))
    got = predict_entropy_change(gr, a, lr=lr / tau**2).total
    Ht, yt, N = h[gr.row, gr.pos], gr.y, int(gr.y.shape[0])

    def entropies(Wm):
        p = torch.softmax(Ht @ Wm.T / tau, -1)
        return -(p * torch.log(p)).sum(-1)

    Wv = W.clone().requires_grad_(True)
    lp = torch.log_softmax(Ht @ Wv.T / tau, -1)[torch.arange(N), yt]
    (g,) = torch.autograd.grad(-(a * lp).sum() / N, Wv)
    _, ref = jvp(entropies, (W,), (-lr * g,))
    assert float((got - ref).abs().max()) <= 1e-9 * float(ref.abs().max())


@pytest.mark.unit
def test_flip_counts_leave_out_non_finite_log_probs():
    """A blown-up step gives NaN or -inf log-probs: those tokens are not counted (they used to break bincount)."""
    before = torch.log(torch.tensor([[0.5, 0.25], [0.3, 0.45]]))  # bins 2 and 4 clear of their edges
    after = torch.tensor([[float("nan"), -1.0], [float("-inf"), -0.5]])
    m = torch.ones(2, 2, dtype=torch.bool)
    c = flip_counts(before, after, m, torch.tensor([True, False]), torch.ones(2, 2, dtype=torch.int8))
    assert int(c.sum()) == 2 and c[0, 1, 2].tolist() == [1, 0, 0] and c[1, 1, 4].tolist() == [1, 0, 0]
    k = coupling_counts(before, after, torch.tensor([[5, 6], [7, 6]]), m, torch.tensor([1.0, 0.0]),
                        torch.tensor([0, 0]))
    assert k.tolist() == [[1, 1], [0, 0], [0, 0]]  # only token 6 of each polarity is finite: one identical pair
