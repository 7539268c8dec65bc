"""The stratified held-out set of tiny-addition (trainer/tasks/addition.py): its strata, and that pass@k has room
from the shipped warm start (step-0 pass@1 from near 0 to near 0.9 across prompts, pass@64 below its ceiling)."""

from __future__ import annotations

import numpy as np
import pytest

from resrl_analysis.ops import pass_at_k, pass_at_k_by_stratum, stratum_of
from trainer.tasks.addition import AdditionTask


@pytest.fixture(scope="module")
def task() -> AdditionTask:
    return AdditionTask()


@pytest.mark.unit
def test_strata_are_balanced_held_out_and_what_they_say(task):
    prompts = task.heldout_prompts(64)
    strata = [stratum_of(p.uid) for p in prompts]
    assert {s: strata.count(s) for s in task.STRATA} == {s: 16 for s in task.STRATA}
    held = {(min(a, b), max(a, b)) for a, b in task._val}
    train = {(int(a), int(b)) for a, b in zip(task._a[:: 997], task._b[:: 997])}
    for p, s in zip(prompts, strata):
        a, b = (int(x) for x in p.text.rstrip("=").split("+"))
        assert p.ground_truth == str(a + b) and p.uid == f"{s}/add-{a}+{b}"
        if s == "short":
            assert 100 <= a <= 999 and 10 <= b <= 99  # a width the 3-digit training pool never holds
        else:
            assert (min(a, b), max(a, b)) in held and (a, b) not in train
            assert task.carries(a, b) in {"nocarry": (0,), "carry": (1, 2), "chain": (3,)}[s]
    assert len({p.uid for p in prompts}) == 64
    assert [p.uid for p in task.heldout_prompts(64)] == [p.uid for p in prompts]  # fixed
    assert AdditionTask(digits=2).heldout_prompts(3) == AdditionTask(digits=2).validation_prompts()[:3]


@pytest.mark.unit
def test_pass_at_k_by_stratum_against_math_comb():
    from math import comb

    uids, counts, n = ["a/1", "a/2", "b/3", "b/4", "b/5"], [0, 3, 8, 1, 0], 8
    got = pass_at_k_by_stratum(n, uids, counts)
    for k in (1, 4, 8):
        want_b = np.mean([1 - comb(n - c, k) / comb(n, k) for c in (8, 1, 0)])
        assert got["b"][k - 1] == pytest.approx(want_b)
        assert got["all"][k - 1] == pytest.approx(np.mean([1 - comb(n - c, k) / comb(n, k) for c in counts]))


@pytest.mark.integration
@pytest.mark.slow
def test_warm_start_leaves_room_for_pass_at_k(task):
    """3 prompts of each stratum, 64 samples each at the training temperature, from the shipped warm start."""
    import torch

    from resrl_analysis.checkpoints import load_checkpoint
    from resrl_analysis.probe_sets import _sample_for_probe_set
    from resrl_analysis.sampling import encode_prompts
    from trainer.warmstart import TINY_ADDITION_WARMSTART_DIR

    if not (TINY_ADDITION_WARMSTART_DIR / "config.json").is_file():
        pytest.fail(f"no shipped warm start at {TINY_ADDITION_WARMSTART_DIR}")
    ck = load_checkpoint(TINY_ADDITION_WARMSTART_DIR)
    prompts = [p for s in task.STRATA for p in [q for q in task.heldout_prompts(64) if stratum_of(q.uid) == s][:3]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = _sample_for_probe_set(ck.model, ck.tokenizer, encode_prompts(ck.tokenizer, [p.text for p in prompts]),
                                    n=64, max_new_tokens=40, temperature=1.0, seed=0)
    finally:
        torch.set_num_threads(threads)
    eos = ck.tokenizer.eos_token_id
    counts = [sum(task.reward(ck.tokenizer.decode([t for t in r if t != eos], skip_special_tokens=True), p.ground_truth)
                  for r in resp) for p, resp in zip(prompts, out)]
    p1 = np.array(counts) / 64
    by = {s: p1[[stratum_of(p.uid) == s for p in prompts]] for s in task.STRATA}
    assert by["nocarry"].mean() >= 0.6 and p1.max() >= 0.8  # the easy end of the spread
    assert by["short"].mean() <= 0.05 and p1.min() <= 0.05  # the hard end: pass@1 near 0.02
    assert by["nocarry"].mean() > by["chain"].mean() > by["short"].mean()
    p64 = float(pass_at_k(64, np.array(counts), 64).mean())
    assert p64 <= 0.92, p64  # below its ceiling: pass@64 has room
