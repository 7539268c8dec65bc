"""Chunked log-probs and entropy against full float32 logits: values, memory, time (forward + backward).

Both sides take the same (N, V) logits (bf16 or fp32, ``requires_grad``) and labels, and back-propagate
``loss = Σ a·log p[y] + 0.01·Σ H`` (a: random advantages):

- **chunked** (ours): :func:`resrl_analysis.ops.token_logprobs_and_entropy` with a memory budget; its
  backward recomputes the softmax chunk by chunk.
- **full**: ``logq = log_softmax(logits.float())``, ``logq.gather(y)``, ``−(logq.exp()·logq).sum()``:
  what one writes without care, with float32 (N, V) tensors saved for the backward.

Peak memory is measured in a fresh process per side (see :mod:`bench.common`) and counts everything the
forward and backward add on top of the input logits, *including* the gradient with respect to the logits
(N·V in the logits' dtype, the same on both sides). The chunked side's peak is that gradient plus a few
(chunk, V) float32 temporaries, so its ratio to the full side's peak falls with N until the gradient
dominates; the table also reports the working memory without that gradient.

On CPU the batch is reduced (N = 512 tokens instead of ~16k per GPU micro-batch). With the default budget
(256 MiB → 147 tokens per chunk at V = 151,936) a chunk is then 29% of the batch, not the <1% it is on GPU;
the "GPU-proportional" configuration scales the budget by N / 16,384 so the chunk/batch ratio matches a
16k-token GPU micro-batch.

Run one side (what :func:`compare` does)::

    python -m bench.logprob_bench --side chunked --tokens 512 --dtype bfloat16 --budget-mb 8 --out r.pt
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from bench.common import (
    PeakRSS,
    Row,
    emit_result,
    fmt_bytes_mb,
    fmt_ratio,
    fmt_seconds,
    median_time,
    run_worker,
)
from resrl_analysis.ops import DEFAULT_MEMORY_BUDGET_MB, chunk_tokens_for_budget, token_logprobs_and_entropy

__all__ = [
    "ENTROPY_COEF",
    "LogprobResult",
    "compare",
    "full_logprobs_and_entropy",
    "make_logits",
    "run_side",
]

QWEN_VOCAB = 151_936
ENTROPY_COEF = 0.01
MEMORY_TARGET = 1 / 8
GPU_TOKENS = 16_384
"""Tokens of the GPU micro-batch the CPU configuration stands in for (for the proportional budget)."""


def make_logits(tokens: int, vocab: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu"
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Deterministic logits (N, V) with std 2 (leaf, ``requires_grad``), labels (N,), advantages (N,).

    >>> z, y, a = make_logits(4, 10, torch.bfloat16)
    >>> z.dtype, z.requires_grad, tuple(y.shape)
    (torch.bfloat16, True, (4,))
    """
    g = torch.Generator(device=device).manual_seed(seed)
    z = (torch.randn(tokens, vocab, generator=g, device=device) * 2.0).to(dtype).requires_grad_(True)
    y = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    a = torch.randn(tokens, generator=g, device=device)
    return z, y, a


def full_logprobs_and_entropy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The reference: full float32 log-softmax over (N, V), then gather and entropy."""
    logq = torch.log_softmax(logits.float(), dim=-1)  # (N, V) float32
    logp = logq.gather(-1, labels[:, None]).squeeze(-1)  # (N,)
    ent = -(logq.exp() * logq).sum(-1)  # (N,)
    return logp, ent


def run_side(side: str, logits: Tensor, labels: Tensor, adv: Tensor, budget_mb: float) -> tuple[Tensor, Tensor]:
    """Forward + backward of one side; returns (logp, entropy) detached; ``logits.grad`` is set."""
    if side == "full":
        logp, ent = full_logprobs_and_entropy(logits, labels)
    elif side == "chunked":
        logp, ent = token_logprobs_and_entropy(logits, labels, memory_budget_mb=budget_mb)
        assert ent is not None
    else:
        raise ValueError(f"unknown side {side!r}")
    loss = (adv * logp).sum() + ENTROPY_COEF * ent.sum()
    loss.backward()
    return logp.detach(), ent.detach()


@dataclass
class LogprobResult:
    """One configuration: peaks (MiB above the input), times (s), agreement of values and gradients."""

    label: str
    tokens: int
    vocab: int
    dtype: str
    budget_mb: float
    chunk_tokens: int
    full_peak_mb: float
    chunked_peak_mb: float
    grad_mb: float
    full_s: float
    chunked_s: float
    err_logp: float
    """max |Δ log p| (nats)."""
    err_entropy: float
    """max |Δ H| (nats)."""
    err_grad: float
    """Frobenius relative error of the logits' gradients."""

    @property
    def memory_ratio(self) -> float:
        """Chunked peak / full peak (gradient w.r.t. the logits included on both sides)."""
        return self.chunked_peak_mb / max(self.full_peak_mb, 1e-9)

    @property
    def working_ratio(self) -> float:
        """The same without the (identical) gradient buffer."""
        return max(self.chunked_peak_mb - self.grad_mb, 0.0) / max(self.full_peak_mb - self.grad_mb, 1e-9)

    @property
    def equal(self) -> bool:
        """Values to 1e-4 nats; gradients to 1e-5 (fp32) or 1e-2 (bf16, rounding of the stored gradient)."""
        gtol = 1e-5 if self.dtype == "float32" else 1e-2
        return self.err_logp <= 1e-4 and self.err_entropy <= 1e-4 and self.err_grad <= gtol

    def rows(self) -> list[Row]:
        """Table rows: memory (with the target) and equality."""
        setting = (f"{self.label}: N={self.tokens}, V={self.vocab}, {self.dtype} logits, budget "
                   f"{self.budget_mb:g} MiB ({self.chunk_tokens} tok/chunk), fwd+bwd")
        ok = self.memory_ratio <= MEMORY_TARGET
        status = "met" if ok else "missed"
        if self.dtype == "float32" and not ok:
            status = "info"
            note = ("float32 logits: their gradient alone (N·V·4 bytes, the same on both sides) is ~1/5 of the full "
                    "path's peak, so the target is judged on bf16 logits (what a model's head emits in training)")
        elif ok:
            note = ""
        elif self.chunk_tokens * 8 > self.tokens:
            note = (f"a chunk is {self.chunk_tokens / self.tokens:.0%} of this reduced CPU batch; "
                    "the ratio falls as N grows")
        else:
            note = "the logits' gradient (same on both sides) dominates the chunked peak"
        return [
            Row(
                "Log-prob+entropy memory", setting,
                ours=fmt_bytes_mb(self.chunked_peak_mb), reference=f"{fmt_bytes_mb(self.full_peak_mb)} (full fp32)",
                ratio=f"{fmt_ratio(self.memory_ratio)} (working {fmt_ratio(self.working_ratio)})",
                target="≤ 1/8 (0.125×)", status=status,
                note=note + ("; " if note else "") + f"both incl. the {fmt_bytes_mb(self.grad_mb)} logits gradient",
            ),
            Row(
                "Log-prob+entropy equality", setting,
                ours=f"max Δlogp {self.err_logp:.1e}", reference=f"max ΔH {self.err_entropy:.1e}",
                ratio=f"grad rel. err {self.err_grad:.1e}", target="equal values",
                status="met" if self.equal else "missed",
            ),
        ]


def compare(
    label: str, tokens: int, dtype: str, budget_mb: float, *, vocab: int = QWEN_VOCAB, seed: int = 0,
    full_result: dict | None = None, timeout: float = 300.0,
) -> tuple[LogprobResult, dict]:
    """Run both sides in worker processes (or reuse ``full_result`` from an earlier call); compare them.

    Returns the result and the full side's worker result (to reuse for another budget).
    """
    with tempfile.TemporaryDirectory(prefix="bench_logprob_") as tmp:
        res = {}
        for side in ("full", "chunked"):
            if side == "full" and full_result is not None:
                res[side] = full_result
                continue
            out = Path(tmp) / f"{side}.pt"
            res[side] = run_worker(
                "bench.logprob_bench",
                ["--side", side, "--tokens", str(tokens), "--vocab", str(vocab), "--dtype", dtype,
                 "--budget-mb", str(budget_mb), "--seed", str(seed), "--out", str(out)],
                timeout=timeout,
            )
            res[side]["tensors"] = torch.load(out)
    f, c = res["full"]["tensors"], res["chunked"]["tensors"]
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    result = LogprobResult(
        label=label, tokens=tokens, vocab=vocab, dtype=dtype, budget_mb=budget_mb,
        chunk_tokens=chunk_tokens_for_budget(vocab, budget_mb),
        full_peak_mb=res["full"]["peak_mb"], chunked_peak_mb=res["chunked"]["peak_mb"],
        grad_mb=tokens * vocab * itemsize / 2**20,
        full_s=res["full"]["time_s"], chunked_s=res["chunked"]["time_s"],
        err_logp=float((f["logp"] - c["logp"]).abs().max()),
        err_entropy=float((f["entropy"] - c["entropy"]).abs().max()),
        err_grad=float((f["grad"].double() - c["grad"].double()).norm() / f["grad"].double().norm()),
    )
    return result, res["full"]


def time_sides(tokens: int, dtype: str, budget_mb: float, *, vocab: int = QWEN_VOCAB, repeats: int = 1,
               timeout: float = 300.0) -> Row:
    """Forward+backward time of both sides, each in a fresh process with the default allocator → a table row."""
    t = {}
    for side in ("full", "chunked"):
        t[side] = run_worker(
            "bench.logprob_bench",
            ["--side", side, "--tokens", str(tokens), "--vocab", str(vocab), "--dtype", dtype,
             "--budget-mb", str(budget_mb), "--measure", "time", "--repeats", str(repeats)],
            timeout=timeout, malloc_env=False,
        )["time_s"]
    ratio = t["chunked"] / t["full"]
    return Row(
        "Log-prob+entropy time", f"N={tokens}, V={vocab}, {dtype} logits, budget {budget_mb:g} MiB, fwd+bwd",
        ours=fmt_seconds(t["chunked"]), reference=fmt_seconds(t["full"]), ratio=f"{fmt_ratio(ratio)} the time",
        target="report", status="info",
        note="" if ratio <= 1.0 else "chunked makes more passes over (chunk, V) float32 than the fused full path",
        data={"full_s": t["full"], "chunked_s": t["chunked"]},
    )


def gpu_proportional_budget(tokens: int) -> float:
    """The default budget scaled by ``tokens / GPU_TOKENS`` (same chunk/batch ratio as a 16k-token batch).

    >>> gpu_proportional_budget(512)
    8.0
    """
    return DEFAULT_MEMORY_BUDGET_MB * tokens / GPU_TOKENS


def _worker(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=("full", "chunked"), required=True)
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--vocab", type=int, default=QWEN_VOCAB)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--budget-mb", type=float, default=DEFAULT_MEMORY_BUDGET_MB)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--measure", choices=("memory", "time"), default="memory",
                    help="memory: one call under PeakRSS, tensors saved to --out; time: median of --repeats calls")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    zw, yw, aw = make_logits(8, a.vocab, dtype, seed=a.seed + 1)
    run_side(a.side, zw, yw, aw, a.budget_mb)  # warm-up on 8 tokens
    del zw, yw, aw
    z, y, adv = make_logits(a.tokens, a.vocab, dtype, seed=a.seed)
    if a.measure == "time":
        def once() -> None:
            z.grad = None
            run_side(a.side, z, y, adv, a.budget_mb)

        med, times = median_time(once, repeats=a.repeats, warmup=0)
        emit_result({"time_s": med, "times": times})
        return
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        logp, ent = run_side(a.side, z, y, adv, a.budget_mb)
        elapsed = time.perf_counter() - t0
    assert z.grad is not None
    if a.out is not None:
        torch.save({"logp": logp, "entropy": ent, "grad": z.grad}, a.out)
    emit_result({"time_s": elapsed, "peak_mb": mem.peak_mb, "exact": mem.exact})


if __name__ == "__main__":
    _worker()
