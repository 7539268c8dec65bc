"""ResRL subspace and weights against exact SVD, torch.pca_lowrank and a slow numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resrl_analysis import resrl_token_weights
from resrl_analysis.weighting import (
    ResRLWeightConfig,
    explained_variance,
    positive_subspace,
    randomized_right_basis,
    residual_energy,
    resrl_weight_details,
    weights_from_residuals,
)

pytestmark = pytest.mark.unit


def _projector(B: torch.Tensor) -> torch.Tensor:
    return B @ B.T


def test_randomized_basis_matches_exact_svd_and_pca_lowrank():
    g = torch.Generator().manual_seed(0)
    # A matrix with a clear spectral gap after 5 directions.
    x = torch.randn(300, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 40, generator=g, dtype=torch.float64)
    x = x + 1e-3 * torch.randn(300, 40, generator=g, dtype=torch.float64)
    V, S = randomized_right_basis(x, 5, niter=4, generator=torch.Generator().manual_seed(1))
    _, S_exact, Vh = torch.linalg.svd(x, full_matrices=False)
    torch.testing.assert_close(_projector(V), _projector(Vh[:5].T), atol=1e-6, rtol=0)
    torch.testing.assert_close(S, S_exact[:5], rtol=1e-8, atol=0)
    torch.manual_seed(2)
    _, _, V_pca = torch.pca_lowrank(x, q=5, center=False, niter=4)
    torch.testing.assert_close(_projector(V), _projector(V_pca), atol=1e-6, rtol=0)


def test_positive_subspace_rank_and_centring():
    x = torch.randn(6, 32, dtype=torch.float64)
    s = positive_subspace(x, rank=64, svd="exact")
    assert s.rank == 5  # min(rank, M - 1, d)
    # centred data lies in a 5-dim subspace: zero residual for the positives themselves
    assert residual_energy(x, s).max() < 1e-20
    torch.testing.assert_close(s.mean, x.mean(0))
    lr = positive_subspace(x, rank=64, svd="lowrank", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_projector(lr.basis), _projector(s.basis), atol=1e-8, rtol=0)
    ev = explained_variance(x)
    assert ev[4].item() == pytest.approx(1.0) and (ev.diff() >= -1e-12).all()


def test_residual_energy_reference():
    g = torch.Generator().manual_seed(3)
    B = torch.linalg.qr(torch.randn(10, 3, generator=g, dtype=torch.float64)).Q
    x = torch.randn(7, 10, generator=g, dtype=torch.float64)
    P = np.eye(10) - B.numpy() @ B.numpy().T
    ref = np.array([xi @ P @ P @ xi / 10 for xi in x.numpy()])
    np.testing.assert_allclose(residual_energy(x, B).numpy(), ref, rtol=1e-12)


def test_weights_from_residuals_formula():
    e = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7], dtype=torch.float64)
    w, lo, hi = weights_from_residuals(e, 0.2, 0.8, 0.1)
    lo_ref, hi_ref = np.quantile(e.numpy(), [0.2, 0.8])
    assert (lo, hi) == pytest.approx((lo_ref, hi_ref))
    ref = 0.1 + 0.9 * np.clip((e.numpy() - lo_ref) / (hi_ref - lo_ref), 0, 1)
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-12)
    same, _, _ = weights_from_residuals(torch.full((4,), 2.0), 0.2, 0.8, 0.1)
    assert torch.allclose(same, torch.full((4,), 0.55))


def _reference_weights(hidden, mask, pos, gids, rank, q_low, q_high, min_w):
    """Slow numpy/float64 reference of docs/MATH.md § ResRL weights, with an exact SVD and no sub-sampling."""
    H, M, P, G = hidden.double().numpy(), mask.numpy(), pos.numpy(), gids.numpy()
    out = np.ones(M.shape)
    for gid in np.unique(G):
        rows = np.where(G == gid)[0]
        prow, nrow = [r for r in rows if P[r]], [r for r in rows if not P[r]]
        xp = [H[r, t] for r in prow for t in range(M.shape[1]) if M[r, t]]
        if not prow or not nrow or len(xp) < 4:
            continue
        ln = lambda v: (v - v.mean()) / np.sqrt(v.var() + 1e-5)  # noqa: E731
        xp = np.stack([ln(v) for v in xp])
        mu = xp.mean(0)
        k = min(rank, len(xp) - 1, H.shape[-1])
        Vk = np.linalg.svd(xp - mu, full_matrices=False)[2][:k].T
        negs = [(r, t) for r in nrow for t in range(M.shape[1]) if M[r, t]]
        if not negs:
            continue
        e = []
        for r, t in negs:
            x = ln(H[r, t]) - mu
            res = x - Vk @ (Vk.T @ x)
            e.append(res @ res / H.shape[-1])
        lo, hi = np.quantile(e, [q_low, q_high])
        for (r, t), ei in zip(negs, e):
            out[r, t] = (min_w + 1) / 2 if hi - lo <= 1e-8 * max(1, abs(hi)) else \
                min_w + (1 - min_w) * np.clip((ei - lo) / (hi - lo), 0, 1)
    return out


def _batch(seed, B=10, T=7, d=12, n_groups=3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=g) * 3 + 1
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    pos = torch.rand(B, generator=g) < 0.5
    gids = torch.randint(0, n_groups, (B,), generator=g) * 11
    return hidden, mask, pos, gids


@pytest.mark.parametrize("seed", range(6))
def test_weights_match_reference(seed):
    hidden, mask, pos, gids = _batch(seed)
    w = resrl_token_weights(hidden, mask, pos, gids, rank=4, svd="exact")
    ref = _reference_weights(hidden, mask, pos, gids, 4, 0.2, 0.8, 0.1)
    np.testing.assert_allclose(w.numpy(), ref, rtol=2e-4, atol=2e-4)


def test_lowrank_close_to_exact_with_spectral_gap():
    g = torch.Generator().manual_seed(0)
    B, T, d = 8, 20, 32
    basis = torch.randn(6, d, generator=g)
    hidden = torch.randn(B, T, 6, generator=g) @ basis + 0.01 * torch.randn(B, T, d, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    pos, gids = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool), torch.zeros(B, dtype=torch.long)
    exact = resrl_weight_details(hidden, mask, pos, gids, rank=8, svd="exact")
    gen = torch.Generator().manual_seed(5)
    low = resrl_weight_details(hidden, mask, pos, gids, rank=8, svd="lowrank", generator=gen)
    torch.testing.assert_close(low.residuals[4:], exact.residuals[4:], atol=1e-4, rtol=1e-3)


def test_permutation_and_batch_split_invariance():
    hidden, mask, pos, gids = _batch(7, B=16, n_groups=4)
    full = resrl_token_weights(hidden, mask, pos, gids, rank=6, generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    permuted = resrl_token_weights(hidden[perm], mask[perm], pos[perm], gids[perm], rank=6,
                                   generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(permuted, full[perm], atol=1e-5, rtol=1e-5)
    # each group computed alone (same generator state) gives the same weights
    for gid in gids.unique():
        rows = gids == gid
        alone = resrl_token_weights(hidden[rows], mask[rows], pos[rows], gids[rows], rank=6,
                                    generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(alone, full[rows], atol=1e-5, rtol=1e-5)


def test_degenerate_groups_keep_weight_one_and_no_nan():
    d = 8
    hidden = torch.randn(12, 5, d)
    mask = torch.ones(12, 5, dtype=torch.bool)
    pos = torch.tensor([1, 1, 1, 0, 0, 0, 1, 0, 0, 1, 0, 0], dtype=torch.bool)
    gids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    mask[6, 3:] = False  # group 2: only 3 valid positive tokens
    mask[10:] = False  # group 3: negatives all empty
    hidden[4] = hidden[3]
    hidden[5] = hidden[3]  # group 1 has no positive anyway
    out = resrl_weight_details(hidden, mask, pos, gids, rank=4)
    status = {gr["group_id"]: gr["status"] for gr in out.groups}
    assert status == {0: "no_negative", 1: "no_positive", 2: "too_few_positive_tokens", 3: "no_negative_tokens"}
    assert (out.weights == 1).all() and torch.isfinite(out.weights).all()
    # identical negative tokens: zero spread between quantiles -> (min_w + 1)/2
    hidden2 = torch.randn(4, 3, d)
    hidden2[2:] = hidden2[2, 0]
    w = resrl_token_weights(hidden2, torch.ones(4, 3, dtype=torch.bool), torch.tensor([1, 1, 0, 0]).bool(),
                            torch.zeros(4, dtype=torch.long), rank=2)
    assert torch.allclose(w[2:], torch.full((2, 3), 0.55)) and (w[:2] == 1).all()


def test_subsampling_and_dtypes():
    hidden, mask, pos, gids = _batch(11, B=12, T=9)
    w16 = resrl_token_weights(hidden.bfloat16(), mask, pos, gids, rank=4, max_pos_tokens=5,
                              generator=torch.Generator().manual_seed(0))
    assert w16.dtype == torch.float32 and torch.isfinite(w16).all()
    again = resrl_token_weights(hidden.bfloat16(), mask, pos, gids, rank=4, max_pos_tokens=5,
                                generator=torch.Generator().manual_seed(0))
    assert torch.equal(w16, again)  # deterministic given the generator


@pytest.mark.parametrize("kw, msg", [
    ({"rank": 0}, "rank"), ({"q_low": 0.8, "q_high": 0.2}, "q_low"), ({"min_weight": 1.5}, "min_weight"),
    ({"svd": "qr"}, "svd"),
])
def test_bad_parameters_rejected(kw, msg):
    hidden, mask, pos, gids = _batch(0)
    with pytest.raises(ValueError, match=msg):
        resrl_token_weights(hidden, mask, pos, gids, **kw)
    with pytest.raises(ValueError):
        ResRLWeightConfig(**{k: v for k, v in kw.items()})


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 100_000),
    B=st.integers(1, 10),
    T=st.integers(1, 6),
    d=st.integers(2, 10),
    n_groups=st.integers(1, 4),
    rank=st.integers(1, 8),
    q=st.tuples(st.floats(0, 0.5), st.floats(0.5, 1.0)).filter(lambda q: q[0] < q[1]),
    min_w=st.floats(0, 1),
)
def test_property_weights_in_range_and_invariant(seed, B, T, d, n_groups, rank, q, min_w):
    hidden, mask, pos, gids = _batch(seed, B=B, T=T, d=d, n_groups=n_groups)
    kw = dict(rank=rank, q_low=q[0], q_high=q[1], min_weight=min_w)
    w = resrl_token_weights(hidden, mask, pos, gids, generator=torch.Generator().manual_seed(0), **kw)
    assert w.shape == (B, T) and torch.isfinite(w).all()
    assert (w >= min_w - 1e-6).all() and (w <= 1 + 1e-6).all()
    assert (w[pos] == 1).all() and (w[~mask] == 1).all()
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(seed))
    wp = resrl_token_weights(hidden[perm], mask[perm], pos[perm], gids[perm],
                             generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(wp, w[perm], atol=2e-4, rtol=2e-4)
