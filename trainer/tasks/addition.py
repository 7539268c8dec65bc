"""An embedded task whose responses show their work: 3-digit addition with the carry chain written out.

Prompt `"347+285="`, correct response (then EOS)

    7+5=12;4+8+1=13;3+2+1=6;=632

one step per digit column from the right, `+1` where the previous column carried, and the sum after
the last `=`. Right and wrong responses of the same prompt share long stretches and differ in a few
tokens (a wrong column sum, a dropped carry): the regime in which the interaction of positive and
negative responses on shared tokens that ResRL is about can be measured. Each step only needs two
prompt digits and the previous step's carry, so a tiny model learns the algorithm rather than the
pool, and the pool (about 810,000 ordered pairs) is far larger than anything SFT could memorise.

The split is fixed (independent of any training seed) and made on *unordered* operand pairs: if
347+285 is held out, so is 285+347.

The probes' held-out prompts (:meth:`AdditionTask.heldout_prompts`) are stratified by difficulty, so that
pass@k has room: three strata of held-out 3-digit pairs by the number of carries (``nocarry``: none,
``carry``: one or two, ``chain``: a carry out of every column), and a ``short`` stratum whose second operand
has two digits (a width the training pool never shows; the shipped warm start solves about 1% of them, the
3-digit strata about 85%, 65% and 45%). The stratum is the uid's part before ``/``.

    >>> task = AdditionTask()
    >>> p = task.validation_prompts()[0]
    >>> p.text[-1], p.ground_truth == str(eval(p.text[:-1]))
    ('=', True)
    >>> task.worked_solution(347, 285)
    '7+5=12;4+8+1=13;3+2+1=6;=632'
    >>> task.reward("7+5=12;4+8+1=13;3+2+1=6;=632<eos>junk", "632")
    1.0
"""

from __future__ import annotations

import numpy as np

from resrl_analysis.rewards import final_answer_reward
from trainer.tasks.base import Prompt, Task

# Fixed once: changing it would silently move prompts between train and validation, and the
# shipped warm-start checkpoint was trained on the training side of this split.
SPLIT_SEED = 20261201


def worked_solution(a: int, b: int, digits: int) -> str:
    """The scratchpad of `a + b` (both with `digits` digits): column sums from the right, then `=sum`.

    >>> worked_solution(47, 38, 2)
    '7+8=15;4+3+1=8;=85'
    >>> worked_solution(999, 1, 3)
    '9+1=10;9+0+1=10;9+0+1=10;=1000'
    """
    steps: list[str] = []
    carry = 0
    for i in range(digits):  # column i counts from the right
        x, y = a // 10**i % 10, b // 10**i % 10
        s = x + y + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={s}")
        carry = s // 10
    return ";".join(steps) + f";={a + b}"


class AdditionTask(Task):
    """Sums of two `digits`-digit integers (3 by default: 100..999, 810,000 ordered prompts).

    The reward checks the final answer only: the text after the last `=` of the response (cut at
    the first EOS, stripped) must be exactly the sum's digits. The scratchpad is *not* checked, so
    a response with a wrong step that still ends in the right sum counts as correct; the SFT target
    (:meth:`sft_target`) is the full worked solution.

    Args:
        digits: digits of each operand (1..3).
        validation_pairs: number of unordered operand pairs held out (each in both orders, so about
            twice as many validation prompts).
    """

    name = "addition"
    data_source = "addition"
    # Longest correct response at 3 digits: "9+9=18;9+9+1=19;9+9+1=19;=1998" (30 characters) + EOS;
    # 10 characters per digit in general. A little slack to observe run-ons (set per instance).
    default_max_new_tokens = 40

    def __init__(self, digits: int = 3, validation_pairs: int = 512) -> None:
        if not 1 <= digits <= 3:  # the pool is enumerated: 4 digits would be 81M prompts
            raise ValueError(f"digits must be in [1, 3], got {digits}")
        low, high = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
        n = high - low + 1
        num_unordered = n * (n + 1) // 2
        if not 0 <= validation_pairs < num_unordered:
            raise ValueError(f"validation_pairs must be in [0, {num_unordered}), got {validation_pairs}")
        self.digits, self.low, self.high = digits, low, high
        self.default_max_new_tokens = 10 * digits + 10
        # Draw held-out unordered pairs one at a time from a fixed stream, so the split does not depend
        # on numpy's vectorised sampling algorithms, only on the generator's integer stream.
        rng = np.random.default_rng(SPLIT_SEED)
        held: set[tuple[int, int]] = set()
        while len(held) < validation_pairs:
            x, y = (int(v) for v in rng.integers(low, high + 1, size=2))
            held.add((min(x, y), max(x, y)))
        self._val = [q for a, b in sorted(held) for q in ([(a, b)] if a == b else [(a, b), (b, a)])]
        a = np.repeat(np.arange(low, high + 1), n)  # (n*n,) ordered pairs, a-major
        b = np.tile(np.arange(low, high + 1), n)  # (n*n,)
        key = np.minimum(a, b) * (high + 1) + np.maximum(a, b)  # unordered pair -> one integer
        held_keys = np.array(sorted(x * (high + 1) + y for x, y in held), dtype=np.int64)
        keep = ~np.isin(key, held_keys)
        self._a, self._b = a[keep].astype(np.int32), b[keep].astype(np.int32)  # (num_train,)

    @property
    def num_train(self) -> int:
        return len(self._a)

    def worked_solution(self, a: int, b: int) -> str:
        """The correct response to `"{a}+{b}="` (without EOS)."""
        return worked_solution(a, b, self.digits)

    def _prompt(self, a: int, b: int) -> Prompt:
        return Prompt(uid=f"add-{a}+{b}", text=f"{a}+{b}=", ground_truth=str(a + b), data_source=self.data_source)

    def train_item(self, index: int) -> Prompt:
        return self._prompt(int(self._a[index]), int(self._b[index]))

    def validation_prompts(self) -> list[Prompt]:
        return [self._prompt(a, b) for a, b in self._val]

    #: The held-out strata, easiest first (:meth:`heldout_prompts`).
    STRATA = ("nocarry", "carry", "chain", "short")

    def carries(self, a: int, b: int) -> int:
        """How many digit columns of ``a + b`` carry (``self.digits`` columns).

        >>> AdditionTask(validation_pairs=1).carries(347, 285), AdditionTask(validation_pairs=1).carries(999, 1)
        (2, 3)
        """
        c = n = 0
        for i in range(self.digits):
            c = ((a // 10**i) % 10 + (b // 10**i) % 10 + c) // 10
            n += c
        return n

    def heldout_prompts(self, n: int) -> list[Prompt]:
        """``n`` held-out prompts stratified by difficulty, taken from the strata in turn (module docstring).

        The 3-digit strata are pairs of the validation split, in its order; ``short`` pairs (a 3-digit and a
        2-digit operand, never in the training pool) come from a fixed stream. Uids read ``<stratum>/add-a+b``.

        >>> [p.uid for p in AdditionTask().heldout_prompts(5)]
        ['nocarry/add-101+412', 'carry/add-101+978', 'chain/add-122+978', 'short/add-214+44', 'nocarry/add-101+762']
        """
        if self.digits != 3:
            return super().heldout_prompts(n)
        per = {s: [] for s in self.STRATA}
        for a, b in self._val:
            if a > b:  # one order of each held-out pair
                continue
            c = self.carries(a, b)
            per["nocarry" if c == 0 else "carry" if c < 3 else "chain"].append((a, b))
        rng = np.random.default_rng(SPLIT_SEED + 1)
        seen: set[tuple[int, int]] = set()
        while len(seen) < n:  # one draw at a time: the stream depends on the generator's integers only
            pair = (int(rng.integers(100, 1000)), int(rng.integers(10, 100)))
            if pair not in seen:
                seen.add(pair)
                per["short"].append(pair)
        out: list[Prompt] = []
        for i in range(n):
            for s in self.STRATA:
                if len(out) < n and i < len(per[s]):
                    a, b = per[s][i]
                    p = self._prompt(a, b)
                    out.append(Prompt(uid=f"{s}/{p.uid}", text=p.text, ground_truth=p.ground_truth,
                                      data_source=p.data_source))
            if len(out) >= n:
                break
        return out

    def sft_target(self, prompt: Prompt) -> str:
        """The worked solution of the prompt: what the warm start is trained to write."""
        a, b = prompt.text.rstrip("=").split("+")
        return self.worked_solution(int(a), int(b))

    def reward(self, response_text: str, ground_truth: str) -> float:
        """1.0 iff the text after the response's last `=` (cut at the first EOS, stripped) is the sum.

        >>> AdditionTask(validation_pairs=1).reward("7+8=15;4+3=7;=75", "85")
        0.0
        """
        return final_answer_reward(response_text, ground_truth)
