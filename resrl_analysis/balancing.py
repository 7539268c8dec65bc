"""The reference implementation's batch balancing and micro-batching, to reproduce where its ResRL weights came from.

The published ResRL code (built on verl) computes its token weights inside each *update micro-batch*, after
verl has reordered the rollout batch to balance sequence lengths over the data-parallel ranks; the uids of a
micro-batch decide which rows form a "group" (docs/MATH.md § Departures from the reference implementation).
A prompt's rollouts scattered over ranks and micro-batches rarely meet their positives there. This module
rebuilds that assignment of rows to micro-batches from the rows' lengths alone, so that the trainer
(``resrl_grouping: micro_batch``) and a simulation can compute or count the weights the reference would have:

1. :func:`karmarkar_karp`: verl's ``get_seqlen_balanced_partitions(lengths, k_partitions=W, equal_size=True)``
   (``verl/utils/seqlen_balancing.py``, which wraps its ``karmarkar_karp``), reimplemented with the same
   tie-breaking, so the partitions are the reference's, not merely as balanced;
2. :func:`reference_micro_batches`: verl's ``RayPPOTrainer._balance_batch`` (``verl/trainer/ppo/ray_trainer.py``)
   concatenates the partitions and the dispatcher hands rank r the r-th of W equal contiguous chunks (= the
   r-th partition); the actor (``verl/workers/actor/dp_actor.py``, ``update_policy``) splits its rows into
   mini-batches of ``ppo_mini_batch_size`` rows and each into micro-batches of ``ppo_micro_batch_size_per_gpu``
   rows, in order (``use_dynamic_bsz=False``, as the reference's training script sets);
3. :func:`micro_batch_groups`: the (prompt group, micro-batch) pairs, the sets of rows the reference's
   weights were computed within; :func:`micro_batch_coverage` counts how many negative tokens of mixed groups
   such pairs can weigh.

Pure functions of plain lists and tensors: no model, no trainer, no process group.

>>> ids = micro_batch_ids([10, 3, 7, 5, 9, 2, 4, 8], world_size=2, mini_batch_rows=4, micro_batch_rows=2)
>>> ids  # rank 0 gets rows [3, 4, 5, 7], rank 1 rows [0, 1, 2, 6]; two rows per micro-batch
[2, 2, 3, 0, 0, 1, 3, 1]
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

__all__ = [
    "Coverage",
    "balance_order",
    "karmarkar_karp",
    "micro_batch_coverage",
    "micro_batch_groups",
    "micro_batch_ids",
    "reference_micro_batches",
]


# =========================================================================================== partitions


class _Part:
    """One bin of a partial solution: its items (index, length) in insertion order and their sum."""

    __slots__ = ("items", "total")

    def __init__(self, items: list[tuple[int, int]]) -> None:
        self.items = items
        self.total = sum(v for _, v in items)

    def key(self) -> tuple[int, int, list[tuple[int, int]]]:
        # verl orders bins by sum, then item count, then the item lists themselves: its tie-breaking, kept
        # so that equal sums land in the same bins as there.
        return self.total, len(self.items), self.items

    def absorb(self, other: _Part) -> None:
        self.items.extend(other.items)
        self.total += other.total


class _Solution:
    """k bins, heaviest first (by :meth:`_Part.key`); the heap pops the one with the largest spread first,
    and among equal spreads the one whose heaviest bin is heavier."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[_Part]) -> None:
        self.parts = sorted(parts, key=_Part.key, reverse=True)

    @property
    def spread(self) -> int:
        return self.parts[0].total - self.parts[-1].total

    def __lt__(self, other: _Solution) -> bool:
        if self.spread != other.spread:
            return self.spread > other.spread
        return self.parts[0].key() > other.parts[0].key()

    def combine(self, other: _Solution) -> None:
        # The differencing step: the heaviest bin takes the other's lightest, and so on.
        for mine, theirs in zip(self.parts, reversed(other.parts)):
            mine.absorb(theirs)
        self.parts = sorted(self.parts, key=_Part.key, reverse=True)


def karmarkar_karp(lengths: Sequence[int], k: int, *, equal_size: bool = True) -> list[list[int]]:
    """Split row indices into ``k`` parts of balanced total length by the largest differencing method.

    verl's ``get_seqlen_balanced_partitions`` (``verl/utils/seqlen_balancing.py``, around its
    ``karmarkar_karp``), reimplemented with its tie-breaking: the same parts in the same order (heaviest
    first), each part's indices sorted. With ``equal_size`` every part has ``len(lengths) / k`` rows: the
    rows sorted by (length, index) are cut into runs of k, one row of a run per bin, and the partial
    solutions are merged two at a time, the pair with the largest spreads first, heaviest bin with
    lightest.

    Args:
        lengths: one non-negative length per row (verl: prompt + response tokens of the row).
        k: number of parts (verl: the data-parallel world size).
        equal_size: every part gets the same number of rows (``len(lengths)`` must be divisible by k).

    >>> karmarkar_karp([1, 2, 3, 4, 5, 6, 7, 8], 2)
    [[1, 2, 4, 7], [0, 3, 5, 6]]
    >>> karmarkar_karp([5, 1, 1, 1], 2, equal_size=False)
    [[0], [1, 2, 3]]
    """
    n = len(lengths)
    if k < 1:
        raise ValueError(f"karmarkar_karp: k={k} must be >= 1")
    if n < k:
        raise ValueError(f"karmarkar_karp: {n} rows cannot fill k={k} non-empty parts")
    if equal_size and n % k:
        raise ValueError(f"karmarkar_karp: {n} rows are not divisible into k={k} parts of equal size")
    if any(int(v) < 0 for v in lengths):
        raise ValueError("karmarkar_karp: lengths must be >= 0")
    ranked = sorted((int(v), i) for i, v in enumerate(lengths))  # (length, index), ascending
    runs = [ranked[s : s + k] for s in range(0, n, k)] if equal_size else [[r] for r in ranked]
    heap: list[_Solution] = []
    for run in runs:  # a run of k rows (or one row) spread over the k bins
        bins = [_Part([(i, v)]) for v, i in run] + [_Part([]) for _ in range(k - len(run))]
        heapq.heappush(heap, _Solution(bins))
    while len(heap) > 1:
        first, second = heapq.heappop(heap), heapq.heappop(heap)
        first.combine(second)
        heapq.heappush(heap, first)
    parts = [sorted(i for i, _ in p.items) for p in heap[0].parts]
    if any(not p for p in parts):
        raise ValueError(f"karmarkar_karp: a part is empty ({n} rows into k={k} parts)")
    return parts


def balance_order(lengths: Sequence[int], world_size: int) -> list[int]:
    """The permutation verl's ``_balance_batch`` applies to the rollout batch: the parts of
    :func:`karmarkar_karp` (equal sizes, one per rank) concatenated; rank r then holds the r-th
    ``len(lengths) / world_size`` rows of the reordered batch.

    >>> balance_order([10, 3, 7, 5, 9, 2, 4, 8], 2)
    [3, 4, 5, 7, 0, 1, 2, 6]
    """
    return [i for part in karmarkar_karp(lengths, world_size, equal_size=True) for i in part]


def reference_micro_batches(
    lengths: Sequence[int], *, world_size: int, mini_batch_rows: int, micro_batch_rows: int
) -> list[list[int]]:
    """The rows (indices into ``lengths``) of each update micro-batch of the reference, rank after rank,
    mini-batch after mini-batch.

    Rank r takes the r-th part of :func:`balance_order`; it splits its rows, in that order, into mini-batches
    of ``mini_batch_rows`` (verl's per-rank ``ppo_mini_batch_size``: prompts per update × n / W) and each
    into micro-batches of ``micro_batch_rows`` (``ppo_micro_batch_size_per_gpu``); a last, shorter chunk
    is kept as ``DataProto.split`` keeps it.

    >>> reference_micro_batches([10, 3, 7, 5, 9, 2, 4, 8], world_size=2, mini_batch_rows=4, micro_batch_rows=2)
    [[3, 4], [5, 7], [0, 1], [2, 6]]
    """
    if mini_batch_rows < 1 or micro_batch_rows < 1:
        raise ValueError(f"mini_batch_rows={mini_batch_rows} and micro_batch_rows={micro_batch_rows} must be >= 1")
    out: list[list[int]] = []
    for rows in karmarkar_karp(lengths, world_size, equal_size=True):
        for s in range(0, len(rows), mini_batch_rows):
            mini = rows[s : s + mini_batch_rows]
            out.extend(mini[t : t + micro_batch_rows] for t in range(0, len(mini), micro_batch_rows))
    return out


def micro_batch_ids(
    lengths: Sequence[int], *, world_size: int, mini_batch_rows: int, micro_batch_rows: int
) -> list[int]:
    """For each row, the index of its reference micro-batch in :func:`reference_micro_batches` (0-based).

    >>> micro_batch_ids([4, 4, 4, 4, 4, 4], world_size=1, mini_batch_rows=6, micro_batch_rows=4)
    [0, 0, 0, 0, 1, 1]
    """
    ids = [-1] * len(lengths)
    for m, rows in enumerate(reference_micro_batches(
            lengths, world_size=world_size, mini_batch_rows=mini_batch_rows, micro_batch_rows=micro_batch_rows)):
        for i in rows:
            ids[i] = m
    return ids


def micro_batch_groups(group_ids: Tensor, micro_ids: Tensor, num_micro_batches: int) -> Tensor:
    """(B,) ids of the (prompt group, micro-batch) pairs: the row sets the reference's weights see as groups.

    ``group_id * num_micro_batches + micro_id``, so the pairs of one prompt group stay together and in
    micro-batch order when sorted.

    >>> micro_batch_groups(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]), 2).tolist()
    [0, 1, 3, 3]
    """
    if group_ids.shape != micro_ids.shape:
        raise ValueError(f"group_ids {tuple(group_ids.shape)} and micro_ids {tuple(micro_ids.shape)} must match")
    if micro_ids.numel() and not (0 <= int(micro_ids.min()) and int(micro_ids.max()) < num_micro_batches):
        raise ValueError(f"micro_ids must lie in [0, {num_micro_batches}), got [{int(micro_ids.min())}, "
                         f"{int(micro_ids.max())}]")
    return group_ids.long() * num_micro_batches + micro_ids.to(group_ids.device).long()


# =========================================================================================== counting


@dataclass(frozen=True)
class Coverage:
    """What a grouping lets the ResRL weights reach, over the mixed groups (positive and negative responses).

    ``weighted_token_frac``: fraction of their valid negative tokens that lie in a set (of
    :func:`micro_batch_groups`) holding >= ``min_pos_tokens`` valid positive tokens of the same prompt, i.e.
    that get a weight from a subspace (the trainer's ``resrl/weighted_token_frac``); ``whole_group_frac``:
    fraction of mixed groups all of whose rows share one set; ``mixed_groups``, ``negative_tokens``: the
    counts the fractions are of.
    """

    weighted_token_frac: float
    whole_group_frac: float
    mixed_groups: int
    negative_tokens: int


def micro_batch_coverage(
    group_ids: Sequence[int], weight_groups: Sequence[int], is_positive: Sequence[bool],
    response_lengths: Sequence[int], *, min_pos_tokens: int = 4,
) -> Coverage:
    """Count, without any hidden state, which negative tokens of mixed groups a grouping lets ResRL weigh.

    A set of rows (one ``weight_groups`` id) is weighted by
    :func:`~resrl_analysis.weighting.resrl_weight_details` when it holds a positive and a negative row,
    at least ``min_pos_tokens`` valid positive tokens and one valid negative token; then each of its
    valid negative tokens gets a weight.

    Args:
        group_ids: (B,) prompt group of each row.
        weight_groups: (B,) the set each row's weight is computed in (= group_ids: per whole group).
        is_positive: (B,) the row's reward is positive.
        response_lengths: (B,) valid response tokens of each row.

    >>> cov = micro_batch_coverage([0, 0, 0, 0], [0, 0, 1, 1], [True, False, False, False], [5, 6, 7, 8])
    >>> round(cov.weighted_token_frac, 4), cov.whole_group_frac  # 6 of the 6 + 7 + 8 negative tokens
    (0.2857, 0.0)
    """
    n = len(group_ids)
    if not (len(weight_groups) == len(is_positive) == len(response_lengths) == n):
        raise ValueError("group_ids, weight_groups, is_positive and response_lengths must have one entry per row")
    pos_tokens: dict[int, int] = {}
    has_neg: dict[int, bool] = {}
    for w, p, L in zip(weight_groups, is_positive, response_lengths):
        if p:
            pos_tokens[w] = pos_tokens.get(w, 0) + int(L)
        else:
            has_neg[w] = has_neg.get(w, False) or int(L) > 0
    weighted_sets = {w for w, t in pos_tokens.items() if t >= min_pos_tokens and has_neg.get(w, False)}
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids):
        members.setdefault(g, []).append(i)
    mixed = [g for g, rows in members.items()
             if any(is_positive[i] for i in rows) and not all(is_positive[i] for i in rows)]
    total = hit = whole = 0
    for g in mixed:
        rows = members[g]
        whole += len({weight_groups[i] for i in rows}) == 1
        for i in rows:
            if not is_positive[i]:
                total += int(response_lengths[i])
                hit += int(response_lengths[i]) if weight_groups[i] in weighted_sets else 0
    return Coverage(weighted_token_frac=hit / total if total else float("nan"),
                    whole_group_frac=whole / len(mixed) if mixed else float("nan"),
                    mixed_groups=len(mixed), negative_tokens=total)
