"""The training loop: config → setup → rollout → reward → advantage → update → log → checkpoint.

:func:`train` is the whole algorithm and reads top to bottom; loading, the run directory, resume, the RNG
plumbing and saving live in :mod:`trainer.setup`. What it adds to plain GRPO bookkeeping:

- **Optimizer steps are the unit.** ``steps`` counts optimizer steps. One rollout batch of
  ``prompts_per_step`` prompts × ``n`` responses feeds ``prompts_per_step / mini_batch_size * ppo_epochs``
  optimizer steps; checkpoints fall between rollout batches.
- **Weights on whole groups.** After sampling, one no-grad forward over the rollout batch (in chunks of
  whole prompt groups, to bound memory) yields the old log-probs *and* the algorithm's inputs (ResRL's
  representation, NTHR's head inputs and logits); advantages and ResRL/NTHR weights are computed there,
  per whole group, and stored with the rollouts before any mini- or micro-batching.
- **Exact resume.** Every random draw comes from a ``torch.Generator`` seeded from (seed, step, rank), the
  data stream is a pure function of (seed, position), and the checkpoint holds optimizer, scheduler,
  counters and the global RNG states; so an interrupted run resumed from its latest checkpoint ends with
  the parameters of an uninterrupted one.
- **A watch on the numbers.** A non-finite step is skipped; a step that blows the weights up (parameter-norm
  jump, update norm) or leaves a collapsed policy (entropy and grad norm 0) is reported; too many of either
  stop the run with the command that resumes it from its last sane checkpoint (:class:`_Watch`).
- **One path for one or many processes** (:mod:`trainer.distributed`): each rank samples its share of
  the prompts (a group never spans ranks), loss normalisers and metrics are reduced across ranks, only
  rank 0 writes, and it alone holds the run directory's lock.

>>> import tempfile
>>> cfg = TrainConfig(model="tiny-random", steps=1, prompts_per_step=2, mini_batch_size=2, n=2,
...                   output_dir=tempfile.mkdtemp(), progress_bar="off", log_every=100)
>>> run = train(cfg)
>>> sorted(p.name for p in (run / "checkpoints").iterdir())
['step_000000', 'step_000001']
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from resrl_analysis.advantages import (
    EXTRAS,
    AdvantageParams,
    AlgoInputs,
    AlgoOutput,
    get_algorithm,
    params_from_config,
)
from resrl_analysis.balancing import micro_batch_groups, micro_batch_ids
from resrl_analysis.displacement import group_displacements, in_batch_lld_metrics
from resrl_analysis.forward import ForwardOut, PackedRows, pack_rows, response_forward
from resrl_analysis.rundir import CHECKPOINTS, METRIC_KEYS, rollout_path
from resrl_analysis.sampling import SamplingParams, encode_prompts, eos_token_ids, sample
from trainer.config import TrainConfig
from trainer.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    broadcast_object,
    gathered_for_inference,
    setup_distributed,
    teardown_distributed,
)
from trainer.losses import LossNorm, policy_loss
from trainer.metrics_log import MetricsLog, write_rollouts
from trainer.setup import (
    SetupError,
    TrainingDiverged,
    check_world,
    compute_dtype,
    find_resume_point,
    is_save_step,
    last_sane_checkpoint,
    limit_prompts,
    load_policy,
    load_reference,
    lock_run_dir,
    prepare_run_dir,
    resume_command,
    save,
    save_checkpoint,
    save_config_yaml,
    setup_training,
    suggest_lr,
    want_progress,
)
from trainer.setup import build_task as _build_task  # a module global here: tests substitute their own task
from trainer.setup import check_world as _check_world  # noqa: F401 - old name, used by tests
from trainer.setup import generator as _generator
from trainer.setup import on_all_ranks as _on_all_ranks
from trainer.tasks import Prompt, Task

__all__ = ["SetupError", "TrainingDiverged", "train"]


# =========================================================================================== the loop


def train(config: TrainConfig) -> Path:
    """Train a policy as ``config`` says and return the run directory (docs/RUN_DIRECTORY.md).

    Works in one process or under ``torchrun``; every rank returns the same path. Raises
    :class:`trainer.tasks.DataError` (bad data), :class:`ConfigError`/:class:`SetupError` (impossible
    settings, or the run directory is in use by another process) before anything is written, and
    :class:`TrainingDiverged` after ``max_consecutive_skips`` non-finite steps in a row or ``max_blowup_steps``
    blow-ups, naming the checkpoint to resume from.
    """
    cfg = config
    ctx = setup_distributed(cfg.device, cfg.fsdp)
    log = MetricsLog("", enabled=False)
    lock = None
    threads = torch.get_num_threads()
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    try:
        # ------------------------------------------------------------------ setup (nothing written yet)
        check_world(cfg, ctx)
        dtype = compute_dtype(cfg, ctx)
        tokenizer, model = load_policy(cfg, ctx)
        task = limit_prompts(_build_task(cfg, tokenizer), cfg.train_prompts)  # a DataError surfaces here
        # ------------------------------------------------------------------ run directory: lock, resume point
        run_dir = cfg.resolved_output_dir()
        lock = lock_run_dir(run_dir, ctx)  # before anything in it is read
        resume = find_resume_point(cfg, run_dir, ctx)
        # The run's two writers are named here, where the loop's steps are (and where tests substitute them).
        moved = prepare_run_dir(cfg, run_dir, resume, ctx, write_config=save_config_yaml, task=task,
                                tokenizer=tokenizer)
        model, optimizer, scheduler = setup_training(cfg, model, resume, dtype, ctx)
        ref_model = load_reference(cfg, ctx, dtype) if cfg.kl_coef > 0 else None
        algo = get_algorithm(cfg.algorithm)
        start = resume.step if resume is not None else 0
        log = MetricsLog(
            run_dir, enabled=ctx.is_main, progress=want_progress(cfg, ctx), tensorboard=cfg.tensorboard,
            total_steps=cfg.steps, start_step=start, log_every=cfg.log_every,
        )
        if resume is not None:
            log.info(f"resuming {run_dir} from checkpoint step {start} (target {cfg.steps} steps)")
        if moved is not None:
            log.info(f"moved the checkpoints, rollouts and metrics after step {start} to {moved}")
        watch = _Watch(cfg, run_dir, ctx, log, skipped=resume.skipped if resume is not None else 0)
        watch.param_norm = _param_norm(model, ctx)

        def checkpoint(step: int) -> None:  # a resumed run's first checkpoint is already on disk
            if is_save_step(cfg, step) and not (resume is not None and step == start):
                save(cfg, run_dir, step, model, tokenizer, optimizer, scheduler, watch.skipped, watch.consecutive,
                     ctx, write=save_checkpoint)

        for batch_step in range(start, cfg.steps, cfg.updates_per_rollout):
            checkpoint(batch_step)
            # -------------------------------------------------------------- rollout → reward → advantage
            _reset_peak_memory(ctx)
            t0 = time.perf_counter()
            data, roll_metrics = _collect(cfg, batch_step, model, ref_model, tokenizer, task, algo, ctx)
            roll_metrics["timing/rollout_s"] = time.perf_counter() - t0
            if cfg.dump_rollouts and is_save_step(cfg, batch_step):
                _dump(run_dir, batch_step, data, tokenizer, ctx)
            # -------------------------------------------------------------- update: one optimizer step per mini-batch
            minibatches = _minibatches(data, cfg, ctx)
            for i, mb in enumerate(minibatches):
                step = batch_step + i + 1
                if i:
                    _reset_peak_memory(ctx)
                before = _param_copy(model) if cfg.blowup_update_norm > 0 else None
                t1 = time.perf_counter()
                upd = _optimizer_step(model, optimizer, scheduler, mb, cfg, ctx)
                update_s = time.perf_counter() - t1
                # ---------------------------------------------------------- log
                rollout_s = roll_metrics.pop("timing/rollout_s", 0.0)  # charged to the first step of a batch
                metrics = {key: None for key in METRIC_KEYS}
                metrics.update(roll_metrics)
                metrics.update({
                    "step": step, **upd["metrics"],
                    "timing/rollout_s": rollout_s, "timing/update_s": update_s,
                    "timing/step_s": rollout_s + update_s,
                    "perf/tokens_per_s": upd["tokens"] / (rollout_s + update_s),
                })
                if cfg.lld_in_batch and i == len(minibatches) - 1:  # after the batch's last update
                    metrics.update(_in_batch_lld(model, data, cfg, ctx))
                metrics.update(watch.observe(step, upd["finite"], metrics, model, before))
                if ctx.device.type == "cuda":
                    metrics["perf/peak_memory_gb"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
                if cfg.val_every and step % cfg.val_every == 0:
                    metrics.update(_validate(cfg, step, model, tokenizer, task, ctx))
                _on_all_ranks(log.log if ctx.is_main else None, metrics, what=str(run_dir / "metrics.jsonl"),
                              ctx=ctx)
                watch.stop_if_diverged(step)
        # ------------------------------------------------------------------ the end: the final policy
        end = max(start, cfg.steps)
        checkpoint(end)
        if cfg.dump_rollouts and not rollout_path(run_dir, end).exists():
            # What the final policy samples (the batch a continued run would train on).
            data, _ = _collect(cfg, end, model, ref_model, tokenizer, task, algo, ctx)
            _dump(run_dir, end, data, tokenizer, ctx)
        return run_dir
    finally:
        log.close()
        if lock is not None:
            lock.release()
        teardown_distributed(ctx)
        torch.set_num_threads(threads)


def _reset_peak_memory(ctx: DistContext) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)


# =========================================================================================== the watch

#: A policy whose mean token entropy and gradient norm are both below these has collapsed: it samples one
#: response, every group has one reward, and nothing can move it again.
_COLLAPSED_ENTROPY = 1e-4
_COLLAPSED_GRAD_NORM = 1e-8


def _param_norm(model: torch.nn.Module, ctx: DistContext) -> float:
    """||θ||₂ over all parameters (float64; FSDP2 shards summed over ranks)."""
    sq = torch.zeros((), dtype=torch.float64, device=ctx.device)
    sharded = False
    for p in model.parameters():
        t = p.detach()
        if hasattr(t, "to_local"):  # a DTensor shard
            t, sharded = t.to_local(), True
        sq += t.double().pow(2).sum()
    if sharded:
        sq = all_reduce_sum(sq, ctx)
    return math.sqrt(float(sq))


def _param_copy(model: torch.nn.Module) -> list[Tensor]:
    return [(p.detach().to_local() if hasattr(p, "to_local") else p.detach()).clone() for p in model.parameters()]


def _update_norm(model: torch.nn.Module, before: list[Tensor], ctx: DistContext) -> float:
    """||θ_after − θ_before||₂ (FSDP2 shards summed over ranks)."""
    sq = torch.zeros((), dtype=torch.float64, device=ctx.device)
    sharded = False
    for p, b in zip(model.parameters(), before):
        t = p.detach()
        if hasattr(t, "to_local"):
            t, sharded = t.to_local(), True
        sq += (t.double() - b.double()).pow(2).sum()
    if sharded:
        sq = all_reduce_sum(sq, ctx)
    return math.sqrt(float(sq))


@dataclass
class _Watch:
    """Counts non-finite and blow-up steps and stops a diverged run with the command that recovers it.

    Non-finite: the optimizer skipped the step (``max_consecutive_skips`` in a row stop the run). Blow-up: a
    finite step that grew the parameter norm by more than ``blowup_param_ratio``, moved the weights by more
    than ``blowup_update_norm``, or was taken by a collapsed policy (entropy and grad norm both 0);
    ``max_blowup_steps`` of them since the (re)start stop the run. Both counters of a resumed run start
    again at 0, except the run's total of skipped steps.
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

    def observe(self, step: int, finite: bool, metrics: dict[str, Any], model: torch.nn.Module,
                before: list[Tensor] | None) -> dict[str, Any]:
        """Check the step just taken; returns its ``actor/param_norm*`` and ``train/*`` metrics."""
        cfg, out = self.cfg, {}
        old, new = self.param_norm, _param_norm(model, self.ctx)
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
            if before is not None:
                un = _update_norm(model, before, self.ctx)
                out["actor/update_norm"] = un
                if not un <= cfg.blowup_update_norm:
                    why.append(f"update norm {un:.3g} (bound blowup_update_norm={cfg.blowup_update_norm:g})")
            ent, gn = metrics.get("actor/entropy"), metrics.get("actor/grad_norm")
            collapsed = (ent is not None and gn is not None and ent < _COLLAPSED_ENTROPY
                         and gn < _COLLAPSED_GRAD_NORM)
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


# =========================================================================================== rollouts


@dataclass
class ScoredBatch:
    """This rank's rows of one rollout batch, scored: what was sampled, its rewards, the old (and reference)
    log-probs and the algorithm's advantages, group after group (``n`` contiguous rows per prompt).

    Tensors are on the training device; (B, Tp) prompts left-padded, (B, Tr) responses right-padded.
    ``group_ids`` are unique within the step across ranks. Advantages and the algorithm's ``extras`` (its
    registered per-token outputs, e.g. ResRL's ``resrl_weights``; see ``resrl_analysis.advantages.EXTRAS``)
    are computed on whole groups before any micro-batching.
    """

    prompt_ids: Tensor  # (B, Tp)
    prompt_mask: Tensor  # (B, Tp) bool
    response_ids: Tensor  # (B, Tr)
    response_mask: Tensor  # (B, Tr) bool
    finished: Tensor  # (B,) bool
    group_ids: Tensor  # (B,)
    rewards: Tensor  # (B,) float32
    old_logp: Tensor  # (B, Tr)
    advantages: Tensor  # (B,)
    token_advantages: Tensor  # (B, Tr)
    ref_logp: Tensor | None = None  # (B, Tr)
    extras: dict[str, Tensor] = field(default_factory=dict)  # name -> (B, Tr)
    prompts: list[Prompt] | None = None  # one per row
    texts: list[str] | None = None  # decoded responses, one per row

    def select(self, rows: slice) -> ScoredBatch:
        """The rows ``rows`` (tensors sliced, lists and extras too)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, dict):
                out[f.name] = {k: t[rows] for k, t in v.items()}
            else:
                out[f.name] = v[rows] if v is not None else None
        return ScoredBatch(**out)

    @property
    def num_rows(self) -> int:
        return int(self.response_ids.shape[0])

    def mixed_rows(self) -> Tensor:
        """(B,) bool: the rows of groups holding both a positive (reward > 0) and a negative response."""
        pos = self.rewards > 0
        mixed = torch.zeros_like(pos)
        for g in torch.unique(self.group_ids):
            rows = self.group_ids == g
            if pos[rows].any() and not pos[rows].all():
                mixed |= rows
        return mixed


def _encode_prompts(tokenizer: Any, prompts: list[Prompt]) -> list[list[int]]:
    return encode_prompts(tokenizer, [p.text for p in prompts])


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> int | list[int] | None:
    return eos_token_ids(model, tokenizer)


def _sample(
    model: torch.nn.Module, tokenizer: Any, prompts: list[Prompt], *, n: int, temperature: float, cfg: TrainConfig,
    generator: torch.Generator, ctx: DistContext,
) -> tuple[Any, list[str]]:
    if cfg.rollout_compile == "auto":
        compile = ctx.device.type == "cuda" and not ctx.use_fsdp
    else:
        compile = cfg.rollout_compile == "on"

    greedy = temperature == 0
    params = SamplingParams(temperature=temperature, top_p=1.0 if greedy else cfg.top_p,
                            top_k=0 if greedy else cfg.top_k, max_new_tokens=cfg.max_response_length, n=n)
    batch = sample(model, _encode_prompts(tokenizer, prompts), params, eos_token_id=_eos_ids(model, tokenizer),
                   pad_token_id=tokenizer.pad_token_id, generator=generator, backend=cfg.rollout_backend,
                   compile=compile, return_logprobs=False)
    texts = tokenizer.batch_decode(batch.response_token_lists(), skip_special_tokens=True)
    return batch, texts


def _rewards(cfg: TrainConfig, task: Task, texts: list[str], prompts: list[Prompt], lengths: Tensor) -> Tensor:
    r = torch.tensor([task.reward(t, p.ground_truth) for t, p in zip(texts, prompts)], dtype=torch.float32)  # (B,)
    if cfg.length_scale:
        from trainer.rewards import length_scale_reward

        r = length_scale_reward(r, lengths.cpu(), cfg.length_start, cfg.max_response_length, cfg.length_end_scale)
    return r.float()


def _algo_params(cfg: TrainConfig) -> AdvantageParams:
    return params_from_config(cfg)


def _algo_inputs(cfg: TrainConfig, step: int, params: AdvantageParams, rows: PackedRows, fo: ForwardOut,
                 rewards: Tensor, group_ids: Tensor) -> AlgoInputs:
    """The registry's inputs for a chunk of whole groups, from the no-grad forward ``fo`` over ``rows``."""
    return AlgoInputs(
        rewards=rewards, group_ids=group_ids, response_ids=rows.response_ids, response_mask=rows.response_mask,
        params=params, hidden=fo.captured.get("hidden"), head_input=fo.captured.get("head_input"), logits=fo.logits,
        # Same seed for every chunk: a group's draws depend on (seed, step, group id) only.
        generator=_generator(cfg.seed, "resrl", step),
    )


def _group_chunks(num_rows: int, n: int, rows_per_chunk: int) -> list[slice]:
    """Row slices of whole groups (n rows each), about ``rows_per_chunk`` rows per slice."""
    per = max(1, -(-rows_per_chunk // n)) * n
    return [slice(s, min(s + per, num_rows)) for s in range(0, num_rows, per)]


def _pad_cols(x: Tensor, width: int, value: float = 0.0) -> Tensor:
    """Right-pad the second dimension of ``x`` (B, t, ...) to ``width``."""
    if x.shape[1] == width:
        return x
    pad = torch.full((x.shape[0], width - x.shape[1], *x.shape[2:]), value, dtype=x.dtype, device=x.device)
    return torch.cat([x, pad], dim=1)


def _collect(
    cfg: TrainConfig, step: int, model: torch.nn.Module, ref_model: torch.nn.Module | None, tokenizer: Any,
    task: Task, algo: Any, ctx: DistContext,
) -> tuple[ScoredBatch, dict[str, Any]]:
    """Sample this rank's share of the step's prompts, reward them, run the no-grad forward, compute advantages."""
    # ---- rollout: rank r takes prompts [r·P/W, (r+1)·P/W) of the step's batch: whole groups per rank
    P, W = cfg.prompts_per_step, ctx.world_size
    position = (step // cfg.updates_per_rollout) * P
    per_rank = P // W
    prompts = task.train_batch(position, P, seed=cfg.seed)[ctx.rank * per_rank : (ctx.rank + 1) * per_rank]
    dev = ctx.device
    ref_gathered = gathered_for_inference(ref_model) if ref_model is not None else contextlib.nullcontext()
    with gathered_for_inference(model), ref_gathered:
        t0 = time.perf_counter()
        batch, texts = _sample(model, tokenizer, prompts, n=cfg.n, temperature=cfg.temperature, cfg=cfg,
                               generator=_generator(cfg.seed, "rollout", step, ctx.rank), ctx=ctx)
        sample_s = time.perf_counter() - t0
        row_prompts = [prompts[i] for i in batch.prompt_index.tolist()]
        group_ids = (batch.prompt_index + ctx.rank * per_rank).to(dev)  # (B,)
        # ---- reward
        rewards = _rewards(cfg, task, texts, row_prompts, batch.response_lengths).to(dev)  # (B,)
        # ---- no-grad forward over whole groups: old log-probs and the algorithm's inputs → advantages
        B, Tr = batch.response_ids.shape
        old_logp = torch.zeros(B, Tr, device=dev)
        ref_logp = torch.zeros(B, Tr, device=dev) if ref_model is not None else None
        outs: list[tuple[slice, AlgoOutput]] = []
        capture: dict[str, str | int] = {}
        if "hidden" in algo.needs:
            capture["hidden"] = cfg.resrl_layer
        if "head_input" in algo.needs:
            capture["head_input"] = "head_input"
        params = _algo_params(cfg)
        weight_sets = None  # (B,) ResRL's weight sets, resrl_grouping=micro_batch only
        if cfg.resrl_grouping == "micro_batch" and "hidden" in algo.needs:
            # The reference's weight sets (docs/MATH.md § Departures from the reference implementation): its
            # update micro-batches after verl's length balancing of the whole batch over the W ranks. A group
            # never spans our ranks, so each rank weighs its own (group, micro-batch) pairs once it knows every
            # row's length.
            lengths = (batch.prompt_mask.sum(1) + batch.response_mask.sum(1)).tolist()  # verl: attention_mask.sum
            every = all_gather_objects(lengths, ctx)  # rank-major = the batch's prompt order
            ids = micro_batch_ids([x for part in every for x in part], world_size=W,
                                  mini_batch_rows=cfg.mini_batch_size * cfg.n // W,
                                  micro_batch_rows=cfg.micro_batch_size)
            first = sum(len(part) for part in every[: ctx.rank])
            weight_sets = micro_batch_groups(group_ids, torch.tensor(ids[first : first + B], device=dev),
                                             max(ids) + 1)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for sl in _group_chunks(B, cfg.n, cfg.logprob_micro_batch_size or cfg.micro_batch_size):
                    rows = pack_rows(batch.prompt_ids[sl], batch.prompt_mask[sl], batch.response_ids[sl],
                                     batch.response_mask[sl])
                    fo = response_forward(model, rows, temperature=cfg.temperature, memory_mb=cfg.logprob_memory_mb,
                                          capture=capture, return_logits="logits" in algo.needs)
                    old_logp[sl, : rows.response_len] = fo.logp
                    if ref_model is not None:
                        rf = response_forward(ref_model, rows, temperature=cfg.temperature,
                                              memory_mb=cfg.logprob_memory_mb)
                        ref_logp[sl, : rows.response_len] = rf.logp
                    inp = _algo_inputs(cfg, step, params, rows, fo, rewards[sl], group_ids[sl])
                    if weight_sets is not None:  # chunks hold whole groups, hence whole (group, micro-batch) pairs
                        inp.weight_group_ids = weight_sets[sl]
                    outs.append((sl, algo.fn(inp)))
        finally:
            model.train(was_training)

    def stitch(parts: list[Tensor], fill: float) -> Tensor:
        # Chunks are as wide as their longest response: pad each to Tr with the output's own fill value.
        return torch.cat([_pad_cols(p.float(), Tr, fill) for p in parts], dim=0)  # (B, Tr)

    data = ScoredBatch(
        prompt_ids=batch.prompt_ids, prompt_mask=batch.prompt_mask, response_ids=batch.response_ids,
        response_mask=batch.response_mask, finished=batch.finished, group_ids=group_ids, rewards=rewards,
        old_logp=old_logp, ref_logp=ref_logp, advantages=torch.cat([o.advantages.float() for _, o in outs]),
        token_advantages=stitch([o.token_advantages for _, o in outs], 0.0),
        extras={name: stitch([o.extras[name] for _, o in outs], EXTRAS[name].fill) for name in algo.extras},
        prompts=row_prompts, texts=texts,
    )
    metrics = _rollout_metrics(data, cfg, ctx)
    metrics["timing/sample_s"] = sample_s
    return data, metrics


def _rollout_metrics(data: ScoredBatch, cfg: TrainConfig, ctx: DistContext) -> dict[str, Any]:
    """Reward, prompt and response length, advantage and the algorithm's own statistics of the whole rollout
    batch (all ranks)."""
    algo = get_algorithm(cfg.algorithm)
    lengths = data.response_mask.sum(1)
    neg_tok = data.response_mask & (data.rewards <= 0)[:, None]  # (B, Tr) tokens of negative responses
    adv = data.token_advantages[data.response_mask].double()  # (N,) valid response tokens
    local: dict[str, Any] = {
        "rewards": data.rewards.tolist(), "groups": data.group_ids.tolist(), "lengths": lengths.tolist(),
        "finished": data.finished.tolist(), "prompt_lengths": data.prompt_mask.sum(1).tolist(),
        # (sum, count, min, max) of the token advantages: exact across ranks without gathering every token
        "adv": (float(adv.sum()), adv.numel(), float(adv.min()), float(adv.max())) if adv.numel() else None,
    }
    if algo.metrics is not None:
        local["algo"] = algo.metrics.local(data.extras, neg_tok, neg_tok & data.mixed_rows()[:, None])
    every = all_gather_objects(local, ctx)
    r = torch.tensor([x for e in every for x in e["rewards"]], dtype=torch.float64)
    g = torch.tensor([x for e in every for x in e["groups"]])
    ln = torch.tensor([x for e in every for x in e["lengths"]], dtype=torch.float64)
    pl = torch.tensor([x for e in every for x in e["prompt_lengths"]], dtype=torch.float64)
    uniq, inv = torch.unique(g, return_inverse=True)
    gmax = torch.full((len(uniq),), -math.inf, dtype=torch.float64).scatter_reduce(0, inv, r, "amax")
    gmin = torch.full((len(uniq),), math.inf, dtype=torch.float64).scatter_reduce(0, inv, r, "amin")
    m: dict[str, Any] = {
        "reward/mean": float(r.mean()), "reward/std": float(r.std()) if r.numel() > 1 else 0.0,
        "reward/zero_std_group_frac": float((gmax == gmin).double().mean()),
        "prompt/length_mean": float(pl.mean()),
        "response/length_mean": float(ln.mean()), "response/length_min": float(ln.min()),
        "response/length_max": float(ln.max()),
        "response/finished_frac": float(sum(sum(e["finished"]) for e in every) / r.numel()),
    }
    advs = [e["adv"] for e in every if e["adv"] is not None]
    if advs:
        m.update({"actor/advantage_mean": sum(a[0] for a in advs) / sum(a[1] for a in advs),
                  "actor/advantage_min": min(a[2] for a in advs), "actor/advantage_max": max(a[3] for a in advs)})
    if algo.metrics is not None:
        m.update(algo.metrics.reduce([e["algo"] for e in every]))
    return m


def _dump(run_dir: Path, step: int, data: ScoredBatch, tokenizer: Any, ctx: DistContext) -> None:
    """Write rollouts/step_XXXXXX.jsonl (rank 0; rows of every rank gathered, group after group)."""
    rows = []
    assert data.prompts is not None and data.texts is not None
    lengths = data.response_mask.sum(1).tolist()
    pmask = data.prompt_mask.tolist()
    for i in range(data.num_rows):
        L = lengths[i]

        def tok(x: Tensor | None, i: int = i, L: int = L, nan_as_none: bool = False) -> list | None:
            if x is None:
                return None
            vals = x[i, :L].tolist()
            return [None if (nan_as_none and not math.isfinite(v)) else v for v in vals]

        p = data.prompts[i]
        rows.append({
            "step": step, "group_id": int(data.group_ids[i]), "prompt_uid": p.uid, "data_source": p.data_source,
            "prompt": p.text, "prompt_ids": [t for t, m in zip(data.prompt_ids[i].tolist(), pmask[i]) if m],
            "response": data.texts[i], "response_ids": data.response_ids[i, :L].tolist(),
            "ground_truth": p.ground_truth, "reward": float(data.rewards[i]),
            "is_positive": bool(data.rewards[i] > 0), "finished": bool(data.finished[i]),
            "advantage": float(data.advantages[i]), "token_advantages": tok(data.token_advantages),
            # Every registered extra, None where this algorithm has none; undefined values (NaN) as None.
            **{name: tok(data.extras.get(name), nan_as_none=True) for name in EXTRAS},
        })
    every = all_gather_objects(rows, ctx)
    if ctx.is_main:
        merged = sorted((r for part in every for r in part), key=lambda r: r["group_id"])  # stable: rows of a
        path = run_dir / "rollouts" / f"step_{step:06d}.jsonl"  # group keep their order
        _on_all_ranks(write_rollouts, path, merged, what=str(path), ctx=ctx)
    else:
        _on_all_ranks(None, what="", ctx=ctx)


# =========================================================================================== in-batch LLD


def _in_batch_lld(model: torch.nn.Module, data: ScoredBatch, cfg: TrainConfig, ctx: DistContext) -> dict[str, Any]:
    """``lld/*`` of a rollout batch (docs/MATH.md § Lazy likelihood displacement): its mixed groups' positive
    responses re-scored by one no-grad forward after the batch's last update, against the rollout's log-probs."""
    idx = torch.nonzero(data.mixed_rows() & (data.rewards > 0)).flatten()
    per = cfg.logprob_micro_batch_size or cfg.micro_batch_size
    chunks = [idx[s : s + per] for s in range(0, idx.numel(), per)]
    # Every rank runs as many forwards as the busiest one (FSDP collectives); extra ones score a dummy row.
    n = int(all_reduce_max(torch.tensor([len(chunks)]), ctx)[0])
    new_logp = torch.zeros_like(data.old_logp)  # (B, Tr)
    was_training = model.training
    model.eval()  # as the rollout's no-grad forward, which gave old_logp
    try:
        with torch.no_grad():
            for i in range(n):
                sel = chunks[i] if i < len(chunks) else torch.arange(1)
                rows = pack_rows(data.prompt_ids[sel], data.prompt_mask[sel], data.response_ids[sel],
                                 data.response_mask[sel])
                fo = response_forward(model, rows, temperature=cfg.temperature, memory_mb=cfg.logprob_memory_mb)
                if i < len(chunks):
                    new_logp[sel, : rows.response_len] = fo.logp.float()
    finally:
        model.train(was_training)
    mine = group_displacements(data.old_logp, new_logp, data.response_ids, data.response_mask, data.rewards,
                               data.group_ids)
    every = all_gather_objects(mine, ctx)  # a group never spans ranks
    return in_batch_lld_metrics([g for part in every for g in part])


# =========================================================================================== update


def _minibatches(data: ScoredBatch, cfg: TrainConfig, ctx: DistContext) -> list[ScoredBatch]:
    """This rank's share of each optimizer step: whole groups, ``mini_batch_size / W`` prompts, per epoch."""
    rows = cfg.mini_batch_size // ctx.world_size * cfg.n
    one_epoch = [data.select(slice(s, s + rows)) for s in range(0, data.num_rows, rows)]
    return [mb for _ in range(cfg.ppo_epochs) for mb in one_epoch]


def _micro_slices(mb: ScoredBatch, cfg: TrainConfig) -> list[slice]:
    """Micro-batches: ``micro_batch_size`` rows, or as many rows as fit ``micro_batch_tokens`` padded tokens."""
    B = mb.num_rows
    if not cfg.micro_batch_tokens:
        return [slice(s, min(s + cfg.micro_batch_size, B)) for s in range(0, B, cfg.micro_batch_size)]
    lengths = (mb.prompt_mask.sum(1) + mb.response_mask.sum(1)).tolist()
    out, start, longest = [], 0, 0
    for i, n_tok in enumerate(lengths):
        longest_if = max(longest, n_tok)
        if i > start and longest_if * (i - start + 1) > cfg.micro_batch_tokens:
            out.append(slice(start, i))
            start, longest_if = i, n_tok
        longest = longest_if
    out.append(slice(start, B))
    return out


def _optimizer_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, mb: ScoredBatch, cfg: TrainConfig,
    ctx: DistContext,
) -> dict[str, Any]:
    """Gradient accumulation over micro-batches, clipping, and one optimizer step (skipped if non-finite)."""
    dev = ctx.device
    # Mini-batch normalisers over all ranks: the loss is then independent of how rows are micro-batched.
    counts = all_reduce_sum(
        torch.tensor([float(mb.response_mask.sum()), float(mb.num_rows),
                      float(mb.response_mask.sum() + mb.prompt_mask.sum())], dtype=torch.float64), ctx)
    # FSDP2 averages gradients over ranks; scaling by W turns that average into the global sum.
    norm = LossNorm(tokens=float(counts[0]), seqs=float(counts[1]), scale=float(ctx.world_size))
    slices = _micro_slices(mb, cfg)
    # Every rank must run as many forward/backward passes as the busiest one (FSDP collectives).
    n_micro = int(all_reduce_max(torch.tensor([len(slices)]), ctx)[0])
    keys = ("pg_loss", "pg_clipfrac", "ppo_kl", "entropy", "kl", "loss")
    sums = torch.zeros(len(keys), dtype=torch.float64, device=dev)
    model.train()
    for i in range(n_micro):
        real = i < len(slices)
        part = mb.select(slices[i] if real else slice(0, 1))  # a dummy pass contributes zero
        rows = pack_rows(part.prompt_ids, part.prompt_mask, part.response_ids, part.response_mask)
        t = rows.response_len
        fo = response_forward(model, rows, temperature=cfg.temperature, memory_mb=cfg.logprob_memory_mb, entropy=True)
        ent = fo.entropy if cfg.entropy_coef > 0 else fo.entropy.detach()  # type: ignore[union-attr]
        out = policy_loss(
            fo.logp, part.old_logp[:, :t], part.token_advantages[:, :t], rows.response_mask, norm=norm,
            agg=cfg.loss_agg_mode, clip_low=cfg.clip_ratio_low, clip_high=cfg.clip_ratio_high,
            dual_clip=cfg.dual_clip, ref_logp=part.ref_logp[:, :t] if part.ref_logp is not None else None,
            kl_coef=cfg.kl_coef, entropy=ent, entropy_coef=cfg.entropy_coef,
        )
        (out.loss if real else out.loss * 0.0).backward()
        if real:
            vals = [out.stats.get(k, torch.zeros((), device=dev)) for k in keys[:-1]]
            sums += torch.stack([v.detach().to(dev, torch.float64).reshape(()) for v in vals]
                                + [out.loss.detach().double() / norm.scale])
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2: already the global norm
        grad_norm = grad_norm.full_tensor()
    totals = all_reduce_sum(sums, ctx)
    gn = float(grad_norm)
    finite = math.isfinite(float(totals[-1])) and math.isfinite(gn)
    lr = float(optimizer.param_groups[0]["lr"])  # the rate this step uses (before the scheduler moves it)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # after a skipped first step torch warns about the call order
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()  # the schedule follows the step count, skipped steps included
    metrics = {f"actor/{k}": float(v) for k, v in zip(keys[:-1], totals.tolist())}
    if cfg.kl_coef <= 0:
        metrics.pop("actor/kl")
    metrics["actor/grad_norm"] = gn
    metrics["actor/lr"] = lr
    return {"finite": finite, "metrics": metrics, "tokens": float(counts[2])}


# =========================================================================================== validation


def _validate(cfg: TrainConfig, step: int, model: torch.nn.Module, tokenizer: Any, task: Task,
              ctx: DistContext) -> dict[str, Any]:
    """Avg@n and pass@n on the first ``val_prompts`` held-out prompts at ``val_temperature``."""
    prompts = task.validation_prompts()[: cfg.val_prompts]
    if not prompts:
        return {}
    mine = prompts[ctx.rank :: ctx.world_size]
    correct: list[int] = []
    with gathered_for_inference(model):  # a collective: every rank enters, even one without prompts
        if mine:
            batch, texts = _sample(model, tokenizer, mine, n=cfg.val_n, temperature=cfg.val_temperature, cfg=cfg,
                                   generator=_generator(cfg.seed, "val", step, ctx.rank), ctx=ctx)
            rows = [mine[i] for i in batch.prompt_index.tolist()]
            r = [task.reward(t, p.ground_truth) > 0 for t, p in zip(texts, rows)]
            correct = [sum(r[j * cfg.val_n : (j + 1) * cfg.val_n]) for j in range(len(mine))]
    every = [c for part in all_gather_objects(correct, ctx) for c in part]
    return {"val/reward_mean": sum(every) / (len(every) * cfg.val_n),
            f"val/pass@{cfg.val_n}": sum(c > 0 for c in every) / len(every)}
