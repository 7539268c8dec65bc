"""Teacher-forced forward passes over (prompt, response) rows: log-probs, entropy, captured hidden states.

One function, :func:`response_forward`, serves both passes of a training step: the no-grad pass over the
rollout batch (old log-probs, plus the ResRL representation or NTHR's head inputs and logits) and the
training pass of each micro-batch. Log-probs and entropy come from the chunked
``resrl_analysis.ops.token_logprobs_and_entropy`` (never a float32 (B, T, V) tensor); the LM head runs only
on the positions that predict response tokens (``logits_to_keep``).

Hidden states are captured with forward hooks on the one module needed (removed in ``finally``), sliced to
the response positions inside the hook, instead of ``output_hidden_states=True``, which would keep every
layer's (B, L, d) states alive. Index convention = HF's ``hidden_states``: 0 the embeddings, i the output of
decoder layer i − 1, L (= −1) the final norm's output, i.e. the LM head's input; ``penultimate`` = −2.

>>> from trainer.models import build_tiny_model
>>> model = build_tiny_model(seed=0, num_hidden_layers=2)
>>> rows = pack_rows(torch.tensor([[0, 5, 6]]), torch.tensor([[False, True, True]]),
...                  torch.tensor([[7, 2, 0]]), torch.tensor([[True, True, False]]))
>>> out = response_forward(model, rows, capture={"hidden": "penultimate"})
>>> out.logp.shape, out.captured["hidden"].shape
(torch.Size([1, 2]), torch.Size([1, 2, 128]))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from resrl_analysis.ops import token_logprobs_and_entropy

__all__ = ["ForwardOut", "PackedRows", "hidden_index", "pack_rows", "response_forward"]


@dataclass
class PackedRows:
    """Model inputs for a set of rows, trimmed to the longest prompt and response among them."""

    input_ids: Tensor  # (B, L)
    attention_mask: Tensor  # (B, L) long
    position_ids: Tensor  # (B, L)
    response_ids: Tensor  # (B, Tr)
    response_mask: Tensor  # (B, Tr) bool

    @property
    def response_len(self) -> int:
        return int(self.response_ids.shape[1])


def pack_rows(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor) -> PackedRows:
    """Concatenate left-padded prompts and right-padded responses, dropping all-padding columns.

    Positions count real tokens only (0-based, 0 on padding), as in sampling, so left padding does not
    shift RoPE phases and a row's result does not depend on its neighbours' lengths.

    >>> r = pack_rows(torch.tensor([[0, 0, 5], [0, 4, 5]]), torch.tensor([[0, 0, 1], [0, 1, 1]]).bool(),
    ...               torch.tensor([[7, 0], [8, 9]]), torch.tensor([[1, 0], [1, 1]]).bool())
    >>> r.input_ids.tolist(), r.position_ids.tolist()
    ([[0, 5, 7, 0], [4, 5, 8, 9]], [[0, 0, 1, 0], [0, 1, 2, 3]])
    """
    lp = max(int(prompt_mask.sum(1).max()), 1)
    lr = max(int(response_mask.sum(1).max()), 1)
    p_ids, p_mask = prompt_ids[:, -lp:], prompt_mask[:, -lp:]  # (B, lp)
    r_ids, r_mask = response_ids[:, :lr], response_mask[:, :lr].bool()  # (B, lr)
    input_ids = torch.cat([p_ids, r_ids], dim=1)  # (B, L)
    mask = torch.cat([p_mask, r_mask], dim=1).long()  # (B, L)
    pos = (mask.cumsum(-1) - 1).clamp(min=0).masked_fill(mask == 0, 0)  # (B, L)
    return PackedRows(input_ids, mask, pos, r_ids, r_mask)


def hidden_index(layer: str | int) -> int:
    """HF ``hidden_states`` index of a representation name.

    >>> hidden_index("penultimate"), hidden_index("head_input"), hidden_index("3")
    (-2, -1, 3)
    """
    if layer == "head_input":
        return -1
    if layer == "penultimate":
        return -2
    return int(layer)


def _decoder_modules(model: torch.nn.Module) -> tuple[torch.nn.Module, list[torch.nn.Module], torch.nn.Module] | None:
    """(embeddings, decoder layers, final norm) of a HF decoder-only model, or None if not recognised."""
    get = getattr(model, "get_decoder", None)
    dec = get() if callable(get) else getattr(model, "model", None)
    if dec is None:
        return None
    emb, layers, norm = getattr(dec, "embed_tokens", None), getattr(dec, "layers", None), getattr(dec, "norm", None)
    if emb is None or layers is None or norm is None:
        return None
    return emb, list(layers), norm


@contextlib.contextmanager
def _capture(model: torch.nn.Module, wanted: dict[str, int], sl: slice, store: dict[str, Tensor]) -> Iterator[bool]:
    """Hooks storing ``output[:, sl]`` of the modules behind ``wanted`` (name -> hidden_states index).

    Yields False when the model's layout is not recognised (the caller then asks for hidden_states).
    """
    parts = _decoder_modules(model)
    if not wanted:
        yield True
        return
    if parts is None:
        yield False
        return
    emb, layers, norm = parts
    n = len(layers)
    handles = []
    try:
        for name, idx in wanted.items():
            i = idx + n + 1 if idx < 0 else idx
            if not 0 <= i <= n:
                raise ValueError(f"hidden_states index {idx} is out of range for a {n}-layer model")
            module = emb if i == 0 else (norm if i == n else layers[i - 1])

            def hook(_m, _inp, out, name=name):  # bind the name now, not at call time
                h = out[0] if isinstance(out, tuple) else out
                store[name] = h[:, sl]

            handles.append(module.register_forward_hook(hook))
        yield True
    finally:
        for h in handles:
            h.remove()


@dataclass
class ForwardOut:
    """``logp`` (B, Tr) float32 log-probs of the response tokens (0 on padding); ``entropy`` (B, Tr) or None;
    ``captured`` name -> (B, Tr, d) states at the positions predicting each response token; ``logits``
    (B, Tr, V) when asked for."""

    logp: Tensor
    entropy: Tensor | None
    captured: dict[str, Tensor] = field(default_factory=dict)
    logits: Tensor | None = None


def response_forward(
    model: torch.nn.Module,
    rows: PackedRows,
    *,
    temperature: float = 1.0,
    memory_mb: float = 256.0,
    entropy: bool = False,
    capture: dict[str, str | int] | None = None,
    return_logits: bool = False,
) -> ForwardOut:
    """One forward over ``rows``; log π(y_t | x, y_<t) of every response token at ``temperature``.

    Args:
        capture: name -> representation (``"penultimate"``, ``"head_input"`` or a hidden_states index).
        return_logits: also return the (B, Tr, V) response logits (NTHR needs them).

    Grad mode is the caller's: wrap in ``torch.no_grad()`` for the rollout pass.
    """
    wanted = {k: hidden_index(v) for k, v in (capture or {}).items()}
    L, tr = rows.input_ids.shape[1], rows.response_len
    sl = slice(L - tr - 1, L - 1)  # positions whose outputs predict the response tokens
    store: dict[str, Tensor] = {}
    with _capture(model, wanted, sl, store) as hooked:
        out = model(
            input_ids=rows.input_ids,
            attention_mask=rows.attention_mask,
            position_ids=rows.position_ids,
            use_cache=False,
            logits_to_keep=tr + 1,  # head only on the last tr+1 positions: a (B, L, V) output never exists
            output_hidden_states=not hooked,
        )
    if not hooked:
        store = {k: out.hidden_states[i][:, sl] for k, i in wanted.items()}
    logits = out.logits[:, -(tr + 1) : -1]  # (B, Tr, V)
    logp, ent = token_logprobs_and_entropy(
        logits, rows.response_ids, temperature=temperature, memory_budget_mb=memory_mb, entropy=entropy
    )  # (B, Tr) each
    mask = rows.response_mask
    logp = torch.where(mask, logp, torch.zeros((), device=logp.device))
    if ent is not None:
        ent = torch.where(mask, ent, torch.zeros((), device=ent.device))
    return ForwardOut(logp=logp, entropy=ent, captured=store, logits=logits if return_logits else None)
