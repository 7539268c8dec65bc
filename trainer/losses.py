"""The policy loss: PPO-clip with separate low/high ε and dual clip, optional k3 KL and entropy bonus.

Per response token, with ratio ρ = exp(log π_θ − log π_old) and advantage A (docs/MATH.md § PPO-clip loss, as verl):

    ℓ_clip = max(−A ρ, −A clamp(ρ, 1 − ε_low, 1 + ε_high))
    ℓ      = min(ℓ_clip, −A c)  if A < 0  (dual clip: a negative token's loss is bounded by c|A|)
             ℓ_clip              otherwise
    loss   = agg(ℓ) + β_KL · agg(k3(π_ref, π_θ)) − β_H · agg(H)

Aggregations are normalised by **mini-batch-level** counts (all micro-batches and all ranks together),
handed in as a :class:`LossNorm`. Every micro-batch then contributes its share of one mini-batch loss, and
summing the micro-batches' gradients gives exactly the mini-batch gradient: the update does not depend on
the micro-batch size.

>>> lp = torch.zeros(1, 2); mask = torch.ones(1, 2, dtype=torch.bool)
>>> out = policy_loss(lp, lp, torch.tensor([[1.0, 1.0]]), mask, norm=LossNorm(tokens=2, seqs=1))
>>> out.loss.item(), out.stats["pg_loss"].item()
(-1.0, -1.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from resrl_analysis.ops import masked_sum

__all__ = ["LossNorm", "LossOutput", "aggregate", "kl_k3", "policy_loss", "ppo_clip_token_losses"]


@dataclass(frozen=True)
class LossNorm:
    """Normalisers of one mini-batch, counted over all its micro-batches and all ranks.

    ``tokens``: valid response tokens; ``seqs``: responses; ``scale``: multiplies the loss so that the
    gradient reduction across ranks (FSDP2 averages over ``world_size`` ranks) yields the global sum.
    """

    tokens: float
    seqs: float
    scale: float = 1.0


def aggregate(values: Tensor, mask: Tensor, mode: str, norm: LossNorm) -> Tensor:
    """This micro-batch's share of the mini-batch aggregate of per-token ``values`` (B, T).

    - ``token-mean``: Σ_tokens v / N_tokens(mini-batch)
    - ``seq-mean-token-mean``: Σ_seqs (Σ_t v / T_seq) / N_seqs(mini-batch)
    - ``seq-mean-token-sum``: Σ_seqs Σ_t v / N_seqs(mini-batch)

    >>> v = torch.tensor([[1.0, 3.0], [5.0, 0.0]]); m = torch.tensor([[1, 1], [1, 0]]).bool()
    >>> [aggregate(v, m, k, LossNorm(tokens=3, seqs=2)).item()
    ...  for k in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")]
    [3.0, 3.5, 4.5]
    """
    mask = mask.bool()
    if mode == "token-mean":
        return masked_sum(values, mask) / max(norm.tokens, 1.0)
    per_seq = masked_sum(values, mask, dim=-1)  # (B,)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / mask.sum(-1).clamp(min=1).to(values.dtype)
    elif mode != "seq-mean-token-sum":
        raise ValueError(f"unknown loss_agg_mode {mode!r}")
    return per_seq.sum() / max(norm.seqs, 1.0)


def ppo_clip_token_losses(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float = 3.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token PPO-clip loss with dual clip; returns (loss (B, T), clipped (B, T) bool, ratio (B, T)).

    ``clipped`` marks tokens where the clipped surrogate is the active one (verl's ``pg_clipfrac``).
    ``dual_clip = 0`` turns the dual clip off.

    >>> loss, clipped, _ = ppo_clip_token_losses(torch.tensor([[0.5]]), torch.tensor([[0.0]]),
    ...                                          torch.tensor([[1.0]]))
    >>> round(loss.item(), 4), clipped.item()   # ratio e^0.5 = 1.65 clipped to 1.2 (A > 0)
    (-1.2, True)
    """
    # Clamp the log-ratio as verl does: a far-off-policy token must not overflow exp().
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped_obj = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, T)
    loss = torch.maximum(unclipped, clipped_obj)  # pessimistic surrogate
    clipped = clipped_obj > unclipped
    if dual_clip:
        # For A < 0 a huge ratio would give an unbounded loss; cap it at c·|A| (Ye et al., dual-clip PPO).
        loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * dual_clip), loss)
    return loss, clipped, ratio


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(π_θ || π_ref) per token: e^{r} − r − 1 with r = log π_ref − log π_θ.

    Non-negative, unbiased; clamped to [−10, 10] as verl's ``low_var_kl``.

    >>> kl_k3(torch.tensor([0.0]), torch.tensor([0.0])).item()
    0.0
    """
    r = (ref_logp - logp).clamp(-20.0, 20.0)
    return (torch.exp(r) - r - 1.0).clamp(-10.0, 10.0)


@dataclass
class LossOutput:
    """``loss``: the scalar to backpropagate (already scaled by ``norm.scale``). ``stats``: this
    micro-batch's *shares* of mini-batch metrics (sum them over micro-batches and ranks): ``pg_loss``
    (aggregated like the loss), ``pg_clipfrac``, ``ppo_kl``, ``entropy`` and ``kl`` (token means)."""

    loss: Tensor
    stats: dict[str, Tensor]


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    norm: LossNorm,
    agg: str = "token-mean",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float = 3.0,
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> LossOutput:
    """PPO-clip loss of one micro-batch as its share of the mini-batch loss (module docstring).

    Args:
        logp: (B, T) log π_θ of the response tokens (with grad).
        old_logp: (B, T) log π_old from the rollout's no-grad forward.
        advantages: (B, T) per-token advantages (the algorithm's, weights included).
        mask: (B, T) bool, valid response tokens.
        norm: mini-batch normalisers.
        ref_logp: (B, T) log π_ref, needed when ``kl_coef > 0``.
        entropy: (B, T) token entropies (with grad when ``entropy_coef > 0``), for the bonus and the metric.

    >>> lp = torch.tensor([[0.0, 0.0]]); m = torch.tensor([[True, False]])
    >>> out = policy_loss(lp, lp, torch.tensor([[-2.0, 9.0]]), m, norm=LossNorm(tokens=2, seqs=1))
    >>> out.loss.item()   # only the valid token counts, divided by the mini-batch's 2 tokens
    1.0
    """
    mask = mask.bool()
    tok_loss, clipped, _ = ppo_clip_token_losses(
        logp, old_logp, advantages, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip
    )
    pg = aggregate(tok_loss, mask, agg, norm)
    total = pg
    tok_norm = max(norm.tokens, 1.0)
    stats = {
        "pg_loss": pg.detach(),
        "pg_clipfrac": masked_sum(clipped.float(), mask).detach() / tok_norm,
        "ppo_kl": masked_sum((old_logp - logp).detach(), mask) / tok_norm,
    }
    if kl_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs ref_logp")
        kl = kl_k3(logp, ref_logp)  # (B, T)
        total = total + kl_coef * aggregate(kl, mask, agg, norm)
        stats["kl"] = masked_sum(kl.detach(), mask) / tok_norm
    if entropy is not None:
        if entropy_coef > 0:
            total = total - entropy_coef * aggregate(entropy, mask, agg, norm)
        stats["entropy"] = masked_sum(entropy.detach(), mask) / tok_norm
    return LossOutput(loss=total * norm.scale, stats=stats)
