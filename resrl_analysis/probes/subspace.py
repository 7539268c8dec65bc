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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import Tensor, nn

from ..bounds import paper_bound_from_norms, projection_norms, tight_bound_from_norms
from ..interference import GroupGrams, block_picks, row_blocks, streaming_quantiles
from ..probe_sets import ProbeSet
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
from .first_order import SubspaceSettings
from .interference import _concat, _frame
from .parallel import in_group_order
from .registry import CheckpointContext, GroupsContext, Probe, register_probe

if TYPE_CHECKING:
    from ..plan import PlanInputs

__all__ = [
    "Representation",
    "ALL_REPRESENTATIONS",
    "PAPER_REPRESENTATION",
    "spearman",
    "subspace_probe",
    "correlation_table",
    "merge_subspace_results",
    "pair_sample",
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


def pair_sample(n_pairs: int, k: int, seed: int) -> np.ndarray:
    """``min(k, n_pairs)`` distinct flat pair indices, uniform without replacement, in draw order, seeded
    (numpy's ``Generator.choice``: O(k) memory however many pairs, where a permutation of all pairs would
    need 2 GB for a group of 8 × 4,096 tokens).

    >>> pair_sample(10, 3, seed=0).tolist() == pair_sample(10, 3, seed=0).tolist(), len(pair_sample(2, 5, 0))
    (True, 2)
    """
    return np.random.default_rng(seed).choice(n_pairs, min(k, n_pairs), replace=False)


def _pair_pass(gr: GroupGrams, xpc: Tensor, xnc: Tensor, basis: Tensor, lf: Tensor, hn: Tensor,
               blocks: list[slice], rtol: float, max_pair_samples: int, group_id: int) -> dict:
    """The positive×negative pair statistics of one representation, streamed over row blocks of positives:
    bound violations (the representation's and the head gradient's), the tightness ratios |<x⁻, x⁺>| / bound
    (mean and max in one pass, the exact median by :func:`~resrl_analysis.interference.streaming_quantiles`),
    and the same uniform sample of pairs for every representation (:func:`pair_sample`, seeded by the group)
    for the scatter plots."""
    Tp, Tn = xpc.shape[0], xnc.shape[0]
    ip, op = projection_norms(xpc, basis)
    ineg, oneg = projection_norms(xnc, basis)
    npn, nnn = xpc.norm(dim=-1), xnc.norm(dim=-1)
    lf_p, lf_n, hn_p, hn_n = lf[:Tp], lf[Tp:], hn[:Tp], hn[Tp:]
    dev = xpc.device

    def block(b: slice) -> tuple[Tensor, Tensor, Tensor]:
        return ((xpc[b] @ xnc.T).abs(), tight_bound_from_norms(ip[b], op[b], ineg, oneg),
                paper_bound_from_norms(ip[b], op[b], nnn, oneg))

    def ratio(inner: Tensor, den: Tensor) -> Tensor:
        ok = den > 0  # a pair whose bound is 0 has no ratio (its inner product is 0 as well)
        return (inner / den).reshape(-1) if bool(ok.all()) else inner[ok] / den[ok]

    def ratios() -> Iterator[tuple[Tensor, Tensor]]:
        for b in blocks:
            inner, tight, paper = block(b)
            yield ratio(inner, tight), ratio(inner, paper)

    counts = dict.fromkeys(("tight_violations", "paper_violations", "head_tight_violations",
                            "head_paper_violations"), 0)
    r_sum, r_n, r_max = [0.0, 0.0], [0, 0], [float("-inf")] * 2
    pick = torch.as_tensor(pair_sample(Tp * Tn, max_pair_samples, group_id), device=dev)
    sample = {k: torch.empty(len(pick), dtype=torch.float64, device=dev)
              for k in ("true_abs", "tight_bound", "paper_bound", "head_abs", "head_tight_bound")}
    for b in blocks:
        inner, tight, paper = block(b)
        tol = rtol * npn[b, None] * nnn[None, :]  # (rb, Tn)
        g_scale = lf_p[b, None] * lf_n[None, :]
        g_tol = rtol * g_scale * (hn_p[b, None] * hn_n[None, :])
        K = gr.block("pos", "neg")[b].abs()
        counts["tight_violations"] += int((inner > tight + tol).sum())
        counts["paper_violations"] += int((inner > paper + tol).sum())
        counts["head_tight_violations"] += int((K > g_scale * tight + g_tol).sum())
        counts["head_paper_violations"] += int((K > g_scale * paper + g_tol).sum())
        for i, den in enumerate((tight, paper)):
            r = ratio(inner, den)
            if r.numel():
                r_sum[i] += float(r.sum(dtype=torch.float64))
                r_n[i] += r.numel()
                r_max[i] = max(r_max[i], float(r.max()))
        sel, at = block_picks(pick, b, Tn)
        for k, v in (("true_abs", inner), ("tight_bound", tight), ("paper_bound", paper), ("head_abs", K),
                     ("head_tight_bound", g_scale * tight)):
            sample[k][sel] = v.reshape(-1)[at].double()
    # Both medians exactly, in the same two passes (each recomputes the blocks: nothing (Tp, Tn) is kept).
    live = [i for i in (0, 1) if r_n[i]]
    meds = dict(zip(live, streaming_quantiles(lambda: (tuple(r[i] for i in live) for r in ratios()), [0.5],
                                              streams=len(live)))) if live else {}
    nan = float("nan")
    out = {"tight_ratio_mean": r_sum[0] / r_n[0] if r_n[0] else nan, "tight_ratio_median": meds.get(0, [nan])[0],
           "tight_ratio_max": r_max[0] if r_n[0] else nan,
           "paper_ratio_mean": r_sum[1] / r_n[1] if r_n[1] else nan, "paper_ratio_median": meds.get(1, [nan])[0]}
    counts.update(out)
    return {"counts": counts, "sample": sample}


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
    >>> from resrl_analysis.probe_sets import ProbeGroup
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
        Tn = gr.y.shape[0] - Tp
        # Every (Tp, Tn) matrix below is streamed in row blocks of positives, never held whole (1 GB each per
        # group at T = 4096, and the bounds need about ten of them).
        blocks = row_blocks(Tp, Tn, torch.finfo(cdt).bits // 8)
        # The true head interference does not depend on the representation: read it once.
        sum_abs = torch.zeros(Tn, dtype=torch.float64, device=dev)
        max_abs = torch.zeros(Tn, dtype=cdt, device=dev)
        for b in blocks:
            Kb = gr.block("pos", "neg")[b].abs()
            sum_abs += Kb.sum(0, dtype=torch.float64)
            max_abs = torch.maximum(max_abs, Kb.max(0).values)
        sum_abs, max_abs = sum_abs.cpu().numpy(), max_abs.double().cpu().numpy()  # (Tn,)
        lf = gr.logit_sqnorm.clamp(min=0).sqrt()  # (N,) ||e − p||
        hn_ = gr.rep_sqnorm.clamp(min=0).sqrt()  # (N,) ||h||
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
            pairs = _pair_pass(gr, xpc, xnc, sub.basis, lf, hn_, blocks, rtol, max_pair_samples, int(g.group_id))
            e_np = e.double().cpu().numpy()
            rho_s, p_s = spearman(e_np, sum_abs)
            rho_m, p_m = spearman(e_np, max_abs)
            grows.append({
                **base, **rep.columns(), "status": "ok", "rank": sub.rank, "n_pos_tokens": int(xp.shape[0]),
                "n_neg_tokens": int(xn.shape[0]), "n_pairs": Tp * Tn,
                "residual_mean": float(e.mean()), "residual_median": float(e.median()),
                **pairs["counts"],
                "spearman_sum": rho_s, "spearman_sum_p": p_s, "spearman_max": rho_m, "spearman_max_p": p_m,
            })
            cols = rep.columns()
            tframes.append(_frame({
                **base, **cols, "response_index": tn["row"], "position": tn["pos"], "token_id": tn["y"],
                "residual_energy": e.double(), "resrl_weight": w.double(),
                "interference_sum_abs": sum_abs.astype(np.float64), "interference_max_abs": max_abs.astype(np.float64),
            }, xn.shape[0]))
            pframes.append(_frame({**base, **cols, **pairs["sample"]}, len(pairs["sample"]["true_abs"])))
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


# ----------------------------------------------------------------------------- registration


@register_probe
class SubspaceProbe(Probe):
    """:func:`subspace_probe` on each group batch; per checkpoint the correlations pooled over every group."""

    name = "subspace"
    summary = ("residual energy under 8 representations, explained variance, the alignment bound, "
               "Spearman(residual, true interference)")
    result = SubspaceResult
    scope = "groups"
    needs = frozenset({"gram"})
    Options = SubspaceSettings
    plan_hint = "fewer responses per group or shorter --max-new-tokens"

    def plan(self, p: PlanInputs) -> dict[str, int]:
        # One row block of |<x⁻, x⁺>|, both bounds, tolerances, |<g⁺, g⁻>| and the ratios (about twelve).
        return {"gram build": p.gram_build, "bound blocks": 12 * p.tp_tn_block}

    def on_groups(self, ctx: GroupsContext) -> SubspaceResult:
        return subspace_probe(ctx.model, ctx.probe_set, step=ctx.step, forwards=ctx.forwards,
                              config=self.options.params().resrl, seed=ctx.seed)

    def on_checkpoint(self, ctx: CheckpointContext, parts: Sequence[SubspaceResult]) -> SubspaceResult | None:
        if len(parts) <= 1:
            return parts[0] if parts else None
        return merge_subspace_results(parts)  # pool the correlations over all the groups of this step again

    def merge_ranks(self, parts: Sequence[SubspaceResult], order: Mapping[int, int]) -> SubspaceResult:
        # The ranks' groups in the probe set's order, then the correlations pooled over all of them (as one
        # process pools its batches).
        r = in_group_order(SubspaceResult.concat(parts), order)
        return replace(r, correlation=correlation_table(r.groups, r.tokens))  # type: ignore[attr-defined]
