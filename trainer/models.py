"""Model configurations: the embedded ~1M-parameter tiny model and a Qwen3-0.6B-sized one.

Both are `Qwen3Config`s, so the tiny CPU default runs the same modelling code (GQA, q/k RMSNorm,
RoPE, SwiGLU) as the real 0.6B-8B Qwen3 models the trainer targets on GPU.

    >>> from trainer.tokenizer import build_char_tokenizer
    >>> model = build_tiny_model(seed=0)
    >>> 0.8e6 < model.num_parameters() < 1.5e6
    True
    >>> cfg = qwen3_0p6b_config()
    >>> cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads
    (1024, 28, 8)
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, Qwen3Config

from trainer.tokenizer import build_char_tokenizer


def tiny_model_config(tokenizer: PreTrainedTokenizerBase | None = None, **overrides: Any) -> Qwen3Config:
    """Config of the tiny default model (~0.9M parameters with the 101-token character vocabulary).

    Args:
        tokenizer: supplies vocab size and pad/bos/eos ids; the character tokenizer if None.
        **overrides: any `Qwen3Config` field (e.g. `num_hidden_layers=2`).

    The input embedding and the LM head are *not* tied: the head-gradient probes reason about a
    step on the head matrix W alone, and with tied weights such a step would also move the input
    embeddings (it costs 13k parameters).

    >>> cfg = tiny_model_config(num_hidden_layers=2)
    >>> cfg.num_hidden_layers, cfg.vocab_size, cfg.eos_token_id
    (2, 101, 2)
    """
    tok = tokenizer if tokenizer is not None else build_char_tokenizer()
    kwargs: dict[str, Any] = dict(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA like the real Qwen3 models, so grouped-KV code paths get tested
        head_dim=32,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        dtype="float32",
    )
    kwargs.update(overrides)
    return Qwen3Config(**kwargs)


def build_tiny_model(
    seed: int = 0,
    tokenizer: PreTrainedTokenizerBase | None = None,
    attn_implementation: str = "sdpa",
    **overrides: Any,
) -> PreTrainedModel:
    """A freshly initialised tiny causal LM (float32, CPU), identical for identical `seed`.

    The global torch RNG is left untouched (initialisation runs inside `fork_rng`), so building a
    model does not shift the randomness of whatever runs next.

    >>> a, b = build_tiny_model(seed=1), build_tiny_model(seed=1)
    >>> bool(torch.equal(a.lm_head.weight, b.lm_head.weight))
    True
    """
    config = tiny_model_config(tokenizer, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = (
        config.pad_token_id,
        config.bos_token_id,
        config.eos_token_id,
    )
    return model


def qwen3_0p6b_config(vocab_size: int = 151936, **overrides: Any) -> Qwen3Config:
    """A config with Qwen3-0.6B's shapes, for GPU benchmarks with random weights (nothing downloaded).

    Matches the published config (hidden 1024, 28 layers, 16 query / 8 KV heads, head_dim 128,
    intermediate 3072, tied embeddings, rope_theta 1e6). Special-token ids are Qwen's when they fit
    in `vocab_size` and None otherwise.

    >>> qwen3_0p6b_config(vocab_size=1000).eos_token_id is None
    True
    """
    bos, eos = 151643, 151645

    def fits(i: int) -> int | None:
        return i if i < vocab_size else None

    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=fits(bos),
        eos_token_id=fits(eos),
        pad_token_id=fits(bos),  # Qwen3 pads with <|endoftext|>, the same id as bos
        dtype="bfloat16",
    )
    kwargs.update(overrides)
    return Qwen3Config(**kwargs)
