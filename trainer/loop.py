"""The training loop: config → setup → rollout → reward → advantage → update → log → checkpoint.

:func:`train` is the whole algorithm and reads top to bottom; loading, the run directory, resume, the RNG
plumbing and saving live in :mod:`trainer.setup`, and what watches the loop beside it in its own modules
(:mod:`trainer.watch`, :mod:`trainer.rollout_dump`, :mod:`trainer.in_batch`, :mod:`trainer.validation`).
What it adds to plain GRPO bookkeeping:

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
- **A watch on the numbers** (:class:`trainer.watch.Watch`): a non-finite step is skipped; blow-ups and a
  collapsed policy are reported; too many of either stop the run with the command that resumes it.
- **One path for one or many processes** (:mod:`resrl_analysis.distributed`): each rank samples its share of
  the prompts (a group never spans ranks), loss normalisers and metrics are reduced across ranks, only
  rank 0 writes, and it alone holds the run directory's lock.

One optimizer step of a random tiny model, on a task of your own (here the embedded addition task):

>>> import tempfile
>>> from trainer.config import TrainConfig
>>> from trainer.tasks import make_task
>>> tmp = tempfile.TemporaryDirectory()
>>> cfg = TrainConfig(model="tiny-random", steps=1, prompts_per_step=2, mini_batch_size=2, n=2,
...                   max_response_length=4, output_dir=tmp.name, progress_bar="off", log_every=100)
>>> run = train(cfg, task=make_task("addition"))
>>> sorted(p.name for p in (run / "checkpoints").iterdir())
['step_000000', 'step_000001']
>>> tmp.cleanup()
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import trainer.update_dynamics  # noqa: F401  (registers the entropy/* and flips/* update diagnostics)
from resrl_analysis.advantages import EXTRAS, AdvantageParams, AlgoInputs, AlgoOutput, get_algorithm, params_from_config
from resrl_analysis.balancing import micro_batch_groups, micro_batch_ids
from resrl_analysis.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    gathered_for_inference,
    setup_distributed,
    teardown_distributed,
)
from resrl_analysis.forward import ForwardOut, PackedRows, pack_rows, response_forward
from resrl_analysis.rundir import METRIC_KEYS, METRICS, rollout_path
from trainer.config import TrainConfig
from trainer.in_batch import RolloutChunk, needs_rollout_entropy, rollout_hooks, rollout_needs, update_metrics
from trainer.losses import LossNorm, policy_loss
from trainer.metrics_log import MetricsLog, write_rollouts
from trainer.rollout import ScoredBatch, rollout_metrics, sample_rollout
from trainer.rollout_dump import dump_rollouts
from trainer.setup import (
    SetupError,
    TrainingDiverged,
    build_task,
    check_world,
    compute_dtype,
    find_resume_point,
    generator,
    is_save_step,
    limit_prompts,
    load_policy,
    load_reference,
    lock_run_dir,
    on_all_ranks,
    prepare_run_dir,
    refuse_resume_without_run,
    save,
    save_checkpoint,
    save_config_yaml,
    setup_training,
    want_progress,
)
from trainer.tasks import Prompt, Task
from trainer.validation import validate
from trainer.watch import Watch, param_copy, param_norm

__all__ = ["SetupError", "TrainingDiverged", "algo_inputs", "micro_slices", "optimizer_step", "train"]


# =========================================================================================== the loop


def train(config: TrainConfig, *, task: Task | None = None) -> Path:
    """Train a policy as ``config`` says and return the run directory (docs/RUN_DIRECTORY.md).

    ``task``: the prompts and reward to train on instead of the task ``config.task`` names (a custom
    :class:`trainer.tasks.Task`); ``train_prompts`` still limits it. Works in one process or under ``torchrun``;
    every rank returns the same path. Raises :class:`trainer.tasks.DataError` (bad data),
    :class:`ConfigError`/:class:`SetupError` (impossible settings, or the run directory is in use by another
    process) before anything is written, and :class:`TrainingDiverged` after ``max_consecutive_skips``
    non-finite steps in a row or ``max_blowup_steps`` blow-ups, naming the checkpoint to resume from.
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
        if task is None:
            task = build_task(cfg, tokenizer)  # a DataError surfaces here
        task = limit_prompts(task, cfg.train_prompts)
        # ------------------------------------------------------------------ run directory: lock, resume point
        run_dir = cfg.resolved_output_dir()
        refuse_resume_without_run(cfg, run_dir, ctx)  # a mistyped --output-dir: nothing is created there
        lock = lock_run_dir(run_dir, ctx)  # before anything in it is read
        resume = find_resume_point(cfg, run_dir, ctx)
        # The run's writers are named here, where the loop's steps are (and where tests substitute them).
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
        watch = Watch(cfg, run_dir, ctx, log, skipped=resume.skipped if resume is not None else 0)
        watch.param_norm = param_norm(model, ctx)

        def checkpoint(step: int) -> None:  # a resumed run's first checkpoint is already on disk
            if is_save_step(cfg, step) and not (resume is not None and step == start):
                save(cfg, run_dir, step, model, tokenizer, optimizer, scheduler, watch.skipped, watch.consecutive,
                     ctx, write=save_checkpoint)

        def dump(step: int, data: ScoredBatch) -> None:
            dump_rollouts(run_dir, step, data, ctx, write=write_rollouts)

        for batch_step in range(start, cfg.steps, cfg.updates_per_rollout):
            checkpoint(batch_step)
            # -------------------------------------------------------------- rollout → reward → advantage
            _reset_peak_memory(ctx)
            t0 = time.perf_counter()
            dumped = cfg.dump_rollouts and is_save_step(cfg, batch_step)  # the dump adds token entropies
            data, roll_metrics = _collect(cfg, batch_step, model, ref_model, tokenizer, task, algo, ctx,
                                          entropy=dumped or needs_rollout_entropy(cfg))
            roll_metrics["timing/rollout_s"] = time.perf_counter() - t0
            if dumped:
                dump(batch_step, data)
            # -------------------------------------------------------------- update: one optimizer step per mini-batch
            minibatches = _minibatches(data, cfg, ctx)
            for i, mb in enumerate(minibatches):
                step = batch_step + i + 1
                if i:
                    _reset_peak_memory(ctx)
                before = param_copy(model) if cfg.blowup_update_norm > 0 or cfg.drift_watch else None
                t1 = time.perf_counter()
                upd = optimizer_step(model, optimizer, scheduler, mb, cfg, ctx)
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
                if i == len(minibatches) - 1:  # after the batch's last update: lld/* and the other live diagnostics
                    metrics.update(update_metrics(model, data, cfg, ctx))
                metrics.update(watch.observe(step, upd["finite"], metrics, model, before))
                if ctx.device.type == "cuda":
                    metrics["perf/peak_memory_gb"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
                if cfg.val_every and step % cfg.val_every == 0:
                    metrics.update(validate(cfg, step, model, tokenizer, task, ctx))
                on_all_ranks(log.log if ctx.is_main else None, metrics, what=str(run_dir / METRICS),
                             ctx=ctx)
                watch.stop_if_diverged(step)
        # ------------------------------------------------------------------ the end: the final policy
        end = max(start, cfg.steps)
        checkpoint(end)
        if cfg.dump_rollouts and not rollout_path(run_dir, end).exists():
            # What the final policy samples (the batch a continued run would train on).
            data, _ = _collect(cfg, end, model, ref_model, tokenizer, task, algo, ctx, entropy=True)
            dump(end, data)
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


# ============================================================================= rollout → reward → advantage


def _rewards(cfg: TrainConfig, task: Task, texts: list[str], prompts: list[Prompt], lengths: Tensor) -> Tensor:
    r = torch.tensor([task.reward(t, p.ground_truth) for t, p in zip(texts, prompts)], dtype=torch.float32)  # (B,)
    if cfg.length_scale:
        from resrl_analysis.rewards import length_scale_reward

        r = length_scale_reward(r, lengths.cpu(), cfg.length_start, cfg.max_response_length, cfg.length_end_scale)
    return r.float()


def algo_inputs(cfg: TrainConfig, step: int, params: AdvantageParams, rows: PackedRows, fo: ForwardOut,
                rewards: Tensor, group_ids: Tensor) -> AlgoInputs:
    """The registry's inputs for a chunk of whole groups, from the no-grad forward ``fo`` over ``rows`` (the
    representation ``fo`` captured under ``hidden`` / ``head_input``, its logits when it kept them)."""
    return AlgoInputs(
        rewards=rewards, group_ids=group_ids, response_ids=rows.response_ids, response_mask=rows.response_mask,
        params=params, hidden=fo.captured.get("hidden"), head_input=fo.captured.get("head_input"), logits=fo.logits,
        hidden_own=fo.captured.get("hidden_own"),
        # Same seed for every chunk: a group's draws depend on (seed, step, group id) only.
        generator=generator(cfg.seed, "resrl", step),
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
    task: Task, algo: Any, ctx: DistContext, *, entropy: bool = False,
) -> tuple[ScoredBatch, dict[str, Any]]:
    """Sample this rank's share of the step's prompts, reward them, run the no-grad forward, compute advantages.

    ``entropy``: the no-grad forward also gives the token entropies (``ScoredBatch.entropy``, for the dump).
    """
    # ---- rollout: rank r takes prompts [r·P/W, (r+1)·P/W) of the step's batch: whole groups per rank
    P, W = cfg.prompts_per_step, ctx.world_size
    position = (step // cfg.updates_per_rollout) * P
    per_rank = P // W
    prompts = task.train_batch(position, P, seed=cfg.seed)[ctx.rank * per_rank : (ctx.rank + 1) * per_rank]
    dev = ctx.device
    ref_gathered = gathered_for_inference(ref_model) if ref_model is not None else contextlib.nullcontext()
    with gathered_for_inference(model), ref_gathered:
        t0 = time.perf_counter()
        batch, texts = sample_rollout(model, tokenizer, prompts, n=cfg.n, temperature=cfg.temperature, cfg=cfg,
                                      generator=generator(cfg.seed, "rollout", step, ctx.rank), ctx=ctx)
        sample_s = time.perf_counter() - t0
        row_prompts = [prompts[i] for i in batch.prompt_index.tolist()]
        group_ids = (batch.prompt_index + ctx.rank * per_rank).to(dev)  # (B,)
        # ---- reward
        rewards = _rewards(cfg, task, texts, row_prompts, batch.response_lengths).to(dev)  # (B,)
        # ---- no-grad forward over whole groups: old log-probs and the algorithm's inputs → advantages
        B, Tr = batch.response_ids.shape
        old_logp = torch.zeros(B, Tr, device=dev)
        token_entropy = torch.zeros(B, Tr, device=dev) if entropy else None
        ref_logp = torch.zeros(B, Tr, device=dev) if ref_model is not None else None
        outs: list[tuple[slice, AlgoOutput]] = []
        capture: dict[str, str | int] = {}
        if "hidden" in algo.needs:
            capture["hidden"] = cfg.resrl_layer
        hooks, live_need = rollout_hooks(cfg), rollout_needs(cfg)  # live diagnostics' quantities before the update
        if "head_input" in algo.needs or "head_input" in live_need:
            capture["head_input"] = "head_input"
        keep_logits = "logits" in algo.needs or "logits" in live_need
        live_parts: dict[str, list[Tensor]] = {}
        capture_own = {"hidden_own": cfg.resrl_layer} if "hidden_own" in algo.needs else {}
        params = params_from_config(cfg)
        weight_sets = None  # (B,) ResRL's weight sets, resrl_grouping=micro_batch only
        if cfg.resrl_grouping == "micro_batch" and {"hidden", "hidden_own"} & algo.needs:
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
                                          capture=capture, capture_own=capture_own, return_logits=keep_logits,
                                          entropy=entropy)
                    old_logp[sl, : rows.response_len] = fo.logp
                    if token_entropy is not None:  # same chunks as the log-probs: they stay bit for bit the same
                        token_entropy[sl, : rows.response_len] = fo.entropy
                    if ref_model is not None:
                        rf = response_forward(ref_model, rows, temperature=cfg.temperature,
                                              memory_mb=cfg.logprob_memory_mb)
                        ref_logp[sl, : rows.response_len] = rf.logp
                    inp = algo_inputs(cfg, step, params, rows, fo, rewards[sl], group_ids[sl])
                    if weight_sets is not None:  # chunks hold whole groups, hence whole (group, micro-batch) pairs
                        inp.weight_group_ids = weight_sets[sl]
                    out = algo.fn(inp)
                    outs.append((sl, out))
                    for d in hooks:
                        chunk = RolloutChunk(fo, rows, out.token_advantages, rewards[sl], group_ids[sl], cfg)
                        for name, t in d.rollout(chunk).items():  # type: ignore[misc]
                            live_parts.setdefault(name, []).append(t)
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
        prompts=row_prompts, texts=texts, entropy=token_entropy,
        live={name: stitch(parts, 0.0) for name, parts in live_parts.items()},
    )
    metrics = rollout_metrics(data, cfg, ctx)
    metrics["timing/sample_s"] = sample_s
    return data, metrics


# =========================================================================================== update


def _minibatches(data: ScoredBatch, cfg: TrainConfig, ctx: DistContext) -> list[ScoredBatch]:
    """This rank's share of each optimizer step: whole groups, ``mini_batch_size / W`` prompts, per epoch."""
    rows = cfg.mini_batch_size // ctx.world_size * cfg.n
    one_epoch = [data.select(slice(s, s + rows)) for s in range(0, data.num_rows, rows)]
    return [mb for _ in range(cfg.ppo_epochs) for mb in one_epoch]


def micro_slices(mb: ScoredBatch, cfg: TrainConfig) -> list[slice]:
    """Micro-batches: ``micro_batch_size`` rows, or as many rows as fit ``micro_batch_tokens`` padded tokens.

    >>> mb = ScoredBatch(prompt_ids=torch.ones(5, 2), prompt_mask=torch.ones(5, 2, dtype=torch.bool),
    ...                  response_ids=torch.ones(5, 3), response_mask=torch.ones(5, 3, dtype=torch.bool),
    ...                  finished=torch.ones(5), group_ids=torch.zeros(5), rewards=torch.zeros(5),
    ...                  old_logp=torch.zeros(5, 3), advantages=torch.zeros(5), token_advantages=torch.zeros(5, 3))
    >>> micro_slices(mb, TrainConfig(micro_batch_size=2))
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    >>> micro_slices(mb, TrainConfig(micro_batch_size=2, micro_batch_tokens=15))  # 5 tokens a row
    [slice(0, 3, None), slice(3, 5, None)]
    """
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


def optimizer_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, mb: ScoredBatch, cfg: TrainConfig,
    ctx: DistContext,
) -> dict[str, Any]:
    """Gradient accumulation over micro-batches, clipping, and one optimizer step (skipped if non-finite).

    A collective (loss normalisers over all ranks). Returns ``{"finite", "metrics" (actor/*), "tokens"}``.
    """
    dev = ctx.device
    # Mini-batch normalisers over all ranks: the loss is then independent of how rows are micro-batched.
    counts = all_reduce_sum(
        torch.tensor([float(mb.response_mask.sum()), float(mb.num_rows),
                      float(mb.response_mask.sum() + mb.prompt_mask.sum())], dtype=torch.float64), ctx)
    # FSDP2 averages gradients over ranks; scaling by W turns that average into the global sum.
    norm = LossNorm(tokens=float(counts[0]), seqs=float(counts[1]), scale=float(ctx.world_size))
    slices = micro_slices(mb, cfg)
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
