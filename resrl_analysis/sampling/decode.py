"""Prompt packing, the decode loop every backend shares, and the dynamic-cache backend."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..forward import position_ids
from .draw import sample_from_uniforms
from .hf_compat import _forward_spec, _model_call, _new_dynamic_cache, _sync
from .params import SampledBatch, SamplingParams


def _pack_prompts(
    prompt_ids: Sequence[Sequence[int]], n: int, pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad and repeat each prompt ``n`` times (contiguously): ``ids (B, Tp)``, ``mask (B, Tp)``, index."""
    if isinstance(prompt_ids, torch.Tensor) or len(prompt_ids) == 0:
        raise ValueError("prompt_ids must be a non-empty list of token-id lists (unpadded)")
    rows = [list(map(int, p)) for p in prompt_ids]
    if any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    tp = max(len(r) for r in rows)
    padded = [[pad_token_id] * (tp - len(r)) + r for r in rows]
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.tensor(padded, dtype=torch.long)  # (P, Tp)
    mask = torch.arange(tp)[None, :] >= (tp - lengths)[:, None]  # (P, Tp) bool
    index = torch.arange(len(rows)).repeat_interleave(n)  # (B,)
    return ids[index].to(device), mask[index].to(device), index.to(device)


def _eos_tensor(eos_token_id: int | Sequence[int] | None, device: torch.device) -> torch.Tensor:
    if eos_token_id is None:
        return torch.empty(0, dtype=torch.long, device=device)
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device)


def _decode(
    first_logits: torch.Tensor,  # (B, V) float32, from the prefill
    step: Callable[[torch.Tensor, int], torch.Tensor],  # (tokens (B,), t) -> logits (B, V) float32
    params: SamplingParams,
    uniforms: torch.Tensor | None,  # (max_new_tokens, B) float64, None when greedy
    eos: torch.Tensor,  # (E,)
    pad_token_id: int,
    check_every: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Sample up to ``max_new_tokens`` tokens; finished rows are frozen to ``pad`` and stop counting.

    Returns ``(tokens (B, T), logprobs (B, T), lengths (B,), finished (B,), steps)`` with ``T`` = steps run.
    """
    b, device = first_logits.shape[0], first_logits.device
    max_new = params.max_new_tokens
    tokens_out = torch.full((b, max_new), pad_token_id, dtype=torch.long, device=device)  # (B, T)
    logprobs_out = torch.zeros((b, max_new), dtype=torch.float32, device=device)  # (B, T)
    lengths = torch.zeros(b, dtype=torch.long, device=device)  # (B,)
    finished = torch.zeros(b, dtype=torch.bool, device=device)  # (B,)
    logits = first_logits
    steps = 0
    for t in range(max_new):
        tok, lp = sample_from_uniforms(logits, params, None if uniforms is None else uniforms[t])
        alive = ~finished
        tok = torch.where(alive, tok, torch.full_like(tok, pad_token_id))
        tokens_out[:, t] = tok
        logprobs_out[:, t] = torch.where(alive, lp, torch.zeros_like(lp))
        lengths += alive.long()
        finished = finished | (alive & torch.isin(tok, eos))
        steps = t + 1
        if t == max_new - 1:
            break  # the last token is never fed back: no forward needed
        # `finished.all()` syncs with the device; on GPU check only every few steps so the host can queue
        # work ahead. Extra steps are harmless: finished rows keep emitting pad.
        if (t + 1) % check_every == 0 and bool(finished.all()):
            break
        logits = step(tok, t)
    return tokens_out[:, :steps], logprobs_out[:, :steps], lengths, finished, steps


def _assemble(
    prompt: torch.Tensor,
    prompt_mask: torch.Tensor,
    index: torch.Tensor,
    tokens: torch.Tensor,
    logprobs: torch.Tensor | None,
    lengths: torch.Tensor,
    finished: torch.Tensor,
    pad_token_id: int,
    backend: str,
    stats: dict[str, float],
) -> SampledBatch:
    tr = max(int(lengths.max()), 1) if lengths.numel() else 1  # keep one column so shapes stay (B, >=1)
    tokens = tokens[:, :tr]
    if tokens.shape[1] < tr:  # pragma: no cover - defensive
        tokens = F.pad(tokens, (0, tr - tokens.shape[1]), value=pad_token_id)
    mask = torch.arange(tr, device=tokens.device)[None, :] < lengths[:, None]  # (B, Tr)
    tokens = tokens.masked_fill(~mask, pad_token_id)
    if logprobs is not None:
        logprobs = logprobs[:, :tr].masked_fill(~mask, 0.0)
    return SampledBatch(
        prompt_ids=prompt,
        prompt_mask=prompt_mask,
        response_ids=tokens,
        response_mask=mask,
        response_lengths=lengths,
        finished=finished,
        prompt_index=index,
        response_logprobs=logprobs,
        backend=backend,
        stats=stats,
    )



def _run_dynamic(
    model: torch.nn.Module,
    prompt: torch.Tensor,  # (B, Tp)
    prompt_mask: torch.Tensor,  # (B, Tp)
    params: SamplingParams,
    uniforms: torch.Tensor | None,
    eos: torch.Tensor,
    pad_token_id: int,
    check_every: int,
) -> tuple[tuple[torch.Tensor, ...], dict[str, float]]:
    spec = _forward_spec(model)
    device = prompt.device
    b, tp = prompt.shape
    cache = _new_dynamic_cache(model)
    mask = prompt_mask.long()  # (B, Tp), grows by one column per step
    positions = position_ids(mask)  # (B, Tp)
    t0 = time.perf_counter()
    first = _model_call(model, spec, cache, prompt, mask, positions, torch.arange(tp, device=device)).float()
    _sync(device)
    t1 = time.perf_counter()
    state = {"mask": mask, "pos": positions[:, -1:]}  # (B, kv), (B, 1)

    def step(tok: torch.Tensor, t: int) -> torch.Tensor:
        state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(b, 1)], dim=1)  # (B, Tp+t+1)
        state["pos"] = state["pos"] + 1  # (B, 1)
        cache_position = torch.arange(tp + t, tp + t + 1, device=device)  # (1,)
        return _model_call(model, spec, cache, tok[:, None], state["mask"], state["pos"], cache_position).float()

    out = _decode(first, step, params, uniforms, eos, pad_token_id, check_every)
    _sync(device)
    t2 = time.perf_counter()
    return out[:4], {"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_steps": float(out[4])}
