"""The rollout dump: ``rollouts/step_XXXXXX.jsonl``, one JSON object per response (docs/RUN_DIRECTORY.md).

What was sampled (prompt, response text and ids, reward, group), what the algorithm made of it (advantages and
every registered per-token extra, e.g. ResRL's weights and residuals) and, per response token, the rollout
policy's log-prob and entropy from the no-grad forward the trainer runs before the update (``token_logprobs``,
``token_entropies``: what a token viewer colours by). Those two are kept to :data:`TOKEN_DIGITS` significant
digits, which keeps the files small.

>>> import json, tempfile, torch
>>> from resrl_analysis.distributed import DistContext
>>> from trainer.tasks import Prompt
>>> data = ScoredBatch(
...     prompt_ids=torch.tensor([[0, 5], [0, 5]]), prompt_mask=torch.tensor([[False, True], [False, True]]),
...     response_ids=torch.tensor([[7, 8], [9, 0]]), response_mask=torch.tensor([[True, True], [True, False]]),
...     finished=torch.tensor([True, True]), group_ids=torch.tensor([0, 0]), rewards=torch.tensor([1.0, 0.0]),
...     old_logp=torch.tensor([[-0.5, -1.25], [-2.0, 0.0]]), advantages=torch.tensor([0.7, -0.7]),
...     token_advantages=torch.tensor([[0.7, 0.7], [-0.7, 0.0]]),
...     prompts=[Prompt("u0", "2*3=", "6", "mult")] * 2, texts=["6", "5"])
>>> tmp = tempfile.TemporaryDirectory()
>>> dump_rollouts(tmp.name, 0, data, DistContext.single(torch.device("cpu")))
>>> rows = [json.loads(line) for line in open(f"{tmp.name}/rollouts/step_000000.jsonl")]
>>> [(r["response_ids"], r["reward"], r["token_logprobs"]) for r in rows]
[([7, 8], 1.0, [-0.5, -1.25]), ([9], 0.0, [-2.0])]
>>> rows[0]["token_entropies"] is None  # the batch holds no entropies: the trainer asks for them when it dumps
True
>>> tmp.cleanup()
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from resrl_analysis.advantages import EXTRAS
from resrl_analysis.distributed import DistContext, all_gather_objects
from resrl_analysis.rundir import rollout_path
from trainer.metrics_log import write_rollouts
from trainer.rollout import ScoredBatch
from trainer.setup import on_all_ranks

__all__ = ["TOKEN_DIGITS", "dump_rollouts", "round_sig"]

#: Significant digits of ``token_logprobs`` and ``token_entropies`` (float32 holds about 7).
TOKEN_DIGITS = 6


def round_sig(values: list[float], digits: int = TOKEN_DIGITS) -> list[float]:
    """``values`` rounded to ``digits`` significant digits (non-finite values pass through; the writer stores
    them as null).

    >>> round_sig([-1.234567891, 0.000123456789, 2.0, float("nan")])
    [-1.23457, 0.000123457, 2.0, nan]
    """
    return [float(f"{v:.{digits}g}") for v in values]


def dump_rollouts(run_dir: str | Path, step: int, data: ScoredBatch, ctx: DistContext, *,
                  write: Callable[[Path, list[dict[str, Any]]], None] = write_rollouts) -> None:
    """Write ``rollouts/step_XXXXXX.jsonl`` of a rollout batch: rank 0 writes every rank's rows, group after group.

    A collective (every rank calls it). ``write`` writes the file (the trainer names its writer where the
    loop's steps are); a failure is raised on every rank as :class:`trainer.metrics_log.RunWriteError`.
    """
    rows = []
    assert data.prompts is not None and data.texts is not None
    lengths = data.response_mask.sum(1).tolist()
    pmask = data.prompt_mask.tolist()
    for i in range(data.num_rows):
        L = lengths[i]

        def tok(x: Tensor | None, i: int = i, L: int = L, nan_as_none: bool = False) -> list | None:
            if x is None:
                return None
            vals = x[i, :L].tolist()
            return [None if (nan_as_none and not math.isfinite(v)) else v for v in vals]

        p = data.prompts[i]
        rows.append({
            "step": step, "group_id": int(data.group_ids[i]), "prompt_uid": p.uid, "data_source": p.data_source,
            "prompt": p.text, "prompt_ids": [t for t, m in zip(data.prompt_ids[i].tolist(), pmask[i]) if m],
            "response": data.texts[i], "response_ids": data.response_ids[i, :L].tolist(),
            "ground_truth": p.ground_truth, "reward": float(data.rewards[i]),
            "is_positive": bool(data.rewards[i] > 0), "finished": bool(data.finished[i]),
            "advantage": float(data.advantages[i]), "token_advantages": tok(data.token_advantages),
            # Every registered extra, None where this algorithm has none; undefined values (NaN) as None.
            **{name: tok(data.extras.get(name), nan_as_none=True) for name in EXTRAS},
            # The rollout policy's own view of each token (the forward that gave the old log-probs).
            "token_logprobs": round_sig(data.old_logp[i, :L].tolist()),
            "token_entropies": round_sig(data.entropy[i, :L].tolist()) if data.entropy is not None else None,
        })
    every = all_gather_objects(rows, ctx)
    if ctx.is_main:
        merged = sorted((r for part in every for r in part), key=lambda r: r["group_id"])  # stable: rows of a
        path = rollout_path(run_dir, step)  # group keep their order
        on_all_ranks(write, path, merged, what=str(path), ctx=ctx)
    else:
        on_all_ranks(None, what="", ctx=ctx)
