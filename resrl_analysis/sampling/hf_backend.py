"""The ``hf`` backend: ``model.generate`` with our parameters (reference and benchmarks)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from .decode import _eos_tensor
from .hf_compat import _sync
from .params import SamplingParams


def _run_hf(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    prompt_mask: torch.Tensor,
    params: SamplingParams,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    generator: torch.Generator | None,
    return_logprobs: bool,
) -> tuple[tuple[torch.Tensor, ...], dict[str, float]]:
    """``model.generate`` with our parameters; the RNG is seeded from ``generator`` inside ``fork_rng``."""
    import copy

    device = prompt.device
    gen_config = copy.deepcopy(model.generation_config)
    # Reset everything a checkpoint's generation_config could add (repetition penalty, min length, ...),
    # then set ours explicitly: transformers 5 samples with top_k=50 unless told top_k=0.
    for key, value in {
        "max_new_tokens": params.max_new_tokens,
        "min_new_tokens": None,
        "min_length": 0,
        "max_length": None,
        "do_sample": not params.greedy,
        "temperature": params.temperature if not params.greedy else 1.0,
        "top_k": params.top_k if not params.greedy else None,
        "top_p": params.top_p if not params.greedy else None,
        "min_p": None,
        "typical_p": None,
        "repetition_penalty": None,
        "num_beams": 1,
        "num_return_sequences": 1,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "output_scores": return_logprobs,
        "return_dict_in_generate": True,
    }.items():
        setattr(gen_config, key, value)
    seed = None
    if generator is not None and not params.greedy:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    devices = [device] if device.type == "cuda" else []
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(
            input_ids=prompt, attention_mask=prompt_mask.long(), generation_config=gen_config
        )
    _sync(device)
    t1 = time.perf_counter()
    tokens = out.sequences[:, prompt.shape[1] :]  # (B, T)
    b, t = tokens.shape
    eos = _eos_tensor(eos_token_id, device)
    is_eos = torch.isin(tokens, eos)  # (B, T)
    # Length = up to and including the first EOS (HF pads after it), else the full length.
    first_eos = torch.where(is_eos.any(-1), is_eos.float().argmax(-1) + 1, torch.full((b,), t, device=device))
    finished = is_eos.any(-1)
    logprobs = None
    if return_logprobs and out.scores is not None:
        scores = torch.stack([s.float() for s in out.scores], dim=1)  # (B, T, V) processed (warped) scores
        logprobs = torch.log_softmax(scores, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)  # (B, T)
    stats = {"prefill_s": float("nan"), "decode_s": t1 - t0, "decode_steps": float(t)}
    return (tokens, logprobs, first_eos.long(), finished), stats
