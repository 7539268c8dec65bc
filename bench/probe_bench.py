"""The probe pass at real shapes (issue 13): time and peak RSS per probe on a random Qwen3-shaped model.

One group of G responses of exactly T tokens on a random Qwen3-shaped model (d = 256, 2 layers,
V = 32,000, float32, CPU), each measurement in a fresh subprocess (:func:`bench.common.run_worker`):

- per probe: the group's forward plus that probe with the runner's defaults at an ``ends`` step
  (interference with the whole-model cosine, first_order with the head and whole-model steps for the
  six algorithms, subspace over the eight representations); the shared Gram is paid by the probe;
- ``all``: one forward and the three probes sharing it (what ``resrl probe`` does per group);
- ``all-no-steps``: the same without any real autograd step (``--full-model-steps none``, no head step);
- ``old``: the per-probe path this replaced (the reference copy in ``tests/test_probe_scale.py``) for
  interference and subspace at T = 256, side by side. The issue's table (today's code on this machine
  before the change) is the reference at T = 1024.

    python -m bench.probe_bench [--lengths 256,1024] [--probes all,all-no-steps] [--no-write]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

from bench.common import (
    REPO_ROOT,
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

__all__ = ["main", "ISSUE_TABLE"]

#: The issue's measurements of the code before the change (seconds, peak RSS in MiB) at T = 256 and 1024.
ISSUE_TABLE = {
    "interference": {256: (18.7, 2.5 * 1024), 1024: (157.5, 8.2 * 1024)},
    "subspace": {256: (5.2, 1.6 * 1024), 1024: (102.9, 5.0 * 1024)},
    "first_order": {256: (78.3, 2.0 * 1024), 1024: (324.5, 5.3 * 1024)},
    "diversity": {256: (6.1, 1.3 * 1024), 1024: (22.4, 2.9 * 1024)},
}


def qwen3_config(T: int, P: int = 8, V: int = 32_000, d: int = 256):
    """The config of :func:`qwen3_shaped`'s model (2 layers, untied head) for responses of T tokens."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=V, hidden_size=d, intermediate_size=3 * d, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=d // 4,
                       max_position_embeddings=2 * (P + T), tie_word_embeddings=False)


def qwen3_shaped(G: int, T: int, P: int = 8, V: int = 32_000, d: int = 256):
    """A random Qwen3-shaped model (2 layers, untied head) and one group of G responses of exactly T tokens
    (alternately positive and negative) after a P-token prompt: the shapes of issue 13's table."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from resrl_analysis.probe_sets import ProbeGroup, ProbeSet

    cfg = qwen3_config(T, P, V, d)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    rng = np.random.default_rng(0)
    resp = tuple(tuple(int(t) for t in rng.integers(3, V, T)) for _ in range(G))
    rewards = tuple(float(i % 2 == 0) for i in range(G))
    return model, ProbeSet((ProbeGroup(0, tuple(int(t) for t in rng.integers(3, V, P)), resp, rewards),))


def _old_module():
    spec = importlib.util.spec_from_file_location("_old_probes", REPO_ROOT / "tests" / "test_probe_scale.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def worker(probe: str, G: int, T: int, impl: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from resrl_analysis.probes.capture import forward_probe_set
    from resrl_analysis.probes.first_order import first_order_prediction
    from resrl_analysis.probes.interference import interference_probe
    from resrl_analysis.probes.subspace import subspace_probe

    model, ps = qwen3_shaped(G, T)
    old = _old_module() if impl == "old" else None
    runs = {
        "interference": lambda f: (old.old_interference_probe if old else interference_probe)(
            model, ps, forwards=f, full_model=True),
        "subspace": lambda f: (old.old_subspace_probe if old else subspace_probe)(model, ps, forwards=f),
        "first_order": lambda f: first_order_prediction(model, ps, forwards=f, head_step=True, full_step=True),
    }
    if probe == "all-no-steps":  # the predictions and Grams alone: no autograd step anywhere
        runs = {"interference": lambda f: interference_probe(model, ps, forwards=f, full_model=False),
                "subspace": runs["subspace"],
                "first_order": lambda f: first_order_prediction(model, ps, forwards=f, head_step=False)}
    todo = [probe] if probe in runs else list(runs)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        fwds = forward_probe_set(model, ps)
        t_fwd = time.perf_counter() - t0
        parts = {}
        for name in todo:
            t = time.perf_counter()
            runs[name](fwds)
            parts[name] = time.perf_counter() - t
        total = time.perf_counter() - t0
    emit_result({"probe": probe, "impl": impl, "G": G, "T": T, "seconds": total, "forward_s": t_fwd, "parts": parts,
                 "peak_mb": mem.peak_mb, "exact_memory": mem.exact})


def _measure(probe: str, G: int, T: int, impl: str, threads: int) -> dict:
    return run_worker("bench.probe_bench", ["--worker", probe, str(G), str(T), impl, "--threads", str(threads)],
                      timeout=1800 if T <= 1024 else 7200)  # T = 4096: ~30 min at 1 thread on a loaded core


def plan_mb(probe: str, G: int, T: int, P: int = 8) -> float:
    """The memory plan's estimate (MiB, working memory without the weights, CPU) for a row of this bench."""
    from resrl_analysis.plan import ModelShape, ProbeShape, plan_probes

    shape = ModelShape.from_config(qwen3_config(T, P), "float32")  # the model of :func:`qwen3_shaped`
    probes = ["interference", "subspace", "first_order"] if probe.startswith("all") else [probe]
    plan = plan_probes(shape, ProbeShape(G, T, P, 1), probes, budget=10**13, full_model=probe != "all-no-steps",
                       device="cpu", weights=False)
    return plan.peak / 2**20


def _growth_rows(data: dict, G: int) -> list[Row]:
    """Issue 13's growth targets from 1024 to 4096 tokens (≤ 16× time, ≤ 4× peak RSS), for every probe row
    measured at both lengths in this run."""
    out = []
    for (probe, T, impl), a in data.items():
        b = data.get((probe, 4 * T, impl))
        if impl != "new" or T != 1024 or b is None:
            continue
        t, m = b["seconds"] / a["seconds"], b["peak_mb"] / a["peak_mb"]
        ok = t <= 16 and m <= 4
        why = "" if ok else "; ".join(
            x for x in (f"time {t:.1f}× > 16×" if t > 16 else "", f"memory {m:.2f}× > 4×" if m > 4 else "") if x)
        out.append(Row(f"growth 1024 → 4096: {probe}", f"G={G}, Qwen3-shaped d=256, 2 layers, V=32000, fp32",
                       f"{fmt_seconds(b['seconds'])}, {fmt_bytes_mb(b['peak_mb'])} (T=4096)",
                       f"{fmt_seconds(a['seconds'])}, {fmt_bytes_mb(a['peak_mb'])} (T=1024)",
                       f"{t:.1f}× time, {m:.2f}× RSS", "≤ 16× time, ≤ 4× RSS", "met" if ok else "missed", why))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="256,1024")
    ap.add_argument("--responses", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--old-at", default="256", help="lengths at which the old path runs side by side")
    ap.add_argument("--skip", default="first_order", help="probes measured alone only at the shortest length")
    ap.add_argument("--probes", default="interference,subspace,first_order,all,all-no-steps",
                    help="rows to measure (comma-separated)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--worker", nargs=4, metavar=("PROBE", "G", "T", "IMPL"), default=None)
    args = ap.parse_args(argv)
    if args.worker:
        p, g, t, impl = args.worker
        worker(p, int(g), int(t), impl, args.threads)
        return 0
    G = args.responses
    lengths = [int(x) for x in args.lengths.split(",")]
    old_at = {int(x) for x in args.old_at.split(",") if x}
    rows, data = [], {}
    for T in lengths:
        for probe in args.probes.split(","):
            if probe in args.skip.split(",") and T > min(lengths):
                continue  # measured inside ``all`` at this length (its time is in the row's parts)
            new = _measure(probe, G, T, "new", args.threads)
            data[(probe, T, "new")] = new
            ref, ref_txt, note = None, "-", ""
            if probe in ("interference", "subspace") and T in old_at:
                old = _measure(probe, G, T, "old", args.threads)
                data[(probe, T, "old")] = old
                ref = (old["seconds"], old["peak_mb"])
                ref_txt = f"{fmt_seconds(old['seconds'])}, {fmt_bytes_mb(old['peak_mb'])} (old path, same run)"
            issue = ISSUE_TABLE.get(probe, {}).get(T)
            if probe == "all":
                issue = tuple(sum(ISSUE_TABLE[p][T][i] for p in ("interference", "subspace", "first_order"))
                              if i == 0 else max(ISSUE_TABLE[p][T][1] for p in ("interference", "subspace",
                                                                               "first_order"))
                              for i in (0, 1)) if T in ISSUE_TABLE["subspace"] else None
            if issue:
                note = f"issue table: {fmt_seconds(issue[0])}, {fmt_bytes_mb(issue[1])}"
                ref = ref or issue
            ratio = f"{ref[0] / new['seconds']:.1f}× faster, {new['peak_mb'] / ref[1]:.2f}× RSS" if ref else "-"
            parts = ", ".join(f"{k} {fmt_seconds(v)}" for k, v in new["parts"].items())
            est = plan_mb(probe, G, T)
            parts += f"; plan {fmt_bytes_mb(est)} ({(est - new['peak_mb']) / new['peak_mb']:+.0%} of the peak)"
            rows.append(Row(f"probe pass: {probe}", f"G={G}, T={T}, Qwen3-shaped d=256, 2 layers, V=32000, fp32",
                            f"{fmt_seconds(new['seconds'])}, {fmt_bytes_mb(new['peak_mb'])}", ref_txt, ratio,
                            "all at T=1024: ≥ 5× faster, ≤ 1/3 RSS" if probe == "all" else "report", "info",
                            f"forward {fmt_seconds(new['forward_s'])}; {parts}; {note}".strip("; ")))
            print(markdown_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    rows += _growth_rows(data, G)
    table = markdown_table(rows)
    print(machine_line())
    print(table)
    if not args.no_write:
        try:
            load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        except OSError:  # pragma: no cover
            load = "n/a"
        body = (f"## Probes at real shapes (issue 13)\n\nMeasured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
                f" by `python -m bench.probe_bench --lengths {args.lengths}`; load average after: {load}.\n\n"
                f"- {machine_line()}\n\n{table}\n")
        update_results_section("PROBES", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
