"""Validation during training: Avg@n and pass@n on held-out prompts (``val/*`` metrics every ``val_every`` steps).

Its random draws come from their own generator, seeded from (seed, "val", step, rank): validating never moves
the training stream, so a run with validation trains exactly as one without.
"""

from __future__ import annotations

from typing import Any

import torch

from resrl_analysis.distributed import DistContext, all_gather_objects, gathered_for_inference
from trainer.config import TrainConfig
from trainer.rollout import sample_rollout
from trainer.setup import generator
from trainer.tasks import Task

__all__ = ["validate"]


def validate(cfg: TrainConfig, step: int, model: torch.nn.Module, tokenizer: Any, task: Task,
             ctx: DistContext) -> dict[str, Any]:
    """``val/reward_mean`` (Avg@n) and ``val/pass@n`` on the first ``val_prompts`` held-out prompts at
    ``val_temperature`` (``n = val_n``); empty when the task has no held-out prompts. A collective: every rank
    calls it and gets the same numbers."""
    prompts = task.validation_prompts()[: cfg.val_prompts]
    if not prompts:
        return {}
    mine = prompts[ctx.rank :: ctx.world_size]
    correct: list[int] = []
    with gathered_for_inference(model):  # a collective: every rank enters, even one without prompts
        if mine:
            batch, texts = sample_rollout(model, tokenizer, mine, n=cfg.val_n, temperature=cfg.val_temperature,
                                          cfg=cfg, generator=generator(cfg.seed, "val", step, ctx.rank), ctx=ctx)
            rows = [mine[i] for i in batch.prompt_index.tolist()]
            r = [task.reward(t, p.ground_truth) > 0 for t, p in zip(texts, rows)]
            correct = [sum(r[j * cfg.val_n : (j + 1) * cfg.val_n]) for j in range(len(mine))]
    every = [c for part in all_gather_objects(correct, ctx) for c in part]
    return {"val/reward_mean": sum(every) / (len(every) * cfg.val_n),
            f"val/pass@{cfg.val_n}": sum(c > 0 for c in every) / len(every)}
