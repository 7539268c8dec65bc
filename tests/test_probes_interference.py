"""Interference probe against per-token autograd gradients of the LM head weight (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resrl_analysis.ops import group_advantages
from resrl_analysis.probes.capture import forward_group
from resrl_analysis.probes.interference import QUANTILES, interference_probe
from resrl_analysis.probes.synthetic import random_probe_set, tiny_model
from resrl_analysis.results import InterferenceResult

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1, dtype=torch.float64)


def _reference(model, group):
    """Per token: autograd ∇_W log p[y] (flattened), its response index and position."""
    W = model.get_output_embeddings().weight
    grads, rows, pos = [], [], []
    P = len(group.prompt_ids)
    for i, resp in enumerate(group.response_ids):
        ids = torch.tensor([list(group.prompt_ids) + list(resp)])
        lp = torch.log_softmax(model(ids).logits[0, P - 1 : P - 1 + len(resp)], -1)
        for t, y in enumerate(resp):
            (g,) = torch.autograd.grad(lp[t, y], W, retain_graph=True)
            grads.append(g.reshape(-1))
            rows.append(i)
            pos.append(t)
    return torch.stack(grads), np.array(rows), np.array(pos)


def test_interference_matches_autograd(model):
    ps = random_probe_set([[1, 0, 0, 1, 0], [0, 1, 0], [0, 0, 0]], max_len=5, seed=11)
    r = interference_probe(model, ps, full_model=True, max_cosine_samples=10_000)
    groups = r.groups.set_index("group_id")
    for g in ps.groups[:2]:
        Gm, rows, pos = _reference(model, g)
        is_pos = np.array(g.is_positive)[rows]
        Gp, Gn = Gm[torch.from_numpy(is_pos)], Gm[torch.from_numpy(~is_pos)]
        cos = (Gp @ Gn.T) / (Gp.norm(dim=1)[:, None] * Gn.norm(dim=1)[None, :])  # (Tp, Tn)
        c = cos.numpy()
        row = groups.loc[g.group_id]
        assert row.status == "ok" and row.n_pos_tokens == len(Gp) and row.n_neg_tokens == len(Gn)
        assert row.cos_mean == pytest.approx(c.mean(), abs=1e-9)
        assert row.cos_frac_positive == pytest.approx((c > 0).mean())
        for q in QUANTILES:
            assert row[f"cos_q{round(q * 100):02d}"] == pytest.approx(np.quantile(c, q), abs=1e-9)
        # Group level: the advantage-weighted positive and negative parts of the update.
        adv = group_advantages(torch.tensor(g.rewards), torch.zeros(len(g.rewards), dtype=torch.long))
        a = adv.double()[torch.from_numpy(rows)]
        Up = (a[torch.from_numpy(is_pos)][:, None] * Gp).sum(0)
        Un = (a[torch.from_numpy(~is_pos)][:, None] * Gn).sum(0)
        assert row.head_update_inner == pytest.approx(float(Up @ Un), rel=1e-8)
        assert row.head_update_cosine == pytest.approx(float(Up @ Un / (Up.norm() * Un.norm())), rel=1e-8)
        # Autograd over the whole model, restricted to the (untied) head, is the same picture.
        assert row.full_head_cosine == pytest.approx(row.head_update_cosine, abs=1e-5)
        assert -1 <= row.full_update_cosine <= 1
        # Per negative token: cosines with the positives and the NTHR score Σ <g⁺, g⁻>.
        tok = r.tokens[r.tokens.group_id == g.group_id]
        assert list(zip(tok.response_index, tok.position)) == list(zip(rows[~is_pos], pos[~is_pos]))
        np.testing.assert_allclose(tok.cos_mean, c.mean(0), atol=1e-9)
        np.testing.assert_allclose(tok.cos_max, c.max(0), atol=1e-9)
        np.testing.assert_allclose(tok.nthr_score, (Gp @ Gn.T).sum(0).numpy(), rtol=1e-5, atol=1e-6)
        assert len(r.cosine_samples[r.cosine_samples.group_id == g.group_id]) == c.size
    assert groups.loc[2].status == "no_positive"
    assert r.skipped == [{"step": 0, "group_id": 2, "reason": "no_positive"}]


def test_cosine_samples_are_bounded_and_seeded(model):
    ps = random_probe_set([[1, 1, 0, 0, 0, 0]], max_len=5, seed=12)
    a = interference_probe(model, ps, max_cosine_samples=7, seed=3, step=4)
    b = interference_probe(model, ps, max_cosine_samples=7, seed=3, step=4)
    assert len(a.cosine_samples) == 7 and a.cosine_samples.cosine.tolist() == b.cosine_samples.cosine.tolist()
    assert set(a.groups.step) == {4} and np.isnan(a.groups.full_update_cosine).all()


def test_no_mixed_groups_skips_without_crash(model, tmp_path):
    ps = random_probe_set([[1, 1], [0, 0, 0]], seed=13)
    r = interference_probe(model, ps, full_model=True)
    assert r.groups.status.tolist() == ["no_negative", "no_positive"]
    assert len(r.tokens) == 0 and len(r.cosine_samples) == 0
    assert [s["reason"] for s in r.skipped] == ["no_negative", "no_positive"]
    back = InterferenceResult.load(r.save(tmp_path / "i"))
    assert back.groups.status.tolist() == ["no_negative", "no_positive"]


def test_tied_head_is_reported():
    m = tiny_model(seed=2, tie_word_embeddings=True)
    ps = random_probe_set([[1, 0, 0]], seed=14)
    r = interference_probe(m, ps, forwards=[forward_group(m, ps.groups[0])])
    assert r.meta["tied_embeddings"] is True and r.groups.status.tolist() == ["ok"]
