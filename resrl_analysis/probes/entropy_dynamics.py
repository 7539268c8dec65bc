"""Which samples raise or lower entropy, exactly: the first-order entropy change of one SGD step of the head, split
by the polarity of the samples that cause it, beside real steps and the covariance proxy
(docs/MATH.md § Entropy dynamics).

For every token t of a probe group and every algorithm of the registry (its advantages on the group, as the
``first_order`` probe computes them),

    ΔH_t ≈ (η/Z) Σ_j A_j ⟨∇_W H_t, g_j⟩_F,

from the group's shared Gram built with its entropy part (one more vocabulary contraction in the same pass:
:func:`resrl_analysis.interference.group_grams`), split into the samples j of positive and of negative responses
(:func:`resrl_analysis.entropy_dynamics.predict_entropy_change`). On the probe set's first groups, beside it: the
realised ΔH of a real SGD step of the head alone (closed form, float64 by default, :func:`.first_order._head_pass`)
and of the whole model (shared with ``first_order`` when both run: :func:`.first_order.shared_full_steps`), and
Cui et al.'s covariance proxy (:func:`resrl_analysis.entropy_dynamics.covariance_proxy`). How well the prediction
and the proxy track the realised ΔH: Spearman per step and over the run (:func:`correlations`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from ..advantages import AdvantageParams
from ..entropy_dynamics import covariance_proxy, grams_columns, predict_entropy_change, source_entropy_effects
from ..probe_sets import ProbeSet
from ..results import EntropyDynamicsResult, ProbeResult
from .capture import GroupForward, forward_probe_set, pad_id_of
from .first_order import (
    ALGORITHMS,
    PROBE_PARAMS,
    REAL_STEP_GROUPS,
    FirstOrderOptions,
    FirstOrderProbe,
    _closed_form_head_ok,
    _head_pass,
    cached_token_advantages,
    shared_full_steps,
)
from .registry import FinishContext, GroupsContext, Probe, option, register_probe
from .subspace import spearman

if TYPE_CHECKING:
    from ..plan import PlanInputs

__all__ = ["TOKEN_ROWS", "EntropyDynamicsOptions", "EntropyDynamicsProbe", "correlations", "entropy_dynamics"]

#: Which groups' tokens the ``tokens`` table keeps: the groups that took the real steps, all, or none.
TOKEN_ROWS = ("stepped", "all", "none")

#: (level, predictor, target) pairs whose Spearman correlation :func:`correlations` reports.
CORRELATIONS = (
    ("token", "predicted", "actual_head"), ("token", "predicted", "actual_full"),
    ("token", "cov_proxy", "actual_head"), ("token", "cov_proxy", "actual_full"),
    ("token", "cov_proxy", "source_effect"),
    ("group", "predicted", "actual_head"), ("group", "predicted", "actual_full"),
    ("group", "cov_proxy", "actual_head"), ("group", "cov_proxy", "actual_full"),
)


def _scatter(gr_row: Tensor, gr_pos: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """(N, n) values in the Gram's token order → (G, T, n) float64 (NaN off the response tokens)."""
    out = torch.full((*shape, values.shape[1]), float("nan"), dtype=torch.float64)
    out[gr_row.cpu(), gr_pos.cpu()] = values.detach().double().cpu()
    return out


def _token_means(x: Tensor, mask: Tensor) -> Tensor:
    """(G, T, n) with NaN off ``mask`` → (G, n) means over each response's tokens (NaN-aware)."""
    return torch.nanmean(torch.where(mask[..., None], x, torch.full_like(x, float("nan"))), dim=1)


def entropy_dynamics(
    model: nn.Module,
    probe_set: ProbeSet,
    *,
    algorithms: Sequence[str] = ALGORITHMS,
    lr: float = 1e-3,
    head_step: bool = True,
    full_step: bool = False,
    step: int = 0,
    forwards: Sequence[GroupForward] | None = None,
    options: AdvantageParams | None = None,
    seed: int = 0,
    step_groups: int | Sequence[int] | None = REAL_STEP_GROUPS,
    micro_batch: int | None = 4,
    head_step_dtype: torch.dtype | None = torch.float64,
    token_rows: str = "stepped",
) -> EntropyDynamicsResult:
    """Predicted (first-order, head-only) ΔH of one SGD step of size ``lr`` for every probe token and algorithm,
    split into the parts caused by positive and by negative samples, with the realised ΔH of a real head-only step
    (``head_step``) and whole-model step (``full_step``) on the first ``step_groups`` groups (as
    :func:`.first_order.first_order_prediction` chooses them), and the covariance proxy.

    ``head_step_dtype`` (default float64): the precision of the real head-only step; confident tokens' entropy
    changes lie below float32's resolution of H, so the check of the prediction needs float64.
    ``token_rows``: which groups' per-token rows to keep (:data:`TOKEN_ROWS`).

    >>> from resrl_analysis.probe_sets import ProbeGroup
    >>> from resrl_analysis.probes.synthetic import tiny_model
    >>> ps = ProbeSet((ProbeGroup(0, (1, 5), ((6, 2), (7, 8, 2), (9, 2)), (1.0, 0.0, 0.0)),))
    >>> r = entropy_dynamics(tiny_model(), ps, algorithms=["grpo"])
    >>> g = r.groups.iloc[0]
    >>> bool(abs(g.predicted - g.predicted_from_pos - g.predicted_from_neg) < 1e-12), len(r.tokens)
    (True, 7)
    """
    bad = sorted(set(algorithms) - set(ALGORITHMS))
    if bad:
        raise ValueError(f"unknown algorithms {bad}; expected some of {ALGORITHMS}")
    if token_rows not in TOKEN_ROWS:
        raise ValueError(f"token_rows must be one of {TOKEN_ROWS}, got {token_rows!r}")
    options = options or PROBE_PARAMS
    pad_id = pad_id_of(model)
    if forwards is None:
        forwards = forward_probe_set(model, probe_set, pad_id=pad_id)
    head = model.get_output_embeddings()
    ids = [f.group.group_id for f in forwards]
    stepped = set(ids if step_groups is None else ids[:step_groups] if isinstance(step_groups, int) else step_groups)
    n = len(algorithms)
    grows, rrows, tparts = [], [], []
    for fwd in forwards:
        g = fwd.group
        G, T = fwd.mask.shape
        mask = fwd.mask.cpu()
        gr = fwd.grams(entropy=True)
        advs = [cached_token_advantages(fwd, alg, options, seed=seed) for alg in algorithms]
        A = grams_columns(gr, torch.stack(advs))  # (N, n)
        split = predict_entropy_change(gr, A, lr=lr)  # (N, n) each
        src = source_entropy_effects(gr, A, lr=lr)  # (N, n)
        nan = torch.full((G, T, n), float("nan"), dtype=torch.float64)
        pred = {k: _scatter(gr.row, gr.pos, v, (G, T)) for k, v in
                (("predicted", split.from_pos + split.from_neg), ("predicted_from_pos", split.from_pos),
                 ("predicted_from_neg", split.from_neg), ("source_effect", src))}
        ent = _scatter(gr.row, gr.pos, gr.entropy[:, None], (G, T))[..., 0]  # type: ignore[index]  # (G, T)
        cov_c, covs = [], []
        for a in advs:
            c, cv = covariance_proxy(fwd.logp, a, fwd.mask)
            cov_c.append(c.cpu())
            covs.append(cv)
        act_head, act_full = nan.clone(), nan.clone()
        if g.group_id in stepped:
            if head_step:
                hp = _head_pass(fwd, advs, lr, head, dtype=head_step_dtype, head_step=True, entropy=True)
                tok = fwd.tokens(torch.arange(G, device=fwd.mask.device), with_logits=False)
                act_head[tok["row"].cpu(), tok["pos"].cpu()] = hp.entropy_delta.double().cpu()  # type: ignore[union-attr]
            if full_step:
                closed = _closed_form_head_ok(model, fwd)
                hp_full = _head_pass(fwd, advs, lr, head, head_step=False, for_full_step=True) if closed else None
                fs = shared_full_steps(model, fwd, list(zip(algorithms, advs)), lr, pad_id=pad_id,
                                       micro_batch=micro_batch, head_pass=hp_full)
                after = fs.entropy_after.double().cpu()  # type: ignore[union-attr]  # (G, T, n)
                act_full = torch.where(mask[..., None], after - fwd.entropy.double().cpu()[..., None], nan)
        cols = {**pred, "actual_head": act_head, "actual_full": act_full}
        means = {k: _token_means(v, mask) for k, v in cols.items() if k != "source_effect"}  # (G, n) each
        group_means = {k: torch.nanmean(torch.where(mask[..., None], v, torch.full_like(v, float("nan"))).reshape(
            G * T, n), dim=0) for k, v in cols.items() if k != "source_effect"}  # (n,)
        ent_mean = float(ent[mask].mean()) if mask.any() else float("nan")
        n_tok = mask.sum(1)
        for k, alg in enumerate(algorithms):
            grows.append({"step": step, "group_id": g.group_id, "prompt_uid": g.prompt_uid, "algorithm": alg,
                          "status": g.status, "n_pos": g.n_positive, "n_neg": g.n_negative,
                          "n_tokens": int(mask.sum()), "lr": lr, "entropy_mean": ent_mean,
                          **{c: float(v[k]) for c, v in group_means.items()}, "covariance": covs[k]})
            for i in range(G):
                e_i = float(ent[i][mask[i]].mean()) if n_tok[i] else float("nan")
                rrows.append({"step": step, "group_id": g.group_id, "algorithm": alg, "response_index": i,
                              "is_positive": bool(fwd.is_positive[i]), "n_tokens": int(n_tok[i]),
                              "entropy_mean": e_i, **{c: float(v[i, k]) for c, v in means.items()}})
        if token_rows == "all" or (token_rows == "stepped" and g.group_id in stepped):
            resp, pos = np.nonzero(mask.numpy())  # row-major
            labels, logp = fwd.labels.cpu().numpy()[resp, pos], fwd.logp.double().cpu().numpy()[resp, pos]
            is_pos = fwd.is_positive.cpu().numpy()[resp]
            for k, alg in enumerate(algorithms):
                tparts.append(pd.DataFrame({
                    "step": step, "group_id": g.group_id, "algorithm": alg, "response_index": resp, "position": pos,
                    "token_id": labels, "is_positive": is_pos, "logp": logp,
                    "advantage": advs[k].double().cpu().numpy()[resp, pos], "entropy": ent.numpy()[resp, pos],
                    **{c: v[..., k].numpy()[resp, pos] for c, v in cols.items()},
                    "cov_centred": cov_c[k].numpy()[resp, pos]}))
    meta = {"lr": lr, "algorithms": list(algorithms), "loss": "token-mean over the group's response tokens",
            "head_step": head_step, "full_step": full_step, "head_step_dtype": str(head_step_dtype),
            "temperature": 1.0, "probe_set": probe_set.describe(), "skipped": [], "token_rows": token_rows,
            "real_step_group_ids": sorted(stepped) if (head_step or full_step) else [],
            "real_step_micro_batch": micro_batch,
            "cov_definition": "verl.trainer.ppo.core_algos.compute_policy_loss_clip_cov: (A - mean A)(log p - mean "
                              "log p) over the group's valid tokens"}
    tokens = pd.concat(tparts, ignore_index=True) if tparts else None
    return EntropyDynamicsResult(groups=pd.DataFrame(grows), responses=pd.DataFrame(rrows), tokens=tokens,
                                 correlation=None, meta=meta)


def correlations(result: EntropyDynamicsResult) -> pd.DataFrame:
    """Spearman rank correlations of the prediction and of the covariance proxy with the realised ΔH (and of the
    proxy's per-token term with the exact per-source effect), per algorithm: per step (``scope`` "step") and pooled
    over every step (``scope`` "run", ``step`` −1); token level from ``tokens``, group level from ``groups``.

    The proxy is −cov_centred per token and −covariance per group (Cui et al.: the entropy falls by about η·Cov).
    NaN where fewer than 3 values or a constant side.
    """
    rows = []
    t = result.tokens.assign(cov_proxy=-result.tokens.cov_centred) if len(result.tokens) else result.tokens
    g = result.groups.assign(cov_proxy=-result.groups["covariance"]) if len(result.groups) else result.groups
    for level, frame in (("token", t), ("group", g)):
        if not len(frame):
            continue
        for alg, fa in frame.groupby("algorithm", sort=False):
            scopes = [("step", int(s), d) for s, d in fa.groupby("step", sort=True)] + [("run", -1, fa)]
            for scope, s, d in scopes:
                for lv, pred, target in CORRELATIONS:
                    if lv != level or target not in d:
                        continue
                    ok = d[[pred, target]].dropna()
                    rho = spearman(ok[pred], ok[target])[0] if len(ok) else float("nan")
                    rows.append({"scope": scope, "step": s, "algorithm": alg, "level": level, "predictor": pred,
                                 "target": target, "n": len(ok), "spearman": rho})
    cols = ["scope", "step", "algorithm", "level", "predictor", "target", "n", "spearman"]
    return pd.DataFrame(rows, columns=cols)


# ----------------------------------------------------------------------------- registration


@dataclass(frozen=True)
class EntropyDynamicsOptions(FirstOrderOptions):
    """Options of the ``entropy_dynamics`` probe (the algorithms, step size and subspace settings are
    ``first_order``'s: one flag sets both, and their whole-model steps are shared)."""

    entropy_tokens: str = option("stepped", "per-token rows of entropy_dynamics: 'stepped' (the groups that take "
                                 "the real steps, default), 'all' or 'none'", choices=TOKEN_ROWS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.entropy_tokens not in TOKEN_ROWS:
            raise ValueError(f"--entropy-tokens must be one of {', '.join(TOKEN_ROWS)}, got {self.entropy_tokens!r}")


@register_probe
class EntropyDynamicsProbe(Probe):
    """:func:`entropy_dynamics` on each group batch; the real steps on the probe set's first groups."""

    name = "entropy_dynamics"
    summary = ("exact first-order entropy change of a head step per token, split into the parts caused by "
               "positive and by negative samples, beside real head-only and whole-model steps and Cui et al.'s "
               "covariance proxy")
    result = EntropyDynamicsResult
    scope = "groups"
    needs = frozenset({"gram", "entropy_gram"})
    Options = EntropyDynamicsOptions
    live = True
    live_default = False  # real head steps in float64 for every stepped group: asked for, not run by default
    plan_hint = "--full-model-steps none, fewer --algorithms or --entropy-tokens none"

    def plan(self, p: PlanInputs) -> dict[str, int]:
        N, V, d = p.N, p.model.vocab, p.model.hidden
        n_alg = max(1, len(self.options.algorithms))
        # first_order's terms (the whole-model steps are the same, shared when both run), its head pass in float64
        # with the entropies' temporaries, and the (N, 3n) products of the prediction.
        t = FirstOrderProbe(self.options).plan(p)
        t["head pass"] = min(64 * 2**20, (3 + 4 * n_alg) * N * V * 8) + N * (n_alg + 1) * d * 8
        t["entropy split"] = 6 * N * n_alg * 8
        return t

    def on_groups(self, ctx: GroupsContext) -> EntropyDynamicsResult:
        o = self.options
        step_ids = [g.group_id for g in ctx.all_groups.groups[:REAL_STEP_GROUPS]]
        # On an FSDP2-sharded model a whole-model step is a collective job of every rank (first_order's deferred
        # jobs); the entropies after it are not among what those jobs return, so only the head-only step runs here.
        sharded = ctx.whole_model is not None
        r = entropy_dynamics(ctx.model, ctx.probe_set, algorithms=o.algorithms, lr=o.lr, head_step=True,
                             full_step=ctx.full_model and not sharded, step=ctx.step, forwards=ctx.forwards,
                             options=o.params(), seed=ctx.seed, step_groups=step_ids, token_rows=o.entropy_tokens)
        if sharded and ctx.full_model:
            r.meta["full_step_not_run"] = ("the model is sharded (--parallel shard): the whole-model step's entropy "
                                           "change (actual_full) is not computed; the head-only step's is")
        return r

    def finish(self, ctx: FinishContext, parts: Sequence[ProbeResult]) -> ProbeResult:
        r = super().finish(ctx, parts)
        assert isinstance(r, EntropyDynamicsResult)
        return EntropyDynamicsResult(groups=r.groups, responses=r.responses, tokens=r.tokens,
                                     correlation=correlations(r),
                                     meta={**r.meta, "full_model_steps": list(ctx.full_model_steps)})

    def live_metrics(self, results: Mapping[str, ProbeResult], step: int) -> dict[str, float]:
        g = results["entropy_dynamics"].groups  # type: ignore[attr-defined]
        if not len(g):
            return {}
        g = g[g.step == step]
        alg = "grpo" if "grpo" in set(g.algorithm) else (g.algorithm.iloc[0] if len(g) else None)
        g = g[g.algorithm == alg]
        if not len(g):
            return {}
        out = {"probe/entropy_pred_from_pos": float(g.predicted_from_pos.mean()),
               "probe/entropy_pred_from_neg": float(g.predicted_from_neg.mean())}
        return {k: v for k, v in out.items() if np.isfinite(v)}
