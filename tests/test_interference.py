"""Factorised head-gradient formulas against per-token autograd gradients of a real head (float64)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resrl_analysis import alignment_bound, head_gradient_cosine, head_gradient_inner
from resrl_analysis.bounds import alignment_bound_paper, head_gradient_bound
from resrl_analysis.interference import (
    group_gradient_alignment,
    head_gradient_sqnorm,
    nthr_scores,
    nthr_threshold,
    nthr_token_weights,
)
from resrl_analysis.weighting import positive_subspace


def _per_token_head_grads(W: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Slow reference: autograd of log softmax(W h)[y] w.r.t. W, one token at a time → (T, V*d)."""
    grads = []
    for t in range(h.shape[0]):
        Wt = W.detach().clone().requires_grad_(True)
        lp = torch.log_softmax(Wt @ h[t], -1)[y[t]]
        (g,) = torch.autograd.grad(lp, Wt)
        grads.append(g.reshape(-1))
    return torch.stack(grads)


def _setup(seed: int, Ta: int, Tb: int, V: int, d: int):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, d, generator=g, dtype=torch.float64)
    ha, hb = torch.randn(Ta, d, generator=g, dtype=torch.float64), torch.randn(Tb, d, generator=g, dtype=torch.float64)
    ya, yb = torch.randint(0, V, (Ta,), generator=g), torch.randint(0, V, (Tb,), generator=g)
    yb[0] = ya[0]  # exercise the [y_a = y_b] term
    pa, pb = torch.softmax(ha @ W.T, -1), torch.softmax(hb @ W.T, -1)
    return W, ha, pa, ya, hb, pb, yb


@pytest.mark.unit
@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6), st.integers(1, 6), st.integers(2, 9), st.integers(1, 5))
def test_inner_and_cosine_match_autograd(seed, Ta, Tb, V, d):
    W, ha, pa, ya, hb, pb, yb = _setup(seed, Ta, Tb, V, d)
    Ga, Gb = _per_token_head_grads(W, ha, ya), _per_token_head_grads(W, hb, yb)
    torch.testing.assert_close(head_gradient_inner(ha, pa, ya, hb, pb, yb), Ga @ Gb.T, atol=1e-10, rtol=1e-9)
    ref_cos = torch.nn.functional.cosine_similarity(Ga[:, None, :], Gb[None, :, :], dim=-1, eps=1e-300)
    torch.testing.assert_close(head_gradient_cosine(ha, pa, ya, hb, pb, yb), ref_cos, atol=1e-9, rtol=1e-8)
    torch.testing.assert_close(head_gradient_sqnorm(ha, pa, ya), (Ga * Ga).sum(-1), atol=1e-10, rtol=1e-9)
    # The head-gradient bound holds for every pair.
    assert ((Ga @ Gb.T).abs() <= head_gradient_bound(ha, pa, ya, hb, pb, yb) + 1e-10).all()


@pytest.mark.unit
def test_group_alignment_and_nthr_match_autograd():
    W, hp, pp, yp, hn, pn, yn = _setup(3, 7, 5, 11, 6)
    Gp, Gn = _per_token_head_grads(W, hp, yp), _per_token_head_grads(W, hn, yn)
    wp, wn = torch.rand(7, dtype=torch.float64), -torch.rand(5, dtype=torch.float64)
    a = group_gradient_alignment(hp, pp, yp, wp, hn, pn, yn, wn, chunk=3)
    Sp, Sn = wp @ Gp, wn @ Gn
    assert a.inner == pytest.approx(float(Sp @ Sn), rel=1e-9)
    assert a.cosine == pytest.approx(float(Sp @ Sn / Sp.norm() / Sn.norm()), rel=1e-9)
    assert a.norm_pos == pytest.approx(float(Sp.norm()), rel=1e-9)

    s = nthr_scores(hn, pn, yn, hp, pp, yp, chunk=2)
    torch.testing.assert_close(s, (Gp @ Gn.T).sum(0))
    resp = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    pos_scores = (Gp @ Gp.T).sum(1)
    ref_tau = min(float(pos_scores[resp == r].mean()) for r in range(3))
    assert nthr_threshold(hp, pp, yp, resp, beta=0.5) == pytest.approx(0.5 * ref_tau, rel=1e-9)


@pytest.mark.unit
def test_nthr_token_weights_batch_layout():
    g = torch.Generator().manual_seed(0)
    B, T, d, V = 6, 4, 5, 9
    h = torch.randn(B, T, d, generator=g)
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[3, 2:] = False
    is_pos = torch.tensor([True, False, False, False, True, True])
    gids = torch.tensor([0, 0, 0, 1, 1, 1])
    out = nthr_token_weights(h, logits, labels, mask, is_pos, gids)
    # group 0: p_hat = 1/3 -> eta = 1/3; group 1: p_hat = 2/3 -> eta = 1/3
    assert [gr["eta"] for gr in out.groups] == pytest.approx([1 / 3, 1 / 3])
    assert (out.weights[is_pos] == 1).all() and (out.weights[3, 2:] == 1).all()
    assert torch.isnan(out.scores[3, 2:]).all() and torch.isnan(out.scores[0]).all()
    # flagged tokens are exactly those above the group's threshold
    for gr in out.groups:
        rows = (gids == gr["group_id"]) & ~is_pos
        sc = out.scores[rows][mask[rows]]
        assert torch.equal(out.flagged[rows][mask[rows]], sc > gr["tau"])
    # single group recomputed alone gives the same result (no cross-group leakage)
    alone = nthr_token_weights(h[:3], logits[:3], labels[:3], mask[:3], is_pos[:3], gids[:3])
    torch.testing.assert_close(alone.weights, out.weights[:3])


@pytest.mark.unit
@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 8), st.integers(1, 8), st.integers(2, 12), st.integers(1, 12))
def test_alignment_bounds_never_violated(seed, Tp, Tn, d, k):
    g = torch.Generator().manual_seed(seed)
    k = min(k, d)
    scale = torch.rand(d, generator=g, dtype=torch.float64) * 10
    xp = torch.randn(Tp, d, generator=g, dtype=torch.float64) * scale
    xn = torch.randn(Tn, d, generator=g, dtype=torch.float64) * scale
    basis = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64)).Q
    true = (xp @ xn.T).abs()
    tight = alignment_bound(xp, xn, basis)
    paper = alignment_bound_paper(xp, xn, basis)
    assert (true <= tight * (1 + 1e-12) + 1e-12).all()
    assert (tight <= paper * (1 + 1e-12) + 1e-12).all()
    # k = d: the projector is the identity and the tight bound is plain Cauchy–Schwarz
    full = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    cs = xp.norm(dim=-1)[:, None] * xn.norm(dim=-1)[None, :]
    torch.testing.assert_close(alignment_bound(xp, xn, full), cs)


@pytest.mark.unit
def test_bound_with_fitted_subspace_is_tight_inside():
    # Vectors that lie inside S: the bound reduces to ||x⁺||·||x⁻|| and is attained by parallel vectors.
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 6, generator=g, dtype=torch.float64)
    xp = torch.randn(10, 2, generator=g, dtype=torch.float64) @ base
    sub = positive_subspace(xp, rank=2, svd="exact", center=False)
    b = alignment_bound(xp[:1], 3 * xp[:1], sub.basis)
    assert b.item() == pytest.approx(abs(float(xp[0] @ (3 * xp[0]))), rel=1e-10)


@pytest.mark.unit
def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="expected h"):
        head_gradient_inner(torch.zeros(2, 3), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long),
                            torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))


@pytest.mark.unit
def test_near_deterministic_float32_probabilities_stay_accurate():
    # p[y] ≈ 1: the textbook 1 − 2p[y] + ||p||² cancels in float32; the split form must not.
    g = torch.Generator().manual_seed(0)
    V, d = 50, 6
    z = torch.randn(8, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (8,), generator=g)
    z[torch.arange(8), y] += 18.0  # p[y] ≈ 1 − 1e-7
    p64 = torch.softmax(z, -1)
    h = torch.randn(8, d, generator=g, dtype=torch.float64)
    ref = head_gradient_cosine(h, p64, y, h, p64, y)
    cos32 = head_gradient_cosine(h.float(), p64.float(), y, h.float(), p64.float(), y)
    assert cos32.abs().max() <= 1 + 1e-5
    torch.testing.assert_close(cos32.double(), ref, atol=1e-3, rtol=1e-3)
    sq32 = head_gradient_sqnorm(h.float(), p64.float(), y)
    torch.testing.assert_close(sq32.double(), head_gradient_sqnorm(h, p64, y), rtol=1e-3, atol=0)


def _kth_quantiles(x: torch.Tensor, quantiles) -> list[float]:
    """Reference: two kthvalue selections per quantile over the whole tensor, np.quantile's interpolation."""
    flat, out = x.reshape(-1), []
    n = flat.numel()
    for q in quantiles:
        idx = q * (n - 1)
        lo, hi = int(idx // 1), min(n - 1, int(-(-idx // 1)))
        a = float(flat.kthvalue(lo + 1).values)
        b = a if hi == lo else float(flat.kthvalue(hi + 1).values)
        out.append(a + (b - a) * (idx - lo))
    return out


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["normal", "ties", "tiny", "one", "mostly_zero", "negative", "wide"])
def test_streaming_quantiles_are_exact_in_any_chunking(dtype, case):
    import numpy as np

    from resrl_analysis.interference import device_quantiles, streaming_quantiles

    g = torch.Generator().manual_seed(7)
    # 2,001 distinct values need every 16-bit pass (4 for float64) with several prefixes per pass; chunks of one
    # value make each pass thousands of histogram updates, so larger sets only cost time.
    x = {"normal": torch.randn(2_001, generator=g, dtype=torch.float64),
         "ties": torch.tensor([0.0, -0.0, 0.0, 1, 1, 1, -2, 1, 1]),
         "tiny": torch.randn(9, generator=g, dtype=torch.float64) * 1e-30,
         "one": torch.tensor([3.0]),
         "mostly_zero": torch.cat([torch.zeros(1000), torch.randn(11, generator=g)]),
         "negative": -torch.rand(777, generator=g, dtype=torch.float64) * 1e6,
         # chunks big enough that a pass adds whole histograms (bincount), not counts one by one
         "wide": torch.randn(200_001, generator=g, dtype=torch.float64)}[case].to(dtype)
    qs = [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0]
    ref = _kth_quantiles(x, qs)
    assert device_quantiles(x, qs) == ref
    for size in (1, 3, 1000) if len(x) < 10_000 else (len(x), 9_000):
        assert streaming_quantiles(lambda s=size: x.split(s), qs) == ref
    np.testing.assert_allclose(ref, np.quantile(x.double().numpy(), qs), rtol=1e-12, atol=0)


@pytest.mark.unit
def test_streaming_quantiles_refuse_an_empty_stream():
    from resrl_analysis.interference import streaming_quantiles

    with pytest.raises(ValueError, match="no values"):
        streaming_quantiles(lambda: iter([torch.zeros(0)]), [0.5])


@pytest.mark.unit
def test_row_blocks_cover_the_rows_within_the_budget():
    from resrl_analysis.interference import row_blocks

    for n_rows, n_cols, budget in ((1, 1, 1), (10, 3, 40), (1000, 17, 4096), (5, 1000, 8)):
        blocks = row_blocks(n_rows, n_cols, 4, budget)
        covered = [i for b in blocks for i in range(b.start, b.stop)]
        assert covered == list(range(n_rows))
        assert all((b.stop - b.start) * n_cols * 4 <= budget or b.stop - b.start == 1 for b in blocks)


@pytest.mark.unit
def test_streaming_quantiles_of_several_streams_in_the_same_passes():
    from resrl_analysis.interference import device_quantiles, streaming_quantiles

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5000, generator=g), torch.randn(333, generator=g, dtype=torch.float64)
    qs = [0.1, 0.5, 0.99]
    # Chunks of different lengths per stream, one stream's chunk empty: each stream as if alone.
    got = streaming_quantiles(lambda: [(a[:4000], b[:0]), (a[4000:], b)], qs, streams=2)
    assert got == [device_quantiles(a, qs), device_quantiles(b, qs)]
    with pytest.raises(ValueError, match="mixed"):
        streaming_quantiles(lambda: [a[:3], b[:3]], qs)
