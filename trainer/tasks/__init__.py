"""Tasks: where prompts, ground truths and rewards come from.

A task is a fixed, indexable list of training prompts plus a held-out validation list and a binary
reward. The training stream is a pure function of (seed, position): epoch e visits the training
prompts in the permutation drawn from `numpy.random.default_rng([seed, e])`, so a trainer that
stores only its position resumes on exactly the prompts it would have seen.

    >>> task = make_task("multiplication")
    >>> batch = task.train_batch(position=0, size=2, seed=0)
    >>> [p.text for p in batch] == [p.text for p in task.train_batch(0, 2, seed=0)]
    True
    >>> task.reward("1081", "1081"), task.reward("1080", "1081")
    (1.0, 0.0)
"""

from __future__ import annotations

from typing import Any

from trainer.tasks.base import DataError, Prompt, Task

__all__ = ["DataError", "Prompt", "Task", "make_task", "TASK_NAMES"]


TASK_NAMES = ("multiplication", "addition", "math")


def make_task(name: str, **kwargs: Any) -> Task:
    """Build a task by name: "multiplication" (the embedded default), "addition" (embedded, with a
    written-out carry chain) or "math" (local files).

    >>> make_task("multiplication").name, make_task("addition").name
    ('multiplication', 'addition')
    """
    if name == "multiplication":
        from trainer.tasks.multiplication import MultiplicationTask

        return MultiplicationTask(**kwargs)
    if name == "addition":
        from trainer.tasks.addition import AdditionTask

        return AdditionTask(**kwargs)
    if name == "math":
        from trainer.tasks.math import MathTask

        return MathTask(**kwargs)
    raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
