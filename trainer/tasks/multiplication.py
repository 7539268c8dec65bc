"""The embedded default task: 2-digit × 2-digit multiplication.

Prompt `"23*47="`, correct response `"1081"` followed by EOS. The split is fixed (independent of any
training seed) and made on *unordered* operand pairs: if 23*47 is held out, so is 47*23, so the
validation accuracy measures multiplication rather than recall of the commuted fact.

    >>> task = MultiplicationTask()
    >>> p = task.validation_prompts()[0]
    >>> p.text[-1], p.ground_truth == str(eval(p.text[:-1]))
    ('=', True)
    >>> task.reward(" 1081<eos>junk", "1081")
    1.0
"""

from __future__ import annotations

import numpy as np

from resrl_analysis.rewards import exact_match_reward
from trainer.tasks.base import Prompt, Task

# Fixed once: changing it would silently move prompts between train and validation, and the
# shipped warm-start checkpoint was trained on the training side of this split.
SPLIT_SEED = 20260501


class MultiplicationTask(Task):
    """Products of two integers in [low, high] (10..99 by default: 8100 ordered prompts).

    Args:
        low, high: operand range, inclusive.
        validation_pairs: number of unordered operand pairs held out (each in both orders, so about
            twice as many validation prompts).
    """

    name = "multiplication"
    data_source = "multiplication"
    default_max_new_tokens = 8  # at most 4 digits + EOS; a little slack to observe run-ons

    def __init__(self, low: int = 10, high: int = 99, validation_pairs: int = 256) -> None:
        if not 0 <= low <= high:
            raise ValueError(f"need 0 ≤ low ≤ high, got low={low}, high={high}")
        unordered = [(a, b) for a in range(low, high + 1) for b in range(a, high + 1)]
        if not 0 <= validation_pairs < len(unordered):
            raise ValueError(f"validation_pairs must be in [0, {len(unordered)}), got {validation_pairs}")
        order = np.random.default_rng(SPLIT_SEED).permutation(len(unordered))
        held_out = {unordered[i] for i in order[:validation_pairs]}
        self.low, self.high = low, high
        self._train: list[tuple[int, int]] = []
        self._val: list[tuple[int, int]] = []
        for a in range(low, high + 1):
            for b in range(low, high + 1):
                (self._val if (min(a, b), max(a, b)) in held_out else self._train).append((a, b))

    @property
    def num_train(self) -> int:
        return len(self._train)

    def _prompt(self, a: int, b: int) -> Prompt:
        return Prompt(uid=f"mul-{a}*{b}", text=f"{a}*{b}=", ground_truth=str(a * b), data_source=self.data_source)

    def train_item(self, index: int) -> Prompt:
        return self._prompt(*self._train[index])

    def validation_prompts(self) -> list[Prompt]:
        return [self._prompt(a, b) for a, b in self._val]

    def reward(self, response_text: str, ground_truth: str) -> float:
        """1.0 iff the response, cut at the first EOS and stripped, is exactly the product's digits."""
        return exact_match_reward(response_text, ground_truth)
