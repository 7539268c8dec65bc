"""Our ``grpo`` step against TRL's ``GRPOTrainer`` on the identical tiny setup (CPU).

Identical setup: the same model files (the tiny warm start when shipped, else the random tiny Qwen3-config
model with the character tokenizer, saved once by ``prepare``), the same prompts in the same order
(the multiplication task's seeded training stream), 4 prompts × 8 generations per step, at most 8 completion
tokens (EOS ends a completion), temperature 1, no top-k/top-p, exact-match reward
(:func:`resrl_analysis.rewards.exact_match_reward`; with a random model, which never solves the task, both sides
use seeded coin-flip rewards instead so that advantages are not all zero), no KL (no reference model), PPO
clip ε = 0.2 with token-mean aggregation (TRL's default ``dapo`` loss), one optimizer step per generation
batch, float32, CPU.

Timing: TRL's steps are timed by a ``TrainerCallback`` (``on_step_begin`` → ``on_step_end``: generation,
reward, forward/backward and optimizer step); ours by ``timing/step_s`` of ``metrics.jsonl`` (the same
span). The first ``warmup`` steps of every run are dropped; medians over the rest. Both sides run in
a fresh subprocess each (ours used to run inside the comparing process, warm after TRL's run or cold
before it, so the ratio depended on the order: 0.55 with TRL first, 1.13 with ours first). Rounds
alternate the order (TRL, ours | ours, TRL | …), the reported ratio is the median of the per-round
ratios, and their spread (min-max) is reported beside it. Tokens/s = completion tokens per step / step time.

TRL runs in its own virtual environment, ``bench/.venv-trl`` (``bash bench/trl_compare.sh`` creates it:
``torch==2.13.0`` first, then ``trl`` with torch held by a constraint). This module is imported by both
environments, so at module level it imports only the standard library and :mod:`bench.common`.

    python -m bench.trl_compare compare          # from our venv; needs bench/.venv-trl
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import BENCH_DIR, Row, emit_result, fmt_ratio, fmt_seconds, run_worker

__all__ = ["TRL_VENV", "TrlComparison", "compare_with_trl", "prepare", "run_ours", "run_trl"]

TRL_VENV = BENCH_DIR / ".venv-trl"
PROMPTS, GENERATIONS, MAX_TOKENS, LR = 4, 8, 8, 2e-4
TARGET = 1.0


def prepare(out: Path, steps: int, model: str | None = None) -> dict[str, Any]:
    """(Our venv.) Save the policy + tokenizer to ``out/model`` and the prompts to ``out/prompts.jsonl``."""
    from bench.train_bench import coin_flip_for, default_tiny_model
    from trainer.tasks.multiplication import MultiplicationTask

    choice, desc = (model, f"{model}, task rewards") if model else default_tiny_model()
    if choice == "tiny-warmstart":
        from trainer.warmstart import load_tiny_warmstart

        policy, tok = load_tiny_warmstart()
    elif choice == "tiny-random":
        from trainer.models import build_tiny_model
        from trainer.tokenizer import build_char_tokenizer

        tok = build_char_tokenizer()
        policy = build_tiny_model(seed=0, tokenizer=tok)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        policy, tok = AutoModelForCausalLM.from_pretrained(choice), AutoTokenizer.from_pretrained(choice)
    model_dir = out / "model"
    policy.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    prompts = MultiplicationTask().train_batch(0, PROMPTS * steps, seed=0)
    with open(out / "prompts.jsonl", "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p.text, "ground_truth": p.ground_truth}) + "\n")
    return {"model_dir": str(model_dir), "model": desc, "params": sum(p.numel() for p in policy.parameters()),
            "coin_flip": coin_flip_for(choice)}


def run_trl(model_dir: Path, prompts_file: Path, steps: int, warmup: int, threads: int,
            coin_flip: float | None = None) -> dict[str, Any]:
    """(TRL venv.) Train ``steps`` GRPO steps with TRL; per-step times and completion lengths."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from resrl_analysis.rewards import exact_match_reward

    rows = [json.loads(line) for line in prompts_file.read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list(rows)

    gen = torch.Generator().manual_seed(0)

    def reward(prompts: list, completions: list, ground_truth: list, **_: Any) -> list[float]:
        if coin_flip is not None:
            return (torch.rand(len(completions), generator=gen) < coin_flip).float().tolist()
        return [exact_match_reward(c, g) for c, g in zip(completions, ground_truth)]

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = 0.0
            self.times: list[float] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.times.append(time.perf_counter() - self.t0)

    timer = Timer()
    tmp = tempfile.mkdtemp(prefix="bench_trl_")
    args = GRPOConfig(
        output_dir=tmp, max_steps=steps, per_device_train_batch_size=PROMPTS * GENERATIONS,
        gradient_accumulation_steps=1, steps_per_generation=1, num_generations=GENERATIONS,
        max_completion_length=MAX_TOKENS, temperature=1.0, top_p=1.0, top_k=0, beta=0.0, num_iterations=1,
        epsilon=0.2, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, shuffle_dataset=False, seed=0, dataloader_num_workers=0, log_completions=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {
        "step_s": timer.times[warmup:], "completion_tokens": [PROMPTS * GENERATIONS * x for x in lengths[warmup:]],
        "trl": trl.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
    }


def run_ours(model_dir: Path, steps: int, warmup: int, threads: int, coin_flip: float | None = None
             ) -> dict[str, Any]:
    """(Our venv.) The same setup with our trainer's ``grpo``; per-step times and completion tokens."""
    from bench.train_bench import run_steps

    metrics = run_steps("grpo", model=str(model_dir), steps=steps, prompts_per_step=PROMPTS, mini_batch_size=PROMPTS,
                        n=GENERATIONS, max_response_length=MAX_TOKENS, kl_coef=0.0, lr=LR, temperature=1.0,
                        top_p=1.0, top_k=0, cpu_threads=max(threads, 0), coin_flip=coin_flip)
    rows = PROMPTS * GENERATIONS
    return {
        "step_s": [m["timing/step_s"] for m in metrics[warmup:]],
        "completion_tokens": [rows * (m.get("response/length_mean") or 0.0) for m in metrics[warmup:]],
    }


@dataclass
class TrlComparison:
    """Per-step times (s) and completion tokens of both sides, over all runs."""

    ours_s: list[float]
    trl_s: list[float]
    ours_tokens: list[float]
    trl_tokens: list[float]
    model: str
    trl_version: str
    threads: int = 1
    round_ratios: list[float] = field(default_factory=list)
    """Per round: our median step time / TRL's (rounds alternate which side runs first)."""

    @property
    def ratio(self) -> float:
        """The median over rounds of our median step time / TRL's (pooled medians without rounds)."""
        if self.round_ratios:
            return statistics.median(self.round_ratios)
        return statistics.median(self.ours_s) / statistics.median(self.trl_s)

    @property
    def spread(self) -> tuple[float, float]:
        """(min, max) of the per-round ratios."""
        r = self.round_ratios or [self.ratio]
        return min(r), max(r)

    @staticmethod
    def _tps(tokens: list[float], secs: list[float]) -> float:
        return sum(tokens) / sum(secs)

    def rows(self) -> list[Row]:
        """The table row."""
        ok = self.ratio <= TARGET
        o, t = statistics.median(self.ours_s), statistics.median(self.trl_s)
        o_len = statistics.mean(self.ours_tokens) / (PROMPTS * GENERATIONS)
        t_len = statistics.mean(self.trl_tokens) / (PROMPTS * GENERATIONS)
        return [Row(
            "Against TRL", f"{self.model}, {PROMPTS} prompts × {GENERATIONS}, ≤ {MAX_TOKENS} new tokens, no KL, "
                           f"fp32 CPU, {self.threads or 'default'} thread(s) each; TRL {self.trl_version}",
            ours=f"{fmt_seconds(o)}/step, {self._tps(self.ours_tokens, self.ours_s):.0f} tok/s",
            reference=f"{fmt_seconds(t)}/step, {self._tps(self.trl_tokens, self.trl_s):.0f} tok/s",
            ratio=fmt_ratio(self.ratio), target="≤ 1.0× (ours no slower)", status="met" if ok else "missed",
            note=(f"median of per-round ratios, spread {self.spread[0]:.2f}-{self.spread[1]:.2f}; both sides in "
                  f"fresh processes, order alternating; mean completion length {o_len:.1f} (ours) vs {t_len:.1f} "
                  f"(TRL); {len(self.ours_s)} vs {len(self.trl_s)} timed steps; per-round ratios "
                  + ", ".join(f"{r:.2f}" for r in self.round_ratios)),
            data={"ours_s": self.ours_s, "trl_s": self.trl_s},
        )]


def compare_with_trl(rounds: int = 4, steps: int = 6, warmup: int = 2, model: str | None = None,
                     trl_python: Path | None = None, threads: int = 1) -> TrlComparison:
    """(Our venv.) Prepare the shared model and prompts, then alternate TRL and our runs.

    ``threads``: torch CPU threads of both sides (0 = torch's default). One by default: with a ~1M-parameter
    model a second thread buys little, and on a shared 2-core machine two spinning OpenMP threads per
    process made TRL's steps 10-20× slower and erratic (measured here), which would compare contention,
    not trainers.
    """
    py = trl_python or (TRL_VENV / "bin" / "python")
    with tempfile.TemporaryDirectory(prefix="bench_trlcmp_") as tmp:
        info = prepare(Path(tmp), steps, model)
        ours: dict[str, list[float]] = {"step_s": [], "completion_tokens": []}
        theirs: dict[str, list[float]] = {"step_s": [], "completion_tokens": []}
        version = "?"
        round_ratios = []
        for r in range(rounds):
            medians: dict[str, float] = {}
            for side in (("trl", "ours") if r % 2 == 0 else ("ours", "trl")):
                if side == "trl":
                    res = run_worker(
                        "bench.trl_compare",
                        ["trl", "--model-dir", info["model_dir"], "--prompts", str(Path(tmp) / "prompts.jsonl"),
                         "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads),
                         "--coin-flip", str(info["coin_flip"] if info["coin_flip"] is not None else -1)],
                        python=str(py), malloc_env=False, timeout=600,
                        env={"OMP_NUM_THREADS": str(threads)} if threads > 0 else None,
                    )
                    version = res.get("trl", version)
                    target = theirs
                else:  # a fresh process too: the same start-up and cache state as TRL's side
                    res = run_worker(
                        "bench.trl_compare",
                        ["ours", "--model-dir", info["model_dir"], "--steps", str(steps), "--warmup", str(warmup),
                         "--threads", str(threads),
                         "--coin-flip", str(info["coin_flip"] if info["coin_flip"] is not None else -1)],
                        malloc_env=False, timeout=600,
                        env={"OMP_NUM_THREADS": str(threads)} if threads > 0 else None,
                    )
                    target = ours
                target["step_s"] += res["step_s"]
                target["completion_tokens"] += res["completion_tokens"]
                medians[side] = statistics.median(res["step_s"])
            round_ratios.append(medians["ours"] / medians["trl"])
    return TrlComparison(ours["step_s"], theirs["step_s"], ours["completion_tokens"], theirs["completion_tokens"],
                         model=info["model"], trl_version=version, threads=threads, round_ratios=round_ratios)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``compare`` (our venv) or ``trl`` (the TRL venv, called by ``compare``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="run both sides and print the row (our venv)")
    c.add_argument("--rounds", type=int, default=4)
    c.add_argument("--steps", type=int, default=6)
    c.add_argument("--warmup", type=int, default=2)
    c.add_argument("--model", default=None, help="tiny-warmstart | tiny-random | a model directory")
    c.add_argument("--trl-python", type=Path, default=None)
    c.add_argument("--threads", type=int, default=1, help="torch CPU threads of both sides (0 = default)")
    o = sub.add_parser("ours", help="time our trainer's grpo (our venv; called by compare)")
    o.add_argument("--model-dir", type=Path, required=True)
    o.add_argument("--steps", type=int, default=8)
    o.add_argument("--warmup", type=int, default=2)
    o.add_argument("--threads", type=int, default=1)
    o.add_argument("--coin-flip", type=float, default=-1.0, help="coin-flip reward probability (< 0: task reward)")
    t = sub.add_parser("trl", help="time TRL's GRPOTrainer (TRL venv)")
    t.add_argument("--model-dir", type=Path, required=True)
    t.add_argument("--prompts", type=Path, required=True)
    t.add_argument("--steps", type=int, default=8)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--coin-flip", type=float, default=-1.0, help="coin-flip reward probability (< 0: task reward)")
    a = ap.parse_args(argv)
    if a.cmd == "ours":
        flip = a.coin_flip if a.coin_flip >= 0 else None
        emit_result(run_ours(a.model_dir, a.steps, a.warmup, a.threads, flip))
        return
    if a.cmd == "trl":
        flip = a.coin_flip if a.coin_flip >= 0 else None
        emit_result(run_trl(a.model_dir, a.prompts, a.steps, a.warmup, a.threads, flip))
        return
    from bench.common import markdown_table
    from bench.train_bench import trainer_status

    why = trainer_status()
    if why:
        raise SystemExit(f"cannot compare: {why}")
    res = compare_with_trl(a.rounds, a.steps, a.warmup, a.model, a.trl_python, a.threads)
    print(markdown_table(res.rows()))


if __name__ == "__main__":
    main()
