"""``resrl probe RUN_DIR``: every probe over a run's checkpoints → tables + ``summary.json``.

The pass loads each selected checkpoint once, makes one teacher-forced forward pass per probe
group, and feeds every probe from it; the costly parts (the whole-model gradient cosine and
real whole-model step, and sampling for pass@k) run on a subset of checkpoints (by default the
first and the last). Everything is checked before any work (checkpoint files, tokenizers, the
probe set, the output directory), and results are written only at the end, each atomically, so
a failure leaves no partial table. Output, under ``RUN_DIR/probes`` or ``--out``::

    scores/ lld/ first_order/ interference/ subspace/ diversity/   one saved result each
    summary.json                                                   headline numbers, skips, timings

Read them back with :func:`resrl_analysis.results.load_results`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from ..checkpoints import ProbeError, ProbeSet, check_compatible, load_tokenizer
from ..rundir import RunLock, RunLocked, atomic_write

__all__ = ["PROBES", "add_probe_arguments", "run_probe", "main"]

PROBES = ("lld", "entropy", "first_order", "interference", "subspace", "diversity")


def _csv(kind: type = str):
    def parse(text: str) -> list:
        try:
            return [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def add_probe_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``resrl probe`` arguments to ``parser`` (a sub-command parser) and return it.

    >>> p = add_probe_arguments(argparse.ArgumentParser(prog="resrl probe"))
    >>> a = p.parse_args(["runs/tiny", "--steps", "0,10", "--probes", "lld,subspace"])
    >>> a.steps, a.probes, a.groups, a.full_model_steps
    ([0, 10], ['lld', 'subspace'], 8, 'ends')
    """
    from .first_order import ALGORITHMS, PROBE_PARAMS

    parser.description = ("Run the probes over a run's checkpoints (or over one Hugging Face checkpoint) and write "
                          "their tables and summary.json under RUN_DIR/probes (or --out).")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "probes (--probes):\n"
        "  lld           lazy likelihood displacement Δ(x) per prompt, vs the first step and step to step\n"
        "  entropy       teacher-forced log-likelihood and token entropy of every probe response\n"
        "  first_order   first-order (head-only) prediction of one SGD step's Δ log π(y), split into the\n"
        "                positive and negative contributions, beside real head-only and whole-model steps\n"
        "  interference  head-gradient cosines positive×negative, group update cosine, NTHR scores,\n"
        "                whole-model gradient cosine (on --full-model-steps)\n"
        "  subspace      residual energy under 8 representations, explained variance, the alignment bound,\n"
        "                Spearman(residual, true interference)\n"
        "  diversity     sampling (on --diversity-steps): pass@k for every k ≤ n, Avg@n, distinct-1/2/3,\n"
        "                self-BLEU, distinct final answers\n"
        "\n"
        "examples:\n"
        "  resrl probe runs/tiny                              all probes, every checkpoint\n"
        "  resrl probe runs/tiny --every 5 --probes lld,interference\n"
        "  resrl probe my-hf-model/ --probe-set probes.jsonl  a checkpoint not written by the trainer;\n"
        "      probes.jsonl: one JSON object per prompt with prompt, responses, rewards (and ground_truth)\n"
        "\n"
        "runs the trainer did not write (docs/FOREIGN_RUNS.md):\n"
        "  resrl probe out/grpo --base-model BASE --probe-set out/grpo/completions/completions_00001.parquet\n"
        "      a TRL output directory (checkpoint-N/ is step N); BASE, the starting policy, is probed as step 0\n"
        "  resrl probe ckpts --base-model BASE --probe-set rollout_data/\n"
        "      a verl checkpoint directory (merged global_step_N/actor/huggingface/); its oldest rollout dump\n"
        "  resrl probe out/checkpoint-50 out/checkpoint-100 --base-model BASE\n"
        "      a list of checkpoints, in this order (or --checkpoints A,B,C); outputs in their parent's probes/\n"
    )
    a = parser.add_argument
    a("paths", metavar="RUN_DIR", type=Path, nargs="*",
      help="a run directory (ours: checkpoints/step_XXXXXX; TRL: checkpoint-N/; verl: global_step_N/actor/"
           "huggingface/), a single HF checkpoint directory, or several checkpoint directories in order")
    a("--checkpoints", type=_csv(Path), default=None, metavar="A,B,C",
      help="an ordered, comma-separated list of HF checkpoint directories (instead of RUN_DIR)")
    a("--base-model", type=Path, default=None, metavar="PATH",
      help="the starting policy, probed as step 0, for runs that did not save it (TRL, verl, lists)")
    a("--out", type=Path, default=None, help="output directory (default: RUN_DIR/probes)")
    a("--probes", type=_csv(), default=list(PROBES),
      help="comma-separated probes to run (see below; default: all)")
    sel = parser.add_mutually_exclusive_group()
    sel.add_argument("--steps", type=_csv(int), default=None, help="checkpoint steps to probe, e.g. 0,10,20 "
                     "(default: every complete checkpoint)")
    sel.add_argument("--every", type=int, default=None, metavar="K",
                     help="probe every K-th checkpoint step (the first and the last always)")
    a("--probe-set-step", type=int, default=0, metavar="S",
      help="take the probe set from RUN_DIR/rollouts/step_S.jsonl (default 0: what the starting policy sampled)")
    a("--probe-set", type=Path, default=None, metavar="heldout|train|batch|FILE",
      help="a probe set instead: 'heldout' (the run's held-out prompts, RUN_DIR/prompts/heldout.jsonl, each with its "
           "reference response plus --probe-set-samples responses of the step-0 policy), 'train' (the training "
           "pool, likewise), 'batch' (each step's own rollout dump between its checkpoint and the next: in-batch "
           "LLD offline; lld only), or a file: our rollout dump, a JSONL (one prompt per line: prompt, responses, "
           "rewards[, ground_truth]), a TRL completions parquet, a verl rollout JSONL, or an RLVR dataset "
           "(JSONL/parquet, sampled with --base-model); default: the run's first rollout/completion dump")
    a("--probe-set-samples", type=int, default=None, metavar="N",
      help="responses sampled per prompt for the heldout/train probe sets (default: the run's group size n)")
    a("--groups", type=int, default=8, metavar="N",
      help="probe the first N prompt groups, mixed ones first (default 8; 0 = all)")
    a("--group-batch", type=int, default=8, metavar="G",
      help="groups forwarded and probed together (default 8); peak memory grows with it: each group keeps "
           "its response logits (G·T·V in the model's dtype) and two hidden states until its probes are done")
    a("--eps", type=float, default=0.0, help="LLD threshold: a prompt is in LLD when Δ ≤ eps (default 0)")
    a("--algorithms", type=_csv(), default=list(ALGORITHMS),
      help=f"advantages for the first-order prediction (default: {','.join(ALGORITHMS)})")
    a("--lr", type=float, default=1e-3, help="SGD step size η of the first-order prediction (default 1e-3)")
    res = PROBE_PARAMS.resrl
    a("--rank", type=int, default=res.rank, help=f"subspace rank bound k (default {res.rank})")
    a("--svd", choices=("exact", "lowrank"), default=res.svd, help=f"subspace SVD (default {res.svd})")
    a("--max-cosine-samples", type=int, default=256, metavar="N",
      help="raw token-pair cosines kept per group for histograms (default 256)")
    a("--full-model-steps", default="ends", metavar="SPEC",
      help="where to run the autograd whole-model gradient cosine and real whole-model SGD step: "
           "'ends' (first and last probed checkpoint, default), 'all', 'none', or steps '0,10'")
    a("--diversity-steps", default="ends", metavar="SPEC",
      help="where to sample for pass@k and diversity: 'ends' (default), 'all', 'none', or steps")
    a("--samples", type=int, default=8, metavar="N", help="responses sampled per prompt for pass@k (default 8)")
    a("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    a("--max-new-tokens", type=int, default=None, metavar="M",
      help="sampling length limit (default: the longest probe response)")
    a("--reward", choices=("auto", "exact", "math"), default="auto",
      help="correctness of sampled responses: exact match of the stripped text, math-verify, or auto "
           "(exact for the multiplication task, math-verify otherwise when installed)")
    a("--seed", type=int, default=0, help="seed of sampling, sub-sampling and randomized SVD (default 0)")
    a("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (default)")
    a("--dtype", default="auto", help="model dtype: auto (the checkpoint's), float32, bfloat16, float16, float64")
    a("--threads", type=int, default=0, metavar="N",
      help="CPU threads for torch; 0 = auto (default): 1 for a model under 50M parameters on CPU, where "
           "threading overhead and contention on a shared machine cost more than they give, else torch's default")
    a("--memory-budget", default=None, metavar="SIZE",
      help="memory the probes may use, e.g. 80GB or 512MiB (default: the device's total, or the host's "
           "available memory on CPU); the plan picks the group batching to fit it and refuses when nothing fits")
    a("--plan-only", action="store_true",
      help="print the memory plan for the probe set's shapes and exit; needs only config.json (and a "
           "tokenizer for a text probe set), so a model can be planned for before downloading its weights")
    a("--format", choices=("parquet", "csv"), default="parquet", help="table format (default parquet)")
    a("--no-progress", action="store_true", help="no progress bar (none either when stderr is not a terminal)")
    a("--quiet", action="store_true",
      help="print nothing but errors (no memory plan, no closing line)")
    return parser


def _say_unless_quiet(args: argparse.Namespace):
    """``print`` for the informational lines, silenced by ``--quiet``."""
    return (lambda *a, **k: None) if getattr(args, "quiet", False) else print


def _steps_spec(spec: str, steps: list[int]) -> set[int]:
    if spec == "all":
        return set(steps)
    if spec == "none":
        return set()
    if spec == "ends":
        return {steps[0], steps[-1]} if steps else set()
    try:
        want = {int(x) for x in spec.split(",") if x.strip()}
    except ValueError:
        raise ProbeError(f"bad step spec {spec!r}: use ends, all, none or comma-separated steps") from None
    return want & set(steps)


def _select_checkpoints(args: argparse.Namespace) -> tuple[str, list[tuple[int, Path]]]:
    from ..runs import discover_run

    paths = list(getattr(args, "paths", None) or []) + list(getattr(args, "checkpoints", None) or [])
    if not paths and getattr(args, "run_dir", None) is not None:
        paths = [args.run_dir]
    info = discover_run(paths, base_model=getattr(args, "base_model", None))
    args.run_dir, args.run_info = info.path, info
    ckpts = list(info.checkpoints)
    root = info.path
    if len(ckpts) > 1 or info.kind != "checkpoint":
        steps = [s for s, _ in ckpts]
        if args.steps is not None:
            missing = sorted(set(args.steps) - set(steps))
            if missing:
                raise ProbeError(f"{root}: no checkpoint for steps {missing} (have {steps})")
            ckpts = [(s, p) for s, p in ckpts if s in set(args.steps)]
        elif args.every is not None:
            if args.every < 1:
                raise ProbeError(f"--every must be >= 1, got {args.every}")
            first, last = steps[0], steps[-1]
            ckpts = [(s, p) for s, p in ckpts if s in (first, last) or (s - first) % args.every == 0]
        return ("run" if info.kind == "resrl" else info.kind), ckpts
    return "checkpoint", ckpts


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
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec


def run_probe(args: argparse.Namespace) -> int:
    """Run ``resrl probe`` with parsed arguments; returns the exit code (2 on bad input, one line on stderr).

    Results are written only after every checkpoint was probed, each atomically; torch's thread
    count is restored on return.

    >>> import tempfile
    >>> from resrl_analysis.probes.synthetic import write_fake_run
    >>> run = write_fake_run(tempfile.mkdtemp(), steps=(0, 1))  # doctest: +SKIP
    >>> main([str(run), "--probes", "lld,interference", "--no-progress"])  # doctest: +SKIP
    0
    """
    import torch

    threads = torch.get_num_threads()
    try:
        return _run(args)
    except ProbeError as e:
        print(f"resrl probe: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions: one line, earlier results untouched
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"resrl probe: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)  # callable in-process (notebooks, tests): leave torch as found


def _set_threads(requested: int, model, device: str) -> None:
    import torch

    if requested > 0:
        torch.set_num_threads(requested)
    elif device == "cpu" and sum(p.numel() for p in model.parameters()) < 50_000_000:
        torch.set_num_threads(1)


def _run(args: argparse.Namespace) -> int:
    unknown = sorted(set(args.probes) - set(PROBES))
    if unknown or not args.probes:
        raise ProbeError(f"unknown probes {unknown}; choose from {','.join(PROBES)}")
    probes = set(args.probes)
    from .first_order import ALGORITHMS

    bad = sorted(set(args.algorithms) - set(ALGORITHMS))
    if bad:
        raise ProbeError(f"unknown algorithms {bad}; choose from {','.join(ALGORITHMS)}")
    for name in ("groups", "samples", "rank", "max_cosine_samples", "group_batch"):
        if getattr(args, name) < (0 if name == "groups" else 1):
            raise ProbeError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    t_start = time.perf_counter()

    # -- everything checked before any work ----------------------------------------------------------
    mode, ckpts = _select_checkpoints(args)
    if args.plan_only:  # config.json only: no weights are read
        from ..plan import plan_only

        return plan_only(args, mode, ckpts)
    check_compatible([p for _, p in ckpts])
    sources = args.run_info.probe_set_sources
    keyword = _probe_set_keyword(args)
    if keyword == "batch":
        if mode != "run":
            raise ProbeError(f"{args.run_dir}: --probe-set batch needs one of our run directories (rollout dumps)")
        return _run_batch(args, ckpts, t_start)
    if keyword is not None:
        if mode != "run":
            raise ProbeError(f"{args.run_dir}: --probe-set {keyword} needs one of our run directories "
                             f"(prompts/{keyword}.jsonl)")
        from ..probe_sets import from_run_prompts

        tok = load_tokenizer(ckpts[0][1])
        probe_set = from_run_prompts(args.run_dir, keyword, tok, ckpts[0][1], n_samples=args.probe_set_samples,
                                     max_new_tokens=args.max_new_tokens, seed=args.seed)
    elif args.probe_set is not None or (mode != "run" and sources):
        from ..probe_sets import load_probe_set

        # Text needs the checkpoints' tokenizer; a file with token ids (or a rollout dump) does not.
        with_tok = [p for _, p in ckpts if _has_tokenizer(p)]
        tok = load_tokenizer(with_tok[0]) if with_tok else None
        probe_set = load_probe_set(args.probe_set if args.probe_set is not None else sources[0], tok,
                                   model=ckpts[0][1], seed=args.seed, n_samples=args.samples,
                                   temperature=args.temperature, max_new_tokens=args.max_new_tokens or 256)
    elif mode == "run":
        probe_set = ProbeSet.from_run(args.run_dir, args.probe_set_step)
    else:
        what = "a single checkpoint directory" if mode == "checkpoint" else f"this {mode} run (no rollout dump found)"
        raise ProbeError(f"{args.run_dir}: {what} needs --probe-set FILE")
    probe_set = probe_set.select(args.groups or None, prefer_mixed=True)
    vocab = json.loads((ckpts[0][1] / "config.json").read_text()).get("vocab_size")
    if isinstance(vocab, int):
        probe_set.check_vocab(vocab, where=str(ckpts[0][1]))
    out: Path = args.out or args.run_info.probes_dir
    _check_writable(out)
    # One writer per output directory: a second `resrl probe` on it is refused (the kernel drops the lock when
    # this process ends, however it ends).
    try:
        lock = RunLock(out, "resrl probe").acquire()
    except RunLocked as e:
        raise ProbeError(str(e)) from None
    try:
        return _probe_and_write(args, mode, ckpts, probes, probe_set, out, t_start)
    finally:
        lock.release()


def _probe_and_write(args: argparse.Namespace, mode: str, ckpts: list[tuple[int, Path]], probes: set[str],
                     probe_set: ProbeSet, out: Path, t_start: float) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..checkpoints import load_checkpoint
    from ..results import (
        DiversityResult,
        FirstOrderResult,
        InterferenceResult,
        ScoresResult,
        SubspaceResult,
        _replace_dir,
        to_jsonable,
    )
    from .capture import forward_group, pad_id_of
    from .diversity import default_reward_fn, diversity_probe, exact_match_reward, math_verify_reward
    from .first_order import PROBE_PARAMS, REAL_STEP_GROUPS, first_order_prediction
    from .interference import interference_probe
    from .lld import lld_along_run, scores_from_forwards
    from .subspace import merge_subspace_results, subspace_probe

    steps = [s for s, _ in ckpts]
    full_steps = _steps_spec(args.full_model_steps, steps)
    div_steps = _steps_spec(args.diversity_steps, steps)
    if "diversity" in probes:
        for s, p in ckpts:
            if s in div_steps and not _has_tokenizer(p):
                raise ProbeError(f"{p}: no tokenizer files; the diversity probe decodes samples with it")
    device = _device(args.device)
    from ..plan import ProbeShape, check_plan, plan_for_args

    # The memory plan, before any model is loaded: it picks the group batching and refuses what cannot fit.
    mem_plan = plan_for_args(args, ckpts[0][1], ProbeShape.of(probe_set.groups), device=device)
    # Information: stdout; stderr holds only a failure's one line.
    _say_unless_quiet(args)(mem_plan.describe(), flush=True)
    check_plan(mem_plan)
    args.group_batch = mem_plan.group_batch
    cfg = replace(PROBE_PARAMS.resrl, rank=args.rank, svd=args.svd)
    options = replace(PROBE_PARAMS, resrl=cfg)
    if args.reward == "exact":
        reward_fn = exact_match_reward
    elif args.reward == "math":
        reward_fn = math_verify_reward
    elif _probe_set_keyword(args) is not None:  # the rule the probe set's own rewards came from
        from ..probe_sets import _prompt_file_reward

        sources = {g.data_source for g in probe_set.groups}
        reward_fn = _prompt_file_reward(sources.pop() if len(sources) == 1 else "")
    else:
        sources = {g.data_source for g in probe_set.groups}
        reward_fn = default_reward_fn(sources.pop() if len(sources) == 1 else "")
    need_hidden = bool(probes & {"first_order", "interference", "subspace"})

    parts: dict[str, list] = {k: [] for k in ("scores", "first_order", "interference", "subspace", "diversity")}
    timing: dict[str, float] = {}

    def timed(name: str, fn, *a, **kw):
        t = time.perf_counter()
        r = fn(*a, **kw)
        timing[name] = timing.get(name, 0.0) + time.perf_counter() - t
        return r

    bar = tqdm(ckpts, desc="resrl probe", unit="ckpt", file=sys.stderr,
               disable=args.no_progress or not sys.stderr.isatty())  # a bar in a log file is noise
    # first_order's real steps on the probe set's first groups, whatever the group batching.
    step_ids = [g.group_id for g in probe_set.groups[:REAL_STEP_GROUPS]]
    for step, path in bar:
        bar.set_postfix_str(f"step {step}")
        ck = timed("load", load_checkpoint, path, dtype=args.dtype, device=device,
                   tokenizer="diversity" in probes and step in div_steps)
        model = ck.model
        if step == steps[0]:
            _set_threads(args.threads, model, device)
        pad = pad_id_of(model, ck.tokenizer)
        # --group-batch groups at a time: peak memory is that many groups' logits and hidden states,
        # however many groups the probe set holds.
        sub_parts = []
        for start in range(0, probe_set.n_groups, args.group_batch):
            one = replace(probe_set, groups=probe_set.groups[start : start + args.group_batch])
            fwd = [timed("forward", forward_group, model, g, keep_hidden=need_hidden, keep_logits=need_hidden,
                         pad_id=pad) for g in one.groups]
            if probes & {"lld", "entropy"}:
                parts["scores"].append(timed("scores", scores_from_forwards, fwd, step=step))
            if "first_order" in probes:
                parts["first_order"].append(timed(
                    "first_order", first_order_prediction, model, one, algorithms=args.algorithms, lr=args.lr,
                    head_step=True, full_step=step in full_steps, step=step, forwards=fwd, options=options,
                    seed=args.seed, step_groups=step_ids))
            if "interference" in probes:
                parts["interference"].append(timed(
                    "interference", interference_probe, model, one, step=step, forwards=fwd,
                    full_model=step in full_steps, max_cosine_samples=args.max_cosine_samples, seed=args.seed))
            if "subspace" in probes:
                sub_parts.append(timed("subspace", subspace_probe, model, one, step=step, forwards=fwd, config=cfg,
                                       seed=args.seed))
            del fwd
        if len(sub_parts) == 1:
            parts["subspace"].append(sub_parts[0])
        elif sub_parts:  # pool the correlations over all the groups of this step again
            parts["subspace"].append(timed("subspace", merge_subspace_results, sub_parts))
        if "diversity" in probes and step in div_steps:
            parts["diversity"].append(timed(
                "diversity", diversity_probe, model, ck.tokenizer, probe_set, n_samples=args.samples,
                temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed,
                reward_fn=reward_fn, step=step))
        del model, ck
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    bar.close()

    # -- assemble and write (each result atomically; summary last) -----------------------------------
    results: dict = {}
    probe_set_info = {**probe_set.describe(), "sha256": _probe_set_hash(probe_set)}
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    common = {"run_dir": str(args.run_dir), "probe_set": probe_set_info, "steps": steps, "created": created}
    if parts["scores"]:
        scores = ScoresResult.concat(parts["scores"]).with_meta(**common)
        results["scores"] = scores
        if "lld" in probes:
            results["lld"] = timed("lld", lld_along_run, scores, eps=args.eps).with_meta(**common)
    for name, cls in (("first_order", FirstOrderResult), ("interference", InterferenceResult),
                      ("subspace", SubspaceResult), ("diversity", DiversityResult)):
        if name in probes:
            res = cls.concat(parts[name]) if parts[name] else cls.empty(
                {"skipped": [{"reason": f"no checkpoint selected by --{name}-steps"}]})
            results[name] = res.with_meta(**common, **({"full_model_steps": sorted(full_steps)}
                                                       if name in ("first_order", "interference") else {}))
    # One pass's results are written as a set: staged beside the old ones, then swapped in with the old
    # summary.json removed first and the new one last, so a failure never leaves a mix that reads as whole.
    staging = out / f".staging-{uuid.uuid4().hex[:8]}"
    try:
        for name, res in results.items():
            timed("write", res.save, staging / name, format=args.format)
        skipped = [{"probe": name, **s} for name, res in results.items() for s in res.skipped]
        timing["total"] = time.perf_counter() - t_start
        # Tables of an earlier pass that this one does not rewrite (a partial re-probe, --probes lld,...): kept
        # and listed when they came from the same probe set, removed below when from another (or unknown) one.
        tables = {name: {"probe_set": _brief(probe_set_info), "steps": steps, "created": created, "this_pass": True}
                  for name in results}
        stale = []
        for name, meta in _saved_tables(out).items():
            if name in results:
                continue
            entry = {"probe_set": _brief(meta.get("probe_set") or {}), "steps": meta.get("steps"),
                     "created": meta.get("created"), "this_pass": False}
            if entry["probe_set"].get("sha256") == probe_set_info["sha256"]:
                tables[name] = entry
            else:
                stale.append({"table": name, **entry, "reason": "made from another probe set: removed"})
        summary = {
            "created": created,
            "run_dir": str(args.run_dir), "mode": mode, "out": str(out),
            "checkpoints": [{"step": s, "path": str(p)} for s, p in ckpts],
            "probe_set": probe_set_info, "probes": sorted(probes),
            "tables": tables, "removed_stale": stale,
            "full_model_steps": sorted(full_steps),
            "diversity_steps": sorted(div_steps) if "diversity" in probes else [],
            "options": {k: v for k, v in vars(args).items() if k not in ("func", "run_info")},
            "results": {name: {"path": name, "kind": res.KIND, **res.summary()} for name, res in results.items()},
            "skipped": skipped, "timing_s": timing,
        }
        atomic_write(staging / "summary.json", json.dumps(to_jsonable(summary), indent=1, allow_nan=False))
        (out / "summary.json").unlink(missing_ok=True)
        for name in results:
            _replace_dir(staging / name, out / name)
        for entry in stale:
            shutil.rmtree(out / entry["table"], ignore_errors=True)
        os.replace(staging / "summary.json", out / "summary.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _say_unless_quiet(args)(f"resrl probe: wrote {', '.join(sorted(results))} for {len(steps)} checkpoint(s) to {out}"
                            f" (summary: {out / 'summary.json'})")
    return 0


def _probe_set_keyword(args: argparse.Namespace) -> str | None:
    """``heldout``/``train``/``batch`` when ``--probe-set`` names one (and no file of that name exists), else None."""
    from ..probe_sets import PROBE_SET_KEYWORDS

    ps = getattr(args, "probe_set", None)
    return str(ps) if ps is not None and str(ps) in PROBE_SET_KEYWORDS and not Path(ps).exists() else None


def _run_batch(args: argparse.Namespace, ckpts: list[tuple[int, Path]], t_start: float) -> int:
    """``--probe-set batch``: in-batch LLD offline. For each probed checkpoint s with a rollout dump and a next
    probed checkpoint s′, Δ log π of the dump's positives between s and s′ (comparison ``in_batch``); with
    consecutive checkpoints every step (``--save-every 1``), this is the update of that batch alone."""
    import pandas as pd

    from .. import rundir
    from ..checkpoints import load_checkpoint
    from ..results import LLDResult, ScoresResult, to_jsonable
    from .capture import forward_group, pad_id_of
    from .lld import lld_between, scores_from_forwards

    unknown = sorted(set(args.probes) - {"lld", "entropy"})
    if unknown and list(args.probes) != list(PROBES):  # the default (all) means: what batch can run
        raise ProbeError(f"--probe-set batch runs the lld probe only (asked for {unknown}); use --probes lld")
    dumps = dict(rundir.list_rollouts(args.run_dir))
    pairs = [(a, pa, b, pb) for (a, pa), (b, pb) in zip(ckpts[:-1], ckpts[1:]) if a in dumps]
    if not pairs:
        raise ProbeError(f"{args.run_dir}: no probed checkpoint with a rollout dump and a later checkpoint "
                         f"(dumps at {sorted(dumps)}, checkpoints {[s for s, _ in ckpts]})")
    sets = {a: ProbeSet.from_rollouts(dumps[a]).select(args.groups or None, prefer_mixed=True) for a, *_ in pairs}
    out: Path = args.out or args.run_info.probes_dir
    _check_writable(out)
    device = _device(args.device)
    parts = []
    cache: dict[int, object] = {}

    def score(step: int, path: Path, ps: ProbeSet) -> ScoresResult:
        if step not in cache:  # each checkpoint is loaded once, however many pairs it is in
            cache.clear()
            cache[step] = load_checkpoint(path, dtype=args.dtype, device=device, tokenizer=False).model
        model = cache[step]
        _set_threads(args.threads, model, device)
        fwd = [forward_group(model, g, keep_hidden=False, keep_logits=False, pad_id=pad_id_of(model))
               for g in ps.groups]
        return scores_from_forwards(fwd, step=step)

    for a, pa, b, pb in pairs:
        before = score(a, pa, sets[a])
        after = score(b, pb, sets[a])
        parts.append(lld_between(before, after, eps=args.eps, step_from=a, step_to=b, comparison="in_batch"))
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    info = {"source": "batch", "steps": sorted(sets), "n_groups": sum(p.n_groups for p in sets.values()),
            "notes": [f"in-batch: step {a}'s rollout dump scored at checkpoints {a} and {b}" for a, _, b, _ in pairs]}
    lld = LLDResult(deltas=pd.concat([p.deltas for p in parts], ignore_index=True),
                    meta={"run_dir": str(args.run_dir), "probe_set": info, "eps": args.eps, "created": created,
                          "steps": [s for s, _ in ckpts]})
    try:
        lock = RunLock(out, "resrl probe").acquire()
    except RunLocked as e:
        raise ProbeError(str(e)) from None
    try:
        lld.save(out / "lld_batch", format=args.format)
        summary = {"created": created, "run_dir": str(args.run_dir), "mode": "run", "out": str(out),
                   "probe_set": info, "probes": ["lld"], "results": {"lld_batch": {"path": "lld_batch",
                   "kind": lld.KIND, **lld.summary()}}, "timing_s": {"total": time.perf_counter() - t_start}}
        atomic_write(out / "summary_batch.json", json.dumps(to_jsonable(summary), indent=1, allow_nan=False))
    finally:
        lock.release()
    _say_unless_quiet(args)(f"resrl probe: wrote lld_batch (in-batch LLD over {len(pairs)} step(s)) to {out}")
    return 0


def _probe_set_hash(probe_set: ProbeSet) -> str:
    """A short fingerprint of what a probe set scores (token ids and rewards), to tell tables of two sets apart."""
    import hashlib

    content = [[g.group_id, g.prompt_ids, g.response_ids, g.rewards] for g in probe_set.groups]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]


def _brief(info: dict) -> dict:
    return {"source": info.get("source"), "sha256": info.get("sha256"), "n_groups": info.get("n_groups")}


def _saved_tables(out: Path) -> dict[str, dict]:
    """``name -> meta`` of every saved result directly under ``out`` (``{}`` meta when unreadable)."""
    found = {}
    for d in sorted(out.iterdir()) if out.is_dir() else []:
        if d.is_dir() and not d.name.startswith(".") and (d / "meta.json").is_file():
            try:
                found[d.name] = json.loads((d / "meta.json").read_text(encoding="utf-8")).get("meta") or {}
            except (OSError, ValueError):
                found[d.name] = {}
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m resrl_analysis.probes.runner RUN_DIR ...`` (the same as ``resrl probe``)."""
    parser = add_probe_arguments(argparse.ArgumentParser(prog="resrl probe"))
    return run_probe(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
