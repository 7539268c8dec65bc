"""The `addition` task: worked solutions, the fixed split, the reward, and its `tiny-addition` preset."""

from __future__ import annotations

import pytest

from trainer.tasks import TASK_NAMES, Prompt, make_task
from trainer.tasks.addition import AdditionTask, worked_solution
from trainer.tokenizer import build_char_tokenizer


@pytest.fixture(scope="module")
def task() -> AdditionTask:
    return AdditionTask()


def _check_scratchpad(prompt: str, response: str) -> int:
    """Independent reference: re-do the schoolbook column addition on the digit strings and check each step."""
    a, b = prompt.rstrip("=").split("+")
    *steps, final = response.split(";")
    assert len(steps) == len(a) == len(b)
    carry = 0
    for i, step in enumerate(steps):
        x, y = a[len(a) - 1 - i], b[len(b) - 1 - i]
        want = f"{x}+{y}" + ("+1" if carry else "") + "=" + str(int(x) + int(y) + carry)
        assert step == want, (prompt, response, i)
        carry = (int(x) + int(y) + carry) >= 10
    assert final == "=" + str(int(a) + int(b))
    return int(final[1:])


@pytest.mark.unit
@pytest.mark.parametrize("a,b", [(100, 100), (999, 999), (347, 285), (505, 495), (123, 876), (990, 110)])
def test_worked_solution_matches_column_addition(a, b):
    assert _check_scratchpad(f"{a}+{b}=", worked_solution(a, b, 3)) == a + b
    assert worked_solution(347, 285, 3) == "7+5=12;4+8+1=13;3+2+1=6;=632"


@pytest.mark.unit
def test_every_sampled_target_is_a_correct_scratchpad_of_15_to_40_tokens(task):
    tok = build_char_tokenizer()
    lengths = set()
    for i in range(0, task.num_train, 4999):
        p = task.train_item(i)
        target = task.sft_target(p)
        assert _check_scratchpad(p.text, target) == int(p.ground_truth)
        ids = tok(target, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == target  # fits the character tokenizer
        lengths.add(len(ids) + 1)  # + EOS
        assert task.reward(target, p.ground_truth) == 1.0
    assert 15 <= min(lengths) and max(lengths) + 1 <= task.default_max_new_tokens <= 40
    assert len(lengths) >= 4  # carries make the responses' lengths vary


@pytest.mark.integration  # walks all 810,000 pairs
def test_split_is_fixed_on_unordered_pairs_and_large(task):
    val = task.validation_prompts()
    pairs = [tuple(map(int, p.text[:-1].split("+"))) for p in val]
    unordered = {(min(a, b), max(a, b)) for a, b in pairs}
    assert len(unordered) == 512 and set(pairs) == {q for a, b in unordered for q in ((a, b), (b, a))}
    assert task.num_train + len(val) == 900 * 900
    train_keys = {(min(int(task._a[i]), int(task._b[i])), max(int(task._a[i]), int(task._b[i])))
                  for i in range(task.num_train)}
    assert not train_keys & unordered
    # A 40-step demo of 32 prompts per step sees each training prompt at most once.
    assert task.num_train >= 40 * 32
    assert len({task.train_prompt(i, seed=0).uid for i in range(40 * 32)}) == 40 * 32
    # The split does not depend on a training seed, nor on a second construction.
    again = AdditionTask()
    assert [p.uid for p in again.validation_prompts()] == [p.uid for p in val]
    assert task.train_item(12345) == again.train_item(12345)
    assert all(p.ground_truth == str(eval(p.text[:-1])) for p in val[:50])  # noqa: S307 (digits and +)


@pytest.mark.unit
def test_reward_checks_the_final_number_only(task):
    gt = "632"
    right = "7+5=12;4+8+1=13;3+2+1=6;=632"
    assert task.reward(right, gt) == 1.0
    assert task.reward(right + "<eos>7+5", gt) == 1.0  # run-on after EOS is ignored
    assert task.reward(right.replace("=13", "=14"), gt) == 1.0  # the scratchpad is not checked
    assert task.reward(right[:-1] + "3", gt) == 0.0
    assert task.reward(right + "2", gt) == 0.0  # "6322" is not "632"
    assert task.reward("7+5=12;4+8+1=13;3+2+1=6;=", gt) == 0.0
    assert task.reward("", gt) == 0.0
    assert task.reward("7+5=12;4+8+1=13;3+2+1=6;=632 ", gt) == 1.0


@pytest.mark.unit
def test_registered_and_validated():
    assert "addition" in TASK_NAMES
    small = make_task("addition", digits=2, validation_pairs=10)
    held = {p.text for p in small.validation_prompts()}
    assert small.num_train + len(held) == 90 * 90 and 10 <= len(held) <= 20
    assert _check_scratchpad("47+38=", small.sft_target(Prompt("u", "47+38=", "85", "addition"))) == 85
    for bad in (0, 4):
        with pytest.raises(ValueError, match="digits must be in"):
            AdditionTask(digits=bad)
    with pytest.raises(ValueError, match="validation_pairs must be in"):
        AdditionTask(digits=1, validation_pairs=1000)


@pytest.mark.unit
@pytest.mark.parametrize("digits", [1, 2, 3])
def test_response_budget_fits_the_longest_answer(digits):
    t = AdditionTask(digits=digits, validation_pairs=1)
    longest = worked_solution(t.high, t.high, digits)
    assert len(longest) + 1 < t.default_max_new_tokens
