"""Logged log-probs as a fidelity check: the training–inference mismatch (docs/FOREIGN_RUNS.md § Fidelity).

Where a source logged the sampler's log-prob of each response token (our rollout dumps' ``token_logprobs``,
prime-rl's ``inference_logprobs``, verl's ``rollout_log_probs`` where a run dumped them), the ``fidelity`` probe
sets them beside this pass's teacher-forced log-probs of the same tokens at each checkpoint, at the sampler's
temperature. With d_t = log p_sampler(y_t) − log p_ckpt(y_t) and the tokens sampled from the sampler,

    KL(sampler ‖ checkpoint) ≈ mean_t d_t                    (k1, unbiased, can be negative)
                             ≈ mean_t [exp(−d_t) − 1 + d_t]  (k3, unbiased and ≥ 0)

per token, with max |d_t| and the fraction of tokens with |d_t| above a threshold. At the checkpoint that
sampled the responses the two should agree to numerical precision; a large mismatch there means the probe
scores other tokens, another prompt or another distribution than the run trained on, and the probe says which
cause the numbers point to (tokenisation, template, dtype, sampler settings).

    >>> from resrl_analysis.probe_sets import ProbeGroup, ProbeSet
    >>> from resrl_analysis.probes.config import ProbeConfig
    >>> from resrl_analysis.probes.engine import ProbePass
    >>> from resrl_analysis.probes.synthetic import tiny_model
    >>> m = tiny_model(seed=0)
    >>> g = ProbeGroup(0, (1, 5), ((6, 2), (7, 3)), (1.0, 0.0))
    >>> pp = ProbePass(ProbeConfig(probes=["entropy"]), ProbeSet((g,)))
    >>> pp.run_model(m, 0)
    >>> lp = pp.results()["scores"].tokens.logp.tolist()  # the checkpoint's own log-probs, logged as the sampler's
    >>> ps = ProbeSet((ProbeGroup(0, (1, 5), g.response_ids, g.rewards, logged_logprobs=(tuple(lp[:2]),
    ...                                                                                   tuple(lp[2:]))),),
    ...               sampler_step=0)
    >>> fp = ProbePass(ProbeConfig(probes=["fidelity"]), ps)
    >>> fp.run_model(m, 0)
    >>> r = fp.results()["fidelity"]
    >>> r.meta["verdict"]["ok"], float(r.responses.max_abs_delta.max()) < 1e-5
    (True, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from ..probe_sets import ProbeSet
from ..results import FidelityResult
from .capture import forward_group, pad_id_of
from .registry import FinishContext, GroupsContext, Probe, option, register_probe

# FidelityResult lives in results.py with every built-in result (load_results knows it without this module).
__all__ = ["FidelityResult", "FidelityOptions", "FidelityProbe", "mismatch_rows", "likely_cause"]

#: |Δ log p| below this (nats) is rounding, not a difference (``frac_sampler_higher`` ignores such tokens).
_DIFFER = 1e-3


@dataclass(frozen=True)
class FidelityOptions:
    """Options of the ``fidelity`` probe."""

    fidelity_threshold: float = option(0.5, "fidelity: a token is off when |log p_sampler − log p_checkpoint| exceeds "
                                       "this (nats; default 0.5)", metavar="NATS")
    fidelity_max_kl: float = option(0.01, "fidelity: warn when the per-token KL estimate at the sampler's checkpoint "
                                    "exceeds this, or more than 1% of tokens are off (default 0.01)", metavar="NATS")
    fidelity_temperature: float = option(0.0, "fidelity: the temperature the logged log-probs are at (default 0: the "
                                         "source's, e.g. the run's sampling temperature; 1 when it does not say)",
                                         metavar="T")

    def __post_init__(self) -> None:
        if not self.fidelity_threshold > 0 or not self.fidelity_max_kl > 0 or self.fidelity_temperature < 0:
            raise ValueError("--fidelity-threshold and --fidelity-max-kl must be > 0, --fidelity-temperature >= 0")


def mismatch_rows(logged: Sequence[float], ours: torch.Tensor, threshold: float) -> dict[str, float]:
    """The numbers of one response: ``logged`` the sampler's log-probs, ``ours`` (T,) the checkpoint's.

    >>> r = mismatch_rows([-1.0, -2.0], torch.tensor([-1.0, -1.0]), 0.5)
    >>> r["kl_k1"], r["max_abs_delta"], r["frac_off"]
    (-0.5, 1.0, 0.5)
    """
    d = torch.tensor(list(logged), dtype=torch.float64) - ours.double()  # (T,) log p_sampler − log p_ckpt
    k3 = torch.expm1(-d) + d  # (T,) r − 1 − log r with r = p_ckpt / p_sampler
    a = d.abs()
    # The sign of a token that agrees to rounding (p ≈ 1 on both sides) is noise: only tokens that differ count.
    differ = a > _DIFFER
    return {"n_tokens": int(d.numel()), "kl_k1": float(d.mean()), "kl_k3": float(k3.mean()),
            "max_abs_delta": float(a.max()), "mean_abs_delta": float(a.mean()),
            "frac_off": float((a > threshold).double().mean()), "first_abs_delta": float(a[0]),
            "frac_sampler_higher": float((d[differ] > 0).double().mean()) if bool(differ.any()) else 0.5}


def likely_cause(d: pd.DataFrame) -> str:
    """What the mismatch of one step's rows (:class:`FidelityResult` ``responses``) points to.

    >>> likely_cause(pd.DataFrame({"origin": ["exact"], "n_tokens": [10], "mean_abs_delta": [0.05],
    ...     "max_abs_delta": [0.3], "first_abs_delta": [0.05], "frac_sampler_higher": [0.5]}))
    'numerics (dtype: a bf16/fp16 sampler against this pass, or another attention kernel)'
    """
    text, exact = d[d.origin != "exact"], d[d.origin == "exact"]
    if len(text) and (not len(exact) or text.mean_abs_delta.mean() > 2 * exact.mean_abs_delta.mean()):
        return (f"tokenisation: {len(text)} responses were re-encoded from text and may not be the sampled ids "
                "(record the ids: resrl_analysis.integrations.trl.record_token_ids, or a source with token ids)")
    w = d.n_tokens.astype(float)
    rest = (d.mean_abs_delta * w - d.first_abs_delta).sum() / max(float((w - 1).sum()), 1.0)
    if d.first_abs_delta.mean() > 5 * max(rest, 1e-6) and d.first_abs_delta.mean() > 0.5:
        return "the prompt: the first response token is off most (chat template, BOS, or a system prompt)"
    higher = float((d.frac_sampler_higher * w).sum() / w.sum())
    if higher > 0.8:
        return ("sampler settings: the sampler found its tokens likelier than the checkpoint does (a lower "
                "temperature than assumed, top-k/top-p, or the wrong --fidelity-temperature)")
    if higher < 0.2:
        return "sampler settings: the sampler was flatter than the checkpoint (a higher temperature than assumed)"
    if d.max_abs_delta.max() < 1.0:
        return "numerics (dtype: a bf16/fp16 sampler against this pass, or another attention kernel)"
    return "the checkpoint is not the policy that sampled (step), or several of: tokenisation, template, dtype"


@register_probe
class FidelityProbe(Probe):
    """Logged sampler log-probs against this pass's teacher-forced log-probs of the same tokens."""

    name = "fidelity"
    summary = ("training–inference mismatch where the source logged the sampler's token log-probs: per-token KL "
               "estimate, largest and mean absolute Δ log p, fraction of tokens off, with the likely cause of a "
               "large one")
    result = FidelityResult
    scope = "groups"
    needs = frozenset({"logp"})
    Options = FidelityOptions

    def __init__(self, options: FidelityOptions | None = None) -> None:
        super().__init__(options)
        self.probe_set: ProbeSet | None = None

    def temperature(self, ps: ProbeSet) -> float:
        """The temperature the logged log-probs are at: the option's, else the source's, else 1."""
        return self.options.fidelity_temperature or ps.logprob_temperature or 1.0

    def on_groups(self, ctx: GroupsContext) -> FidelityResult | None:
        self.probe_set = ctx.all_groups
        temp = self.temperature(ctx.all_groups)
        rows = []
        for f in ctx.forwards:
            g = f.group
            if not g.logged_logprobs:
                continue
            logp = f.logp
            if temp != 1.0:  # the sampler's view: the checkpoint's logits at its temperature
                logp = forward_group(ctx.model, g, keep_hidden=False, keep_logits=False, pad_id=pad_id_of(ctx.model),
                                     temperature=temp).logp  # (G, T)
            for i, (lp, origin) in enumerate(zip(g.logged_logprobs, g.origins)):
                if lp is None:
                    continue
                rows.append({"step": ctx.step, "group_id": g.group_id, "response_index": i, "origin": origin,
                             **mismatch_rows(lp, logp[i, : len(lp)], self.options.fidelity_threshold)})
        return FidelityResult(responses=pd.DataFrame(rows)) if rows else None

    def finish(self, ctx: FinishContext, parts: Sequence[FidelityResult]) -> FidelityResult:
        ps = self.probe_set
        if not parts:
            what = (ps.kind if ps is not None else "") or "this source"
            return FidelityResult.empty({"skipped": [{"reason": f"the probe set ({what}) logs no sampler log-probs: "
                                                                "the training–inference mismatch was not measured"}]})
        res = FidelityResult.concat(parts)
        steps = res.by_step().set_index("step")
        sampler = ps.sampler_step if ps is not None else None
        if sampler is not None and sampler in steps.index:
            judged, how = sampler, "the checkpoint that sampled them"
        else:
            judged = int(steps.kl_k3.idxmin())
            how = (f"the closest checkpoint; the sampler's, step {sampler}, was not probed" if sampler is not None
                   else "the closest checkpoint; the source does not say which one sampled")
        row = steps.loc[judged]
        thr, temp = self.options.fidelity_threshold, self.temperature(ps) if ps is not None else 1.0
        ok = bool(row.kl_k3 <= self.options.fidelity_max_kl and row.frac_off <= 0.01)
        verdict = {"step": int(judged), "judged_at": how, "kl_k3": float(row.kl_k3), "kl_k1": float(row.kl_k1),
                   "max_abs_delta": float(row.max_abs_delta), "frac_off": float(row.frac_off),
                   "n_tokens": int(row.n_tokens), "temperature": temp, "threshold": thr, "ok": ok}
        warnings = []
        if not ok:
            cause = likely_cause(res.responses[res.responses.step == judged])
            warnings.append(f"training–inference mismatch at step {judged} ({how}): KL ≈ {row.kl_k3:.3g} nats/token, "
                            f"max |Δ log p| {row.max_abs_delta:.3g}, {row.frac_off:.1%} of tokens off by > {thr:g} "
                            f"nats (at temperature {temp:g}); likely cause: {cause}")
        return res.with_meta(verdict=verdict, warnings=warnings, temperature=temp, threshold=thr,
                             sampler_step=sampler)
