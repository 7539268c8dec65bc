"""The training loop: config → setup → rollout → reward → advantage → update → log → checkpoint.

:func:`train` is the whole trainer; it reads top to bottom. What it adds to plain GRPO bookkeeping:

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
- **One path for one or many processes** (:mod:`trainer.distributed`): each rank samples its share of
  the prompts (a group never spans ranks), loss normalisers and metrics are reduced across ranks, only
  rank 0 writes.

>>> import tempfile
>>> cfg = TrainConfig(model="tiny-random", steps=1, prompts_per_step=2, mini_batch_size=2, n=2,
...                   output_dir=tempfile.mkdtemp(), progress_bar="off", log_every=100)
>>> run = train(cfg)
>>> sorted(p.name for p in (run / "checkpoints").iterdir())
['step_000000', 'step_000001']
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import platform
import sys
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
from resrl_analysis.forward import ForwardOut, PackedRows, pack_rows, response_forward
from resrl_analysis.sampling import SamplingParams, encode_prompts, eos_token_ids, sample
from trainer.checkpointing import (
    CheckpointError,
    latest_checkpoint,
    load_trainer_state,
    remove_debris,
    save_checkpoint,
)
from trainer.config import (
    RESUMABLE_CHANGES,
    ConfigError,
    TrainConfig,
    config_differences,
    config_from_sources,
    save_config_yaml,
)
from trainer.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast_object,
    full_model_state_dict,
    full_optimizer_state_dict,
    gathered_for_inference,
    load_full_state,
    setup_distributed,
    teardown_distributed,
    wrap_model,
)
from trainer.losses import LossNorm, policy_loss
from trainer.metrics_log import METRIC_KEYS, MetricsLog, RunWriteError, truncate_metrics, write_rollouts
from trainer.tasks import Prompt, Task

__all__ = ["SetupError", "TrainingDiverged", "train"]


class SetupError(RuntimeError):
    """The run cannot start (model not found, output directory not writable or already used, ...)."""


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the last checkpoint is intact."""


# =========================================================================================== the loop


def train(config: TrainConfig) -> Path:
    """Train a policy as ``config`` says and return the run directory (docs/RUN_DIRECTORY.md).

    Works in one process or under ``torchrun``; every rank returns the same path. Raises
    :class:`trainer.tasks.DataError` (bad data), :class:`ConfigError`/:class:`SetupError` (impossible
    settings) before anything is written, and :class:`TrainingDiverged` after
    ``max_consecutive_skips`` non-finite steps in a row.
    """
    cfg = config
    ctx = setup_distributed(cfg.device, cfg.fsdp)
    log = MetricsLog("", enabled=False)
    threads = torch.get_num_threads()
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    try:
        # ------------------------------------------------------------------ setup (nothing written yet)
        _check_world(cfg, ctx)
        compute_dtype = _compute_dtype(cfg, ctx)
        tokenizer, model = _load_policy(cfg, ctx)
        # A DataError surfaces here, before the run directory exists.
        task = _limit_prompts(_build_task(cfg, tokenizer), cfg.train_prompts)
        # ------------------------------------------------------------------ run directory, resume point
        run_dir = cfg.resolved_output_dir()
        resume = _find_resume_point(cfg, run_dir, ctx)
        _prepare_run_dir(cfg, run_dir, resume, ctx)
        model, optimizer, scheduler, counters = _setup_training(cfg, model, resume, compute_dtype, ctx)
        step, skipped, consecutive = counters
        ref_model = _load_reference(cfg, ctx, compute_dtype) if cfg.kl_coef > 0 else None
        algo = get_algorithm(cfg.algorithm)
        k = cfg.updates_per_rollout
        log = MetricsLog(
            run_dir, enabled=ctx.is_main, progress=_want_progress(cfg, ctx), tensorboard=cfg.tensorboard,
            total_steps=cfg.steps, start_step=step, log_every=cfg.log_every,
        )
        if resume is not None:
            log.info(f"resuming {run_dir} from checkpoint step {step} (target {cfg.steps} steps)")
        first_step = step
        pending: list[Rollouts] = []
        roll_metrics: dict[str, Any] = {}
        while True:
            if ctx.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(ctx.device)
            if step % k == 0:
                # ---------------------------------------------------------- checkpoint (between batches)
                if _is_save_step(cfg, step) and not (resume is not None and step == first_step):
                    _save(cfg, run_dir, step, model, tokenizer, optimizer, scheduler, skipped, consecutive, ctx)
                if step >= cfg.steps:
                    if cfg.dump_rollouts and not (run_dir / "rollouts" / f"step_{step:06d}.jsonl").exists():
                        # What the final policy samples (the batch a continued run would train on).
                        data, _ = _collect(cfg, step, model, ref_model, tokenizer, task, algo, ctx)
                        _dump(run_dir, step, data, tokenizer, ctx)
                    break
                # ---------------------------------------------------------- rollout → reward → advantage
                t0 = time.perf_counter()
                data, roll_metrics = _collect(cfg, step, model, ref_model, tokenizer, task, algo, ctx)
                roll_metrics["timing/rollout_s"] = time.perf_counter() - t0
                if cfg.dump_rollouts and _is_save_step(cfg, step):
                    _dump(run_dir, step, data, tokenizer, ctx)
                pending = _minibatches(data, cfg, ctx)
            # -------------------------------------------------------------- update (one optimizer step)
            t1 = time.perf_counter()
            upd = _optimizer_step(model, optimizer, scheduler, pending.pop(0), cfg, ctx)
            update_s = time.perf_counter() - t1
            step += 1
            if upd["finite"]:
                consecutive = 0
            else:
                skipped, consecutive = skipped + 1, consecutive + 1
            # -------------------------------------------------------------- log
            rollout_s = roll_metrics.pop("timing/rollout_s", 0.0)  # charged to the first step of a batch
            metrics = {key: None for key in METRIC_KEYS}
            metrics.update(roll_metrics)
            metrics.update({
                "step": step, **upd["metrics"],
                "timing/rollout_s": rollout_s, "timing/update_s": update_s,
                "timing/step_s": rollout_s + update_s, "perf/tokens_per_s": upd["tokens"] / (rollout_s + update_s),
                "train/skipped_steps": skipped,
            })
            if ctx.device.type == "cuda":
                metrics["perf/peak_memory_gb"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
            if cfg.val_every and step % cfg.val_every == 0:
                metrics.update(_validate(cfg, step, model, tokenizer, task, ctx))
            _on_all_ranks(log.log if ctx.is_main else None, metrics, what=str(run_dir / "metrics.jsonl"), ctx=ctx)
            if not upd["finite"]:
                log.info(f"step {step}: non-finite loss or gradient, update skipped ({consecutive} in a row)")
                if consecutive >= cfg.max_consecutive_skips:
                    raise TrainingDiverged(
                        f"{consecutive} non-finite steps in a row (steps {step - consecutive + 1}-{step}): stopping. "
                        f"The last checkpoint in {run_dir / 'checkpoints'} is intact; lower lr or check the "
                        f"data, then --resume (e.g. --resume --output-dir {run_dir} --set lr={cfg.lr / 10:g})"
                    )
        return run_dir
    finally:
        log.close()
        teardown_distributed(ctx)
        torch.set_num_threads(threads)


# =========================================================================================== setup


def _check_world(cfg: TrainConfig, ctx: DistContext) -> None:
    w = ctx.world_size
    if cfg.prompts_per_step % w or cfg.mini_batch_size % w:
        raise ConfigError(
            f"prompts_per_step={cfg.prompts_per_step} and mini_batch_size={cfg.mini_batch_size} must be divisible "
            f"by the {w} ranks (each rank samples whole prompt groups): use multiples of {w}"
        )


def _compute_dtype(cfg: TrainConfig, ctx: DistContext) -> torch.dtype:
    name = cfg.param_dtype
    if name == "auto":  # bf16 compute needs FSDP's float32 master copy
        name = "bfloat16" if ctx.device.type == "cuda" and ctx.use_fsdp else "float32"
    dtype = getattr(torch, name)
    if dtype != torch.float32 and not ctx.use_fsdp:
        raise ConfigError(f"param_dtype={name} needs FSDP (fsdp=auto or on), which keeps float32 master weights; "
                          "use param_dtype=float32 with fsdp=off")
    return dtype


def _load_policy(cfg: TrainConfig, ctx: DistContext) -> tuple[Any, torch.nn.Module]:
    """(tokenizer, float32 model on the device)."""
    if cfg.model == "tiny-warmstart":
        from trainer.warmstart import load_tiny_warmstart

        model, tokenizer = load_tiny_warmstart()
    elif cfg.model == "tiny-random":
        from trainer.models import build_tiny_model
        from trainer.tokenizer import build_char_tokenizer

        tokenizer = build_char_tokenizer()
        model = build_tiny_model(seed=cfg.seed, tokenizer=tokenizer, attn_implementation=cfg.attn_implementation)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(cfg.model)
        if not (path / "config.json").is_file():
            raise SetupError(f"model={cfg.model}: not a Hugging Face model directory (no config.json); give the "
                             "path of a local checkpoint, or 'tiny-warmstart'")
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation=cfg.attn_implementation
        )
    if cfg.tokenizer and cfg.model.startswith("tiny-"):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.float().to(ctx.device)  # float32 master weights
    model.config.use_cache = False
    return tokenizer, model


def _build_task(cfg: TrainConfig, tokenizer: Any) -> Task:
    from trainer.tasks import make_task

    if cfg.task == "multiplication":
        return make_task("multiplication")
    return make_task(
        "math", train_files=cfg.train_files, val_files=cfg.val_files or None, tokenizer=tokenizer,
        max_prompt_tokens=cfg.max_prompt_length, on_long_prompt=cfg.on_long_prompt,
        use_chat_template=cfg.use_chat_template,
    )


class _PromptSubset(Task):
    """``n`` of a task's training prompts, evenly spread over its fixed order; reward and validation as the task's."""

    def __init__(self, task: Task, n: int) -> None:
        self.task, self.n = task, n
        self.name = task.name
        self.default_max_new_tokens = task.default_max_new_tokens

    @property
    def num_train(self) -> int:
        return self.n

    def train_item(self, index: int) -> Prompt:
        return self.task.train_item(index * self.task.num_train // self.n)

    def validation_prompts(self) -> list[Prompt]:
        return self.task.validation_prompts()

    def reward(self, response_text: str, ground_truth: str) -> float:
        return self.task.reward(response_text, ground_truth)


def _limit_prompts(task: Task, n: int) -> Task:
    return _PromptSubset(task, n) if 0 < n < task.num_train else task


@dataclass
class _Resume:
    step: int
    path: Path
    state: dict[str, Any]
    skipped: int
    consecutive: int


def _find_resume_point(cfg: TrainConfig, run_dir: Path, ctx: DistContext) -> _Resume | None:
    """Rank 0 finds the latest complete checkpoint; the step and counters are broadcast."""
    found: Any = None
    if ctx.is_main:
        if not cfg.resume:
            used = (run_dir / "checkpoints").is_dir() or (run_dir / "metrics.jsonl").is_file()
            found = ("error", f"output directory {run_dir} already holds a run; pass --resume to continue it "
                              "or choose another --output-dir") if used else None
        else:
            old_cfg = run_dir / "config.yaml"
            if old_cfg.is_file():
                diff = {k: v for k, v in config_differences(config_from_sources(None, old_cfg), cfg).items()
                        if k not in RESUMABLE_CHANGES}
                if diff:
                    pretty = ", ".join(f"{k} ({a!r} → {b!r})" for k, (a, b) in diff.items())
                    found = ("error", f"--resume: settings differ from {old_cfg}: {pretty}; pass the run's "
                                      f"settings (e.g. --config {old_cfg}) to continue it exactly")
            ck = latest_checkpoint(run_dir) if found is None else None
            if ck is not None:
                state = load_trainer_state(ck[1])
                found = ("ok", ck[0], str(ck[1]), int(state.get("skipped_steps", 0)),
                         int(state.get("consecutive_skips", 0)), state)
    head = broadcast_object(found[:-1] if found and found[0] == "ok" else found, ctx)
    if head is None:
        return None
    if head[0] == "error":
        raise SetupError(head[1])
    _, step, path, skipped, consecutive = head
    state = found[-1] if ctx.is_main else {}
    return _Resume(step=step, path=Path(path), state=state, skipped=skipped, consecutive=consecutive)


def _prepare_run_dir(cfg: TrainConfig, run_dir: Path, resume: _Resume | None, ctx: DistContext) -> None:
    """Create the run directory, clear crash debris, cut metrics back to the checkpoint, write config.yaml."""
    err = None
    if ctx.is_main:
        try:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".tmp-write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
            remove_debris(run_dir)
            start = resume.step if resume is not None else 0
            truncate_metrics(run_dir / "metrics.jsonl", start)
            roll = run_dir / "rollouts"
            if roll.is_dir():  # dumps from beyond the checkpoint are re-written as the run proceeds
                for p in roll.glob("step_*.jsonl"):
                    if p.stem[5:].isdigit() and int(p.stem[5:]) > start:
                        p.unlink()
            save_config_yaml(cfg, run_dir / "config.yaml")
        except OSError as exc:
            err = f"cannot write to the output directory {run_dir}: {exc.strerror or exc}"
    err = broadcast_object(err, ctx)
    if err:
        raise SetupError(err)


def _setup_training(
    cfg: TrainConfig, model: torch.nn.Module, resume: _Resume | None, dtype: torch.dtype, ctx: DistContext,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any, tuple[int, int, int]]:
    """Wrap the policy (FSDP2 or not), build AdamW and the schedule, and restore them from ``resume``.

    Returns (model, optimizer, scheduler, (step, skipped steps, consecutive skipped steps)).
    """
    if resume is not None and ctx.is_main:
        from transformers import AutoModelForCausalLM

        # Rank 0 reads the checkpoint; under FSDP the weights reach the other ranks by broadcast.
        model = AutoModelForCausalLM.from_pretrained(
            resume.path, dtype=torch.float32, attn_implementation=cfg.attn_implementation
        ).to(ctx.device)
    model_sd = None  # a plain module already holds the checkpoint; FSDP ranks receive rank 0's copy
    if resume is not None and ctx.use_fsdp:
        model_sd = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        model_sd = model_sd if ctx.is_main else {}
    if cfg.gradient_checkpointing:
        _enable_activation_checkpointing(model)
    model = wrap_model(model, ctx, dtype)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    if resume is None:
        _seed_global_rng(cfg, ctx)
        return model, optimizer, scheduler, (0, 0, 0)
    state = resume.state
    load_full_state(model, optimizer, model_sd, state.get("optimizer", {}) if ctx.is_main else {}, ctx)
    scheduler.load_state_dict(broadcast_object(state.get("scheduler") if ctx.is_main else None, ctx))
    # The loaded state carries the old run's lr; a resume may lower it (after a divergence, say).
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * _lr_lambda(cfg)(scheduler.last_epoch)
    _restore_rng(broadcast_object(state.get("rng") if ctx.is_main else None, ctx), ctx)
    return model, optimizer, scheduler, (resume.step, resume.skipped, resume.consecutive)


def _load_reference(cfg: TrainConfig, ctx: DistContext, dtype: torch.dtype) -> torch.nn.Module:
    """The frozen initial policy for the KL penalty (loaded only when kl_coef > 0)."""
    _, ref = _load_policy(cfg, ctx)
    ref.requires_grad_(False)
    ref.eval()
    return wrap_model(ref, ctx, dtype)


def _lr_lambda(cfg: TrainConfig) -> Any:
    """Multiplier of ``lr`` after s scheduler steps: linear warm-up, then constant or cosine.

    Depends on ``steps`` only through ``lr_decay_steps = 0`` with the cosine schedule.
    """
    decay = cfg.lr_decay_steps or cfg.steps

    def f(s: int) -> float:
        if cfg.warmup_steps and s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        t = min(1.0, (s - cfg.warmup_steps) / max(1, decay - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def _enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant, as FSDP2 needs)."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # older transformers (the GPU image's 5.17 may be one)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _want_progress(cfg: TrainConfig, ctx: DistContext) -> bool:
    if not ctx.is_main or cfg.progress_bar == "off":
        return False
    return cfg.progress_bar == "on" or sys.stderr.isatty()


def _is_save_step(cfg: TrainConfig, step: int) -> bool:
    return step == 0 or step % cfg.save_every == 0 or step == cfg.steps


def _on_all_ranks(fn: Any, *args: Any, what: str, ctx: DistContext) -> None:
    """Run a rank-0 write (``fn`` is None elsewhere); its failure is raised as :class:`RunWriteError` on every
    rank. Without this, rank 0 would die while the others wait in their next collective."""
    err = None
    if fn is not None:
        try:
            fn(*args)
        except RunWriteError as exc:
            err = str(exc)
        except OSError as exc:
            err = f"writing {what} failed: {exc.strerror or exc}; earlier checkpoints are intact"
    err = broadcast_object(err, ctx)
    if err:
        raise RunWriteError(err)


# =========================================================================================== randomness


def _seed(*parts: Any) -> int:
    """A 63-bit seed from any parts, stable across processes and Python versions (unlike ``hash``)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


def _seed_global_rng(cfg: TrainConfig, ctx: DistContext) -> None:
    # Only model code (dropout, if a model has any) draws from the global RNG; seed it per rank.
    torch.manual_seed(_seed(cfg.seed, "global", ctx.rank))


def _rng_state(ctx: DistContext) -> dict[str, Tensor | None]:
    cuda = torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _restore_rng(per_rank: list[dict[str, Any]] | None, ctx: DistContext) -> None:
    if not per_rank or len(per_rank) != ctx.world_size:
        return  # a different world size: the per-step generators still make the run deterministic
    mine = per_rank[ctx.rank]
    torch.set_rng_state(mine["cpu"])
    if mine.get("cuda") is not None and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], ctx.device)


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


Rollouts = ScoredBatch  # the former name, still used by the update code


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
) -> tuple[Rollouts, dict[str, Any]]:
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
        local["algo"] = algo.metrics.local(data.extras, neg_tok)
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


# =========================================================================================== update


def _minibatches(data: Rollouts, cfg: TrainConfig, ctx: DistContext) -> list[Rollouts]:
    """This rank's share of each optimizer step: whole groups, ``mini_batch_size / W`` prompts, per epoch."""
    rows = cfg.mini_batch_size // ctx.world_size * cfg.n
    one_epoch = [data.select(slice(s, s + rows)) for s in range(0, data.num_rows, rows)]
    return [mb for _ in range(cfg.ppo_epochs) for mb in one_epoch]


def _micro_slices(mb: Rollouts, cfg: TrainConfig) -> list[slice]:
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
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, mb: Rollouts, cfg: TrainConfig,
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


# =========================================================================================== checkpoint


def _save(
    cfg: TrainConfig, run_dir: Path, step: int, model: torch.nn.Module, tokenizer: Any,
    optimizer: torch.optim.Optimizer, scheduler: Any, skipped: int, consecutive: int, ctx: DistContext,
) -> None:
    """Write checkpoints/step_XXXXXX (every rank takes part in gathering the state; rank 0 writes)."""
    model_sd = full_model_state_dict(model, ctx)
    optim_sd = full_optimizer_state_dict(model, optimizer, ctx)
    rngs = all_gather_objects(_rng_state(ctx), ctx)
    err = None
    if ctx.is_main:
        import transformers

        state = {
            "step": step, "data_position": (step // cfg.updates_per_rollout) * cfg.prompts_per_step,
            "optimizer": optim_sd, "scheduler": scheduler.state_dict(), "rng": rngs,
            "skipped_steps": skipped, "consecutive_skips": consecutive, "world_size": ctx.world_size,
            "seed": cfg.seed, "algorithm": cfg.algorithm,
            "versions": {"torch": str(torch.__version__), "transformers": str(transformers.__version__),
                         "python": platform.python_version()},
        }

        def write_model(d: Path) -> None:
            from transformers.utils import logging as hf_logging

            bar = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # no "Writing model shards" bar at every checkpoint
            try:
                model.save_pretrained(d, state_dict=model_sd)
                tokenizer.save_pretrained(d)
            finally:
                if bar:
                    hf_logging.enable_progress_bar()

        try:
            save_checkpoint(run_dir, step, write_model, state)
        except CheckpointError as exc:
            err = str(exc)
    err = broadcast_object(err, ctx)
    barrier(ctx)
    if err:
        raise CheckpointError(err)
