"""Reward functions: exact match, math-verify (also off the main thread), length scale, and the one reward per
task that the trainer and the probes share (the cases where the four copies of issue 20 disagreed)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from resrl_analysis.rewards import (
    EOS_TEXT,
    default_reward_fn,
    exact_match_reward,
    final_answer_reward,
    length_scale_reward,
    math_verify_reward,
)

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


# -- one reward per task, shared by the trainer and the probes ----------------------------------------
# Before issue 20 the rewards had four homes that disagreed on exactly these cases: trainer/rewards.py (EOS text
# cut, math-verify time-outs off outside the main thread), probes/diversity.py (no EOS cut; math-verify's own
# signal-based time-outs, which raise off the main thread; addition scored by math-verify),
# probe_sets.final_answer_reward (no EOS cut) and probe_sets._prompt_file_reward (a math run's prompts scored by
# the final answer). The trainer's behaviour produced the logged rewards, so it is the one kept.

#: (response, ground truth): the cases the copies scored differently, and the ordinary ones around them.
RESPONSES = [
    ("1081", "1081"), (" 1081 \n", "1081"), ("1081", " 1081 "), ("108", "1081"), ("", "1081"), ("  ", "  "),
    (f"1081{EOS_TEXT}junk", "1081"), (f" 1081 {EOS_TEXT}", "1081"), (f"{EOS_TEXT}1081", "1081"),
    ("7+5=12;4+8+1=13;3+2+1=6;=632", "632"), (f"7+5=12;4+8+1=13;3+2+1=6;=632{EOS_TEXT}junk", "632"),
    (f"7+5=12;=12{EOS_TEXT}=5", "12"), ("632=", "632"), ("=632 ", "632"), ("7+5=12;=633", "632"),
    ("\\boxed{632}", "632"), ("so $\\boxed{72}$", "72"), ("The answer is 72.", "72"), ("23*47=1081", "1081"),
]


@pytest.mark.unit
@pytest.mark.parametrize(("response", "gold", "want"), [
    (f"1081{EOS_TEXT}junk", "1081", 1.0),  # probes/diversity.py's copy gave 0 (no EOS cut)
    (f"{EOS_TEXT}1081", "1081", 0.0),  # nothing before the EOS: empty
    (" 1081 \n", "1081", 1.0), ("1081", " 1081 ", 1.0),  # whitespace stripped on both sides
    ("23*47=1081", "1081", 0.0),  # the whole response, not the text after "="
    ("\\boxed{1081}", "1081", 0.0),  # no boxed-answer extraction in exact match
])
def test_exact_match_cases_where_copies_differed(response, gold, want):
    assert exact_match_reward(response, gold) == want


@pytest.mark.unit
@pytest.mark.parametrize(("response", "gold", "want"), [
    (f"7+5=12;4+8+1=13;3+2+1=6;=632{EOS_TEXT}junk", "632", 1.0),  # probe_sets' copy gave 0 (no EOS cut)
    (f"7+5=12;=12{EOS_TEXT}=5", "12", 1.0),  # probe_sets' copy read "5", the text after a "=" past the EOS
    ("=632 \n", " 632", 1.0), ("632", "632", 1.0),  # whitespace; no "=" at all: the whole response
    ("632=", "632", 0.0), ("7+5=12;=633", "632", 0.0),  # an empty or wrong final answer
    ("7+5=12;=\\boxed{632}", "632", 0.0),  # math-verify (diversity's default for addition) said 1
])
def test_final_answer_cases_where_copies_differed(response, gold, want):
    assert final_answer_reward(response, gold) == want


@pytest.mark.unit
def test_each_data_source_gets_the_reward_its_task_used():
    assert default_reward_fn("multiplication") is exact_match_reward
    assert default_reward_fn("addition") is final_answer_reward  # diversity's copy: math-verify
    assert default_reward_fn("openai/gsm8k") is math_verify_reward  # a math file's data source
    assert default_reward_fn("") is math_verify_reward  # a foreign dump (diversity's copy: exact match)


@pytest.mark.unit
def test_probe_reward_equals_the_trainer_task_reward(tmp_path):
    """For every embedded task and every case above, the reward a probe recomputes from the prompt's data source
    is the trainer's own ``task.reward`` (the value logged in its rollouts)."""
    import json

    from trainer.tasks import make_task
    from trainer.tasks.math import MathTask

    data = tmp_path / "toy.jsonl"
    data.write_text(json.dumps({"prompt": "6*12=?", "reward_model": {"ground_truth": "72"}}) + "\n")
    tasks = [make_task("multiplication"), make_task("addition"), MathTask(data)]
    for task in tasks:
        source = task.train_item(0).data_source  # what the rollout dump records for the prompt
        probe_reward = default_reward_fn(source)
        for response, gold in RESPONSES:
            assert probe_reward(response, gold) == task.reward(response, gold), (source, response, gold)


@pytest.mark.unit
def test_probe_rewards_work_off_the_main_thread():
    # The probes' math-verify copy raised "signal only works in main thread" there; the one reward switches the
    # time-outs off instead, as the trainer's did.
    fn = default_reward_fn("openai/gsm8k")
    out: list[float] = []
    t = threading.Thread(target=lambda: out.append(fn("so $\\boxed{72}$", "72")))
    t.start()
    t.join(timeout=60)
    assert out == [1.0]
