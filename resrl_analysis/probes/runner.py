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
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import rundir
from ..checkpoints import check_compatible, load_checkpoint, load_tokenizer
from ..errors import ProbeError
from ..plan import MemoryPlan, ProbeShape, check_plan, plan_for_config
from ..probe_sets import ProbeSet, from_run_prompts, load_probe_set
from ..results import LLDResult, ProbeResult, ScoresResult, to_jsonable
from ..rundir import RunLock, RunLocked
from ..runs import RunInfo, discover_run
from .capture import forward_group, pad_id_of
from .config import ProbeConfig, add_probe_arguments, config_from_args, probe_set_keyword
from .engine import ProbePass
from .lld import lld_between, scores_from_forwards
from .output import probe_set_hash, results_summary, saved_tables, write_results
from .registry import REGISTRY

__all__ = ["PROBES", "Selection", "add_probe_arguments", "run_probe", "probe_checkpoints", "main"]

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


def _run(config: ProbeConfig) -> int:
    t_start = time.perf_counter()
    sel = select_checkpoints(config)
    if config.plan_only:  # config.json only: no weights are read
        return plan_only(config, sel)
    check_compatible([p for _, p in sel.checkpoints])
    if probe_set_keyword(config) == "batch":
        return run_batch(config, sel, t_start)
    probe_set = pass_probe_set(config, sel)
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
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    probe_set_info = {**probe_set.describe(), "sha256": probe_set_hash(probe_set)}
    common = {"run_dir": str(sel.run_dir), "probe_set": probe_set_info, "steps": sel.steps, "created": created}
    results = {name: res.with_meta(**common) for name, res in pp.results().items()}
    summary, stale = _summary(config, sel, pp, results, out, probe_set_info, created)
    pp.timing["total"] = time.perf_counter() - t_start
    write_results(out, results, summary, format=config.format, remove=[s["table"] for s in stale])
    _say(config)(f"resrl probe: wrote {', '.join(sorted(results))} for {len(sel.steps)} checkpoint(s) to {out} "
                 f"(summary: {out / 'summary.json'})")
    return 0


def plan_pass(config: ProbeConfig, sel: Selection, probe_set: ProbeSet, device: str) -> MemoryPlan:
    """The memory plan of the pass, printed, before any model is loaded: it picks the group batching and refuses
    (``ProbeError``) what cannot fit. Also checks that every checkpoint a tokenizer-reading probe visits has one."""
    pp = ProbePass(config, probe_set, steps=sel.steps)
    for s, p in sel.checkpoints:
        if pp.needs_tokenizer(s) and not _has_tokenizer(p):
            names = [q.name for q in pp.active(s) if "tokenizer" in q.needs]
            raise ProbeError(f"{p}: no tokenizer files; the {', '.join(names)} probe decodes samples with it")
    plan = plan_for_config(config, sel.checkpoints[0][1], ProbeShape.of(probe_set.groups), device=device)
    _say(config)(plan.describe(), flush=True)  # information: stdout; stderr holds only a failure's one line
    check_plan(plan)
    return plan


def probe_checkpoints(config: ProbeConfig, sel: Selection, probe_set: ProbeSet, *, device: str = "cpu",
                      group_batch: int | None = None) -> ProbePass:
    """Load each selected checkpoint once and run the pass's probes on it; returns the pass (its results and
    timings)."""
    pp = ProbePass(config, probe_set, steps=sel.steps, group_batch=group_batch)
    bar = tqdm(sel.checkpoints, desc="resrl probe", unit="ckpt", file=sys.stderr,
               disable=config.no_progress or not sys.stderr.isatty())  # a bar in a log file is noise
    for step, path in bar:
        bar.set_postfix_str(f"step {step}")
        ck = pp.timed("load", load_checkpoint, path, dtype=config.dtype, device=device,
                      tokenizer=pp.needs_tokenizer(step))
        if step == sel.steps[0]:
            _set_threads(config.threads, ck.model, device)
        pp.run_model(ck.model, step, tokenizer=ck.tokenizer)
        del ck
    bar.close()
    return pp


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
                                   temperature=config.temperature, max_new_tokens=config.max_new_tokens or 256)
    elif mode == "run":
        probe_set = ProbeSet.from_run(sel.run_dir, config.probe_set_step)
    else:
        what = "a single checkpoint directory" if mode == "checkpoint" else f"this {mode} run (no rollout dump found)"
        raise ProbeError(f"{sel.run_dir}: {what} needs --probe-set FILE")
    probe_set = probe_set.select(config.groups or None, prefer_mixed=True)
    vocab = json.loads((first / "config.json").read_text()).get("vocab_size")
    if isinstance(vocab, int):
        probe_set.check_vocab(vocab, where=str(first))
    return probe_set


def plan_only(config: ProbeConfig, sel: Selection) -> int:
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
            ps = load_probe_set(config.probe_set if config.probe_set is not None else sources[0], tok, model=None)
            shape = ProbeShape.of(ps.select(config.groups or None, prefer_mixed=True).groups)
        elif sel.mode == "run":
            shape = ProbeShape.of(ProbeSet.from_run(sel.run_dir, config.probe_set_step)
                                  .select(config.groups or None, prefer_mixed=True).groups)
    except ProbeError as e:
        notes.append(f"probe set not read ({e})")
    plan = plan_for_config(config, ckpt, shape, notes=notes)
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
