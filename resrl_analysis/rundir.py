"""The run-directory format (docs/RUN_DIRECTORY.md): paths, step names, checkpoint listing, JSONL, atomic writes,
the rollout fields and metric keys, and the one-writer lock.

Standard library only (no torch), so that the trainer, the probes, the figures and the notebooks all read and
write a run through this one module.

>>> import tempfile
>>> run = Path(tempfile.mkdtemp())
>>> step_dir(run, 12).relative_to(run).as_posix()
'checkpoints/step_000012'
>>> _ = atomic_write(run / METRICS, '{"step": 1}\\n')
>>> read_jsonl(run / METRICS)
[(1, {'step': 1})]
>>> with RunLock(run, "resrl train") as lock:
...     lock.path.name
'.lock'
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKPOINTS",
    "CONFIG",
    "LOCK",
    "METRICS",
    "METRIC_KEYS",
    "OPTIONAL_METRIC_KEYS",
    "PROBES",
    "PROMPTS",
    "PROMPTS_HELDOUT",
    "PROMPTS_TRAIN",
    "PROMPT_FIELDS",
    "ROLLOUTS",
    "ROLLOUT_FIELDS",
    "ROLLOUT_FIELDS_ADDED_LATER",
    "RUN_ENTRIES",
    "STEP_DIR",
    "STEP_FILE",
    "SUPERSEDED",
    "TENSORBOARD",
    "TMP_PREFIX",
    "TRAINER_STATE",
    "JsonlError",
    "RunLock",
    "RunLocked",
    "atomic_write",
    "atomic_write_json",
    "checkpoint_step",
    "fsync_dir",
    "iter_jsonl",
    "list_checkpoints",
    "list_rollouts",
    "move_aside",
    "parse_step",
    "read_jsonl",
    "rollout_path",
    "step_dir",
    "step_name",
]

# ----------------------------------------------------------------------------- names

CONFIG = "config.yaml"  #: the resolved TrainConfig
METRICS = "metrics.jsonl"  #: one JSON object per optimizer step
ROLLOUTS = "rollouts"  #: rollouts/step_XXXXXX.jsonl
CHECKPOINTS = "checkpoints"  #: checkpoints/step_XXXXXX/
PROBES = "probes"  #: what ``resrl probe`` writes
PROMPTS = "prompts"  #: prompts/heldout.jsonl, prompts/train.jsonl: the task's prompts, for probe sets
PROMPTS_HELDOUT = "prompts/heldout.jsonl"  #: held-out (validation) prompts with their reference responses
PROMPTS_TRAIN = "prompts/train.jsonl"  #: prompts of the training pool with their reference responses
TENSORBOARD = "tb"  #: TensorBoard events
SUPERSEDED = "superseded"  #: superseded/<UTC timestamp>/: what ``--resume-from`` moved aside
LOCK = ".lock"  #: held by the one process writing the directory; holds its PID
TRAINER_STATE = "trainer_state.pt"  #: inside a checkpoint: optimizer, scheduler, RNG states, counters
TMP_PREFIX = ".tmp"  #: temporary files and directories (debris after a crash)

#: Every entry a run directory may hold at its top level (documented in docs/RUN_DIRECTORY.md).
RUN_ENTRIES = (CONFIG, METRICS, ROLLOUTS, CHECKPOINTS, PROBES, PROMPTS, TENSORBOARD, SUPERSEDED, LOCK)

STEP_DIR = re.compile(r"^step_(\d{6})$")  #: a checkpoint directory name
STEP_FILE = re.compile(r"^step_(\d{6})\.jsonl$")  #: a rollout dump name

#: Keys of every metrics.jsonl line; None where a key does not apply to the run.
METRIC_KEYS = (
    "step", "reward/mean", "reward/std", "reward/zero_std_group_frac",
    "prompt/length_mean", "response/length_mean", "response/length_min", "response/length_max",
    "response/finished_frac",
    "actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/entropy", "actor/grad_norm", "actor/lr",
    "actor/param_norm", "actor/param_norm_ratio",
    "actor/advantage_mean", "actor/advantage_min", "actor/advantage_max",
    "resrl/weighted_token_frac", "resrl/weight_mean", "resrl/weight_q10", "resrl/weight_q50",
    "resrl/weight_q90",
    "nthr/downweighted_frac", "lld/batch_frac", "lld/batch_delta_mean", "lld/shared_token_delta_mean",
    "lld/unique_token_delta_mean", "lld/mixed_groups",
    "entropy/before_mean", "entropy/after_mean", "entropy/delta_mean", "entropy/delta_pos_mean",
    "entropy/delta_neg_mean", "entropy/cov", "entropy/cov_rank_corr", "entropy/pred_from_pos",
    "entropy/pred_from_neg", "entropy/pred_mean", "entropy/pred_rank_corr",
    "flips/rose_frac", "flips/fell_frac", "flips/pos_rose_frac", "flips/pos_fell_frac", "flips/neg_rose_frac",
    "flips/neg_fell_frac", "flips/shared_rose_frac", "flips/unique_rose_frac",
    *(f"flips/rose_frac_conf{k}" for k in range(10)),
    "flips/coupled_low_same_dir_frac", "flips/coupled_high_same_dir_frac", "flips/other_low_same_dir_frac",
    "flips/coupled_low_pairs",
    "drift/head_rel_update", "drift/body_rel_update", "drift/head_body_ratio", "drift/head_rel_level",
    "drift/head_jumps",
    "update/kl_k3", "update/pos_delta_mean", "update/pos_delta_per_kl", "update/neg_delta_mean",
    "update/neg_delta_per_kl", "update/collateral_mean", "update/push_down_mean", "update/selectivity_ratio",
    "update/selectivity_ratio_median", "update/collateral_per_kl", "update/push_down_shared",
    "update/push_down_first_divergent", "update/push_down_after", "update/mixed_groups", "update/groups",
    "resrl/weight_shared", "resrl/weight_first_divergent", "resrl/weight_after", "resrl/first_divergent_tokens",
    "timing/sample_s", "timing/rollout_s", "timing/update_s", "timing/step_s",
    "perf/tokens_per_s", "train/skipped_steps", "train/blowup_steps",
)

#: Keys written only when they apply: ``actor/kl`` (kl_coef > 0), ``actor/update_norm`` (blowup_update_norm > 0),
#: ``perf/peak_memory_gb`` (CUDA), ``val/reward_mean`` and ``val/pass@N`` (val_every > 0; N = val_n).
OPTIONAL_METRIC_KEYS = ("actor/kl", "actor/update_norm", "perf/peak_memory_gb", "val/reward_mean", "val/pass@N")

#: Fields of every line of rollouts/step_XXXXXX.jsonl, in order.
ROLLOUT_FIELDS = (
    "step", "group_id", "prompt_uid", "data_source", "prompt", "prompt_ids", "response", "response_ids",
    "ground_truth", "reward", "is_positive", "finished", "advantage", "token_advantages", "resrl_weights",
    "resrl_residuals", "nthr_weights", "nthr_scores", "token_logprobs", "token_entropies",
)
#: Fields of :data:`ROLLOUT_FIELDS` that dumps written before they existed lack: readers treat them as optional.
ROLLOUT_FIELDS_ADDED_LATER = ("token_logprobs", "token_entropies")

#: Fields of every line of prompts/heldout.jsonl and prompts/train.jsonl, in order.
PROMPT_FIELDS = (
    "uid", "data_source", "prompt", "prompt_ids", "ground_truth", "reference_response", "reference_ids",
)

# ----------------------------------------------------------------------------- paths


def step_name(step: int) -> str:
    """``step_XXXXXX`` (six digits).

    >>> step_name(7)
    'step_000007'
    """
    return f"step_{step:06d}"


def step_dir(run_dir: str | Path, step: int) -> Path:
    """``RUN_DIR/checkpoints/step_XXXXXX``.

    >>> step_dir("runs/a", 12).as_posix()
    'runs/a/checkpoints/step_000012'
    """
    return Path(run_dir) / CHECKPOINTS / step_name(step)


def rollout_path(run_dir: str | Path, step: int) -> Path:
    """``RUN_DIR/rollouts/step_XXXXXX.jsonl``.

    >>> rollout_path("runs/a", 3).as_posix()
    'runs/a/rollouts/step_000003.jsonl'
    """
    return Path(run_dir) / ROLLOUTS / f"{step_name(step)}.jsonl"


def parse_step(path: str | Path) -> int | None:
    """The step of a ``step_XXXXXX`` directory or ``step_XXXXXX.jsonl`` file name, else None.

    >>> parse_step("runs/a/checkpoints/step_000120"), parse_step("step_000003.jsonl"), parse_step("my-model")
    (120, 3, None)
    """
    name = Path(path).name
    m = STEP_DIR.match(name) or STEP_FILE.match(name)
    return int(m.group(1)) if m else None


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a checkpoint directory named ``step_XXXXXX``, else None (a ``.jsonl`` dump name is not one).

    >>> checkpoint_step("runs/a/checkpoints/step_000120"), checkpoint_step("step_000003.jsonl"), checkpoint_step("m")
    (120, None, None)
    """
    m = STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str | Path, *, with_trainer_state: bool = False) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, path)`` of a run, sorted by step; ``[]`` when there are none.

    Complete means a directory named ``step_XXXXXX``: writers fill a ``.tmp…`` sibling and rename it when done,
    so debris is ignored, as is anything else in the folder. ``with_trainer_state=True`` keeps only those that
    also hold ``trainer_state.pt`` (resumable; guards against a directory copied or edited by hand).

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> for n in ("step_000010", "step_000000", ".tmp-step_000020-x", "notes"):
    ...     (d / "checkpoints" / n).mkdir(parents=True)
    >>> [s for s, _ in list_checkpoints(d)], list_checkpoints(d, with_trainer_state=True)
    ([0, 10], [])
    """
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (not with_trainer_state or (p / TRAINER_STATE).is_file()):
            out.append((int(m.group(1)), p))
    return sorted(out)


def list_rollouts(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Rollout dumps ``(step, path)`` of a run, sorted by step (``.tmp`` debris ignored).

    >>> list_rollouts("/nonexistent")
    []
    """
    root = Path(run_dir) / ROLLOUTS
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_FILE.match(p.name)) and p.is_file())


# ----------------------------------------------------------------------------- reading


class JsonlError(ValueError):
    """A JSONL file is unreadable; the message is one line naming ``file:line``.

    ``path`` and ``line`` (0: the whole file) say where; ``cause`` is the ``UnicodeDecodeError`` or
    ``json.JSONDecodeError`` behind it, if any, for a caller that words its own message.
    """

    def __init__(self, message: str, *, path: Path, line: int = 0, cause: Exception | None = None) -> None:
        super().__init__(message)
        self.path, self.line, self.cause = path, line, cause


def iter_jsonl(path: str | Path, *, skip_invalid: bool = False, objects_only: bool = True) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for every non-blank line of a JSONL file, read one line at a time: the one JSONL
    reader (run directories, probe sets, the math task's data files).

    A line that is not UTF-8, not JSON or (with ``objects_only``) not an object raises :class:`JsonlError`
    naming ``file:line``, unless ``skip_invalid`` (then it is passed over). A missing file raises
    ``FileNotFoundError``.

    >>> import tempfile
    >>> f = Path(tempfile.mkdtemp()) / "a.jsonl"; _ = f.write_text('{"a": 1}\\n[2]\\n')
    >>> list(iter_jsonl(f, objects_only=False))
    [(1, {'a': 1}), (2, [2])]
    """
    path = Path(path)
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if skip_invalid:
                    continue
                raise JsonlError(f"{path}:{i}: not UTF-8", path=path, line=i, cause=e) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                if skip_invalid:
                    continue
                raise JsonlError(f"{path}:{i}: bad JSON ({type(e).__name__}: {str(e).splitlines()[0]})",
                                 path=path, line=i, cause=e) from None
            if objects_only and not isinstance(obj, dict):
                if skip_invalid:
                    continue
                raise JsonlError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}", path=path, line=i)
            yield i, obj


def read_jsonl(path: str | Path, *, skip_invalid: bool = False, nonempty: bool = False) -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of a JSONL file (:func:`iter_jsonl`, as a list).

    A line that is not UTF-8, not JSON or not an object raises :class:`JsonlError` naming ``file:line``, unless
    ``skip_invalid`` (the trainer's own append-only metrics, where a crash can leave one torn last line).
    ``nonempty``: a missing file or one without an object is a :class:`JsonlError` too (a probe set or a
    run's metrics that must hold something); otherwise a missing file raises ``FileNotFoundError``.

    >>> import tempfile
    >>> f = Path(tempfile.mkdtemp()) / "a.jsonl"; _ = f.write_text('{"a": 1}\\n\\n{"a": 2}\\n{"a"')
    >>> read_jsonl(f, skip_invalid=True)
    [(1, {'a': 1}), (3, {'a': 2})]
    >>> read_jsonl(f)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    resrl_analysis.rundir.JsonlError: ...a.jsonl:4: bad JSON (JSONDecodeError: Expecting ':' ...)
    """
    path = Path(path)
    if nonempty and not path.is_file():
        raise JsonlError(f"{path}: file not found", path=path)
    out = list(iter_jsonl(path, skip_invalid=skip_invalid))
    if nonempty and not out:
        raise JsonlError(f"{path}: empty file", path=path)
    return out


# ----------------------------------------------------------------------------- writing


def fsync_dir(path: Path) -> None:
    # Make a rename durable (best effort: not every platform/filesystem lets a directory be opened).
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: str | bytes, *, encoding: str = "utf-8") -> Path:
    """Write ``data`` (text or bytes) to ``path`` all or nothing, and return ``path``.

    The data goes to a temporary sibling (so the rename never crosses file systems), is fsynced and renamed onto
    ``path`` with ``os.replace``; on failure the temporary file is removed and ``path`` is untouched. The file
    gets the ordinary mode (0666 less the umask), like ``open(path, "w")``.

    >>> import tempfile
    >>> p = atomic_write(Path(tempfile.mkdtemp()) / "sub" / "a.txt", "hi")
    >>> p.read_text(), oct(p.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    ('hi', True)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TMP_PREFIX}-{path.name}-{uuid.uuid4().hex[:8]}"
    payload = data.encode(encoding) if isinstance(data, str) else bytes(data)
    try:
        # O_EXCL: a fresh file with the umask-respecting default mode (mkstemp would give 0600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 1) -> Path:
    """:func:`atomic_write` of ``obj`` as strict JSON (NaN and infinities refused).

    >>> import tempfile
    >>> atomic_write_json(Path(tempfile.mkdtemp()) / "s.json", {"a": [1, 2]}).read_text()
    '{\\n "a": [\\n  1,\\n  2\\n ]\\n}'
    """
    return atomic_write(path, json.dumps(obj, indent=indent, allow_nan=False))


def _umask() -> int:
    # Read without changing it for good (os.umask only sets); single-threaded callers (tests, doctests) only.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def move_aside(run_dir: str | Path, paths: list[Path], *, lines: dict[str, list[str]] | None = None) -> Path | None:
    """Move ``paths`` (inside ``run_dir``) into ``RUN_DIR/superseded/<UTC timestamp>/``, keeping their relative
    paths; ``lines`` adds files of text lines (e.g. superseded metrics). Nothing is deleted. Returns the folder,
    or None when there was nothing to move.

    >>> import tempfile
    >>> run = Path(tempfile.mkdtemp()); (run / "rollouts").mkdir(); _ = (run / "rollouts" / "a").write_text("x")
    >>> dest = move_aside(run, [run / "rollouts" / "a"], lines={"metrics.jsonl": ['{"step": 3}']})
    >>> sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    ['metrics.jsonl', 'rollouts/a']
    """
    run = Path(run_dir)
    if not paths and not any((lines or {}).values()):
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = run / SUPERSEDED / stamp
    n = 1
    while dest.exists():  # two recoveries within one second
        n += 1
        dest = run / SUPERSEDED / f"{stamp}-{n}"
    dest.mkdir(parents=True)
    for p in paths:
        target = dest / Path(p).relative_to(run)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(p), str(target))
    for name, text in (lines or {}).items():
        if text:
            atomic_write(dest / name, "".join(x.rstrip("\n") + "\n" for x in text))
    return dest


# ----------------------------------------------------------------------------- one writer per directory


class RunLocked(RuntimeError):
    """Another live process holds the directory's lock (the message names its PID)."""


_held: dict[str, list[Any]] = {}  # realpath of the lock file -> [fd, depth]: re-entrant within a process
_held_guard = threading.Lock()


class RunLock:
    """An OS lock (``fcntl.flock``) on ``DIR/.lock``: one writing process per directory.

    The kernel drops the lock when the holder exits, however it exits (SIGKILL included), so a crash never leaves
    a stale lock (only the file, holding the dead holder's PID; a release removes it). ``acquire`` raises
    :class:`RunLocked` with a one-line message naming the PID of the live holder. Re-entrant within one process.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> with RunLock(d, "resrl train"), RunLock(d, "resrl train"):  # re-entrant
    ...     int((d / ".lock").read_text().split()[0]) == os.getpid()
    True
    >>> (d / ".lock").exists()
    False
    """

    def __init__(self, directory: str | Path, what: str = "resrl") -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK
        self.what = what
        self._key: str | None = None

    def acquire(self) -> RunLock:
        """Take the lock (creating the directory if needed); raises :class:`RunLocked` or ``OSError``."""
        import fcntl  # POSIX only; imported here so that reading a run works everywhere

        self.directory.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path)
        with _held_guard:
            if key in _held:
                _held[key][1] += 1
                self._key = key
                return self
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    os.close(fd)
                    if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                    raise RunLocked(f"{self.directory} is in use by another process ({self._holder()}); wait for "
                                    "it to finish or stop it (a killed process releases the lock)") from None
                # The holder removes the file when it is done: a lock won on a file already unlinked guards
                # nothing, so take it again on the file now at the path.
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {self.what}\n".encode())
            _held[key] = [fd, 1]
            self._key = key
        return self

    def release(self) -> None:
        """Drop this hold; the OS lock goes with the last one."""
        if self._key is None:
            return
        with _held_guard:
            entry = _held.get(self._key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] == 0:
                    # Remove the file while still holding the lock (acquire re-checks the path), so that a run
                    # that ended leaves no lock file; one killed leaves the file but never a lock.
                    with contextlib.suppress(OSError):
                        os.unlink(self.path)
                    os.close(entry[0])  # closing the descriptor releases the flock
                    del _held[self._key]
        self._key = None

    def _holder(self) -> str:
        try:
            text = self.path.read_text(encoding="utf-8").split(maxsplit=1)
        except OSError:
            text = []
        if not text:
            return "PID unknown"
        return f"PID {text[0]}, {text[1].strip()}" if len(text) > 1 else f"PID {text[0]}"

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
