"""Checkpoints of a run directory (docs/RUN_DIRECTORY.md): atomic writes, discovery, debris removal.

A checkpoint is written into a temporary sibling ``checkpoints/.tmp-step_XXXXXX-<random>`` and renamed to
``checkpoints/step_XXXXXX`` only when complete, so a directory named ``step_XXXXXX`` is always complete and
a crash leaves only ``.tmp*`` debris, which readers ignore and :func:`remove_debris` deletes on resume (under
the run's lock, so never a live writer's).

>>> import tempfile
>>> run = Path(tempfile.mkdtemp())
>>> _ = save_checkpoint(run, 0, lambda d: (d / "config.json").write_text("{}"), {"step": 0})
>>> latest_checkpoint(run)[0], load_trainer_state(checkpoint_dir(run, 0))["step"]
(0, 0)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from resrl_analysis.rundir import CHECKPOINTS, ROLLOUTS, TMP_PREFIX, TRAINER_STATE, fsync_dir, list_checkpoints
from resrl_analysis.rundir import step_dir as checkpoint_dir

__all__ = [
    "CheckpointError",
    "TRAINER_STATE",
    "checkpoint_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_trainer_state",
    "remove_debris",
    "save_checkpoint",
]


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; earlier checkpoints are untouched."""


def latest_checkpoint(run_dir: str | Path) -> tuple[int, Path] | None:
    """The resumable checkpoint (complete, with ``trainer_state.pt``) with the highest step, or None."""
    ckpts = list_checkpoints(run_dir, with_trainer_state=True)
    return ckpts[-1] if ckpts else None


def remove_debris(run_dir: str | Path) -> list[Path]:
    """Delete ``.tmp*`` files and directories left by an interrupted write; returns what was removed."""
    removed = []
    run = Path(run_dir)
    for d in (run, run / CHECKPOINTS, run / ROLLOUTS):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.name.startswith(TMP_PREFIX):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    write_model: Callable[[Path], Any],
    trainer_state: dict[str, Any],
) -> Path:
    """Write ``checkpoints/step_XXXXXX`` atomically and return its path.

    ``write_model(tmp_dir)`` writes the Hugging Face files (``save_pretrained`` of model and tokenizer);
    ``trainer_state`` goes to ``trainer_state.pt`` last. An existing checkpoint of the same step is replaced
    only after the new one is complete.
    """
    final = checkpoint_dir(run_dir, step)
    root = final.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    except OSError as exc:
        raise CheckpointError(f"cannot create a checkpoint in {root}: {exc.strerror or exc}") from exc
    try:
        write_model(tmp)
        torch.save(trainer_state, tmp / TRAINER_STATE)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{final.name}-", dir=root))
            os.replace(final, old / final.name)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old / final.name, final)  # put the existing checkpoint back
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except BaseException as exc:
        if not isinstance(exc, Exception):
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # Writers report a refused write in their own ways: OSError, torch's RuntimeError ("unexpected
        # pos"), safetensors' SafetensorError ("File too large", "os error 28"); a full disk is named as such,
        # measured before the partial checkpoint is removed. It needs about as much as the newest complete one.
        from trainer.metrics_log import write_failure_reason

        def du(d: Path) -> int:
            return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) if d.is_dir() else 0

        done = [d for _, d in list_checkpoints(run_dir, with_trainer_state=True) if d.name != final.name]
        needed = max(du(done[-1]) if done else 0, du(tmp)) or None
        why = write_failure_reason(exc, tmp, needed=needed)
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"writing checkpoint {final} failed: {why}; earlier checkpoints are intact") from exc
    return final


def load_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    """Read ``trainer_state.pt`` of a checkpoint directory (tensors, numbers, strings only)."""
    path = Path(ckpt) / TRAINER_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
