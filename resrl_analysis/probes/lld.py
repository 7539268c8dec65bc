"""Lazy likelihood displacement (Deng et al., arXiv 2505.18830) and probe-set entropy
(docs/MATH.md § Lazy likelihood displacement).

Every checkpoint scores the same teacher-forced responses (:func:`score_responses`): log π(y|x) =
Σ_t log p_t[y_t], its per-token mean, and the mean token entropy. Comparing two checkpoints θ → θ′,
for each prompt x,

    Δ(x) = mean over positive responses i of [ log π_θ′(y_i|x) − log π_θ(y_i|x) ]

(and the per-token-mean variant, and the same over negative responses). LLD is Δ(x) ≤ ε: training
failed to raise, or lowered, the likelihood of correct answers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..probe_sets import ProbeSet
from ..results import LLDResult, ProbeResult, ScoresResult
from .capture import GroupForward, forward_probe_set, pad_id_of
from .registry import FinishContext, GroupsContext, Probe, option, register_probe

if TYPE_CHECKING:
    from ..plan import PlanInputs

__all__ = ["score_responses", "scores_from_forwards", "lld_between", "lld_along_run", "lld_between_models",
           "LLDOptions", "LLDProbe", "EntropyProbe"]


def scores_from_forwards(forwards: Sequence[GroupForward], *, step: int = 0, meta: dict | None = None,
                         tokens: bool = True) -> ScoresResult:
    """Per-response log-likelihood and entropy from forward passes already made (one row per response).

    With ``tokens`` (the default) the result also holds the per-token detail that ``resrl view`` colours:
    ``tokens``, one row per response token (its id, log-prob and entropy), and ``prompts``, one row per
    group (prompt text and ground truth). Its size is that of the probe set, not of the vocabulary: about 20
    bytes per token in parquet, e.g. 5 MB per checkpoint for 8 groups × 8 responses × 4096 tokens.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from resrl_analysis.probe_sets import ProbeGroup, ProbeSet
    >>> from resrl_analysis.probes.capture import forward_probe_set
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    >>> ps = ProbeSet((ProbeGroup(0, (1, 5), ((6, 2), (7,)), (1.0, 0.0), prompt="hi"),))
    >>> r = scores_from_forwards(forward_probe_set(m, ps, keep_hidden=False, keep_logits=False), step=3)
    >>> r.tokens[["step", "response_index", "position", "token_id"]].values.tolist()
    [[3, 0, 0, 6], [3, 0, 1, 2], [3, 1, 0, 7]]
    >>> bool(np.isclose(r.tokens.logp[:2].sum(), r.responses.logp_sum[0])), r.prompts.prompt.tolist()
    (True, ['hi'])
    """
    rows, tok_parts, prompt_rows = [], [], []
    for f in forwards:
        n = f.mask.sum(1)  # (G,)
        lsum = f.logp.sum(1)  # (G,) padding holds 0
        esum = f.entropy.sum(1)  # (G,)
        for i in range(f.mask.shape[0]):
            k = int(n[i])
            rows.append({"step": step, "group_id": f.group.group_id, "prompt_uid": f.group.prompt_uid,
                         "response_index": i, "is_positive": bool(f.is_positive[i]), "reward": float(f.rewards[i]),
                         "n_tokens": k, "logp_sum": float(lsum[i]), "logp_mean": float(lsum[i]) / k if k else np.nan,
                         "entropy_mean": float(esum[i]) / k if k else np.nan})
        if tokens:
            mask = f.mask.cpu().numpy()  # (G, T)
            resp, pos = np.nonzero(mask)  # row-major: by response, then position
            tok_parts.append(pd.DataFrame({
                "step": step, "group_id": f.group.group_id, "response_index": resp, "position": pos,
                "token_id": f.labels.cpu().numpy()[mask], "logp": f.logp.float().cpu().numpy()[mask].astype(np.float64),
                "entropy": f.entropy.float().cpu().numpy()[mask].astype(np.float64)}))
            g = f.group
            prompt_rows.append({"step": step, "group_id": g.group_id, "prompt_uid": g.prompt_uid,
                                "data_source": g.data_source, "prompt": g.prompt, "ground_truth": g.ground_truth})
    detail = {"tokens": pd.concat(tok_parts, ignore_index=True) if tok_parts else None,
              "prompts": pd.DataFrame(prompt_rows) if prompt_rows else None}
    return ScoresResult(responses=pd.DataFrame(rows), **detail, meta=dict(meta or {}))


def score_responses(
    model: nn.Module, probe_set: ProbeSet, *, step: int = 0, forwards: Sequence[GroupForward] | None = None,
    tokens: bool = True,
) -> ScoresResult:
    """Teacher-forced log π(y|x), its per-token mean and the mean token entropy of every probe response.

    ``step`` labels the rows. Pass ``forwards`` to reuse forward passes made for other probes; ``tokens``
    keeps the per-token detail (:func:`scores_from_forwards`).

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from resrl_analysis.probe_sets import ProbeGroup
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    >>> ps = ProbeSet((ProbeGroup(0, (1, 5), ((6, 2), (7,)), (1.0, 0.0)),))
    >>> score_responses(m, ps).to_frame()[["response_index", "n_tokens"]].values.tolist()
    [[0, 2], [1, 1]]
    """
    if forwards is None:
        forwards = forward_probe_set(model, probe_set, keep_hidden=False, keep_logits=False,
                                     pad_id=pad_id_of(model))
    return scores_from_forwards(forwards, step=step, meta={"probe_set": probe_set.describe()}, tokens=tokens)


def _delta_rows(before: pd.DataFrame, after: pd.DataFrame, comparison: str, a: int, b: int, eps: float) -> list[dict]:
    key = ["group_id", "response_index"]
    m = before.merge(after, on=key, suffixes=("_a", "_b"), validate="one_to_one")
    if len(m) != len(before) or len(m) != len(after):
        raise ValueError(f"steps {a} and {b} were not scored on the same probe set")
    if not (m.n_tokens_a == m.n_tokens_b).all():
        raise ValueError(f"steps {a} and {b} scored responses of different lengths (another tokenizer?)")
    m["d_sum"] = m.logp_sum_b - m.logp_sum_a
    m["d_mean"] = m.logp_mean_b - m.logp_mean_a
    rows = []
    for gid, d in m.groupby("group_id", sort=True):
        pos, neg = d[d.is_positive_a], d[~d.is_positive_a]
        dps = float(pos.d_sum.mean()) if len(pos) else np.nan
        dpm = float(pos.d_mean.mean()) if len(pos) else np.nan
        rows.append({"comparison": comparison, "step_from": a, "step_to": b, "group_id": int(gid),
                     "prompt_uid": str(d.prompt_uid_a.iloc[0]), "n_pos": len(pos), "n_neg": len(neg),
                     "delta_pos_sum": dps, "delta_pos_mean": dpm,
                     "delta_neg_sum": float(neg.d_sum.mean()) if len(neg) else np.nan,
                     "delta_neg_mean": float(neg.d_mean.mean()) if len(neg) else np.nan,
                     "lld_sum": bool(dps <= eps) if len(pos) else pd.NA,
                     "lld_mean": bool(dpm <= eps) if len(pos) else pd.NA})
    return rows


def lld_between(
    before: ScoresResult, after: ScoresResult, *, eps: float = 0.0, step_from: int | None = None,
    step_to: int | None = None, comparison: str = "pair",
) -> LLDResult:
    """Δ(x) per prompt between two scored checkpoints (any two: along a run or across runs).

    ``before`` / ``after`` each hold one step (else pick it with ``step_from`` / ``step_to``).

    >>> def sc(step, lp):
    ...     return ScoresResult(responses=pd.DataFrame([dict(step=step, group_id=0, prompt_uid="p",
    ...         response_index=i, is_positive=i == 0, reward=float(i == 0), n_tokens=2, logp_sum=v,
    ...         logp_mean=v / 2, entropy_mean=1.0) for i, v in enumerate(lp)]))
    >>> r = lld_between(sc(0, [-2.0, -3.0]), sc(5, [-2.5, -4.0]))
    >>> r.to_frame()[["delta_pos_sum", "delta_neg_sum", "lld_sum"]].values.tolist()
    [[-0.5, -1.0, True]]
    """
    a_df, b_df = before.responses, after.responses
    a = step_from if step_from is not None else _only_step(a_df, "before")
    b = step_to if step_to is not None else _only_step(b_df, "after")
    rows = _delta_rows(a_df[a_df.step == a], b_df[b_df.step == b], comparison, a, b, eps)
    return LLDResult(deltas=pd.DataFrame(rows), meta={**before.meta, "eps": eps})


def _only_step(df: pd.DataFrame, name: str) -> int:
    steps = sorted(df.step.unique().tolist())
    if len(steps) != 1:
        raise ValueError(f"{name} holds steps {steps}; pass the step to compare")
    return int(steps[0])


def lld_along_run(scores: ScoresResult, *, eps: float = 0.0, reference_step: int | None = None) -> LLDResult:
    """Δ(x) along a run's checkpoints: every step against the first (``vs_initial``, or against
    ``reference_step``) and every step against the previous one (``step_to_step``).

    A run with fewer than two scored steps gives an empty result whose ``meta["skipped"]`` says why.
    """
    df = scores.responses
    steps = sorted(int(s) for s in df.step.unique())
    if len(steps) < 2:
        return LLDResult.empty({**scores.meta, "eps": eps,
                                "skipped": [{"reason": f"LLD needs at least two checkpoints, got steps {steps}"}]})
    ref = steps[0] if reference_step is None else reference_step
    if ref not in steps:
        raise ValueError(f"reference_step {ref} was not scored (steps {steps})")
    by_step = {s: df[df.step == s] for s in steps}
    rows: list[dict] = []
    for s in steps:
        if s != ref:
            rows += _delta_rows(by_step[ref], by_step[s], "vs_initial", ref, s, eps)
    for a, b in zip(steps[:-1], steps[1:]):
        rows += _delta_rows(by_step[a], by_step[b], "step_to_step", a, b, eps)
    return LLDResult(deltas=pd.DataFrame(rows), meta={**scores.meta, "eps": eps, "reference_step": ref})


def lld_between_models(
    model_a: nn.Module, model_b: nn.Module, probe_set: ProbeSet, *, eps: float = 0.0, step_a: int = 0,
    step_b: int = 1,
) -> LLDResult:
    """Δ(x) between two loaded models on a probe set (the steps only label the rows).

    Check the checkpoints' tokenizers first (:func:`resrl_analysis.checkpoints.check_compatible`).
    """
    with torch.no_grad():
        a = score_responses(model_a, probe_set, step=step_a)
        b = score_responses(model_b, probe_set, step=step_b)
    return lld_between(a, b, eps=eps)


# ----------------------------------------------------------------------------- registration


@dataclass(frozen=True)
class LLDOptions:
    """Options of the ``lld`` probe."""

    eps: float = option(0.0, "LLD threshold: a prompt is in LLD when Δ ≤ eps (default 0)")


@register_probe
class LLDProbe(Probe):
    """Δ(x) along the pass's checkpoints, from the ``entropy`` probe's scores."""

    name = "lld"
    summary = "lazy likelihood displacement Δ(x) per prompt, vs the first step and step to step"
    result = LLDResult
    scope = "pairs"
    uses = ("entropy",)
    Options = LLDOptions
    live = True

    def finish(self, ctx: FinishContext, parts: Sequence[LLDResult]) -> LLDResult:
        return lld_along_run(ctx.results["scores"], eps=self.options.eps)  # type: ignore[arg-type]

    def live_metrics(self, results: Mapping[str, ProbeResult], step: int) -> dict[str, float]:
        d = results["lld"].deltas  # type: ignore[attr-defined]
        if not len(d):
            return {}
        d = d[(d.comparison == "vs_initial") & (d.step_to == step) & d.delta_pos_sum.notna()]
        if not len(d):
            return {}
        return {"probe/lld_delta_mean": float(d.delta_pos_sum.mean()),
                "probe/lld_frac": float(d.lld_sum.astype(float).mean())}


@register_probe
class EntropyProbe(Probe):
    """Teacher-forced log π(y|x), its per-token mean and the mean token entropy of every probe response."""

    name = "entropy"
    summary = "teacher-forced log-likelihood and token entropy of every probe response"
    result = ScoresResult
    table = "scores"
    scope = "groups"
    needs = frozenset({"logp"})
    live = True

    def plan(self, p: PlanInputs) -> dict[str, int]:
        return dict(p.forward)  # the shared forward itself

    def on_groups(self, ctx: GroupsContext) -> ScoresResult:
        return scores_from_forwards(ctx.forwards, step=ctx.step)

    def live_metrics(self, results: Mapping[str, ProbeResult], step: int) -> dict[str, float]:
        r = results["scores"].responses  # type: ignore[attr-defined]
        now = r[r.step == step]
        n = now.n_tokens.sum()
        pos = now[now.is_positive]
        out = {"probe/entropy": float((now.entropy_mean * now.n_tokens).sum() / n) if n else float("nan"),
               "probe/logp_pos_mean": float(pos.logp_sum.mean()) if len(pos) else float("nan")}
        return {k: v for k, v in out.items() if np.isfinite(v)}
