"""The probes at real shapes: the shared-Gram path against a copy of the per-probe path it replaced.

The ``old_*`` functions below are the probes as they were before the Grams were shared (each
recomputing probabilities and pair products); they are the reference the new path must match to
float tolerance, on the tiny model and on a random Qwen3-shaped model at T = 256.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import Tensor, nn

from resrl_analysis.bounds import alignment_bound, alignment_bound_paper
from resrl_analysis.interference import (
    NTHRWeights,
    group_gradient_alignment,
    head_gradient_cosine,
    head_gradient_inner,
    logit_grad_sqnorm,
    nthr_eta,
    nthr_scores,
    nthr_threshold,
)
from resrl_analysis.ops import group_advantages
from resrl_analysis.probe_sets import ProbeGroup, ProbeSet
from resrl_analysis.probes.capture import GroupForward, forward_probe_set, pad_id_of, token_probs
from resrl_analysis.probes.interference import QUANTILES, _tied, full_model_gradient_cosine
from resrl_analysis.probes.subspace import (
    ALL_REPRESENTATIONS,
    Representation,
    correlation_table,
    pair_sample,
    spearman,
)
from resrl_analysis.results import InterferenceResult, SubspaceResult
from resrl_analysis.weighting import (
    ResRLWeightConfig,
    explained_variance,
    layer_norm_no_affine,
    positive_subspace,
    residual_energy,
    weights_from_residuals,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]


# ----------------------------------------------------------------------------- the reference (old path)

def old_nthr_token_weights(
    head_input: Tensor,
    logits: Tensor,
    labels: Tensor,
    response_mask: Tensor,
    is_positive: Tensor,
    group_ids: Tensor,
    *,
    beta: float = 1.0,
    temperature: float = 1.0,
    chunk: int = 1024,
) -> NTHRWeights:
    from resrl_analysis.ops import group_index, softmax_probs

    B, T, _ = head_input.shape
    dev = head_input.device
    mask = response_mask.bool()
    pos = is_positive.bool().to(dev)
    weights = torch.ones(B, T, dtype=torch.float32, device=dev)
    scores = torch.full((B, T), float("nan"), dtype=torch.float32, device=dev)
    flagged = torch.zeros(B, T, dtype=torch.bool, device=dev)
    groups: list[dict] = []
    uniq, inv = group_index(group_ids.to(dev))
    for gi, gid in enumerate(uniq.tolist()):
        rows = (inv == gi).nonzero().squeeze(-1)
        prow, nrow = rows[pos[rows]], rows[~pos[rows]]
        eta = nthr_eta(len(prow) / len(rows))
        info = {"group_id": gid, "tau": float("nan"), "eta": eta}
        pmask, nmask = mask[prow], mask[nrow]
        if len(prow) == 0 or len(nrow) == 0 or not pmask.any() or not nmask.any():
            info["status"] = "not_mixed"
            groups.append(info)
            continue
        hp = head_input[prow][pmask].float()  # (Tp, d)
        hn = head_input[nrow][nmask].float()  # (Tn, d)
        pp = softmax_probs(logits[prow][pmask], temperature=temperature)  # (Tp, V)
        pn = softmax_probs(logits[nrow][nmask], temperature=temperature)  # (Tn, V)
        yp, yn = labels[prow][pmask], labels[nrow][nmask]
        which = torch.arange(len(prow), device=dev)[:, None].expand(-1, T)[pmask]  # (Tp,)
        tau = nthr_threshold(hp, pp, yp, which, beta, chunk=chunk)
        s = nthr_scores(hn, pn, yn, hp, pp, yp, chunk=chunk)  # (Tn,)
        f = s > tau
        wn = torch.ones(len(nrow), T, dtype=torch.float32, device=dev)
        sn = torch.full((len(nrow), T), float("nan"), dtype=torch.float32, device=dev)
        fn = torch.zeros(len(nrow), T, dtype=torch.bool, device=dev)
        wn[nmask] = torch.where(f, torch.full_like(s, eta), torch.ones_like(s)).float()
        sn[nmask], fn[nmask] = s.float(), f
        weights[nrow], scores[nrow], flagged[nrow] = wn, sn, fn
        info.update(status="weighted", tau=tau, n_flagged=int(f.sum()), n_neg_tokens=int(f.numel()))
        groups.append(info)
    return NTHRWeights(weights=weights, scores=scores, flagged=flagged, groups=groups)


def old_summary(c: np.ndarray, quantiles: Sequence[float]) -> dict:
    qs = np.quantile(c, quantiles)
    out = {"cos_mean": float(c.mean()), "cos_std": float(c.std()), "cos_min": float(c.min()),
           "cos_max": float(c.max()), "cos_frac_positive": float((c > 0).mean())}
    for q, v in zip(quantiles, qs):
        out[f"cos_q{round(q * 100):02d}"] = float(v)
    return out


def old_interference_probe(
    model: nn.Module,
    probe_set: ProbeSet,
    *,
    step: int = 0,
    forwards: Sequence[GroupForward] | None = None,
    advantage: str = "grpo",
    full_model: bool = False,
    max_cosine_samples: int = 256,
    nthr_beta: float = 1.0,
    seed: int = 0,
) -> InterferenceResult:
    pad_id = pad_id_of(model)
    if forwards is None:
        forwards = forward_probe_set(model, probe_set, pad_id=pad_id)
    grows, trows, srows, skipped = [], [], [], []
    for fwd in forwards:
        g = fwd.group
        base = {"step": step, "group_id": g.group_id, "prompt_uid": g.prompt_uid, "n_pos": g.n_positive,
                "n_neg": g.n_negative}
        if not g.is_mixed:
            grows.append({**base, "status": g.status, "n_pos_tokens": 0, "n_neg_tokens": 0})
            skipped.append({"step": step, "group_id": g.group_id, "reason": g.status})
            continue
        dev = fwd.mask.device
        G = fwd.mask.shape[0]
        rows = torch.arange(G, device=dev)
        prow, nrow = rows[fwd.is_positive], rows[~fwd.is_positive]
        tp, tn = fwd.tokens(prow), fwd.tokens(nrow)
        cdt = torch.promote_types(tp["h"].dtype, torch.float32)
        hp, hn = tp["h"].to(cdt), tn["h"].to(cdt)  # (Tp, d), (Tn, d)
        pp, pn = token_probs(tp["logits"]).to(cdt), token_probs(tn["logits"]).to(cdt)  # (Tp, V), (Tn, V)
        cos = head_gradient_cosine(hp, pp, tp["y"], hn, pn, tn["y"])  # (Tp, Tn)
        c = cos.detach().double().cpu().numpy()
        summary = old_summary(c.ravel(), QUANTILES)
        # Group level: the positive and the negative parts of the update, weighted by the advantages.
        gids = torch.zeros(G, dtype=torch.long, device=dev)
        adv = group_advantages(fwd.rewards.float(), gids, advantage)  # (G,)
        al = group_gradient_alignment(hp, pp, tp["y"], adv[tp["row"]].to(cdt), hn, pn, tn["y"],
                                      adv[tn["row"]].to(cdt))
        nt = old_nthr_token_weights(fwd.head_input, fwd.logits, fwd.labels, fwd.mask, fwd.is_positive, gids,
                                beta=nthr_beta)
        nmask = fwd.mask[nrow]
        scores, flags, wts = nt.scores[nrow][nmask], nt.flagged[nrow][nmask], nt.weights[nrow][nmask]  # (Tn,)
        info = nt.groups[0]
        full = {"full_update_cosine": np.nan, "full_head_cosine": np.nan}
        if full_model:
            adv_tok = adv[:, None].expand_as(fwd.mask).float()  # (G, T)
            f = full_model_gradient_cosine(model, fwd, adv_tok, pad_id=pad_id)
            full = {"full_update_cosine": f["full_update_cosine"], "full_head_cosine": f["full_head_cosine"]}
        grows.append({**base, "status": "ok", "n_pos_tokens": int(hp.shape[0]), "n_neg_tokens": int(hn.shape[0]),
                      **summary, "head_update_inner": al.inner, "head_update_cosine": al.cosine,
                      "nthr_tau": info.get("tau", np.nan), "nthr_eta": info.get("eta", np.nan),
                      "nthr_flagged_frac": float(flags.float().mean()), **full})
        c_mean, c_max, c_pos = c.mean(0), c.max(0), (c > 0).mean(0)  # (Tn,) each
        for j in range(hn.shape[0]):
            trows.append({"step": step, "group_id": g.group_id, "response_index": int(tn["row"][j]),
                          "position": int(tn["pos"][j]), "token_id": int(tn["y"][j]), "cos_mean": float(c_mean[j]),
                          "cos_max": float(c_max[j]), "cos_frac_positive": float(c_pos[j]),
                          "nthr_score": float(scores[j]), "nthr_flagged": bool(flags[j]),
                          "nthr_weight": float(wts[j])})
        flat = c.ravel()
        if flat.size > max_cosine_samples:
            rng = np.random.default_rng([seed, step, g.group_id])
            flat = flat[np.sort(rng.choice(flat.size, max_cosine_samples, replace=False))]
        srows += [{"step": step, "group_id": g.group_id, "cosine": float(v)} for v in flat]
    meta = {"advantage": advantage, "full_model": full_model, "nthr_beta": nthr_beta,
            "max_cosine_samples": max_cosine_samples, "quantiles": list(QUANTILES), "seed": seed,
            "tied_embeddings": _tied(model), "probe_set": probe_set.describe(), "skipped": skipped}
    return InterferenceResult(groups=pd.DataFrame(grows), tokens=pd.DataFrame(trows),
                              cosine_samples=pd.DataFrame(srows), meta=meta)


def _ratio_stats(num: torch.Tensor, den: torch.Tensor) -> tuple[float, float, float]:
    """The old path's tightness ratio stats: the whole ratio array on the host, np.median."""
    ok = den > 0
    if not ok.any():
        return float("nan"), float("nan"), float("nan")
    r = (num[ok] / den[ok]).double().cpu().numpy()
    return float(r.mean()), float(np.median(r)), float(r.max())


def old_subspace_probe(
    model: nn.Module,
    probe_set: ProbeSet,
    *,
    step: int = 0,
    forwards: Sequence[GroupForward] | None = None,
    representations: Sequence[Representation] = ALL_REPRESENTATIONS,
    config: ResRLWeightConfig | None = None,
    max_ev_rank: int | None = 64,
    rtol: float = 1e-4,
    seed: int = 0,
    max_pair_samples: int = 256,
) -> SubspaceResult:
    cfg = config or ResRLWeightConfig(svd="exact")
    if forwards is None:
        forwards = forward_probe_set(model, probe_set, pad_id=pad_id_of(model))
    grows, trows, erows, prows, skipped = [], [], [], [], []
    for fwd in forwards:
        g = fwd.group
        base = {"step": step, "group_id": g.group_id, "prompt_uid": g.prompt_uid}
        dev = fwd.mask.device
        rows = torch.arange(fwd.mask.shape[0], device=dev)
        prow, nrow = rows[fwd.is_positive], rows[~fwd.is_positive]
        status = g.status
        if status == "mixed" and int(fwd.mask[prow].sum()) < cfg.min_pos_tokens:
            status = "too_few_positive_tokens"
        if status != "mixed":
            grows += [{**base, **rep.columns(), "status": status, "rank": 0,
                       "n_pos_tokens": int(fwd.mask[prow].sum()), "n_neg_tokens": int(fwd.mask[nrow].sum()),
                       "n_pairs": 0, "tight_violations": 0, "paper_violations": 0, "head_tight_violations": 0,
                       "head_paper_violations": 0} for rep in representations]
            skipped.append({"step": step, "group_id": g.group_id, "reason": status})
            continue
        tp, tn = fwd.tokens(prow), fwd.tokens(nrow)
        cdt = torch.promote_types(tp["h"].dtype, torch.float32)
        pp, pn = token_probs(tp["logits"]).to(cdt), token_probs(tn["logits"]).to(cdt)  # (Tp, V), (Tn, V)
        # The true head interference does not depend on the representation: compute it once.
        K = head_gradient_inner(tp["h"].to(cdt), pp, tp["y"], tn["h"].to(cdt), pn, tn["y"]).abs()  # (Tp, Tn)
        sum_abs, max_abs = K.sum(0).cpu().numpy(), K.max(0).values.cpu().numpy()  # (Tn,)
        lf_p = logit_grad_sqnorm(pp, tp["y"]).clamp(min=0).sqrt()  # (Tp,) ||e⁺ − p⁺||
        lf_n = logit_grad_sqnorm(pn, tn["y"]).clamp(min=0).sqrt()  # (Tn,) ||e⁻ − p⁻||
        hnorm = tp["h"].to(cdt).norm(dim=-1)[:, None] * tn["h"].to(cdt).norm(dim=-1)[None, :]  # (Tp, Tn)
        g_scale = lf_p[:, None] * lf_n[None, :]  # (Tp, Tn)
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(g.group_id))
        keep = None
        if tp["h"].shape[0] > cfg.max_pos_tokens:
            keep = torch.randperm(tp["h"].shape[0], generator=gen)[: cfg.max_pos_tokens].sort().values.to(dev)
        for rep in representations:
            X = fwd.penultimate if rep.layer == "penultimate" else fwd.head_input
            xp, xn = X[prow][fwd.mask[prow]].to(cdt), X[nrow][fwd.mask[nrow]].to(cdt)  # (Tp, d), (Tn, d)
            if rep.layer_norm:
                xp, xn = layer_norm_no_affine(xp), layer_norm_no_affine(xn)
            xfit = xp[keep] if keep is not None else xp
            sub = positive_subspace(xfit, cfg.rank, niter=cfg.niter, svd=cfg.svd, generator=gen, center=rep.center)
            e = residual_energy(xn, sub, center=rep.center)  # (Tn,)
            w, _, _ = weights_from_residuals(e, cfg.q_low, cfg.q_high, cfg.min_weight)
            xpc, xnc = xp - sub.mean, xn - sub.mean  # the mean is zero when not centring
            inner = (xpc @ xnc.T).abs()  # (Tp, Tn)
            tight = alignment_bound(xpc, xnc, sub.basis)  # (Tp, Tn)
            paper = alignment_bound_paper(xpc, xnc, sub.basis)  # (Tp, Tn)
            tol = rtol * xpc.norm(dim=-1)[:, None] * xnc.norm(dim=-1)[None, :]  # (Tp, Tn)
            g_tol = rtol * g_scale * hnorm
            e_np = e.double().cpu().numpy()
            rho_s, p_s = spearman(e_np, sum_abs)
            rho_m, p_m = spearman(e_np, max_abs)
            t_mean, t_med, t_max = _ratio_stats(inner, tight)
            p_mean, p_med, _ = _ratio_stats(inner, paper)
            grows.append({
                **base, **rep.columns(), "status": "ok", "rank": sub.rank, "n_pos_tokens": int(xp.shape[0]),
                "n_neg_tokens": int(xn.shape[0]), "n_pairs": int(inner.numel()),
                "residual_mean": float(e.mean()), "residual_median": float(e.median()),
                "tight_violations": int((inner > tight + tol).sum()),
                "paper_violations": int((inner > paper + tol).sum()),
                "head_tight_violations": int((K > g_scale * tight + g_tol).sum()),
                "head_paper_violations": int((K > g_scale * paper + g_tol).sum()),
                "tight_ratio_mean": t_mean, "tight_ratio_median": t_med, "tight_ratio_max": t_max,
                "paper_ratio_mean": p_mean, "paper_ratio_median": p_med,
                "spearman_sum": rho_s, "spearman_sum_p": p_s, "spearman_max": rho_m, "spearman_max_p": p_m,
            })
            cols = rep.columns()
            for j in range(xn.shape[0]):
                trows.append({**base, **cols, "response_index": int(tn["row"][j]), "position": int(tn["pos"][j]),
                              "token_id": int(tn["y"][j]), "residual_energy": float(e[j]), "resrl_weight": float(w[j]),
                              "interference_sum_abs": float(sum_abs[j]), "interference_max_abs": float(max_abs[j])})
            # A fixed sample of pairs (same for every representation) for the bound scatter plots.
            n_pairs = inner.numel()
            # The sampling rule is the new one (O(k) memory; the old permutation of all pairs drew others).
            pick = torch.as_tensor(pair_sample(n_pairs, max_pair_samples, int(g.group_id)))
            pick = pick.to(dev)
            flat = {"true_abs": inner, "tight_bound": tight, "paper_bound": paper, "head_abs": K,
                    "head_tight_bound": g_scale * tight}
            picked = {k: v.reshape(-1)[pick].double().cpu().numpy() for k, v in flat.items()}
            prows += [{**base, **cols, **{k: float(v[i]) for k, v in picked.items()}} for i in range(len(pick))]
            ev = explained_variance(xfit, max_ev_rank, center=rep.center)
            erows += [{"step": step, "group_id": g.group_id, **cols, "rank": k + 1, "explained_variance": float(v)}
                      for k, v in enumerate(ev.tolist())]
    groups_df, tokens_df = pd.DataFrame(grows), pd.DataFrame(trows)
    meta = {"representations": [r.name for r in representations], "rank": cfg.rank, "svd": cfg.svd,
            "max_pos_tokens": cfg.max_pos_tokens, "q_low": cfg.q_low, "q_high": cfg.q_high,
            "min_weight": cfg.min_weight, "rtol": rtol, "seed": seed, "probe_set": probe_set.describe(),
            "skipped": skipped}
    r = SubspaceResult(groups=groups_df, tokens=tokens_df, explained_variance=pd.DataFrame(erows),
                       pairs=pd.DataFrame(prows), meta=meta)
    return replace(r, correlation=correlation_table(r.groups, r.tokens))


def old_predict_delta(fwd: GroupForward, advantages: Tensor | Sequence[Tensor], lr: float, *,
                  chunk: int = 1024) -> tuple[Tensor, Tensor]:
    single = isinstance(advantages, Tensor)
    advs = [advantages] if single else list(advantages)
    G = fwd.mask.shape[0]
    rows = torch.arange(G, device=fwd.mask.device)
    tok = fwd.tokens(rows)
    cdt = torch.promote_types(tok["h"].dtype, torch.float32)
    h, y, row = tok["h"].to(cdt), tok["y"], tok["row"]  # (N, d), (N,), (N,)
    p = token_probs(tok["logits"]).to(cdt)  # (N, V): one group's probabilities only
    pos = fwd.is_positive[row]  # (N,)
    a = torch.stack([adv[fwd.mask].to(cdt) for adv in advs], 1)  # (N, n)
    w = torch.cat([a * pos[:, None], a * ~pos[:, None]], 1)  # (N, 2n): [positive sources | negative sources]
    out = torch.zeros(h.shape[0], w.shape[1], dtype=cdt, device=h.device)  # (N, 2n)
    for s in range(0, h.shape[0], chunk):
        K = head_gradient_inner(h[s : s + chunk], p[s : s + chunk], y[s : s + chunk], h, p, y)  # (c, N)
        out[s : s + chunk] = K @ w
    Z = h.shape[0]
    per_resp = torch.zeros(G, w.shape[1], dtype=cdt, device=h.device).index_add_(0, row, out) * (lr / Z)  # (G, 2n)
    n = len(advs)
    from_pos, from_neg = per_resp[:, :n], per_resp[:, n:]
    return (from_pos[:, 0], from_neg[:, 0]) if single else (from_pos, from_neg)


# ----------------------------------------------------------------------------- new against old


def _qwen3_shaped(T: int, *, V: int = 32_000, d: int = 256, layers: int = 2, seed: int = 0):
    """A random Qwen3-shaped causal LM (the issue's benchmark shape), float32, eval mode."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(vocab_size=V, hidden_size=d, intermediate_size=3 * d, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=d // 4,
                      max_position_embeddings=2 * T + 64, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg).eval()


def _probe_set(rewards, T: int, V: int, seed: int, *, prompt_len: int = 8) -> ProbeSet:
    rng = np.random.default_rng(seed)
    groups = []
    for gi, rw in enumerate(rewards):
        resp = tuple(tuple(int(t) for t in rng.integers(3, V, size=int(rng.integers(T // 2, T + 1))))
                     for _ in rw)
        groups.append(ProbeGroup(gi, tuple(int(t) for t in rng.integers(3, V, size=prompt_len)), resp,
                                 tuple(float(r) for r in rw)))
    return ProbeSet(tuple(groups))


def _assert_frames_close(new: pd.DataFrame, old: pd.DataFrame, rtol: float, atol: float,
                         loose: dict[str, tuple[float, float]] | None = None) -> None:
    """Equal columns, names and order; floats to (rtol, atol), or to ``loose[col]`` for those named."""
    assert list(new.columns) == list(old.columns)
    assert len(new) == len(old)
    for col in old.columns:
        a, b = new[col].to_numpy(), old[col].to_numpy()
        if a.dtype.kind in "fc" or b.dtype.kind in "fc":
            r, t = (loose or {}).get(col, (rtol, atol))
            np.testing.assert_allclose(a.astype(float), b.astype(float), rtol=r, atol=t, err_msg=col)
        else:
            assert (a == b).all(), col


@pytest.fixture(scope="module")
def tiny():
    from resrl_analysis.probes.synthetic import random_probe_set, tiny_model

    model = tiny_model(seed=3, dtype=torch.float64)
    ps = random_probe_set([[1, 0, 0, 1, 0], [0, 1, 0], [0, 0, 0], [1, 1, 0, 1]], max_len=6, seed=5)
    return model, ps, forward_probe_set(model, ps)


@pytest.fixture(scope="module")
def qwen256():
    """G = 8 responses of up to T = 256 tokens, V = 32,000, d = 256 (the issue's CPU shape)."""
    model = _qwen3_shaped(256)
    ps = _probe_set([[1, 0, 1, 0, 0, 1, 0, 0]], 256, 32_000, seed=1)
    return model, ps, forward_probe_set(model, ps)


def _interference_tables(model, ps, fwds):
    from resrl_analysis.probes.interference import interference_probe

    new = interference_probe(model, ps, forwards=fwds, max_cosine_samples=64)
    old = old_interference_probe(model, ps, forwards=fwds, max_cosine_samples=64)
    return new, old


def test_interference_matches_the_old_path_tiny(tiny):
    new, old = _interference_tables(*tiny)
    # The old NTHR formed float32 probabilities even from a float64 model; the shared Gram keeps float64.
    loose = {"nthr_tau": (1e-6, 1e-6), "nthr_score": (1e-6, 1e-6)}
    for name in ("groups", "tokens", "cosine_samples"):
        _assert_frames_close(getattr(new, name), getattr(old, name), rtol=1e-9, atol=1e-12, loose=loose)


def test_interference_matches_the_old_path_qwen3_shape(qwen256):
    new, old = _interference_tables(*qwen256)
    # float32: summation orders differ (vocabulary chunks against one product), so a float32 tolerance
    # relative to the cosines' scale; NTHR flags may differ only where a score ties its threshold.
    g_new, g_old = new.groups, old.groups
    for col in g_old.columns:
        if g_old[col].dtype.kind == "f":
            np.testing.assert_allclose(g_new[col], g_old[col], rtol=2e-4, atol=2e-6, err_msg=col)
        else:
            assert (g_new[col] == g_old[col]).all(), col
    t_new, t_old = new.tokens, old.tokens
    assert list(t_new.columns) == list(t_old.columns)
    for col in ("response_index", "position", "token_id"):
        assert (t_new[col] == t_old[col]).all()
    for col in ("cos_mean", "cos_max", "cos_frac_positive", "nthr_score"):
        np.testing.assert_allclose(t_new[col], t_old[col], rtol=2e-4, atol=2e-6, err_msg=col)
    assert (t_new.nthr_flagged != t_old.nthr_flagged).mean() < 0.01
    np.testing.assert_allclose(new.cosine_samples.cosine, old.cosine_samples.cosine, rtol=2e-4, atol=2e-6)


def test_subspace_matches_the_old_path_tiny(tiny):
    from resrl_analysis.probes.subspace import subspace_probe

    model, ps, fwds = tiny
    cfg = ResRLWeightConfig(rank=3, svd="exact")
    new, old = subspace_probe(model, ps, forwards=fwds, config=cfg), old_subspace_probe(model, ps, forwards=fwds,
                                                                                         config=cfg)
    for name in ("groups", "tokens", "explained_variance", "pairs", "correlation"):
        _assert_frames_close(getattr(new, name), getattr(old, name), rtol=1e-9, atol=1e-12)


def test_subspace_matches_the_old_path_qwen3_shape(qwen256):
    from resrl_analysis.probes.subspace import subspace_probe

    model, ps, fwds = qwen256
    reps = [Representation("penultimate", True, True), Representation("head_input", False, False)]
    new = subspace_probe(model, ps, forwards=fwds, representations=reps)
    old = old_subspace_probe(model, ps, forwards=fwds, representations=reps)
    # float32 head interference from the chunked Gram: relative tolerance; violation counts equal.
    loose = {c: (2e-4, 1e-6) for c in ("interference_sum_abs", "interference_max_abs", "head_abs",
                                       "head_tight_bound")}
    for name in ("groups", "tokens", "explained_variance", "pairs"):
        _assert_frames_close(getattr(new, name), getattr(old, name), rtol=1e-5, atol=1e-7, loose=loose)
    np.testing.assert_allclose(new.correlation.spearman_sum, old.correlation.spearman_sum, atol=1e-3)


def _all_advantages(fwd):
    from resrl_analysis.probes.first_order import ALGORITHMS, token_advantages

    return [token_advantages(fwd, alg) for alg in ALGORITHMS]


@pytest.mark.parametrize("which", ["tiny", "qwen256"])
def test_first_order_prediction_matches_the_old_path(which, request):
    from resrl_analysis.probes.first_order import predict_delta

    model, ps, fwds = request.getfixturevalue(which)
    tol = {"tiny": (1e-9, 1e-12), "qwen256": (2e-4, 1e-7)}[which]
    for fwd in fwds:
        advs = _all_advantages(fwd)
        new, old = predict_delta(fwd, advs, 1e-3), old_predict_delta(fwd, advs, 1e-3)
        for a, b in zip(new, old):
            scale = float(b.abs().max()) or 1.0
            torch.testing.assert_close(a, b, rtol=tol[0], atol=tol[1] * scale)


def test_full_step_micro_batched_with_checkpointing_equals_one_batch(tiny):
    from resrl_analysis.probes.capture import checkpointing
    from resrl_analysis.probes.first_order import full_step_delta

    model, ps, fwds = tiny
    fwd = fwds[0]
    adv = _all_advantages(fwd)[0]
    with checkpointing(model) as on:
        assert on and model.training
    assert not model.training and not model.is_activation_checkpointing
    whole = full_step_delta(model, fwd, adv, 1e-2, micro_batch=None, use_checkpointing=False)
    parts = full_step_delta(model, fwd, adv, 1e-2, micro_batch=2, use_checkpointing=True)
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-9)
    assert not model.training


def test_real_steps_only_where_asked_and_stated(tiny):
    from resrl_analysis.probes.first_order import first_order_prediction

    model, ps, fwds = tiny
    r = first_order_prediction(model, ps, forwards=fwds, algorithms=["grpo", "nsr"], step_algorithms=["nsr"],
                               step_groups=2)
    p = r.predictions
    ids = [f.group.group_id for f in fwds][:2]
    stepped = p.group_id.isin(ids) & (p.algorithm == "nsr")
    assert p.actual_head[stepped].notna().all() and p.actual_head[~stepped].isna().all()
    assert r.meta["real_step_algorithms"] == ["nsr"] and r.meta["real_step_group_ids"] == sorted(ids)
    # The predictions do not depend on which real steps ran.
    every = first_order_prediction(model, ps, forwards=fwds, algorithms=["grpo", "nsr"], head_step=False)
    np.testing.assert_allclose(every.predictions.predicted, p.predicted, rtol=1e-12)


def test_full_model_cosine_micro_batched_equals_one_batch(tiny):
    model, ps, fwds = tiny
    fwd = next(f for f in fwds if f.group.is_mixed)
    gids = torch.zeros(fwd.mask.shape[0], dtype=torch.long)
    adv = group_advantages(fwd.rewards.float(), gids, "grpo")[:, None].expand_as(fwd.mask).float()
    whole = full_model_gradient_cosine(model, fwd, adv, micro_batch=None, use_checkpointing=False)
    parts = full_model_gradient_cosine(model, fwd, adv, micro_batch=1, use_checkpointing=True)
    for k, v in whole.items():
        assert parts[k] == pytest.approx(v, rel=1e-7, abs=1e-12), k


def test_nthr_advantages_reuse_the_shared_gram(tiny):
    from dataclasses import replace as dc_replace

    from resrl_analysis.interference import nthr_token_weights
    from resrl_analysis.probes.first_order import token_advantages

    model, ps, fwds = tiny
    fwd = next(f for f in fwds if f.group.is_mixed)
    gids = torch.zeros(fwd.mask.shape[0], dtype=torch.long)
    args = (fwd.head_input, fwd.logits, fwd.labels, fwd.mask, fwd.is_positive, gids)
    own = nthr_token_weights(*args)
    shared = nthr_token_weights(*args, grams=fwd.grams())
    torch.testing.assert_close(shared.scores, own.scores, equal_nan=True, rtol=1e-12, atol=1e-12)
    # A different Gram handed over is what gets used (so the probes' one really is reused) ...
    fake = dc_replace(fwd.grams(), inner=torch.zeros_like(fwd.grams().inner))
    zero = nthr_token_weights(*args, grams=fake)
    assert float(zero.scores[~torch.isnan(zero.scores)].abs().max()) == 0.0
    # ... and only for inputs it can be the Gram of (one group, its tokens, temperature 1): the argument replaces
    # the context variable whose identity check on the logits guarded this before.
    with pytest.raises(ValueError, match="one group's Gram"):
        nthr_token_weights(*args, grams=fake, temperature=0.7)
    with pytest.raises(ValueError, match="one group's Gram"):
        nthr_token_weights(*args[:-1], torch.arange(len(gids)), grams=fake)
    nthr = token_advantages(fwd, "nthr")
    assert torch.isfinite(nthr).all()


def test_streamed_row_blocks_give_the_unstreamed_results(tiny, qwen256, monkeypatch):
    """The probes stream their (Tp, Tn) matrices in row blocks; blocks of a few rows give the same tables as
    one block holding the whole matrix (the default at these shapes)."""
    from resrl_analysis import interference as core
    from resrl_analysis.probes.interference import interference_probe
    from resrl_analysis.probes.subspace import subspace_probe

    # float64 (tiny): to rounding; float32 (qwen256): a block of three rows multiplies with other kernels than
    # the whole matrix, so |<x⁻, x⁺>| (d = 256, with cancellation) differs in its last float32 digits.
    for (model, ps, fwds), (rtol, atol) in zip((tiny, qwen256), ((1e-9, 1e-12), (2e-4, 1e-4))):
        whole = (interference_probe(model, ps, forwards=fwds, max_cosine_samples=64),
                 subspace_probe(model, ps, forwards=fwds, max_pair_samples=64))
        itemsize = fwds[0].grams().inner.element_size()
        n_neg = max(f.grams().y.shape[0] - f.grams().n_pos for f in fwds if f.group.is_mixed)
        monkeypatch.setattr(core, "BLOCK_BYTES", 3 * n_neg * itemsize)  # three rows per block
        streamed = (interference_probe(model, ps, forwards=fwds, max_cosine_samples=64),
                    subspace_probe(model, ps, forwards=fwds, max_pair_samples=64))
        monkeypatch.undo()
        for a, b in zip(streamed, whole):
            for name in type(a).TABLES:
                _assert_frames_close(getattr(a, name), getattr(b, name), rtol=rtol, atol=atol)
