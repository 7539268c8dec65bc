"""From prompt texts to the token ids the sampler takes, and the ids that end a response."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["encode_prompts", "eos_token_ids"]


def encode_prompts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt text, with the tokenizer's special tokens unless the text starts with BOS.

    A chat template writes its own BOS into the text; adding another would double it.

    >>> from resrl_analysis.probes.synthetic import char_tokenizer
    >>> tok = char_tokenizer()
    >>> a, b = encode_prompts(tok, ["2*3=", "<bos>2*3="])
    >>> a == b, tok.decode(a)
    (True, '<bos>2*3=')
    """
    bos = getattr(tokenizer, "bos_token", None)
    out = []
    for text in texts:
        add = not (bos and text.startswith(bos))
        out.append(list(tokenizer(text, add_special_tokens=add)["input_ids"]))
    return out


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
