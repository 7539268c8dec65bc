"""What a task is: :class:`Prompt`, :class:`Task` (the seeded, resumable prompt stream) and :class:`DataError`.

The concrete tasks (``multiplication``, ``addition``, ``math``) import these from here, and
:func:`trainer.tasks.make_task` imports them only when asked for, so no task module imports its package.

>>> Prompt("u1", "2*3=", "6", "multiplication").ground_truth
'6'
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["DataError", "Prompt", "Task"]


class DataError(ValueError):
    """Bad task input. The message is one line naming the file and line (jsonl) or row and field."""


@dataclass(frozen=True)
class Prompt:
    """One prompt of a task.

    Attributes:
        uid: stable identifier, unique within the task (rollout groups are keyed by it).
        text: the exact text fed to the tokenizer (chat template already applied if any).
        ground_truth: what the reward compares the response against.
        data_source: dataset name, as in verl's `data_source` column.
    """

    uid: str
    text: str
    ground_truth: str
    data_source: str


class Task(ABC):
    """A source of prompts with a verifiable reward.

    Subclasses provide `num_train`, `train_item(i)`, `validation_prompts()` and `reward()`;
    the seeded, resumable stream over the training prompts is implemented here.
    """

    name: str = "task"
    #: A response length that fits every correct answer of the task (a trainer default).
    default_max_new_tokens: int = 1024

    @property
    @abstractmethod
    def num_train(self) -> int:
        """Number of distinct training prompts."""

    @abstractmethod
    def train_item(self, index: int) -> Prompt:
        """Training prompt `index` in the task's fixed (unshuffled) order, 0 ≤ index < num_train."""

    @abstractmethod
    def validation_prompts(self) -> list[Prompt]:
        """The held-out prompts, in a fixed order (may be empty)."""

    @abstractmethod
    def reward(self, response_text: str, ground_truth: str) -> float:
        """1.0 if the response is correct, else 0.0."""

    def heldout_prompts(self, n: int) -> list[Prompt]:
        """The held-out prompts the probes use (``prompts/heldout.jsonl``): the first ``n`` validation prompts.

        A task may stratify them by difficulty instead: a prompt's stratum is its uid's part before ``/``
        (:func:`resrl_analysis.ops.stratum_of`), and pass@k is then reported per stratum too.
        """
        return self.validation_prompts()[:n]

    def sft_target(self, prompt: Prompt) -> str:
        """The response a supervised warm start is trained to write: the ground truth by default.

        Tasks whose responses show their work (the scratchpad of `addition`) return the full
        worked solution, of which the ground truth is only the end.

        >>> from trainer.tasks import make_task
        >>> make_task("multiplication").sft_target(Prompt("u", "2*3=", "6", "s"))
        '6'
        """
        return prompt.ground_truth

    # -- the resumable stream -------------------------------------------------------------------

    _perm_cache: tuple[int, int, np.ndarray] | None = None

    def _permutation(self, seed: int, epoch: int) -> np.ndarray:
        # One epoch's order is cached: a trainer reads positions in increasing order, so the
        # permutation is drawn once per epoch, not once per prompt.
        cache = self._perm_cache
        if cache is None or cache[0] != seed or cache[1] != epoch:
            perm = np.random.default_rng([seed, epoch]).permutation(self.num_train)
            self._perm_cache = cache = (seed, epoch, perm)
        return cache[2]

    def train_prompt(self, position: int, seed: int = 0) -> Prompt:
        """The prompt at `position` of the seeded training stream (positions run past epochs).

        >>> from trainer.tasks import make_task
        >>> task = make_task("multiplication")
        >>> task.train_prompt(task.num_train, seed=3).uid in {p.uid for p in task.train_batch(0, 5, 3)}
        False
        """
        if position < 0:
            raise ValueError(f"position must be ≥ 0, got {position}")
        n = self.num_train
        if n == 0:
            raise DataError(f"task {self.name!r} has no training prompts")
        epoch, offset = divmod(position, n)
        return self.train_item(int(self._permutation(seed, epoch)[offset]))

    def train_batch(self, position: int, size: int, seed: int = 0) -> list[Prompt]:
        """`size` consecutive prompts of the stream starting at `position`.

        A trainer drawing P prompts per step reads `train_batch(step * P, P, seed)`.
        """
        return [self.train_prompt(position + i, seed) for i in range(size)]

    def iter_train(self, seed: int = 0, start: int = 0) -> Iterator[Prompt]:
        """The endless training stream from position `start` (resume by passing the saved position)."""
        position = start
        while True:
            yield self.train_prompt(position, seed)
            position += 1
