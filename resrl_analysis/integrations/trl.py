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
import random
import sys
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from .. import rundir
from ..errors import ProbeError
from ..probe_sets import ProbeSet, load_probe_set
from ..probes.config import ProbeConfig
from ..probes.engine import ProbePass
from ..probes.interference import InterferenceOptions
from ..probes.lld import LLDOptions
from ..probes.output import results_summary, write_results
from ..probes.registry import REGISTRY
from ..results import ProbeResult

__all__ = ["ProbeCallback", "TokenIdsCallback", "LIVE_PROBES", "live_probes", "record_token_ids"]


def record_token_ids(trainer: Any) -> Any:
    """Make a TRL ``GRPOTrainer`` log the exact token ids it generated: its completion logs
    (``completions/completions_NNNNN.parquet``, ``log_completions=True``) gain the columns ``prompt_ids`` and
    ``completion_ids``, one row each beside the text, so ``resrl probe`` scores exactly the tokens TRL sampled
    (EOS included when a completion finished, none when it was cut at ``max_completion_length``).

        trainer = GRPOTrainer(...)
        record_token_ids(trainer)
        trainer.train()

    It wraps the trainer's generation step and hands the ids to TRL's own extra-column logging (the channel a
    reward function's ``log_extra`` uses), so they are gathered across processes with the rows they belong to.
    Training is unchanged. Returns the trainer; calling it twice records once.

    Raises:
        TypeError: ``trainer`` is not a GRPOTrainer of a TRL that has these hooks (``_generate``,
            ``_log_completion_extra``: TRL 0.2x and 1.x).
    """
    gen = getattr(trainer, "_generate", None)
    log = getattr(trainer, "_log_completion_extra", None)
    if not callable(gen) or not callable(log):
        raise TypeError(f"record_token_ids: {type(trainer).__name__} has no _generate/_log_completion_extra; "
                        "it needs TRL's GRPOTrainer")
    if getattr(gen, "_resrl_records_ids", False):
        return trainer

    def _generate(*args: Any, **kwargs: Any) -> Any:  # whatever this TRL version passes (prompts, images, ...)
        out = gen(*args, **kwargs)
        prompt_ids, completion_ids = out[0], out[1]  # one list of ids per row, as TRL generated them
        log("prompt_ids", [[int(t) for t in p] for p in prompt_ids])
        log("completion_ids", [[int(t) for t in c] for c in completion_ids])
        return out

    _generate._resrl_records_ids = True  # type: ignore[attr-defined]
    trainer._generate = _generate
    return trainer


def _trainer_of_caller() -> Any:
    # Events carry no reference to the trainer; Trainer's training loop, a few frames up, is its `self`.
    f = sys._getframe(1)
    for _ in range(8):
        if f is None:
            return None
        owner = f.f_locals.get("self")
        if owner is not None and callable(getattr(owner, "_generate", None)) and hasattr(owner, "callback_handler"):
            return owner
        f = f.f_back
    return None


class TokenIdsCallback(TrainerCallback):
    """A TRL callback that does :func:`record_token_ids` on the trainer it is given to, at the start of training.

        trainer = GRPOTrainer(..., args=GRPOConfig(log_completions=True, ...), callbacks=[TokenIdsCallback()])

    (``ProbeCallback`` does the same unless ``record_token_ids=False``.)
    """

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = _trainer_of_caller()
        if trainer is not None:
            record_token_ids(trainer)


def live_probes() -> tuple[str, ...]:
    """The registered probes that can run inside a training run (``live = True``)."""
    return tuple(n for n, p in REGISTRY.items() if p.live)


#: What a ProbeCallback runs when not told: the live probes marked ``live_default`` (any probe of
#: :func:`live_probes`, e.g. ``entropy_dynamics``, can be asked for with ``probes=``).
LIVE_PROBES = tuple(n for n in live_probes() if REGISTRY[n].live_default)


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
        probe_set: a loaded :class:`~resrl_analysis.probe_sets.ProbeSet` or a path in any format
            of :func:`resrl_analysis.probe_sets.load_probe_set` (text is encoded with the trainer's
            tokenizer; a dataset file is sampled once with the starting policy).
        probes: any registered probe that can run live (``live = True`` in :mod:`resrl_analysis.probes.registry`;
            built in: ``"lld"``, ``"entropy"``, ``"interference"``).
        every: probe every ``every`` optimizer steps (and at each save, and at step 0).
        groups: probe the first ``groups`` prompt groups, mixed ones first (0 = all).
        out: where the tables go (default ``<output_dir>/probes``).
        eps: LLD threshold.
        seed: seed of the interference probe's cosine sub-sampling (and of sampling a dataset).
        options: probe name → its ``Options`` (e.g. a registered probe's own settings); ``eps`` and
            ``max_cosine_samples`` fill in the built-in probes' when not given here.
        full_precision: score outside the trainer's mixed-precision autocast, in the weights' own
            dtype, so the numbers equal those of ``resrl probe`` on the saved checkpoints; False
            scores through the forward that training uses.
        probe_set_options: more keywords of :func:`~resrl_analysis.probe_sets.load_probe_set`
            (``n_samples``, ``max_new_tokens``, ``answer_column``, ``step`` ...).
        record_token_ids: make a GRPOTrainer's completion logs hold the exact prompt and completion ids it
            generated (:func:`record_token_ids`), so ``resrl probe`` scores them exactly afterwards.

    >>> cb = ProbeCallback(ProbeSet(()), every=5)
    >>> cb.every, cb.probes
    (5, ('lld', 'entropy', 'interference'))
    """

    def __init__(self, probe_set: ProbeSet | str | Path, probes: Sequence[str] = LIVE_PROBES, every: int = 50, *,
                 groups: int = 8, out: str | Path | None = None, eps: float = 0.0, seed: int = 0,
                 max_cosine_samples: int = 256, format: str = "parquet", options: Mapping[str, Any] | None = None,
                 probe_set_options: dict | None = None, full_precision: bool = True,
                 record_token_ids: bool = True) -> None:
        probes = tuple(probes)
        live = live_probes()
        bad = sorted(set(probes) - set(live))
        if bad or not probes:
            raise ValueError(f"ProbeCallback: unknown probes {bad}; choose from {','.join(live)}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"ProbeCallback: every must be a positive int, got {every!r}")
        if groups < 0:
            raise ValueError(f"ProbeCallback: groups must be >= 0, got {groups}")
        self.source, self.probes, self.every, self.groups = probe_set, probes, every, groups
        self.out = None if out is None else Path(out)
        self.eps, self.seed, self.max_cosine_samples, self.format = eps, seed, max_cosine_samples, format
        given = dict(options or {})
        defaults = {"lld": LLDOptions(eps=eps), "interference": InterferenceOptions(max_cosine_samples)}
        # No whole-model steps live (a training step's gradients must not be disturbed): full_model_steps none.
        self.config = ProbeConfig(probes=list(probes), groups=groups, seed=seed, full_model_steps="none",
                                  format=format, options={n: given.get(n) or defaults.get(n) for n in
                                                          {*given, *(n for n in defaults if n in probes)}})
        self.probe_set_options = dict(probe_set_options or {})
        self.full_precision = full_precision
        self.record_token_ids = record_token_ids
        self.probe_set: ProbeSet | None = probe_set if isinstance(probe_set, ProbeSet) else None
        self.history: list[dict] = []  # the logged headline numbers, one dict per probed step
        self._pass: ProbePass | None = None
        self._done: set[int] = set()
        self._handler: CallbackHandler | None = None
        self._pending: dict | None = None
        self._dispatching = False

    # -- events ------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._handler = _handler_of_caller()
        if self.record_token_ids and (trainer := _trainer_of_caller()) is not None:
            record_token_ids(trainer)
        if self.out is None:
            self.out = Path(args.output_dir) / rundir.PROBES
        tok = getattr(processing_class, "tokenizer", processing_class)  # a multimodal processor wraps one
        if self.probe_set is None:
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
        self._pass = ProbePass(self.config, self.probe_set)
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
        if step in self._done or model is None or self._pass is None or not state.is_world_process_zero:
            return
        self._done.add(step)
        results = self._measure(model, step)
        metrics = {k: v for k, v in self._pass.live_metrics(results, step).items() if np.isfinite(v)}
        self._write(args, results)
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

    def _measure(self, model: torch.nn.Module, step: int) -> dict[str, ProbeResult]:
        """Probe the live model as step ``step``: eval mode, no gradients, RNG states restored afterwards."""
        assert self._pass is not None
        was_training, rng = model.training, _rng_state()
        model.eval()
        try:
            with torch.no_grad(), _own_precision(model, self.full_precision):
                self._pass.run_model(model, step)
        finally:
            model.train(was_training)
            _set_rng_state(rng)
        return self._pass.results()

    def _write(self, args, results: dict[str, ProbeResult]) -> None:
        """Rewrite ``out`` as one set (staged, then swapped in; summary.json last), as ``resrl probe`` does."""
        assert self._pass is not None and self.probe_set is not None
        steps = sorted(self._done)
        common = {"run_dir": str(args.output_dir), "probe_set": self.probe_set.describe(), "steps": steps,
                  "writer": "ProbeCallback"}
        results = {name: res.with_meta(**common) for name, res in results.items()}
        summary = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run_dir": str(args.output_dir), "mode": "live", "writer": "resrl_analysis.integrations.trl."
            "ProbeCallback", "out": str(self.out), "checkpoints": [{"step": s, "path": None} for s in steps],
            "probe_set": self.probe_set.describe(), "probes": sorted(self.probes), **results_summary(results),
        }
        try:
            write_results(self.out, results, summary, format=self.format)  # type: ignore[arg-type]
        except OSError as e:
            raise ProbeError(f"{self.out}: cannot write probe results ({e.strerror or e})") from e
