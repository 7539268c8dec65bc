"""Diversity probe: distinct-n / self-BLEU on hand-made strings, pass@k end to end against math.comb."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from resrl_analysis.probes.diversity import (
    distinct_n,
    diversity_probe,
    final_answer,
    self_bleu,
    sentence_bleu,
)
from resrl_analysis.probes.synthetic import char_tokenizer, random_probe_set, tiny_model
from resrl_analysis.rewards import default_reward_fn, exact_match_reward
from resrl_analysis.sampling import sample_responses

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


def test_distinct_n_hand_made():
    s = ["the cat sat".split(), "the cat ran".split(), "a dog ran".split()]
    assert distinct_n(s, 1) == pytest.approx(6 / 9)  # the, cat, sat, ran, a, dog
    assert distinct_n(s, 2) == pytest.approx(5 / 6)  # "the cat" twice
    assert distinct_n(s, 3) == pytest.approx(1.0)
    assert np.isnan(distinct_n([["x"]], 2))


def test_bleu_hand_made():
    ref = "the cat sat on the mat".split()
    assert sentence_bleu(ref, [ref]) == pytest.approx(1.0)
    # Matches: unigrams 5/6, bigrams 3/5 (the cat, cat sat, sat on), trigrams 2/4, 4-grams 1/3.
    hyp = "the cat sat on a mat".split()
    want = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert sentence_bleu(hyp, [ref]) == pytest.approx(want)
    # No 4-gram match: its precision is smoothed to 0.1 / 3.
    hyp = "a cat sat on my mat".split()  # 4/6, 2/5 (cat sat, sat on), 1/4 (cat sat on), 0/3
    want = (4 / 6 * 2 / 5 * 1 / 4 * 0.1 / 3) ** 0.25
    assert sentence_bleu(hyp, [ref]) == pytest.approx(want)
    # Brevity penalty: a 3-token hypothesis against a 6-token reference.
    short = "the cat sat".split()
    assert sentence_bleu(short, [ref]) == pytest.approx(math.exp(1 - 6 / 3) * 1.0)
    # Clipping: "the the the" matches "the" at most twice.
    assert sentence_bleu(["the"] * 3, [ref], max_n=1) == pytest.approx(2 / 3 * math.exp(1 - 6 / 3))
    assert sentence_bleu([], [ref]) == 0.0


def test_self_bleu_hand_made():
    same = [["a", "b", "c"]] * 3
    assert self_bleu(same) == pytest.approx(1.0)
    diff = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]]
    assert self_bleu(diff) == pytest.approx((0.1 / 3 * 0.1 / 2 * 0.1 / 1) ** (1 / 3))  # all smoothed, BP 1
    assert self_bleu(diff) < self_bleu([["a", "b", "c"], ["a", "b", "d"], ["g", "h", "i"]]) < 1
    assert np.isnan(self_bleu([["a"]]))


@pytest.mark.parametrize("seed", range(5))
def test_self_bleu_equals_sentence_bleu_against_the_others(seed):
    """The counted-once self-BLEU equals the definition: each sequence's sentence_bleu against all the others
    (repeated n-grams, ties between sequences, empty and one-token sequences included), to the last bit."""
    rng = np.random.default_rng(seed)
    seqs = [list(rng.integers(0, 4, size=int(rng.integers(0, 9)))) for _ in range(int(rng.integers(2, 12)))]
    seqs += [list(seqs[0]), [1]]  # a duplicate, a one-token sequence
    want = float(np.mean([sentence_bleu(s, [o for j, o in enumerate(seqs) if j != i]) for i, s in enumerate(seqs)]))
    assert self_bleu(seqs) == want


def test_answers_and_rewards():
    assert final_answer("so \\boxed{\\frac{1}{2}} and then \\boxed{3}") == "3"
    assert final_answer("\\boxed{a{b}c}") == "a{b}c" and final_answer(" 42\n") == "42"
    assert exact_match_reward("1081", " 1081 ") == 1.0 and exact_match_reward("", "") == 0.0
    assert default_reward_fn("multiplication") is exact_match_reward


def test_math_verify_reward():
    pytest.importorskip("math_verify")
    from resrl_analysis.rewards import math_verify_reward

    assert math_verify_reward("the answer is $\\boxed{72}$", "72") == 1.0
    assert math_verify_reward("\\boxed{71}", "72") == 0.0


def test_sampling_is_seeded_and_leaves_global_rng():
    m = tiny_model(seed=0)
    state = torch.random.get_rng_state()
    a = sample_responses(m, [1, 5, 6], 5, max_new_tokens=4, seed=9, eos_token_id=2)
    assert torch.equal(state, torch.random.get_rng_state())
    assert a == sample_responses(m, [1, 5, 6], 5, max_new_tokens=4, seed=9, eos_token_id=2)
    assert all(1 <= len(r) <= 4 and (2 not in r[:-1]) for r in a)


def test_pass_at_k_end_to_end_against_math_comb():
    m, tok = tiny_model(seed=3), char_tokenizer()
    ps = random_probe_set([[1, 0], [0, 1], [1, 1]], seed=5)
    n = 6

    def reward(text: str, truth: str) -> float:  # depends on the sample, so c varies by prompt
        return float(len(text) % 2 == 0)

    r = diversity_probe(m, tok, ps, n_samples=n, max_new_tokens=5, reward_fn=reward, seed=1, step=3)
    s = r.samples
    assert len(s) == 3 * n and set(s.step) == {3}
    counts = [int((s[s.group_id == g].reward > 0).sum()) for g in range(3)]
    assert r.prompts.n_correct.tolist() == counts
    for k in range(1, n + 1):
        want = np.mean([1 - math.comb(n - c, k) / math.comb(n, k) for c in counts])
        got = r.pass_at_k[r.pass_at_k.k == k].pass_at_k.iloc[0]
        assert got == pytest.approx(want)
    assert r.pass_at_k.avg_at_n.iloc[0] == pytest.approx(sum(counts) / (3 * n))
    p0 = r.prompts.iloc[0]
    samples0 = [tok(t, add_special_tokens=False).input_ids for t in s[s.group_id == 0].response]
    assert p0.distinct_answer_frac == len(set(s[s.group_id == 0].answer)) / n
    assert 0 < p0.distinct_1 <= 1 and 0 <= p0.self_bleu <= 1 and len(samples0) == n


def test_no_ground_truth():
    from dataclasses import replace

    m, tok = tiny_model(seed=3), char_tokenizer()
    ps = random_probe_set([[1, 0]], seed=6)
    ps = replace(ps, groups=(replace(ps.groups[0], ground_truth=None),))
    r = diversity_probe(m, tok, ps, n_samples=3, max_new_tokens=3)
    assert np.isnan(r.prompts.accuracy.iloc[0]) and len(r.pass_at_k) == 0
    assert "ground truth" in r.skipped[0]["reason"] and len(r.samples) == 3
