"""The one teacher-forced forward over (prompt, response) rows: log-probs, entropy, logits, representations.

Used by the trainer (the no-grad pass over a rollout batch and the loss pass of each micro-batch), the
warm start and every probe. Rows are left-padded prompts followed by right-padded responses
(:func:`pack_rows`); :func:`position_ids` is the one formula for their positions. Log-probs and entropy
come from the chunked :func:`resrl_analysis.ops.token_logprobs_and_entropy` (never a float32 (B, T, V)
tensor), and the LM head runs only on the positions that predict response tokens (``logits_to_keep``).

Representations are captured by name with forward hooks on the one module that produces them (removed in
``finally``) and sliced to the response positions inside the hook, never with ``output_hidden_states=True``,
which would keep every layer's (B, L, d) states alive. Names (:func:`representation_site`):

- ``"head_input"``: the vector that enters the LM head, by a forward pre-hook on the output embedding
  (exact for any architecture).
- ``"penultimate"``: the output of the second-to-last decoder layer = HF ``hidden_states[-2]``.
- an int ``i`` in HF's ``hidden_states`` convention: 0 the input of the first decoder layer (the
  embeddings), ``i`` the output of decoder layer ``i - 1``, ``L`` (= -1) the final norm's output.

>>> from resrl_analysis.probes.synthetic import tiny_model
>>> model = tiny_model(seed=0)
>>> rows = pack_rows(torch.tensor([[0, 5, 6]]), torch.tensor([[False, True, True]]),
...                  torch.tensor([[7, 2, 0]]), torch.tensor([[True, True, False]]))
>>> out = response_forward(model, rows, capture={"hidden": "penultimate"})
>>> out.logp.shape, out.captured["hidden"].shape
(torch.Size([1, 2]), torch.Size([1, 2, 32]))
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .ops import DEFAULT_MEMORY_BUDGET_MB, token_logprobs_and_entropy

__all__ = [
    "ForwardOut",
    "PackedRows",
    "RepresentationSite",
    "capture",
    "hidden_state_index",
    "model_device",
    "pack_rows",
    "position_ids",
    "representation_site",
    "response_forward",
    "stop_at_head",
]

Representation = str | int


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-free module).

    >>> model_device(nn.Linear(2, 2)).type
    'cpu'
    """
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def position_ids(attention_mask: Tensor) -> Tensor:
    """0-based positions among a row's real tokens, 0 on padding (HF's convention for left padding).

    Left padding then does not shift RoPE phases, so a row's result does not depend on its neighbours'
    lengths. The one formula for sampling and teacher forcing alike.

    >>> position_ids(torch.tensor([[0, 0, 1, 1, 0], [1, 1, 1, 1, 1]])).tolist()
    [[0, 0, 0, 1, 0], [0, 1, 2, 3, 4]]
    """
    mask = attention_mask.long()  # (B, L)
    return (mask.cumsum(-1) - 1).clamp(min=0).masked_fill(mask == 0, 0)  # (B, L)


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
        """``Tr``: the logits of the last ``Tr + 1`` positions but one predict the response tokens."""
        return int(self.response_ids.shape[1])


def pack_rows(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor) -> PackedRows:
    """Concatenate left-padded prompts and right-padded responses, dropping all-padding columns.

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
    return PackedRows(input_ids, mask, position_ids(mask), r_ids, r_mask)


# ------------------------------------------------------------------------------ representation names


def hidden_state_index(name: Representation) -> int:
    """HF ``hidden_states`` index of a representation name (``"head_input"`` is HF's last entry, which HF
    stores after the final norm: what the head multiplies).

    >>> hidden_state_index("penultimate"), hidden_state_index("head_input"), hidden_state_index(3)
    (-2, -1, 3)
    """
    if name == "head_input":
        return -1
    if name == "penultimate":
        return -2
    if isinstance(name, int) and not isinstance(name, bool):
        return name
    if isinstance(name, str) and name.lstrip("-").isdigit():
        return int(name)
    raise ValueError(f"layer must be 'head_input', 'penultimate' or an int, got {name!r}")


@dataclass(frozen=True)
class RepresentationSite:
    """Where a representation is read: the ``input`` (pre-hook) or ``output`` (hook) of ``module``."""

    module: nn.Module
    where: str  # "input" | "output"


_LAYER_LISTS = ("layers", "h", "blocks")
_FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_layer_norm")


def _decoder_parts(model: nn.Module) -> tuple[nn.ModuleList, nn.Module | None]:
    """(decoder layers, final norm or None) of a HF decoder-only model."""
    get = getattr(model, "get_decoder", None)
    dec = get() if callable(get) else None
    for d in (dec, getattr(model, "model", None), getattr(model, "transformer", None)):
        if d is None:
            continue
        layers = next((getattr(d, a) for a in _LAYER_LISTS if isinstance(getattr(d, a, None), nn.ModuleList)), None)
        if layers is not None:
            norm = next((getattr(d, a) for a in _FINAL_NORMS if isinstance(getattr(d, a, None), nn.Module)), None)
            return layers, norm
    raise ValueError(f"{type(model).__name__}: decoder layers not found (looked for .{'/.'.join(_LAYER_LISTS)} "
                     "under get_decoder(), .model, .transformer); capture 'head_input' instead")


def representation_site(model: nn.Module, name: Representation) -> RepresentationSite:
    """The module (and side) whose hook gives representation ``name`` (see the module docstring).

    >>> from resrl_analysis.probes.synthetic import tiny_model
    >>> m = tiny_model(layers=3)
    >>> s = representation_site(m, "penultimate")
    >>> s.module is m.model.layers[1], s.where
    (True, 'output')
    >>> representation_site(m, "head_input").module is m.get_output_embeddings()
    True
    """
    if name == "head_input":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise ValueError(f"{type(model).__name__} has no output embedding (LM head)")
        return RepresentationSite(head, "input")
    idx = hidden_state_index(name)
    layers, norm = _decoder_parts(model)
    n = len(layers)
    i = idx + n + 1 if idx < 0 else idx
    if not 0 <= i <= n:
        raise ValueError(f"hidden_states index {idx} is out of range for a {n}-layer model (valid: {-n - 1}..{n})")
    if i == 0:  # the embeddings as the first layer sees them (GPT-2 adds position embeddings first)
        return RepresentationSite(layers[0], "input")
    if i == n:  # HF stores the final norm's output last
        if norm is not None:
            return RepresentationSite(norm, "output")
        return representation_site(model, "head_input")
    return RepresentationSite(layers[i - 1], "output")


@contextlib.contextmanager
def capture(
    model: nn.Module, names: Mapping[str, Representation], positions: slice = slice(None)
) -> Iterator[dict[str, Tensor]]:
    """Record representations during the forwards inside: key -> ``tensor[:, positions]`` of the last call.

    ``positions`` is applied to whatever sequence the module sees; a slice counted from the end (as
    :func:`response_forward` uses) is right whether or not ``logits_to_keep`` shortened the head's input.
    Every hook is removed in ``finally``, whatever happens inside.

    >>> from resrl_analysis.probes.synthetic import tiny_model
    >>> m = tiny_model()
    >>> with capture(m, {"h": "head_input", "e": 0}) as cap:
    ...     _ = m(torch.tensor([[1, 2, 3]]))
    >>> cap["h"].shape, cap["e"].shape, len(m.get_output_embeddings()._forward_pre_hooks)
    (torch.Size([1, 3, 32]), torch.Size([1, 3, 32]), 0)
    """
    store: dict[str, Tensor] = {}
    handles = []
    try:
        for key, name in names.items():
            site = representation_site(model, name)
            if site.where == "input":

                def pre_hook(_m, args, kwargs, key=key):  # bind the key now, not at call time
                    h = args[0] if args else kwargs["hidden_states"]
                    store[key] = h[:, positions]

                handles.append(site.module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:

                def hook(_m, _inp, out, key=key):
                    h = out[0] if isinstance(out, tuple) else out
                    store[key] = h[:, positions]

                handles.append(site.module.register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()


class _StopAtHead(Exception):
    """Raised by the head's pre-hook of :func:`stop_at_head` once its input is recorded."""


@contextlib.contextmanager
def stop_at_head(model: nn.Module, positions: slice = slice(None)) -> Iterator[dict[str, Tensor]]:
    """Stop the forward inside the block at the LM head, recording its input (key ``"head_input"``,
    ``tensor[:, positions]``) with the body's graph: the (B, T, V) logits are never computed.

    The forward raises once the head input is recorded and the block ends there, quietly: put the forward
    last in the block. The hook is removed in ``finally``, whatever happens inside.

    >>> from resrl_analysis.probes.synthetic import tiny_model
    >>> m = tiny_model()
    >>> with stop_at_head(m, slice(1, None)) as got:
    ...     _ = m(torch.tensor([[1, 2, 3]]))
    >>> got["head_input"].shape, len(m.get_output_embeddings()._forward_pre_hooks)
    (torch.Size([1, 2, 32]), 0)
    """
    store: dict[str, Tensor] = {}

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        store["head_input"] = h[:, positions]  # (B, |positions|, d)
        raise _StopAtHead

    handle = representation_site(model, "head_input").module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield store
    except _StopAtHead:
        pass
    finally:
        handle.remove()


_capture_cm = capture  # `response_forward`'s `capture` argument shadows the context manager's name


# ------------------------------------------------------------------------------ the forward


@dataclass
class ForwardOut:
    """``logp`` (B, Tr) float32 log-probs of the response tokens (0 on padding); ``entropy`` (B, Tr) or None;
    ``captured`` key -> (B, Tr, d) states at the positions predicting each response token; ``logits``
    (B, Tr, V) in the model's dtype when asked for."""

    logp: Tensor
    entropy: Tensor | None
    captured: dict[str, Tensor] = field(default_factory=dict)
    logits: Tensor | None = None


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return False


def response_forward(
    model: nn.Module,
    rows: PackedRows,
    *,
    temperature: float = 1.0,
    memory_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    entropy: bool = False,
    capture: Mapping[str, Representation] | None = None,
    capture_own: Mapping[str, Representation] | None = None,
    return_logits: bool = False,
) -> ForwardOut:
    """One forward over ``rows``; log π(y_t | x, y_<t) of every response token at ``temperature``.

    Args:
        capture: key -> representation name (``"head_input"``, ``"penultimate"`` or a hidden_states index), at the
            positions that predict each response token.
        capture_own: the same, at each response token's own position (the state after the token is read).
        return_logits: also return the (B, Tr, V) response logits (NTHR and the probes need them).

    Grad mode is the caller's: wrap in ``torch.no_grad()`` for a pass that is not differentiated.
    """
    tr = rows.response_len
    kw = {"logits_to_keep": tr + 1} if _accepts(model, "logits_to_keep") else {}  # head only where needed
    # Count from the end: the head's input may already be cut to the last tr + 1 positions.
    with _capture_cm(model, capture or {}, slice(-(tr + 1), -1)) as store, \
            _capture_cm(model, capture_own or {}, slice(-tr, None)) as own:
        out = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, position_ids=rows.position_ids,
                    use_cache=False, **kw)
    store.update(own)
    logits = out.logits[:, -(tr + 1) : -1]  # (B, Tr, V): position L - Tr - 1 + t predicts response token t
    logp, ent = token_logprobs_and_entropy(
        logits, rows.response_ids, temperature=temperature, memory_budget_mb=memory_mb, entropy=entropy
    )  # (B, Tr) each
    mask = rows.response_mask
    logp = torch.where(mask, logp, logp.new_zeros(()))
    if ent is not None:
        ent = torch.where(mask, ent, ent.new_zeros(()))
    return ForwardOut(logp=logp, entropy=ent, captured=dict(store), logits=logits if return_logits else None)

