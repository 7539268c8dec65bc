"""``resrl probe RUN_DIR``: every registered probe over a run's checkpoints → tables + ``summary.json``.

The pass is **plan → per-checkpoint pass → write**. Everything is checked before any work (checkpoint files,
tokenizers, the probe set, the output directory, the memory plan); then each selected checkpoint is loaded once
and probed by a :class:`~resrl_analysis.probes.engine.ProbePass` (one teacher-forced forward per probe group
feeds every probe; the costly parts, the whole-model gradients and sampling for pass@k, run on a subset of
checkpoints, by default the first and the last); the results are written only at the end, as one set
(:func:`~resrl_analysis.probes.output.write_results`), so a failure leaves no partial table. Output, under
``RUN_DIR/probes`` or ``--out``: one saved result per probe table (``scores/ lld/ first_order/ interference/
subspace/ diversity/`` for the built-in probes) and ``summary.json`` (headline numbers, skips, timings).

Read them back with :func:`resrl_analysis.results.load_results`.

Under ``torchrun --nproc_per_node=N`` (several machines: torchrun's own flags), or with ``--nproc N`` which
launches torchrun itself, the same command runs on every rank (:mod:`resrl_analysis.probes.parallel`): rank 0 checks
the inputs, holds the output directory's lock, plans (per rank: a whole copy of the model each, or the model sharded
with FSDP2 when a copy does not fit) and tells the others; each rank probes its share of the groups; rank 0 gathers
and writes. A rank that fails ends with one line naming it and the cause, and the others stop (exit non-zero); since
only rank 0 writes, and only after every rank's results are in, nothing is half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import rundir
from ..checkpoints import check_compatible, import_model_code, load_checkpoint, load_tokenizer
from ..distributed import (
    DistContext,
    barrier,
    broadcast_object,
    device_mesh,
    exit_if_launched,
    init_wrapped,
    setup_distributed,
    teardown_distributed,
    wrap_model,
)
from ..errors import ProbeError
from ..plan import MemoryPlan, ProbeShape, check_plan, plan_for_config
from ..probe_sets import ProbeSet, from_run_prompts, load_probe_set
from ..results import LLDResult, ProbeResult, ScoresResult, to_jsonable
from ..rundir import RunLock, RunLocked
from ..runs import RunInfo, discover_run
from .capture import forward_group, pad_id_of
from .config import ProbeConfig, add_probe_arguments, config_from_args, config_to_argv, probe_set_keyword
from .engine import ProbePass
from .lld import lld_between, scores_from_forwards
from .output import probe_set_hash, results_summary, saved_tables, write_results
from .parallel import Parallel
from .registry import REGISTRY

__all__ = ["PROBES", "Selection", "add_probe_arguments", "run_probe", "probe_checkpoints", "launch_torchrun", "main"]

#: The built-in probes (the registry holds them and any registered since: :data:`.registry.REGISTRY`).
PROBES = tuple(REGISTRY)


@dataclass(frozen=True)
class Selection:
    """The checkpoints a pass probes: ``mode`` (``run`` for ours, ``trl``, ``verl``, ``checkpoints`` or
    ``checkpoint``), the run as discovered, and the selected (step, path) pairs in order."""

    mode: str
    run: RunInfo
    checkpoints: list[tuple[int, Path]]

    @property
    def run_dir(self) -> Path:
        return self.run.path

    @property
    def steps(self) -> list[int]:
        return [s for s, _ in self.checkpoints]


def run_probe(args: argparse.Namespace | ProbeConfig) -> int:
    """Run ``resrl probe`` with parsed arguments (or a :class:`ProbeConfig`); returns the exit code (2 on bad
    input, with one line on stderr; 1 when writing failed, earlier results untouched).

    Torch's thread count is restored on return.

    >>> import tempfile
    >>> from resrl_analysis.probes.synthetic import write_fake_run
    >>> run = write_fake_run(tempfile.mkdtemp(), steps=(0, 1))
    >>> main([str(run), "--probes", "lld", "--no-progress", "--quiet"])
    0
    """
    threads = torch.get_num_threads()
    try:
        config = args if isinstance(args, ProbeConfig) else config_from_args(args)
        return _run(config)
    except ProbeError as e:
        print(f"resrl probe: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions: one line, earlier results untouched
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"resrl probe: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)  # callable in-process (notebooks, tests): leave torch as found


def _say(config: ProbeConfig):
    """``print`` for the informational lines (stdout), silenced by ``--quiet``."""
    return (lambda *a, **k: None) if config.quiet else print


def _world() -> int:
    """The ranks of the torchrun job this process belongs to (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _run(config: ProbeConfig) -> int:
    t_start = time.perf_counter()
    if _world() > 1:
        return _run_rank(config, t_start)
    if config.nproc > 1 and not config.plan_only:
        return launch_torchrun(config)
    sel = select_checkpoints(config)
    for note in sel.run.notes:  # what discovery could not find, and how to get it
        _say(config)(f"resrl probe: note: {note}")
    if config.plan_only:  # config.json only: no weights are read
        return plan_only(config, sel)
    if config.parallel == "shard":
        raise ProbeError("--parallel shard needs several processes: torchrun --nproc_per_node=N ... or --nproc N")
    check_compatible([p for _, p in sel.checkpoints])
    if probe_set_keyword(config) == "batch":
        return run_batch(config, sel, t_start)
    probe_set = pass_probe_set(config, sel)
    say_tokens(config, probe_set)
    out: Path = config.out or sel.run.probes_dir
    _check_writable(out)
    # One writer per output directory: a second `resrl probe` on it is refused (the kernel drops the lock when
    # this process ends, however it ends).
    try:
        lock = RunLock(out, "resrl probe").acquire()
    except RunLocked as e:
        raise ProbeError(str(e)) from None
    try:
        return probe_and_write(config, sel, probe_set, out, t_start)
    finally:
        lock.release()


def probe_and_write(config: ProbeConfig, sel: Selection, probe_set: ProbeSet, out: Path, t_start: float) -> int:
    """Plan, probe every selected checkpoint, write the set (the output directory is locked by the caller)."""
    device = _device(config.device)
    plan = plan_pass(config, sel, probe_set, device)
    pp = probe_checkpoints(config, sel, probe_set, device=device, group_batch=plan.group_batch)
    return write_pass(config, sel, probe_set, pp, out, t_start)


def write_pass(config: ProbeConfig, sel: Selection, probe_set: ProbeSet, pp: ProbePass, out: Path,
               t_start: float) -> int:
    """Write a finished pass's results and ``summary.json`` under ``out`` as one set (rank 0 under torchrun)."""
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    probe_set_info = {**probe_set.describe(), "sha256": probe_set_hash(probe_set)}
    common = {"run_dir": str(sel.run_dir), "probe_set": probe_set_info, "steps": sel.steps, "created": created}
    results = {name: res.with_meta(**common) for name, res in pp.results().items()}
    summary, stale = _summary(config, sel, pp, results, out, probe_set_info, created)
    pp.timing["total"] = time.perf_counter() - t_start
    write_results(out, results, summary, format=config.format, remove=[s["table"] for s in stale])
    say_not_computed(config, results)
    ranks = "" if pp.parallel.world == 1 else f" on {pp.parallel.world} ranks ({pp.parallel.mode})"
    _say(config)(f"resrl probe: wrote {', '.join(sorted(results))} for {len(sel.steps)} checkpoint(s){ranks} to "
                 f"{out} (summary: {out / 'summary.json'})")
    return 0


# ----------------------------------------------------------------------------- torchrun: the ranks


def _rank_device(spec: str) -> str:
    """``setup_distributed``'s device for ``--device`` (each rank takes the GPU of its local rank)."""
    if spec == "auto":
        return "auto"
    if spec.startswith("cuda"):
        return "cuda"
    if spec == "cpu":
        return "cpu"
    raise ProbeError(f"--device {spec!r} under torchrun: use auto, cpu or cuda (each rank takes its local GPU)")


def _is_collective_failure(e: BaseException) -> bool:
    """Whether ``e`` says a collective failed because another rank went away (gloo's closed connection, NCCL)."""
    names = {type(c).__name__ for c in type(e).__mro__}
    text = str(e)
    return bool(names & {"DistError", "DistBackendError", "DistNetworkError", "DistStoreError"}) or any(
        k in text for k in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo", "NCCL",
                            "Socket Timeout", "recvValue", "Timed out"))


def _cause(e: BaseException) -> str:
    """One line saying why a rank stopped."""
    if isinstance(e, ProbeError):
        return str(e)
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if _is_collective_failure(e):
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return f"stopped: another rank ended, a collective failed ({first})"
    if isinstance(e, OSError):
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return f"{where}{e.strerror or e}"
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _failure_line(rank: int, world: int, e: BaseException) -> str:
    """The one line a failing rank ends with: its rank and the cause.

    >>> _failure_line(1, 2, RuntimeError("boom"))
    'resrl probe: error: rank 1 of 2: RuntimeError: boom'
    """
    return f"resrl probe: error: rank {rank} of {world}: {_cause(e)}"


def _end_rank(code: int) -> None:
    """Leave now with ``code``: flush, and skip the teardown and finalisation that could wait on ranks gone or
    stuck in a collective."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


def _run_rank(config: ProbeConfig, t_start: float) -> int:
    """One rank of ``resrl probe`` under torchrun; returns (or, on failure, exits with) its status."""
    rank, world = int(os.environ.get("RANK", "0")), _world()

    def on_term(signum: int, frame: object) -> None:  # torchrun stops the others when a rank fails
        print(f"resrl probe: error: rank {rank} of {world}: stopped by the launcher "
              f"({signal.Signals(signum).name}: another rank failed or the job was cancelled)", file=sys.stderr)
        _end_rank(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        if config.plan_only:  # rank 0 prints the plan; no process group, no weights
            code = plan_only(config, select_checkpoints(config), nproc=world) if rank == 0 else 0
            return exit_if_launched(code)
        ctx = setup_distributed(_rank_device(config.device), "on")
    except BaseException as e:  # noqa: BLE001 - one line naming the rank, whatever it is
        print(_failure_line(rank, world, e), file=sys.stderr)
        _end_rank(2 if isinstance(e, ProbeError) else 1)
    try:
        code = _rank_pass(config, ctx, t_start)
    except BaseException as e:  # noqa: BLE001
        print(_failure_line(ctx.rank, ctx.world_size, e), file=sys.stderr)
        _end_rank(2 if isinstance(e, ProbeError) else 1)
    teardown_distributed(ctx)
    return exit_if_launched(code)


def _rank_pass(config: ProbeConfig, ctx: DistContext, t_start: float) -> int:
    """Rank 0 checks everything, locks the output directory and plans, then tells every rank; all probe; rank 0
    writes; every rank returns rank 0's status."""
    lock, prepared = None, None
    if ctx.is_main:
        try:
            sel = select_checkpoints(config)
            check_compatible([p for _, p in sel.checkpoints])
            if probe_set_keyword(config) == "batch":
                raise ProbeError("--probe-set batch runs in one process (drop torchrun and --nproc)")
            probe_set = pass_probe_set(config, sel)
            say_tokens(config, probe_set)
            out: Path = config.out or sel.run.probes_dir
            _check_writable(out)
            try:
                lock = RunLock(out, "resrl probe").acquire()
            except RunLocked as e:
                raise ProbeError(str(e)) from None
            plan = plan_pass(config, sel, probe_set, str(ctx.device), nproc=ctx.world_size)
            prepared = {"sel": sel, "probe_set": probe_set, "out": out, "group_batch": plan.group_batch,
                        "parallel": plan.parallel}
        except (ProbeError, OSError) as e:  # the inputs are the same for every rank: one line, from rank 0
            if lock is not None:
                lock.release()
            print(f"resrl probe: error: {_cause(e)}", file=sys.stderr)
            prepared = {"error": 2 if isinstance(e, ProbeError) else 1}
    prepared = broadcast_object(prepared, ctx)
    if "error" in prepared:
        return int(prepared["error"])
    sel, probe_set, out = prepared["sel"], prepared["probe_set"], prepared["out"]
    ctx.use_fsdp = prepared["parallel"] == "shard"
    par = Parallel(ctx, prepared["parallel"])
    code = 0
    try:
        pp = probe_checkpoints(config, sel, probe_set, device=str(ctx.device), group_batch=prepared["group_batch"],
                               parallel=par)
        if ctx.is_main:
            try:
                code = write_pass(config, sel, probe_set, pp, out, t_start)
            except OSError as e:  # disk full, permissions: one line, earlier results untouched
                print(_failure_line(0, ctx.world_size, e), file=sys.stderr)
                code = 1
    finally:
        if lock is not None:
            lock.release()
    return int(broadcast_object(code, ctx))


# ----------------------------------------------------------------------------- --nproc: launching torchrun

#: torchrun's own log lines (``E1207 07:31:13.333000 123 torch/distributed/...] ...``) and its OMP banner.
_TORCHRUN_LOG = re.compile(r"^[DIWEC]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ .*\] ")
_BANNER = re.compile(r"^\*{5,}$|^Setting OMP_NUM_THREADS environment variable")
_ROOT_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")
_ROOT_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")


def launch_torchrun(config: ProbeConfig, *, entry: Sequence[str] = ("-m", "resrl_analysis.probes.runner")) -> int:
    """``resrl probe --nproc N``: this command again as N ranks under ``python -m torch.distributed.run --standalone
    --nproc_per_node=N`` on this machine. The ranks' output passes through; torchrun's own log lines and its
    failure report are replaced by one line naming the rank that failed first and how (when that rank could not say
    it itself: killed by a signal). Returns 0, 2 (bad input: every rank refused it) or 1. ``entry``: what each rank
    runs (a script that registers more probes first, as the tests do)."""
    n = config.nproc
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           *entry, *config_to_argv(replace(config, nproc=1))]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
    assert proc.stderr is not None
    said: set[int] = set()  # ranks that printed their own failure line
    failed: list[list[int]] = []  # [rank, exit code] of each failure torchrun reports, the root cause first
    state, held, root = "pass", [], False  # "pass" | "traceback" (held until its exception line) | "report"
    for line in proc.stderr:
        if state == "report":
            root = root or line.startswith("Root Cause")
            if m := _ROOT_RANK.match(line):
                failed.insert(0 if root else len(failed), [int(m.group(1))])
            elif (m := _ROOT_EXIT.match(line)) and failed:
                (failed[0] if root else failed[-1]).append(int(m.group(1)))
            continue
        if state == "traceback":
            held.append(line)
            if line[:1].isspace() or not line.strip():
                continue
            # The exception line ends the traceback: torchrun's own (a rank failed) is dropped, any other shown.
            state = "report" if "ChildFailedError" in line else "pass"
            if state == "pass":
                sys.stderr.writelines(held)
            held = []
            continue
        if line.startswith("Traceback (most recent call last):"):
            state, held = "traceback", [line]
            continue
        if _TORCHRUN_LOG.match(line) or _BANNER.match(line.strip()):
            continue
        if m := re.match(r"resrl probe: error: rank (\d+) of", line):
            said.add(int(m.group(1)))
        sys.stderr.write(line)
    sys.stderr.writelines(held)
    rc = proc.wait()
    if rc == 0:
        return 0
    codes = [f[1] for f in failed if len(f) == 2]
    refused = bool(codes) and all(c == 2 for c in codes)  # every rank refused the input (rank 0 said why)
    for rank, code in (f for f in failed if len(f) == 2):
        if rank in said or refused:
            continue
        signals = {s.value: s.name for s in signal.Signals}
        how = f"was killed by {signals[-code]}" if -code in signals else f"ended with exit code {code}"
        print(f"resrl probe: error: rank {rank} of {n} {how}; the other ranks were stopped", file=sys.stderr)
        said.add(rank)
    return 2 if refused else 1


def plan_pass(config: ProbeConfig, sel: Selection, probe_set: ProbeSet, device: str, *, nproc: int = 1) -> MemoryPlan:
    """The memory plan of the pass (per rank for ``nproc`` ranks), printed, before any model is loaded: it picks the
    group batching (and, for several ranks, replica or shard) and refuses (``ProbeError``) what cannot fit. Also
    checks that every checkpoint a tokenizer-reading probe visits has one."""
    pp = ProbePass(config, probe_set, steps=sel.steps)
    for s, p in sel.checkpoints:
        if pp.needs_tokenizer(s) and not _has_tokenizer(p):
            names = [q.name for q in pp.active(s) if "tokenizer" in q.needs]
            raise ProbeError(f"{p}: no tokenizer files; the {', '.join(names)} probe decodes samples with it")
    plan = plan_for_config(config, sel.checkpoints[0][1], ProbeShape.of(probe_set.groups), device=device,
                           nproc=nproc)
    _say(config)(plan.describe(), flush=True)  # information: stdout; stderr holds only a failure's one line
    check_plan(plan)
    return plan


def probe_checkpoints(config: ProbeConfig, sel: Selection, probe_set: ProbeSet, *, device: str = "cpu",
                      group_batch: int | None = None, parallel: Parallel | None = None) -> ProbePass:
    """Load each selected checkpoint once and run the pass's probes on it; returns the pass (its results and
    timings). ``parallel``: this rank of a torchrun pass (a replica loads the checkpoint whole; a shard loads it
    on the CPU and shards it with FSDP2)."""
    par = parallel or Parallel.single(device)
    pp = ProbePass(config, probe_set, steps=sel.steps, group_batch=group_batch, parallel=par)
    if sel.checkpoints:  # the model's Python code, imported once: not a checkpoint's load time
        pp.timed("import", import_model_code, sel.checkpoints[0][1])
    bar = tqdm(sel.checkpoints, desc="resrl probe", unit="ckpt", file=sys.stderr,
               disable=config.no_progress or not sys.stderr.isatty() or not par.is_main)  # a bar in a log is noise
    for step, path in bar:
        bar.set_postfix_str(f"step {step}")
        tok = pp.needs_tokenizer(step)
        if par.sharded:
            ck = pp.timed("load", _load_sharded, path, config, par, tok)
        else:
            ck = pp.timed("load", load_checkpoint, path, dtype=config.dtype, device=device, tokenizer=tok)
        if step == sel.steps[0]:
            _set_threads(config.threads, ck.model, device)
        pp.run_model(ck.model, step, tokenizer=ck.tokenizer)
        del ck
    bar.close()
    return pp


def _load_sharded(path: Path, config: ProbeConfig, par: Parallel, tokenizer: bool):
    """A checkpoint sharded with FSDP2 across the ranks: the ranks of each machine read it on the CPU one after the
    other, each sharding its copy (a local step) before the next reads, so a machine's memory holds one whole copy
    at a time; then FSDP2's initialisation, together."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(par.world)))
    ck = None
    mesh = device_mesh(par.ctx)  # together (it may create a group); sharding itself is local
    for turn in range(local_world):
        if turn == local_rank:
            ck = load_checkpoint(path, dtype=config.dtype, device="cpu", tokenizer=tokenizer)
            dtype = next(ck.model.parameters()).dtype
            wrap_model(ck.model, par.ctx, dtype, init=False, mesh=mesh)
        barrier(par.ctx)
    assert ck is not None
    init_wrapped(ck.model, par.ctx)
    ck.model.eval()
    return ck


def _summary(config: ProbeConfig, sel: Selection, pp: ProbePass, results: dict[str, ProbeResult], out: Path,
             probe_set_info: dict, created: str) -> tuple[dict, list[dict]]:
    """``summary.json`` of a pass, and the stale tables of an earlier pass to remove.

    Tables of an earlier pass that this one does not rewrite (a partial re-probe, ``--probes lld,...``) are kept
    and listed when they came from the same probe set, and removed when from another (or an unknown) one."""
    tables = {name: {"probe_set": _brief(probe_set_info), "steps": sel.steps, "created": created, "this_pass": True}
              for name in results}
    stale = []
    for name, meta in saved_tables(out).items():
        if name in results:
            continue
        entry = {"probe_set": _brief(meta.get("probe_set") or {}), "steps": meta.get("steps"),
                 "created": meta.get("created"), "this_pass": False}
        if entry["probe_set"].get("sha256") == probe_set_info["sha256"]:
            tables[name] = entry
        else:
            stale.append({"table": name, **entry, "reason": "made from another probe set: removed"})
    steps_of = {p.name: sorted(s for s in sel.steps if p.active_at(s, sel.steps)) for p in pp.probes.values()}
    summary = {
        "created": created, "run_dir": str(sel.run_dir), "mode": sel.mode, "out": str(out),
        "checkpoints": [{"step": s, "path": str(p)} for s, p in sel.checkpoints],
        "probe_set": probe_set_info, "probes": sorted(config.probes),
        "tables": tables, "removed_stale": stale,
        "full_model_steps": sorted(pp.full_model_steps), "group_batch": pp.group_batch,
        "ranks": pp.parallel.world, "parallel": pp.parallel.mode,
        "diversity_steps": steps_of.get("diversity", []),
        "options": config.to_dict(),
        **results_summary(results), "timing_s": pp.timing,
    }
    return summary, stale


# ----------------------------------------------------------------------------- checkpoints and probe sets


def select_checkpoints(config: ProbeConfig) -> Selection:
    """The run behind ``config.paths``/``config.checkpoints`` and the steps ``--steps``/``--every`` select."""
    paths = list(config.paths) + list(config.checkpoints or [])
    info = discover_run(paths, base_model=config.base_model)
    ckpts = list(info.checkpoints)
    if len(ckpts) <= 1 and info.kind == "checkpoint":
        return Selection("checkpoint", info, ckpts)
    steps = [s for s, _ in ckpts]
    if config.steps is not None:
        missing = sorted(set(config.steps) - set(steps))
        if missing:
            raise ProbeError(f"{info.path}: no checkpoint for steps {missing} (have {steps})")
        ckpts = [(s, p) for s, p in ckpts if s in set(config.steps)]
    elif config.every is not None:
        first, last = steps[0], steps[-1]
        ckpts = [(s, p) for s, p in ckpts if s in (first, last) or (s - first) % config.every == 0]
    return Selection("run" if info.kind == "resrl" else info.kind, info, ckpts)


def pass_probe_set(config: ProbeConfig, sel: Selection) -> ProbeSet:
    """The probe set of the pass: ``--probe-set`` (a keyword or a file), the run's default dump, or for our runs
    the step-``--probe-set-step`` rollouts; the first ``--groups`` groups, mixed ones first; token ids checked
    against the vocabulary."""
    keyword, mode = probe_set_keyword(config), sel.mode
    sources = sel.run.probe_set_sources
    first = sel.checkpoints[0][1]
    if keyword is not None:
        if mode != "run":
            raise ProbeError(f"{sel.run_dir}: --probe-set {keyword} needs one of our run directories "
                             f"(prompts/{keyword}.jsonl)")
        probe_set = from_run_prompts(sel.run_dir, keyword, load_tokenizer(first), first,
                                     n_samples=config.probe_set_samples, max_new_tokens=config.max_new_tokens,
                                     seed=config.seed)
    elif config.probe_set is not None or (mode != "run" and sources):
        # Text needs the checkpoints' tokenizer; a file with token ids (or a rollout dump) does not.
        with_tok = [p for _, p in sel.checkpoints if _has_tokenizer(p)]
        tok = load_tokenizer(with_tok[0]) if with_tok else None
        probe_set = load_probe_set(config.probe_set if config.probe_set is not None else sources[0], tok,
                                   model=first, seed=config.seed, n_samples=config.samples,
                                   temperature=config.temperature, max_new_tokens=config.max_new_tokens or 256,
                                   rescore=config.rescore, max_completion_length=config.max_completion_length)
    elif mode == "run":
        probe_set = ProbeSet.from_run(sel.run_dir, config.probe_set_step)
    else:
        what = "a single checkpoint directory" if mode == "checkpoint" else f"this {mode} run (no rollout dump found)"
        raise ProbeError(f"{sel.run_dir}: {what} needs --probe-set FILE")
    probe_set = probe_set.select(config.groups or None, prefer_mixed=True)
    vocab = json.loads((first / "config.json").read_text()).get("vocab_size")
    if isinstance(vocab, int):
        probe_set.check_vocab(vocab, where=str(first))
    counts = probe_set.token_counts()
    if config.strict_tokens and counts["unverified"]:
        raise ProbeError(f"{probe_set.source}: {counts['unverified']} of {probe_set.n_responses} responses are "
                         f"unverifiable text ({_token_note(probe_set)}); --strict-tokens refuses them: log token ids "
                         "(TRL: resrl_analysis.integrations.trl.record_token_ids) or give --max-completion-length")
    return probe_set


def _token_note(probe_set: ProbeSet) -> str:
    note = next((n for n in probe_set.notes if n.startswith("tokens: ")), "")
    return note[len("tokens: "):] or "tokens: " + ", ".join(f"{n} {k}" for k, n in probe_set.token_counts().items())


def say_tokens(config: ProbeConfig, probe_set: ProbeSet) -> None:
    """Print where the probe set's tokens and rewards come from; a warning when some token ids are unverifiable."""
    say = _say(config)
    c = probe_set.token_counts()
    say(f"resrl probe: probe set {probe_set.source}: {probe_set.n_responses} responses in {probe_set.n_groups} groups; "
        f"{c['exact']} scored from exact token ids, {c['round_trip']} from verified round-trips of their text, "
        f"{c['unverified']} from unverifiable text")
    for n in probe_set.notes:
        if n.startswith(("rewards: recomputed", "rewards: mixed", "--rescore", "no EOS after")):
            say(f"resrl probe: {n}")
    if c["unverified"]:
        say(f"resrl probe: warning: {c['unverified']} responses are scored from text whose token ids cannot be known "
            f"to be the model's ({_token_note(probe_set)}); their log-probs may be of other tokens. Exact ids: "
            "record them (docs/FOREIGN_RUNS.md); --strict-tokens refuses such a probe set")


def say_not_computed(config: ProbeConfig, results: dict[str, ProbeResult]) -> None:
    """Print each probe's warnings and what it did not compute, and why (one line per probe and reason)."""
    say = _say(config)
    for name, res in sorted(results.items()):
        for w in res.meta.get("warnings", []):
            say(f"resrl probe: warning: {name}: {w}")
        reasons: dict[str, int] = {}
        for s in res.skipped:
            reasons[str(s.get("reason"))] = reasons.get(str(s.get("reason")), 0) + 1
        for reason, n in reasons.items():
            say(f"resrl probe: {name}: not computed{f' ({n}×)' if n > 1 else ''}: {reason}")


def plan_only(config: ProbeConfig, sel: Selection, *, nproc: int | None = None) -> int:
    """``resrl probe --plan-only``: print the plan and exit (0 when it fits, 2 when it does not).

    Reads only ``config.json`` (and the probe set's file or the run's rollout dump when there is one; a tokenizer
    if the probe set is text), so a model can be planned for before its weights are downloaded.
    """
    ckpt = sel.checkpoints[0][1]
    shape, notes = None, []
    sources = sel.run.probe_set_sources
    try:
        if config.probe_set is not None or (sel.mode != "run" and sources):
            tok = load_tokenizer(ckpt) if _has_tokenizer(ckpt) else None
            ps = load_probe_set(config.probe_set if config.probe_set is not None else sources[0], tok, model=None,
                                max_completion_length=config.max_completion_length)
            shape = ProbeShape.of(ps.select(config.groups or None, prefer_mixed=True).groups)
        elif sel.mode == "run":
            shape = ProbeShape.of(ProbeSet.from_run(sel.run_dir, config.probe_set_step)
                                  .select(config.groups or None, prefer_mixed=True).groups)
    except ProbeError as e:
        notes.append(f"probe set not read ({e})")
    plan = plan_for_config(config, ckpt, shape, notes=notes, nproc=nproc)
    print(plan.describe())
    if not plan.fits:
        print(f"resrl probe: {plan.refusal()}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------- --probe-set batch


def run_batch(config: ProbeConfig, sel: Selection, t_start: float) -> int:
    """``--probe-set batch``: in-batch LLD offline. For each probed checkpoint s with a rollout dump and a next
    probed checkpoint s′, Δ log π of the dump's positives between s and s′ (comparison ``in_batch``); with
    consecutive checkpoints every step (``--save-every 1``), this is the update of that batch alone."""
    unknown = sorted(set(config.probes) - {"lld", "entropy"})
    if unknown and list(config.probes) != list(REGISTRY):  # the default (all) means: what batch can run
        raise ProbeError(f"--probe-set batch runs the lld probe only (asked for {unknown}); use --probes lld")
    if sel.mode != "run":
        raise ProbeError(f"{sel.run_dir}: --probe-set batch needs one of our run directories (rollout dumps)")
    dumps = dict(rundir.list_rollouts(sel.run_dir))
    pairs = [(a, pa, b, pb) for (a, pa), (b, pb) in zip(sel.checkpoints[:-1], sel.checkpoints[1:]) if a in dumps]
    if not pairs:
        raise ProbeError(f"{sel.run_dir}: no probed checkpoint with a rollout dump and a later checkpoint "
                         f"(dumps at {sorted(dumps)}, checkpoints {sel.steps})")
    sets = {a: ProbeSet.from_rollouts(dumps[a]).select(config.groups or None, prefer_mixed=True) for a, *_ in pairs}
    out: Path = config.out or sel.run.probes_dir
    _check_writable(out)
    lld = _batch_lld(config, pairs, sets, _device(config.device))
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    info = {"source": "batch", "steps": sorted(sets), "n_groups": sum(p.n_groups for p in sets.values()),
            "notes": [f"in-batch: step {a}'s rollout dump scored at checkpoints {a} and {b}" for a, _, b, _ in pairs]}
    lld = lld.with_meta(run_dir=str(sel.run_dir), probe_set=info, eps=config.option("lld").eps, created=created,
                        steps=sel.steps)
    try:
        lock = RunLock(out, "resrl probe").acquire()
    except RunLocked as e:
        raise ProbeError(str(e)) from None
    try:
        lld.save(out / "lld_batch", format=config.format)
        summary = {"created": created, "run_dir": str(sel.run_dir), "mode": "run", "out": str(out),
                   "probe_set": info, "probes": ["lld"], **results_summary({"lld_batch": lld}),
                   "timing_s": {"total": time.perf_counter() - t_start}}
        summary.pop("skipped")
        rundir.atomic_write_json(out / "summary_batch.json", to_jsonable(summary))
    finally:
        lock.release()
    _say(config)(f"resrl probe: wrote lld_batch (in-batch LLD over {len(pairs)} step(s)) to {out}")
    return 0


def _batch_lld(config: ProbeConfig, pairs: list[tuple[int, Path, int, Path]], sets: dict[int, ProbeSet],
               device: str) -> LLDResult:
    """Δ log π of each dump's responses between its checkpoint and the next (each checkpoint loaded once)."""
    cache: dict[int, torch.nn.Module] = {}

    def score(step: int, path: Path, ps: ProbeSet) -> ScoresResult:
        if step not in cache:  # each checkpoint is loaded once, however many pairs it is in
            cache.clear()
            cache[step] = load_checkpoint(path, dtype=config.dtype, device=device, tokenizer=False).model
        model = cache[step]
        _set_threads(config.threads, model, device)
        fwd = [forward_group(model, g, keep_hidden=False, keep_logits=False, pad_id=pad_id_of(model))
               for g in ps.groups]
        return scores_from_forwards(fwd, step=step)

    eps = config.option("lld").eps
    parts = [lld_between(score(a, pa, sets[a]), score(b, pb, sets[a]), eps=eps, step_from=a, step_to=b,
                         comparison="in_batch") for a, pa, b, pb in pairs]
    return LLDResult(deltas=pd.concat([p.deltas for p in parts], ignore_index=True), meta={})


# ----------------------------------------------------------------------------- small helpers


def _brief(info: dict) -> dict:
    return {"source": info.get("source"), "sha256": info.get("sha256"), "n_groups": info.get("n_groups")}


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".tmp-write-test-{uuid.uuid4().hex[:8]}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ProbeError(f"{out}: output directory not writable ({e.strerror or e})") from None


def _device(spec: str) -> str:
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec


def _set_threads(requested: int, model: torch.nn.Module, device: str) -> None:
    if requested > 0:
        torch.set_num_threads(requested)
    elif device == "cpu" and sum(p.numel() for p in model.parameters()) < 50_000_000:
        torch.set_num_threads(1)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m resrl_analysis.probes.runner RUN_DIR ...`` (the same as ``resrl probe``)."""
    parser = add_probe_arguments(argparse.ArgumentParser(prog="resrl probe"))
    return run_probe(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
