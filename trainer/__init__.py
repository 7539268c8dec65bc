"""The GRPO-family trainer (GRPO, PSR, NSR, W-REINFORCE, NTHR, ResRL) for Hugging Face causal LMs.

Train from Python, then inspect the run directory (here one optimizer step of the embedded tiny model on
4 prompts × 8 responses; the defaults take 20 steps of 32 prompts)::

    >>> import tempfile
    >>> from trainer import TrainConfig, train
    >>> out = tempfile.TemporaryDirectory()
    >>> run_dir = train(TrainConfig(algorithm="resrl", steps=1, prompts_per_step=4, mini_batch_size=4,
    ...                             output_dir=out.name, progress_bar="off"))  # doctest: +ELLIPSIS
    step      1  reward ...  pg_loss ...  entropy ...  grad_norm ...
    >>> sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    ['step_000000', 'step_000001']
    >>> out.cleanup()

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
