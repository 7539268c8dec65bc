"""From prompt texts to the token ids the sampler takes, and the ids that end a response."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["encode_prompt", "encode_prompts", "eos_token_ids"]


def encode_prompt(tokenizer: Any, text: str, *, templated: bool = False) -> tuple[int, ...]:
    """Token ids of one prompt text, never prefixed twice: the tokenizer's special tokens (its BOS) are added
    unless the text is already formatted: it starts with BOS, holds any special token (a chat template's
    markers), or ``templated`` says it came out of a chat template (whatever BOS the template writes is in it).

    >>> from resrl_analysis.probes.synthetic import char_tokenizer
    >>> tok = char_tokenizer()
    >>> encode_prompt(tok, "2*3=") == encode_prompt(tok, "<bos>2*3="), tok.decode(encode_prompt(tok, "2*3="))
    (True, '<bos>2*3=')
    """
    bos = getattr(tokenizer, "bos_token", None)
    specials = [t for t in (getattr(tokenizer, "all_special_tokens", None) or []) if t]
    formatted = templated or bool(bos and text.startswith(bos)) or any(t in text for t in specials)
    return tuple(tokenizer(text, add_special_tokens=not formatted)["input_ids"])


def encode_prompts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """:func:`encode_prompt` of each prompt text, as lists (what the sampler takes).

    >>> from resrl_analysis.probes.synthetic import char_tokenizer
    >>> tok = char_tokenizer()
    >>> a, b = encode_prompts(tok, ["2*3=", "<bos>2*3="])
    >>> a == b, tok.decode(a)
    (True, '<bos>2*3=')
    """
    return [list(encode_prompt(tokenizer, text)) for text in texts]


def eos_token_ids(model: torch.nn.Module, tokenizer: Any = None) -> int | list[int] | None:
    """The ids that end a response: the model's ``generation_config.eos_token_id`` (a chat model may list
    several), else the tokenizer's EOS, else None.

    >>> from resrl_analysis.probes.synthetic import char_tokenizer, tiny_model
    >>> eos_token_ids(tiny_model(), char_tokenizer()), eos_token_ids(object(), char_tokenizer())
    (2, 2)
    """
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None and tokenizer is not None:
        eos = getattr(tokenizer, "eos_token_id", None)
    return eos
