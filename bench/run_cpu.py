"""The CPU benchmarks of issue 6 (``make bench``): a markdown table and the CPU section of RESULTS.md.

1. Interference: factorised all-pairs head-gradient inner products against ``vmap(grad)`` per-sample
   gradients, on the tiny model's head and on V = 32,000, d = 512 (:mod:`bench.interference_bench`).
2. Log-prob and entropy memory: chunked against full float32 logits at V = 151,936, 512 tokens
   (:mod:`bench.logprob_bench`).
3. ResRL overhead: ``resrl`` against ``grpo`` step time on the tiny preset (:mod:`bench.train_bench`).
4. Against TRL: our ``grpo`` step against TRL's ``GRPOTrainer`` (:mod:`bench.trl_compare`), only when
   ``bench/.venv-trl`` exists (``bash bench/trl_compare.sh`` creates it; ``make bench`` installs nothing).

Designed for at most 10 minutes on 2 cores. Every part runs in its own try-block: a failure becomes a row
with status ``error`` and the others still run. ``--quick`` shrinks every size (a smoke run, not numbers to
publish; it never writes RESULTS.md).

Threads: every measurement uses ``--threads`` torch/OpenMP threads (1 by default, like the trainer's tiny
preset). On a 2-core machine shared with other jobs, two OpenMP threads per process that wait on each other
made the same small operations 10-100× slower and erratic (e.g. ``resrl_token_weights`` on a 64 × 256 × 1024
batch: 0.68 s with one thread, 8.1 s with two, load average 4.4), which would measure the machine's load
rather than the code. Both sides of every comparison run with the same setting.

    python -m bench.run_cpu [--quick] [--no-write] [--skip-trainer] [--skip-trl] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # save_pretrained's shard bars in the trainer runs

from bench.common import (  # noqa: E402
    RESULTS_PATH,
    Row,
    machine_info,
    machine_line,
    markdown_table,
    memory_method,
    update_results_section,
)

__all__ = ["main", "run_all"]


def _load() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def _tiny_head() -> tuple[int, int]:
    """(V, d) of the tiny model's head (101, 128 with the character tokenizer)."""
    try:
        from trainer.models import tiny_model_config

        cfg = tiny_model_config()
        return int(cfg.vocab_size), int(cfg.hidden_size)
    except Exception:  # the trainer package is being written; fall back to its documented shape
        return 101, 128


def _guard(name: str, fn: Callable[[], list[Row]]) -> list[Row]:
    t0 = time.perf_counter()
    print(f"[bench] {name} ...", flush=True)
    try:
        rows = fn()
    except Exception as exc:
        traceback.print_exc()
        rows = [Row(name, "-", status="error", note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")]
    print(f"[bench] {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def _interference(quick: bool) -> list[Row]:
    from bench.interference_bench import compare

    V, d = _tiny_head()
    n_tiny = 32 if quick else 256
    tiny = compare(V, d, n_tiny, n_tiny, factorised_repeats=50, naive_repeats=7, identity_subset=(32, 32))
    rows = tiny.rows("tiny head")
    big_v, big_d, n_big = (4000, 256, 16) if quick else (32_000, 512, 64)
    big = compare(big_v, big_d, n_big, n_big, factorised_repeats=5, naive_repeats=0, identity_subset=(4, 4))
    return rows + big.rows(f"V={big_v // 1000}k head")


def _logprob(quick: bool) -> list[Row]:
    from bench.logprob_bench import compare, gpu_proportional_budget, time_sides

    n, vocab = (64, 32_000) if quick else (512, 151_936)
    prop, full = compare("GPU-proportional", n, "bfloat16", gpu_proportional_budget(n), vocab=vocab)
    default, _ = compare("default budget", n, "bfloat16", 256.0, vocab=vocab, full_result=full)
    prop32, _ = compare("GPU-proportional", n, "float32", gpu_proportional_budget(n), vocab=vocab)
    rows = prop.rows() + default.rows()[:1] + prop32.rows()
    rows.append(time_sides(n, "bfloat16", 256.0, vocab=vocab))
    return rows


def _tiny_model() -> tuple[str, str]:
    from bench.train_bench import default_tiny_model

    explicit = os.environ.get("BENCH_TINY_MODEL")
    return (explicit, f"{explicit}, task rewards") if explicit else default_tiny_model()


def _overhead(quick: bool) -> list[Row]:
    from bench.train_bench import compare_algorithms, overhead_row, trainer_status

    why = trainer_status()
    if why:
        return [Row("ResRL overhead", "tiny preset, CPU", status="not measured", note=why)]
    model, desc = _tiny_model()
    rounds, steps = (1, 2) if quick else (3, 6)
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    times = compare_algorithms(("grpo", "resrl"), rounds=rounds, steps=steps, model=model, cpu_threads=threads)
    return [overhead_row(times, desc, f"tiny preset (8 prompts × 8), {rounds}×{steps} steps alternating, "
                                      "first step of each run dropped")]


def _trl(quick: bool) -> list[Row]:
    from bench.train_bench import trainer_status
    from bench.trl_compare import TRL_VENV, compare_with_trl

    why = trainer_status()
    if why:
        return [Row("Against TRL", "tiny, 4 prompts × 8", status="not measured", note=why)]
    if not (TRL_VENV / "bin" / "python").exists():
        return [Row("Against TRL", "tiny, 4 prompts × 8", status="not measured",
                    note="bench/.venv-trl missing: run `bash bench/trl_compare.sh` once (it installs TRL)")]
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    model = os.environ.get("BENCH_TINY_MODEL") or None
    return compare_with_trl(rounds=1 if quick else 4, steps=4 if quick else 6, threads=threads, model=model).rows()


def run_all(quick: bool = False, skip_trainer: bool = False, skip_trl: bool = False) -> list[Row]:
    """Run every CPU benchmark; return the table rows."""
    rows = _guard("interference", lambda: _interference(quick))
    rows += _guard("log-prob memory", lambda: _logprob(quick))
    if skip_trainer:
        rows.append(Row("ResRL overhead", "tiny preset, CPU", status="not measured", note="skipped (--skip-trainer)"))
    else:
        rows += _guard("ResRL overhead", lambda: _overhead(quick))
    if skip_trl or skip_trainer:
        rows.append(Row("Against TRL", "tiny, 4 prompts × 8", status="not measured", note="skipped"))
    else:
        rows += _guard("against TRL", lambda: _trl(quick))
    return rows


def render_section(rows: list[Row], info: dict, elapsed: float, load_before: str, load_after: str) -> str:
    """The CPU section of RESULTS.md."""
    met = sum(r.status.startswith("met") for r in rows)
    missed = sum(r.status == "missed" for r in rows)
    return "\n".join([
        "## CPU",
        "",
        f"Measured {info['date']} by `make bench` (`python -m bench.run_cpu`) in {elapsed:.0f} s.",
        "",
        f"- Machine: {machine_line(info)}.",
        f"- Load average (1/5/15 min) before: {load_before}; after: {load_after}. Other processes shared the "
        "2 cores when the load exceeds ~2, and timings of small operations then suffer most.",
        f"- Memory: {memory_method()}.",
        "- Times: interference, best of 50 (tiny head) or 5 (V = 32k) calls for ours and of 7 calls (tiny head) "
        "or the single memory-measuring call (V = 32k, ~20 s) for the naive side; log-prob, one call per side in "
        "a fresh process; trainer steps, per-step medians of alternating runs (first step of each run dropped).",
        f"- Targets: {met} met, {missed} missed.",
        "",
        markdown_table(rows),
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, smoke run; does not write RESULTS.md")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--skip-trainer", action="store_true", help="skip the ResRL-overhead and TRL parts")
    ap.add_argument("--skip-trl", action="store_true", help="skip the TRL comparison")
    ap.add_argument("--results", type=Path, default=RESULTS_PATH, help="RESULTS.md to update")
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of every measurement (0 = default)")
    ap.add_argument("--tiny-model", default=None, metavar="DIR",
                    help="policy for the trainer parts (default: the shipped warm start, else a random tiny model)")
    a = ap.parse_args(argv)
    if a.tiny_model:
        os.environ["BENCH_TINY_MODEL"] = a.tiny_model
    if a.threads > 0:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(a.threads)  # inherited by the worker processes
        torch.set_num_threads(a.threads)
    info = machine_info()
    load_before = _load()
    t0 = time.perf_counter()
    rows = run_all(quick=a.quick, skip_trainer=a.skip_trainer, skip_trl=a.skip_trl)
    elapsed = time.perf_counter() - t0
    section = render_section(rows, info, elapsed, load_before, _load())
    print()
    print(section)
    if not (a.quick or a.no_write):
        update_results_section("CPU", section, a.results)
        print(f"[bench] wrote the CPU section of {a.results}")


if __name__ == "__main__":
    main()
