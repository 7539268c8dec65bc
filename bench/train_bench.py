"""Training-step time of our trainer: ``resrl`` against ``grpo`` (and the ``grpo`` side of the TRL comparison).

Runs :func:`trainer.train` in this process, alternating algorithms run by run (``grpo, resrl, resrl, grpo,
…``) so that drifts of the machine's load hit both sides alike, and reads each step's times from the run's
``metrics.jsonl`` (``timing/step_s`` = rollout + update: sampling, reward, the no-grad forward with the
ResRL/NTHR weights, and one optimizer step; checkpoint writing is outside it). The first
``warmup_steps`` steps of every run are dropped; the figures are medians over the rest.

Which policy: the shipped tiny warm start (``trainer/assets/tiny_warmstart``) when it exists, with the task's
real rewards. Otherwise a random tiny model, which never solves a task: every reward would be 0, no group
would mix positives and negatives, and ResRL would skip its weights. For random models the rewards are
therefore replaced by seeded coin flips (:func:`coin_flip_task`, the same sequence for every run), so that
ResRL does its full work; the table says which rewards were used.

    python -m bench.train_bench --rounds 3 --steps 6
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import Row, fmt_ratio, fmt_seconds

__all__ = [
    "AlgoTimes",
    "OVERHEAD_TARGET",
    "coin_flip_for",
    "coin_flip_task",
    "compare_algorithms",
    "default_tiny_model",
    "overhead_row",
    "run_steps",
    "trainer_status",
]

OVERHEAD_TARGET = 1.3
WARMSTART_ACCURACY = 0.35
"""Success probability of the coin-flip rewards (about the warm start's sampled accuracy)."""


def trainer_status() -> str | None:
    """None when ``trainer.train`` and ``trainer.config.TrainConfig`` import; else why not."""
    try:
        from trainer.config import TrainConfig  # noqa: F401
        from trainer.loop import train  # noqa: F401
    except Exception as exc:  # any import failure means "not ready"
        return f"trainer not ready ({type(exc).__name__}: {exc})"
    return None


def default_tiny_model() -> tuple[str, str]:
    """(``model`` setting, description): the shipped warm start if present, else ``tiny-random``."""
    try:
        from trainer.warmstart import TINY_WARMSTART_DIR

        if (Path(TINY_WARMSTART_DIR) / "config.json").is_file():
            return "tiny-warmstart", "tiny warm start, task rewards"
    except ImportError:
        pass
    return "tiny-random", f"random tiny model (warm start not shipped yet), coin-flip rewards p={WARMSTART_ACCURACY}"


def coin_flip_for(model: str) -> float | None:
    """Coin-flip reward probability for a model setting: None (real rewards) except for random models."""
    return WARMSTART_ACCURACY if model == "tiny-random" else None


def coin_flip_task(cfg: Any, p: float | None, seed: int = 0) -> Any:
    """The task ``cfg`` names, its rewards replaced by Bernoulli(``p``) draws from a generator seeded ``seed``
    (one draw per response, in the trainer's order); None (the task ``train`` builds itself) when ``p`` is None.

    Pass it as ``train(cfg, task=...)``. Embedded tasks only (``task=math`` needs the policy's tokenizer).
    """
    if p is None:
        return None
    import torch

    from trainer.setup import build_task
    from trainer.tasks import Prompt, Task

    inner = build_task(cfg, None)
    gen = torch.Generator().manual_seed(seed)

    class CoinFlipTask(Task):
        name, default_max_new_tokens = inner.name, inner.default_max_new_tokens

        @property
        def num_train(self) -> int:
            return inner.num_train

        def train_item(self, index: int) -> Prompt:
            return inner.train_item(index)

        def validation_prompts(self) -> list[Prompt]:
            return inner.validation_prompts()

        def reward(self, response_text: str, ground_truth: str) -> float:
            return float(torch.rand((), generator=gen) < p)

    return CoinFlipTask()


def run_steps(algorithm: str, *, model: str, steps: int, seed: int = 0, out_dir: Path | None = None,
              coin_flip: float | None = None, **overrides: Any) -> list[dict[str, Any]]:
    """Train ``steps`` optimizer steps of the ``tiny`` preset with ``overrides``; return metrics.jsonl rows.

    Writes to a temporary run directory (deleted afterwards) unless ``out_dir`` is given. Rollout dumps,
    TensorBoard and the progress bar are off; checkpoints only at step 0 and the end (outside the timings).
    ``coin_flip``: see :func:`coin_flip_task`.
    """
    from trainer.config import preset_config
    from trainer.loop import train

    tmp = None
    if out_dir is None:
        tmp = tempfile.mkdtemp(prefix=f"bench_train_{algorithm}_")
        out_dir = Path(tmp) / "run"
    try:
        settings: dict[str, Any] = dict(
            algorithm=algorithm, model=model, steps=steps, seed=seed, output_dir=str(out_dir),
            progress_bar="off", tensorboard=False, dump_rollouts=False, log_every=10**6,
        )
        settings.update(overrides)
        k = max(1, settings.get("prompts_per_step", 8) // settings.get("mini_batch_size", 8))
        settings.setdefault("save_every", max(k, steps // k * k))
        cfg = preset_config("tiny", **settings)
        run = train(cfg, task=coin_flip_task(cfg, coin_flip, seed))
        lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class AlgoTimes:
    """Per-step times (s) of one algorithm over all its runs, warm-up steps dropped."""

    algorithm: str
    step_s: list[float] = field(default_factory=list)
    rollout_s: list[float] = field(default_factory=list)
    update_s: list[float] = field(default_factory=list)
    completion_tokens: list[float] = field(default_factory=list)
    """Response tokens sampled per step (rows × mean response length)."""
    weighted_steps: int = 0
    """Steps where ResRL weights were computed (``resrl/weight_mean`` not null)."""

    def add(self, metrics: list[dict[str, Any]], rows: int, warmup_steps: int) -> None:
        """Append the timed steps of one run (its metrics.jsonl rows)."""
        for m in metrics[warmup_steps:]:
            self.step_s.append(float(m["timing/step_s"]))
            self.rollout_s.append(float(m.get("timing/rollout_s") or 0.0))
            self.update_s.append(float(m.get("timing/update_s") or 0.0))
            self.completion_tokens.append(rows * float(m.get("response/length_mean") or 0.0))
            self.weighted_steps += m.get("resrl/weight_mean") is not None

    @property
    def median_step_s(self) -> float:
        """Median step time."""
        return statistics.median(self.step_s)

    @property
    def tokens_per_s(self) -> float:
        """Sampled response tokens per second of step time (totals over the timed steps)."""
        return sum(self.completion_tokens) / sum(self.step_s)

    def summary(self) -> dict[str, Any]:
        """Medians and counts, JSON-ready."""
        return {
            "algorithm": self.algorithm, "steps_timed": len(self.step_s), "median_step_s": self.median_step_s,
            "median_rollout_s": statistics.median(self.rollout_s), "median_update_s": statistics.median(self.update_s),
            "tokens_per_s": self.tokens_per_s, "weighted_steps": self.weighted_steps,
        }


def compare_algorithms(algorithms: tuple[str, ...] = ("grpo", "resrl"), *, rounds: int = 3, steps: int = 6,
                       warmup_steps: int = 1, model: str | None = None, seed: int = 0,
                       coin_flip: float | None = None, **overrides: Any) -> dict[str, AlgoTimes]:
    """Alternate runs of each algorithm (order reversed every round); per-step times of each.

    ``coin_flip`` defaults to :func:`coin_flip_for` of the model; pass a probability to force it.
    """
    model = model or default_tiny_model()[0]
    if coin_flip is None:
        coin_flip = coin_flip_for(model)
    out = {a: AlgoTimes(a) for a in algorithms}
    rows = overrides.get("prompts_per_step", 8) * overrides.get("n", 8)
    for r in range(rounds):
        order = algorithms if r % 2 == 0 else tuple(reversed(algorithms))
        for a in order:
            metrics = run_steps(a, model=model, steps=steps, seed=seed, coin_flip=coin_flip, **overrides)
            out[a].add(metrics, rows, warmup_steps)
    return out


def overhead_row(times: dict[str, AlgoTimes], model_desc: str, setting: str) -> Row:
    """The ``resrl`` / ``grpo`` row of the table."""
    g, r = times["grpo"], times["resrl"]
    ratio = r.median_step_s / g.median_step_s
    ok = ratio <= OVERHEAD_TARGET
    split = (f"rollout {fmt_seconds(statistics.median(r.rollout_s))} vs {fmt_seconds(statistics.median(g.rollout_s))}, "
             f"update {fmt_seconds(statistics.median(r.update_s))} vs {fmt_seconds(statistics.median(g.update_s))}")
    if r.weighted_steps == 0:
        note = f"{model_desc}: no mixed group, ResRL weights never computed, so only a lower bound; {split}"
        status = "met (lower bound only)" if ok else "missed"
    else:
        note = f"{model_desc}; ResRL weights on {r.weighted_steps}/{len(r.step_s)} steps; {split}"
        status = "met" if ok else "missed"
    return Row(
        "ResRL overhead", setting, ours=f"{fmt_seconds(r.median_step_s)} (resrl)",
        reference=f"{fmt_seconds(g.median_step_s)} (grpo)", ratio=fmt_ratio(ratio), target="≤ 1.3×",
        status=status, note=note, data={a: t.summary() for a, t in times.items()},
    )


def main(argv: list[str] | None = None) -> None:
    """Command line: print the resrl/grpo comparison as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--model", default=None, help="tiny-warmstart | tiny-random | a model directory")
    a = ap.parse_args(argv)
    why = trainer_status()
    if why:
        raise SystemExit(why)
    model, desc = (a.model, f"{a.model}, task rewards") if a.model else default_tiny_model()
    times = compare_algorithms(rounds=a.rounds, steps=a.steps, model=model)
    print(json.dumps(overhead_row(times, desc, f"tiny preset, {a.rounds}×{a.steps} steps").to_dict(), indent=1))


if __name__ == "__main__":
    main()
