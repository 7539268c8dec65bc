"""Logit filtering and inverse-CDF sampling of one token per row (shared by every decode loop)."""

from __future__ import annotations

import torch

from .params import SamplingParams

__all__ = ["draw_uniforms", "filter_logits", "sample_from_uniforms"]


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering, in float32.

    Removed tokens get ``-inf``. ``temperature`` 0 (greedy) leaves the scale unchanged. The order and
    semantics follow HF's warpers: top-k keeps every token whose logit ties the k-th largest; top-p keeps a
    token when the total probability of the tokens ranked strictly above it is below ``top_p`` (so the most
    probable token always survives).

    Args:
        logits: ``(..., V)`` scores of any float dtype.
        temperature: ``>= 0``.
        top_k: ``>= 0``; 0 disables.
        top_p: in ``(0, 1]``; 1 disables.

    Returns:
        ``(..., V)`` float32 logits.

    Example:
        >>> filter_logits(torch.tensor([1.0, 3.0, 2.0, 0.0]), 1.0, 2, 1.0).tolist()
        [-inf, 3.0, 2.0, -inf]
    """
    out = logits.float()  # (..., V); float32 so that the filtering thresholds are not bf16-rounded
    if temperature > 0 and temperature != 1.0:
        out = out / temperature
    vocab = out.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]  # (..., 1)
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(out, dim=-1, descending=True)  # (..., V)
        probs = sorted_logits.softmax(dim=-1)
        mass_above = probs.cumsum(dim=-1) - probs  # exclusive cumsum: mass ranked strictly higher
        remove_sorted = mass_above >= top_p  # never true at rank 0, so at least one token survives
        remove = torch.zeros_like(remove_sorted).scatter(-1, sorted_idx, remove_sorted)
        out = out.masked_fill(remove, float("-inf"))
    return out


def draw_uniforms(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Float64 uniforms in [0, 1) drawn from ``generator`` on its own device, then moved to ``device``.

    Drawing on the generator's device lets a CPU generator drive a CUDA model without a per-step copy.

    >>> draw_uniforms((2, 3), torch.Generator().manual_seed(0), torch.device("cpu")).shape
    torch.Size([2, 3])
    """
    if generator is None:
        return torch.rand(shape, dtype=torch.float64, device=device)
    u = torch.rand(shape, dtype=torch.float64, generator=generator, device=generator.device)
    return u.to(device)


def sample_from_uniforms(
    logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row by inverse-CDF sampling with the given ``(B,)`` uniforms.

    Token ``i`` of row ``b`` is taken when ``uniforms[b]`` falls in its slice of the filtered
    distribution's CDF (:func:`filter_logits`: temperature, top-k, top-p); the same uniforms and logits
    always give the same tokens, which is what makes a seeded sampler reproducible.

    Args:
        logits: ``(B, V)`` scores of any float dtype.
        uniforms: ``(B,)`` numbers in [0, 1), e.g. from :func:`draw_uniforms`; unused (may be None) when
            greedy.

    Returns:
        ``(tokens (B,) long, logprobs (B,) float32)``: the tokens and their log-probabilities under the
        sampling distribution (under the unscaled model distribution when greedy).

    Example:
        >>> tok, lp = sample_from_uniforms(torch.tensor([[0.0, 10.0, -10.0]]), SamplingParams(top_k=1),
        ...                                torch.tensor([0.3]))
        >>> tok.tolist(), lp.tolist()
        ([1], [0.0])
        >>> sample_from_uniforms(torch.zeros(1, 3), SamplingParams(), torch.tensor([0.9]))[0].tolist()  # CDF 1/3 2/3 1
        [2]
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, V), got shape {tuple(logits.shape)}")
    logits = logits.float()  # (B, V)
    if params.greedy:
        tokens = logits.argmax(dim=-1)  # (B,)
        logprobs = logits.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (B,)
        return tokens, logprobs
    if uniforms is None:
        raise ValueError("sampling (temperature > 0) needs uniforms")
    filtered = filter_logits(logits, params.temperature, params.top_k, params.top_p)  # (B, V), -inf = removed
    # float64 probabilities and CDF: with V ~ 150k a float32 running sum drifts visibly near the tail.
    probs = torch.softmax(filtered, dim=-1, dtype=torch.float64)  # (B, V)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    target = uniforms.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]  # (B, 1), in [0, total)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(cdf.shape[-1] - 1)  # (B,)
    # right=True never lands on a zero-probability token (its CDF equals its predecessor's) except when
    # rounding pushes the target up to the total; then fall back to the most probable token.
    chosen_p = probs.gather(-1, tokens[:, None]).squeeze(-1)  # (B,)
    tokens = torch.where(chosen_p > 0, tokens, filtered.argmax(dim=-1))
    # log q(token) without materialising a (B, V) log-softmax
    logprobs = filtered.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(filtered, dim=-1)  # (B,)
    return tokens, logprobs
