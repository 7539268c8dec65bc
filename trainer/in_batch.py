"""Live diagnostics after an update: the rollout batch re-scored by the updated policy (in-batch LLD).

:func:`rescore` is the after-update forward: one no-grad pass of the policy as it is now over chosen rows of the
rollout batch, giving per-token quantities aligned with the rollout's own (``old_logp``, ``entropy``).
:func:`in_batch_lld` uses it on the positive responses of mixed groups and hands the mathematics to the core
(:func:`resrl_analysis.displacement.group_displacements`, docs/MATH.md § Lazy likelihood displacement). Other
diagnostics of the same kind (Δ log π of the negatives, the realised entropy change) choose other rows and ask
``rescore`` for the entropy too.

Re-scored by the policy that sampled them, the positives have not moved: every group's Δ is 0 (up to float32
round-off: a forward over other rows may sum in another order).

>>> import torch
>>> from resrl_analysis.forward import pack_rows, response_forward
>>> from trainer.distributed import DistContext
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

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from resrl_analysis.displacement import group_displacements, in_batch_lld_metrics
from resrl_analysis.forward import pack_rows, response_forward
from trainer.config import TrainConfig
from trainer.distributed import DistContext, all_gather_objects, all_reduce_max
from trainer.rollout import ScoredBatch

__all__ = ["Rescored", "in_batch_lld", "rescore"]


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


def in_batch_lld(model: torch.nn.Module, data: ScoredBatch, cfg: TrainConfig, ctx: DistContext) -> dict[str, Any]:
    """``lld/*`` of a rollout batch (docs/MATH.md § Lazy likelihood displacement): its mixed groups' positive
    responses re-scored after the batch's last update, against the rollout's log-probs. A collective; every rank
    gets the same metrics (a group never spans ranks, so each rank scores its own groups)."""
    positives = torch.nonzero(data.mixed_rows() & (data.rewards > 0)).flatten()  # (R,)
    after = rescore(model, data, positives, cfg, ctx)
    mine = group_displacements(data.old_logp, after.logp, data.response_ids, data.response_mask, data.rewards,
                               data.group_ids)
    every = all_gather_objects(mine, ctx)
    return in_batch_lld_metrics([g for part in every for g in part])
