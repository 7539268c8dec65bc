"""The advantage estimators of the GRPO family: a registry, one short function per algorithm.

Each function maps an :class:`AlgoInputs` (rewards, prompt-group ids, response tokens and mask, and, for
the algorithms that need them, the no-grad forward's hidden states / head inputs / logits) to per-token
advantages (B, T). The docstring of each says how it differs from GRPO. The arithmetic lives in
:mod:`resrl_analysis` (``group_advantages``, ``resrl_weight_details``, ``nthr_token_weights``): the trainer
and the probes share one implementation.

Callers pass **whole prompt groups** (the trainer: chunks of the rollout batch cut at group boundaries,
before any micro-batching), so ResRL's subspace and NTHR's threshold always see all G responses of a prompt.

>>> inp = AlgoInputs(rewards=torch.tensor([1.0, 0.0]), group_ids=torch.tensor([0, 0]),
...                  response_ids=torch.zeros(2, 3, dtype=torch.long),
...                  response_mask=torch.tensor([[1, 1, 0], [1, 0, 0]]).bool())
>>> out = ALGORITHMS["w-reinforce"].fn(inp)
>>> out.token_advantages.tolist()
[[0.10000000149011612, 0.10000000149011612, 0.0], [-1.0, 0.0, 0.0]]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from resrl_analysis.interference import nthr_token_weights
from resrl_analysis.ops import group_advantages
from resrl_analysis.weighting import resrl_weight_details

__all__ = ["ALGORITHMS", "AlgoInputs", "AlgoOutput", "Algorithm", "get_algorithm", "register"]


@dataclass
class AlgoInputs:
    """What an advantage estimator may read, for a set of whole prompt groups.

    ``hidden`` is the ResRL representation (the configured layer, raw, (B, T, d)); ``head_input`` the vector
    entering the LM head and ``logits`` the head's output, both (B, ·) at the positions that predict each
    response token. ``params`` holds the algorithm's hyper-parameters (names of :class:`TrainConfig`
    fields); missing ones take the DESIGN defaults.
    """

    rewards: Tensor  # (B,)
    group_ids: Tensor  # (B,)
    response_ids: Tensor  # (B, T)
    response_mask: Tensor  # (B, T) bool
    params: dict[str, Any] = field(default_factory=dict)
    hidden: Tensor | None = None  # (B, T, d)
    head_input: Tensor | None = None  # (B, T, d)
    logits: Tensor | None = None  # (B, T, V)
    generator: torch.Generator | None = None

    def p(self, name: str) -> Any:
        return self.params.get(name, _DEFAULTS[name])


_DEFAULTS: dict[str, Any] = {
    "adv_eps": 1e-6, "w_reinforce_lambda": 0.1, "nthr_beta": 1.0, "temperature": 1.0,
    "resrl_rank": 64, "resrl_max_pos_tokens": 4096, "resrl_q_low": 0.2, "resrl_q_high": 0.8,
    "resrl_min_weight": 0.1, "resrl_pos_weight": 0.1, "resrl_niter": 4, "resrl_svd": "lowrank",
}


@dataclass
class AlgoOutput:
    """``advantages`` (B,): the sequence-level advantage before token weights; ``token_advantages`` (B, T):
    what the loss uses (0 on padding). ResRL/NTHR also return their per-token weights and scores (B, T)
    (residuals / scores NaN where undefined)."""

    advantages: Tensor
    token_advantages: Tensor
    resrl_weights: Tensor | None = None
    resrl_residuals: Tensor | None = None
    nthr_weights: Tensor | None = None
    nthr_scores: Tensor | None = None


@dataclass(frozen=True)
class Algorithm:
    """A registered estimator: ``fn`` and what it ``needs`` from the no-grad forward
    (a subset of {"hidden", "head_input", "logits"})."""

    name: str
    fn: Callable[[AlgoInputs], AlgoOutput]
    needs: frozenset[str]

    @property
    def summary(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0]


ALGORITHMS: dict[str, Algorithm] = {}


def register(name: str, needs: tuple[str, ...] = ()) -> Callable[[Callable[[AlgoInputs], AlgoOutput]], Any]:
    """Decorator adding an estimator to :data:`ALGORITHMS`."""

    def deco(fn: Callable[[AlgoInputs], AlgoOutput]) -> Callable[[AlgoInputs], AlgoOutput]:
        ALGORITHMS[name] = Algorithm(name, fn, frozenset(needs))
        return fn

    return deco


def get_algorithm(name: str) -> Algorithm:
    """The registered estimator ``name`` (ValueError listing the known ones otherwise)."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def _per_token(adv: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
    tok = adv[:, None].float().expand(mask.shape)  # (B, T): the sequence advantage on every token
    if weights is not None:
        tok = tok * weights
    return torch.where(mask.bool(), tok, torch.zeros((), dtype=tok.dtype, device=tok.device))  # 0 on padding


def _baseline(b: AlgoInputs, estimator: str) -> AlgoOutput:
    adv = group_advantages(b.rewards, b.group_ids, estimator, eps=b.p("adv_eps"), w_lambda=b.p("w_reinforce_lambda"))
    return AlgoOutput(advantages=adv, token_advantages=_per_token(adv, b.response_mask))


@register("grpo")
def grpo(b: AlgoInputs) -> AlgoOutput:
    """GRPO: A = (r − mean_group) / (std_group + ε), the same for every token of a response."""
    return _baseline(b, "grpo")


@register("psr")
def psr(b: AlgoInputs) -> AlgoOutput:
    """PSR: positive samples only, A = r on correct responses (+1 for binary rewards), 0 on wrong; no baseline."""
    return _baseline(b, "psr")


@register("nsr")
def nsr(b: AlgoInputs) -> AlgoOutput:
    """NSR: negative samples only, A = −1 on wrong responses, 0 on correct; no baseline."""
    return _baseline(b, "nsr")


@register("w-reinforce")
def w_reinforce(b: AlgoInputs) -> AlgoOutput:
    """W-REINFORCE: A = λ·r on correct (λ = 0.1), −1 on wrong; no group normalisation."""
    return _baseline(b, "w-reinforce")


@register("nthr", needs=("head_input", "logits"))
def nthr(b: AlgoInputs) -> AlgoOutput:
    """NTHR: GRPO advantages, but negative tokens whose head-gradient interference with the group's positive
    tokens exceeds τ = β·(smallest mean positive-on-positive score) are scaled by η = 2|0.5 − p̂|."""
    base = _baseline(b, "grpo")
    assert b.head_input is not None and b.logits is not None
    w = nthr_token_weights(
        b.head_input, b.logits, b.response_ids, b.response_mask, b.rewards > 0, b.group_ids,
        beta=b.p("nthr_beta"), temperature=b.p("temperature"),
    )
    return AlgoOutput(advantages=base.advantages, token_advantages=base.token_advantages * w.weights,
                      nthr_weights=w.weights, nthr_scores=w.scores)


@register("resrl", needs=("hidden",))
def resrl(b: AlgoInputs) -> AlgoOutput:
    """ResRL: GRPO advantages; positive responses × pos_weight, and each negative token × ω ∈ [min_w, 1], its
    residual energy outside the group's positive subspace mapped between the group's residual quantiles."""
    assert b.hidden is not None
    is_pos = b.rewards > 0
    adv = group_advantages(b.rewards, b.group_ids, "grpo", eps=b.p("adv_eps"))
    adv = torch.where(is_pos, adv * b.p("resrl_pos_weight"), adv)  # (B,)
    det = resrl_weight_details(
        b.hidden, b.response_mask, is_pos, b.group_ids,
        rank=b.p("resrl_rank"), max_pos_tokens=b.p("resrl_max_pos_tokens"), q_low=b.p("resrl_q_low"),
        q_high=b.p("resrl_q_high"), min_weight=b.p("resrl_min_weight"), niter=b.p("resrl_niter"),
        svd=b.p("resrl_svd"), generator=b.generator,
    )
    w = det.weights.to(adv.device)  # (B, T)
    return AlgoOutput(advantages=adv, token_advantages=_per_token(adv, b.response_mask, w),
                      resrl_weights=w, resrl_residuals=det.residuals.to(adv.device))
