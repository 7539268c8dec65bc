"""Rollout throughput on a CUDA GPU: HF ``generate`` (dynamic cache), HF ``generate`` (static cache) and our
``static`` backend (prefill + CUDA-graph decode step, sampling outside the graph).

Default shape: a Qwen3-0.6B-sized model with random weights (hidden 1024, 28 layers, 16 heads, 8 KV heads,
head_dim 128, intermediate 3072, vocab 151936) in bf16 with SDPA, 256 prompts x 256 new tokens. EOS is
disabled (``eos_token_id=None`` everywhere), so every row generates exactly ``--new-tokens`` tokens and all
variants do the same work. Tokens/s = prompts x new tokens / warm wall time (median of ``--repeats``).
For our backend the first call (compile + CUDA-graph capture) is timed separately.

Usage (repository root, CUDA machine; installs nothing)::

    python bench/bench_rollout_gpu.py                       # full size, markdown table on stdout
    python bench/bench_rollout_gpu.py --json /tmp/rollout.json
    python bench/bench_rollout_gpu.py --layers 4 --prompts 32 --new-tokens 64   # quick smoke run
    python bench/bench_rollout_gpu.py --variants ours-static,ours-dynamic

Exits with status 2 and a message when no CUDA GPU is present.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

VARIANTS = ("hf-dynamic", "hf-static", "ours-static", "ours-dynamic")
DEFAULT_VARIANTS = ("hf-dynamic", "hf-static", "ours-static")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prompts", type=int, default=256, help="number of prompts (= batch rows, n=1)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt length in tokens")
    p.add_argument("--ragged", action="store_true", help="prompt lengths uniform in [prompt-len/2, prompt-len]")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per prompt")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 disables top-k (passed explicitly to HF as well)")
    p.add_argument("--repeats", type=int, default=3, help="timed warm runs per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (HF variants)")
    p.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)}",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    for name in ("prompts", "prompt_len", "new_tokens", "layers", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def _import_rollout() -> Any:
    """The project's sampler, :mod:`resrl_analysis.sampling`."""
    try:
        import resrl_analysis.sampling as rollout
    except ImportError:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import resrl_analysis.sampling as rollout
    return rollout


def build_model(args: argparse.Namespace) -> Any:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=max(4096, args.prompt_len + args.new_tokens),
        tie_word_embeddings=True,
        # No EOS/BOS: random weights would otherwise stop rows at random and make the variants do
        # different amounts of work.
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(cfg).to(dtype)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def make_prompts(args: argparse.Namespace) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(args.seed + 1)
    lo = max(1, args.prompt_len // 2) if args.ragged else args.prompt_len
    lengths = torch.randint(lo, args.prompt_len + 1, (args.prompts,), generator=g).tolist()
    return [torch.randint(1, args.vocab, (n,), generator=g).tolist() for n in lengths]


def _timed(fn: Callable[[], Any]) -> float:
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_variant(name: str, model: Any, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import GenerationConfig

    rollout = _import_rollout()
    params = rollout.SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_new_tokens=args.new_tokens, n=1
    )
    n_tokens = len(prompts) * args.new_tokens
    result: dict[str, Any] = {"variant": name}

    if name.startswith("hf"):
        # Left-pad exactly as our sampler does, so HF sees the same batch.
        packed = rollout.decode._pack_prompts(prompts, 1, 0, torch.device("cuda"))
        input_ids, attention_mask = packed[0], packed[1].long()
        gen = GenerationConfig(
            max_new_tokens=args.new_tokens,
            do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else None,
            top_k=args.top_k,  # explicit 0: transformers 5 would otherwise default to 50
            top_p=args.top_p,
            eos_token_id=None,
            pad_token_id=0,
            cache_implementation="static" if name == "hf-static" else None,
        )

        def call() -> None:
            with torch.no_grad():
                out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen)
            if out.shape[1] != input_ids.shape[1] + args.new_tokens:
                raise RuntimeError(f"HF generated {out.shape[1] - input_ids.shape[1]} tokens, expected all")

        try:
            first = _timed(call)  # HF static may compile here (transformers auto-compiles static caches on CUDA)
        except Exception as exc:  # noqa: BLE001
            if name != "hf-static":
                raise
            # HF's own compiled static decode can fail (e.g. a CUDA-graph "output overwritten" error);
            # measure its uncompiled static cache instead and say so.
            traceback.print_exc()
            result["note"] = f"HF auto-compile failed ({type(exc).__name__}); measured with disable_compile=True"
            result["backend_used"] = "hf static, uncompiled"
            gen.disable_compile = True
            first = _timed(call)
        for _ in range(max(0, args.warmup - 1)):
            call()
    else:
        backend = name.split("-", 1)[1]

        def call() -> None:
            batch = rollout.sample(
                model,
                prompts,
                params,
                eos_token_id=None,
                pad_token_id=0,
                generator=torch.Generator().manual_seed(args.seed),
                backend=backend,
            )
            if int(batch.response_lengths.min()) != args.new_tokens:
                raise RuntimeError("our sampler stopped early although EOS is disabled")
            result["backend_used"] = batch.backend

        first = _timed(call)  # for ours-static: compile + CUDA-graph warm-up and capture
        call()  # the cudagraph tree may still record on the second call
        for _ in range(max(0, args.warmup - 1)):
            call()

    times = [_timed(call) for _ in range(args.repeats)]
    warm = statistics.median(times)
    result.update(
        first_call_s=first,
        warm_s=warm,
        warm_runs_s=times,
        tokens_per_s=n_tokens / warm,
        # What the first call cost beyond a warm run: compilation and graph capture.
        compile_overhead_s=max(0.0, first - warm),
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30,
    )
    return result


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    base = next((r for r in results if r["variant"] == "hf-dynamic" and "tokens_per_s" in r), None)
    lines = [
        f"Rollout throughput: {meta['shape']}; {meta['gpu']}; torch {meta['torch']}, "
        f"transformers {meta['transformers']}",
        "",
        "| Variant | Backend used | Warm time | Tokens/s | vs HF dynamic | First call (compile/capture) | "
        "Compile overhead | Peak mem |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed | - | - | - | - | - | {r['error'][:120]} |")
            continue
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        lines.append(
            f"| {r['variant']} | {r.get('backend_used', 'hf')} | {r['warm_s']:.2f} s | {r['tokens_per_s']:,.0f} | "
            f"{ratio} | {r['first_call_s']:.1f} s | {r['compile_overhead_s']:.1f} s | "
            f"{r['peak_mem_gib']:.1f} GiB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            "bench_rollout_gpu: no CUDA GPU available (torch.cuda.is_available() is False). This benchmark "
            "measures CUDA-graph decoding and only runs on a CUDA machine.",
            file=sys.stderr,
        )
        return 2
    import transformers

    torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model(args)
    prompts = make_prompts(args)
    meta = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "shape": (
            f"{args.prompts} prompts x {args.new_tokens} new tokens, prompt len "
            f"{'<=' if args.ragged else ''}{args.prompt_len}, {args.layers} layers, hidden {args.hidden}, "
            f"vocab {args.vocab}, {args.dtype}, T={args.temperature} top_p={args.top_p} top_k={args.top_k}"
        ),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    rollout = _import_rollout()
    results = []
    for name in args.variants:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            results.append(run_variant(name, model, prompts, args))
        except Exception as exc:  # noqa: BLE001 - report the failure in the table and go on
            traceback.print_exc()
            results.append({"variant": name, "error": f"{type(exc).__name__}: {exc}"})
        rollout.release_static_cache(model)  # free our KV cache before the next variant
    table = markdown(results, meta)
    print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
