"""The ``entropy_dynamics`` and ``flips`` probes on tiny models: the prediction against real head-only steps, the
whole-model steps shared with ``first_order``, the result tables and correlations, and the flip counts against an
independent count from two checkpoints' teacher-forced log-probs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resrl_analysis.probes import first_order as fo_mod
from resrl_analysis.probes.capture import forward_group
from resrl_analysis.probes.config import ProbeConfig
from resrl_analysis.probes.engine import ProbePass
from resrl_analysis.probes.entropy_dynamics import EntropyDynamicsOptions, correlations, entropy_dynamics
from resrl_analysis.probes.first_order import FirstOrderOptions, full_steps, token_advantages
from resrl_analysis.probes.synthetic import random_probe_set, tiny_model
from resrl_analysis.results import EntropyDynamicsResult, FlipsResult, load_results

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def f64():
    model = tiny_model(seed=0, dtype=torch.float64)
    ps = random_probe_set([[1, 1, 0, 0, 0, 1], [1, 0, 0, 0]], max_len=5, seed=7)
    return model, ps


def test_real_head_step_agrees_with_the_prediction_to_first_order(f64):
    model, ps = f64
    errs = []
    for lr in (1e-3, 5e-4):
        r = entropy_dynamics(model, ps, algorithms=["grpo", "nsr", "resrl"], lr=lr)
        t = r.tokens
        assert t.actual_head.notna().all() and len(t) > 0
        scale = float(t.actual_head.abs().max())
        errs.append(float((t.predicted - t.actual_head).abs().max()) / scale)
    assert errs[0] < 0.05  # first order already close
    assert 1.8 < errs[0] / errs[1] < 2.2  # relative to ΔH ∝ η, the error is O(η): second order in η


def test_parts_add_up_and_aggregates_are_token_means(f64):
    model, ps = f64
    r = entropy_dynamics(model, ps, lr=1e-3, token_rows="all")
    t, resp, g = r.tokens, r.responses, r.groups
    assert np.allclose(t.predicted, t.predicted_from_pos + t.predicted_from_neg, rtol=0, atol=1e-15)
    m = t.groupby(["group_id", "algorithm", "response_index"]).predicted_from_neg.mean()
    got = resp.set_index(["group_id", "algorithm", "response_index"]).predicted_from_neg
    assert np.allclose(m.sort_index(), got.loc[m.sort_index().index], atol=1e-15)
    gm = t.groupby(["group_id", "algorithm"]).predicted.mean()
    assert np.allclose(gm.sort_index(), g.set_index(["group_id", "algorithm"]).predicted.loc[gm.sort_index().index])
    # PSR has no negative part, NSR no positive part
    assert (t[t.algorithm == "psr"].predicted_from_neg == 0).all()
    assert (t[t.algorithm == "nsr"].predicted_from_pos == 0).all()
    # cov: Cui's covariance of the group's tokens (token log-prob and advantage), recomputed here
    for (gid, alg), d in t.groupby(["group_id", "algorithm"]):
        ref = np.cov(d.advantage, d.logp, bias=True)[0, 1]
        got = float(g[(g.group_id == gid) & (g.algorithm == alg)]["covariance"].iloc[0])
        assert abs(got - ref) < 1e-12 and np.allclose(d.cov_centred.mean(), ref, atol=1e-12)


def test_whole_model_step_is_shared_with_first_order_and_equals_the_head_step_when_only_the_head_trains(
        f64, monkeypatch):
    model, ps = f64
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_output_embeddings().weight.requires_grad_(True)
    calls = []
    real = fo_mod.full_steps
    monkeypatch.setattr(fo_mod, "full_steps", lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        opts = {"first_order": FirstOrderOptions(algorithms=["grpo", "nsr"], lr=0.3),
                "entropy_dynamics": EntropyDynamicsOptions(algorithms=["grpo", "nsr"], lr=0.3)}
        pp = ProbePass(ProbeConfig(probes=["first_order", "entropy_dynamics"], options=opts, full_model_steps="all"),
                       ps, steps=[0])
        pp.run_model(model, 0)
        res = pp.results()
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    assert len(calls) == ps.n_groups  # one whole-model pass per group, for both probes
    t = res["entropy_dynamics"].tokens
    assert t.actual_full.notna().all()
    # only the head trains: the whole-model step is the head-only step, up to the forward's float32 entropies
    assert float(t.actual_head.abs().median()) > 1e-3
    assert np.allclose(t.actual_full, t.actual_head, rtol=1e-3, atol=2e-6)


def test_full_steps_entropy_matches_a_direct_forward(f64):
    model, ps = f64
    fwd = forward_group(model, ps.groups[0])
    adv = token_advantages(fwd, "grpo")
    lr = 0.05
    fs = full_steps(model, fwd, [adv], lr, entropy=True)
    # the reference: step a copy of the model by autograd, then its teacher-forced entropies
    import copy

    m2 = copy.deepcopy(model).train(False)
    from resrl_analysis.forward import response_forward
    from resrl_analysis.probes.capture import group_batch

    b = group_batch(fwd.group)
    lp = response_forward(m2, b.rows).logp
    loss = -(adv * lp * b.mask).sum() / b.mask.sum()
    grads = torch.autograd.grad(loss, list(m2.parameters()))
    with torch.no_grad():
        for p, g in zip(m2.parameters(), grads):
            p.add_(g, alpha=-lr)
        ent = response_forward(m2, b.rows, entropy=True).entropy
    assert torch.allclose(fs.entropy_after[..., 0], ent * b.mask, atol=1e-10)


def test_pass_results_correlations_and_round_trip(tmp_path):
    ps = random_probe_set([[1, 1, 0, 0], [1, 0, 0, 1], [0, 1, 1, 0]], max_len=6, seed=3)
    pp = ProbePass(ProbeConfig(probes=["entropy_dynamics", "flips"], full_model_steps="none"), ps, steps=[0, 1])
    for s in (0, 1):
        pp.run_model(tiny_model(seed=s), s)
    res = pp.results()
    ed, fl = res["entropy_dynamics"], res["flips"]
    assert isinstance(ed, EntropyDynamicsResult) and isinstance(fl, FlipsResult)
    c = ed.correlation
    run = c[(c.scope == "run") & (c.level == "token") & (c.predictor == "predicted") & (c.target == "actual_head")]
    assert len(run) == 6 and (run.n > 0).all()
    # at the default step size (1e-3) the prediction ranks the real head step's ΔH almost perfectly
    assert float(run.spearman.min()) > 0.99, run
    assert set(c.scope) == {"step", "run"} and correlations(ed).equals(c)
    assert fl.counts.n_tokens.sum() > 0 and set(fl.counts.comparison) == {"step_to_step"}
    for name, r in res.items():
        r.save(tmp_path / name)
    back = load_results(tmp_path)
    assert back["entropy_dynamics"].groups.equals(ed.groups) and back["flips"].counts.equals(fl.counts)


def _teacher_forced_logp(model, group) -> list[list[float]]:
    """log p(y_t | prompt, y_<t) of each response token by a plain forward per response (no packing, no chunks)."""
    out = []
    with torch.no_grad():
        for resp in group.response_ids:
            ids = torch.tensor([list(group.prompt_ids) + list(resp)])
            P = len(group.prompt_ids)
            lp = torch.log_softmax(model(ids).logits[0, P - 1 : P - 1 + len(resp)].double(), -1)
            out.append([float(lp[t, y]) for t, y in enumerate(resp)])
    return out


def _class(group, i: int, t: int) -> str:
    """shared / first_divergent / after / unmixed, by definition (an other-polarity response with the same tokens at
    0..t), counted directly."""
    pos = [r > 0 for r in group.rewards]
    if all(pos) or not any(pos):
        return "unmixed"
    others = [r for j, r in enumerate(group.response_ids) if pos[j] != pos[i]]
    mine = group.response_ids[i]
    d = max(next((k for k in range(min(len(mine), len(o))) if mine[k] != o[k]), min(len(mine), len(o)))
            for o in others)
    return "shared" if t < d else "first_divergent" if t == d else "after"


def test_flips_equal_an_independent_count_from_two_checkpoints():
    ps = random_probe_set([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], vocab_size=12, max_len=6, seed=11)
    # shared prefixes, so that every token class occurs
    groups = list(ps.groups)
    g0 = groups[0]
    resp = list(g0.response_ids)
    resp[2] = resp[0][:3] + resp[2][3:]
    from dataclasses import replace

    groups[0] = replace(g0, response_ids=tuple(resp))
    ps = replace(ps, groups=tuple(groups))
    models = [tiny_model(vocab_size=40, seed=s) for s in (0, 1)]
    pp = ProbePass(ProbeConfig(probes=["flips"]), ps, steps=[0, 5])
    for s, m in zip((0, 5), models):
        pp.run_model(m, s)
    got = pp.results()["flips"].counts
    ref: dict = {}
    for g in ps.groups:
        a, b = _teacher_forced_logp(models[0], g), _teacher_forced_logp(models[1], g)
        for i, t in ((r, t) for r in range(g.n_responses) for t in range(len(g.response_ids[r]))):
            key = ("positive" if g.rewards[i] > 0 else "negative", _class(g, i, t), min(9, int(np.exp(a[i][t]) * 10)))
            cell = ref.setdefault(key, [0, 0, 0])
            cell[0 if b[i][t] > a[i][t] else 1 if b[i][t] < a[i][t] else 2] += 1
    mine = {(r.polarity, r.token_class, r.conf_bin): [r.n_rose, r.n_fell, r.n_same] for r in got.itertuples()}
    assert mine == ref
    assert {"shared", "first_divergent", "after", "unmixed"} <= {k[1] for k in ref}


def test_flips_need_two_checkpoints():
    ps = random_probe_set([[1, 0]], max_len=3)
    pp = ProbePass(ProbeConfig(probes=["flips"]), ps, steps=[0])
    pp.run_model(tiny_model(), 0)
    r = pp.results()["flips"]
    assert len(r.counts) == 0 and "two checkpoints" in r.skipped[0]["reason"]


@pytest.mark.parametrize("bad", [{"entropy_tokens": "some"}, {"algorithms": ["nope"]}])
def test_options_are_checked(bad):
    with pytest.raises(ValueError):
        EntropyDynamicsOptions(**bad)


def test_plan_counts_the_entropy_part():
    from resrl_analysis.plan import ModelShape, ProbeShape, plan_probes

    m = ModelShape(32000, 256, 2, 4, 2, 64, 768, False)
    shape = ProbeShape(8, 1024, 8)
    a = plan_probes(m, shape, ["interference"], budget=10**13, full_model=False, weights=False)
    b = plan_probes(m, shape, ["interference", "entropy_dynamics"], budget=10**13, full_model=False, weights=False)
    N = 8 * 1024
    assert b.peaks["interference"] - a.peaks["interference"] >= N * N * 4  # the second (N, N) matrix is kept
    assert "entropy part" in " ".join(b.notes)
