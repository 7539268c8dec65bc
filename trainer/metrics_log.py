"""What a run writes besides checkpoints: metrics.jsonl, TensorBoard events, rollout dumps, progress.

(Named ``metrics_log`` rather than ``logging`` so that ``import logging`` inside the package keeps meaning
the standard library.)

Only rank 0 writes: :class:`MetricsLog` built with ``enabled=False`` is a null logger, so the loop calls it
unconditionally.

>>> import tempfile, json
>>> run = Path(tempfile.mkdtemp())
>>> log = MetricsLog(run, enabled=True, progress=False, tensorboard=False, total_steps=2)
>>> log.log({"step": 1, "reward/mean": 0.5, "resrl/weight_mean": float("nan")})
step      1  reward 0.500  pg_loss -  entropy -  grad_norm -  len -  -s
>>> log.close()
>>> json.loads((run / "metrics.jsonl").read_text())
{'step': 1, 'reward/mean': 0.5, 'resrl/weight_mean': None}
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "METRIC_KEYS",
    "RunWriteError",
    "ROLLOUT_FIELDS",
    "MetricsLog",
    "read_metrics",
    "truncate_metrics",
    "write_failure_reason",
    "write_rollouts",
]

#: Keys of every metrics.jsonl line (docs/RUN_DIRECTORY.md); None where a key does not apply.
METRIC_KEYS = (
    "step", "reward/mean", "reward/std", "reward/zero_std_group_frac",
    "response/length_mean", "response/length_min", "response/length_max",
    "actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/entropy", "actor/grad_norm", "actor/lr",
    "resrl/weight_mean", "resrl/weight_q10", "resrl/weight_q50", "resrl/weight_q90",
    "nthr/downweighted_frac", "timing/rollout_s", "timing/update_s", "timing/step_s", "perf/tokens_per_s",
    "train/skipped_steps",
)

#: Fields of every line of rollouts/step_XXXXXX.jsonl, in order.
ROLLOUT_FIELDS = (
    "step", "group_id", "prompt_uid", "data_source", "prompt", "prompt_ids", "response", "response_ids",
    "ground_truth", "reward", "is_positive", "finished", "advantage", "token_advantages", "resrl_weights",
    "resrl_residuals", "nthr_weights", "nthr_scores",
)


class RunWriteError(RuntimeError):
    """A run file (metrics.jsonl, a rollout dump) could not be written; checkpoints already written are intact."""


#: Below this much free space a failed write is taken for a full disk, whatever error the writer raised.
_LOW_SPACE = 1 << 20


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def _mount_free(path: Path) -> tuple[Path, int] | None:
    """(the file system's mount point, bytes free to this user) for ``path`` or its nearest existing parent."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return None
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p, free


def write_failure_reason(exc: BaseException, path: str | Path, needed: int | None = None) -> str:
    """Why writing ``path`` failed, in words; a full disk is named as such with the free and needed space.

    Writers report a full disk in their own ways: ``OSError(ENOSPC)``, torch.save's ``RuntimeError``
    ("unexpected pos …"), safetensors' ``SafetensorError`` ("… (os error 28)"). So the free space is measured
    (call this *before* removing partial files): under 1 MiB free, or less than ``needed`` bytes (the caller's
    lower bound of what the write takes), is a full disk, whatever the error. ENOSPC/EDQUOT with ample space
    (a quota, space freed since) keeps the system's message, as does any other error.

    >>> import errno, tempfile
    >>> write_failure_reason(OSError(errno.EIO, "Input/output error"), tempfile.gettempdir())
    'Input/output error'
    >>> write_failure_reason(RuntimeError("unexpected pos 576 vs 534"), "/", needed=2**62)  # doctest: +ELLIPSIS
    'no space left on device (on /: at least 4294967296.0 GiB needed, ... free)'
    """
    where = _mount_free(Path(path))
    code = getattr(exc, "errno", None)
    text = " ".join(str(exc).split())
    own = exc.strerror if isinstance(exc, OSError) and exc.strerror else text
    low = where is not None and (where[1] < _LOW_SPACE or (needed is not None and where[1] < needed))
    if code in (errno.ENOSPC, errno.EDQUOT) and where is not None and not low:
        return own  # a quota, or a full disk already freed again: the numbers would only contradict it
    if not (low or code == errno.ENOSPC or "os error 28" in text):
        return own
    detail = []
    if needed:
        detail.append(f"at least {_size(needed)} needed")
    if where is not None:
        detail.append(f"{_size(where[1])} free")
    on = f"on {where[0]}: " if where is not None else ""
    return f"no space left on device ({on}{', '.join(detail)})" if detail else "no space left on device"


def _clean(v: Any) -> Any:
    """JSON-safe value: non-finite floats become None (strict JSON has no NaN)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # numpy / torch scalars
        return _clean(v.item())
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The valid lines of a metrics.jsonl (a torn last line, from a crash mid-write, is skipped)."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


def truncate_metrics(path: str | Path, max_step: int) -> int:
    """Keep the lines with ``step <= max_step`` (and drop torn ones), atomically; returns the count kept.

    After a resume from checkpoint ``max_step`` the steps beyond it are re-run, so their old lines go.
    """
    p = Path(path)
    if not p.is_file():
        return 0
    seen: set[int] = set()
    kept = []
    for rec in read_metrics(p):
        s = int(rec["step"])
        if s <= max_step and s not in seen:
            seen.add(s)
            kept.append(rec)
    tmp = p.with_name(f".tmp-{p.name}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, p)
    return len(kept)


def write_rollouts(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write one JSON object per response (fields :data:`ROLLOUT_FIELDS`), atomically."""
    p = Path(path)
    tmp = p.with_name(f".tmp-{p.name}")
    text = "".join(json.dumps({k: _clean(r[k]) for k in ROLLOUT_FIELDS}, ensure_ascii=False) + "\n" for r in rows)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, p)
    except OSError as exc:
        why = write_failure_reason(exc, p, needed=len(text.encode()))  # measured before the partial file goes
        tmp.unlink(missing_ok=True)
        raise RunWriteError(f"writing {p} failed: {why}; earlier checkpoints are intact") from exc


class MetricsLog:
    """Appends one JSON line per step to ``metrics.jsonl``, mirrors scalars to TensorBoard when installed,
    and shows a tqdm bar (interactive) or prints a summary line every ``log_every`` steps.

    Args:
        run_dir: the run directory.
        enabled: False on ranks other than 0: every method is then a no-op.
        progress: show a tqdm progress bar.
        tensorboard: write ``tb/`` events if ``torch.utils.tensorboard`` imports.
        total_steps: for the progress bar.
        start_step: steps already done (resume); TensorBoard events after it are purged.
        log_every: print cadence without a progress bar.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        progress: bool = False,
        tensorboard: bool = True,
        total_steps: int = 0,
        start_step: int = 0,
        log_every: int = 1,
    ) -> None:
        self.enabled = enabled
        self.log_every = log_every
        self._file = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        run = Path(run_dir)
        self._file = open(run / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard not installed (ImportError) or broken: optional
                SummaryWriter = None  # noqa: N806
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(run / "tb"), purge_step=start_step + 1 if start_step else None)
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, metrics: dict[str, Any]) -> None:
        """Write one step's metrics (must hold ``step``)."""
        if not self.enabled:
            return
        rec = {k: _clean(v) for k, v in metrics.items()}
        assert self._file is not None
        # One write call per line, flushed: a crash leaves at most one torn last line, which readers skip.
        line = json.dumps(rec) + "\n"
        try:
            self._file.write(line)
            self._file.flush()
        except OSError as exc:
            name = self._file.name
            why = write_failure_reason(exc, name, needed=len(line.encode()))
            # The unwritten line stays buffered, and close() (in train()'s `finally`) would fail again on it and
            # replace this error by a bare OSError: close the file now, ignoring that second failure.
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
            raise RunWriteError(f"writing {name} failed: {why}; earlier checkpoints are intact") from exc
        step = int(rec["step"])
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix({k.split("/")[-1]: rec.get(k) for k in ("reward/mean", "actor/pg_loss")
                                   if isinstance(rec.get(k), float)}, refresh=False)
        elif step % self.log_every == 0:
            self.info(_summary(rec))

    def info(self, message: str) -> None:
        """A message for the user (through tqdm when a bar is shown, so the bar is not broken)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _summary(rec: dict[str, Any]) -> str:
    def fmt(key: str, spec: str) -> str:
        v = rec.get(key)
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    return (f"step {rec['step']:>6}  reward {fmt('reward/mean', '.3f')}  pg_loss {fmt('actor/pg_loss', '+.4f')}  "
            f"entropy {fmt('actor/entropy', '.3f')}  grad_norm {fmt('actor/grad_norm', '.3f')}  "
            f"len {fmt('response/length_mean', '.1f')}  {fmt('timing/step_s', '.2f')}s")
