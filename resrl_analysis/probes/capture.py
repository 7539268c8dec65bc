"""Teacher-forced forward passes over a probe group: log-probs, entropy, head inputs, hidden states.

One group (one prompt and its G responses) is one batch: the prompt, then each response,
right-padded to the longest response, so position P − 1 + t predicts response token t for every
row and the model keeps logits only for those T positions (``logits_to_keep``). The vector that
enters the LM head is captured by a forward pre-hook on the output embedding (exact for any
architecture, whatever ``hidden_states[-1]`` holds); the penultimate state is HF
``hidden_states[-2]`` (docs/MATH.md § Representation and subspace). Log-probs and entropy come from
:func:`resrl_analysis.ops.token_logprobs_and_entropy`, chunked over tokens in float32, so no
float32 (B, T, V) tensor exists; the logits themselves stay in the model's dtype.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..checkpoints import ProbeGroup, ProbeSet
from ..ops import DEFAULT_MEMORY_BUDGET_MB, softmax_probs, token_logprobs_and_entropy
from ..weighting import select_representation

__all__ = [
    "GroupBatch",
    "GroupForward",
    "capture_head_input",
    "group_batch",
    "response_logits",
    "forward_group",
    "forward_probe_set",
    "model_device",
    "token_probs",
    "pad_id_of",
]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-free module)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@dataclass(frozen=True)
class GroupBatch:
    """A probe group laid out for one teacher-forced forward pass.

    ``input_ids`` / ``attention_mask`` (G, P + T), ``labels`` (G, T) (0 on padding), ``mask`` (G, T)
    True on response tokens, ``prompt_len`` P, ``rewards`` (G,) float32, ``is_positive`` (G,) bool.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    mask: Tensor
    prompt_len: int
    rewards: Tensor
    is_positive: Tensor


def group_batch(group: ProbeGroup, device: str | torch.device = "cpu", pad_id: int = 0) -> GroupBatch:
    """Lay out a group as prompt + right-padded responses (the prompt is shared, so no left padding).

    >>> g = ProbeGroup(0, (1, 5), ((6, 2), (7,)), (1.0, 0.0))
    >>> b = group_batch(g)
    >>> b.input_ids.tolist(), b.mask.tolist()
    ([[1, 5, 6, 2], [1, 5, 7, 0]], [[True, True], [True, False]])
    """
    G, P = group.n_responses, len(group.prompt_ids)
    T = max(len(r) for r in group.response_ids)
    labels = torch.full((G, T), pad_id, dtype=torch.long)  # (G, T)
    mask = torch.zeros(G, T, dtype=torch.bool)  # (G, T)
    for i, r in enumerate(group.response_ids):
        labels[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    prompt = torch.tensor(group.prompt_ids, dtype=torch.long).expand(G, P)  # (G, P)
    input_ids = torch.cat([prompt, labels], 1)  # (G, P + T)
    attention_mask = torch.cat([torch.ones(G, P, dtype=torch.long), mask.long()], 1)  # (G, P + T)
    rewards = torch.tensor(group.rewards, dtype=torch.float32)
    return GroupBatch(input_ids.to(device), attention_mask.to(device), labels.to(device), mask.to(device), P,
                      rewards.to(device), (rewards > 0).to(device))


@contextlib.contextmanager
def capture_head_input(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Record the input of the model's LM head (output embedding) during the forwards inside.

    Yields a dict whose ``"head_input"`` entry holds the last captured input (…, d). The hook is
    removed in ``finally``, whatever happens inside.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    >>> with capture_head_input(m) as cap:
    ...     out = m(torch.tensor([[1, 2, 3]]))
    >>> cap["head_input"].shape, len(m.get_output_embeddings()._forward_pre_hooks)
    (torch.Size([1, 3, 8]), 0)
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (LM head)")
    store: dict[str, Tensor] = {}

    def hook(_module: nn.Module, args: tuple) -> None:
        store["head_input"] = args[0]

    handle = head.register_forward_pre_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def response_logits(
    model: nn.Module, batch: GroupBatch, *, hidden: bool = False, head_input: bool = False
) -> tuple[Tensor, tuple[Tensor, ...] | None, Tensor | None]:
    """Logits at the response positions (G, T, V), in the model's dtype, differentiable if grad is on.

    With ``hidden``, also every HF hidden state sliced to the response positions ((G, T, d) each);
    with ``head_input``, the captured LM-head input (G, T, d).
    """
    T = batch.labels.shape[1]
    P = batch.prompt_len
    kw: dict = {"use_cache": False}
    if _accepts(model, "logits_to_keep"):
        kw["logits_to_keep"] = T + 1  # positions P-1 .. P+T-1 (the sequence is P + T long)
    with contextlib.ExitStack() as stack:
        cap = stack.enter_context(capture_head_input(model)) if head_input else None
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=hidden,
                    **kw)
    logits = out.logits[:, -(T + 1) : -1]  # (G, T, V): position P-1+t predicts response token t
    hs = tuple(s[:, P - 1 : P - 1 + T] for s in out.hidden_states) if hidden else None
    hi = None
    if cap is not None:
        hi = cap["head_input"][:, -(T + 1) : -1]  # (G, T, d), whether or not logits_to_keep sliced it
    return logits, hs, hi


@dataclass(frozen=True)
class GroupForward:
    """Everything one teacher-forced forward pass gives about a group, at one checkpoint.

    ``labels``, ``mask`` (G, T); ``logp``, ``entropy`` (G, T) float32 (0 on padding);
    ``head_input``, ``penultimate`` (G, T, d) in the model's dtype (None when not kept);
    ``logits`` (G, T, V) in the model's dtype (None when not kept); ``rewards`` (G,),
    ``is_positive`` (G,).
    """

    group: ProbeGroup
    labels: Tensor
    mask: Tensor
    logp: Tensor
    entropy: Tensor
    rewards: Tensor
    is_positive: Tensor
    head_input: Tensor | None = None
    penultimate: Tensor | None = None
    logits: Tensor | None = None

    def tokens(self, rows: Tensor) -> dict[str, Tensor]:
        """The valid tokens of ``rows`` (indices into G), flattened row-major: ``y`` (N,), ``h`` (N, d)
        head inputs, ``row`` (N,) and ``pos`` (N,) indices, and ``logits`` (N, V) when kept."""
        m = self.mask[rows]  # (R, T)
        T = self.mask.shape[1]
        out = {"y": self.labels[rows][m],
               "row": rows[:, None].expand(-1, T)[m],
               "pos": torch.arange(T, device=m.device)[None, :].expand(len(rows), -1)[m]}
        if self.head_input is not None:
            out["h"] = self.head_input[rows][m]
        if self.logits is not None:
            out["logits"] = self.logits[rows][m]
        return out


@torch.no_grad()
def forward_group(
    model: nn.Module,
    group: ProbeGroup,
    *,
    keep_hidden: bool = True,
    keep_logits: bool = True,
    pad_id: int = 0,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> GroupForward:
    """One teacher-forced forward pass of a group (no grad): log-probs, entropy and, optionally,
    head inputs, penultimate states and the response logits.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)).eval()
    >>> f = forward_group(m, ProbeGroup(0, (1, 5), ((6, 2), (7,)), (1.0, 0.0)))
    >>> f.logp.shape, f.head_input.shape, bool(f.logp[1, 1] == 0)
    (torch.Size([2, 2]), torch.Size([2, 2, 8]), True)
    """
    batch = group_batch(group, model_device(model), pad_id)
    logits, hs, hi = response_logits(model, batch, hidden=keep_hidden, head_input=keep_hidden)
    logp, ent = token_logprobs_and_entropy(logits, batch.labels, memory_budget_mb=memory_budget_mb)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(batch.mask, logp, zero)  # (G, T)
    ent = torch.where(batch.mask, ent, zero)  # (G, T)
    return GroupForward(
        group=group, labels=batch.labels, mask=batch.mask, logp=logp, entropy=ent, rewards=batch.rewards,
        is_positive=batch.is_positive, head_input=hi,
        penultimate=select_representation(hs, "penultimate") if hs is not None else None,
        logits=logits if keep_logits else None,
    )


def forward_probe_set(
    model: nn.Module,
    probe_set: ProbeSet | Sequence[ProbeGroup],
    *,
    keep_hidden: bool = True,
    keep_logits: bool = True,
    pad_id: int = 0,
) -> list[GroupForward]:
    """:func:`forward_group` for every group of a probe set (one batch per group)."""
    groups = probe_set.groups if isinstance(probe_set, ProbeSet) else probe_set
    return [forward_group(model, g, keep_hidden=keep_hidden, keep_logits=keep_logits, pad_id=pad_id) for g in groups]


def token_probs(logits: Tensor) -> Tensor:
    """softmax of a group's (N, V) logits, for the interference formulas: float32 from any lower
    precision (chunked, :func:`resrl_analysis.ops.softmax_probs`), float64 kept as float64 (the
    precision checks run tiny float64 models; ``softmax_probs`` computes in float32 whatever the input).

    >>> token_probs(torch.zeros(2, 4, dtype=torch.float64)).dtype
    torch.float64
    """
    if logits.dtype == torch.float64:
        return torch.softmax(logits, -1)
    return softmax_probs(logits, dtype=torch.float32)


def pad_id_of(model: nn.Module, tokenizer=None) -> int:
    """A token id to pad with (masked out everywhere, so any valid id will do)."""
    for src in (tokenizer, getattr(model, "config", None)):
        pid = getattr(src, "pad_token_id", None) if src is not None else None
        if isinstance(pid, int):
            return pid
    return 0
