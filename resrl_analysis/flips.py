"""Token flips: which response tokens' log-probs rose or fell across an update, and the coupling of identical
low-confidence tokens in a group's positive and negative responses (docs/MATH.md § Token flips).

Across an update (two checkpoints, or one rollout batch's update in the trainer), every response token's
log π(y_t | x, y_<t) rises, falls or stays. :func:`flip_counts` counts them by

- the polarity of the response (positive: reward > 0);
- the confidence bin of p(y_t) before the update: ten equal bins [0, 0.1), …, [0.9, 1] ("deciles" of p);
- where the token stands against the group's responses of the other polarity
  (:func:`resrl_analysis.displacement.token_classes`): shared (the same token after the same prefix), the first
  divergent token, after it; tokens of groups without both polarities apart ("unmixed").

The cancellation hypothesis (Cheng, Huang et al., arXiv 2605.08666): positive and negative responses show similar
proportions of boosted and suppressed tokens, because a token's change is coupled to the gradients of identical
tokens predicted with low confidence, so opposing pushes on tokens both polarities share cancel.
:func:`coupling_counts` measures the coupling directly: over pairs (a token of a positive response, a token of a
negative response of the same group) of the same token id in different contexts, both with p(y) below
``low_confidence`` before the update, the fraction whose log-probs moved in the same direction; beside it the same
for identical confident pairs and for low-confidence pairs of different tokens (the baseline).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .displacement import AFTER, FIRST_DIVERGENT, SHARED

__all__ = ["CONFIDENCE_BINS", "COUPLING_KINDS", "OUTCOMES", "POLARITIES", "TOKEN_CLASS_NAMES", "confidence_bins",
           "coupling_counts", "coupling_frame", "flip_counts", "flip_frame"]

#: Equal-width bins of p(y) before the update.
CONFIDENCE_BINS = 10
#: Index → name of the polarity, the token class (index = :func:`~resrl_analysis.displacement.token_classes`'
#: code; 0: a group without both polarities) and the outcome axes of :func:`flip_counts`.
POLARITIES = ("positive", "negative")
TOKEN_CLASS_NAMES = {0: "unmixed", SHARED: "shared", FIRST_DIVERGENT: "first_divergent", AFTER: "after"}
OUTCOMES = ("rose", "fell", "same")
#: The pair kinds of :func:`coupling_counts`.
COUPLING_KINDS = ("identical_low", "identical_high", "different_low")


def confidence_bins(logp: Tensor, bins: int = CONFIDENCE_BINS) -> Tensor:
    """The bin of p = exp(logp) among ``bins`` equal bins of [0, 1] (p = 1 in the last) → int64, same shape.

    >>> confidence_bins(torch.log(torch.tensor([0.0, 0.05, 0.15, 0.95, 1.0]))).tolist()
    [0, 0, 1, 9, 9]
    """
    return (logp.double().exp() * bins).floor().clamp(0, bins - 1).long()


def _direction(before: Tensor, after: Tensor) -> Tensor:
    """+1 where log p rose, −1 where it fell, 0 where it stayed (exactly), as int8."""
    d = after.double() - before.double()
    return (d > 0).to(torch.int8) - (d < 0).to(torch.int8)


def flip_counts(before: Tensor, after: Tensor, mask: Tensor, is_positive: Tensor, classes: Tensor, *,
                bins: int = CONFIDENCE_BINS) -> Tensor:
    """Counts of response tokens by (polarity, token class, confidence bin before, outcome) → int64
    (2, 4, ``bins``, 3): polarity 0 positive / 1 negative; class 0 unmixed, 1 shared, 2 first divergent, 3 after;
    outcome 0 rose, 1 fell, 2 same.

    Args: before, after: (B, T) token log-probs; mask: (B, T) bool; is_positive: (B,) bool; classes: (B, T)
    :func:`~resrl_analysis.displacement.token_classes` codes.

    >>> before = torch.log(torch.tensor([[0.55, 0.95], [0.05, 0.5]]))
    >>> after = torch.log(torch.tensor([[0.6, 0.9], [0.05, 0.4]]))
    >>> c = flip_counts(before, after, torch.ones(2, 2, dtype=torch.bool), torch.tensor([True, False]),
    ...                 torch.tensor([[1, 2], [1, 2]], dtype=torch.int8))
    >>> c[0, 1, 5].tolist(), c[0, 2, 9].tolist(), c[1, 1, 0].tolist(), int(c.sum())
    ([1, 0, 0], [0, 1, 0], [0, 0, 1], 4)
    """
    m = mask.bool() & torch.isfinite(before) & torch.isfinite(after)  # a blown-up step's NaNs are not counted
    pol = (~is_positive.bool()).long()[:, None].expand_as(m)[m]  # (K,) 0 positive, 1 negative
    cls = classes.long()[m]  # (K,)
    conf = confidence_bins(before[m], bins)  # (K,)
    d = _direction(before[m], after[m]).long()  # (K,)
    out = torch.where(d > 0, 0, torch.where(d < 0, 1, 2))  # (K,) rose 0, fell 1, same 2
    flat = ((pol * 4 + cls) * bins + conf) * 3 + out  # (K,)
    return torch.bincount(flat.cpu(), minlength=2 * 4 * bins * 3).view(2, 4, bins, 3)


def flip_frame(counts: Tensor | np.ndarray) -> pd.DataFrame:
    """:func:`flip_counts` as rows (polarity, token_class, conf_bin, n_tokens, n_rose, n_fell, n_same), empty
    cells dropped.

    >>> c = torch.zeros(2, 4, 10, 3, dtype=torch.long); c[1, 1, 9] = torch.tensor([3, 1, 0])
    >>> flip_frame(c).to_dict("records")
    [{'polarity': 'negative', 'token_class': 'shared', 'conf_bin': 9, 'n_tokens': 4, 'n_rose': 3, 'n_fell': 1, \
'n_same': 0}]
    """
    a = np.asarray(counts)
    rows = []
    for p, c, b in zip(*np.nonzero(a.sum(-1))):
        r, f, s = (int(x) for x in a[p, c, b])
        rows.append({"polarity": POLARITIES[p], "token_class": TOKEN_CLASS_NAMES[int(c)], "conf_bin": int(b),
                     "n_tokens": r + f + s, "n_rose": r, "n_fell": f, "n_same": s})
    cols = ["polarity", "token_class", "conf_bin", "n_tokens", "n_rose", "n_fell", "n_same"]
    return pd.DataFrame(rows, columns=cols)


def coupling_counts(before: Tensor, after: Tensor, response_ids: Tensor, mask: Tensor, rewards: Tensor,
                    group_ids: Tensor, *, low_confidence: float = 0.5) -> Tensor:
    """Pairs of a positive and a negative response's tokens of one group, and how many moved in the same direction
    (both rose or both fell) → int64 (3, 2): rows :data:`COUPLING_KINDS`, columns (pairs, same direction).

    ``identical_low``: the same token id in different contexts (not the same position after the same prefix,
    where the two predictions are one and the same), both with p(y) < ``low_confidence`` before; ``identical_high``:
    the same, both at or above it; ``different_low``: different token ids, both below it (the baseline). Counted
    without enumerating pairs: per token id, products of the polarities' counts, less the same-context pairs.

    Args: before, after: (B, T) token log-probs; response_ids, mask: (B, T); rewards: (B,) (positive when > 0);
    group_ids: (B,).

    >>> ids = torch.tensor([[5, 6], [7, 6]]); m = torch.ones(2, 2, dtype=torch.bool)
    >>> before = torch.log(torch.full((2, 2), 0.2)); after = torch.log(torch.tensor([[0.1, 0.3], [0.3, 0.25]]))
    >>> coupling_counts(before, after, ids, m, torch.tensor([1.0, 0.0]), torch.tensor([0, 0])).tolist()
    [[1, 1], [0, 0], [3, 1]]
    """
    out = torch.zeros(3, 2, dtype=torch.long)
    m = mask.bool() & torch.isfinite(before) & torch.isfinite(after)  # a blown-up step's NaNs are not counted
    low = before.double().exp() < low_confidence  # (B, T)
    d = _direction(before, after)  # (B, T)
    pos_all = rewards > 0
    V = int(response_ids[m].max()) + 1 if m.any() else 1
    for g in torch.unique(group_ids).tolist():
        rows = group_ids == g
        P, Nn = rows & pos_all, rows & ~pos_all
        if not P.any() or not Nn.any():
            continue

        def side(sel: Tensor, lowq: bool) -> tuple[Tensor, Tensor, Tensor]:
            k = m[sel] & (low[sel] if lowq else ~low[sel])  # (R, T)
            ids, dd = response_ids[sel][k].long(), d[sel][k]
            cnt = torch.bincount(ids, minlength=V)
            return cnt, torch.bincount(ids[dd > 0], minlength=V), torch.bincount(ids[dd < 0], minlength=V)

        for kind, lowq in ((0, True), (1, False)):
            pc, pr, pf = side(P, lowq)
            nc, nr, nf = side(Nn, lowq)
            pairs, same = int((pc * nc).sum()), int((pr * nr + pf * nf).sum())
            # Same-context pairs (position t inside the two responses' common prefix): one prediction, not two.
            ctx = _same_context(response_ids[P], m[P], response_ids[Nn], m[Nn])  # (Rp, Rn, T)
            both = (low[P][:, None, :] & low[Nn][None, :, :]) if lowq else (~low[P][:, None, :] & ~low[Nn][None, :, :])
            sc = ctx & both
            dp, dn = d[P][:, None, :], d[Nn][None, :, :]
            pairs -= int(sc.sum())
            same -= int((sc & (dp == dn) & (dp != 0)).sum())
            out[kind] += torch.tensor([pairs, same])
            if lowq:  # all low-confidence pairs, less the identical ones: the pairs of different tokens
                tot_pairs = int(pc.sum() * nc.sum())
                tot_same = int(pr.sum() * nr.sum() + pf.sum() * nf.sum())
                ident_pairs, ident_same = int((pc * nc).sum()), int((pr * nr + pf * nf).sum())
                out[2] += torch.tensor([tot_pairs - ident_pairs, tot_same - ident_same])
    return out


def _same_context(pos_ids: Tensor, pos_mask: Tensor, neg_ids: Tensor, neg_mask: Tensor) -> Tensor:
    """(P, N, T) bool: position t lies in the common prefix of positive i and negative j (same tokens at 0..t)."""
    T = max(pos_ids.shape[1], neg_ids.shape[1])

    def pad(x: Tensor, fill: int | bool) -> Tensor:
        return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=fill)

    pi, pm, ni, nm = pad(pos_ids, 0), pad(pos_mask, False), pad(neg_ids, 0), pad(neg_mask, False)
    same = (pi[:, None, :] == ni[None, :, :]) & pm[:, None, :] & nm[None, :, :]  # (P, N, T)
    return same.long().cumprod(-1).bool()


def coupling_frame(counts: Tensor | np.ndarray) -> pd.DataFrame:
    """:func:`coupling_counts` as rows (kind, n_pairs, n_same_dir, same_dir_frac).

    >>> coupling_frame(torch.tensor([[4, 3], [0, 0], [10, 5]])).same_dir_frac.tolist()
    [0.75, nan, 0.5]
    """
    a = np.asarray(counts)
    return pd.DataFrame({"kind": list(COUPLING_KINDS), "n_pairs": a[:, 0].astype(int),
                         "n_same_dir": a[:, 1].astype(int),
                         "same_dir_frac": np.where(a[:, 0] > 0, a[:, 1] / np.maximum(a[:, 0], 1), np.nan)})
