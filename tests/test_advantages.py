"""The advantage registry (resrl_analysis.advantages): hand-computed cases and slow references, defaults
declared once, and the trainer's and the first-order probe's advantages identical."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resrl_analysis.advantages import ALGORITHMS, AlgoInputs, get_algorithm, params_from_config
from trainer.config import ALGORITHM_NAMES

pytestmark = pytest.mark.unit


def _inputs(rewards, groups, lengths, T=4, params=None, **kw) -> AlgoInputs:
    kw["params"] = params_from_config(params or {})
    lengths = torch.tensor(lengths)
    mask = torch.arange(T)[None] < lengths[:, None]
    return AlgoInputs(rewards=torch.tensor(rewards, dtype=torch.float32), group_ids=torch.tensor(groups),
                      response_ids=torch.zeros(len(rewards), T, dtype=torch.long), response_mask=mask, **kw)


def test_registry_holds_every_algorithm_with_a_docstring_saying_how_it_differs():
    assert set(ALGORITHMS) == set(ALGORITHM_NAMES)
    for name, algo in ALGORITHMS.items():
        doc = algo.fn.__doc__ or ""
        assert doc.strip(), name
        assert "GRPO" in doc or name == "grpo" or "no baseline" in doc or "no group" in doc, name
    with pytest.raises(ValueError, match="unknown algorithm"):
        get_algorithm("ppo")


def test_grpo_hand_case():
    out = ALGORITHMS["grpo"].fn(_inputs([1, 0, 0, 0, 1, 1], [0, 0, 0, 0, 7, 7], [2, 1, 3, 4, 1, 2]))
    # group 0: mean 0.25, unbiased std 0.5 → (1 − .25)/.5 = 1.5, (0 − .25)/.5 = −0.5; group 7: std 0 → 0
    np.testing.assert_allclose(out.advantages.numpy(), [1.5, -0.5, -0.5, -0.5, 0, 0], atol=1e-5)
    np.testing.assert_allclose(out.token_advantages[0].numpy(), [1.5, 1.5, 0, 0], atol=1e-5)
    np.testing.assert_allclose(out.token_advantages[3].numpy(), [-0.5] * 4, atol=1e-5)
    assert out.extras == {}


@pytest.mark.parametrize(("name", "expected"), [
    ("psr", [1.0, 0.0, 0.5]),
    ("nsr", [0.0, -1.0, 0.0]),
    ("w-reinforce", [0.1, -1.0, 0.05]),
])
def test_baselines_hand_cases(name, expected):
    # a length-scaled positive reward (0.5) stays positive
    out = ALGORITHMS[name].fn(_inputs([1, 0, 0.5], [0, 0, 0], [1, 2, 3]))
    np.testing.assert_allclose(out.advantages.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(out.token_advantages[1].numpy(), [expected[1]] * 2 + [0, 0], atol=1e-6)


def _resrl_reference(h, mask, rewards, groups, rank, q_low, q_high, min_w):
    """Independent numpy reference: LN → centre → exact SVD → residual energy → quantile map."""
    h = h.double().numpy()
    w = np.ones(mask.shape)
    for g in np.unique(groups):
        rows = np.where(groups == g)[0]
        pos = [r for r in rows if rewards[r] > 0]
        neg = [r for r in rows if rewards[r] <= 0]
        xp = np.concatenate([h[r][mask[r]] for r in pos])
        xn = np.concatenate([h[r][mask[r]] for r in neg])

        def ln(x):
            return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)

        xp, xn = ln(xp), ln(xn)
        mu = xp.mean(0)
        _, _, vt = np.linalg.svd(xp - mu, full_matrices=False)
        k = min(rank, len(xp) - 1, xp.shape[1])
        V = vt[:k].T
        r = (xn - mu) - (xn - mu) @ V @ V.T
        e = (r * r).sum(-1) / xp.shape[1]
        lo, hi = np.quantile(e, q_low), np.quantile(e, q_high)
        om = min_w + (1 - min_w) * np.clip((e - lo) / (hi - lo), 0, 1)
        i = 0
        for r_ in neg:
            n = mask[r_].sum()
            w[r_, : n] = om[i : i + n]
            i += n
    return w


def test_resrl_against_an_independent_reference():
    g = torch.Generator().manual_seed(0)
    B, T, d = 8, 6, 16
    h = torch.randn(B, T, d, generator=g)
    lengths = [6, 5, 4, 6, 6, 3, 5, 6]
    rewards = [1, 1, 0, 0, 1, 0, 1, 0]
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    params = {"resrl_rank": 3, "resrl_svd": "exact", "resrl_pos_weight": 0.1, "resrl_min_weight": 0.1}
    inp = _inputs(rewards, list(groups), lengths, T=T, hidden=h, params=params)
    out = ALGORITHMS["resrl"].fn(inp)
    mask = inp.response_mask.numpy()
    ref = _resrl_reference(h, mask, np.array(rewards), groups, 3, 0.2, 0.8, 0.1)
    np.testing.assert_allclose(out.extras["resrl_weights"].numpy()[mask], ref[mask], atol=1e-5)
    # positives: GRPO advantage (+1 for 2 of 4 correct) × pos_weight, weight 1; negatives: −1 × ω
    adv = out.advantages.numpy()
    grpo = 0.5 / np.std([1, 1, 0, 0], ddof=1)  # 2 of 4 correct: ±0.866
    np.testing.assert_allclose(adv, [0.1 * grpo if r else -grpo for r in rewards], rtol=1e-5)
    tok = out.token_advantages.numpy()
    np.testing.assert_allclose(tok[mask], (adv[:, None] * ref)[mask], rtol=1e-5, atol=1e-6)
    assert (tok[~mask] == 0).all()
    assert np.isnan(out.extras["resrl_residuals"].numpy()[0]).all()  # positives have no residual
    assert np.isfinite(out.extras["resrl_residuals"].numpy()[2][: lengths[2]]).all()


def test_resrl_weights_do_not_depend_on_how_groups_are_chunked():
    # The trainer calls the estimator on chunks of whole groups, with one seed per step.
    g = torch.Generator().manual_seed(1)
    B, T, d = 12, 5, 24
    h = torch.randn(B, T, d, generator=g)
    rewards = [1, 0, 0, 1, 1, 1, 0, 0, 0, 1, 0, 1]
    groups = [0] * 4 + [1] * 4 + [2] * 4
    params = {"resrl_rank": 4}  # lowrank SVD: random, hence the generator
    full = ALGORITHMS["resrl"].fn(_inputs(rewards, groups, [5] * B, T=T, hidden=h, params=params,
                                          generator=torch.Generator().manual_seed(9)))
    parts = [ALGORITHMS["resrl"].fn(_inputs(rewards[s:s + 4], groups[s:s + 4], [5] * 4, T=T, hidden=h[s:s + 4],
                                            params=params, generator=torch.Generator().manual_seed(9)))
             for s in (0, 4, 8)]
    torch.testing.assert_close(torch.cat([p.token_advantages for p in parts]), full.token_advantages)


def _nthr_reference(h, W, y, mask, rewards, groups, beta):
    """Brute force: per-token head gradients by autograd, explicit inner products."""
    B, T, d = h.shape
    flags = np.zeros((B, T), dtype=bool)
    etas = {}
    for gid in np.unique(groups):
        rows = np.where(groups == gid)[0]
        pos = [r for r in rows if rewards[r] > 0]
        neg = [r for r in rows if rewards[r] <= 0]
        etas[gid] = 2 * abs(0.5 - len(pos) / len(rows))

        def grads(rs):
            out = []
            for r in rs:
                for t in range(T):
                    if not mask[r, t]:
                        continue
                    Wp = W.clone().requires_grad_(True)
                    torch.log_softmax(Wp @ h[r, t], -1)[y[r, t]].backward()
                    out.append((r, t, Wp.grad.flatten().double()))
            return out

        gp, gn = grads(pos), grads(neg)
        Gp = torch.stack([x[2] for x in gp])
        per_resp = {}
        for r, _, gvec in gp:
            per_resp.setdefault(r, []).append(float((Gp @ gvec).sum()))
        tau = beta * min(np.mean(v) for v in per_resp.values())
        for r, t, gvec in gn:
            flags[r, t] = float((Gp @ gvec).sum()) > tau
    return flags, etas


def test_nthr_against_brute_force_head_gradients():
    g = torch.Generator().manual_seed(3)
    B, T, d, V = 6, 4, 5, 7
    h = torch.randn(B, T, d, generator=g)
    W = torch.randn(V, d, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    # A negative response that repeats the positive one: its tokens interfere strongly with it
    h[1], y[1] = h[0], y[0]
    logits = h @ W.T  # (B, T, V)
    rewards = [1, 0, 0, 1, 0, 0]
    groups = np.array([0, 0, 0, 5, 5, 5])
    inp = _inputs(rewards, list(groups), [4, 3, 4, 2, 4, 4], T=T, head_input=h, logits=logits)
    inp.response_ids = y
    out = ALGORITHMS["nthr"].fn(inp)
    mask = inp.response_mask.numpy()
    flags, etas = _nthr_reference(h, W, y, mask, np.array(rewards), groups, beta=1.0)
    expected_w = np.where(flags, [[etas[gi]] for gi in groups], 1.0)
    np.testing.assert_allclose(out.extras["nthr_weights"].numpy()[mask], expected_w[mask], atol=1e-6)
    assert flags.any() and (~flags[mask]).any()  # the case exercises both outcomes
    grpo = ALGORITHMS["grpo"].fn(inp)
    np.testing.assert_allclose(out.token_advantages.numpy(), grpo.token_advantages.numpy() * expected_w, atol=1e-6)
