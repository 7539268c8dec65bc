"""Rollout (sampling) engine for Hugging Face causal LMs.

The RL trainer samples ``n`` responses per prompt, then needs, for every row, the prompt (left-padded), the
response (right-padded, pad after EOS), masks, lengths, and the log-probability the sampler assigned to each
token. :func:`sample` returns all of that as a :class:`RolloutBatch`.

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
host synchronisations except the periodic "all rows finished?" check.

Version notes. Recent transformers 5.x releases renamed the forward's ``past_key_values`` argument to
``cache`` and dropped ``cache_position`` (5.24 has neither); we read the model's forward signature and pass
whichever it accepts, so the same code runs on transformers 5.17 (GPU image) and 5.24 (this environment).
Cache constructors are called through the same kind of signature check.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from trainer.rollout import SamplingParams, sample
    >>> cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    >>> model = LlamaForCausalLM(cfg)
    >>> batch = sample(model, [[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=4, n=2),
    ...                eos_token_id=1, pad_token_id=0, generator=torch.Generator().manual_seed(0))
    >>> batch.response_ids.shape[0], batch.prompt_index.tolist()
    (4, [0, 0, 1, 1])
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

__all__ = [
    "Backend",
    "RolloutBatch",
    "SamplingParams",
    "filter_logits",
    "release_static_cache",
    "sample",
    "sample_next",
]

Backend = Literal["auto", "dynamic", "static", "hf"]
_BACKENDS = ("auto", "dynamic", "static", "hf")


# --------------------------------------------------------------------------------------------------------
# Parameters and result
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """How to sample responses.

    Attributes:
        temperature: logits are divided by it before filtering; ``0`` means greedy (argmax).
        top_p: nucleus filtering: keep the smallest set of most probable tokens whose total probability
            reaches ``top_p`` (``1.0`` disables it).
        top_k: keep only the ``top_k`` highest logits (ties with the k-th kept); ``0`` disables it.
        max_new_tokens: most tokens generated per response (EOS included).
        n: responses per prompt; the ``n`` rows of one prompt are contiguous in the batch.

    Example:
        >>> SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=128, n=8).n
        8
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    n: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number, got {self.temperature!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 disables nucleus filtering), got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables top-k), got {self.top_k!r}")
        if (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n (responses per prompt) must be an int >= 1, got {self.n!r}")

    @property
    def greedy(self) -> bool:
        """True when ``temperature == 0``."""
        return self.temperature == 0


@dataclass
class RolloutBatch:
    """Sampled responses, one row per (prompt, sample); the ``n`` rows of a prompt are contiguous.

    ``B = len(prompts) * n``, ``Tp`` = longest prompt, ``Tr`` = longest response (at most
    ``max_new_tokens``). All tensors live on the model's device.

    Attributes:
        prompt_ids: ``(B, Tp)`` long, left-padded with ``pad_token_id``.
        prompt_mask: ``(B, Tp)`` bool, True on real prompt tokens.
        response_ids: ``(B, Tr)`` long, right-padded; pad after EOS.
        response_mask: ``(B, Tr)`` bool, True on generated tokens including the EOS token.
        response_lengths: ``(B,)`` long, number of True entries of ``response_mask`` per row.
        finished: ``(B,)`` bool, the row emitted EOS within ``max_new_tokens`` (False = truncated).
        prompt_index: ``(B,)`` long, index of the row's prompt in the ``prompt_ids`` argument.
        response_logprobs: ``(B, Tr)`` float32, log-probability of each sampled token under the distribution
            it was sampled from (temperature, top-k, top-p applied; with temperature 0 the plain model
            distribution); 0 where ``response_mask`` is False. None if not computed.
        backend: the backend that produced the batch (after ``auto`` resolution and any fallback),
            e.g. ``"static+compile"``, ``"static"``, ``"dynamic"``, ``"hf"``.
        stats: timings in seconds (``prefill_s``, ``decode_s``, ``total_s``) and ``decode_steps``.

    Example:
        >>> import torch
        >>> b = RolloutBatch(
        ...     prompt_ids=torch.tensor([[0, 5]]), prompt_mask=torch.tensor([[False, True]]),
        ...     response_ids=torch.tensor([[7, 1, 0]]), response_mask=torch.tensor([[True, True, False]]),
        ...     response_lengths=torch.tensor([2]), finished=torch.tensor([True]), prompt_index=torch.tensor([0]))
        >>> b.forward_inputs()["position_ids"].tolist()
        [[0, 0, 1, 2, 0]]
        >>> b.response_token_lists()
        [[7, 1]]
    """

    prompt_ids: torch.Tensor  # (B, Tp)
    prompt_mask: torch.Tensor  # (B, Tp) bool
    response_ids: torch.Tensor  # (B, Tr)
    response_mask: torch.Tensor  # (B, Tr) bool
    response_lengths: torch.Tensor  # (B,)
    finished: torch.Tensor  # (B,) bool
    prompt_index: torch.Tensor  # (B,)
    response_logprobs: torch.Tensor | None = None  # (B, Tr) float32
    backend: str = ""
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        """``B``, the number of sampled responses."""
        return int(self.prompt_ids.shape[0])

    @property
    def prompt_length(self) -> int:
        """``Tp``, the padded prompt length (responses start at this column of ``input_ids``)."""
        return int(self.prompt_ids.shape[1])

    @property
    def response_logits_slice(self) -> slice:
        """Columns of the full forward's logits that predict the response tokens (``Tp-1 .. Tp+Tr-2``)."""
        tp, tr = self.prompt_ids.shape[1], self.response_ids.shape[1]
        return slice(tp - 1, tp + tr - 1)

    def forward_inputs(self) -> dict[str, torch.Tensor]:
        """Inputs for one teacher-forced forward pass over prompt + response.

        Returns ``input_ids`` ``(B, Tp+Tr)``, ``attention_mask`` ``(B, Tp+Tr)`` (long, 1 on real prompt and
        response tokens) and ``position_ids`` ``(B, Tp+Tr)`` (0-based among real tokens, as in sampling; 0 on
        padding). ``model(**batch.forward_inputs()).logits[:, batch.response_logits_slice]`` then holds the
        logits that predicted each response token.
        """
        input_ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)  # (B, Tp+Tr)
        mask = torch.cat([self.prompt_mask, self.response_mask], dim=1).long()  # (B, Tp+Tr)
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0).masked_fill(mask == 0, 0)  # (B, Tp+Tr)
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}

    def response_token_lists(self) -> list[list[int]]:
        """The valid response tokens of each row (EOS included) as Python lists, e.g. for decoding."""
        ids, lengths = self.response_ids.tolist(), self.response_lengths.tolist()
        return [row[:n] for row, n in zip(ids, lengths)]


# --------------------------------------------------------------------------------------------------------
# Logit filtering and one-step sampling (shared by every loop)
# --------------------------------------------------------------------------------------------------------


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


def _draw_uniforms(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Float64 uniforms in [0, 1) drawn from ``generator`` on its own device, then moved to ``device``."""
    if generator is None:
        return torch.rand(shape, dtype=torch.float64, device=device)
    u = torch.rand(shape, dtype=torch.float64, generator=generator, device=generator.device)
    return u.to(device)


def _sample_with_uniforms(
    logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row by inverse-CDF sampling with the given ``(B,)`` uniforms.

    Returns ``(tokens (B,) long, logprobs (B,) float32)``; greedy when ``params.temperature == 0``.
    """
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
    if uniforms is None:
        raise ValueError("sampling (temperature > 0) needs uniforms")
    filtered = filter_logits(logits, params.temperature, params.top_k, params.top_p)  # (B, V)
    logp = torch.log_softmax(filtered, dim=-1)  # (B, V), -inf on removed tokens
    probs = logp.exp()  # (B, V) float32
    # float64 CDF: with V ~ 150k a float32 running sum would drift by ~1e-3 relative near the tail.
    cdf = probs.double().cumsum(dim=-1)  # (B, V)
    target = uniforms.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]  # (B, 1), in [0, total)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(cdf.shape[-1] - 1)  # (B,)
    # right=True never lands on a zero-probability token (its CDF equals its predecessor's) except when
    # rounding pushes the target to the total; then fall back to the most probable token.
    chosen_p = probs.gather(-1, tokens[:, None]).squeeze(-1)  # (B,)
    tokens = torch.where(chosen_p > 0, tokens, probs.argmax(dim=-1))
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from ``(B, V)`` logits.

    Applies :func:`filter_logits` (temperature, top-k, top-p, float32) and samples by inverse CDF with one
    uniform number per row drawn from ``generator`` (on the generator's device, so a CPU generator can drive
    CUDA logits). ``temperature == 0`` is greedy and draws nothing.

    Returns:
        ``(tokens, logprobs)``: ``(B,)`` long token ids and ``(B,)`` float32 log-probabilities of those
        tokens under the sampling distribution (under the unscaled model distribution when greedy).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> tok, lp = sample_next(torch.tensor([[0.0, 10.0, -10.0]]), SamplingParams(top_k=1), g)
        >>> tok.tolist(), lp.tolist()
        ([1], [0.0])
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, V), got shape {tuple(logits.shape)}")
    uniforms = None if params.greedy else _draw_uniforms((logits.shape[0],), generator, logits.device)
    return _sample_with_uniforms(logits, params, uniforms)


# --------------------------------------------------------------------------------------------------------
# Helpers around HF models and caches (version guards live here)
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ForwardSpec:
    cache_kw: str  # "cache" (transformers >= 5.2x) or "past_key_values"
    has_cache_position: bool  # older forwards take `cache_position` to place queries in the cache
    logits_kw: str | None  # "logits_to_keep" / "num_logits_to_keep" / None


def _forward_spec(model: torch.nn.Module) -> _ForwardSpec:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        params = {}
    cache_kw = "cache" if "cache" in params else "past_key_values"
    logits_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    return _ForwardSpec(cache_kw, "cache_position" in params, logits_kw)


def _model_call(
    model: torch.nn.Module,
    spec: _ForwardSpec,
    cache: Any,
    input_ids: torch.Tensor,  # (B, q)
    attention_mask: torch.Tensor,  # (B, kv)
    position_ids: torch.Tensor,  # (B, q)
    cache_position: torch.Tensor,  # (q,)
) -> torch.Tensor:
    """One forward with a cache; returns the last position's logits ``(B, V)`` in the model's dtype."""
    kwargs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        spec.cache_kw: cache,
        "use_cache": True,
    }
    if spec.has_cache_position:
        kwargs["cache_position"] = cache_position
    if spec.logits_kw is not None:
        kwargs[spec.logits_kw] = 1  # the prefill only needs the last position: skip a (B, Tp, V) head output
    return model(**kwargs).logits[:, -1, :]


def _new_dynamic_cache(model: torch.nn.Module) -> Any:
    from transformers import DynamicCache

    if "config" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(config=model.config)
    return DynamicCache()  # pragma: no cover - transformers < 4.56


def _new_static_cache(
    model: torch.nn.Module, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
) -> Any:
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    kwargs: dict[str, Any] = {"config": model.config, "max_cache_len": max_len}
    # transformers 4.x allocated eagerly and needed these; 5.x allocates lazily on the first update.
    if "max_batch_size" in params:  # pragma: no cover - transformers 4.x
        kwargs["max_batch_size"] = batch_size
    if "device" in params:  # pragma: no cover
        kwargs["device"] = device
    if "dtype" in params:  # pragma: no cover
        kwargs["dtype"] = dtype
    return StaticCache(**kwargs)


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Sample in eval mode (no dropout: the generator must be the only source of randomness)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------------------
# Prompt packing and the shared decode loop
# --------------------------------------------------------------------------------------------------------


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
        tok, lp = _sample_with_uniforms(logits, params, None if uniforms is None else uniforms[t])
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
) -> RolloutBatch:
    tr = max(int(lengths.max()), 1) if lengths.numel() else 1  # keep one column so shapes stay (B, >=1)
    tokens = tokens[:, :tr]
    if tokens.shape[1] < tr:  # pragma: no cover - defensive
        tokens = F.pad(tokens, (0, tr - tokens.shape[1]), value=pad_token_id)
    mask = torch.arange(tr, device=tokens.device)[None, :] < lengths[:, None]  # (B, Tr)
    tokens = tokens.masked_fill(~mask, pad_token_id)
    if logprobs is not None:
        logprobs = logprobs[:, :tr].masked_fill(~mask, 0.0)
    return RolloutBatch(
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------------


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
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (B, Tp), HF's convention for left padding
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
        positions = (self.mask[:, :tp].cumsum(-1) - 1).masked_fill(self.mask[:, :tp] == 0, 0)  # (B, Tp)
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
                f"trainer.rollout: compiled static decode failed ({type(exc).__name__}: {exc}); "
                "falling back to the uncompiled static-cache loop.",
            )
    # The uniforms were drawn up front, so a rerun after a failed compiled attempt samples the same tokens.
    out, stats = runner.run(*args, use_compiled=False)
    return out, stats, "static"


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


# --------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------


def sample(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    backend: Backend = "auto",
    compile: bool | None = None,
    return_logprobs: bool = True,
    check_every: int | None = None,
) -> RolloutBatch:
    """Sample ``params.n`` responses for each prompt.

    Args:
        model: a Hugging Face causal LM (any dtype/device). It is put in eval mode for the call and
            restored afterwards; no gradients are recorded.
        prompt_ids: unpadded token ids, one list per prompt.
        params: sampling settings; see :class:`SamplingParams`.
        eos_token_id: id (or ids) that end a response; None generates ``max_new_tokens`` for every row.
        pad_token_id: id used for left-padding prompts and right-padding responses.
        generator: the only source of randomness (any device); save/restore its state to resume exactly.
            None uses the global RNG of the model's device. The ``"hf"`` backend draws one seed from it and
            runs ``generate`` under ``torch.random.fork_rng`` with that seed (global RNG left untouched).
        backend: ``"auto"`` | ``"dynamic"`` | ``"static"`` | ``"hf"`` (see the module docstring).
        compile: for ``"static"``: compile the decode step with CUDA graphs. Default: only on CUDA.
        return_logprobs: also return ``response_logprobs``. Free for our loops; for ``"hf"`` it keeps
            every step's scores, ``O(B * Tr * V)`` memory.
        check_every: check "all rows finished" every this many steps (a host sync). Default: 1 on CPU,
            16 on CUDA.

    Returns:
        A :class:`RolloutBatch` with ``B = len(prompt_ids) * params.n`` rows.

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
            uniforms = None if params.greedy else _draw_uniforms((params.max_new_tokens, b), generator, device)
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
