"""The advantage registry (resrl_analysis.advantages): hand-computed cases and slow references, defaults
declared once, and the trainer's and the first-order probe's advantages identical."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resrl_analysis.advantages import ALGORITHMS, AlgoInputs, get_algorithm, params_from_config
from trainer.config import ALGORITHM_NAMES
from trainer.setup import seed_of


def _inputs(rewards, groups, lengths, T=4, params=None, **kw) -> AlgoInputs:
    kw["params"] = params_from_config(params or {})
    lengths = torch.tensor(lengths)
    mask = torch.arange(T)[None] < lengths[:, None]
    return AlgoInputs(rewards=torch.tensor(rewards, dtype=torch.float32), group_ids=torch.tensor(groups),
                      response_ids=torch.zeros(len(rewards), T, dtype=torch.long), response_mask=mask, **kw)


@pytest.mark.unit
def test_registry_holds_every_algorithm_with_a_docstring_saying_how_it_differs():
    assert set(ALGORITHMS) == set(ALGORITHM_NAMES)
    for name, algo in ALGORITHMS.items():
        doc = algo.fn.__doc__ or ""
        assert doc.strip(), name
        assert "GRPO" in doc or name == "grpo" or "no baseline" in doc or "no group" in doc, name
    with pytest.raises(ValueError, match="unknown algorithm"):
        get_algorithm("ppo")


@pytest.mark.unit
def test_grpo_hand_case():
    out = ALGORITHMS["grpo"].fn(_inputs([1, 0, 0, 0, 1, 1], [0, 0, 0, 0, 7, 7], [2, 1, 3, 4, 1, 2]))
    # group 0: mean 0.25, unbiased std 0.5 → (1 − .25)/.5 = 1.5, (0 − .25)/.5 = −0.5; group 7: std 0 → 0
    np.testing.assert_allclose(out.advantages.numpy(), [1.5, -0.5, -0.5, -0.5, 0, 0], atol=1e-5)
    np.testing.assert_allclose(out.token_advantages[0].numpy(), [1.5, 1.5, 0, 0], atol=1e-5)
    np.testing.assert_allclose(out.token_advantages[3].numpy(), [-0.5] * 4, atol=1e-5)
    assert out.extras == {}


@pytest.mark.unit
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


@pytest.mark.unit
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


@pytest.mark.unit
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


@pytest.mark.unit
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


# ------------------------------------------------------------------------------------ one registry, one declaration


@pytest.mark.unit
def test_algorithm_names_are_the_registry_everywhere():
    import argparse

    from resrl_analysis.advantages import ALGORITHM_NAMES as CORE_NAMES
    from resrl_analysis.probes.first_order import ALGORITHMS as PROBE_ALGORITHMS
    from resrl_analysis.probes.runner import add_probe_arguments
    from trainer.config import GROUP_ALGORITHMS
    from trainer.train_cli import add_train_arguments

    assert ALGORITHM_NAMES == CORE_NAMES == PROBE_ALGORITHMS == tuple(ALGORITHMS)
    assert set(ALGORITHM_NAMES) == {"grpo", "psr", "nsr", "w-reinforce", "nthr", "resrl", "resrl-shuffled",
                                    "resrl-uniform", "resrl-own-state", "shared-mask"}
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    (algo_flag,) = [a for a in p._actions if a.dest == "algorithm"]
    assert tuple(algo_flag.choices) == ALGORITHM_NAMES
    probe_args = add_probe_arguments(argparse.ArgumentParser()).parse_args(["run"])
    # The probe's default list leaves the controls of ResRL out (accepted on request).
    assert tuple(probe_args.algorithms) == tuple(a for a in ALGORITHM_NAMES if ALGORITHMS[a].control_of is None)
    assert set(GROUP_ALGORITHMS) == {"grpo", "nthr", "resrl", "resrl-shuffled", "resrl-uniform", "resrl-own-state",
                                     "shared-mask"}  # they normalise within a group: n >= 2


@pytest.mark.unit
def test_every_default_is_declared_once():
    import dataclasses
    import inspect
    import re
    from pathlib import Path

    from resrl_analysis.advantages import CONFIG_FIELDS, AdvantageParams, config_defaults
    from resrl_analysis.probes.runner import add_probe_arguments
    from resrl_analysis.weighting import ResRLWeightConfig, resrl_token_weights, resrl_weight_details
    from trainer.config import TrainConfig, config_to_dict

    cfg = config_to_dict(TrainConfig())
    assert {k: cfg[k] for k in CONFIG_FIELDS} == config_defaults()
    assert params_from_config(TrainConfig()) == AdvantageParams() == params_from_config({})
    # The flat config fields hold no literal of their own: each default is read off AdvantageParams.
    src = Path(inspect.getsourcefile(TrainConfig)).read_text()
    for name in CONFIG_FIELDS:
        m = re.search(rf"^    {name}: \w+ = _f\((.*?),", src, re.M)
        assert m and m.group(1) == f'_ALGO["{name}"]', name
    # The core's function signatures take ResRLWeightConfig's defaults.
    res = dataclasses.asdict(ResRLWeightConfig())
    for fn in (resrl_weight_details, resrl_token_weights):
        for pname, prm in inspect.signature(fn).parameters.items():
            if pname in res:
                assert prm.default == res[pname], (fn.__name__, pname)
    probe = add_probe_arguments(__import__("argparse").ArgumentParser()).parse_args(["run"])
    assert probe.rank == ResRLWeightConfig().rank


@pytest.mark.unit
def test_params_map_every_flat_field():
    from resrl_analysis.advantages import config_defaults
    from trainer.config import TrainConfig

    cfg = TrainConfig(algorithm="resrl", resrl_rank=7, resrl_q_low=0.3, resrl_q_high=0.7, resrl_min_weight=0.2,
                      resrl_pos_weight=0.5, resrl_niter=2, resrl_svd="exact", resrl_max_pos_tokens=99,
                      resrl_layer="head_input", adv_eps=1e-3, w_reinforce_lambda=0.3, nthr_beta=2.0,
                      temperature=0.7)
    p = params_from_config(cfg)
    assert (p.resrl.rank, p.resrl.q_low, p.resrl.q_high, p.resrl.min_weight, p.resrl.niter, p.resrl.svd,
            p.resrl.max_pos_tokens) == (7, 0.3, 0.7, 0.2, 2, "exact", 99)
    assert (p.pos_weight, p.resrl_layer, p.adv_eps, p.w_reinforce_lambda, p.nthr_beta, p.temperature) == (
        0.5, "head_input", 1e-3, 0.3, 2.0, 0.7)
    assert set(config_defaults()) <= set(vars(cfg))


@pytest.mark.parametrize(("bad", "match"), [
    (dict(adv_eps=0.0), "adv_eps must be > 0"),
    (dict(nthr_beta=-1.0), "nthr_beta must be >= 0"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(pos_weight=1.5), r"pos_weight must lie in \[0, 1\]"),
    (dict(resrl_layer="middle"), "resrl_layer must be"),
])
@pytest.mark.unit
def test_params_reject_impossible_values(bad, match):
    from resrl_analysis.advantages import AdvantageParams

    with pytest.raises(ValueError, match=match):
        AdvantageParams(**bad)
    AdvantageParams(resrl_layer="3")  # an integer index is a valid layer


@pytest.mark.unit
def test_extras_are_registered_with_fill_values_and_dumped():
    from resrl_analysis.advantages import EXTRAS
    from trainer.metrics_log import ROLLOUT_FIELDS

    assert list(EXTRAS) == ["resrl_weights", "resrl_residuals", "nthr_weights", "nthr_scores"]
    assert EXTRAS["resrl_weights"].fill == EXTRAS["nthr_weights"].fill == 1.0
    assert np.isnan(EXTRAS["resrl_residuals"].fill) and np.isnan(EXTRAS["nthr_scores"].fill)
    assert set(EXTRAS) <= set(ROLLOUT_FIELDS)
    g = torch.Generator().manual_seed(0)
    B, T, d, V = 4, 5, 6, 9
    inp = _inputs([1, 1, 0, 0], [0, 0, 0, 0], [5, 4, 5, 3], T=T, hidden=torch.randn(B, T, d, generator=g),
                  head_input=torch.randn(B, T, d, generator=g), logits=torch.randn(B, T, V, generator=g),
                  hidden_own=torch.randn(B, T, d, generator=g), generator=torch.Generator().manual_seed(1))
    for name, algo in ALGORITHMS.items():
        out = algo.fn(inp)
        assert tuple(out.extras) == algo.extras, name  # an algorithm returns exactly the extras it registered
        assert out.token_advantages.shape == (B, T) and out.advantages.shape == (B,)
        for t in out.extras.values():
            assert t.shape == (B, T)


# ------------------------------------------------------------------------------------ trainer == probe


def _probe_group():
    from resrl_analysis.probe_sets import ProbeGroup

    g = torch.Generator().manual_seed(5)
    lengths = [6, 4, 5, 6, 3, 6]
    responses = tuple(tuple(torch.randint(4, 100, (n,), generator=g).tolist()) for n in lengths)
    return ProbeGroup(3, (1, 17, 23, 40, 9), responses, (1.0, 0.0, 1.0, 0.0, 0.0, 1.0))


@pytest.fixture(scope="module")
def tiny():
    from trainer.models import build_tiny_model

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_tiny_model(seed=0, num_hidden_layers=2).eval()
    torch.set_num_threads(before)


@pytest.mark.integration
@pytest.mark.parametrize("layer", ["penultimate", "head_input"])
@pytest.mark.parametrize("algorithm", ["grpo", "psr", "nsr", "w-reinforce", "nthr", "resrl", "resrl-shuffled",
                                       "resrl-uniform", "resrl-own-state", "shared-mask"])
def test_trainer_and_probe_advantages_are_identical(tiny, algorithm, layer):
    """The trainer's path (pack_rows → no-grad response_forward → algo_inputs → registry) and the first-order
    probe's (forward_group → token_advantages) give the same per-token advantages for the same group."""
    import trainer.loop as loop
    from resrl_analysis.forward import pack_rows, response_forward
    from resrl_analysis.probes.capture import forward_group
    from resrl_analysis.probes.first_order import token_advantages
    from trainer.config import TrainConfig

    assert len(ALGORITHM_NAMES) == 10  # the parametrisation
    cfg = TrainConfig(algorithm=algorithm, temperature=0.7, resrl_rank=4, resrl_layer=layer, seed=3)
    algo = get_algorithm(algorithm)
    group, step = _probe_group(), 2
    G, T = len(group.response_ids), max(len(r) for r in group.response_ids)
    response_ids = torch.zeros(G, T, dtype=torch.long)
    response_mask = torch.zeros(G, T, dtype=torch.bool)
    for i, r in enumerate(group.response_ids):
        response_ids[i, : len(r)], response_mask[i, : len(r)] = torch.tensor(r), True
    prompt_ids = torch.tensor(group.prompt_ids).expand(G, -1)
    capture = {}
    if "hidden" in algo.needs:
        capture["hidden"] = cfg.resrl_layer
    if "head_input" in algo.needs:
        capture["head_input"] = "head_input"
    own = {"hidden_own": cfg.resrl_layer} if "hidden_own" in algo.needs else {}
    with torch.no_grad():
        rows = pack_rows(prompt_ids, torch.ones_like(prompt_ids, dtype=torch.bool), response_ids, response_mask)
        fo = response_forward(tiny, rows, temperature=cfg.temperature, capture=capture, capture_own=own,
                              return_logits="logits" in algo.needs)
        inp = loop.algo_inputs(cfg, step, params_from_config(cfg), rows, fo, torch.tensor(group.rewards),
                                torch.full((G,), group.group_id))
    trainer_out = algo.fn(inp)
    fwd = forward_group(tiny, group)
    if algorithm == "resrl-own-state" and layer == "head_input":  # the probes keep the penultimate one only
        with pytest.raises(ValueError, match="own positions"):
            token_advantages(fwd, algorithm, params_from_config(cfg), seed=seed_of(cfg.seed, "resrl", step))
        return
    probe = token_advantages(fwd, algorithm, params_from_config(cfg), seed=seed_of(cfg.seed, "resrl", step))
    assert torch.equal(probe, trainer_out.token_advantages)
    assert (probe[~fwd.mask] == 0).all() and (probe[fwd.mask] != 0).any()
    if algorithm.startswith("resrl"):  # the group is weighted, not left at weight 1
        assert (trainer_out.extras["resrl_weights"][response_mask] < 1).any()


@pytest.mark.unit
def test_probe_nthr_uses_the_temperature(tiny):
    from resrl_analysis.advantages import AdvantageParams
    from resrl_analysis.interference import nthr_token_weights
    from resrl_analysis.probes.capture import forward_group
    from resrl_analysis.probes.first_order import token_advantages

    fwd = forward_group(tiny, _probe_group())
    gids = torch.zeros(fwd.mask.shape[0], dtype=torch.long)
    grpo = token_advantages(fwd, "grpo")
    for t in (0.3, 1.0):
        w = nthr_token_weights(fwd.head_input, fwd.logits, fwd.labels, fwd.mask, fwd.is_positive, gids,
                               temperature=t).weights
        torch.testing.assert_close(token_advantages(fwd, "nthr", AdvantageParams(temperature=t)), grpo * w)
    inp = AlgoInputs(rewards=fwd.rewards, group_ids=gids, response_ids=fwd.labels, response_mask=fwd.mask,
                     head_input=fwd.head_input, logits=fwd.logits)
    s1 = ALGORITHMS["nthr"].fn(inp).extras["nthr_scores"]
    inp.params = AdvantageParams(temperature=0.3)
    s2 = ALGORITHMS["nthr"].fn(inp).extras["nthr_scores"]
    assert not torch.allclose(s1[fwd.mask], s2[fwd.mask])  # the parameter reaches the scores


# ------------------------------------------------------------------------------------ the trainer's generic metrics


@pytest.mark.unit
def test_rollout_metrics_read_the_extras_generically():
    from resrl_analysis.distributed import DistContext
    from trainer.config import TrainConfig
    from trainer.rollout import ScoredBatch, rollout_metrics

    g = torch.Generator().manual_seed(0)
    B, T = 8, 5
    lengths = torch.tensor([5, 3, 4, 5, 2, 5, 1, 4])
    mask = torch.arange(T)[None] < lengths[:, None]
    pmask = torch.arange(4)[None] >= torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])[:, None]  # prompts of 4 and 3 tokens
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 1, 0, 0])
    tok = torch.randn(B, T, generator=g).masked_fill(~mask, 0.0)
    w = torch.rand(B, T, generator=g) * 0.9 + 0.1
    res = torch.where(mask & (rewards <= 0)[:, None], torch.rand(B, T, generator=g), torch.tensor(float("nan")))
    data = ScoredBatch(
        prompt_ids=torch.ones(B, 4, dtype=torch.long), prompt_mask=pmask,
        response_ids=torch.ones(B, T, dtype=torch.long), response_mask=mask, finished=torch.ones(B, dtype=torch.bool),
        group_ids=torch.arange(B) // 4, rewards=rewards,
        old_logp=torch.zeros(B, T), advantages=tok[:, 0], token_advantages=tok,
        extras={"resrl_weights": w, "resrl_residuals": res},
    )
    ctx = DistContext.single(torch.device("cpu"))
    m = rollout_metrics(data, TrainConfig(algorithm="resrl"), ctx)
    valid = tok[mask].double()
    assert m["actor/advantage_mean"] == pytest.approx(float(valid.mean()), rel=1e-12)
    assert m["actor/advantage_min"] == float(valid.min()) and m["actor/advantage_max"] == float(valid.max())
    assert m["prompt/length_mean"] == 3.5
    weighted = w[mask & (rewards <= 0)[:, None]].double()
    assert m["resrl/weight_mean"] == pytest.approx(float(weighted.mean()), rel=1e-12)
    assert m["resrl/weight_q50"] == pytest.approx(float(weighted.quantile(0.5)), rel=1e-12)
    assert "nthr/downweighted_frac" not in m
    assert m["resrl/weighted_token_frac"] == 1.0  # every negative token of the two (mixed) groups has a residual
    # a mixed group whose negatives no subspace weighed (the reference's per-micro-batch weights): 1/2 left
    res2 = res.clone()
    res2[4:] = float("nan")
    m2 = rollout_metrics(ScoredBatch(**{**vars(data), "extras": {"resrl_weights": w, "resrl_residuals": res2}}),
                         TrainConfig(algorithm="resrl"), ctx)
    neg = mask & (rewards <= 0)[:, None]
    assert m2["resrl/weighted_token_frac"] == pytest.approx(float(neg[:4].sum() / neg.sum()))
    # A slice keeps the extras with the rows
    part = data.select(slice(4, 8))
    assert torch.equal(part.extras["resrl_weights"], w[4:]) and part.num_rows == 4
    nthr = ScoredBatch(**{**vars(data), "extras": {"nthr_weights": torch.where(w < 0.5, 0.5, 1.0),
                                                    "nthr_scores": res}})
    m2 = rollout_metrics(nthr, TrainConfig(algorithm="nthr"), ctx)
    neg = mask & (rewards <= 0)[:, None]
    assert m2["nthr/downweighted_frac"] == float((w[neg] < 0.5).sum()) / float(neg.sum())
    assert "resrl/weight_mean" not in m2
