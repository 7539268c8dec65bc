"""One probe pass: the registered probes of a :class:`~resrl_analysis.probes.config.ProbeConfig` over a sequence
of models (checkpoints loaded by ``resrl probe``, or the live model of a training run).

For each model, the probe set is forwarded ``group_batch`` groups at a time, teacher-forced, once, keeping
what the pass's probes need (:data:`~resrl_analysis.probes.registry.NEEDS`); every ``groups``-scope probe reads
those forwards; then every probe's checkpoint hook runs (merging its batches, or sampling with the model). At
the end :meth:`ProbePass.results` lets each probe finish, the probes it ``uses`` first.

Under ``torchrun`` (``parallel``, :mod:`resrl_analysis.probes.parallel`) each rank forwards and probes its share of
the groups; the parts are gathered on rank 0 before the checkpoint hooks, so what pools across groups (the subspace
probe's correlations, pass@k, the LLD of the scores) pools over all of them, and only rank 0 holds results.

    >>> from resrl_analysis.probes.config import ProbeConfig
    >>> from resrl_analysis.probes.synthetic import random_probe_set, tiny_model
    >>> pp = ProbePass(ProbeConfig(probes=["lld"]), random_probe_set([[1, 0], [1, 1]]))
    >>> for step in (0, 1):
    ...     pp.run_model(tiny_model(seed=step), step)
    >>> sorted(pp.results()), len(pp.results()["lld"].deltas)
    (['lld', 'scores'], 4)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..distributed import gather_objects
from ..probe_sets import ProbeSet
from ..results import ProbeResult
from .capture import forward_group, pad_id_of
from .config import ProbeConfig, steps_spec
from .parallel import Parallel, WholeModelJobs, dummy_forward, group_order
from .registry import CheckpointContext, FinishContext, GroupsContext, Probe, instantiate

__all__ = ["ProbePass"]


class ProbePass:
    """The probes of one pass and what they measured so far.

    Args:
        config: the pass's settings and each probe's options.
        probe_set: the groups every model is scored on.
        steps: every step the pass will visit, when known in advance (``resrl probe``): the probes' step
            selections (``--full-model-steps``, ``--diversity-steps``) read it. A live run passes none.
        group_batch: groups forwarded together (default ``config.group_batch``; the memory plan may lower it).
        parallel: the ranks of a ``torchrun`` pass and how they hold the model (default: one process).
    """

    def __init__(self, config: ProbeConfig, probe_set: ProbeSet, *, steps: Sequence[int] = (),
                 group_batch: int | None = None, parallel: Parallel | None = None) -> None:
        self.config = config
        self.probe_set = probe_set
        self.parallel = parallel or Parallel.single()
        self.share = self.parallel.share(probe_set)  # this rank's groups (all of them in one process)
        self.order = group_order(probe_set)
        self.probes: dict[str, Probe] = instantiate(config.probes, config.options)
        self.steps = list(steps)
        self.full_model_steps = steps_spec(config.full_model_steps, self.steps)
        self.group_batch = group_batch or config.group_batch
        self.parts: dict[str, list[ProbeResult]] = {n: [] for n in self.probes}
        self.done: list[int] = []
        self.timing: dict[str, float] = {}

    def timed(self, name: str, fn: Callable[..., Any], *a: Any, **kw: Any) -> Any:
        """``fn(*a, **kw)``, its seconds added to ``timing[name]``."""
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            self.timing[name] = self.timing.get(name, 0.0) + time.perf_counter() - t

    def active(self, step: int) -> list[Probe]:
        """The probes that run at ``step`` (``pairs`` probes never run per model)."""
        return [p for p in self.probes.values() if p.scope != "pairs" and p.active_at(step, self.steps)]

    def needs_tokenizer(self, step: int) -> bool:
        """Whether a probe that runs at ``step`` decodes with the tokenizer."""
        return any("tokenizer" in p.needs for p in self.active(step))

    def run_model(self, model: nn.Module, step: int, *, tokenizer: Any = None) -> None:
        """Probe ``model`` as checkpoint ``step``: the shared forwards batch by batch, then the checkpoint hooks.

        Under ``torchrun`` every rank calls it with its copy (or its shard) of the same checkpoint: each probes its
        share of the groups, rank 0 gathers the parts and runs the checkpoint hooks on all of them.
        """
        par = self.parallel
        active = self.active(step)
        on_groups = [p for p in active if p.scope == "groups"]
        parts: dict[str, list[ProbeResult]] = {p.name: [] for p in active}
        # Sharded: what needs the whole model's gradient of one group runs after the batches, with every rank.
        jobs = WholeModelJobs() if par.sharded else None
        pad = pad_id_of(model, tokenizer)
        if on_groups:
            need = set().union(*(p.needs for p in on_groups))
            full = step in self.full_model_steps
            groups = self.share.groups
            for start in range(0, len(groups), self.group_batch):
                # group_batch groups at a time: peak memory is that many groups' logits and hidden states,
                # however many groups the probe set holds.
                one = replace(self.share, groups=groups[start : start + self.group_batch])
                fwd = [self.timed("forward", forward_group, model, g, keep_hidden="hidden" in need,
                                  keep_logits="logits" in need, pad_id=pad, entropy_gram="entropy_gram" in need)
                       for g in one.groups]
                ctx = GroupsContext(model, one, fwd, step, self.config.seed, full, self.probe_set, self.config,
                                    whole_model=jobs)
                for p in on_groups:
                    if jobs is not None:
                        jobs.current = (p.name, len(parts[p.name]))
                    r = self.timed(p.table, p.on_groups, ctx)
                    if r is not None:
                        parts[p.name].append(r)
                del fwd, ctx
            if par.sharded:  # FSDP2: as many forwards as the busiest rank, the extra ones dummies
                for _ in range(par.max_share(self.probe_set) - len(groups)):
                    dummy_forward(model)
        if jobs is not None:
            self.timed("whole_model", jobs.run, model, par, parts)
        # checkpoint-scope probes (sampling) run on every rank, on its share of the groups.
        cctx = CheckpointContext(model, tokenizer, self.share, step, self.steps, self.config.seed, self.config,
                                 all_groups=self.probe_set, parallel=par)
        local = {p.name: self.timed(p.table, p.on_checkpoint, cctx, []) for p in active if p.scope == "checkpoint"}
        if par.world == 1:
            for p in active:
                r = local[p.name] if p.scope == "checkpoint" else self.timed(p.table, p.on_checkpoint, cctx,
                                                                              parts[p.name])
                if r is not None:
                    self.parts[p.name].append(r)
        else:
            gathered = self.timed("gather", gather_objects, {"groups": parts, "checkpoint": local}, par.ctx)
            if gathered is not None:  # rank 0: every rank's parts, back in the probe set's group order
                full_ctx = replace(cctx, probe_set=self.probe_set)
                for p in active:
                    if p.scope == "checkpoint":
                        mine = [g["checkpoint"][p.name] for g in gathered if g["checkpoint"][p.name] is not None]
                        r = self.timed(p.table, p.merge_ranks, mine, self.order) if mine else None
                    else:
                        every = [r for g in gathered for r in g["groups"][p.name]]
                        merged = [self.timed(p.table, p.merge_ranks, every, self.order)] if every else []
                        r = self.timed(p.table, p.on_checkpoint, full_ctx, merged)
                    if r is not None:
                        self.parts[p.name].append(r)
        self.done.append(step)
        if str(getattr(next(model.parameters(), torch.empty(0)), "device", "cpu")).startswith("cuda"):
            torch.cuda.empty_cache()

    def results(self) -> dict[str, ProbeResult]:
        """Every probe's result so far, by table name (the probes a probe ``uses`` finish first); ``{}`` on the ranks
        other than 0 of a ``torchrun`` pass (rank 0 holds what they measured)."""
        out: dict[str, ProbeResult] = {}
        if not self.parallel.is_main:
            return out
        ctx = FinishContext(out, list(self.done), self.config, sorted(self.full_model_steps))
        for p in self.probes.values():
            out[p.table] = self.timed(p.table, p.finish, ctx, self.parts[p.name])
        return out

    def live_metrics(self, results: dict[str, ProbeResult], step: int) -> dict[str, float]:
        """Every live probe's headline numbers at ``step`` (``probe/...``)."""
        out: dict[str, float] = {}
        for p in self.probes.values():
            if p.live:
                out.update(p.live_metrics(results, step))
        return out
