"""How many negative tokens the reference's per-micro-batch ResRL weights reach, in its own configuration.

The published ResRL code computes its weights inside each update micro-batch after verl's length balancing
(docs/MATH.md § Departures from the reference implementation). This simulates one rollout batch of its
training script: 256 prompts × 4 responses, 8 data-parallel ranks, mini-batches of 64 prompts (32 rows per
rank), micro-batches of 4 rows; rows are assigned to micro-batches by
:func:`resrl_analysis.balancing.reference_micro_batches`, and :func:`resrl_analysis.balancing.micro_batch_coverage`
counts the negative tokens of mixed groups that meet >= 4 positive tokens of their own prompt there.

The rollouts are drawn from a plausible model of Qwen3-4B on DAPO-Math (max. 2048 prompt and 4096 response
tokens): prompt lengths shared by a group, a per-prompt success rate from Beta(0.6, 0.6) (many prompts all
right or all wrong), per-prompt response lengths around a lognormal median, wrong answers ~1.4× longer and
all lengths clipped at 4096. ``iid`` draws each row's lengths independently instead (even its prompt's), to
show that the result does not hinge on the length model. Nothing is timed; measured (20 batches each):
about 14% of those negative tokens weighted (8-20% per batch), 15% with iid lengths, and almost no mixed
group whole in one micro-batch.

    python -m bench.reference_weighting --seeds 20
"""

from __future__ import annotations

import argparse
import math
import random
import statistics

import torch

from resrl_analysis.balancing import Coverage, micro_batch_coverage, micro_batch_groups, micro_batch_ids

__all__ = ["REFERENCE", "simulate"]

#: The reference's training script (``train_command.sh``): prompts per rollout batch, responses per prompt,
#: data-parallel ranks, prompts per optimizer step, rows per micro-batch.
REFERENCE = dict(prompts=256, n=4, world_size=8, mini_batch_prompts=64, micro_batch_rows=4)


def _draw_rollouts(prompts: int, n: int, rng: random.Random, iid: bool) -> tuple[list[int], list[int], list[bool]]:
    """(prompt length, response length, is positive) of each row, groups of n contiguous rows."""
    plens, rlens, pos = [], [], []
    for _ in range(prompts):
        p_succ = rng.betavariate(0.6, 0.6)  # U-shaped: many prompts all right or all wrong
        plen = min(2048, 60 + round(rng.lognormvariate(math.log(80), 0.5)))  # one prompt for the whole group
        median = rng.lognormvariate(math.log(1200), 0.6)  # the prompt's typical response length
        for _ in range(n):
            ok = rng.random() < p_succ
            if iid:
                plen = min(2048, 60 + round(rng.lognormvariate(math.log(80), 0.5)))
                r = rng.lognormvariate(math.log(1500), 0.7)
            else:
                r = median * (rng.lognormvariate(0.0, 0.35) if ok else 1.4 * rng.lognormvariate(0.0, 0.45))
            plens.append(plen)
            rlens.append(min(4096, max(16, round(r))))  # truncated responses end at the length limit
            pos.append(ok)
    return plens, rlens, pos


def simulate(seed: int, *, iid: bool = False, prompts: int = REFERENCE["prompts"], n: int = REFERENCE["n"],
             world_size: int = REFERENCE["world_size"], mini_batch_prompts: int = REFERENCE["mini_batch_prompts"],
             micro_batch_rows: int = REFERENCE["micro_batch_rows"]) -> Coverage:
    """One simulated rollout batch of the reference: what its per-micro-batch weights reach.

    >>> cov = simulate(0, prompts=16, world_size=2, mini_batch_prompts=8)
    >>> 0.0 <= cov.weighted_token_frac <= 1.0 and cov.mixed_groups > 0
    True
    """
    plen, rlen, pos = _draw_rollouts(prompts, n, random.Random(seed), iid)
    lengths = [p + r for p, r in zip(plen, rlen)]  # verl balances attention_mask.sum(-1): prompt + response
    ids = micro_batch_ids(lengths, world_size=world_size, mini_batch_rows=mini_batch_prompts * n // world_size,
                          micro_batch_rows=micro_batch_rows)
    groups = torch.arange(prompts).repeat_interleave(n)  # (B,)
    sets = micro_batch_groups(groups, torch.tensor(ids), max(ids) + 1)
    return micro_batch_coverage(groups.tolist(), sets.tolist(), pos, rlen)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20, help="simulated rollout batches per length model")
    args = ap.parse_args(argv)
    print(f"reference configuration: {REFERENCE}")
    for iid in (False, True):
        runs = [simulate(s, iid=iid) for s in range(args.seeds)]
        w = [c.weighted_token_frac for c in runs]
        whole = [c.whole_group_frac for c in runs]
        print(f"{'iid lengths' if iid else 'grouped lengths'}: weighted negative tokens of mixed groups "
              f"{statistics.mean(w):.3f} (min {min(w):.3f}, max {max(w):.3f}); mixed groups kept whole "
              f"{statistics.mean(whole):.4f}; {statistics.mean(c.mixed_groups for c in runs):.0f} mixed groups "
              f"per batch; {args.seeds} batches")


if __name__ == "__main__":
    main()
