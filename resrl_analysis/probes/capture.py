"""A probe group as one teacher-forced batch, on top of the core forward (:mod:`resrl_analysis.forward`).

One group (one prompt and its G responses) is one batch: the prompt, then each response,
right-padded to the longest response (:func:`group_batch`), run through
:func:`resrl_analysis.forward.response_forward` like the trainer's rows: the model keeps logits only
for the positions that predict response tokens, the LM head's input is captured by a pre-hook on the
output embedding (exact for any architecture) and the penultimate state (HF ``hidden_states[-2]``,
docs/MATH.md § Representation and subspace) by a hook on the second-to-last decoder layer. Log-probs
and entropy are chunked over tokens in float32, so no float32 (B, T, V) tensor exists; the logits
themselves stay in the model's dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..forward import PackedRows, capture, model_device, pack_rows, response_forward
from ..interference import GroupGrams, group_grams
from ..ops import DEFAULT_MEMORY_BUDGET_MB, softmax_probs
from ..probe_sets import ProbeGroup, ProbeSet

__all__ = [
    "GroupBatch",
    "GroupForward",
    "capture_head_input",
    "group_batch",
    "forward_group",
    "forward_probe_set",
    "model_device",
    "token_probs",
    "pad_id_of",
    "row_slice",
    "checkpointing",
]


@dataclass(frozen=True)
class GroupBatch:
    """A probe group laid out for one teacher-forced forward pass.

    ``rows`` the packed model inputs (:class:`resrl_analysis.forward.PackedRows`, (G, P + T));
    ``labels`` (G, T) (0 on padding), ``mask`` (G, T) True on response tokens, ``prompt_len`` P,
    ``rewards`` (G,) float32, ``is_positive`` (G,) bool.
    """

    rows: PackedRows
    labels: Tensor
    mask: Tensor
    prompt_len: int
    rewards: Tensor
    is_positive: Tensor

    @property
    def input_ids(self) -> Tensor:
        """(G, P + T) prompt then response tokens."""
        return self.rows.input_ids

    @property
    def attention_mask(self) -> Tensor:
        """(G, P + T) long, 1 on real tokens."""
        return self.rows.attention_mask


def group_batch(group: ProbeGroup, device: str | torch.device = "cpu", pad_id: int = 0) -> GroupBatch:
    """Lay out a group as prompt + right-padded responses (the prompt is shared, so no left padding).

    >>> g = ProbeGroup(0, (1, 5), ((6, 2), (7,)), (1.0, 0.0))
    >>> b = group_batch(g)
    >>> b.input_ids.tolist(), b.mask.tolist(), b.rows.position_ids.tolist()
    ([[1, 5, 6, 2], [1, 5, 7, 0]], [[True, True], [True, False]], [[0, 1, 2, 3], [0, 1, 2, 0]])
    """
    G, P = group.n_responses, len(group.prompt_ids)
    T = max(len(r) for r in group.response_ids)
    labels = torch.full((G, T), pad_id, dtype=torch.long)  # (G, T)
    mask = torch.zeros(G, T, dtype=torch.bool)  # (G, T)
    for i, r in enumerate(group.response_ids):
        labels[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    prompt = torch.tensor(group.prompt_ids, dtype=torch.long).expand(G, P)  # (G, P)
    rows = pack_rows(prompt.to(device), torch.ones(G, P, dtype=torch.bool, device=device), labels.to(device),
                     mask.to(device))
    rewards = torch.tensor(group.rewards, dtype=torch.float32)
    return GroupBatch(rows, rows.response_ids, rows.response_mask, P, rewards.to(device), (rewards > 0).to(device))


@contextlib.contextmanager
def capture_head_input(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Record the input of the model's LM head (output embedding) during the forwards inside.

    Yields a dict whose ``"head_input"`` entry holds the last captured input (…, d). The hook is
    removed in ``finally``, whatever happens inside (:func:`resrl_analysis.forward.capture`).

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    >>> with capture_head_input(m) as cap:
    ...     out = m(torch.tensor([[1, 2, 3]]))
    >>> cap["head_input"].shape, len(m.get_output_embeddings()._forward_pre_hooks)
    (torch.Size([1, 3, 8]), 0)
    """
    with capture(model, {"head_input": "head_input"}) as store:
        yield store


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
    penultimate_own: Tensor | None = None  # (G, T, d) the penultimate state at each token's own position
    logits: Tensor | None = None
    entropy_gram: bool = False
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def grams(self, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB, *, entropy: bool = False) -> GroupGrams:
        """The group's head-gradient Gram (:func:`resrl_analysis.interference.group_grams`), computed on
        the first call and shared by every probe that reads this forward (interference, subspace, first
        order, entropy dynamics); :meth:`release` frees it.

        With ``entropy_gram`` (set when a probe of the pass needs it) the first call also builds its entropy part
        in the same pass over the vocabulary; ``entropy=True`` asks for that part (built again, with the Gram,
        only if the cached one lacks it)."""
        cached = self._cache.get("grams")
        if cached is None or (entropy and cached.entropy_inner is None):
            if self.logits is None or self.head_input is None:
                raise ValueError("the Gram needs logits and head inputs (forward with keep_hidden/keep_logits)")
            self._cache["grams"] = group_grams(self.head_input, self.logits, self.labels, self.mask,
                                               self.is_positive, memory_budget_mb=memory_budget_mb,
                                               entropy=entropy or self.entropy_gram)
        return self._cache["grams"]

    def release(self) -> None:
        """Drop the cached Gram (its (N, N) matrix is the largest thing a probe keeps besides the logits)."""
        self._cache.clear()

    def tokens(self, rows: Tensor, *, with_logits: bool = True) -> dict[str, Tensor]:
        """The valid tokens of ``rows`` (indices into G), flattened row-major: ``y`` (N,), ``h`` (N, d)
        head inputs, ``row`` (N,) and ``pos`` (N,) indices, and ``logits`` (N, V) when kept and
        ``with_logits`` (a copy of N·V values: the probes pass False and read :meth:`grams`)."""
        m = self.mask[rows]  # (R, T)
        T = self.mask.shape[1]
        out = {"y": self.labels[rows][m],
               "row": rows[:, None].expand(-1, T)[m],
               "pos": torch.arange(T, device=m.device)[None, :].expand(len(rows), -1)[m]}
        if self.head_input is not None:
            out["h"] = self.head_input[rows][m]
        if self.logits is not None and with_logits:
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
    entropy_gram: bool = False,
    temperature: float = 1.0,
) -> GroupForward:
    """One teacher-forced forward pass of a group (no grad): log-probs, entropy and, optionally,
    head inputs, penultimate states and the response logits (``entropy_gram``: its Gram will be built with
    the entropy part, :meth:`GroupForward.grams`). ``temperature`` divides the logits before the log-probs and
    entropy (the sampler's view of its tokens); the kept logits are the raw ones.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)).eval()
    >>> f = forward_group(m, ProbeGroup(0, (1, 5), ((6, 2), (7,)), (1.0, 0.0)))
    >>> f.logp.shape, f.head_input.shape, bool(f.logp[1, 1] == 0)
    (torch.Size([2, 2]), torch.Size([2, 2, 8]), True)
    """
    batch = group_batch(group, model_device(model), pad_id)
    names = {"head_input": "head_input", "penultimate": "penultimate"} if keep_hidden else {}
    own = {"penultimate_own": "penultimate"} if keep_hidden else {}  # resrl-own-state's states
    fo = response_forward(model, batch.rows, memory_mb=memory_budget_mb, entropy=True, capture=names,
                          capture_own=own, return_logits=True, temperature=temperature)
    return GroupForward(
        group=group, labels=batch.labels, mask=batch.mask, logp=fo.logp, entropy=fo.entropy,  # type: ignore[arg-type]
        rewards=batch.rewards, is_positive=batch.is_positive, head_input=fo.captured.get("head_input"),
        penultimate=fo.captured.get("penultimate"), logits=fo.logits if keep_logits else None,
        entropy_gram=entropy_gram,
        penultimate_own=fo.captured.get("penultimate_own"),
    )


def forward_probe_set(
    model: nn.Module,
    probe_set: ProbeSet | Sequence[ProbeGroup],
    *,
    keep_hidden: bool = True,
    keep_logits: bool = True,
    pad_id: int = 0,
    entropy_gram: bool = False,
) -> list[GroupForward]:
    """:func:`forward_group` for every group of a probe set (one batch per group)."""
    groups = probe_set.groups if isinstance(probe_set, ProbeSet) else probe_set
    return [forward_group(model, g, keep_hidden=keep_hidden, keep_logits=keep_logits, pad_id=pad_id,
                          entropy_gram=entropy_gram) for g in groups]


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


def row_slice(rows: PackedRows, idx: slice) -> PackedRows:
    """Rows ``idx`` of packed model inputs (a micro-batch of a group's responses)."""
    return PackedRows(rows.input_ids[idx], rows.attention_mask[idx], rows.position_ids[idx],
                      rows.response_ids[idx], rows.response_mask[idx])


@contextlib.contextmanager
def checkpointing(model: nn.Module, *, enable: bool = True) -> Iterator[bool]:
    """HF activation checkpointing for the whole-model gradients, where it cannot change the numbers.

    HF checkpoints only in train mode, so it is switched on only when the model has no active dropout
    (train mode then computes what eval mode does); the mode and the setting are restored after.
    Yields whether checkpointing is on.
    """
    dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
    cfg = getattr(model, "config", None)
    dropout = dropout or any(float(getattr(cfg, k, 0.0) or 0.0) > 0 for k in ("attention_dropout", "hidden_dropout",
                                                                               "dropout", "resid_pdrop"))
    ok = enable and not dropout and getattr(model, "supports_gradient_checkpointing", False)
    # transformers renamed gradient to activation checkpointing (the old names warn); use what exists.
    new_api = hasattr(model, "activation_checkpointing_enable")
    was_training = model.training
    was_on = bool(getattr(model, "is_activation_checkpointing" if new_api else "is_gradient_checkpointing", False))
    if not ok or was_on:
        yield was_on
        return
    if new_api:
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        yield True
    finally:
        (model.activation_checkpointing_disable if new_api else model.gradient_checkpointing_disable)()
        model.train(was_training)


def pad_id_of(model: nn.Module, tokenizer=None) -> int:
    """A token id to pad with (masked out everywhere, so any valid id will do)."""
    for src in (tokenizer, getattr(model, "config", None)):
        pid = getattr(src, "pad_token_id", None) if src is not None else None
        if isinstance(pid, int):
            return pid
    return 0
