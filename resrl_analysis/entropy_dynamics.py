"""Which samples raise or lower entropy: the exact first-order entropy change of a head step, split by the polarity
of the samples that cause it, and the covariance proxy practitioners use (docs/MATH.md § Entropy dynamics).

For a token t with probabilities p_t = softmax(z_t), entropy H_t and head input h_t, one SGD step of size η on the
head matrix W for the loss L = −(1/Z) Σ_j A_j log p_j[y_j] (token-mean over the Z tokens of a group) changes

    ΔH_t ≈ (η/Z) Σ_j A_j ⟨∇_W H_t, g_j⟩_F = (η/Z) Σ_j A_j ⟨h_t, h_j⟩ ⟨∂H/∂z (p_t), e_{y_j} − p_j⟩,

with g_j = (e_{y_j} − p_j) h_jᵀ the head gradient of log p_j[y_j] and ∂H/∂z_k = −p_k (log p_k + H). The
(N, N) matrix ⟨∇_W H_t, g_j⟩ is :attr:`~resrl_analysis.interference.GroupGrams.entropy_inner`, computed in the
shared Gram's pass (:func:`~resrl_analysis.interference.group_grams` with ``entropy=True``); the sum over j
splits exactly into the samples j of positive responses and those of negative ones
(:func:`predict_entropy_change`). Linear in the advantages, so every algorithm's split comes from the one matrix.

The covariance proxy (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
Models"): the policy's entropy falls by about η·Cov(log π(y), A(y)); verl's ``clip_cov`` and ``kl_cov`` losses
(``verl.trainer.ppo.core_algos.compute_policy_loss_clip_cov`` / ``compute_policy_loss_kl_cov``, verl 0.9.1) rank
tokens by the centred products (A_t − Ā)(log π_t − mean log π) over the batch's valid tokens
(:func:`covariance_proxy`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .interference import GroupGrams

__all__ = ["EntropySplit", "predict_entropy_change", "source_entropy_effects", "covariance_proxy",
           "grams_columns"]


class EntropySplit(NamedTuple):
    """First-order ΔH of every token of a group (rows in the Gram's order), by the polarity of its cause.

    ``from_pos``, ``from_neg``, ``total``: (N, n), one column per advantage vector. ``total`` is computed from all
    the samples at once (an independent product), so ``from_pos + from_neg`` equals it up to round-off.
    """

    from_pos: Tensor
    from_neg: Tensor
    total: Tensor


def grams_columns(grams: GroupGrams, values: Tensor) -> Tensor:
    """A (G, T) per-token tensor of a group (or a stack (n, G, T)) as the Gram's token columns → (N,) or (N, n).

    >>> from resrl_analysis.interference import group_grams
    >>> g = torch.Generator().manual_seed(0)
    >>> gr = group_grams(torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 5, generator=g),
    ...                  torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool),
    ...                  torch.tensor([False, True]))
    >>> grams_columns(gr, torch.arange(6.0).reshape(2, 3)).tolist()  # the positive row first
    [3.0, 4.0, 5.0, 0.0, 1.0, 2.0]
    """
    dev = grams.row.device
    if values.dim() == 2:
        return values.to(dev)[grams.row, grams.pos]  # (N,)
    return values.to(dev)[:, grams.row, grams.pos].T  # (N, n)


def predict_entropy_change(grams: GroupGrams, advantages: Tensor, *, lr: float,
                           normaliser: float | None = None) -> EntropySplit:
    """First-order ΔH_t of one head-only SGD step of size ``lr``, for every token t of the group, split into the
    part caused by the samples of positive responses and the part caused by those of negative responses.

    Args:
        grams: the group's Gram built with ``entropy=True`` (positive responses' tokens first).
        advantages: (N,) or (N, n) token advantages in the Gram's token order (:func:`grams_columns`).
        lr: the step size η; normaliser: Z of the token-mean loss (default N, the group's tokens).

    Returns: :class:`EntropySplit`, each (N, n) (or (N,) for a 1-D ``advantages``).

    >>> from resrl_analysis.interference import group_grams
    >>> g = torch.Generator().manual_seed(0)
    >>> gr = group_grams(torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 7, generator=g),
    ...                  torch.randint(0, 7, (3, 2), generator=g), torch.ones(3, 2, dtype=torch.bool),
    ...                  torch.tensor([True, False, False]), entropy=True)
    >>> s = predict_entropy_change(gr, torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0, -1.0]), lr=0.1)
    >>> bool(torch.allclose(s.from_pos + s.from_neg, s.total, atol=1e-7)), float(s.from_pos[0]) != 0.0
    (True, True)
    """
    E = grams.entropy_inner
    if E is None:
        raise ValueError("the Gram was built without its entropy part (group_grams(..., entropy=True))")
    single = advantages.dim() == 1
    A = (advantages[:, None] if single else advantages).to(E)  # (N, n)
    N = E.shape[0]
    if A.shape[0] != N:
        raise ValueError(f"advantages hold {A.shape[0]} tokens, the Gram {N}")
    is_pos = (torch.arange(N, device=E.device) < grams.n_pos)[:, None]  # (N, 1)
    n = A.shape[1]
    out = E @ torch.cat([A * is_pos, A * ~is_pos, A], 1)  # (N, 3n): one product for both parts and the total
    out *= lr / (normaliser if normaliser is not None else max(N, 1))
    parts = out[:, :n], out[:, n : 2 * n], out[:, 2 * n :]
    return EntropySplit(*(x[:, 0] for x in parts)) if single else EntropySplit(*parts)


def source_entropy_effects(grams: GroupGrams, advantages: Tensor, *, lr: float,
                           normaliser: float | None = None) -> Tensor:
    """The first-order change of the group's mean token entropy caused by each sample j alone:
    (η/Z) A_j · (1/N) Σ_t ⟨∇_W H_t, g_j⟩ → (N,) or (N, n), in the Gram's token order.

    Summed over j it is the mean of :func:`predict_entropy_change`'s total; it is what the covariance proxy's
    centred product of token j stands for (Cui et al.: a token with a large A_j·log π_j lowers the entropy).

    >>> from resrl_analysis.interference import group_grams
    >>> g = torch.Generator().manual_seed(0)
    >>> gr = group_grams(torch.randn(2, 2, 4, generator=g), torch.randn(2, 2, 7, generator=g),
    ...                  torch.randint(0, 7, (2, 2), generator=g), torch.ones(2, 2, dtype=torch.bool),
    ...                  torch.tensor([True, False]), entropy=True)
    >>> a = torch.tensor([1.0, 1.0, -1.0, -1.0])
    >>> per_source, split = source_entropy_effects(gr, a, lr=1.0), predict_entropy_change(gr, a, lr=1.0)
    >>> bool(torch.isclose(per_source.sum(), split.total.mean(), atol=1e-6))
    True
    """
    E = grams.entropy_inner
    if E is None:
        raise ValueError("the Gram was built without its entropy part (group_grams(..., entropy=True))")
    N = E.shape[0]
    col = E.sum(0) / max(N, 1)  # (N,) mean over the affected tokens t
    A = advantages.to(E)
    scale = lr / (normaliser if normaliser is not None else max(N, 1))
    return (A * col if A.dim() == 1 else A * col[:, None]) * scale


def covariance_proxy(logp: Tensor, advantages: Tensor, mask: Tensor) -> tuple[Tensor, float]:
    """Cui et al.'s covariance of token log-prob and advantage, as verl's ``clip_cov``/``kl_cov`` compute it.

    The centred products c_t = (A_t − Ā)(log π_t − mean log π) over the valid tokens (unweighted means over
    the tokens of ``mask``, as ``verl_F.masked_mean``), and the batch covariance mean_t c_t. Cui et al.: one
    step lowers the entropy by about η·Cov, so −c_t is each token's proxy for raising it.

    Args: logp, advantages: (B, T) (any shape) token log-probs and advantages; mask: same shape, bool.
    Returns: (c (B, T) float64, 0 off the mask; the covariance, NaN without a valid token).

    >>> lp = torch.tensor([[-0.1, -2.0], [-0.5, 0.0]]); a = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    >>> m = torch.tensor([[True, True], [True, False]])
    >>> c, cov = covariance_proxy(lp, a, m)
    >>> round(cov, 4), c[1, 1].item()
    (-0.2444, 0.0)
    """
    m = mask.bool()
    if not m.any():
        return torch.zeros(mask.shape, dtype=torch.float64, device=mask.device), float("nan")
    lp, a = logp.double(), advantages.double()
    ca = a - a[m].mean()
    cl = lp - lp[m].mean()
    c = torch.where(m, ca * cl, torch.zeros((), dtype=torch.float64, device=m.device))
    return c, float(c[m].mean())
