"""Test support for `resrl view`: tiny probed runs of our layout, TRL's and verl's, made in a few seconds.

``our_run``: :func:`write_fake_run` (three checkpoints of a tiny random model, a step-0 rollout dump) plus
a step-1 dump, every per-token field of docs/RUN_DIRECTORY.md filled with seeded values (the rollout
log-probs and entropies included, as the trainer writes them), then a real ``resrl probe`` (lld, entropy,
interference). ``trl_run`` / ``verl_run``: the same checkpoints laid out as TRL (``checkpoint-N/``, a
completions log) and verl (``global_step_N/actor/huggingface/``, a rollout dump) write them, probed by
``resrl probe`` with the starting policy as ``--base-model``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from resrl_analysis.probes.runner import main as probe_main
from resrl_analysis.probes.synthetic import write_fake_run

PROBES = ["--probes", "lld,entropy,interference", "--groups", "0", "--no-progress", "--quiet", "--threads", "1"]
#: Per-token fields of the dump that `resrl view` colours (rollout log-prob and entropy included).
TOKEN_FIELDS = ("token_logprobs", "token_entropies", "token_advantages", "resrl_weights", "resrl_residuals",
                "nthr_weights", "nthr_scores")


def _fill(rows: list[dict], rng: np.random.Generator, step: int) -> list[dict]:
    """Seeded per-token values of the right shapes (None where the trainer writes None)."""
    out = []
    for r in rows:
        n, pos = len(r["response_ids"]), r["reward"] > 0
        adv = round(abs(float(rng.normal())) * (1 if pos else -1), 4)
        w = [1.0] * n if pos else [round(float(x), 4) for x in rng.uniform(0.1, 1.0, n)]
        out.append({**r, "step": step, "advantage": adv,
                    "token_logprobs": [round(float(x), 5) for x in -rng.exponential(1.0, n)],
                    "token_entropies": [round(float(x), 5) for x in rng.uniform(0.0, 2.5, n)],
                    "token_advantages": [round(adv * x, 5) for x in w],
                    "resrl_weights": w,
                    "resrl_residuals": [None] * n if pos else [round(float(x), 5) for x in rng.uniform(0, 0.2, n)],
                    "nthr_weights": [1.0] * n if pos else [round(float(x), 4) for x in rng.choice([0.5, 1.0], n)],
                    "nthr_scores": [None] * n if pos else [round(float(x), 4) for x in rng.normal(0, 3, n)]})
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def read_dump(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def slow_shared(ids: list[list[int]], positive: list[bool]) -> list[int]:
    """Per response, its longest common prefix with any response of the other sign, by plain loops (the slow
    reference of the shared prefix)."""
    out = []
    for i, a in enumerate(ids):
        best = 0
        for j, b in enumerate(ids):
            if positive[j] == positive[i]:
                continue
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            best = max(best, n)
        out.append(best)
    return out


def our_run(root: Path) -> Path:
    """Our run directory: checkpoints 0, 1, 2; dumps at steps 0 and 1 with every per-token field; probed."""
    run = write_fake_run(root / "ours", steps=(0, 1, 2), n_groups=5, group_size=6, debris=False)
    rng = np.random.default_rng(7)
    dump0 = run / "rollouts" / "step_000000.jsonl"
    rows = read_dump(dump0)
    _write_jsonl(dump0, _fill(rows, rng, 0))
    # Step 1: the same prompts, other responses (every second one cut short), other numbers.
    rows1 = [{**r, "response_ids": r["response_ids"][: max(1, len(r["response_ids"]) - (i % 2))]}
             for i, r in enumerate(rows)]
    _write_jsonl(run / "rollouts" / "step_000001.jsonl", _fill(rows1, rng, 1))
    assert probe_main([str(run), *PROBES]) == 0
    return run


def _checkpoints(src: Path) -> dict[int, Path]:
    return {int(p.name.split("_")[1]): p for p in sorted((src / "checkpoints").glob("step_*"))}


def trl_run(root: Path, ours: Path) -> Path:
    """A TRL output directory (checkpoint-1, checkpoint-2, a completions log) from our run's checkpoints."""
    run = root / "trl"
    ck = _checkpoints(ours)
    for step in (1, 2):
        shutil.copytree(ck[step], run / f"checkpoint-{step}", ignore=shutil.ignore_patterns("trainer_state.pt"))
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(
            {"global_step": step, "log_history": [{"step": s, "reward": 0.5} for s in range(1, step + 1)]}))
    rows = []
    for a, b in ((12, 34), (23, 47), (31, 42)):
        truth = str(a * b)
        for text in (truth, str(a * b + 1), truth, str(a * b - 7)):
            rows.append({"step": 1, "prompt": f"{a}*{b}=", "completion": text, "accuracy": float(text == truth),
                         "advantage": 0.5 if text == truth else -0.5})
    (run / "completions").mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(run / "completions" / "completions_00001.parquet")
    assert probe_main([str(run), "--base-model", str(ck[0]), *PROBES]) == 0
    return run


def verl_run(root: Path, ours: Path) -> Path:
    """A verl checkpoint directory (merged global_step_N/actor/huggingface) and its rollout dump, probed."""
    run = root / "verl"
    ck = _checkpoints(ours)
    for step in (1, 2):
        shutil.copytree(ck[step], run / f"global_step_{step}" / "actor" / "huggingface",
                        ignore=shutil.ignore_patterns("trainer_state.pt"))
    dump = root / "rollout_data" / "1.jsonl"
    dump.parent.mkdir(parents=True)
    # The logged score is what the probes use (issue 23: a run's own reward, not a recomputed one).
    _write_jsonl(dump, [{"input": f"{a}*{b}=", "output": o, "score": float(o == str(a * b)), "gts": str(a * b),
                         "step": 1,
                         "data_source": "multiplication"}
                        for a, b in ((12, 34), (56, 78)) for o in (str(a * b), str(a * b + 10), str(a * b))])
    assert probe_main([str(run), "--base-model", str(ck[0]), "--probe-set", str(dump.parent), *PROBES]) == 0
    return run
