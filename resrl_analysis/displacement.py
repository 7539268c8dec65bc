"""Lazy likelihood displacement inside one rollout batch, split into shared and unique tokens
(docs/MATH.md § Lazy likelihood displacement).

The trainer measures it live (``lld_in_batch``): for every mixed group of a rollout batch, Δ log π(y⁺)
of the batch's own positive responses across the batch's update(s), before = the log-probs the rollout
already computed, after = one no-grad forward after the batch's last optimizer step. The Δ of a
positive response is split by token kind:

- **shared** tokens: positions t where some negative response of the group has the same token after
  the same prefix (y⁻[:t+1] = y⁺[:t+1]): what the positive and the negative have in common, the
  tokens a negative gradient pushes down on both;
- **unique** tokens: the rest.

Both parts are aggregated like the whole (sum over the response's tokens, mean over the group's
positives, mean over mixed groups), so shared + unique = the whole, exactly.

>>> ids = torch.tensor([[5, 6, 7], [5, 6, 9], [8, 6, 7]])  # one positive, two negatives
>>> mask = torch.ones(3, 3, dtype=torch.bool)
>>> shared_prefix_mask(ids[:1], mask[:1], ids[1:], mask[1:]).tolist()
[[True, True, False]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AFTER", "FIRST_DIVERGENT", "SHARED", "TOKEN_CLASSES", "GroupDisplacement", "group_displacements",
           "in_batch_lld_metrics", "shared_prefix_mask", "token_classes"]

#: :func:`token_classes` codes: 0 is padding, or a token of a group without both polarities.
SHARED, FIRST_DIVERGENT, AFTER = 1, 2, 3
#: Code → name, in the order figures and metrics list them.
TOKEN_CLASSES = {SHARED: "shared", FIRST_DIVERGENT: "first_divergent", AFTER: "after"}


def shared_prefix_mask(pos_ids: Tensor, pos_mask: Tensor, neg_ids: Tensor, neg_mask: Tensor) -> Tensor:
    """(P, T) bool: token t of positive response i is *shared* when some negative response j has the same
    tokens at positions 0..t (the same token after the same prefix); padding is never shared.

    ``pos_ids``/``pos_mask`` (P, T) and ``neg_ids``/``neg_mask`` (N, T'), right-padded.
    """
    T = pos_ids.shape[1]
    if neg_ids.shape[0] == 0 or T == 0:
        return torch.zeros_like(pos_mask, dtype=torch.bool)
    Tn = neg_ids.shape[1]
    if Tn < T:  # a negative shorter than the positive shares nothing past its end
        pad = torch.zeros(neg_ids.shape[0], T - Tn, dtype=neg_ids.dtype, device=neg_ids.device)
        neg_ids, neg_mask = torch.cat([neg_ids, pad], 1), torch.cat([neg_mask, pad.bool()], 1)
    neg_ids, neg_mask = neg_ids[:, :T], neg_mask[:, :T]
    same = (pos_ids[:, None, :] == neg_ids[None, :, :]) & pos_mask[:, None, :] & neg_mask[None, :, :]  # (P, N, T)
    prefix = same.long().cumprod(dim=-1).bool()  # (P, N, T) equal at every position 0..t
    return prefix.any(dim=1)  # (P, T)


@dataclass(frozen=True)
class GroupDisplacement:
    """Δ log π of one mixed group's positive responses across an update (each a mean over the group's
    positives of the response's summed Δ; ``shared + unique = delta``)."""

    group_id: int
    delta: float
    shared: float
    unique: float
    num_positive: int


def group_displacements(old_logp: Tensor, new_logp: Tensor, response_ids: Tensor, response_mask: Tensor,
                        rewards: Tensor, group_ids: Tensor) -> list[GroupDisplacement]:
    """One :class:`GroupDisplacement` per mixed group (a positive and a negative response) of the rows.

    ``old_logp``/``new_logp`` (B, T): token log-probs before and after (only positive rows of mixed groups
    are read; others may hold anything); ``response_ids``/``response_mask`` (B, T); ``rewards`` (B,),
    positive when > 0; ``group_ids`` (B,).

    >>> ids = torch.tensor([[5, 6], [5, 7]]); m = torch.ones(2, 2, dtype=torch.bool)
    >>> old = torch.zeros(2, 2); new = torch.tensor([[-0.5, 0.25], [0.0, 0.0]])
    >>> group_displacements(old, new, ids, m, torch.tensor([1.0, 0.0]), torch.tensor([3, 3]))
    [GroupDisplacement(group_id=3, delta=-0.25, shared=-0.5, unique=0.25, num_positive=1)]
    """
    out = []
    delta = (new_logp.double() - old_logp.double()) * response_mask  # (B, T)
    for g in torch.unique(group_ids).tolist():
        rows = group_ids == g
        pos, neg = rows & (rewards > 0), rows & (rewards <= 0)
        if not pos.any() or not neg.any():
            continue
        shared = shared_prefix_mask(response_ids[pos], response_mask[pos], response_ids[neg], response_mask[neg])
        d = delta[pos]  # (P, T)
        whole = d.sum(1)  # (P,) summed over the response's tokens
        sh = (d * shared).sum(1)  # (P,)
        out.append(GroupDisplacement(group_id=int(g), delta=float(whole.mean()), shared=float(sh.mean()),
                                     unique=float((whole - sh).mean()), num_positive=int(pos.sum())))
    return out


def in_batch_lld_metrics(groups: list[GroupDisplacement], eps: float = 0.0) -> dict[str, float | None]:
    """The ``lld/*`` metrics of a rollout batch from its mixed groups (None when it has none):
    ``lld/batch_frac`` (fraction of groups with Δ ≤ eps), ``lld/batch_delta_mean``,
    ``lld/shared_token_delta_mean``, ``lld/unique_token_delta_mean`` (means over groups) and
    ``lld/mixed_groups``.

    >>> in_batch_lld_metrics([GroupDisplacement(0, -1.0, -1.5, 0.5, 2), GroupDisplacement(1, 2.0, 0.5, 1.5, 1)])
    {'lld/batch_frac': 0.5, 'lld/batch_delta_mean': 0.5, 'lld/shared_token_delta_mean': -0.5, \
'lld/unique_token_delta_mean': 1.0, 'lld/mixed_groups': 2}
    """
    if not groups:
        return {"lld/batch_frac": None, "lld/batch_delta_mean": None, "lld/shared_token_delta_mean": None,
                "lld/unique_token_delta_mean": None, "lld/mixed_groups": 0}
    n = len(groups)
    return {
        "lld/batch_frac": sum(g.delta <= eps for g in groups) / n,
        "lld/batch_delta_mean": sum(g.delta for g in groups) / n,
        "lld/shared_token_delta_mean": sum(g.shared for g in groups) / n,
        "lld/unique_token_delta_mean": sum(g.unique for g in groups) / n,
        "lld/mixed_groups": n,
    }


def token_classes(response_ids: Tensor, response_mask: Tensor, rewards: Tensor, group_ids: Tensor) -> Tensor:
    """(B, T) int8: where each response token stands against the group's responses of the other polarity.

    For a response of a mixed group (a positive and a negative response), with d its number of *shared*
    positions (:func:`shared_prefix_mask` against the other polarity; shared positions are a prefix):
    :data:`SHARED` (1) at t < d, :data:`FIRST_DIVERGENT` (2) at t = d (the first token no response of the other
    polarity has after the same prefix: for a wrong answer, where it goes wrong), :data:`AFTER` (3) at t > d.
    0 on padding and on every token of a group that is not mixed.

    ``response_ids``/``response_mask`` (B, T) right-padded; ``rewards`` (B,), positive when > 0; ``group_ids`` (B,).

    >>> ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 8], [1, 2, 0, 0]])
    >>> mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]).bool()
    >>> token_classes(ids, mask, torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1])).tolist()
    [[1, 1, 2, 3], [1, 1, 2, 3], [0, 0, 0, 0]]
    """
    B, T = response_ids.shape
    out = torch.zeros(B, T, dtype=torch.int8, device=response_ids.device)
    pos_all = rewards > 0
    for g in torch.unique(group_ids).tolist():
        rows = group_ids == g
        pos, neg = rows & pos_all, rows & ~pos_all
        if not pos.any() or not neg.any():
            continue
        for mine, other in ((pos, neg), (neg, pos)):
            idx = torch.nonzero(mine).flatten()  # (R,)
            shared = shared_prefix_mask(response_ids[mine], response_mask[mine], response_ids[other],
                                        response_mask[other])  # (R, T)
            d = shared.sum(1, keepdim=True)  # (R, 1) shared positions form a prefix
            t = torch.arange(T, device=response_ids.device)[None, :]  # (1, T)
            cls = torch.where(t < d, SHARED, torch.where(t == d, FIRST_DIVERGENT, AFTER)).to(torch.int8)
            out[idx] = torch.where(response_mask[mine], cls, torch.zeros((), dtype=torch.int8, device=cls.device))
    return out
