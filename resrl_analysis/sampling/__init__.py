"""The one sampler for Hugging Face causal LMs (trainer rollouts, the warm start, the diversity probe, probe sets).

The RL trainer samples ``n`` responses per prompt, then needs, for every row, the prompt (left-padded), the
response (right-padded, pad after EOS), masks, lengths, and the log-probability the sampler assigned to each
token. :func:`sample` returns all of that as a :class:`SampledBatch`.

Backends (``backend=``):

- ``"dynamic"``: our own loop, one prefill forward then one-token decode steps over HF's ``DynamicCache``.
  Works everywhere; the default on CPU.
- ``"static"``: the GPU fast path. Prefill, then a one-token decode step over HF's ``StaticCache``. On CUDA
  the decode step is compiled with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) while sampling
  runs outside the graph; if compilation fails we warn once and fall back to the uncompiled static loop.
  On CPU it runs uncompiled (useful to test the static-cache bookkeeping). The cache (length rounded up
  to a multiple of 128) and the compiled step are kept per model and batch size and reused by later calls
  with a cache at least as long, so CUDA graphs replay instead of being re-recorded;
  :func:`release_static_cache` frees them (e.g. before a memory-hungry update step).
- ``"hf"``: wraps ``model.generate`` (reference and benchmarks).
- ``"auto"``: ``"static"`` (compiled) on CUDA, ``"dynamic"`` elsewhere.

Randomness. Every random draw comes from the ``generator`` argument, so a trainer can save
``generator.get_state()`` in its checkpoint and resume bit-exactly. Sampling is inverse-CDF sampling: one
uniform number per row and step, all drawn up front in one ``torch.rand(max_new_tokens, B, generator=...)``
call on the generator's own device. That makes the amount of randomness consumed by a call independent of
the logits and of early stopping (so "restore the state, sample again" reproduces the call), lets a CPU
generator drive a CUDA model without a per-step host-to-device copy, and keeps the decode loop free of
host synchronisations except the periodic "all rows finished?" check. Given one generator per prompt, each
prompt's ``n`` rows draw a ``(max_new_tokens, n)`` block from their own generator instead, exactly what a
call with that prompt alone draws: batching prompts then changes no prompt's randomness (the diversity
probe relies on it).

Modules: ``params`` (what to sample, what comes back), ``draw`` (filtering and inverse-CDF sampling),
``decode`` (prompt packing, the shared decode loop, the dynamic-cache backend), ``static`` (static cache and
compiled decode step), ``hf_backend``, ``hf_compat`` (transformers-version guards), ``prompts`` (text to
prompt ids, EOS ids), ``api`` (:func:`sample`), ``responses`` (:func:`sample_prompts` and :func:`sample_responses`:
token ids per prompt, seeded per prompt; :func:`sample_texts`: decoded text).

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from resrl_analysis.sampling import SamplingParams, sample
    >>> cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    >>> model = LlamaForCausalLM(cfg)
    >>> batch = sample(model, [[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=4, n=2),
    ...                eos_token_id=1, pad_token_id=0, generator=torch.Generator().manual_seed(0))
    >>> batch.response_ids.shape[0], batch.prompt_index.tolist()
    (4, [0, 0, 1, 1])
"""

from .api import Backend, sample
from .draw import draw_uniforms, filter_logits, sample_from_uniforms
from .params import SampledBatch, SamplingParams
from .prompts import encode_prompt, encode_prompts, eos_token_ids
from .responses import sample_prompts, sample_responses, sample_texts
from .static import release_static_cache

__all__ = [
    "Backend",
    "SampledBatch",
    "SamplingParams",
    "draw_uniforms",
    "encode_prompt",
    "encode_prompts",
    "eos_token_ids",
    "filter_logits",
    "release_static_cache",
    "sample",
    "sample_from_uniforms",
    "sample_prompts",
    "sample_responses",
    "sample_texts",
]
