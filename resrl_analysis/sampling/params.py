"""What to sample (:class:`SamplingParams`) and what comes back (:class:`SampledBatch`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["SampledBatch", "SamplingParams"]


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
class SampledBatch:
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
        >>> b = SampledBatch(
        ...     prompt_ids=torch.tensor([[0, 5]]), prompt_mask=torch.tensor([[False, True]]),
        ...     response_ids=torch.tensor([[7, 1, 0]]), response_mask=torch.tensor([[True, True, False]]),
        ...     response_lengths=torch.tensor([2]), finished=torch.tensor([True]), prompt_index=torch.tensor([0]))
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

    def response_token_lists(self) -> list[list[int]]:
        """The valid response tokens of each row (EOS included) as Python lists, e.g. for decoding."""
        ids, lengths = self.response_ids.tolist(), self.response_lengths.tolist()
        return [row[:n] for row, n in zip(ids, lengths)]
