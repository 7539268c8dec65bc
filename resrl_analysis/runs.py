"""Find the checkpoints, metrics and rollout dumps of a run, whoever wrote it (docs/FOREIGN_RUNS.md).

:func:`discover_run` recognises

- our run directory: ``checkpoints/step_XXXXXX/``, ``metrics.jsonl``, ``rollouts/step_XXXXXX.jsonl``;
- a TRL output directory: ``checkpoint-N/`` (step N), metrics from the newest checkpoint's
  ``trainer_state.json`` ``log_history``, completion logs ``completions/completions_NNNNN.parquet``;
- a verl checkpoint directory: ``global_step_N/actor/huggingface/`` with merged HF weights, or raw FSDP shards
  ``global_step_N/actor/model_world_size_W_rank_R.pt`` beside a config-only ``huggingface/`` (read without a merge
  step, :mod:`resrl_analysis.verl_shards`); otherwise a one-line error giving the ``verl.model_merger`` command;
- a verl target directory of merged checkpoints: ``global_step_N/`` itself when it is a plain HF folder (what
  ``verl.model_merger`` writes to a target directory of one folder per step);
- a TRL output directory that saved only its final model at the root, beside ``completions/`` (with a note
  saying what is missing);
- one Hugging Face checkpoint folder, or an explicit ordered list of them.

``base_model`` adds the starting policy as step 0 where the run did not save it (TRL and verl never
do), so LLD against the start works on every kind. Probe outputs go to ``<dir>/probes`` for a
directory (as for ours) and to ``<common parent>/probes`` for a list.

Standard library only: nothing here builds a model.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for n in (10, 2):
    ...     (d / f"checkpoint-{n}").mkdir(); _ = (d / f"checkpoint-{n}" / "config.json").write_text("{}")
    >>> run = discover_run(d, base_model=d / "checkpoint-2")
    >>> run.kind, run.steps, run.probes_dir == d / "probes"
    ('trl', (0, 2, 10), True)
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from . import rundir
from .errors import ProbeError
from .rundir import checkpoint_step
from .verl_shards import SHARD_FILE, verl_merger_command

__all__ = ["RunInfo", "RunKind", "discover_run", "foreign_step", "run_checkpoints", "verl_merge_command"]

RunKind = Literal["resrl", "trl", "verl", "checkpoints", "checkpoint"]

_TRL_DIR = re.compile(r"^checkpoint-(\d+)$")
_VERL_DIR = re.compile(r"^global_step_(\d+)$")
_TRL_COMPLETIONS = re.compile(r"^completions_(\d+)\.parquet$")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class RunInfo:
    """A run as the probes see it.

    ``checkpoints``: ordered (step, path), the starting policy first when known; ``metrics``: one
    dict per logged step (each with a ``step`` key); ``probe_set_sources``: rollout or completion
    dumps found in the run, oldest first (the default probe set is the first); ``probes_dir``: where
    ``resrl probe`` writes and ``resrl figures`` reads.
    """

    kind: RunKind
    path: Path
    checkpoints: tuple[tuple[int, Path], ...]
    metrics: tuple[dict, ...] = ()
    probe_set_sources: tuple[Path, ...] = ()
    probes_dir: Path = Path(rundir.PROBES)
    base_model: Path | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(s for s, _ in self.checkpoints)


def foreign_step(path: str | Path) -> int | None:
    """The step in a checkpoint folder's name: ``step_XXXXXX`` (ours), ``checkpoint-N`` (TRL),
    ``global_step_N`` (verl, also for its ``actor/huggingface`` sub-folder); else None.

    >>> foreign_step("out/checkpoint-40"), foreign_step("ck/global_step_5/actor/huggingface"), foreign_step("m")
    (40, 5, None)
    """
    p = Path(path)
    for part in (p, *p.parents[:3]):
        if (s := checkpoint_step(part)) is not None:
            return s
        m = _TRL_DIR.match(part.name) or _VERL_DIR.match(part.name)
        if m:
            return int(m.group(1))
    return None


def verl_merge_command(step_dir: str | Path) -> str:
    """The command that turns a verl FSDP actor checkpoint into HF weights under ``actor/huggingface``
    (:func:`resrl_analysis.verl_shards.verl_merger_command` of its ``actor/``).

    >>> verl_merge_command("ck/global_step_5").split()[-4:]
    ['--local_dir', 'ck/global_step_5/actor', '--target_dir', 'ck/global_step_5/actor/huggingface']
    """
    return verl_merger_command(Path(step_dir) / "actor")


def _has_weights(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / w).exists() for w in _WEIGHTS)


def _has_raw_shards(actor: Path) -> bool:
    """verl's raw FSDP model shards in ``actor`` (``model_world_size_W_rank_R.pt``)."""
    return actor.is_dir() and any(SHARD_FILE.match(f.name) for f in actor.iterdir())


def _numbered(root: Path, pattern: re.Pattern) -> list[tuple[int, Path]]:
    out = [(int(m.group(1)), p) for p in root.iterdir() if (m := pattern.match(p.name)) and p.is_dir()]
    return sorted(out)


def _trl_metrics(ckpts: list[tuple[int, Path]]) -> tuple[dict, ...]:
    # Each checkpoint's trainer_state.json holds the whole log history so far: the newest suffices.
    for _, p in reversed(ckpts):
        f = p / "trainer_state.json"
        if f.is_file():
            try:
                state = json.loads(f.read_text(encoding="utf-8"))
            except ValueError as e:
                raise ProbeError(f"{f}: not valid JSON ({e})") from None
            return tuple(dict(r) for r in state.get("log_history", []) if isinstance(r, dict) and "step" in r)
    return ()


def _with_base(ckpts: list[tuple[int, Path]], base_model: Path | None, where: Path) -> list[tuple[int, Path]]:
    if base_model is None:
        return ckpts
    if not (base_model / "config.json").is_file():
        raise ProbeError(f"{base_model}: --base-model is not a checkpoint directory (no config.json)")
    if ckpts and ckpts[0][0] <= 0:
        raise ProbeError(f"{where}: already has a step-0 checkpoint ({ckpts[0][1]}); drop --base-model")
    return [(0, base_model), *ckpts]


def _single(path: Path) -> RunInfo | None:
    root = Path(path)
    if (root / rundir.CHECKPOINTS).is_dir():
        ckpts = rundir.list_checkpoints(root)
        if not ckpts:
            raise ProbeError(f"{root / rundir.CHECKPOINTS}: no complete checkpoint (step_XXXXXX)")
        metrics, notes = (), ()
        if (root / rundir.METRICS).is_file():
            try:
                metrics = tuple(o for _, o in rundir.read_jsonl(root / rundir.METRICS, nonempty=True))
            except rundir.JsonlError as e:  # damaged metrics do not stop the probes, which never read them
                notes = (f"metrics not read: {e}",)
        dumps = [p for _, p in rundir.list_rollouts(root)]
        return RunInfo("resrl", root, tuple(ckpts), metrics, tuple(dumps), root / rundir.PROBES, notes=notes)
    if not root.is_dir():
        raise ProbeError(f"{root}: no such directory")
    trl = _numbered(root, _TRL_DIR)
    comp = root / "completions"
    logs = sorted((int(m.group(1)), f) for f in comp.iterdir() if (m := _TRL_COMPLETIONS.match(f.name))) \
        if comp.is_dir() else []
    if trl:
        return RunInfo("trl", root, tuple(trl), _trl_metrics(trl), tuple(f for _, f in logs), root / rundir.PROBES)
    verl = _numbered(root, _VERL_DIR)
    if verl:
        ckpts = []
        for step, p in verl:
            # The merger's own target (a plain HF folder per global_step_N), else actor/huggingface inside it; raw
            # FSDP shards (model_world_size_W_rank_R.pt) beside a config-only huggingface/ are read as they are
            # (resrl_analysis.verl_shards); without any of them, the one line names verl's merger.
            hf = p if _has_weights(p) else p / "actor" / "huggingface"
            if not _has_weights(hf) and not ((hf / "config.json").is_file() and _has_raw_shards(p / "actor")):
                raise ProbeError(f"{hf}: no merged Hugging Face weights nor raw model shards; run: "
                                 f"{verl_merge_command(p)}")
            ckpts.append((step, hf))
        return RunInfo("verl", root, tuple(ckpts), probes_dir=root / rundir.PROBES)
    if logs and (root / "config.json").is_file():
        # A TRL output directory that kept only its final model (trainer.save_model) beside the completion logs.
        step = max((int(m.get("step", 0)) for m in _trl_metrics([(0, root)])), default=logs[-1][0])
        note = (f"{root}: a TRL run with its final model at the root and no checkpoint-N/: only the final model (step "
                f"{step}) is probed; train with save_steps (GRPOConfig) to probe over steps, and give --base-model "
                "(the starting policy) to measure LLD from the start")
        return RunInfo("trl", root, ((step, root),), _trl_metrics([(0, root)]), tuple(f for _, f in logs),
                       root / rundir.PROBES, notes=(note,))
    if logs:
        raise ProbeError(f"{root}: a TRL output directory with completion logs but no model (no checkpoint-N/, no "
                         "final model at the root): train with save_steps (GRPOConfig) to keep checkpoints, or give "
                         f"the checkpoints as a list with --base-model BASE and --probe-set {comp}")
    if (root / "config.json").is_file():
        return RunInfo("checkpoint", root, ((foreign_step(root) or 0, root),), probes_dir=root / rundir.PROBES)
    return None


def run_checkpoints(run: str | Path | Sequence[str | Path], *, base_model: str | Path | None = None
                    ) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint of any run: ours, a TRL output directory (``checkpoint-N``),
    a verl one (``global_step_N/actor/huggingface``), one checkpoint or an ordered list of them;
    ``base_model`` adds the starting policy as step 0 (:func:`discover_run`, checkpoints only). A path
    that is none of these is a one-line :class:`~resrl_analysis.errors.ProbeError`.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for n in ("checkpoint-3", "checkpoint-1"):
    ...     (d / n).mkdir(); _ = (d / n / "config.json").write_text("{}")
    >>> [s for s, _ in run_checkpoints(d)]
    [1, 3]
    """
    return list(discover_run(run, base_model=base_model).checkpoints)


def discover_run(paths: str | Path | Sequence[str | Path], *, base_model: str | Path | None = None) -> RunInfo:
    """Describe the run at ``paths``: one run directory (ours, TRL, verl), one checkpoint, or an
    ordered list of checkpoint folders.

    A list keeps its order; its steps are those in the folder names when every name has one and
    they increase, else 1, 2, ... (0, 1, ... without ``base_model``).

    Raises:
        ProbeError: a path that is none of these (one line naming it and what was expected).
    """
    items = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    base = Path(base_model) if base_model is not None else None
    if not items:
        raise ProbeError("no run directory or checkpoint given")
    if len(items) == 1:
        info = _single(items[0])
        if info is None:
            raise ProbeError(f"{items[0]}: not a run directory (checkpoints/step_XXXXXX, TRL checkpoint-N/, verl "
                             "global_step_N/actor/huggingface/) nor a checkpoint (config.json)")
        ckpts, kind = list(info.checkpoints), info.kind
        if kind == "checkpoint" and base is not None:  # base + one checkpoint: a two-step run
            kind, ckpts = "checkpoints", [(max(ckpts[0][0], 1), ckpts[0][1])]
        ckpts = _with_base(ckpts, base, info.path)
        return RunInfo(kind, info.path, tuple(ckpts), info.metrics, info.probe_set_sources, info.probes_dir, base,
                       info.notes)
    for p in items:
        if not (p / "config.json").is_file():
            raise ProbeError(f"{p}: not a checkpoint directory (no config.json); a list takes checkpoint folders")
    named = [foreign_step(p) for p in items]
    first = 1 if base is not None else 0
    if all(s is not None for s in named) and all(a < b for a, b in zip(named, named[1:])) and named[0] >= first:
        steps = [int(s) for s in named]  # type: ignore[arg-type]
    else:
        steps = list(range(first, first + len(items)))
    ckpts = _with_base(list(zip(steps, items)), base, items[0])
    parents = [p.resolve().parent for p in items]
    common = parents[0]
    while not all(common == q or common in q.parents for q in parents):
        common = common.parent
    # Checkpoints of one TRL run: its completion logs are still the natural probe sets.
    comp = common / "completions"
    logs = sorted((int(m.group(1)), f) for f in comp.iterdir() if (m := _TRL_COMPLETIONS.match(f.name))) \
        if comp.is_dir() else []
    return RunInfo("checkpoints", common, tuple(ckpts), probe_set_sources=tuple(f for _, f in logs),
                   probes_dir=common / rundir.PROBES, base_model=base)
