"""The static-cache backend: prefill, then a one-token decode step over HF's ``StaticCache``, compiled with
CUDA graphs on request; caches and compiled steps are kept per model and reused across calls."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any

import torch

from ..forward import position_ids
from .decode import _decode
from .hf_compat import (
    _forward_spec,
    _ForwardSpec,
    _model_call,
    _model_device_dtype,
    _new_static_cache,
    _sync,
    _warn_once,
)
from .params import SamplingParams

__all__ = ["release_static_cache"]


def _decode_forward(
    model: torch.nn.Module,
    cache: Any,
    spec: _ForwardSpec,
    input_ids: torch.Tensor,  # (B, 1)
    attention_mask: torch.Tensor,  # (B, L)
    position_ids: torch.Tensor,  # (B, 1)
    cache_position: torch.Tensor,  # (1,)
) -> torch.Tensor:
    """The one-token decode step that ``torch.compile`` captures (model and cache are arguments, as in HF's
    own compiled ``generate``, so that the compiled code holds no strong reference to either)."""
    return _model_call(model, spec, cache, input_ids, attention_mask, position_ids, cache_position)


class _StaticRunner:
    """A ``StaticCache`` plus its (optionally compiled) one-token decode step, reused across calls.

    Reuse matters on GPU: CUDA graphs are recorded against fixed tensor addresses, so a fresh cache per
    call would force a re-record (and a recompile). ``cache.reset()`` zeroes it in place. The runner holds
    no reference to the model (it is stored in a weak-keyed map from the model).
    """

    def __init__(self, model: torch.nn.Module, batch_size: int, max_len: int, compile: bool) -> None:
        device, dtype = _model_device_dtype(model)
        self.batch_size, self.max_len, self.device = batch_size, max_len, device
        self.spec = _forward_spec(model)
        self.cache = _new_static_cache(model, batch_size, max_len, device, dtype)
        # (B, L) attention mask buffer: prompt part rewritten per call, generated part always 1. Slots not
        # yet written are excluded by causality (the query's cache position), so they need no masking;
        # keeping the buffer's shape and address fixed is what lets the compiled step replay.
        self.mask = torch.ones(batch_size, max_len, dtype=torch.long, device=device)
        self.cache_positions = torch.arange(max_len, device=device)  # (L,), sliced: no host->device copy
        self.compiled: Callable[..., torch.Tensor] | None = None
        self.compile_failed = False
        if compile:
            # dynamic=False: every decode step has the same shapes, so one graph is captured and replayed.
            self.compiled = torch.compile(_decode_forward, mode="reduce-overhead", dynamic=False)

    def run(
        self,
        model: torch.nn.Module,
        prompt: torch.Tensor,  # (B, Tp)
        prompt_mask: torch.Tensor,  # (B, Tp)
        params: SamplingParams,
        uniforms: torch.Tensor | None,
        eos: torch.Tensor,
        pad_token_id: int,
        check_every: int,
        use_compiled: bool,
    ) -> tuple[tuple[torch.Tensor, ...], dict[str, float]]:
        b, tp = prompt.shape
        self.cache.reset()
        self.mask[:, :tp] = prompt_mask.long()
        self.mask[:, tp:] = 1
        positions = position_ids(self.mask[:, :tp])  # (B, Tp)
        t0 = time.perf_counter()
        # The prefill stays eager: prompt lengths vary between calls and a graph per length is not worth it.
        first = _model_call(
            model, self.spec, self.cache, prompt, self.mask, positions, self.cache_positions[:tp]
        ).float()
        _sync(self.device)
        t1 = time.perf_counter()
        # Per-step position tensors are fresh device tensors (not views of a buffer at a moving offset), so
        # the compiled step sees identical tensor metadata every step and never recompiles.
        state = {"pos": positions[:, -1:], "cache_pos": self.cache_positions[tp - 1 : tp].clone()}  # (B,1), (1,)
        compiled = self.compiled if use_compiled else None

        def step(tok: torch.Tensor, t: int) -> torch.Tensor:
            state["pos"] = state["pos"] + 1  # (B, 1)
            state["cache_pos"] = state["cache_pos"] + 1  # (1,) == tp + t: the slot this token is written to
            args = (tok[:, None], self.mask, state["pos"], state["cache_pos"])
            if compiled is None:
                return _decode_forward(model, self.cache, self.spec, *args).float()
            # A new iteration for CUDA-graph trees: outputs of the previous replay may now be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
            logits = compiled(model, self.cache, self.spec, *args)  # (B, V), lives in the graph's pool
            # Copy out of the graph's static output buffer before the next replay overwrites it.
            return logits.to(torch.float32, copy=True)

        out = _decode(first, step, params, uniforms, eos, pad_token_id, check_every)
        _sync(self.device)
        t2 = time.perf_counter()
        return out[:4], {"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_steps": float(out[4])}


# model -> list of runners (most recent last). Weak keys: dropping the model frees its caches.
_STATIC_RUNNERS: weakref.WeakKeyDictionary[torch.nn.Module, list[_StaticRunner]] = weakref.WeakKeyDictionary()
_MAX_RUNNERS_PER_MODEL = 2
_STATIC_LEN_BUCKET = 128  # cache length rounded up to a multiple of this: fewer distinct graphs/compiles


def release_static_cache(model: torch.nn.Module | None = None) -> None:
    """Free the static KV caches (and compiled decode steps) kept for ``model`` (all models if None).

    The ``static`` backend keeps its cache between calls so CUDA graphs can replay; a trainer that needs the
    memory for its update step can release it and pay a re-record (not a recompile of new shapes) later.

    Example:
        >>> release_static_cache()
    """
    if model is None:
        _STATIC_RUNNERS.clear()
    else:
        _STATIC_RUNNERS.pop(model, None)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _get_static_runner(model: torch.nn.Module, batch_size: int, needed_len: int, compile: bool) -> _StaticRunner:
    runners = _STATIC_RUNNERS.setdefault(model, [])
    # Reuse any runner with the same batch size and a long enough cache: attending over a few extra
    # (masked) slots is far cheaper than compiling and recording a new graph.
    for r in reversed(runners):
        if r.batch_size == batch_size and r.max_len >= needed_len and (r.compiled is not None) == compile:
            runners.remove(r)
            runners.append(r)
            return r
    max_len = -(-needed_len // _STATIC_LEN_BUCKET) * _STATIC_LEN_BUCKET
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and needed_len <= limit < max_len:
        max_len = limit
    runner = _StaticRunner(model, batch_size, max_len, compile)
    runners.append(runner)
    del runners[:-_MAX_RUNNERS_PER_MODEL]
    return runner


def _run_static(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    prompt_mask: torch.Tensor,
    params: SamplingParams,
    uniforms: torch.Tensor | None,
    eos: torch.Tensor,
    pad_token_id: int,
    check_every: int,
    compile: bool,
) -> tuple[tuple[torch.Tensor, ...], dict[str, float], str]:
    b, tp = prompt.shape
    runner = _get_static_runner(model, b, tp + params.max_new_tokens, compile)
    args = (model, prompt, prompt_mask, params, uniforms, eos, pad_token_id, check_every)
    if runner.compiled is not None and not runner.compile_failed:
        try:
            out, stats = runner.run(*args, use_compiled=True)
            return out, stats, "static+compile"
        except Exception as exc:  # noqa: BLE001 - any compile/capture failure falls back to eager
            runner.compile_failed = True
            _warn_once(
                "static-compile",
                f"resrl_analysis.sampling: compiled static decode failed ({type(exc).__name__}: {exc}); "
                "falling back to the uncompiled static-cache loop.",
            )
    # The uniforms were drawn up front, so a rerun after a failed compiled attempt samples the same tokens.
    out, stats = runner.run(*args, use_compiled=False)
    return out, stats, "static"
