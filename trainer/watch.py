"""The watch on the numbers: non-finite steps, blow-ups, a collapsed policy, and the way back.

A non-finite step is skipped by the optimizer (:func:`trainer.loop.optimizer_step`); :class:`Watch` counts it.
A finite step that blows the weights up (parameter-norm jump, update norm) or is taken by a collapsed policy
(entropy and grad norm 0) is reported. Too many of either stop the run with :class:`TrainingDiverged`, whose
message names the last checkpoint with sane weights and the command that resumes from it.

>>> import torch
>>> from resrl_analysis.distributed import DistContext
>>> ctx, model = DistContext.single(torch.device("cpu")), torch.nn.Linear(2, 1, bias=False)
>>> with torch.no_grad():
...     _ = model.weight.copy_(torch.tensor([[3.0, 4.0]]))
>>> before = param_copy(model)
>>> with torch.no_grad():
...     _ = model.weight.add_(1.0)
>>> param_norm(model, ctx), update_norm(model, before, ctx) == 2 ** 0.5
(6.4031242374328485, True)
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from resrl_analysis.distributed import DistContext, all_reduce_sum, broadcast_object, fsdp_modules
from resrl_analysis.rundir import CHECKPOINTS
from trainer.config import TrainConfig
from trainer.metrics_log import MetricsLog
from trainer.setup import TrainingDiverged, last_sane_checkpoint, resume_command, suggest_lr

__all__ = ["COLLAPSED_ENTROPY", "COLLAPSED_GRAD_NORM", "DRIFT_MIN_HISTORY", "DriftNorms", "HeadJumps", "Watch",
           "drift_norms", "param_copy", "param_norm", "update_norm"]

#: A policy whose mean token entropy and gradient norm are both below these has collapsed: it samples one
#: response, every group has one reward, and nothing can move it again.
COLLAPSED_ENTROPY = 1e-4
COLLAPSED_GRAD_NORM = 1e-8


def _norm(model: torch.nn.Module, ctx: DistContext, before: list[Tensor] | None = None) -> float:
    """||θ||₂, or ||θ − before||₂, over all parameters in float64; FSDP2 shards summed over ranks."""
    for m in fsdp_modules(model):  # see drift_norms
        m.reshard()
    sq = torch.zeros((), dtype=torch.float64, device=ctx.device)
    sharded = False
    for p, b in zip(model.parameters(), itertools.repeat(None) if before is None else before):
        t = p.detach()
        if hasattr(t, "to_local"):  # a DTensor shard
            t, sharded = t.to_local(), True
        t = t.double()
        sq += (t if b is None else t - b.double()).pow(2).sum()
    if sharded:
        sq = all_reduce_sum(sq, ctx)
    return math.sqrt(float(sq))


def param_norm(model: torch.nn.Module, ctx: DistContext) -> float:
    """||θ||₂ over all parameters (float64; FSDP2 shards summed over ranks; every rank gets it)."""
    return _norm(model, ctx)


def param_copy(model: torch.nn.Module) -> list[Tensor]:
    """A copy of this rank's parameter values (local shards under FSDP2), for :func:`update_norm`."""
    for m in fsdp_modules(model):  # the shards, even when a no-grad forward left the root's parameters gathered
        m.reshard()
    return [(p.detach().to_local() if hasattr(p, "to_local") else p.detach()).clone() for p in model.parameters()]


def update_norm(model: torch.nn.Module, before: list[Tensor], ctx: DistContext) -> float:
    """||θ_after − θ_before||₂ with ``before`` from :func:`param_copy` (FSDP2 shards summed over ranks)."""
    return _norm(model, ctx, before)


#: Steps of history the head-drift watch needs before it reports a jump (or ``drift_window``, if fewer).
DRIFT_MIN_HISTORY = 5


@dataclass(frozen=True)
class DriftNorms:
    """Norms of one step's update, LM head apart: ``head_update`` ||ΔW_head||, ``head`` ||W_head|| before the step,
    ``body_update`` and ``body`` the same over every other parameter (float64; FSDP2 shards summed over ranks)."""

    head_update: float
    head: float
    body_update: float
    body: float

    @property
    def head_rel(self) -> float:
        """||ΔW_head|| / ||W_head||: the head's relative change (NaN for a zero head)."""
        return self.head_update / self.head if self.head > 0 else float("nan")

    @property
    def body_rel(self) -> float:
        """||Δθ_body|| / ||θ_body||."""
        return self.body_update / self.body if self.body > 0 else float("nan")


def drift_norms(model: torch.nn.Module, before: list[Tensor], ctx: DistContext) -> DriftNorms:
    """The step's update norms of the LM head (``get_output_embeddings()``'s parameters; with tied embeddings that
    matrix is the head) and of the rest, with ``before`` from :func:`param_copy`.

    >>> from resrl_analysis.distributed import DistContext
    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 3, bias=False))
    >>> m.get_output_embeddings = lambda: m[1]
    >>> before = param_copy(m)
    >>> with torch.no_grad():
    ...     _ = m[1].weight.mul_(1.1)
    >>> d = drift_norms(m, before, DistContext.single(torch.device("cpu")))
    >>> round(d.head_rel, 6), d.body_rel
    (0.1, 0.0)
    """
    # A no-grad forward since the step (the after-update diagnostics') leaves an FSDP2 root's parameters gathered,
    # whole tensors in place of the shards param_copy copied: back to the shards (no collective).
    for m in fsdp_modules(model):
        m.reshard()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    sq = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # head update, head, body update, body
    sharded = False
    for p, b in zip(model.parameters(), before):
        t = p.detach()
        if hasattr(t, "to_local"):  # a DTensor shard
            t, sharded = t.to_local(), True
        t, b = t.double(), b.double()
        i = 0 if id(p) in head_ids else 2
        sq[i] += (t - b).pow(2).sum().to(sq.device)
        sq[i + 1] += b.pow(2).sum().to(sq.device)
    if sharded:
        sq = all_reduce_sum(sq, ctx)
    return DriftNorms(*(math.sqrt(float(x)) for x in sq))


@dataclass
class HeadJumps:
    """Whether the head's relative update jumped far above its running level.

    Each step gives x = (head's relative update) / (learning rate), so that warm-up and schedules do not read as
    jumps; the running level is the median of the previous ``window`` values of x. A step *jumps* when at least
    min(:data:`DRIFT_MIN_HISTORY`, ``window``) values are in the window, the level is positive and x > ``factor`` ×
    level. The step's x joins the window after the check.

    >>> j = HeadJumps(factor=5.0, window=20)
    >>> [j.observe(v)[1] for v in (1.0, 1.2, 0.9, 1.1, 1.0, 1.05, 6.0, 1.0)]
    [False, False, False, False, False, False, True, False]
    >>> round(j.observe(1.0)[0], 3)  # the median of the eight values before (the jump among them)
    1.025
    """

    factor: float
    window: int
    history: deque = field(default_factory=deque)

    def observe(self, x: float) -> tuple[float | None, bool]:
        """(the running level before this step, or None while too short; whether x jumps above it)."""
        level = statistics.median(self.history) if len(self.history) >= min(DRIFT_MIN_HISTORY, self.window) else None
        jumped = level is not None and level > 0 and x > self.factor * level
        self.history.append(x)
        while len(self.history) > self.window:
            self.history.popleft()
        return level, jumped


@dataclass
class Watch:
    """Counts non-finite and blow-up steps and stops a diverged run with the command that recovers it.

    Non-finite: the optimizer skipped the step (``max_consecutive_skips`` in a row stop the run). Blow-up: a
    finite step that grew the parameter norm by more than ``blowup_param_ratio``, moved the weights by more
    than ``blowup_update_norm``, or was taken by a collapsed policy (entropy and grad norm both 0);
    ``max_blowup_steps`` of them since the (re)start stop the run. Both counters of a resumed run start
    again at 0, except the run's total of skipped steps. Every rank keeps one and sees the same numbers.
    """

    cfg: TrainConfig
    run_dir: Path
    ctx: DistContext
    log: MetricsLog
    skipped: int = 0  # non-finite steps of the whole run
    consecutive: int = 0  # non-finite steps in a row
    blowups: int = 0  # blow-up steps since the (re)start
    param_norm: float = 0.0  # ||θ|| now
    worst_ratio: float | None = None  # largest parameter-norm jump of a blow-up step
    first_bad: int | None = None  # the first step whose weights are suspect (checkpoints before it are not)
    reasons: list[str] = field(default_factory=list)
    head_jumps: int = 0  # steps the head-drift watch flagged since the (re)start
    _jumps: HeadJumps | None = None

    def _drift(self, step: int, finite: bool, metrics: dict[str, Any], model: torch.nn.Module,
               before: list[Tensor]) -> dict[str, Any]:
        """``drift/*`` of the step just taken, and a warning when the head's relative update jumps
        (:class:`HeadJumps`)."""
        cfg = self.cfg
        if self._jumps is None:
            self._jumps = HeadJumps(cfg.drift_jump_factor, cfg.drift_window)
        d = drift_norms(model, before, self.ctx)
        head, body = d.head_rel, d.body_rel
        out = {"drift/head_rel_update": head, "drift/body_rel_update": body,
               "drift/head_body_ratio": head / body if body > 0 else None, "drift/head_rel_level": None}
        lr = metrics.get("actor/lr") or 0.0
        if finite and lr > 0 and math.isfinite(head):
            level, jumped = self._jumps.observe(head / lr)
            out["drift/head_rel_level"] = level * lr if level is not None else None
            if jumped:
                self.head_jumps += 1
                self.log.info(f"step {step}: warning: LM head drift: relative update {head:.3g} is "
                              f"{head / (level * lr):.1f}× its running median {level * lr:.3g} (per unit lr, over the "
                              f"previous {len(self._jumps.history) - 1} steps; drift_jump_factor="
                              f"{cfg.drift_jump_factor:g}); head/body ratio {out['drift/head_body_ratio'] or 0:.3g}")
        out["drift/head_jumps"] = self.head_jumps
        return {k: (v if v is None or math.isfinite(v) else None) for k, v in out.items()}

    def observe(self, step: int, finite: bool, metrics: dict[str, Any], model: torch.nn.Module,
                before: list[Tensor] | None) -> dict[str, Any]:
        """Check the step just taken; returns its ``actor/param_norm*`` and ``train/*`` metrics.

        ``before``: the parameters before the step (:func:`param_copy`), or None when ``blowup_update_norm`` and
        ``drift_watch`` are off. With ``drift_watch`` also the step's ``drift/*`` metrics and the head-drift warning.
        """
        cfg, out = self.cfg, {}
        old, new = self.param_norm, param_norm(model, self.ctx)
        ratio = new / old if old > 0 else 1.0
        self.param_norm = new
        out.update({"actor/param_norm": new, "actor/param_norm_ratio": ratio})
        why = []
        if not finite:
            self.skipped, self.consecutive = self.skipped + 1, self.consecutive + 1
            self.first_bad = step if self.first_bad is None else self.first_bad
            self.log.info(f"step {step}: non-finite loss or gradient, update skipped ({self.consecutive} in a row)")
        else:
            self.consecutive = 0
            if cfg.blowup_param_ratio and not ratio <= cfg.blowup_param_ratio:
                why.append(f"parameter norm ×{ratio:.3g} in one step (bound blowup_param_ratio="
                           f"{cfg.blowup_param_ratio:g})")
                self.worst_ratio = max(self.worst_ratio or 0.0, ratio if math.isfinite(ratio) else 1e300)
            if before is not None and cfg.blowup_update_norm > 0:
                un = update_norm(model, before, self.ctx)
                out["actor/update_norm"] = un
                if not un <= cfg.blowup_update_norm:
                    why.append(f"update norm {un:.3g} (bound blowup_update_norm={cfg.blowup_update_norm:g})")
            ent, gn = metrics.get("actor/entropy"), metrics.get("actor/grad_norm")
            collapsed = (ent is not None and gn is not None and ent < COLLAPSED_ENTROPY
                         and gn < COLLAPSED_GRAD_NORM)
            if collapsed:
                why.append(f"entropy {ent:.2g} and grad norm {gn:.2g}: the policy has collapsed")
        if why:
            self.blowups += 1
            # A jump spoils the weights this step writes; a collapse was already in the weights it started from.
            bad = step - 1 if why[-1].endswith("collapsed") and len(why) == 1 else step
            self.first_bad = bad if self.first_bad is None else min(self.first_bad, bad)
            self.reasons = why
            limit = f" of {cfg.max_blowup_steps} allowed" if cfg.max_blowup_steps else ""
            self.log.info(f"step {step}: warning: blow-up ({self.blowups}{limit}): {'; '.join(why)}")
        if cfg.drift_watch and before is not None:
            out.update(self._drift(step, finite, metrics, model, before))
        out.update({"train/skipped_steps": self.skipped, "train/blowup_steps": self.blowups})
        return out

    def stop_if_diverged(self, step: int) -> None:
        """Raise :class:`TrainingDiverged` (on every rank) when a limit is reached."""
        cfg = self.cfg
        if self.consecutive >= cfg.max_consecutive_skips:
            what = (f"{self.consecutive} non-finite steps in a row (steps {step - self.consecutive + 1}-{step})")
        elif cfg.max_blowup_steps and self.blowups >= cfg.max_blowup_steps:
            what = f"{self.blowups} blow-up steps (the last, step {step}: {'; '.join(self.reasons)})"
        else:
            return
        raise TrainingDiverged(f"{what}: stopping. {self._recovery()}")

    def _recovery(self) -> str:
        """Where to resume from: the last checkpoint before the trouble whose weights are finite and sane."""
        cfg, ckpts = self.cfg, self.run_dir / CHECKPOINTS
        sane = None
        if self.ctx.is_main:
            sane = last_sane_checkpoint(self.run_dir, before=self.first_bad, max_abs=cfg.sane_weight_max)
        sane = broadcast_object(sane, self.ctx)
        text = f"The last checkpoint in {ckpts} is intact"
        if sane is None:
            return text + (f", but none before step {self.first_bad} has finite weights below sane_weight_max="
                           f"{cfg.sane_weight_max:g}: start a new run with a lower lr")
        lr = suggest_lr(cfg.lr, self.worst_ratio, cfg.blowup_param_ratio)
        return (text + f"; the last one with sane weights (finite, max |w| < {cfg.sane_weight_max:g}) is step "
                f"{sane}: lower lr or check the data, then resume from it: {resume_command(self.run_dir, sane, lr)}")
