"""The GRPO-family trainer (GRPO, PSR, NSR, W-REINFORCE, NTHR, ResRL) for Hugging Face causal LMs.

Train from Python, then inspect the run directory::

    >>> from trainer import TrainConfig, train          # doctest: +SKIP
    >>> run_dir = train(TrainConfig(algorithm="resrl", steps=20))   # doctest: +SKIP

or from the shell: ``resrl train --preset tiny --algorithm resrl --steps 20``.

Names are imported lazily, so ``import trainer.tokenizer`` (say) does not pull in the whole loop.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ALGORITHMS", "PRESETS", "TrainConfig", "TrainingDiverged", "preset_config", "train"]

_LAZY = {
    "TrainConfig": "trainer.config",
    "PRESETS": "trainer.config",
    "preset_config": "trainer.config",
    "ALGORITHMS": "resrl_analysis.advantages",
    "train": "trainer.loop",
    "TrainingDiverged": "trainer.loop",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
