"""The ResRL subspace, residual energy and the alignment bound, under every representation
(docs/MATH.md § Alignment bound).

For each mixed group and each representation x of the tokens — layer (``penultimate`` = HF
``hidden_states[-2]``, the paper's choice, or ``head_input``), LayerNorm without affine on or off,
centred on the positive mean or not — this probe fits the positive subspace S
(:func:`resrl_analysis.weighting.positive_subspace`), and measures:

- each negative token's residual energy e(x⁻) (:func:`resrl_analysis.weighting.residual_energy`)
  and ResRL weight ω (:func:`resrl_analysis.weighting.weights_from_residuals`);
- the explained variance of the positive tokens against rank;
- the tight and the paper-form alignment bound on |<x⁻, x⁺>| for every positive×negative pair
  (:mod:`resrl_analysis.bounds`): violations (zero up to float tolerance: it is Cauchy–Schwarz)
  and the tightness ratio |<x⁻, x⁺>| / bound;
- the same bounds read as bounds on the true head-gradient interference,
  |<g⁺, g⁻>| ≤ ||e⁺ − p⁺||·||e⁻ − p⁻||·bound(x): exact only when x is the raw head input; for the
  other representations the violation count measures how far the paper's proxy is from a bound;
- the Spearman correlation between a negative token's residual energy (the single-forward proxy)
  and its true head interference with the positives, Σ and max over positive tokens of
  |<g⁺, g⁻>| (the paper's claim predicts a negative correlation).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn

from ..bounds import alignment_bound, alignment_bound_paper
from ..checkpoints import ProbeSet
from ..interference import device_quantiles
from ..results import SubspaceResult
from ..weighting import (
    ResRLWeightConfig,
    explained_variance,
    layer_norm_no_affine,
    positive_subspace,
    residual_energy,
    weights_from_residuals,
)
from .capture import GroupForward, forward_probe_set, pad_id_of
from .interference import _concat, _frame

__all__ = [
    "Representation",
    "ALL_REPRESENTATIONS",
    "PAPER_REPRESENTATION",
    "spearman",
    "subspace_probe",
    "correlation_table",
    "merge_subspace_results",
]


@dataclass(frozen=True)
class Representation:
    """Which vectors the subspace is built from: layer, LayerNorm (no affine) on/off, centred or not.

    >>> Representation("penultimate", True, True).name
    'penultimate/ln/centred'
    """

    layer: str
    layer_norm: bool
    center: bool

    def __post_init__(self) -> None:
        if self.layer not in ("penultimate", "head_input"):
            raise ValueError(f"layer must be 'penultimate' or 'head_input', got {self.layer!r}")

    @property
    def name(self) -> str:
        return f"{self.layer}/{'ln' if self.layer_norm else 'raw'}/{'centred' if self.center else 'uncentred'}"

    def columns(self) -> dict:
        return {"representation": self.name, "layer": self.layer, "layer_norm": self.layer_norm, "center": self.center}


ALL_REPRESENTATIONS: tuple[Representation, ...] = tuple(
    Representation(layer, ln, c)
    for layer in ("penultimate", "head_input") for ln in (True, False) for c in (True, False)
)
PAPER_REPRESENTATION = Representation("penultimate", True, True)


def spearman(x: np.ndarray | Sequence[float], y: np.ndarray | Sequence[float]) -> tuple[float, float]:
    """Spearman rank correlation and its p-value (scipy); (NaN, NaN) with fewer than 3 points or a
    constant input.

    >>> spearman([1, 2, 3, 4], [10, 20, 25, 400])
    (1.0, 0.0)
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = stats.spearmanr(x, y)
    return float(r.statistic), float(r.pvalue)


def _ratio_stats(num: torch.Tensor, den: torch.Tensor) -> tuple[float, float, float]:
    ok = den > 0
    if not ok.any():
        return float("nan"), float("nan"), float("nan")
    r = num[ok] / den[ok]  # on the device: the mean in float64, the median exact (np.median's)
    return float(r.sum(dtype=torch.float64)) / r.numel(), device_quantiles(r, [0.5])[0], float(r.max())


def subspace_probe(
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
    """Residual energies, explained variance, the alignment bounds and the proxy's correlation with
    the true head interference, for every mixed group and representation.

    Args:
        representations: which (layer, LayerNorm, centring) choices to measure (all eight by default).
        config: subspace hyper-parameters (rank, max_pos_tokens, quantiles for ω, SVD method; exact
            SVD by default so the probe is deterministic).
        max_ev_rank: explained variance is reported for ranks 1..max_ev_rank.
        max_pair_samples: positive×negative pairs kept per group and representation in the ``pairs``
            table (a uniform sample, for scatter plots of |<x⁻, x⁺>| against its bounds).
        rtol: a pair violates a bound when the left side exceeds it by more than
            rtol·||x⁺||·||x⁻|| (float tolerance; ||g⁺||·||g⁻|| for the head-gradient reading).

    Groups that are not mixed, or have fewer than ``config.min_pos_tokens`` positive tokens, get a
    row per representation with their ``status`` and are listed in ``meta["skipped"]``.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from resrl_analysis.checkpoints import ProbeGroup
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)).eval()
    >>> ps = ProbeSet((ProbeGroup(0, (1, 5), ((6, 3, 2), (4, 5, 2), (7, 8, 2), (9, 2)), (1.0, 1.0, 0.0, 0.0)),))
    >>> r = subspace_probe(m, ps)
    >>> int(r.groups.tight_violations.sum()), sorted(r.groups.status.unique())
    (0, ['ok'])
    """
    cfg = config or ResRLWeightConfig(svd="exact")
    if forwards is None:
        forwards = forward_probe_set(model, probe_set, pad_id=pad_id_of(model))
    grows, tframes, erows, pframes, skipped = [], [], [], [], []
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
        gr = fwd.grams()  # shared with the other probes: computed once per group
        Tp = gr.n_pos
        cdt = gr.inner.dtype
        # The true head interference does not depend on the representation: read it once.
        K = gr.block("pos", "neg").abs()  # (Tp, Tn)
        sum_abs, max_abs = K.sum(0).cpu().numpy(), K.max(0).values.cpu().numpy()  # (Tn,)
        lf = gr.logit_sqnorm.clamp(min=0).sqrt()  # (N,) ||e − p||
        hn_ = gr.rep_sqnorm.clamp(min=0).sqrt()  # (N,) ||h||
        hnorm = hn_[:Tp, None] * hn_[None, Tp:]  # (Tp, Tn)
        g_scale = lf[:Tp, None] * lf[None, Tp:]  # (Tp, Tn)
        tn = {"row": gr.row[Tp:], "pos": gr.pos[Tp:], "y": gr.y[Tp:]}
        n_pos_tok = Tp
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(g.group_id))
        keep = None
        if n_pos_tok > cfg.max_pos_tokens:
            keep = torch.randperm(n_pos_tok, generator=gen)[: cfg.max_pos_tokens].sort().values.to(dev)
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
            tframes.append(_frame({
                **base, **cols, "response_index": tn["row"], "position": tn["pos"], "token_id": tn["y"],
                "residual_energy": e.double(), "resrl_weight": w.double(),
                "interference_sum_abs": sum_abs.astype(np.float64), "interference_max_abs": max_abs.astype(np.float64),
            }, xn.shape[0]))
            # A fixed sample of pairs (same for every representation) for the bound scatter plots.
            n_pairs = inner.numel()
            pick = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(int(g.group_id)))[:max_pair_samples]
            pick = pick.to(dev)
            flat = {"true_abs": inner, "tight_bound": tight, "paper_bound": paper, "head_abs": K,
                    "head_tight_bound": g_scale * tight}
            pframes.append(_frame({**base, **cols, **{k: v.reshape(-1)[pick].double() for k, v in flat.items()}},
                                  len(pick)))
            ev = explained_variance(xfit, max_ev_rank, center=rep.center)
            erows += [{"step": step, "group_id": g.group_id, **cols, "rank": k + 1, "explained_variance": float(v)}
                      for k, v in enumerate(ev.tolist())]
    groups_df, tokens_df = pd.DataFrame(grows), _concat(tframes)
    meta = {"representations": [r.name for r in representations], "rank": cfg.rank, "svd": cfg.svd,
            "max_pos_tokens": cfg.max_pos_tokens, "q_low": cfg.q_low, "q_high": cfg.q_high,
            "min_weight": cfg.min_weight, "rtol": rtol, "seed": seed, "probe_set": probe_set.describe(),
            "skipped": skipped}
    r = SubspaceResult(groups=groups_df, tokens=tokens_df, explained_variance=pd.DataFrame(erows),
                       pairs=_concat(pframes), meta=meta)
    return replace(r, correlation=correlation_table(r.groups, r.tokens))


def correlation_table(groups: pd.DataFrame, tokens: pd.DataFrame) -> pd.DataFrame:
    """Per (step, representation): Spearman of residual energy against Σ / max |<g⁺, g⁻>| pooled over
    the groups' negative tokens, and the mean of the per-group correlations (the ``correlation``
    table of :class:`~resrl_analysis.results.SubspaceResult`, rebuilt from its other two tables)."""
    rows = []
    ok = groups[groups.status == "ok"]
    per_group = {k: (d.spearman_sum.to_numpy(), d.spearman_max.to_numpy())
                 for k, d in ok.groupby(["step", "representation"], sort=False)}
    for (step, rep), d in tokens.groupby(["step", "representation"], sort=False):
        e = d.residual_energy.to_numpy()
        rs, ps_ = spearman(e, d.interference_sum_abs.to_numpy())
        rm, pm = spearman(e, d.interference_max_abs.to_numpy())
        g_sum, g_max = per_group.get((step, rep), (np.array([]), np.array([])))
        rows.append({"step": int(step), "representation": rep, "layer": d.layer.iloc[0],
                     "layer_norm": bool(d.layer_norm.iloc[0]), "center": bool(d.center.iloc[0]),
                     "n_groups": int(d.group_id.nunique()), "n_tokens": len(d), "spearman_sum": rs,
                     "spearman_sum_p": ps_, "spearman_max": rm, "spearman_max_p": pm,
                     "spearman_sum_group_mean": _nanmean(g_sum), "spearman_max_group_mean": _nanmean(g_max)})
    return pd.DataFrame(rows, columns=list(SubspaceResult.TABLES["correlation"]))


def merge_subspace_results(results: Sequence[SubspaceResult]) -> SubspaceResult:
    """Concatenate results of disjoint groups (e.g. probed one group at a time) and pool their
    correlations again."""
    r = SubspaceResult.concat(results)
    return replace(r, correlation=correlation_table(r.groups, r.tokens))


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")
