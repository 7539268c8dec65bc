"""The sampler's entry point, :func:`sample`, over the three backends."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal

import torch

from .decode import _assemble, _eos_tensor, _pack_prompts, _run_dynamic
from .draw import draw_uniforms
from .hf_backend import _run_hf
from .hf_compat import _eval_mode, _model_device_dtype
from .params import SampledBatch, SamplingParams
from .static import _run_static

__all__ = ["Backend", "sample"]

Backend = Literal["auto", "dynamic", "static", "hf"]
_BACKENDS = ("auto", "dynamic", "static", "hf")


def _uniforms(
    params: SamplingParams,
    n_prompts: int,
    b: int,
    generator: torch.Generator | Sequence[torch.Generator] | None,
    device: torch.device,
) -> torch.Tensor:
    """All randomness of a call, drawn at once: (max_new_tokens, B) float64 uniforms."""
    if not isinstance(generator, Sequence):
        return draw_uniforms((params.max_new_tokens, b), generator, device)
    # One block of (max_new_tokens, n) per prompt from its own generator: what a one-prompt call draws.
    return torch.cat([draw_uniforms((params.max_new_tokens, params.n), g, device) for g in generator], dim=1)


def sample(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    backend: Backend = "auto",
    compile: bool | None = None,
    return_logprobs: bool = True,
    check_every: int | None = None,
) -> SampledBatch:
    """Sample ``params.n`` responses for each prompt.

    Args:
        model: a Hugging Face causal LM (any dtype/device). It is put in eval mode for the call and
            restored afterwards; no gradients are recorded.
        prompt_ids: unpadded token ids, one list per prompt.
        params: sampling settings; see :class:`SamplingParams`.
        eos_token_id: id (or ids) that end a response; None generates ``max_new_tokens`` for every row.
        pad_token_id: id used for left-padding prompts and right-padding responses.
        generator: the only source of randomness (any device); save/restore its state to resume exactly.
            None uses the global RNG of the model's device. A sequence gives one generator per prompt:
            prompt ``i``'s ``n`` rows then draw their uniforms from ``generator[i]`` alone, exactly as a
            call with that prompt alone would, so a prompt's samples do not depend on its batch-mates
            (up to the floating-point effect of batching and padding on the logits). The ``"hf"`` backend
            draws one seed from a single generator and runs ``generate`` under ``torch.random.fork_rng``
            with that seed (global RNG left untouched).
        backend: ``"auto"`` | ``"dynamic"`` | ``"static"`` | ``"hf"`` (see the module docstring).
        compile: for ``"static"``: compile the decode step with CUDA graphs. Default: only on CUDA.
        return_logprobs: also return ``response_logprobs``. Free for our loops; for ``"hf"`` it keeps
            every step's scores, ``O(B * Tr * V)`` memory.
        check_every: check "all rows finished" every this many steps (a host sync). Default: 1 on CPU,
            16 on CUDA.

    Returns:
        A :class:`SampledBatch` with ``B = len(prompt_ids) * params.n`` rows.

    Example:
        >>> import torch
        >>> from transformers import Qwen3Config, Qwen3ForCausalLM
        >>> cfg = Qwen3Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                   num_attention_heads=4, num_key_value_heads=2, head_dim=8)
        >>> model = Qwen3ForCausalLM(cfg)
        >>> out = sample(model, [[3, 4, 5]], SamplingParams(temperature=0, max_new_tokens=3),
        ...              eos_token_id=None, pad_token_id=0)
        >>> out.response_ids.shape, out.response_lengths.tolist(), out.finished.tolist()
        (torch.Size([1, 3]), [3], [False])
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    if isinstance(generator, Sequence):
        if len(generator) != len(prompt_ids):
            raise ValueError(f"generator: one per prompt expected, got {len(generator)} for {len(prompt_ids)} prompts")
        if backend == "hf":
            raise ValueError("backend 'hf' takes one generator, not one per prompt")
    device, _ = _model_device_dtype(model)
    if backend == "auto":
        backend = "static" if device.type == "cuda" else "dynamic"
    if compile is None:
        compile = device.type == "cuda"
    if check_every is None:
        check_every = 16 if device.type == "cuda" else 1
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")

    prompt, prompt_mask, index = _pack_prompts(prompt_ids, params.n, pad_token_id, device)  # (B, Tp) x2, (B,)
    b = prompt.shape[0]
    eos = _eos_tensor(eos_token_id, device)
    t0 = time.perf_counter()
    with torch.no_grad(), _eval_mode(model):
        if backend == "hf":
            out, stats = _run_hf(
                model, prompt, prompt_mask, params, eos_token_id, pad_token_id, generator, return_logprobs
            )
            tokens, logprobs, lengths, finished = out
            used = "hf"
        else:
            # All randomness of the call, drawn at once: (max_new_tokens, B) uniforms.
            uniforms = None if params.greedy else _uniforms(params, len(prompt_ids), b, generator, device)
            args = (model, prompt, prompt_mask, params, uniforms, eos, pad_token_id, check_every)
            if backend == "dynamic":
                out, stats = _run_dynamic(*args)
                used = "dynamic"
            else:
                out, stats, used = _run_static(*args, compile=compile)
            tokens, logprobs, lengths, finished = out
    stats["total_s"] = time.perf_counter() - t0
    return _assemble(
        prompt,
        prompt_mask,
        index,
        tokens,
        logprobs if return_logprobs else None,
        lengths,
        finished,
        pad_token_id,
        used,
        stats,
    )
