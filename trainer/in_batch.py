"""Live diagnostics of an update: the rollout batch re-scored by the updated policy, once, for all of them.

After a rollout batch's last optimizer step, :func:`update_metrics` runs the **after-update forward** once
(:func:`after_update`: one no-grad pass of the policy as it is now over the rows the enabled diagnostics need,
with the token entropy when one of them needs it) and hands the batch before and after (:class:`AfterUpdate`)
to every enabled :class:`UpdateDiagnostic` of :data:`UPDATE_DIAGNOSTICS`. A diagnostic is one registration
(:func:`register_update_diagnostic`): its switch in the config, the rows it reads (the positives of mixed groups,
or every row), whether it needs entropies (then the rollout's no-grad forward computes them too:
:func:`needs_rollout_entropy`) and its metrics function; the mathematics stays in the core. In-batch LLD
(``lld/*``, :func:`in_batch_lld`; :func:`resrl_analysis.displacement.group_displacements`;
docs/MATH.md § Lazy likelihood displacement) is the first.

Re-scored by the policy that sampled them, the positives have not moved: every group's Δ is 0 (up to float32
round-off: a forward over other rows may sum in another order).

>>> import torch
>>> from resrl_analysis.forward import ForwardOut, PackedRows, pack_rows, response_forward
>>> from resrl_analysis.distributed import DistContext
>>> from trainer.models import build_tiny_model
>>> model, ctx, cfg = build_tiny_model(seed=0).eval(), DistContext.single(torch.device("cpu")), TrainConfig()
>>> prompt, response = torch.tensor([[12, 13], [12, 13]]), torch.tensor([[20, 21], [20, 22]])
>>> pm, rm = torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool)
>>> with torch.no_grad():
...     old = response_forward(model, pack_rows(prompt, pm, response, rm), temperature=cfg.temperature).logp
>>> data = ScoredBatch(prompt_ids=prompt, prompt_mask=pm, response_ids=response, response_mask=rm,
...                    finished=torch.ones(2, dtype=torch.bool), group_ids=torch.tensor([0, 0]),
...                    rewards=torch.tensor([1.0, 0.0]), old_logp=old, advantages=torch.zeros(2),
...                    token_advantages=torch.zeros(2, 2))
>>> torch.allclose(rescore(model, data, torch.tensor([0, 1]), cfg, ctx).logp, old, atol=1e-5)
True
>>> m = in_batch_lld(model, data, cfg, ctx)
>>> m["lld/mixed_groups"], abs(m["lld/batch_delta_mean"]) < 1e-5, abs(m["lld/shared_token_delta_mean"]) < 1e-5
(1, True, True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from resrl_analysis.displacement import (
    group_displacements,
    group_updates,
    in_batch_lld_metrics,
    k3_kl,
    update_selectivity_metrics,
)
from resrl_analysis.distributed import DistContext, all_gather_objects, all_reduce_max
from resrl_analysis.forward import ForwardOut, PackedRows, pack_rows, response_forward
from trainer.config import TrainConfig
from trainer.rollout import ScoredBatch

__all__ = ["AfterUpdate", "Rescored", "RolloutChunk", "UPDATE_DIAGNOSTICS", "UpdateDiagnostic", "after_update",
           "in_batch_lld", "needs_rollout_entropy", "register_update_diagnostic", "rescore", "rollout_hooks",
           "rollout_needs", "update_metrics"]


@dataclass
class Rescored:
    """Per-token quantities of the updated policy on some rows of a rollout batch.

    Shaped like the batch's (B, Tr) tensors so they line up with ``old_logp`` and ``entropy``; rows not
    re-scored hold 0 (as padding does).
    """

    rows: Tensor  # (R,) the re-scored row indices
    logp: Tensor  # (B, Tr) float32 log π_new(y_t | x, y_<t)
    entropy: Tensor | None = None  # (B, Tr) float32 token entropy of π_new, when asked for


def rescore(model: torch.nn.Module, data: ScoredBatch, rows: Tensor, cfg: TrainConfig, ctx: DistContext, *,
            entropy: bool = False) -> Rescored:
    """One no-grad forward of ``model`` over the rows ``rows`` (indices into ``data``) at the rollout's temperature.

    In eval mode, like the rollout's forward that gave ``old_logp``, in chunks of ``logprob_micro_batch_size``
    (or ``micro_batch_size``) rows. A collective: every rank runs as many forwards as the busiest one (FSDP2),
    the extra ones on a dummy row whose result is dropped. ``entropy`` adds the token entropy (computed in
    vocabulary chunks, as the rollout's).
    """
    per = cfg.logprob_micro_batch_size or cfg.micro_batch_size
    chunks = [rows[s : s + per] for s in range(0, rows.numel(), per)]
    n = int(all_reduce_max(torch.tensor([len(chunks)]), ctx)[0])
    new_logp = torch.zeros_like(data.old_logp)  # (B, Tr)
    new_ent = torch.zeros_like(data.old_logp) if entropy else None  # (B, Tr)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(n):
                sel = chunks[i] if i < len(chunks) else torch.arange(1)
                packed = pack_rows(data.prompt_ids[sel], data.prompt_mask[sel], data.response_ids[sel],
                                   data.response_mask[sel])
                fo = response_forward(model, packed, temperature=cfg.temperature, memory_mb=cfg.logprob_memory_mb,
                                      entropy=entropy)
                if i < len(chunks):
                    new_logp[sel, : packed.response_len] = fo.logp.float()
                    if new_ent is not None:
                        new_ent[sel, : packed.response_len] = fo.entropy.float()  # type: ignore[union-attr]
    finally:
        model.train(was_training)
    return Rescored(rows=rows, logp=new_logp, entropy=new_ent)


@dataclass
class AfterUpdate:
    """A rollout batch before and after its update(s), token by token: what every update diagnostic reads.

    ``data`` is the batch as the rollout scored it (before: ``data.old_logp``, and ``data.entropy`` when a
    diagnostic needs entropies); ``logp`` and ``entropy`` (B, Tr) are the updated policy's on the rows in
    ``scored`` (B,) bool, 0 elsewhere and on padding.
    """

    data: ScoredBatch
    logp: Tensor  # (B, Tr) float32
    entropy: Tensor | None  # (B, Tr) float32
    scored: Tensor  # (B,) bool

    @property
    def delta_logp(self) -> Tensor:
        """(B, Tr) float64 Δ log π(y_t) on the scored rows' tokens (0 elsewhere)."""
        keep = self.data.response_mask & self.scored[:, None]
        return torch.where(keep, self.logp.double() - self.data.old_logp.double(), torch.zeros((), dtype=torch.float64,
                                                                                             device=keep.device))


RowsNeeded = Literal["mixed_positives", "all"]


@dataclass
class RolloutChunk:
    """What a diagnostic's ``rollout`` hook reads in the rollout's no-grad forward, one chunk of whole groups at a
    time: the forward's output ``fo`` (its logits and captured head inputs when the diagnostic asks for them), the
    chunk's packed ``rows``, its ``token_advantages`` (b, t) as the update will use them, ``rewards`` (b,),
    ``group_ids`` (b,) and the run's config."""

    fo: ForwardOut
    rows: PackedRows
    token_advantages: Tensor
    rewards: Tensor
    group_ids: Tensor
    cfg: TrainConfig


@dataclass(frozen=True)
class UpdateDiagnostic:
    """A live diagnostic of each rollout batch's update.

    ``enabled(cfg)``: its switch; ``rows``: what the after-update forward must re-score for it (the positive
    responses of mixed groups, or every row); ``entropy``: it reads token entropies before and after;
    ``metrics(after, cfg, ctx)``: its metrics (a collective: every rank passes its rows and gets the same dict).
    ``rollout`` (optional): per-token quantities of the policy *before* the update, computed in the rollout's
    no-grad forward (:class:`RolloutChunk` → name → (b, t) tensors, kept in ``ScoredBatch.live``); ``rollout_needs``:
    what that forward must then keep (``"head_input"``, ``"logits"``; ``rollout_enabled(cfg)``: whether the hook
    runs, default whenever the diagnostic does).
    """

    name: str
    enabled: Callable[[TrainConfig], bool]
    rows: RowsNeeded
    entropy: bool
    metrics: Callable[[AfterUpdate, TrainConfig, DistContext], dict[str, Any]]
    rollout: Callable[[RolloutChunk], dict[str, Tensor]] | None = None
    rollout_needs: frozenset[str] = frozenset()
    rollout_enabled: Callable[[TrainConfig], bool] | None = None


#: Every registered update diagnostic, in the order their metrics are computed.
UPDATE_DIAGNOSTICS: dict[str, UpdateDiagnostic] = {}


def register_update_diagnostic(d: UpdateDiagnostic) -> UpdateDiagnostic:
    """Add ``d`` to :data:`UPDATE_DIAGNOSTICS` (its metric keys belong in resrl_analysis.rundir's lists and
    docs/METRICS.md)."""
    if d.rows not in ("mixed_positives", "all"):
        raise ValueError(f"update diagnostic {d.name!r}: rows must be 'mixed_positives' or 'all', got {d.rows!r}")
    UPDATE_DIAGNOSTICS[d.name] = d
    return d


def _enabled(cfg: TrainConfig) -> list[UpdateDiagnostic]:
    return [d for d in UPDATE_DIAGNOSTICS.values() if d.enabled(cfg)]


def needs_rollout_entropy(cfg: TrainConfig) -> bool:
    """Whether an enabled diagnostic reads token entropies (the rollout's no-grad forward then computes them)."""
    return any(d.entropy for d in _enabled(cfg))


def rollout_hooks(cfg: TrainConfig) -> list[UpdateDiagnostic]:
    """The enabled diagnostics whose ``rollout`` hook runs in the rollout's no-grad forward."""
    return [d for d in _enabled(cfg) if d.rollout is not None and (d.rollout_enabled is None or d.rollout_enabled(cfg))]


def rollout_needs(cfg: TrainConfig) -> frozenset[str]:
    """What the rollout's no-grad forward must keep for the enabled ``rollout`` hooks (``head_input``, ``logits``)."""
    return frozenset().union(*(d.rollout_needs for d in rollout_hooks(cfg)))


def after_update(model: torch.nn.Module, data: ScoredBatch, cfg: TrainConfig, ctx: DistContext, *,
                 rows: RowsNeeded = "mixed_positives", entropy: bool = False) -> AfterUpdate:
    """The after-update forward over ``rows`` of the batch (a collective).

    The positive responses of mixed groups are re-scored first and on their own, whatever else is asked, so
    ``lld/*`` is the same number whichever other diagnostics run; ``rows="all"`` then re-scores the other rows.
    """
    mixed_pos = data.mixed_rows() & (data.rewards > 0)  # (B,)
    first = rescore(model, data, torch.nonzero(mixed_pos).flatten(), cfg, ctx, entropy=entropy)
    logp, ent, scored = first.logp, first.entropy, mixed_pos.clone()
    if rows == "all":
        rest = rescore(model, data, torch.nonzero(~mixed_pos).flatten(), cfg, ctx, entropy=entropy)
        logp = logp + rest.logp  # each row is re-scored once: 0 in the other
        ent = ent + rest.entropy if ent is not None and rest.entropy is not None else ent
        scored = torch.ones_like(mixed_pos)
    return AfterUpdate(data=data, logp=logp, entropy=ent, scored=scored)


def update_metrics(model: torch.nn.Module, data: ScoredBatch, cfg: TrainConfig, ctx: DistContext) -> dict[str, Any]:
    """Every enabled update diagnostic's metrics, from one after-update forward ({} when none is enabled)."""
    todo = _enabled(cfg)
    if not todo:
        return {}
    rows: RowsNeeded = "all" if any(d.rows == "all" for d in todo) else "mixed_positives"
    after = after_update(model, data, cfg, ctx, rows=rows, entropy=any(d.entropy for d in todo))
    out: dict[str, Any] = {}
    for d in todo:
        out.update(d.metrics(after, cfg, ctx))
    return out


def _lld_metrics(after: AfterUpdate, cfg: TrainConfig, ctx: DistContext) -> dict[str, Any]:
    data = after.data
    mine = group_displacements(data.old_logp, after.logp, data.response_ids, data.response_mask, data.rewards,
                               data.group_ids)
    every = all_gather_objects(mine, ctx)
    return in_batch_lld_metrics([g for part in every for g in part])


def in_batch_lld(model: torch.nn.Module, data: ScoredBatch, cfg: TrainConfig, ctx: DistContext) -> dict[str, Any]:
    """``lld/*`` of a rollout batch (docs/MATH.md § Lazy likelihood displacement): its mixed groups' positive
    responses re-scored after the batch's last update, against the rollout's log-probs. A collective; every rank
    gets the same metrics (a group never spans ranks, so each rank scores its own groups)."""
    return _lld_metrics(after_update(model, data, cfg, ctx), cfg, ctx)


register_update_diagnostic(UpdateDiagnostic("lld", lambda cfg: cfg.lld_in_batch, "mixed_positives", False,
                                            _lld_metrics))


def _selectivity_metrics(after: AfterUpdate, cfg: TrainConfig, ctx: DistContext) -> dict[str, Any]:
    """``update/*`` (and ``resrl/weight_*`` for a ResRL-family run), every row re-scored; the KL over every
    response token of the batch, the rest over mixed groups.

    docs/MATH.md § Collateral per unit of push-down
    """
    data = after.data
    weights = data.extras.get("resrl_weights")
    mine = group_updates(data.old_logp, after.logp, data.response_ids, data.response_mask, data.rewards,
                         data.group_ids, weights)
    kl = k3_kl(data.old_logp, after.logp, data.response_mask)  # (B, Tr)
    every = all_gather_objects((mine, float(kl.sum()), int(data.response_mask.sum())), ctx)
    return update_selectivity_metrics([g for part in every for g in part[0]], sum(p[1] for p in every),
                                      sum(p[2] for p in every), weighted=weights is not None)


register_update_diagnostic(UpdateDiagnostic("selectivity", lambda cfg: cfg.collateral_in_batch, "all", False,
                                            _selectivity_metrics))

# The other built-in diagnostics (entropy/*, flips/*) register themselves in trainer/update_dynamics.py, which
# imports this module; trainer.loop imports it, so the registry is complete wherever the loop runs.
