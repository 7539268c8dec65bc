"""Responses to whole prompts, for the callers that want token ids or text rather than a :class:`SampledBatch`.

:func:`sample_prompts` samples ``n`` responses to each of many prompts in batches, prompt ``i`` driven by its own
generator seeded with ``seeds[i]``, so a prompt's responses do not depend on its batch-mates (the diversity probe
and the probe sets sampled from a dataset); :func:`sample_responses` is one prompt of it; :func:`sample_texts`
decodes one response per prompt text from one generator (the warm start's checks). All are :func:`.api.sample`,
the rollouts' sampler, never ``model.generate`` (whose sampling defaults, top_k=50 in transformers 5, differ).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .api import sample
from .params import SamplingParams
from .prompts import encode_prompts

__all__ = ["sample_prompts", "sample_responses", "sample_texts"]


def sample_prompts(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    n: int,
    seeds: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    max_batch_rows: int = 256,
) -> list[list[list[int]]]:
    """``n`` responses to each prompt by pure sampling (``top_k=0``, ``top_p=1``), batched across prompts
    (at most ``max_batch_rows`` rows a call), prompt ``i`` driven by a generator seeded with ``seeds[i]``:
    the same responses as :func:`sample_responses` of that prompt alone with that seed. Responses are cut
    after the first EOS (EOS kept, as in a rollout); the global RNG is left untouched.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    >>> both = sample_prompts(m, [[1, 5], [1, 7, 8]], 3, [0, 1], max_new_tokens=4, eos_token_id=2)
    >>> both[1] == sample_responses(m, [1, 7, 8], 3, max_new_tokens=4, eos_token_id=2, seed=1)
    True
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if len(seeds) != len(prompt_ids):
        raise ValueError(f"seeds: one per prompt expected, got {len(seeds)} for {len(prompt_ids)} prompts")
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, n=n)
    per_call = max(1, max_batch_rows // n)  # whole prompts per call: a prompt's n rows stay together
    out: list[list[list[int]]] = []
    for start in range(0, len(prompt_ids), per_call):
        chunk = [list(p) for p in prompt_ids[start : start + per_call]]
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + per_call]]
        batch = sample(model, chunk, params, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                       generator=gens, return_logprobs=False)
        rows = batch.response_token_lists()
        out += [rows[i * n : (i + 1) * n] for i in range(len(chunk))]
    return out


def sample_responses(
    model: nn.Module,
    prompt_ids: Sequence[int],
    n: int,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
) -> list[list[int]]:
    """``n`` responses to one prompt by pure sampling (``top_k=0``, ``top_p=1``), cut after the first EOS
    (EOS kept, as in a rollout). Seeded with ``seed``; the global RNG is not touched.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    >>> r = sample_responses(m, [1, 5], 3, max_new_tokens=4, eos_token_id=2, seed=0)
    >>> len(r), all(1 <= len(x) <= 4 for x in r), r == sample_responses(m, [1, 5], 3, max_new_tokens=4, eos_token_id=2)
    (3, True, True)
    """
    return sample_prompts(model, [prompt_ids], n, [seed], max_new_tokens=max_new_tokens, temperature=temperature,
                          eos_token_id=eos_token_id, pad_token_id=pad_token_id)[0]


def sample_texts(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[str]:
    """One response per prompt text from the full softmax (no top-k, no top-p), decoded; ``temperature=0`` is greedy.

    Prompts are encoded by :func:`.prompts.encode_prompts`; every draw comes from ``generator`` (None: the global
    RNG). Responses are cut at the first EOS and decoded without special tokens.

    >>> from resrl_analysis.probes.synthetic import char_tokenizer, tiny_model
    >>> gen = torch.Generator().manual_seed(0)
    >>> outs = sample_texts(tiny_model(seed=0), char_tokenizer(), ["12*34="], 4, generator=gen)
    >>> len(outs), len(outs[0]) <= 4
    (1, True)
    """
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)
    batch = sample(model, encode_prompts(tokenizer, prompts), params, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, generator=generator, return_logprobs=False)
    rows = [r[:-1] if done else r for r, done in zip(batch.response_token_lists(), batch.finished.tolist())]  # no EOS
    return tokenizer.batch_decode(rows, skip_special_tokens=True)
