"""Reward functions: exact match, math-verify (also off the main thread), length scale."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from trainer.rewards import exact_match_reward, length_scale_reward, math_verify_reward

# -- math-verify ------------------------------------------------------------------------------------

MATH_CASES = [
    ("The answer is $\\boxed{72}$.", "72", 1.0),
    ("so x = \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("we get $\\frac{2}{4}$", "\\frac{1}{2}", 1.0),
    ("Final answer: 72", "72", 1.0),
    ("The answer is $\\boxed{71}$.", "72", 0.0),
    ("I have no idea", "72", 0.0),
    ("", "72", 0.0),
    ("\\boxed{3}", "$3$", 1.0),  # a gold already in delimiters is used as is
]


@pytest.mark.unit
@pytest.mark.parametrize(("response", "gold", "expected"), MATH_CASES)
def test_math_verify_reward(response, gold, expected):
    assert math_verify_reward(response, gold) == expected


@pytest.mark.unit
def test_math_verify_gold_is_the_first_argument():
    # verify() is asymmetric: an interval answer matches an inequality gold, not the reverse
    # (math-verify 0.9). Swapping gold and answer inside the reward flips both results.
    assert math_verify_reward("$(1,2)$", "1<x<2") == 1.0
    assert math_verify_reward("$1<x<2$", "(1,2)") == 0.0
    # an unparsable gold never matches, not even an equally empty answer
    assert math_verify_reward("\\boxed{}", "") == 0.0


@pytest.mark.unit
def test_math_verify_works_off_the_main_thread():
    # Called naively, math-verify raises here ("signal only works in main thread").
    results: dict[int, float] = {}
    errors: list[BaseException] = []

    def work(i: int, response: str, gold: str) -> None:
        try:
            results[i] = math_verify_reward(response, gold)
        except BaseException as e:  # noqa: B036 - the test must see *any* failure in the thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, r, g)) for i, (r, g, _) in enumerate(MATH_CASES[:5])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert [results[i] for i in range(5)] == [e for _, _, e in MATH_CASES[:5]]


# -- exact match ------------------------------------------------------------------------------------


@pytest.mark.unit
def test_exact_match():
    assert exact_match_reward("42", "42") == 1.0
    assert exact_match_reward("42\n", " 42") == 1.0
    assert exact_match_reward("42</s>", "42", eos_text="</s>") == 1.0
    assert exact_match_reward("42 43", "42") == 0.0
    assert exact_match_reward("  ", "  ") == 0.0


# -- length scale (hand-computed values) ----------------------------------------------------------


@pytest.mark.unit
def test_length_scale_paper_values():
    # length_start 3500, max 4096, end 0.7: slope 0.3 / 596 per token
    lengths = np.array([0, 3500, 3501, 3798, 4096, 5000])
    out = length_scale_reward(np.ones(6), lengths, 3500, 4096, 0.7)
    expected = np.array([1.0, 1.0, 1.0 - 0.3 / 596, 0.85, 0.7, 0.7])
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)


@pytest.mark.unit
def test_length_scale_hand_values_and_negatives_untouched():
    r = np.array([2.0, 1.0, 0.0, -1.0, -0.5, 1.0])
    n = np.array([15, 12, 20, 20, 100, 10])
    out = length_scale_reward(r, n, length_start=10, max_length=20, end_scale=0.5)
    # 2 * (1 - 0.5 * 0.5) = 1.5 ; 1 * (1 - 0.5 * 0.2) = 0.9 ; zeros and negatives unchanged
    np.testing.assert_allclose(out, [1.5, 0.9, 0.0, -1.0, -0.5, 1.0])


@pytest.mark.unit
def test_length_scale_torch_matches_numpy_and_broadcasts():
    r = torch.tensor([[1.0, -1.0], [1.0, 1.0]])
    n = torch.tensor([30, 40])  # broadcast over rows
    out = length_scale_reward(r, n, 20, 60, 0.6)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    ref = length_scale_reward(r.numpy(), n.numpy(), 20, 60, 0.6)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6)
    # (30 - 20) / 40 = 0.25 → 1 - 0.4 * 0.25 = 0.9
    assert out[0, 0].item() == pytest.approx(0.9)
    assert out[0, 1].item() == -1.0
    # integer rewards become floats instead of being truncated
    out_int = length_scale_reward(torch.tensor([1, 0]), torch.tensor([60, 60]), 20, 60, 0.6)
    assert out_int.tolist() == pytest.approx([0.6, 0.0])


@pytest.mark.unit
def test_length_scale_scalar_and_validation():
    assert float(length_scale_reward(1.0, 15, 10, 20, 0.5)) == pytest.approx(0.75)
    assert float(length_scale_reward(1.0, 15, 10, 20, 1.0)) == 1.0  # end_scale 1 disables it
    with pytest.raises(ValueError):
        length_scale_reward(1.0, 5, 10, 10, 0.5)
    with pytest.raises(ValueError):
        length_scale_reward(1.0, 5, 10, 20, 1.5)
