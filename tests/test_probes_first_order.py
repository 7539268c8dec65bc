"""First-order prediction against per-token autograd and against real SGD steps (head only, full model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resrl_analysis.ops import group_advantages
from resrl_analysis.probes.capture import forward_group
from resrl_analysis.probes.first_order import (
    ALGORITHMS,
    DEFAULT_ALGORITHMS,
    AdvantageOptions,
    first_order_prediction,
    full_step_delta,
    full_step_deltas,
    head_step_delta,
    head_step_deltas,
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
    assert sorted(df.algorithm.unique()) == sorted(DEFAULT_ALGORITHMS) and len(df) == len(DEFAULT_ALGORITHMS) * 6
    np.testing.assert_allclose(df.predicted, df.predicted_from_pos + df.predicted_from_neg, atol=1e-12)
    np.testing.assert_allclose(df.actual_head, df.predicted, rtol=0.05, atol=1e-6)
    assert np.isfinite(df.actual_full).all()
    psr = df[df.algorithm == "psr"]
    assert (psr.predicted_from_neg == 0).all()
    nsr = df[df.algorithm == "nsr"]
    assert (nsr.predicted_from_pos == 0).all()
    assert set(r.groups.status) == {"mixed"} and r.groups.loss_tokens.iloc[0] == int(fwd.mask.sum())


# ----------------------------------------------------------------------------- the real steps against the
# autograd versions they replaced (kept here as the slow references).


def old_head_step_delta(fwd, advantages, lr, head, *, dtype=None):
    """The head-only step by autograd, chunk by chunk (the implementation before the closed form)."""
    G = fwd.mask.shape[0]
    tok = fwd.tokens(torch.arange(G, device=fwd.mask.device), with_logits=False)
    cdt = dtype or torch.promote_types(tok["h"].dtype, torch.float32)
    h, y, row = tok["h"].to(cdt), tok["y"], tok["row"]
    a = advantages[fwd.mask].to(cdt)
    bias = head.bias.detach().to(cdt) if getattr(head, "bias", None) is not None else None
    W = head.weight.detach().to(cdt).clone().requires_grad_(True)

    def logp_chunk(Wm, s, chunk):
        z = h[s : s + chunk] @ Wm.T
        z = z + bias if bias is not None else z
        return torch.log_softmax(z, -1).gather(-1, y[s : s + chunk, None]).squeeze(-1)

    N, chunk = h.shape[0], 3  # small chunks: the chunked accumulation is exercised too
    g = torch.zeros_like(W)
    lp0 = torch.empty(N, dtype=cdt)
    with torch.enable_grad():
        for s in range(0, N, chunk):
            lp = logp_chunk(W, s, chunk)
            (part,) = torch.autograd.grad(-(a[s : s + chunk] * lp).sum() / N, W)
            g += part
            lp0[s : s + chunk] = lp.detach()
    with torch.no_grad():
        W1 = W.detach() - lr * g
        lp1 = torch.cat([logp_chunk(W1, s, chunk) for s in range(0, N, chunk)])
    return torch.zeros(G, dtype=cdt).index_add_(0, row, lp1 - lp0)


def old_full_step_delta(model, fwd, advantages, lr, *, pad_id=0):
    """The whole-model step by autograd through the whole model, one batch (before the closed-form head)."""
    from resrl_analysis.forward import response_forward
    from resrl_analysis.probes.capture import group_batch

    batch = group_batch(fwd.group, "cpu", pad_id)
    mask, adv = batch.mask, advantages
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        lp = response_forward(model, batch.rows).logp
        loss = -(adv * lp * mask).sum() / mask.sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    lp0 = (lp.detach() * mask).sum(1).float()
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p.add_(g, alpha=-lr)
            lp1 = (response_forward(model, batch.rows).logp * mask).sum(1).float()
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return lp1 - lp0


@pytest.fixture(scope="module", params=["untied", "tied"])
def step_setup(request):
    model = tiny_model(seed=3, dtype=torch.float64, tie_word_embeddings=request.param == "tied")
    ps = random_probe_set([[1, 0, 1, 0, 0]], max_len=6, seed=11)
    return model, ps, forward_group(model, ps.groups[0])


def test_head_steps_equal_the_autograd_reference(step_setup):
    model, ps, fwd = step_setup
    head = model.get_output_embeddings()
    advs = [token_advantages(fwd, alg).double() for alg in ALGORITHMS]
    both = head_step_deltas(fwd, advs, 0.3, head, dtype=torch.float64)  # (G, n)
    assert both.shape == (fwd.mask.shape[0], len(ALGORITHMS))
    for k, adv in enumerate(advs):
        want = old_head_step_delta(fwd, adv, 0.3, head, dtype=torch.float64)
        assert float(want.abs().max()) > 1e-4  # a step that moves something
        torch.testing.assert_close(both[:, k], want, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(head_step_delta(fwd, adv, 0.3, head, dtype=torch.float64), want,
                                   rtol=1e-10, atol=1e-13)


def test_head_step_with_a_bias_equals_the_autograd_reference(step_setup):
    model, ps, fwd = step_setup
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(model.get_output_embeddings().weight)
        head.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    adv = token_advantages(fwd, "grpo").double()
    torch.testing.assert_close(head_step_delta(fwd, adv, 0.5, head), old_head_step_delta(fwd, adv, 0.5, head),
                               rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("micro_batch", [None, 2])
def test_full_steps_equal_the_autograd_reference(step_setup, micro_batch):
    from resrl_analysis.probes.first_order import _closed_form_head_ok

    model, ps, fwd = step_setup
    assert _closed_form_head_ok(model, fwd)  # the closed-form head path is the one tested here
    advs = [token_advantages(fwd, alg).double() for alg in ("grpo", "nsr", "resrl")]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = full_step_deltas(model, fwd, advs, 0.05, micro_batch=micro_batch)  # (G, 3)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    for k, adv in enumerate(advs):
        want = old_full_step_delta(model, fwd, adv, 0.05)
        assert float(want.abs().max()) > 1e-4
        # Both score with ops.token_logprobs (float32 inside): agreement to float32 rounding of log π.
        torch.testing.assert_close(got[:, k], want, rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(full_step_delta(model, fwd, advs[0], 0.05), got[:, 0], rtol=1e-6, atol=1e-9)


def test_full_step_with_a_capped_head_takes_the_autograd_path():
    """A head whose logits are not W h (Gemma-2's soft-capping) cannot use the closed form; same result."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    from resrl_analysis.probes.first_order import _closed_form_head_ok

    cfg = Gemma2Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.5,
                       attn_implementation="eager")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).double().eval()
    ps = random_probe_set([[1, 0, 0, 1]], max_len=5, seed=2)
    fwd = forward_group(model, ps.groups[0])
    assert not _closed_form_head_ok(model, fwd)
    adv = token_advantages(fwd, "grpo").double()
    torch.testing.assert_close(full_step_delta(model, fwd, adv, 0.05), old_full_step_delta(model, fwd, adv, 0.05),
                               rtol=1e-6, atol=1e-9)


def test_first_order_real_steps_equal_the_references(step_setup):
    model, ps, fwd = step_setup
    algs = ["grpo", "w-reinforce", "nthr"]
    r = first_order_prediction(model, ps, forwards=[fwd], algorithms=algs, lr=0.05, full_step=True,
                               head_step_dtype=torch.float64).predictions
    head = model.get_output_embeddings()
    for alg in algs:
        adv = token_advantages(fwd, alg).double()
        rows = r[r.algorithm == alg].sort_values("response_index")
        np.testing.assert_allclose(rows.actual_head, old_head_step_delta(fwd, adv, 0.05, head).numpy(),
                                   rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(rows.actual_full, old_full_step_delta(model, fwd, adv, 0.05).numpy(),
                                   rtol=1e-4, atol=2e-6)


def test_advantage_basis_is_exact_and_smaller_for_response_level_columns():
    from resrl_analysis.probes.first_order import _advantage_basis

    g = torch.Generator().manual_seed(0)
    row = torch.tensor([0, 0, 0, 2, 2, 3, 3, 3])  # response 1 has no tokens
    resp = torch.tensor([[1.0, -2.0, 0.5], [9.0, 9.0, 9.0], [-1.0, 3.0, 0.5], [1.0, -2.0, 0.5]])  # (G, 3)
    tok = torch.randn(8, 2, generator=g, dtype=torch.float64)
    A = torch.cat([resp.double()[row], tok], 1)  # (N, 5): 3 response-level columns in 2 classes, 2 token-level
    B, C = _advantage_basis(A, row, 4)
    assert B.shape == (8, 4) and torch.equal(B @ C, A) and torch.isfinite(C).all()
    # Nothing to gain (every response its own class): the identity factorisation.
    A3 = torch.randn(8, 3, generator=g, dtype=torch.float64)
    B, C = _advantage_basis(A3, torch.arange(8), 8)
    assert torch.equal(B, A3) and torch.equal(C, torch.eye(3, dtype=A.dtype))
