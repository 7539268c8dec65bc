"""The diversity probe's sampling against HF ``generate`` once per prompt (issue 13): same model, prompts, n, tokens.

Ours: :func:`resrl_analysis.sampling.sample_prompts`, what the diversity probe calls: all
prompts × n rows through the core sampler (:func:`resrl_analysis.sampling.sample`) in batches of at most
``max_batch_rows`` rows. Reference: ``model.generate`` called once per prompt with ``num_return_sequences
= n`` (what the probe did before), pure sampling (temperature 1, no top-k, no top-p), the same
``max_new_tokens`` and EOS. One process, a random Qwen3-shaped model (default d = 256, 2 layers, V = 32,000,
float32, CPU), prompts of 8-32 tokens; both sides warmed up once, then ``rounds`` rounds that alternate the
order (ours, HF | HF, ours | …). Reported: the median of the per-round ratios (HF time / ours) and their
spread (min-max), with the tokens each side generated.

    python -m bench.diversity_bench [--prompts 8] [--n 8] [--max-new-tokens 128] [--rounds 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from bench.common import Row, fmt_seconds, machine_line, markdown_table

__all__ = ["main", "run"]

TARGET = 1.5


def _model(vocab: int, hidden: int, layers: int, seed: int = 0, device: str = "cpu", dtype: Any = None):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                      max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0, eos_token_id=2)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype or torch.float32).to(device).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    return model


def _prompts(n_prompts: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, vocab, int(rng.integers(8, 33)))] for _ in range(n_prompts)]


def ours(model, prompts: list[list[int]], n: int, max_new_tokens: int, seed: int = 0) -> list[list[list[int]]]:
    """The diversity probe's sampling: every prompt × n in batched calls of the core sampler."""
    from resrl_analysis.sampling import sample_prompts

    return sample_prompts(model, prompts, n, [seed + i for i in range(len(prompts))], max_new_tokens=max_new_tokens,
                          eos_token_id=2, pad_token_id=0)


def hf_per_prompt(model, prompts: list[list[int]], n: int, max_new_tokens: int,
                  seed: int = 0) -> list[list[list[int]]]:
    """HF ``generate`` once per prompt (``num_return_sequences = n``), pure sampling, cut after EOS."""
    import torch

    out = []
    for i, p in enumerate(prompts):
        torch.manual_seed(seed + i)
        ids = torch.tensor([p], device=model.device)
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=max_new_tokens, num_return_sequences=n, eos_token_id=2,
                                 pad_token_id=0)
        rows = []
        for r in gen[:, len(p) :].tolist():
            rows.append(r[: r.index(2) + 1] if 2 in r else r)
        out.append(rows)
    return out


def run(*, prompts: int = 8, n: int = 8, max_new_tokens: int = 128, rounds: int = 4, vocab: int = 32_000,
        hidden: int = 256, layers: int = 2, threads: int = 1, device: str = "cpu", dtype: Any = None) -> dict[str, Any]:
    """Time both sides alternately in this process; returns the per-round times, ratios and token counts
    (on a CUDA ``device`` each side's time ends with a synchronisation)."""
    import torch

    torch.set_num_threads(threads)
    model = _model(vocab, hidden, layers, device=device, dtype=dtype)

    def sync() -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    ps = _prompts(prompts, vocab)
    sides = {"ours": ours, "hf": hf_per_prompt}
    for f in sides.values():  # warm-up: first-call costs (allocator, kernels, generation config) on neither side
        f(model, ps[:1], min(n, 2), min(max_new_tokens, 4))
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    tokens: dict[str, list[int]] = {"ours": [], "hf": []}
    for r in range(rounds):
        for name in (("ours", "hf") if r % 2 == 0 else ("hf", "ours")):
            t0 = time.perf_counter()
            res = sides[name](model, ps, n, max_new_tokens, seed=1000 * r)
            sync()
            times[name].append(time.perf_counter() - t0)
            assert len(res) == len(ps) and all(len(rows) == n for rows in res)
            tokens[name].append(sum(len(x) for rows in res for x in rows))
    ratios = [h / o for h, o in zip(times["hf"], times["ours"])]
    return {"times": times, "tokens": tokens, "ratios": ratios, "ratio": statistics.median(ratios),
            "prompts": prompts, "n": n, "max_new_tokens": max_new_tokens, "vocab": vocab, "hidden": hidden,
            "layers": layers, "threads": threads, "rounds": rounds, "device": str(device),
            "dtype": str(dtype or torch.float32).replace("torch.", "")}


def row(res: dict[str, Any]) -> Row:
    """The RESULTS.md row of a :func:`run` result."""
    med = {k: statistics.median(v) for k, v in res["times"].items()}
    tok = {k: statistics.mean(v) for k, v in res["tokens"].items()}
    spread = f"{min(res['ratios']):.2f}–{max(res['ratios']):.2f}"
    if res.get("device", "cpu") == "cpu":
        where = f"fp32 CPU, {res['threads']} thread(s)"
    else:
        where = f"{res.get('dtype', 'float32')} {res['device']}"
    setting = (f"{res['prompts']} prompts × n={res['n']}, ≤ {res['max_new_tokens']} new tokens, random Qwen3-shaped "
               f"d={res['hidden']}, {res['layers']} layers, V={res['vocab']}, {where}")
    return Row(
        "Diversity sampler", setting,
        f"{fmt_seconds(med['ours'])} (all prompts batched)", f"{fmt_seconds(med['hf'])} (generate per prompt)",
        f"{res['ratio']:.2f}× faster (rounds {spread})", f"≥ {TARGET}× faster",
        "met" if res["ratio"] >= TARGET else "missed",
        f"median of {res['rounds']} alternating rounds; tokens generated per side {tok['ours']:.0f} vs {tok['hf']:.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32_000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    res = run(prompts=args.prompts, n=args.n, max_new_tokens=args.max_new_tokens, rounds=args.rounds,
              vocab=args.vocab, hidden=args.hidden, layers=args.layers, threads=args.threads)
    print("per-round s: ours " + ", ".join(f"{t:.2f}" for t in res["times"]["ours"]) + "; hf "
          + ", ".join(f"{t:.2f}" for t in res["times"]["hf"]), file=sys.stderr)
    print(machine_line())
    print(markdown_table([row(res)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
