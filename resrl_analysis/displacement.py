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

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AFTER", "FIRST_DIVERGENT", "SHARED", "TOKEN_CLASSES", "GroupDisplacement", "GroupUpdate",
           "group_displacements", "group_updates", "in_batch_lld_metrics", "k3_kl", "shared_prefix_mask",
           "token_classes", "update_selectivity_metrics"]

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


def _mixed_groups(rewards: Tensor, group_ids: Tensor) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
    """(group id, its rows, its positives, its negatives) as (B,) bool masks, for each group holding both a positive
    (reward > 0) and a negative response; groups of one polarity are skipped."""
    pos_all = rewards > 0
    for g in torch.unique(group_ids).tolist():
        rows = group_ids == g
        pos, neg = rows & pos_all, rows & ~pos_all
        if pos.any() and neg.any():
            yield int(g), rows, pos, neg


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
    for g, _, pos, neg in _mixed_groups(rewards, group_ids):
        shared = shared_prefix_mask(response_ids[pos], response_mask[pos], response_ids[neg], response_mask[neg])
        d = delta[pos]  # (P, T)
        whole = d.sum(1)  # (P,) summed over the response's tokens
        sh = (d * shared).sum(1)  # (P,)
        out.append(GroupDisplacement(group_id=g, delta=float(whole.mean()), shared=float(sh.mean()),
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
    for _, _, pos, neg in _mixed_groups(rewards, group_ids):
        for mine, other in ((pos, neg), (neg, pos)):
            idx = torch.nonzero(mine).flatten()  # (R,)
            shared = shared_prefix_mask(response_ids[mine], response_mask[mine], response_ids[other],
                                        response_mask[other])  # (R, T)
            d = shared.sum(1, keepdim=True)  # (R, 1) shared positions form a prefix
            t = torch.arange(T, device=response_ids.device)[None, :]  # (1, T)
            cls = torch.where(t < d, SHARED, torch.where(t == d, FIRST_DIVERGENT, AFTER)).to(torch.int8)
            out[idx] = torch.where(response_mask[mine], cls, torch.zeros((), dtype=torch.int8, device=cls.device))
    return out


# ----------------------------------------------------------------------------- collateral per unit of push-down


def k3_kl(old_logp: Tensor, new_logp: Tensor, mask: Tensor) -> Tensor:
    """(B, T) float64 per-token k3 estimate of KL(π_before ‖ π_after) on tokens sampled from π_before.

    With r = π_after(y_t) / π_before(y_t): k3 = (r − 1) − log r ≥ 0, unbiased for the KL when y_t ~ π_before
    (Schulman's k3; docs/MATH.md § Collateral per unit of push-down). 0 off ``mask``.

    >>> k3_kl(torch.tensor([[0.0, -1.0]]), torch.tensor([[0.0, -0.5]]), torch.ones(1, 2, dtype=torch.bool))
    tensor([[0.0000, 0.1487]], dtype=torch.float64)
    """
    d = new_logp.double() - old_logp.double()  # (B, T) log r
    return torch.where(mask.bool(), torch.expm1(d) - d, torch.zeros((), dtype=torch.float64, device=d.device))


@dataclass(frozen=True)
class GroupUpdate:
    """One mixed group across an update (docs/MATH.md § Collateral per unit of push-down).

    ``delta_pos``: mean over the group's positives of the summed Δ log π; ``collateral``: minus that Δ on the
    positives' shared tokens (a loss on shared tokens is positive collateral); ``push_down``: minus the mean over the
    group's negatives of their summed Δ, and its split by token class (``push_down_shared`` + ``_first_divergent``
    + ``_after`` = ``push_down``); ``kl``: the mean k3 over the group's response tokens; ``ratio`` = collateral /
    push_down (None when push_down is 0). ``weight_*``: the mean weight ω of the negatives' tokens in each class
    (None without weights or without such tokens); ``tokens_*``: how many there are.
    """

    group_id: int
    delta_pos: float
    collateral: float
    push_down: float
    push_down_shared: float
    push_down_first_divergent: float
    push_down_after: float
    kl: float
    ratio: float | None
    weight_shared: float | None = None
    weight_first_divergent: float | None = None
    weight_after: float | None = None
    tokens_shared: int = 0
    tokens_first_divergent: int = 0
    tokens_after: int = 0


def group_updates(old_logp: Tensor, new_logp: Tensor, response_ids: Tensor, response_mask: Tensor, rewards: Tensor,
                  group_ids: Tensor, weights: Tensor | None = None) -> list[GroupUpdate]:
    """One :class:`GroupUpdate` per mixed group of the rows (every row's ``new_logp`` is read).

    ``old_logp``/``new_logp`` (B, T) before and after; ``response_ids``/``response_mask`` (B, T); ``rewards`` (B,),
    positive when > 0; ``group_ids`` (B,); ``weights`` (B, T) the per-token weights ω of the negatives (ResRL's),
    or None.

    >>> ids = torch.tensor([[5, 6, 7], [5, 8, 9]]); m = torch.ones(2, 3, dtype=torch.bool)
    >>> old = torch.zeros(2, 3); new = torch.tensor([[-0.1, 0.2, 0.0], [-0.2, -0.5, -0.3]])
    >>> g, = group_updates(old, new, ids, m, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    >>> round(g.collateral, 3), round(g.push_down, 3), round(g.push_down_first_divergent, 3), round(g.ratio, 3)
    (0.1, 1.0, 0.5, 0.1)
    """
    delta = (new_logp.double() - old_logp.double()) * response_mask  # (B, T)
    kl = k3_kl(old_logp, new_logp, response_mask)  # (B, T)
    classes = token_classes(response_ids, response_mask, rewards, group_ids)  # (B, T)
    out = []
    for g, rows, pos, neg in _mixed_groups(rewards, group_ids):
        shared = shared_prefix_mask(response_ids[pos], response_mask[pos], response_ids[neg], response_mask[neg])
        collateral = -float((delta[pos] * shared).sum(1).mean())
        dn, cn = delta[neg], classes[neg]  # (N, T)
        parts = {c: -float((dn * (cn == c)).sum(1).mean()) for c in TOKEN_CLASSES}
        push = -float(dn.sum(1).mean())
        w: dict[str, float | None] = {}
        counts: dict[str, int] = {}
        for c, name in TOKEN_CLASSES.items():
            sel = cn == c  # (N, T)
            counts[name] = int(sel.sum())
            w[name] = float(weights[neg][sel].double().mean()) if weights is not None and counts[name] else None
        n_tok = int(response_mask[rows].sum())
        out.append(GroupUpdate(
            group_id=g, delta_pos=float(delta[pos].sum(1).mean()), collateral=collateral, push_down=push,
            push_down_shared=parts[SHARED], push_down_first_divergent=parts[FIRST_DIVERGENT],
            push_down_after=parts[AFTER], kl=float(kl[rows].sum()) / n_tok if n_tok else 0.0,
            ratio=collateral / push if push != 0 else None,
            weight_shared=w["shared"], weight_first_divergent=w["first_divergent"], weight_after=w["after"],
            tokens_shared=counts["shared"], tokens_first_divergent=counts["first_divergent"],
            tokens_after=counts["after"]))
    return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def update_selectivity_metrics(groups: list[GroupUpdate], kl_sum: float, kl_tokens: int, *,
                               weighted: bool = False) -> dict[str, object]:
    """The ``update/*`` metrics of a rollout batch (and ``resrl/weight_*`` when ``weighted``).

    ``kl_sum``/``kl_tokens``: the k3 summed over every response token of the batch and their number (all groups,
    mixed or not). Per-unit-KL ratios are None when the KL is 0; means over mixed groups are None without any.

    >>> g = GroupUpdate(0, 0.2, 0.1, 1.0, 0.2, 0.5, 0.3, 0.01, 0.1)
    >>> m = update_selectivity_metrics([g], kl_sum=0.5, kl_tokens=10)
    >>> m["update/kl_k3"], m["update/selectivity_ratio"], round(m["update/neg_delta_per_kl"], 6)
    (0.05, 0.1, -20.0)
    """
    kl = kl_sum / kl_tokens if kl_tokens else None
    n = len(groups)
    pos = _mean([g.delta_pos for g in groups])
    neg = _mean([-g.push_down for g in groups])
    coll = _mean([g.collateral for g in groups])
    push = _mean([g.push_down for g in groups])
    ratios = [g.ratio for g in groups if g.ratio is not None]
    per_kl = (lambda x: x / kl if x is not None and kl else None)  # noqa: E731
    out: dict[str, object] = {
        "update/kl_k3": kl,
        "update/pos_delta_mean": pos, "update/pos_delta_per_kl": per_kl(pos),
        "update/neg_delta_mean": neg, "update/neg_delta_per_kl": per_kl(neg),
        "update/collateral_mean": coll, "update/push_down_mean": push,
        "update/selectivity_ratio": coll / push if coll is not None and push else None,
        "update/selectivity_ratio_median": float(torch.tensor(ratios, dtype=torch.float64).median()) if ratios
        else None,
        "update/collateral_per_kl": per_kl(coll),
        "update/push_down_shared": _mean([g.push_down_shared for g in groups]),
        "update/push_down_first_divergent": _mean([g.push_down_first_divergent for g in groups]),
        "update/push_down_after": _mean([g.push_down_after for g in groups]),
        "update/mixed_groups": n,
        "update/groups": [[g.group_id, g.collateral, g.push_down, g.kl] for g in groups],
    }
    if weighted:
        for name in ("shared", "first_divergent", "after"):
            num = sum((getattr(g, f"weight_{name}") or 0.0) * getattr(g, f"tokens_{name}") for g in groups)
            den = sum(getattr(g, f"tokens_{name}") for g in groups if getattr(g, f"weight_{name}") is not None)
            out[f"resrl/weight_{name}"] = num / den if den else None
        fd = sum(g.tokens_first_divergent for g in groups)
        out["resrl/first_divergent_tokens"] = fd
    return out
