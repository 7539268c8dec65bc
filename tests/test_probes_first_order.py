"""First-order prediction against per-token autograd and against real SGD steps (head only, full model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resrl_analysis.ops import group_advantages
from resrl_analysis.probes.capture import forward_group
from resrl_analysis.probes.first_order import (
    ALGORITHMS,
    AdvantageOptions,
    first_order_prediction,
    full_step_delta,
    head_step_delta,
    predict_delta,
    token_advantages,
)
from resrl_analysis.probes.synthetic import random_probe_set, tiny_model
from resrl_analysis.weighting import ResRLWeightConfig, resrl_weight_details

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def setup():
    model = tiny_model(seed=0, dtype=torch.float64)
    ps = random_probe_set([[1, 1, 0, 0, 0, 1]], max_len=5, seed=7)
    return model, ps, forward_group(model, ps.groups[0])


def _per_token_head_grads(model, fwd) -> torch.Tensor:
    """Slow reference: autograd of each response token's log p[y] w.r.t. the head matrix → (N, V·d)."""
    W = model.get_output_embeddings().weight
    out = []
    for resp in fwd.group.response_ids:
        ids = torch.tensor([list(fwd.group.prompt_ids) + list(resp)])
        P = len(fwd.group.prompt_ids)
        logits = model(ids).logits[0, P - 1 : P - 1 + len(resp)]
        lp = torch.log_softmax(logits, -1)
        for t, y in enumerate(resp):
            (g,) = torch.autograd.grad(lp[t, y], W, retain_graph=True)
            out.append(g.reshape(-1))
    return torch.stack(out)


@pytest.mark.parametrize("algorithm", ["grpo", "nsr", "resrl", "nthr"])
def test_prediction_matches_autograd_reference(setup, algorithm):
    model, ps, fwd = setup
    lr = 0.01
    adv = token_advantages(fwd, algorithm)
    from_pos, from_neg = predict_delta(fwd, adv, lr)
    Gm = _per_token_head_grads(model, fwd)  # (N, V*d)
    a = adv[fwd.mask].double()  # (N,)
    row = fwd.tokens(torch.arange(fwd.mask.shape[0]))["row"]
    pos = fwd.is_positive[row]
    K = Gm @ Gm.T  # (N, N)
    for i in range(fwd.mask.shape[0]):
        mine = row == i
        want_pos = lr / len(a) * (K[mine][:, pos] @ a[pos]).sum()
        want_neg = lr / len(a) * (K[mine][:, ~pos] @ a[~pos]).sum()
        assert float(from_pos[i]) == pytest.approx(float(want_pos), rel=1e-8, abs=1e-12)
        assert float(from_neg[i]) == pytest.approx(float(want_neg), rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("algorithm", ["grpo", "w-reinforce", "resrl", "nthr"])
def test_head_step_agrees_to_first_order(setup, algorithm):
    """|actual − predicted| / |predicted| shrinks linearly with η (float64 throughout)."""
    model, ps, fwd = setup
    adv = token_advantages(fwd, algorithm)
    head = model.get_output_embeddings()
    errs = []
    for lr in (1e-1, 1e-2, 1e-3):
        fp, fn = predict_delta(fwd, adv, lr)
        pred = fp + fn
        act = head_step_delta(fwd, adv, lr, head, dtype=torch.float64)
        errs.append(float((act - pred).norm() / pred.norm()))
    assert errs[2] < 5e-3
    for big, small in zip(errs, errs[1:]):
        assert 0.05 < small / big < 0.2, errs  # ~0.1 per decade: linear, not worse, not better


def test_full_step_restores_model_and_matches_head_when_only_head_trains(setup):
    model, ps, fwd = setup
    adv = token_advantages(fwd, "grpo")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    act_full = full_step_delta(model, fwd, adv, 1e-3)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert torch.isfinite(act_full).all()
    # With only the head trainable, a whole-model step is a head step.
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n == "lm_head.weight")
        only_head = full_step_delta(model, fwd, adv, 1e-3)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    head = head_step_delta(fwd, adv, 1e-3, model.get_output_embeddings())
    # full_step_delta scores with ops.token_logprobs, float32 inside: agreement to float32 rounding.
    torch.testing.assert_close(only_head.double(), head, atol=3e-6, rtol=1e-4)


def test_token_advantages_wiring(setup):
    model, ps, fwd = setup
    gids = torch.zeros(fwd.mask.shape[0], dtype=torch.long)
    grpo = group_advantages(fwd.rewards, gids, "grpo")
    for alg in ("grpo", "psr", "nsr", "w-reinforce"):
        want = group_advantages(fwd.rewards, gids, alg)[:, None].expand_as(fwd.mask).float() * fwd.mask
        torch.testing.assert_close(token_advantages(fwd, alg), want)
    opts = AdvantageOptions(resrl=ResRLWeightConfig(rank=4, svd="exact"), pos_weight=0.25)
    w = resrl_weight_details(fwd.penultimate, fwd.mask, fwd.is_positive, gids, rank=4, svd="exact").weights
    want = grpo[:, None] * w * torch.where(fwd.is_positive, 0.25, 1.0)[:, None] * fwd.mask
    torch.testing.assert_close(token_advantages(fwd, "resrl", opts), want.float())
    nthr = token_advantages(fwd, "nthr")
    ratio = (nthr / (grpo[:, None] * fwd.mask))[fwd.mask]
    eta = 2 * abs(0.5 - float(fwd.is_positive.float().mean()))
    assert all(abs(r - 1) < 1e-6 or abs(r - eta) < 1e-6 for r in ratio.tolist())


def test_first_order_result(setup):
    model, ps, fwd = setup
    r = first_order_prediction(model, ps, lr=1e-3, full_step=True)
    df = r.to_frame()
    assert sorted(df.algorithm.unique()) == sorted(ALGORITHMS) and len(df) == len(ALGORITHMS) * 6
    np.testing.assert_allclose(df.predicted, df.predicted_from_pos + df.predicted_from_neg, atol=1e-12)
    np.testing.assert_allclose(df.actual_head, df.predicted, rtol=0.05, atol=1e-6)
    assert np.isfinite(df.actual_full).all()
    psr = df[df.algorithm == "psr"]
    assert (psr.predicted_from_neg == 0).all()
    nsr = df[df.algorithm == "nsr"]
    assert (nsr.predicted_from_pos == 0).all()
    assert set(r.groups.status) == {"mixed"} and r.groups.loss_tokens.iloc[0] == int(fwd.mask.sum())
