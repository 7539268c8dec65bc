"""The entropy decomposition at real shapes (issue 24): what it adds to a probe pass, and its memory against the plan.

One group of G responses of T tokens on the random Qwen3-shaped model of :mod:`bench.probe_bench` (d = 256,
2 layers, V = 32,000, float32, CPU, 1 thread), each row in a fresh subprocess (time and peak RSS):

- ``gram``: the group's forward and its shared Gram alone (``GroupForward.grams``);
- ``gram+entropy``: the same Gram built with its entropy part in the same pass over the vocabulary;
- ``interference``: the forward and the interference probe (which builds the Gram), no whole-model step;
- ``interference+entropy_dynamics``: the same pass with the entropy_dynamics probe beside it (the prediction for all
  six algorithms, the covariance proxy; no real step, no token rows), the Gram and its entropy part built once.

Target: the entropy decomposition adds at most the time of one Gram build. On a shared machine the rows above, each
in its own process minutes apart, see different loads; the verdict therefore comes from ``alternate``: one process,
one forward, then rounds of (the Gram alone; the Gram with its entropy part and the entropy_dynamics prediction on
it), alternating, medians over the rounds: added = (Gram with entropy part + prediction) − Gram, against one Gram
build. Each probe row's peak is compared with the memory plan.

    python -m bench.entropy_bench [--lengths 1024] [--responses 8] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench.common import (
    PeakRSS,
    Row,
    emit_result,
    fmt_bytes_mb,
    fmt_seconds,
    machine_line,
    markdown_table,
    run_worker,
    update_results_section,
)
from bench.probe_bench import qwen3_config, qwen3_shaped

__all__ = ["main", "ROWS"]

ROWS = ("gram", "gram+entropy", "interference", "interference+entropy_dynamics")


def alternate(G: int, T: int, rounds: int, threads: int) -> None:
    """The verdict's measurement: Gram alone and Gram + entropy part + prediction, alternating in one process."""
    import statistics

    import torch

    torch.set_num_threads(threads)
    from resrl_analysis.probes.capture import forward_probe_set
    from resrl_analysis.probes.entropy_dynamics import entropy_dynamics

    model, ps = qwen3_shaped(G, T)
    fwd = forward_probe_set(model, ps)[0]
    plain, fused, pred = [], [], []
    for _ in range(rounds):
        fwd.release()
        t = time.perf_counter()
        fwd.grams()
        plain.append(time.perf_counter() - t)
        fwd.release()
        t = time.perf_counter()
        fwd.grams(entropy=True)
        fused.append(time.perf_counter() - t)
        t = time.perf_counter()
        entropy_dynamics(model, ps, forwards=[fwd], head_step=False, full_step=False, token_rows="none")
        pred.append(time.perf_counter() - t)
    added = [f + q - g for g, f, q in zip(plain, fused, pred)]
    emit_result({"row": "alternate", "G": G, "T": T, "gram": plain, "gram_entropy": fused, "prediction": pred,
                 "added": added, "gram_median": statistics.median(plain), "added_median": statistics.median(added)})


def worker(row: str, G: int, T: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from resrl_analysis.probes.capture import forward_probe_set
    from resrl_analysis.probes.entropy_dynamics import entropy_dynamics
    from resrl_analysis.probes.interference import interference_probe

    model, ps = qwen3_shaped(G, T)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        fwds = forward_probe_set(model, ps, entropy_gram=row.endswith("entropy") or "entropy_dynamics" in row)
        t_fwd = time.perf_counter() - t0
        parts = {}
        t = time.perf_counter()
        if row.startswith("gram"):
            fwds[0].grams()
            parts["gram"] = time.perf_counter() - t
        else:
            interference_probe(model, ps, forwards=fwds, full_model=False)
            parts["interference"] = time.perf_counter() - t
            if "entropy_dynamics" in row:
                t = time.perf_counter()
                entropy_dynamics(model, ps, forwards=fwds, head_step=False, full_step=False, token_rows="none")
                parts["entropy_dynamics"] = time.perf_counter() - t
        total = time.perf_counter() - t0
    emit_result({"row": row, "G": G, "T": T, "seconds": total, "forward_s": t_fwd, "parts": parts,
                 "peak_mb": mem.peak_mb, "exact_memory": mem.exact})


def _median(x: list[float]) -> float:
    import statistics

    return statistics.median(x)


def plan_mb(row: str, G: int, T: int, P: int = 8) -> float | None:
    """The memory plan's estimate (MiB, working memory without the weights, CPU) of a probe row."""
    from resrl_analysis.plan import ModelShape, ProbeShape, plan_probes

    if row.startswith("gram"):
        return None
    probes = ["interference"] + (["entropy_dynamics"] if "entropy_dynamics" in row else [])
    plan = plan_probes(ModelShape.from_config(qwen3_config(T, P), "float32"), ProbeShape(G, T, P, 1), probes,
                       budget=10**13, full_model=False, device="cpu", weights=False)
    return plan.peak / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024")
    ap.add_argument("--responses", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the verdict's measurement")
    ap.add_argument("--worker", nargs=3, metavar=("ROW", "G", "T"), default=None)
    args = ap.parse_args(argv)
    if args.worker:
        r, g, t = args.worker
        if r == "alternate":
            alternate(int(g), int(t), args.rounds, args.threads)
        else:
            worker(r, int(g), int(t), args.threads)
        return 0
    G = args.responses
    rows, verdicts = [], []
    for T in (int(x) for x in args.lengths.split(",")):
        got = {}
        for row in args.rows.split(","):
            got[row] = run_worker("bench.entropy_bench", ["--worker", row, str(G), str(T), "--threads",
                                                          str(args.threads)], timeout=3600)
            d = got[row]
            est = plan_mb(row, G, T)
            plan = f"; plan {fmt_bytes_mb(est)} ({(est - d['peak_mb']) / d['peak_mb']:+.0%} of the peak)" if est else ""
            parts = ", ".join(f"{k} {fmt_seconds(v)}" for k, v in d["parts"].items())
            rows.append(Row(f"entropy decomposition: {row}", f"G={G}, T={T}, Qwen3-shaped d=256, 2 layers, V=32000, "
                            "fp32", f"{fmt_seconds(d['seconds'])}, {fmt_bytes_mb(d['peak_mb'])}", "-", "-", "report",
                            "info", f"forward {fmt_seconds(d['forward_s'])}; {parts}{plan}"))
            print(markdown_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        a = run_worker("bench.entropy_bench", ["--worker", "alternate", str(G), str(T), "--threads", str(args.threads),
                                               "--rounds", str(args.rounds)], timeout=7200)
        gram, extra = a["gram_median"], a["added_median"]
        ok = extra <= gram
        spread = [x / g for x, g in zip(a["added"], a["gram"])]
        why = "" if ok else (" (the entropy part's product R̃ Qᵀ is a full N×N×V product where the Gram's Q Qᵀ is a "
                             "triangle: twice its multiply-adds)")
        verdicts.append(Row("entropy decomposition beside the Gram", f"G={G}, T={T}, one process, {args.rounds} "
                            "alternating rounds", f"+{fmt_seconds(extra)} (Gram with entropy part + prediction − Gram)",
                            f"{fmt_seconds(gram)} (one Gram build)",
                            f"{extra / gram:.2f}× a Gram build (rounds {min(spread):.2f}–{max(spread):.2f})",
                            "≤ 1× a Gram build", "met" if ok else "missed",
                            f"Gram with entropy part {fmt_seconds(_median(a['gram_entropy']))}, prediction "
                            f"{fmt_seconds(_median(a['prediction']))}{why}"))
    rows += verdicts
    table = markdown_table(rows)
    print(machine_line())
    print(table)
    if not args.no_write:
        try:
            load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        except OSError:  # pragma: no cover
            load = "n/a"
        body = (f"## Entropy dynamics at real shapes (issue 24)\n\nMeasured "
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python -m bench.entropy_bench --lengths "
                f"{args.lengths}`; load average after: {load}.\n\n- {machine_line()}\n\n{table}\n")
        update_results_section("ENTROPY", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
