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

from resrl_analysis.rundir import CONFIG, METRIC_KEYS, METRICS, ROLLOUT_FIELDS, atomic_write, read_jsonl

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
    p = Path(path)
    if not p.is_file():
        return []
    return [rec for _, rec in read_jsonl(p, skip_invalid=True) if "step" in rec]


def truncate_metrics(path: str | Path, max_step: int) -> list[dict[str, Any]]:
    """Keep the lines with ``step <= max_step`` (and drop torn ones), atomically; returns the lines removed.

    After a resume from checkpoint ``max_step`` the steps beyond it are re-run, so their old lines go.
    """
    p = Path(path)
    if not p.is_file():
        return []
    seen: set[int] = set()
    kept, removed = [], []
    for rec in read_metrics(p):
        s = int(rec["step"])
        if s <= max_step and s not in seen:
            seen.add(s)
            kept.append(rec)
        else:
            removed.append(rec)
    atomic_write(p, "".join(json.dumps(r) + "\n" for r in kept))
    return removed


def write_rollouts(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write one JSON object per response (fields :data:`ROLLOUT_FIELDS`), atomically."""
    p = Path(path)
    text = "".join(json.dumps({k: _clean(r[k]) for k in ROLLOUT_FIELDS}, ensure_ascii=False) + "\n" for r in rows)
    try:
        atomic_write(p, text)
    except OSError as exc:
        why = write_failure_reason(exc, p, needed=len(text.encode()))
        raise RunWriteError(f"writing {p} failed: {why}; earlier checkpoints are intact") from exc


class MetricsLog:
    """Appends one JSON line per step to ``metrics.jsonl``, mirrors scalars to the trackers of ``report_to``
    (trainer/loggers.py), and shows a tqdm bar (interactive) or prints a summary line every ``log_every`` steps.

    Args:
        run_dir: the run directory.
        enabled: False on ranks other than 0: every method is then a no-op.
        progress: show a tqdm progress bar.
        tensorboard: deprecated switch: False drops TensorBoard from the trackers.
        report_to: trackers (``tensorboard``, ``wandb``, ``trackio``, ``mlflow``); None = the ``report_to``
            of the run's ``config.yaml`` (the trainer writes it first), else TensorBoard as ``tensorboard`` says.
            A tracker whose package is missing is a ``LoggerUnavailable`` error.
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
        report_to: Sequence[str] | None = None,
    ) -> None:
        self.enabled = enabled
        self.log_every = log_every
        self._file = None
        self._loggers: list[Any] = []  # trainer.loggers objects: log(scalars, step), close()
        self._bar = None
        if not enabled:
            return
        run = Path(run_dir)
        self._file = open(run / METRICS, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        from trainer.loggers import make_loggers

        run_config = _saved_config(run)
        if report_to is None:
            report_to = run_config.get("report_to", ["tensorboard"])
        if not tensorboard:
            report_to = [x for x in report_to if x != "tensorboard"]
        try:
            self._loggers = make_loggers(report_to, run, config=run_config, start_step=start_step)
        except BaseException:
            self.close()
            raise
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
        if self._loggers:
            from trainer.loggers import scalars

            values = scalars(rec)
            for lg in self._loggers:
                lg.log(values, step)
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
        loggers, self._loggers = self._loggers, []
        for lg in loggers:
            lg.close()
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _saved_config(run: Path) -> dict[str, Any]:
    """The run's resolved settings from its config.yaml ({} when there is none or it does not parse)."""
    import yaml

    try:
        data = yaml.safe_load((run / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _summary(rec: dict[str, Any]) -> str:
    def fmt(key: str, spec: str) -> str:
        v = rec.get(key)
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    return (f"step {rec['step']:>6}  reward {fmt('reward/mean', '.3f')}  pg_loss {fmt('actor/pg_loss', '+.4f')}  "
            f"entropy {fmt('actor/entropy', '.3f')}  grad_norm {fmt('actor/grad_norm', '.3f')}  "
            f"len {fmt('response/length_mean', '.1f')}  {fmt('timing/step_s', '.2f')}s")
