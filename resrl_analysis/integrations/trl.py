"""Live probes inside a Hugging Face / TRL trainer: :class:`ProbeCallback` (docs/FOREIGN_RUNS.md).

    from trl import GRPOTrainer
    from resrl_analysis.integrations.trl import ProbeCallback

    trainer = GRPOTrainer(..., callbacks=[ProbeCallback("probe.jsonl", every=50)])

At the start of training (step 0: the starting policy, which TRL does not save), every ``every``
optimizer steps and at each save, the callback scores the fixed probe set on the live model and

- logs the headline numbers (``probe/...``) through the host trainer's own log event, so every
  ``report_to`` backend, the console and ``trainer_state.json`` see them;
- rewrites ``<output_dir>/probes`` (scores, lld, interference tables and ``summary.json``) in the
  layout ``resrl probe`` writes, so ``resrl figures <output_dir>`` draws LLD over steps directly.

Training is not disturbed: the model goes to eval mode and back, nothing keeps a gradient, and the
Python, NumPy and torch RNG states are restored, so a run with the callback trains the same weights
as one without. Probes run on the main process only (single process or DDP; not FSDP/DeepSpeed
ZeRO-3, whose sharded parameters need every rank).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from ..checkpoints import ProbeError, ProbeSet

__all__ = ["ProbeCallback", "LIVE_PROBES"]

LIVE_PROBES = ("lld", "entropy", "interference")


def _rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s:
        torch.cuda.set_rng_state_all(s["cuda"])


@contextlib.contextmanager
def _own_precision(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    # With bf16/fp16 mixed precision, accelerate wraps the model's forward in autocast and keeps the
    # original as `_original_forward`; scoring through the original gives the numbers `resrl probe`
    # gets from the saved checkpoint. The wrapper is put back afterwards: training keeps its autocast.
    wrapped, original = model.__dict__.get("forward"), model.__dict__.get("_original_forward")
    if not enabled or wrapped is None or original is None:
        yield
        return
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapped


def _handler_of_caller() -> CallbackHandler | None:
    # Events carry no reference to the trainer; the CallbackHandler that dispatches them is the
    # `self` of a calling frame. Through it the callback's numbers reach every logger in order.
    f = sys._getframe(1)
    for _ in range(6):
        if f is None:
            return None
        owner = f.f_locals.get("self")
        if isinstance(owner, CallbackHandler):
            return owner
        f = f.f_back
    return None


class ProbeCallback(TrainerCallback):
    """Run the probes on the live model during training (a ``transformers.TrainerCallback``).

    Args:
        probe_set: a loaded :class:`~resrl_analysis.checkpoints.ProbeSet` or a path in any format
            of :func:`resrl_analysis.probe_sets.load_probe_set` (text is encoded with the trainer's
            tokenizer; a dataset file is sampled once with the starting policy).
        probes: any of ``"lld"``, ``"entropy"``, ``"interference"``.
        every: probe every ``every`` optimizer steps (and at each save, and at step 0).
        groups: probe the first ``groups`` prompt groups, mixed ones first (0 = all).
        out: where the tables go (default ``<output_dir>/probes``).
        eps: LLD threshold.
        seed: seed of the interference probe's cosine sub-sampling (and of sampling a dataset).
        full_precision: score outside the trainer's mixed-precision autocast, in the weights' own
            dtype, so the numbers equal those of ``resrl probe`` on the saved checkpoints; False
            scores through the forward that training uses.
        probe_set_options: more keywords of :func:`~resrl_analysis.probe_sets.load_probe_set`
            (``n_samples``, ``max_new_tokens``, ``answer_column``, ``step`` ...).

    >>> cb = ProbeCallback(ProbeSet(()), every=5)
    >>> cb.every, cb.probes
    (5, ('lld', 'entropy', 'interference'))
    """

    def __init__(self, probe_set: ProbeSet | str | Path, probes: Sequence[str] = LIVE_PROBES, every: int = 50, *,
                 groups: int = 8, out: str | Path | None = None, eps: float = 0.0, seed: int = 0,
                 max_cosine_samples: int = 256, format: str = "parquet",
                 probe_set_options: dict | None = None, full_precision: bool = True) -> None:
        probes = tuple(probes)
        bad = sorted(set(probes) - set(LIVE_PROBES))
        if bad or not probes:
            raise ValueError(f"ProbeCallback: unknown probes {bad}; choose from {','.join(LIVE_PROBES)}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"ProbeCallback: every must be a positive int, got {every!r}")
        if groups < 0:
            raise ValueError(f"ProbeCallback: groups must be >= 0, got {groups}")
        self.source, self.probes, self.every, self.groups = probe_set, probes, every, groups
        self.out = None if out is None else Path(out)
        self.eps, self.seed, self.max_cosine_samples, self.format = eps, seed, max_cosine_samples, format
        self.probe_set_options = dict(probe_set_options or {})
        self.full_precision = full_precision
        self.probe_set: ProbeSet | None = probe_set if isinstance(probe_set, ProbeSet) else None
        self.history: list[dict] = []  # the logged headline numbers, one dict per probed step
        self._parts: dict[str, list] = {"scores": [], "interference": []}
        self._done: set[int] = set()
        self._handler: CallbackHandler | None = None
        self._pending: dict | None = None
        self._dispatching = False

    # -- events ------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._handler = _handler_of_caller()
        if self.out is None:
            self.out = Path(args.output_dir) / "probes"
        tok = getattr(processing_class, "tokenizer", processing_class)  # a multimodal processor wraps one
        if self.probe_set is None:
            from ..probe_sets import load_probe_set

            rng = _rng_state()  # a dataset probe set is sampled here: the run's own draws stay as they were
            try:
                with _own_precision(model, self.full_precision):
                    self.probe_set = load_probe_set(self.source, tok, model=model,
                                                    **{"seed": self.seed, **self.probe_set_options})
            finally:
                _set_rng_state(rng)
        self.probe_set = self.probe_set.select(self.groups or None, prefer_mixed=True)
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if isinstance(vocab, int):
            self.probe_set.check_vocab(vocab, where="trained model")
        self._probe(args, state, control, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._probe(args, state, control, model)

    def on_save(self, args, state, control, model=None, **kwargs):
        self._probe(args, state, control, model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Fallback when no handler was found: ride along with the trainer's next log.
        if self._pending and logs is not None and not self._dispatching:
            logs.update(self._pending)
            self._pending = None

    # -- the work ----------------------------------------------------------------------------------

    def _probe(self, args, state, control, model) -> None:
        step = int(state.global_step)
        if step in self._done or model is None or self.probe_set is None or not state.is_world_process_zero:
            return
        self._done.add(step)
        metrics = self._measure(model, step)
        self._write(args, state)
        self.history.append({"step": step, **metrics})
        if self._handler is not None:
            state.log_history.append({**metrics, "step": step})
            # call_event, not handler.on_log: that one clears control.should_log and would cancel
            # the trainer's own log of this step. The control flags are restored all the same.
            flags = dict(vars(control))
            self._dispatching = True
            try:
                self._handler.call_event("on_log", args, state, control, logs=dict(metrics))
            finally:
                self._dispatching = False
                vars(control).update(flags)
        else:
            self._pending = {**(self._pending or {}), **metrics}

    def _measure(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        from ..probes.capture import forward_group, pad_id_of
        from ..probes.interference import interference_probe
        from ..probes.lld import lld_along_run, scores_from_forwards
        from ..results import ScoresResult

        was_training, rng = model.training, _rng_state()
        need = "interference" in self.probes
        model.eval()
        try:
            with torch.no_grad(), _own_precision(model, self.full_precision):
                pad = pad_id_of(model)
                for start in range(0, self.probe_set.n_groups, 8):
                    one = replace(self.probe_set, groups=self.probe_set.groups[start : start + 8])
                    fwd = [forward_group(model, g, keep_hidden=need, keep_logits=need, pad_id=pad) for g in one.groups]
                    self._parts["scores"].append(scores_from_forwards(fwd, step=step))
                    if need:
                        self._parts["interference"].append(interference_probe(
                            model, one, step=step, forwards=fwd, max_cosine_samples=self.max_cosine_samples,
                            seed=self.seed))
                    del fwd
        finally:
            model.train(was_training)
            _set_rng_state(rng)
        scores = ScoresResult.concat(self._parts["scores"])
        metrics: dict[str, float] = {}
        now = scores.responses[scores.responses.step == step]
        if "entropy" in self.probes:
            n = now.n_tokens.sum()
            metrics["probe/entropy"] = float((now.entropy_mean * now.n_tokens).sum() / n) if n else float("nan")
            pos = now[now.is_positive]
            metrics["probe/logp_pos_mean"] = float(pos.logp_sum.mean()) if len(pos) else float("nan")
        if "lld" in self.probes:
            d = lld_along_run(scores, eps=self.eps).deltas
            if len(d):
                d = d[(d.comparison == "vs_initial") & (d.step_to == step) & d.delta_pos_sum.notna()]
                if len(d):
                    metrics["probe/lld_delta_mean"] = float(d.delta_pos_sum.mean())
                    metrics["probe/lld_frac"] = float(d.lld_sum.astype(float).mean())
        if need and self._parts["interference"]:
            g = self._parts["interference"][-1].groups
            g = g[g.status == "ok"]
            if len(g):
                metrics["probe/interference_cos_mean"] = float(g.cos_mean.mean())
                metrics["probe/interference_head_update_cosine"] = float(g.head_update_cosine.mean())
        return {k: v for k, v in metrics.items() if np.isfinite(v)}

    def _write(self, args, state) -> None:
        """Rewrite ``out`` as one set (staged, then swapped in; summary.json last), as ``resrl probe`` does."""
        from ..probes.lld import lld_along_run
        from ..results import InterferenceResult, ScoresResult, _replace_dir, atomic_write_text, to_jsonable

        steps = sorted(self._done)
        common = {"run_dir": str(args.output_dir), "probe_set": self.probe_set.describe(), "steps": steps,
                  "writer": "ProbeCallback"}
        scores = ScoresResult.concat(self._parts["scores"]).with_meta(**common)
        results: dict[str, Any] = {"scores": scores}
        if "lld" in self.probes:
            results["lld"] = lld_along_run(scores, eps=self.eps).with_meta(**common)
        if "interference" in self.probes:
            results["interference"] = InterferenceResult.concat(self._parts["interference"]).with_meta(**common)
        out: Path = self.out  # type: ignore[assignment]
        out.mkdir(parents=True, exist_ok=True)
        staging = out / f".staging-{uuid.uuid4().hex[:8]}"
        try:
            for name, res in results.items():
                res.save(staging / name, format=self.format)
            summary = {
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "run_dir": str(args.output_dir), "mode": "live", "writer": "resrl_analysis.integrations.trl."
                "ProbeCallback", "out": str(out), "checkpoints": [{"step": s, "path": None} for s in steps],
                "probe_set": self.probe_set.describe(), "probes": sorted(self.probes),
                "results": {name: {"path": name, "kind": res.KIND, **res.summary()} for name, res in results.items()},
                "skipped": [{"probe": name, **s} for name, res in results.items() for s in res.skipped],
            }
            atomic_write_text(staging / "summary.json", json.dumps(to_jsonable(summary), indent=1, allow_nan=False))
            (out / "summary.json").unlink(missing_ok=True)
            for name in results:
                _replace_dir(staging / name, out / name)
            os.replace(staging / "summary.json", out / "summary.json")
        except OSError as e:
            raise ProbeError(f"{out}: cannot write probe results ({e.strerror or e})") from e
        finally:
            shutil.rmtree(staging, ignore_errors=True)
