"""Everything around the training loop: loading the policy, the run directory (lock, resume point,
preparation), optimizer and schedule, the RNG plumbing, checkpoint saving and recovery after a divergence.

:mod:`trainer.loop` keeps only the algorithm (rollout → reward → advantage → update → log → checkpoint); every
function here runs on every rank and says which rank writes.

>>> lr_lambda(TrainConfig(warmup_steps=2, lr_schedule="constant", steps=4))(0)
0.5
>>> seed_of(1, "rollout", 0) == seed_of(1, "rollout", 0) != seed_of(1, "rollout", 1)
True
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from resrl_analysis import rundir
from resrl_analysis.distributed import (
    DistContext,
    all_gather_objects,
    barrier,
    broadcast_object,
    full_model_state_dict,
    full_optimizer_state_dict,
    load_full_state,
    wrap_model,
)
from resrl_analysis.rundir import RunLock, RunLocked
from trainer.checkpointing import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
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
    replace,
    save_config_yaml,
)
from trainer.metrics_log import RunWriteError, read_metrics, truncate_metrics
from trainer.tasks import Prompt, Task

__all__ = [
    "Resume",
    "SetupError",
    "TrainingDiverged",
    "build_task",
    "check_world",
    "compute_dtype",
    "find_resume_point",
    "refuse_resume_without_run",
    "generator",
    "is_save_step",
    "last_sane_checkpoint",
    "limit_prompts",
    "load_policy",
    "load_reference",
    "lock_run_dir",
    "lr_lambda",
    "on_all_ranks",
    "prepare_run_dir",
    "raise_on_all_ranks",
    "restore_rng",
    "resume_command",
    "rng_state",
    "save",
    "seed_global_rng",
    "seed_of",
    "setup_training",
    "suggest_lr",
    "want_progress",
    "write_prompt_files",
]


class SetupError(RuntimeError):
    """The run cannot start (model not found, output directory not writable, already used or locked, ...)."""


class TrainingDiverged(RuntimeError):
    """Too many non-finite or blow-up steps; the checkpoints are intact and the message says how to recover."""


# =========================================================================================== policy and task


def check_world(cfg: TrainConfig, ctx: DistContext) -> None:
    w = ctx.world_size
    if cfg.prompts_per_step % w or cfg.mini_batch_size % w:
        raise ConfigError(
            f"prompts_per_step={cfg.prompts_per_step} and mini_batch_size={cfg.mini_batch_size} must be divisible "
            f"by the {w} ranks (each rank samples whole prompt groups): use multiples of {w}"
        )


def compute_dtype(cfg: TrainConfig, ctx: DistContext) -> torch.dtype:
    name = cfg.param_dtype
    if name == "auto":  # bf16 compute needs FSDP's float32 master copy
        name = "bfloat16" if ctx.device.type == "cuda" and ctx.use_fsdp else "float32"
    dtype = getattr(torch, name)
    if dtype != torch.float32 and not ctx.use_fsdp:
        raise ConfigError(f"param_dtype={name} needs FSDP (fsdp=auto or on), which keeps float32 master weights; "
                          "use param_dtype=float32 with fsdp=off")
    return dtype


def load_policy(cfg: TrainConfig, ctx: DistContext) -> tuple[Any, torch.nn.Module]:
    """(tokenizer, float32 model on the device)."""
    if cfg.model in ("tiny-warmstart", "tiny-addition-warmstart"):  # the shipped checkpoints, by name
        from trainer.warmstart import TINY_ADDITION_WARMSTART_DIR, TINY_WARMSTART_DIR, load_tiny_warmstart

        model, tokenizer = load_tiny_warmstart(
            TINY_WARMSTART_DIR if cfg.model == "tiny-warmstart" else TINY_ADDITION_WARMSTART_DIR)
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
                             "path of a local checkpoint, 'tiny-warmstart' or 'tiny-addition-warmstart'")
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


def build_task(cfg: TrainConfig, tokenizer: Any) -> Task:
    from trainer.tasks import make_task

    if cfg.task != "math":  # the embedded tasks build themselves; math reads the configured files
        return make_task(cfg.task)
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


def limit_prompts(task: Task, n: int) -> Task:
    return _PromptSubset(task, n) if 0 < n < task.num_train else task


@dataclass
class Resume:
    """Where a resumed run starts: the checkpoint, its trainer state (rank 0 only) and the total skip count."""

    step: int
    path: Path
    state: dict[str, Any]
    skipped: int


# =========================================================================================== run directory


def lock_run_dir(run_dir: Path, ctx: DistContext) -> RunLock | None:
    """Take the run directory's one-writer lock (rank 0; creates the directory) before anything in it is read.

    Refused with a one-line :class:`SetupError` naming the PID of the process holding it.
    """
    lock, err = None, None
    if ctx.is_main:
        try:
            lock = RunLock(run_dir, "resrl train").acquire()
        except RunLocked as exc:
            err = str(exc)
        except OSError as exc:
            err = f"cannot write to the output directory {run_dir}: {exc.strerror or exc}"
    raise_on_all_ranks(err, SetupError, ctx)
    return lock


def refuse_resume_without_run(cfg: TrainConfig, run_dir: Path, ctx: DistContext) -> None:
    """``--resume`` on a directory that holds no run (no config.yaml, checkpoint or metrics: a mistyped path) is
    refused with one line, before the lock creates anything there."""
    err = None
    if ctx.is_main and cfg.resume:
        ckpts = run_dir / rundir.CHECKPOINTS
        held = (run_dir / rundir.CONFIG).is_file() or (run_dir / rundir.METRICS).is_file() or \
            (ckpts.is_dir() and any(ckpts.iterdir()))
        if not held:
            what = "does not exist" if not run_dir.exists() else "holds no run (no config.yaml, checkpoint or metrics)"
            err = f"--resume: {run_dir} {what}; check --output-dir, or drop --resume to start a new run there"
    raise_on_all_ranks(err, SetupError, ctx)


def find_resume_point(cfg: TrainConfig, run_dir: Path, ctx: DistContext) -> Resume | None:
    """Rank 0 finds the checkpoint to resume from (``resume_from``, else the latest complete one); the step and
    counters are broadcast. The run of consecutive non-finite steps starts again at 0 on every resume."""
    found: Any = None
    if ctx.is_main:
        if not cfg.resume:
            used = (run_dir / rundir.CHECKPOINTS).is_dir() or (run_dir / rundir.METRICS).is_file()
            found = ("error", f"output directory {run_dir} already holds a run; pass --resume to continue it "
                              "or choose another --output-dir") if used else None
        else:
            old_cfg = run_dir / rundir.CONFIG
            if old_cfg.is_file():
                diff = {k: v for k, v in config_differences(config_from_sources(None, old_cfg), cfg).items()
                        if k not in RESUMABLE_CHANGES}
                if diff:
                    pretty = ", ".join(f"{k} ({a!r} → {b!r})" for k, (a, b) in diff.items())
                    found = ("error", f"--resume: settings differ from {old_cfg}: {pretty}; pass the run's "
                                      f"settings (e.g. --config {old_cfg}) to continue it exactly")
            ck = None
            if found is None and cfg.resume_from >= 0:
                have = dict(list_checkpoints(run_dir, with_trainer_state=True))
                ck = (cfg.resume_from, have[cfg.resume_from]) if cfg.resume_from in have else None
                if ck is None:
                    found = ("error", f"--resume-from {cfg.resume_from}: {run_dir / rundir.CHECKPOINTS} has no "
                                      f"complete checkpoint {rundir.step_name(cfg.resume_from)} (have {sorted(have)})")
            elif found is None:
                ck = latest_checkpoint(run_dir)
            if ck is not None and cfg.steps < ck[0]:
                # Training nothing while config.yaml says `steps` would make the directory lie about the run.
                found = ("error", f"--resume: steps {cfg.steps} is below the run's checkpoint step {ck[0]} in "
                                  f"{run_dir}; --steps is the total to reach: give one above {ck[0]} (or "
                                  f"--resume-from STEP to go back to a checkpoint at or before {cfg.steps})")
                ck = None
            if ck is not None:
                state = load_trainer_state(ck[1])
                found = ("ok", ck[0], str(ck[1]), int(state.get("skipped_steps", 0)), state)
    head = broadcast_object(found[:-1] if found and found[0] == "ok" else found, ctx)
    if head is None:
        return None
    if head[0] == "error":
        raise SetupError(head[1])
    _, step, path, skipped = head
    state = found[-1] if ctx.is_main else {}
    return Resume(step=step, path=Path(path), state=state, skipped=skipped)


def prepare_run_dir(cfg: TrainConfig, run_dir: Path, resume: Resume | None, ctx: DistContext, *,
                    write_config: Any = save_config_yaml, task: Task | None = None,
                    tokenizer: Any = None) -> Path | None:
    """Create the run directory, clear crash debris, cut metrics and rollouts back to the start, write config.yaml.

    Past the start: after a crash (plain resume) the lost steps are simply re-run, so their metrics lines and
    rollout dumps go; with ``resume_from`` the later checkpoints, rollout dumps and metrics lines are moved into
    ``superseded/<UTC time>/`` (returned), never deleted. Runs under the lock, so no live writer's
    temporary files are touched. ``write_config(cfg, path)`` writes config.yaml; :func:`write_prompt_files` the
    prompt files (from ``task`` and ``tokenizer`` when given, else rebuilt from ``cfg``).
    """
    err, moved = None, None
    if ctx.is_main:
        try:
            (run_dir / rundir.CHECKPOINTS).mkdir(parents=True, exist_ok=True)
            probe = run_dir / f"{rundir.TMP_PREFIX}-write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
            remove_debris(run_dir)
            start = resume.step if resume is not None else 0
            later_rollouts = [p for s, p in rundir.list_rollouts(run_dir) if s > start]
            if cfg.resume_from >= 0:
                later = [p for s, p in rundir.list_checkpoints(run_dir) if s > start] + later_rollouts
                lines = [json.dumps(r) for r in read_metrics(run_dir / rundir.METRICS) if int(r["step"]) > start]
                # Moved first, cut after: a crash in between leaves a copy too many, never one too few.
                moved = rundir.move_aside(run_dir, later, lines={rundir.METRICS: lines})
            else:
                for p in later_rollouts:  # re-written as the run proceeds
                    p.unlink()
            truncate_metrics(run_dir / rundir.METRICS, start)
            # Saved without resume_from: a later plain --resume with this file must not roll back again.
            write_config(replace(cfg, resume_from=-1), run_dir / rundir.CONFIG)
            write_prompt_files(cfg, run_dir, ctx, task=task, tokenizer=tokenizer)
        except OSError as exc:
            err = f"cannot write to the output directory {run_dir}: {exc.strerror or exc}"
    raise_on_all_ranks(err, SetupError, ctx)
    moved = broadcast_object(str(moved) if moved else None, ctx)
    return Path(moved) if moved else None


def _prompt_record(prompt: Prompt, task: Task, tokenizer: Any) -> dict[str, Any]:
    from resrl_analysis.sampling import encode_prompts

    inner = getattr(task, "task", task)  # a _PromptSubset forwards to its task
    target = getattr(inner, "sft_target", None)
    reference = target(prompt) if callable(target) else prompt.ground_truth
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rec = {"uid": prompt.uid, "data_source": prompt.data_source, "prompt": prompt.text,
           "prompt_ids": encode_prompts(tokenizer, [prompt.text])[0], "ground_truth": prompt.ground_truth,
           "reference_response": reference,
           "reference_ids": list(tokenizer(reference, add_special_tokens=False)["input_ids"]) + eos}
    return {k: rec[k] for k in rundir.PROMPT_FIELDS}


def write_prompt_files(cfg: TrainConfig, run_dir: Path, ctx: DistContext, *, task: Task | None = None,
                       tokenizer: Any = None) -> None:
    """Write ``prompts/heldout.jsonl`` and ``prompts/train.jsonl`` (docs/RUN_DIRECTORY.md), rank 0 only.

    The core builds the ``heldout`` and ``train`` probe sets from them (it never imports the trainer): the first
    ``cfg.probe_prompts`` held-out prompts (``Task.heldout_prompts``: stratified by difficulty where the task
    does so), and at most that many training prompts spread evenly over the pool,
    each with the task's correct response (``Task.sft_target`` when the task has it, else the ground truth).
    Without ``task``/``tokenizer`` both are rebuilt from ``cfg`` (the tiny policies load in well under a second).
    """
    if not ctx.is_main or cfg.probe_prompts <= 0:
        return
    if tokenizer is None:
        if cfg.tokenizer or not cfg.model.startswith("tiny-"):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
        else:
            tokenizer, _ = load_policy(cfg, DistContext.single(torch.device("cpu")))  # a tiny policy: its tokenizer
    if task is None:
        task = limit_prompts(build_task(cfg, tokenizer), cfg.train_prompts)
    n = cfg.probe_prompts
    heldout = task.heldout_prompts(n)
    m = min(n, task.num_train)
    train = [task.train_item(i * task.num_train // m) for i in range(m)] if m else []
    (run_dir / rundir.PROMPTS).mkdir(parents=True, exist_ok=True)
    for name, prompts in ((rundir.PROMPTS_HELDOUT, heldout), (rundir.PROMPTS_TRAIN, train)):
        lines = [json.dumps(_prompt_record(p, task, tokenizer), ensure_ascii=False) for p in prompts]
        rundir.atomic_write(run_dir / name, "".join(line + "\n" for line in lines))


# =========================================================================================== optimizer and schedule


def setup_training(
    cfg: TrainConfig, model: torch.nn.Module, resume: Resume | None, dtype: torch.dtype, ctx: DistContext,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    """Wrap the policy (FSDP2 or not), build AdamW and the schedule, and restore them from ``resume``.

    Returns (model, optimizer, scheduler).
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
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    if resume is None:
        seed_global_rng(cfg, ctx)
        return model, optimizer, scheduler
    state = resume.state
    load_full_state(model, optimizer, model_sd, state.get("optimizer", {}) if ctx.is_main else {}, ctx)
    scheduler.load_state_dict(broadcast_object(state.get("scheduler") if ctx.is_main else None, ctx))
    # The loaded state carries the old run's lr; a resume may lower it (after a divergence, say).
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * lr_lambda(cfg)(scheduler.last_epoch)
    restore_rng(broadcast_object(state.get("rng") if ctx.is_main else None, ctx), ctx)
    return model, optimizer, scheduler


def load_reference(cfg: TrainConfig, ctx: DistContext, dtype: torch.dtype) -> torch.nn.Module:
    """The frozen initial policy for the KL penalty (loaded only when kl_coef > 0)."""
    _, ref = load_policy(cfg, ctx)
    ref.requires_grad_(False)
    ref.eval()
    return wrap_model(ref, ctx, dtype)


def lr_lambda(cfg: TrainConfig) -> Any:
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


def want_progress(cfg: TrainConfig, ctx: DistContext) -> bool:
    if not ctx.is_main or cfg.progress_bar == "off":
        return False
    return cfg.progress_bar == "on" or sys.stderr.isatty()


def is_save_step(cfg: TrainConfig, step: int) -> bool:
    return step == 0 or step % cfg.save_every == 0 or step == cfg.steps


def raise_on_all_ranks(err: str | None, exc_type: type[Exception], ctx: DistContext) -> None:
    """Raise rank 0's error message ``err`` (None: no error) as ``exc_type`` on every rank.

    The one pattern for a failure on rank 0 (which alone reads and writes the run directory): without it, rank 0
    would die while the others wait in their next collective.
    """
    err = broadcast_object(err, ctx)
    if err:
        raise exc_type(err)


def on_all_ranks(fn: Any, *args: Any, what: str, ctx: DistContext) -> None:
    """Run a rank-0 write (``fn`` is None elsewhere); its failure is raised as :class:`RunWriteError` on every
    rank."""
    err = None
    if fn is not None:
        try:
            fn(*args)
        except RunWriteError as exc:
            err = str(exc)
        except OSError as exc:
            err = f"writing {what} failed: {exc.strerror or exc}; earlier checkpoints are intact"
    raise_on_all_ranks(err, RunWriteError, ctx)


# =========================================================================================== randomness


def seed_of(*parts: Any) -> int:
    """A 63-bit seed from any parts, stable across processes and Python versions (unlike ``hash``)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(seed_of(*parts))


def seed_global_rng(cfg: TrainConfig, ctx: DistContext) -> None:
    # Only model code (dropout, if a model has any) draws from the global RNG; seed it per rank.
    torch.manual_seed(seed_of(cfg.seed, "global", ctx.rank))


def rng_state(ctx: DistContext) -> dict[str, Tensor | None]:
    cuda = torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def restore_rng(per_rank: list[dict[str, Any]] | None, ctx: DistContext) -> None:
    if not per_rank or len(per_rank) != ctx.world_size:
        return  # a different world size: the per-step generators still make the run deterministic
    mine = per_rank[ctx.rank]
    torch.set_rng_state(mine["cpu"])
    if mine.get("cuda") is not None and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], ctx.device)



# =========================================================================================== checkpoint


def save(
    cfg: TrainConfig, run_dir: Path, step: int, model: torch.nn.Module, tokenizer: Any,
    optimizer: torch.optim.Optimizer, scheduler: Any, skipped: int, consecutive: int, ctx: DistContext, *,
    write: Any = save_checkpoint,
) -> None:
    """Write checkpoints/step_XXXXXX (every rank takes part in gathering the state; rank 0 writes it with
    ``write``, :func:`trainer.checkpointing.save_checkpoint`'s signature)."""
    model_sd = full_model_state_dict(model, ctx)
    optim_sd = full_optimizer_state_dict(model, optimizer, ctx)
    rngs = all_gather_objects(rng_state(ctx), ctx)
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
            write(run_dir, step, write_model, state)
        except CheckpointError as exc:
            err = str(exc)
    raise_on_all_ranks(err, CheckpointError, ctx)
    barrier(ctx)


# =========================================================================================== recovery


def _weights_sane(ckpt: Path, max_abs: float) -> bool:
    """Every floating-point weight of a checkpoint finite and below ``max_abs`` in magnitude (one tensor at a
    time, so a large checkpoint is never held whole)."""
    from safetensors import safe_open

    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        return False  # nothing we can check is not a checkpoint to recommend
    try:
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                    t = st.get_tensor(name)
                    if t.is_floating_point() and t.numel() and not bool(t.abs().max() < max_abs):
                        return False  # NaN fails the comparison too
    except Exception:  # unreadable: not one to recommend
        return False
    return True


def last_sane_checkpoint(run_dir: str | Path, *, before: int | None, max_abs: float) -> int | None:
    """The highest step of a complete checkpoint (with trainer state) below ``before`` whose weights are finite
    with max |w| < ``max_abs``; None if there is none.

    >>> import tempfile
    >>> last_sane_checkpoint(tempfile.mkdtemp(), before=None, max_abs=1e4) is None
    True
    """
    for step, path in reversed(list_checkpoints(run_dir, with_trainer_state=True)):
        if (before is None or step < before) and _weights_sane(path, max_abs):
            return step
    return None


def suggest_lr(lr: float, worst_ratio: float | None, ratio_bound: float) -> float:
    """A learning rate to resume with after a divergence, rounded to one significant digit.

    An Adam step moves every weight by about ``lr``, so the parameter-norm jump of a step grows in proportion to
    ``lr``: scale ``lr`` so that the worst jump seen would have stayed ten times inside the bound, and at least
    divide it by ten.

    >>> suggest_lr(1e-3, None, 1.5), suggest_lr(10.0, 101.0, 1.5)
    (0.0001, 0.005)
    """
    factor = 0.1
    if worst_ratio is not None and ratio_bound > 1 and worst_ratio > ratio_bound:
        factor = min(factor, 0.1 * (ratio_bound - 1) / (worst_ratio - 1))
    return float(f"{lr * factor:.1g}")


def resume_command(run_dir: str | Path, step: int, lr: float) -> str:
    """The command that resumes ``run_dir`` from checkpoint ``step`` with learning rate ``lr``.

    >>> resume_command("runs/a b", 0, 3e-5)
    "resrl train --resume-from 0 --output-dir 'runs/a b' --set lr=3e-05"
    """
    return f"resrl train --resume-from {step} --output-dir {shlex.quote(str(run_dir))} --set lr={lr:g}"
