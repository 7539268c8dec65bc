"""Subspace probe: residuals against the weighting core, the bound (property-based), Spearman against scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from resrl_analysis.probes.capture import forward_group
from resrl_analysis.probes.subspace import ALL_REPRESENTATIONS, Representation, spearman, subspace_probe
from resrl_analysis.probes.synthetic import random_probe_set, tiny_model
from resrl_analysis.weighting import ResRLWeightConfig, explained_variance, layer_norm_no_affine, resrl_weight_details

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=4, dtype=torch.float64)


def test_spearman_against_scipy_and_monotone_data():
    x = np.arange(10.0)
    assert spearman(x, np.exp(x))[0] == pytest.approx(1.0)
    assert spearman(x, -(x**3))[0] == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=30), rng.normal(size=30)
    want = stats.spearmanr(a, b)
    assert spearman(a, b) == pytest.approx((want.statistic, want.pvalue))
    assert all(np.isnan(spearman([1, 2], [3, 4])))
    assert all(np.isnan(spearman([1, 2, 3], [5, 5, 5])))


def test_residuals_and_weights_match_the_weighting_core(model):
    ps = random_probe_set([[1, 1, 0, 0, 1, 0], [0, 1, 1, 0]], max_len=5, seed=21)
    cfg = ResRLWeightConfig(rank=3, svd="exact")
    fwds = [forward_group(model, g) for g in ps.groups]
    r = subspace_probe(model, ps, forwards=fwds, config=cfg)
    for f in fwds:
        gids = torch.zeros(f.mask.shape[0], dtype=torch.long)
        for rep in ALL_REPRESENTATIONS:
            hidden = f.penultimate if rep.layer == "penultimate" else f.head_input
            core = resrl_weight_details(hidden, f.mask, f.is_positive, gids, rank=cfg.rank, svd="exact",
                                        layer_norm=rep.layer_norm, center=rep.center)
            neg = ~f.is_positive
            tok = r.tokens[(r.tokens.group_id == f.group.group_id) & (r.tokens.representation == rep.name)]
            np.testing.assert_allclose(tok.residual_energy, core.residuals[neg][f.mask[neg]].numpy(), rtol=1e-6)
            np.testing.assert_allclose(tok.resrl_weight, core.weights[neg][f.mask[neg]].numpy(), rtol=1e-6)
            grow = r.groups[(r.groups.group_id == f.group.group_id) & (r.groups.representation == rep.name)]
            assert int(grow["rank"].iloc[0]) == core.groups[0]["rank"]
            # Explained variance of the same (LayerNorm-ed) positive matrix.
            xp = hidden[f.is_positive][f.mask[f.is_positive]]
            xp = layer_norm_no_affine(xp) if rep.layer_norm else xp
            ev = r.explained_variance[(r.explained_variance.group_id == f.group.group_id)
                                      & (r.explained_variance.representation == rep.name)]
            np.testing.assert_allclose(ev.explained_variance, explained_variance(xp, 64, center=rep.center).numpy())
            assert np.all(np.diff(ev.explained_variance) >= -1e-12) and ev.explained_variance.iloc[-1] <= 1 + 1e-9


def test_interference_measures_and_correlation(model):
    ps = random_probe_set([[1, 0, 1, 0, 0, 0]], max_len=5, seed=22)
    f = forward_group(model, ps.groups[0])
    r = subspace_probe(model, ps, forwards=[f], representations=[Representation("head_input", False, False)])
    W = model.get_output_embeddings().weight
    grads, is_pos = [], []
    P = len(ps.groups[0].prompt_ids)
    for i, resp in enumerate(ps.groups[0].response_ids):
        ids = torch.tensor([list(ps.groups[0].prompt_ids) + list(resp)])
        lp = torch.log_softmax(model(ids).logits[0, P - 1 : P - 1 + len(resp)], -1)
        for t, y in enumerate(resp):
            grads.append(torch.autograd.grad(lp[t, y], W, retain_graph=True)[0].reshape(-1))
            is_pos.append(ps.groups[0].is_positive[i])
    Gm, m = torch.stack(grads), torch.tensor(is_pos)
    K = (Gm[m] @ Gm[~m].T).abs()  # (Tp, Tn)
    np.testing.assert_allclose(r.tokens.interference_sum_abs, K.sum(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(r.tokens.interference_max_abs, K.max(0).values.numpy(), rtol=1e-6)
    row = r.groups.iloc[0]
    want = stats.spearmanr(r.tokens.residual_energy, r.tokens.interference_sum_abs).statistic
    assert row.spearman_sum == pytest.approx(want)
    c = r.correlation.iloc[0]
    assert c.n_tokens == len(r.tokens) and c.spearman_sum == pytest.approx(want)


_rewards = st.lists(st.lists(st.sampled_from([0.0, 1.0]), min_size=2, max_size=6), min_size=1, max_size=3)


@settings(max_examples=12, deadline=None)
@given(rewards=_rewards, seed=st.integers(0, 10_000), rank=st.integers(1, 8), max_len=st.integers(1, 6))
def test_bound_never_violated(rewards, seed, rank, max_len):
    """The tight (and the paper's) bound hold for every representation; read as a bound on the head
    gradient they hold for the raw head input (whatever the others do, no crash)."""
    model = _prop_model()
    ps = random_probe_set(rewards, max_len=max_len, seed=seed)
    r = subspace_probe(model, ps, config=ResRLWeightConfig(rank=rank, svd="exact"))
    ok = r.groups[r.groups.status == "ok"]
    assert (ok.tight_violations == 0).all() and (ok.paper_violations == 0).all()
    assert (ok.tight_ratio_max.fillna(0) <= 1 + 1e-4).all()  # NaN: every bound is 0 (all pairs 0 too)
    raw = ok[ok.representation == "head_input/raw/uncentred"]
    assert (raw.head_tight_violations == 0).all() and (raw.head_paper_violations == 0).all()
    assert set(r.groups.status) <= {"ok", "no_positive", "no_negative", "too_few_positive_tokens"}
    assert len(r.skipped) == sum(1 for g in ps.groups if g.status != "mixed"
                                 or sum(len(y) for y, p in zip(g.response_ids, g.is_positive) if p) < 4)


_PROP_MODEL = {}


def _prop_model():
    # One float32 model for all examples (hypothesis forbids function-scoped fixtures).
    if "m" not in _PROP_MODEL:
        _PROP_MODEL["m"] = tiny_model(seed=5)
    return _PROP_MODEL["m"]


def test_too_few_positive_tokens_is_skipped(model):
    from resrl_analysis.probe_sets import ProbeGroup, ProbeSet

    g = ProbeGroup(0, (1, 5), ((6, 2), (7, 8, 9, 2)), (1.0, 0.0))
    r = subspace_probe(model, ProbeSet((g,)))
    assert set(r.groups.status) == {"too_few_positive_tokens"} and len(r.groups) == 8
    assert r.skipped[0]["reason"] == "too_few_positive_tokens" and len(r.correlation) == 0


def test_pair_samples_hold_measured_pairs_under_their_bounds():
    from transformers import LlamaConfig, LlamaForCausalLM

    from resrl_analysis.probe_sets import ProbeGroup, ProbeSet
    from resrl_analysis.probes import subspace_probe

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1)).eval()
    ps = ProbeSet((ProbeGroup(0, (1, 5), ((6, 3, 2), (4, 5, 2), (7, 8, 2), (9, 2)), (1.0, 1.0, 0.0, 0.0)),))
    r = subspace_probe(m, ps, max_pair_samples=4)
    p = r.pairs
    assert len(p) == 4 * p.representation.nunique() and p.representation.nunique() == 8
    assert (p.true_abs <= p.tight_bound * (1 + 1e-5) + 1e-6).all()
    assert (p.tight_bound <= p.paper_bound * (1 + 1e-5) + 1e-6).all()
    raw = p[p.representation == "head_input/raw/uncentred"]
    assert len(raw) == 4, sorted(p.representation.unique())
    assert (raw.head_abs <= raw.head_tight_bound * (1 + 1e-5) + 1e-6).all()


def test_pair_pass_streams_like_the_whole_matrices_and_skips_zero_bounds():
    """_pair_pass over row blocks against the same statistics from whole (Tp, Tn) matrices, with negatives
    that are zero vectors (their bounds are 0: no ratio), and with every bound 0 (NaN ratios)."""
    import numpy as np
    import torch

    from resrl_analysis.bounds import alignment_bound, alignment_bound_paper
    from resrl_analysis.interference import GroupGrams
    from resrl_analysis.probes.subspace import _pair_pass

    g = torch.Generator().manual_seed(0)
    Tp, Tn, d = 7, 5, 4
    xp, xn = torch.randn(Tp, d, generator=g, dtype=torch.float64), torch.randn(Tn, d, generator=g, dtype=torch.float64)
    xn[1] = 0.0
    basis = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64)).Q
    N = Tp + Tn
    inner = torch.randn(N, N, generator=g, dtype=torch.float64)
    gr = GroupGrams(inner=inner, logit_sqnorm=torch.rand(N, generator=g, dtype=torch.float64),
                    rep_sqnorm=torch.rand(N, generator=g, dtype=torch.float64), row=torch.zeros(N, dtype=torch.long),
                    pos=torch.arange(N), y=torch.arange(N), n_pos=Tp)
    lf, hn = gr.logit_sqnorm.sqrt(), gr.rep_sqnorm.sqrt()
    blocks = [slice(0, 2), slice(2, 4), slice(4, 7)]
    out = _pair_pass(gr, xp, xn, basis, lf, hn, blocks, 1e-4, 10, group_id=3)
    whole = _pair_pass(gr, xp, xn, basis, lf, hn, [slice(0, Tp)], 1e-4, 10, group_id=3)
    for k, v in whole["counts"].items():
        assert out["counts"][k] == pytest.approx(v, rel=1e-12), k
    for k, v in whole["sample"].items():
        torch.testing.assert_close(out["sample"][k], v)
    true, tight, paper = (xp @ xn.T).abs(), alignment_bound(xp, xn, basis), alignment_bound_paper(xp, xn, basis)
    ok = tight > 0
    assert int((~ok).sum()) == Tp  # the zero negative
    r = (true[ok] / tight[ok]).numpy()
    assert out["counts"]["tight_ratio_median"] == pytest.approx(float(np.median(r)), rel=1e-12)
    assert out["counts"]["tight_ratio_mean"] == pytest.approx(float(r.mean()), rel=1e-12)
    assert out["counts"]["paper_ratio_median"] == pytest.approx(
        float(np.median((true[paper > 0] / paper[paper > 0]).numpy())), rel=1e-12)
    none = _pair_pass(gr, xp, torch.zeros_like(xn), basis, lf, hn, blocks, 1e-4, 10, group_id=3)["counts"]
    assert np.isnan(none["tight_ratio_median"]) and np.isnan(none["paper_ratio_mean"])
    assert none["tight_violations"] == 0
