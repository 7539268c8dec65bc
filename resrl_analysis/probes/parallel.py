"""A probe pass over several processes (``torchrun``): the split of the probe groups, the order of the gathered
rows, and the whole-model gradients of a model sharded with FSDP2.

``resrl probe`` under ``torchrun --nproc_per_node=N`` (or ``resrl probe --nproc N``) runs one
:class:`~resrl_analysis.probes.engine.ProbePass` per rank. The probe groups are dealt round-robin
(:meth:`Parallel.share`: group i to rank i mod N, so the costly mixed groups, which come first, spread evenly); a group
never spans ranks. Every rank runs the same probes on its share; rank 0 gathers the parts
(:func:`~resrl_analysis.distributed.gather_objects`) and puts their rows back in the probe set's group order
(:func:`in_group_order`) before the probes pool them (``Probe.merge_ranks``, then ``on_checkpoint``), so the tables
equal a one-process run's row for row.

The model is held in one of two ways (``--parallel``):

- ``replica``: every rank loads the whole model and probes its groups alone (no collective but the gathers);
- ``shard``: FSDP2 shards the model across the ranks (:func:`~resrl_analysis.distributed.wrap_model`), for a model
  whose replica does not fit one device. Forwards are then collectives: every rank runs as many group forwards as
  the busiest one (the others a dummy one-token forward). The root (embeddings, final norm, LM head) stays gathered
  on every rank, so each rank computes its own groups' head-gradient products locally from its forward's logits
  and head inputs, exactly as one process would. What needs the gradient of the whole model for one group (the
  whole-model cosine of ``interference``, the real whole-model steps of ``first_order``) cannot run inside one
  rank's group loop: the probes hand it to :class:`WholeModelJobs`, and after the group batches every rank runs
  every rank's jobs together (:func:`sharded_gradient_cosine`, :func:`sharded_step_deltas`), each group's
  responses split across the ranks, the gradients reduced by FSDP2; the answers fill the probes' rows.

    >>> from resrl_analysis.probes.synthetic import random_probe_set
    >>> ps = random_probe_set([[1, 0], [1, 1], [0, 0]])
    >>> [g.group_id for g in Parallel.single().share(ps).groups]
    [0, 1, 2]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..distributed import DistContext, all_gather_objects, all_reduce_sum, fsdp_modules
from ..forward import response_forward
from ..probe_sets import ProbeGroup, ProbeSet
from ..results import ProbeResult
from .capture import checkpointing, group_batch, model_device, row_slice

__all__ = [
    "PARALLEL_MODES",
    "Parallel",
    "WholeModelJob",
    "WholeModelJobs",
    "dummy_forward",
    "group_order",
    "in_group_order",
    "sharded_gradient_cosine",
    "sharded_step_deltas",
]

#: How several processes hold the model (``--parallel``).
PARALLEL_MODES: dict[str, str] = {
    "auto": "replica when the memory plan says a whole copy fits each device, else shard",
    "replica": "every rank holds the whole model and probes its share of the groups",
    "shard": "FSDP2 shards the model across the ranks (a model that does not fit one device)",
}

Mode = Literal["replica", "shard"]


@dataclass(frozen=True)
class Parallel:
    """Where this pass runs: ``ctx`` (rank, world size, device) and how the ranks hold the model (``mode``)."""

    ctx: DistContext
    mode: Mode = "replica"

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> Parallel:
        """One process (no process group): the pass as it always ran."""
        return cls(DistContext.single(torch.device(device)))

    @property
    def world(self) -> int:
        return self.ctx.world_size

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def sharded(self) -> bool:
        """Whether FSDP2 shards the model (forwards and backwards are collectives)."""
        return self.mode == "shard" and self.world > 1

    def share(self, probe_set: ProbeSet) -> ProbeSet:
        """This rank's groups: every ``world``-th group of ``probe_set``, starting at its rank (all of them in one
        process)."""
        if self.world == 1:
            return probe_set
        return replace(probe_set, groups=probe_set.groups[self.rank :: self.world])

    def max_share(self, probe_set: ProbeSet) -> int:
        """Groups of the busiest rank (rank 0's share): the number of group forwards every rank runs when sharded."""
        return math.ceil(probe_set.n_groups / self.world)


def group_order(probe_set: ProbeSet) -> dict[int, int]:
    """Group id → its position in ``probe_set`` (the canonical row order of every table).

    >>> from resrl_analysis.probes.synthetic import random_probe_set
    >>> group_order(random_probe_set([[1, 0], [0, 1]]))
    {0: 0, 1: 1}
    """
    return {g.group_id: i for i, g in enumerate(probe_set.groups)}


def in_group_order(result: ProbeResult, order: Mapping[int, int]) -> ProbeResult:
    """``result`` with the rows of every table that has a ``group_id`` column stably sorted by (``step``, the
    group's position in ``order``), and ``meta["skipped"]`` likewise; other tables are left as they are.

    A one-process pass writes its rows group by group in probe-set order, so this is the identity on its results;
    on the parts gathered from several ranks it restores that order (rows within a group keep theirs).

    >>> import pandas as pd
    >>> from resrl_analysis.results import ScoresResult
    >>> rows = [dict(step=0, group_id=g, prompt_uid="p", response_index=i, is_positive=True, reward=1.0,
    ...              n_tokens=1, logp_sum=-1.0, logp_mean=-1.0, entropy_mean=0.5) for g, i in ((2, 0), (1, 0), (2, 1))]
    >>> r = in_group_order(ScoresResult(responses=pd.DataFrame(rows)), {1: 0, 2: 1})
    >>> r.responses[["group_id", "response_index"]].values.tolist()
    [[1, 0], [2, 0], [2, 1]]
    """
    big = len(order)
    tables = {}
    for name in result.TABLES:
        df = getattr(result, name)
        if len(df) and "group_id" in df.columns:
            pos = df["group_id"].map(lambda g: order.get(int(g), big)).to_numpy()
            step = df["step"].to_numpy() if "step" in df.columns else np.zeros(len(df), dtype=np.int64)
            idx = np.lexsort((pos, step))  # stable: rows of one group keep their order
            df = df.iloc[idx].reset_index(drop=True)
        tables[name] = df
    skipped = sorted(result.skipped, key=lambda s: (s.get("step", 0), order.get(s.get("group_id"), big)))  # type: ignore[arg-type]
    return replace(result, **tables, meta={**result.meta, "skipped": skipped})  # type: ignore[arg-type]


@torch.no_grad()
def dummy_forward(model: nn.Module) -> None:
    """A one-token forward whose output is dropped: under FSDP2 it runs the same collectives as a real forward, so a
    rank with fewer groups keeps step with the others."""
    model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=model_device(model)), use_cache=False)


# ----------------------------------------------------------------------------- whole-model jobs (sharded)


@dataclass
class WholeModelJob:
    """One group's whole-model gradient computation, as every rank needs it to take part (picklable, small).

    ``kind``: ``"gradient_cosine"`` (cosine of the positive and negative parts of the loss's gradient, one
    advantage tensor) or ``"step_deltas"`` (Δ log π of each response after one SGD step of size ``lr``, one column
    per advantage tensor, from ``logp0`` (G,), the log π before the step). ``advantages``: (G, T) float32 each.
    """

    kind: Literal["gradient_cosine", "step_deltas"]
    group: ProbeGroup
    advantages: list[Tensor]
    lr: float = 0.0
    micro_batch: int = 4
    logp0: Tensor | None = None
    pad_id: int = 0


@dataclass
class WholeModelJobs:
    """The whole-model jobs of one rank's group batches, deferred to a collective phase (``--parallel shard``).

    A probe calls :meth:`defer` with the job and a ``fill(part, answer) -> part`` that writes the answer into the
    result its ``on_groups`` returns; :class:`~resrl_analysis.probes.engine.ProbePass` sets :attr:`current` (the
    probe and the index of the part it is building) before each ``on_groups`` and calls :meth:`run` after the
    group batches.
    """

    jobs: list[tuple[WholeModelJob, str, int, Callable[[Any, Any], Any]]] = field(default_factory=list)
    current: tuple[str, int] = ("", 0)

    def defer(self, job: WholeModelJob, fill: Callable[[Any, Any], Any]) -> None:
        """Run ``job`` later, with every rank; ``fill(part, answer)`` then updates the part being built now."""
        job.advantages = [a.detach().float().cpu() for a in job.advantages]
        if job.logp0 is not None:
            job.logp0 = job.logp0.detach().float().cpu()
        self.jobs.append((job, *self.current, fill))

    def run(self, model: nn.Module, par: Parallel, parts: dict[str, list[ProbeResult]]) -> None:
        """Every rank's jobs, in rank order, by all ranks together; this rank's answers fill its ``parts``."""
        every = all_gather_objects([j for j, *_ in self.jobs], par.ctx)
        mine = []
        for rank, jobs in enumerate(every):
            for job in jobs:
                if job.kind == "gradient_cosine":
                    answer: Any = sharded_gradient_cosine(model, job, par)
                else:
                    answer = sharded_step_deltas(model, job, par)
                if rank == par.rank:
                    mine.append(answer)
        for (_, name, idx, fill), answer in zip(self.jobs, mine):
            parts[name][idx] = fill(parts[name][idx], answer)
        self.jobs.clear()


def _my_slots(n_rows: int, micro_batch: int, par: Parallel) -> list[slice | None]:
    """This rank's micro-batches of a group's rows (a contiguous block of ⌈G/N⌉ rows), padded with None (a dummy
    micro-batch) to the count every rank runs."""
    per = math.ceil(n_rows / par.world)
    mb = max(1, min(micro_batch, per))
    lo, hi = min(n_rows, par.rank * per), min(n_rows, (par.rank + 1) * per)
    slots: list[slice | None] = [slice(s, min(s + mb, hi)) for s in range(lo, hi, mb)]
    return slots + [None] * (math.ceil(per / mb) - len(slots))


def _reshard(model: nn.Module) -> None:
    # Every FSDP2 unit back to its shard: model.parameters() are then the sharded ones, and the next forward
    # gathers them afresh (after a step, the stepped values).
    for m in fsdp_modules(model):
        m.reshard()


def _local(t: Tensor) -> Tensor:
    """This rank's part of a (sharded) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _backward_slots(model: nn.Module, job: WholeModelJob, adv: Tensor, select: Tensor | None,
                    par: Parallel, use_checkpointing: bool) -> list[Tensor | None]:
    """This rank's micro-batches of ``−(1/Z) Σ adv · log π`` (tokens of the rows in ``select`` only) backward through
    the sharded model; returns each parameter's gradient shard of the whole group's loss (FSDP2 reduces the ranks'
    parts; its averaging over ranks is undone)."""
    batch = group_batch(job.group, model_device(model), job.pad_id)
    mask = batch.mask
    Z = mask.sum()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    with checkpointing(model, enable=use_checkpointing), torch.enable_grad():
        for sl in _my_slots(mask.shape[0], job.micro_batch, par):
            rows = sl if sl is not None else slice(0, 1)
            lp = response_forward(model, row_slice(batch.rows, rows)).logp  # (mb, T), 0 on padding
            m = mask[rows, : lp.shape[1]]
            if select is not None:
                m = m & select[rows, None]
            if sl is None:
                m = torch.zeros_like(m)  # a dummy micro-batch: the collectives of a backward, no gradient
            loss = -(adv[rows, : lp.shape[1]] * lp * m).sum() / Z
            loss.backward()
            del lp, loss
    # FSDP2 averages the reduced gradients over the ranks; the loss is the sum of the ranks' parts.
    return [p.grad.detach() * par.world if p.grad is not None else None for p in params]


def sharded_gradient_cosine(model: nn.Module, job: WholeModelJob, par: Parallel, *,
                            use_checkpointing: bool = True) -> dict:
    """:func:`~resrl_analysis.probes.interference.full_model_gradient_cosine` on an FSDP2-sharded model, by all
    ranks together: ∇θ L⁺ and ∇θ L⁻ of the group's token-mean loss, each rank backpropagating its block of the
    group's responses; the inner products and norms are sums over the ranks' gradient shards (float64).

    Returns ``full_update_cosine``, ``full_update_inner`` and ``full_head_cosine`` (the LM head matrix's block).
    """
    _reshard(model)
    dev = model_device(model)
    adv = job.advantages[0].to(dev)
    batch = group_batch(job.group, dev, job.pad_id)
    pos = batch.is_positive
    params = [p for p in model.parameters() if p.requires_grad]
    head_w = model.get_output_embeddings().weight  # the sharded head matrix (every unit is resharded)
    g_pos = _backward_slots(model, job, adv, pos, par, use_checkpointing)
    g_neg = _backward_slots(model, job, adv, ~pos, par, use_checkpointing)
    sums = torch.zeros(6, dtype=torch.float64)  # inner, |pos|², |neg|² over all, then over the head block
    for p, a, b in zip(params, g_pos, g_neg):
        a64 = _local(a).double() if a is not None else None
        b64 = _local(b).double() if b is not None else None
        part = torch.tensor([float((a64 * b64).sum()) if a64 is not None and b64 is not None else 0.0,
                             float((a64 * a64).sum()) if a64 is not None else 0.0,
                             float((b64 * b64).sum()) if b64 is not None else 0.0], dtype=torch.float64)
        sums[:3] += part
        if p is head_w:
            sums[3:] += part
    for p in params:
        p.grad = None
    _reshard(model)
    inner, npos, nneg, h_inner, h_pos, h_neg = all_reduce_sum(sums, par.ctx).tolist()

    def cos(i: float, x: float, y: float) -> float:
        d = (x * y) ** 0.5
        return i / d if d > 1e-300 else float("nan")

    return {"full_update_cosine": cos(inner, npos, nneg), "full_update_inner": inner,
            "full_head_cosine": cos(h_inner, h_pos, h_neg)}


def sharded_step_deltas(model: nn.Module, job: WholeModelJob, par: Parallel, *,
                        use_checkpointing: bool = True) -> Tensor:
    """:func:`~resrl_analysis.probes.first_order.full_step_deltas` on an FSDP2-sharded model, by all ranks together:
    for each advantage tensor, the whole group's gradient (each rank backpropagating its block of responses
    through the whole model, FSDP2 reducing the shards), one SGD step of size ``job.lr`` on every rank's parameter
    shards, a forward of each rank's rows, and the parameters restored. Returns Δ log π (G, n) float32, the same on
    every rank; the model is unchanged on return (also on error).
    """
    _reshard(model)
    dev = model_device(model)
    batch = group_batch(job.group, dev, job.pad_id)
    mask = batch.mask
    G = mask.shape[0]
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    lp0 = job.logp0.to(dev) if job.logp0 is not None else torch.zeros(G, device=dev)
    out = torch.zeros(G, len(job.advantages), dtype=torch.float32)
    try:
        for k, adv in enumerate(job.advantages):
            grads = _backward_slots(model, job, adv.to(dev), None, par, use_checkpointing)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.grad = None
                    if g is not None:
                        p.add_(g, alpha=-job.lr)
                del grads
                _reshard(model)  # the next forward gathers the stepped shards
                lp1 = torch.zeros(G, dtype=torch.float32, device=dev)
                for sl in _my_slots(G, job.micro_batch, par):
                    rows = sl if sl is not None else slice(0, 1)
                    lp = response_forward(model, row_slice(batch.rows, rows)).logp  # (mb, T)
                    if sl is not None:
                        lp1[rows] = (lp * mask[rows, : lp.shape[1]]).sum(1).float()
                lp1 = all_reduce_sum(lp1, par.ctx)  # each row was scored on exactly one rank
                out[:, k] = (lp1 - lp0.float()).cpu()
                for p, s in zip(params, saved):
                    p.copy_(s)
                _reshard(model)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        _reshard(model)
    return out


def whole_model_fill(table: str, keys: Mapping[str, Any], columns: Callable[[Any], Mapping[str, Any]]
                     ) -> Callable[[ProbeResult, Any], ProbeResult]:
    """A ``fill`` for :meth:`WholeModelJobs.defer`: the rows of ``table`` that match ``keys`` get ``columns(answer)``
    (a mapping column → a scalar, or a sequence with one value per matching row, in row order)."""

    def fill(part: ProbeResult, answer: Any) -> ProbeResult:
        df = getattr(part, table).copy()
        sel = np.ones(len(df), dtype=bool)
        for k, v in keys.items():
            sel &= (df[k] == v).to_numpy()
        for col, val in columns(answer).items():
            df.loc[sel, col] = val if np.isscalar(val) else np.asarray(val, dtype=np.float64)
        return replace(part, **{table: df})  # type: ignore[arg-type]

    return fill


def ordered_parts(parts_by_rank: Sequence[Sequence[ProbeResult]]) -> list[ProbeResult]:
    """The parts of every rank, rank by rank (rank 0's first)."""
    return [p for parts in parts_by_rank for p in parts]
