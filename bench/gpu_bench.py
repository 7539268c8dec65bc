"""GPU benchmarks of issue 6, for one short call on one CUDA GPU (H100/H200); installs nothing.

Run ``bash bench/gpu_bench.sh`` (or ``python -m bench.gpu_bench``) from the repository root. Parts, each
guarded (a failure is a table row, the others still run) and all inside a time budget (``--budget``,
420 s by default; the parts that no longer fit are reported as skipped):

1. **Interference at V = 151,936, d = 1024** (Qwen3-0.6B's head): factorised against ``vmap(grad)``
   per-sample gradients on 64 × 64 tokens (speed given p and from (W, h), peak memory, equality against
   float64), and the factorised path alone on 4096 × 4096 tokens (the naive one would need terabytes).
2. **Log-prob + entropy memory**: chunked (default 256 MiB budget) against full float32 logits on 8192
   tokens, bf16 logits, forward + backward.
3. **Training throughput**: forward + backward of a Qwen3-0.6B-sized random model in bf16 (SDPA) on
   8 × 2048 tokens with the chunked log-prob loss; tokens/s and model-FLOPs utilisation
   MFU = 6·N·tokens / time / peak dense bf16 FLOP/s (N = all parameters, tied head counted once,
   attention's quadratic FLOPs left out; peak 989 TFLOP/s for H100 SXM and H200).
4. **ResRL overhead**: our trainer, ``resrl`` against ``grpo`` step time on that model (char tokenizer,
   8 prompts × 8, 256 new tokens, micro-batch 16 with gradient checkpointing, dynamic-cache rollouts so no
   run pays a compile: the settings of ``bench/gpu_check.sh``), rewards replaced by seeded coin flips so
   that groups mix; and ``resrl_token_weights`` alone on such a batch.
5. **Probe pass at real shapes** (issue 13): one group of 8 responses of T = 1024 and 4096 tokens on
   the Qwen3-shaped random model of the CPU rows (d = 256, 2 layers, V = 32,000, fp32): forward,
   interference (with the whole-model cosine), subspace and first_order (head and whole-model steps),
   time and peak memory, and the memory plan's estimate beside the measured peak; then, with the time
   left, a Qwen3-4B-shaped random model in bf16 at G = 8, T = 4096 (no real steps) against its plan.
6. **Diversity sampler** (issue 13): the diversity probe's batched sampling (all prompts × n through the core
   sampler) against HF ``generate`` once per prompt, alternating rounds: the CPU row's shapes, then a
   Qwen3-0.6B-wide random model (d = 1024, 28 layers, V = 151,936) in bf16, 8 prompts × 16, 128 new tokens.
7. **Probe pass on N GPUs** (issue 22): ``bench/probe_dist_bench.py``'s pass (every probe, 8 groups) as
   ``torchrun --nproc_per_node=N`` (one GPU per rank, replicas) against one process, alternating, N = every
   visible GPU (not measured with fewer than 2); the CPU dry run uses 2 CPU processes and a toy model.
8. **Rollout** (last, with the time left): ``bench/bench_rollout_gpu.py`` (HF ``generate`` with the dynamic
   and static caches, and our static/CUDA-graph path, 256 prompts × 256 new tokens, bf16); goal ours ≥ 3×
   HF dynamic.

Output: a markdown table on stdout; when ``$OUT`` is set, ``$OUT/gpu_bench.json`` and
``$OUT/gpu_section.md`` (the GPU section of RESULTS.md; apply it on another checkout with
``python -m bench.gpu_bench --apply FILE``); on a CUDA run the local ``bench/RESULTS.md`` is updated too.
Without a CUDA GPU it prints why and exits with status 2. ``--device cpu --quick`` runs every part at toy
sizes on CPU (a dry run of the code paths, not numbers).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH_DIR,
    PeakRSS,
    Row,
    fmt_bytes_mb,
    fmt_ratio,
    fmt_seconds,
    machine_info,
    machine_line,
    markdown_table,
    update_results_section,
)

__all__ = ["main", "peak_bf16_flops", "run_all"]

# Dense bf16 peak (no sparsity), TFLOP/s, by device-name substring; the first match wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 125.0),
)
ROLLOUT_TARGET = 3.0


def peak_bf16_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU by name, None when unknown.

    >>> peak_bf16_flops("NVIDIA H100 80GB HBM3") / 1e12, peak_bf16_flops("Tesla T4")
    (989.0, None)
    """
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None


class Deadline:
    """Seconds left of the budget."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left (negative once past)."""
        return self.end - time.monotonic()


# ----------------------------------------------------------------------------- helpers


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], Any], device: Any, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _Peak:
    """Peak device memory added inside the block, MiB (CUDA allocator statistics; RSS on CPU)."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.mb = 0.0
        self._base = 0
        self._rss: PeakRSS | None = None

    def __enter__(self) -> _Peak:
        import torch

        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._rss = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.device.type == "cuda":
            _sync(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        else:
            assert self._rss is not None
            self._rss.__exit__(*exc)
            self.mb = self._rss.peak_mb


def _free(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- 1. interference


def bench_interference(device: Any, quick: bool) -> list[Row]:
    """Factorised vs naive at V = 151,936, d = 1024 (64 × 64 tokens) and factorised alone at 4096 × 4096.

    The naive side keeps the 64 b-side gradients (40 GB in fp32) and makes the a-side ones 16 at a time
    (10 GB): it fits an 80 GB H100.
    """
    from bench.interference_bench import (
        EQUAL_RTOL,
        SPEEDUP_TARGET,
        factorised_given_p,
        factorised_head_inner,
        make_head_problem,
        naive_head_inner,
        reference_head_inner,
        rel_err,
    )

    V, d, nt, chunk, nbig = (2000, 64, 8, 4, 256) if quick else (151_936, 1024, 64, 16, 4096)
    setting = f"V={V}, d={d}, {nt}×{nt} tokens, fp32 (no TF32)"
    pb = make_head_problem(V, d, nt, nt, device=device)
    with _Peak(device) as pf:
        K_f = factorised_head_inner(pb)
    t_wh = _median_time(lambda: factorised_head_inner(pb), device, repeats=10)
    t_p = _median_time(factorised_given_p(pb), device, repeats=20)
    with _Peak(device) as pn:
        K_n = naive_head_inner(pb, chunk=chunk)
    t_n = _median_time(lambda: naive_head_inner(pb, chunk=chunk), device, repeats=3)
    ref = reference_head_inner(pb)
    e_f, e_n, e_fn = rel_err(K_f, ref), rel_err(K_n, ref), rel_err(K_f, K_n)
    K_f = K_n = ref = pb = None  # free before the large problem
    _free(device)
    big = make_head_problem(V, d, nbig, nbig, device=device)
    with _Peak(device) as pbig:
        factorised_head_inner(big)
    t_big = _median_time(lambda: factorised_head_inner(big), device, repeats=5)
    t_big_p = _median_time(factorised_given_p(big), device, repeats=5)
    big = None
    _free(device)
    naive_big_tb = 2 * nbig * V * d * 4 / 1e12
    speed = t_n / t_p
    return [
        Row("Interference speed (GPU)", setting, ours=f"{fmt_seconds(t_p)} (given p)",
            reference=f"{fmt_seconds(t_n)} (vmap(grad))", ratio=f"{fmt_ratio(speed)} faster", target="≥ 100× faster",
            status="met" if speed >= SPEEDUP_TARGET else "missed",
            note=f"pair-product FLOP ratio V·d/(V+d) = {V * d / (V + d):.0f}×. From (W, h), with p = softmax(hWᵀ) "
                 f"in our time too (fp32 matmul without TF32): {fmt_seconds(t_wh)}, {fmt_ratio(t_n / t_wh)} faster"),
        Row("Interference memory (GPU)", setting, ours=fmt_bytes_mb(pf.mb), reference=fmt_bytes_mb(pn.mb),
            ratio=fmt_ratio(pf.mb / max(pn.mb, 1e-9)), target="report", status="info",
            note=f"torch.cuda.max_memory_allocated above the inputs; naive keeps {nt}+{chunk} V×d gradients"),
        Row("Interference equality (GPU)", setting, ours=f"{e_f:.1e} vs fp64", reference=f"{e_n:.1e} vs fp64",
            ratio=f"{e_fn:.1e} ours vs naive", target="rel. err ≤ 1e-5 (fp32)",
            status="met" if e_f <= EQUAL_RTOL else "missed", note="Frobenius relative errors"),
        Row("Interference, all pairs (GPU)", f"V={V}, d={d}, {nbig}×{nbig} tokens, fp32",
            ours=f"{fmt_seconds(t_big_p)} (given p)", reference=f"naive: {naive_big_tb:.1f} TB of gradients",
            target="report", status="info",
            note=f"from (W, h): {fmt_seconds(t_big)}; peak {fmt_bytes_mb(pbig.mb)} (from (W, h))"),
    ]


# ----------------------------------------------------------------------------- 2. log-prob memory


def bench_logprob(device: Any, quick: bool) -> list[Row]:
    """Chunked (default budget) against full float32 logits, fwd+bwd, bf16 logits."""
    import torch

    from bench.logprob_bench import MEMORY_TARGET, make_logits, run_side
    from resrl_analysis.ops import DEFAULT_MEMORY_BUDGET_MB

    N, V = (64, 4000) if quick else (8192, 151_936)
    out: dict[str, tuple[Any, Any, Any, float, float]] = {}
    for side in ("full", "chunked"):
        z, y, a = make_logits(N, V, torch.bfloat16, device=str(device))
        run_side(side, z[:8].detach().requires_grad_(True), y[:8], a[:8], DEFAULT_MEMORY_BUDGET_MB)  # warm-up
        with _Peak(device) as pk:
            logp, ent = run_side(side, z, y, a, DEFAULT_MEMORY_BUDGET_MB)
        grad = z.grad
        t = _median_time(lambda z=z, y=y, a=a, side=side: (setattr(z, "grad", None),
                                                           run_side(side, z, y, a, DEFAULT_MEMORY_BUDGET_MB)),
                         device, repeats=3, warmup=0)
        out[side] = (logp, ent, grad, pk.mb, t)
        z = None
        _free(device)
    f, c = out["full"], out["chunked"]
    ratio = c[3] / f[3] if f[3] >= 1.0 else float("nan")
    e_lp = float((f[0] - c[0]).abs().max())
    e_h = float((f[1] - c[1]).abs().max())
    e_g = float((f[2].double() - c[2].double()).norm() / f[2].double().norm())
    setting = f"N={N}, V={V}, bf16 logits, budget {DEFAULT_MEMORY_BUDGET_MB:g} MiB, fwd+bwd"
    rows = [
        Row("Log-prob+entropy memory (GPU)", setting, ours=fmt_bytes_mb(c[3]),
            reference=f"{fmt_bytes_mb(f[3])} (full fp32)",
            ratio=fmt_ratio(ratio), target="≤ 1/8 (0.125×)", status="met" if ratio <= MEMORY_TARGET else "missed",
            note=f"both incl. the {fmt_bytes_mb(N * V * 2 / 2**20)} logits gradient; time {fmt_seconds(c[4])} vs "
                 f"{fmt_seconds(f[4])}"),
        Row("Log-prob+entropy equality (GPU)", setting, ours=f"max Δlogp {e_lp:.1e}", reference=f"max ΔH {e_h:.1e}",
            ratio=f"grad rel. err {e_g:.1e}", target="equal values",
            status="met" if (e_lp <= 1e-3 and e_h <= 1e-3 and e_g <= 1e-2) else "missed"),
    ]
    out.clear()
    _free(device)
    return rows


# ----------------------------------------------------------------------------- 3. training throughput


def _qwen_config(quick: bool, **overrides: Any) -> Any:
    from trainer.models import qwen3_0p6b_config

    if quick:
        small = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        return qwen3_0p6b_config(**{**small, **overrides})
    return qwen3_0p6b_config(**overrides)


def bench_throughput(device: Any, quick: bool) -> list[Row]:
    """Forward + backward tokens/s and MFU of the Qwen3-0.6B-sized model in bf16."""
    import torch
    from transformers import AutoModelForCausalLM

    from resrl_analysis.ops import token_logprobs_and_entropy

    cfg = _qwen_config(quick)
    dtype = torch.bfloat16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype).to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    B, T = (2, 32) if quick else (8, 2048)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g).to(device)  # (B, T)

    def step() -> None:
        logits = model(input_ids=ids).logits  # (B, T, V) bf16
        logp, _ = token_logprobs_and_entropy(logits[:, :-1], ids[:, 1:], entropy=False)  # (B, T-1)
        (-logp.mean()).backward()
        model.zero_grad(set_to_none=True)

    with _Peak(device) as pk:
        step()
    t = _median_time(step, device, repeats=5, warmup=1)
    tokens = B * T
    tps = tokens / t
    peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    mfu = 6 * n_params * tokens / t / peak if peak else None
    model = None
    _free(device)
    return [Row(
        "Training fwd+bwd throughput (GPU)",
        f"Qwen3-0.6B-sized random init ({n_params / 1e6:.0f}M params), bf16 weights, SDPA, {B}×{T} tokens, "
        "chunked log-prob loss",
        ours=f"{tps:,.0f} tok/s", reference=f"{fmt_seconds(t)}/step",
        ratio=f"MFU {mfu:.1%}" if mfu is not None else "MFU n/a", target="report", status="info",
        note=f"MFU = 6·N·tokens/time/peak ({(peak or 0) / 1e12:.0f} TFLOP/s dense bf16), attention FLOPs excluded; "
             f"peak memory {fmt_bytes_mb(pk.mb)}",
        data={"tokens_per_s": tps, "step_s": t, "mfu": mfu, "params": n_params},
    )]


# ----------------------------------------------------------------------------- 4. ResRL overhead


def bench_resrl_overhead(device: Any, quick: bool) -> list[Row]:
    """``resrl`` vs ``grpo`` trainer steps on the Qwen3-0.6B-sized model; ResRL weights alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from bench.train_bench import WARMSTART_ACCURACY, compare_algorithms, overhead_row, trainer_status
    from resrl_analysis import resrl_token_weights
    from trainer.tokenizer import build_char_tokenizer

    rows: list[Row] = []
    # ResRL weights alone on a rollout-sized batch: 64 rows (8 groups of 8) × 256 response tokens.
    R, T = (16, 16) if quick else (64, 256)
    d = _qwen_config(quick).hidden_size
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(R, T, d, generator=g).to(device)  # (R, T, d)
    mask = torch.ones(R, T, dtype=torch.bool, device=device)
    is_pos = (torch.rand(R, generator=g) < WARMSTART_ACCURACY).to(device)
    is_pos[::8] = True
    is_pos[1::8] = False  # every group mixed
    groups = torch.arange(R, device=device) // 8
    t_w = _median_time(lambda: resrl_token_weights(hidden, mask, is_pos, groups), device, repeats=5)
    rows.append(Row("ResRL weights alone (GPU)", f"{R} rows (groups of 8) × {T} tokens, d={d}, fp32, rank 64",
                    ours=fmt_seconds(t_w), target="report", status="info"))
    hidden = None
    _free(device)

    why = trainer_status()
    if why:
        rows.append(Row("ResRL overhead (GPU)", "Qwen3-0.6B-sized", status="not measured", note=why))
        return rows
    tok = build_char_tokenizer()
    cfg = _qwen_config(quick, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    with tempfile.TemporaryDirectory(prefix="gpu_bench_model_") as tmp:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        del model
        new_tokens = 16 if quick else 256
        times = compare_algorithms(
            ("grpo", "resrl"), rounds=1, steps=3, warmup_steps=1, model=tmp, coin_flip=WARMSTART_ACCURACY,
            device=device.type, prompts_per_step=8, n=8, mini_batch_size=8, micro_batch_size=16,
            gradient_checkpointing=True, max_response_length=new_tokens, rollout_backend="dynamic",
            cpu_threads=0, lr=1e-6,
        )
    _free(device)
    rows.append(overhead_row(
        times, f"coin-flip rewards p={WARMSTART_ACCURACY}",
        f"Qwen3-0.6B-sized random init, char tokenizer, 8 prompts × 8, {new_tokens} new tokens, micro-batch 16, "
        "gradient checkpointing, dynamic-cache rollout (as bench/gpu_check.sh), 2 timed steps each",
    ))
    rows[-1].benchmark = "ResRL overhead (GPU)"
    return rows


# ----------------------------------------------------------------------------- 5. rollout


# ----------------------------------------------------------------------------- 5. probes at real shapes


def _probe_group(G: int, T: int, V: int, P: int = 8) -> Any:
    import numpy as np

    from resrl_analysis.probe_sets import ProbeGroup, ProbeSet

    rng = np.random.default_rng(0)
    resp = tuple(tuple(int(t) for t in rng.integers(3, V, T)) for _ in range(G))
    return ProbeSet((ProbeGroup(0, tuple(int(t) for t in rng.integers(3, V, P)), resp,
                                tuple(float(i % 2 == 0) for i in range(G))),))


def bench_probes(device: Any, quick: bool, deadline: Any = None) -> list[Row]:
    """The probe pass on one group at T = 1024 and 4096 (Qwen3-shaped d = 256, V = 32,000), and a
    Qwen3-4B-shaped bf16 model at T = 4096 with the time left; each against the memory plan."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from resrl_analysis.plan import ModelShape, ProbeShape, plan_probes
    from resrl_analysis.probes.capture import forward_probe_set
    from resrl_analysis.probes.first_order import first_order_prediction
    from resrl_analysis.probes.interference import interference_probe
    from resrl_analysis.probes.subspace import subspace_probe

    rows = []
    G, P = (4, 8) if quick else (8, 8)
    small = dict(vocab_size=1000 if quick else 32_000, hidden_size=64 if quick else 256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
    configs = [("Qwen3-shaped d=256, V=32000, fp32", small, torch.float32, T, True) for T in
               ((32, 64) if quick else (1024, 4096))]
    if not quick:
        big = dict(vocab_size=151_936, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                   num_key_value_heads=8, intermediate_size=9728, tie_word_embeddings=True)
        configs.append(("Qwen3-4B-shaped, bf16, no real steps", big, torch.bfloat16, 4096, False))
    for label, kw, dtype, T, steps in configs:
        if deadline is not None and deadline.left() < (60 if "4B" in label else 30):
            rows.append(Row(f"Probe pass (GPU): {label}", f"G={G}, T={T}", status="not measured",
                            note="skipped: out of time budget"))
            continue
        kw = {"intermediate_size": 3 * kw["hidden_size"], "head_dim": kw["hidden_size"] // kw["num_attention_heads"],
              **kw, "max_position_embeddings": 2 * (P + T)}
        cfg = Qwen3Config(**kw)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
        ps = _probe_group(G, T, cfg.vocab_size, P)
        times: dict[str, float] = {}
        with _Peak(device) as peak:
            t0 = time.perf_counter()
            fwds = forward_probe_set(model, ps)
            _sync(device)
            times["forward"] = time.perf_counter() - t0
            for name, fn, opts in (
                ("interference", interference_probe, {"full_model": steps}),
                ("subspace", subspace_probe, {}),
                ("first_order", first_order_prediction, {"head_step": steps, "full_step": steps}),
            ):
                t = time.perf_counter()
                fn(model, ps, forwards=fwds, **opts)
                _sync(device)
                times[name] = time.perf_counter() - t
            total = time.perf_counter() - t0
        shape = ModelShape.from_config(cfg.to_dict(), "bfloat16" if dtype == torch.bfloat16 else "float32")
        plan = plan_probes(shape, ProbeShape(G, T, P, 1), ["interference", "subspace", "first_order"],
                           budget=10**13, full_model=steps, device=str(device), weights=False)
        est = plan.peak / 2**20
        rows.append(Row(f"Probe pass (GPU): {label}", f"G={G}, T={T}, one group", f"{fmt_seconds(total)}, "
                        f"{fmt_bytes_mb(peak.mb)} peak", f"plan {fmt_bytes_mb(est)}",
                        fmt_ratio(est / peak.mb) if peak.mb else "-", "plan within 25% of the peak",
                        "met" if peak.mb and abs(est - peak.mb) <= 0.25 * peak.mb else "missed",
                        ", ".join(f"{k} {fmt_seconds(v)}" for k, v in times.items()),
                        data={"seconds": times, "peak_mb": peak.mb, "plan_mb": est}))
        del model, fwds
        _free(device)
    return rows


def bench_diversity(device: Any, quick: bool) -> list[Row]:
    """The diversity probe's batched sampling against HF ``generate`` once per prompt (issue 13), on the GPU:
    :func:`bench.diversity_bench.run` (same model, prompts, n and tokens; alternating rounds)."""
    import torch

    from bench.diversity_bench import row, run

    threads = torch.get_num_threads()  # run() sets the thread count: leave this process's as it is
    if quick:
        res = run(prompts=2, n=2, max_new_tokens=8, rounds=2, vocab=500, hidden=64, layers=2, threads=threads,
                  device=str(device))
    else:  # the CPU row's shapes, and a Qwen3-0.6B-like width in bf16
        res = run(prompts=8, n=8, max_new_tokens=128, rounds=4, threads=threads, device=str(device))
    rows = [row(res)]
    if not quick:
        res = run(prompts=8, n=16, max_new_tokens=128, rounds=2, vocab=151_936, hidden=1024, layers=28,
                  threads=threads, device=str(device), dtype=torch.bfloat16)
        rows.append(row(res))
    for r in rows:
        r.benchmark = "Diversity sampler (GPU)"
    return rows


def bench_rollout(timeout: float) -> list[Row]:
    """Run ``bench/bench_rollout_gpu.py`` (another engineer's) and read its JSON."""
    script = BENCH_DIR / "bench_rollout_gpu.py"
    setting = "Qwen3-0.6B-sized, 256 prompts × 256 new tokens, bf16"
    if not script.exists():
        return [Row("Rollout tokens/s (GPU)", setting, status="not measured", note=f"{script.name} missing")]
    with tempfile.TemporaryDirectory(prefix="gpu_bench_rollout_") as tmp:
        out = Path(tmp) / "rollout.json"
        try:
            proc = subprocess.run([sys.executable, str(script), "--json", str(out)], capture_output=True, text=True,
                                  timeout=timeout, cwd=BENCH_DIR.parent)
        except subprocess.TimeoutExpired:
            return [Row("Rollout tokens/s (GPU)", setting, status="not measured",
                        note=f"bench_rollout_gpu.py did not finish within the {timeout:.0f} s left")]
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n", flush=True)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return [Row("Rollout tokens/s (GPU)", setting, status="error",
                        note=f"exit {proc.returncode}: {tail[0][:200]}")]
        data = json.loads(out.read_text())
    res = {r["variant"]: r for r in data.get("results", [])}
    hf = res.get("hf-dynamic", {}).get("tokens_per_s")
    ours = res.get("ours-static", {}).get("tokens_per_s")
    static = res.get("hf-static", {}).get("tokens_per_s")
    if hf is None or ours is None:
        errs = "; ".join(f"{k}: {v.get('error', '?')[:80]}" for k, v in res.items() if "error" in v)
        return [Row("Rollout tokens/s (GPU)", setting, status="error", note=errs or "variants missing")]
    ratio = ours / hf
    first = res["ours-static"].get("first_call_s")
    return [Row(
        "Rollout tokens/s (GPU)", setting, ours=f"{ours:,.0f} tok/s ({res['ours-static'].get('backend_used', '?')})",
        reference=f"{hf:,.0f} tok/s (HF generate, dynamic cache, warm)", ratio=fmt_ratio(ratio), target="≥ 3×",
        status="met" if ratio >= ROLLOUT_TARGET else "missed",
        note=(f"HF static cache {static:,.0f} tok/s; " if static else "")
        + (f"our first call (compile + capture) {first:.0f} s" if first is not None else ""),
        data={"results": data.get("results", [])},
    )]


# ----------------------------------------------------------------------------- driver


def bench_probe_ranks(device: Any, quick: bool) -> list[Row]:
    """The probe pass on every visible GPU (torchrun, one rank per GPU) against one process (issue 22)."""
    import torch

    from bench.probe_dist_bench import measure, row

    n = torch.cuda.device_count() if device.type == "cuda" else 2
    if n < 2:
        return [Row("Probe pass on N GPUs", "-", status="not measured",
                    note=f"needs at least 2 GPUs, {n} visible (run on a multi-GPU machine)")]
    m = measure(n, rounds=1 if quick else 2, device="cuda" if device.type == "cuda" else "cpu", quick=quick)
    where = f"{n} GPUs (one rank each, replicas)" if device.type == "cuda" else f"{n} CPU processes (dry run)"
    return [row(m, f"every probe, 8 groups, {where}, {'toy' if quick else 'd=256 4-layer'} model",
                target=None if quick else 0.85 * n)]


def _guard(name: str, fn: Callable[[], list[Row]], deadline: Deadline, need_s: float) -> list[Row]:
    import torch

    left = deadline.left()
    if left < need_s:
        return [Row(name, "-", status="not measured",
                    note=f"skipped: {left:.0f} s of the budget left, needs ~{need_s:.0f} s")]
    print(f"[gpu_bench] {name} ({left:.0f} s left) ...", flush=True)
    t0 = time.perf_counter()
    try:
        rows = fn()
    except Exception as exc:  # noqa: BLE001 - one failed part must not hide the others
        traceback.print_exc()
        rows = [Row(name, "-", status="error", note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")]
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"[gpu_bench] {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def run_all(device: Any, budget: float, quick: bool = False, skip_rollout: bool = False) -> list[Row]:
    """Every part in order, within ``budget`` seconds."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons at full fp32 precision
    torch.backends.cudnn.allow_tf32 = False
    dl = Deadline(budget)
    rows = _guard("Interference (GPU)", lambda: bench_interference(device, quick), dl, 20)
    rows += _guard("Log-prob memory (GPU)", lambda: bench_logprob(device, quick), dl, 20)
    rows += _guard("Training throughput (GPU)", lambda: bench_throughput(device, quick), dl, 40)
    # ~70 s expected; run it only if ~180 s then remain for the rollout part (the headline GPU target)
    rows += _guard("ResRL overhead (GPU)", lambda: bench_resrl_overhead(device, quick), dl, 60 if quick else 250)
    rows += _guard("Probe pass (GPU)", lambda: bench_probes(device, quick, dl), dl, 30 if quick else 120)
    rows += _guard("Diversity sampler (GPU)", lambda: bench_diversity(device, quick), dl, 20 if quick else 60)
    rows += _guard("Probe pass on N GPUs", lambda: bench_probe_ranks(device, quick), dl, 60 if quick else 120)
    if skip_rollout or device.type != "cuda":
        rows.append(Row("Rollout tokens/s (GPU)", "-", status="not measured",
                        note="skipped (no CUDA or --skip-rollout)"))
    else:
        rows += _guard("Rollout tokens/s (GPU)", lambda: bench_rollout(max(30.0, dl.left() - 10)), dl, 90)
    return rows


def render_section(rows: list[Row], info: dict[str, Any], elapsed: float) -> str:
    """The GPU section of RESULTS.md."""
    met = sum(r.status.startswith("met") for r in rows)
    missed = sum(r.status == "missed" for r in rows)
    return "\n".join([
        "## GPU", "",
        f"Measured {info['date']} by `bash bench/gpu_bench.sh` (`python -m bench.gpu_bench`) in {elapsed:.0f} s.", "",
        f"- Machine: {machine_line(info)}.",
        "- Memory: `torch.cuda.max_memory_allocated` above what existed before the measured call.",
        f"- Targets: {met} met, {missed} missed.", "",
        markdown_table(rows), "",
    ])


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (dry run with --quick)")
    ap.add_argument("--quick", action="store_true", help="toy sizes: checks the code paths, not numbers")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for all parts together")
    ap.add_argument("--skip-rollout", action="store_true")
    ap.add_argument("--apply", type=Path, default=None, metavar="FILE",
                    help="write FILE (a gpu_section.md from an earlier run) into bench/RESULTS.md and exit")
    a = ap.parse_args(argv)
    if a.apply is not None:
        update_results_section("GPU", a.apply.read_text())
        print(f"wrote the GPU section of bench/RESULTS.md from {a.apply}")
        return 0
    import torch

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU available (torch.cuda.is_available() is False): nothing measured. "
              "Run it on a CUDA machine, or `--device cpu --quick` for a dry run of the code.", file=sys.stderr)
        return 2
    info = machine_info()
    t0 = time.perf_counter()
    rows = run_all(device, a.budget, quick=a.quick, skip_rollout=a.skip_rollout)
    section = render_section(rows, info, time.perf_counter() - t0)
    print()
    print(section, flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_section.md").write_text(section)
        (Path(out) / "gpu_bench.json").write_text(json.dumps(
            {"machine": info, "rows": [r.to_dict() for r in rows]}, indent=1, default=str))
    if device.type == "cuda" and not a.quick:
        update_results_section("GPU", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
