"""Helpers around HF models and caches; every transformers-version guard of the sampler lives here.

Recent transformers 5.x releases renamed the forward's ``past_key_values`` argument to ``cache`` and dropped
``cache_position`` (5.24 has neither); we read the model's forward signature and pass whichever it accepts,
so the same code runs on transformers 5.17 (GPU image) and 5.24. Cache constructors are called through the
same kind of signature check.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


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



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
