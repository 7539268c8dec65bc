"""Test support for the trainer tests: a task a random tiny model half solves, and a CLI runner using it.

``EasyTask`` keeps the multiplication prompts but calls a response correct when it starts with a digit or
a lower-case letter: a freshly initialised tiny model (near-uniform over 101 tokens) gets that right about
a third of the time, so most groups of 4 are mixed and every algorithm (ResRL, NTHR included) has signal,
without depending on the shipped warm-start checkpoint.

Run as a script (also under torchrun) it is ``resrl train`` with that task:

    python tests/trainer_runner.py --steps 2 --output-dir /tmp/run --set model=tiny-random
"""

from __future__ import annotations

import string
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.tasks.multiplication import MultiplicationTask  # noqa: E402

_GOOD = set(string.digits + string.ascii_lowercase)


class EasyTask(MultiplicationTask):
    """Multiplication prompts; reward 1 when the response's first character is a digit or a-z."""

    def reward(self, response_text: str, ground_truth: str) -> float:
        return float(bool(response_text) and response_text[0] in _GOOD)


def train_easy(cfg: Any) -> Path:
    """``trainer.loop.train(cfg)`` on :class:`EasyTask`, whatever ``cfg.task`` says."""
    from trainer.loop import train

    return train(cfg, task=EasyTask())


#: Small, fast settings for tests (a random tiny model; overrides of the tiny preset).
FAST = dict(model="tiny-random", prompts_per_step=4, mini_batch_size=4, n=4, max_response_length=5,
            lr=3e-3, progress_bar="off", log_every=1000, cpu_threads=1)


def fast_args() -> list[str]:
    """:data:`FAST` as ``--set`` arguments."""
    out: list[str] = []
    for k, v in FAST.items():
        out += ["--set", f"{k}={v}"]
    return out


if __name__ == "__main__":
    from trainer.train_cli import main

    raise SystemExit(main(sys.argv[1:], task=EasyTask()))
