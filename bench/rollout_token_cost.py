"""What the rollout dump's per-token entropies cost the trainer's no-grad forward.

The rollout dump stores, per response token, the rollout policy's log-prob and entropy (``token_logprobs``,
``token_entropies``). The log-probs are the old log-probs the forward computes anyway; the entropies are an
extra pass over each vocabulary chunk of the logits, asked for only on the steps that dump. This times the
no-grad forward (``response_forward`` without and with ``entropy=True``) side by side, alternating, on

- the tiny preset's model and batch (32 prompts × 8 responses of at most 8 tokens, vocabulary 101), and
- a Qwen3-0.6B-shaped head (vocabulary 151,936, hidden 1024) on a 2-layer body, 8 rows × 128 response
  tokens: the extra work scales with the vocabulary, the forward with the depth, so the ratio on 2 layers
  is an upper bound for the 28-layer model.

It also reports how much the two fields add to a dump file (measured on a dump the tiny preset writes).

    python -m bench.rollout_token_cost [--rounds 5]

Prints Markdown table rows for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _rows(vocab: int, rows: int, prompt_len: int, response_len: int, seed: int = 0) -> Any:
    from resrl_analysis.forward import pack_rows

    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, vocab, (rows, prompt_len), generator=g)
    response = torch.randint(3, vocab, (rows, response_len), generator=g)
    lengths = torch.randint(response_len // 2, response_len + 1, (rows,), generator=g)
    rmask = torch.arange(response_len)[None] < lengths[:, None]  # (B, Tr) right-padded
    return pack_rows(prompt, torch.ones_like(prompt, dtype=torch.bool), response, rmask)


def _time(model: torch.nn.Module, rows: Any, entropy: bool, chunks: int) -> float:
    from resrl_analysis.forward import response_forward

    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(chunks):
            response_forward(model, rows, entropy=entropy)
    return time.perf_counter() - t0


def _compare(name: str, setting: str, model: torch.nn.Module, rows: Any, rounds: int, chunks: int) -> str:
    _time(model, rows, True, 1)  # warm-up
    off, on = [], []
    for r in range(rounds):  # alternating, the order flipped every round
        for entropy in ((False, True) if r % 2 == 0 else (True, False)):
            (on if entropy else off).append(_time(model, rows, entropy, chunks))
    ratios = [b / a for a, b in zip(off, on)]
    ratio = statistics.median(on) / statistics.median(off)
    return (f"| {name} | {setting}, {rounds} alternating rounds | {statistics.median(on) * 1e3:.1f} ms (with) | "
            f"{statistics.median(off) * 1e3:.1f} ms (without) | {ratio:.3f}× (rounds {min(ratios):.3f}–"
            f"{max(ratios):.3f}) | report | info | entropy only on the steps that dump |")


def _dump_size() -> str:
    from resrl_analysis.rundir import ROLLOUT_FIELDS_ADDED_LATER
    from trainer.config import preset_config
    from trainer.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = preset_config("tiny", algorithm="resrl", steps=1, save_every=1, output_dir=str(Path(tmp) / "run"),
                            progress_bar="off", log_every=1000, report_to=["none"])
        run = train(cfg)
        text = (run / "rollouts" / "step_000000.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    without = "".join(json.dumps({k: v for k, v in r.items() if k not in ROLLOUT_FIELDS_ADDED_LATER},
                                 ensure_ascii=False) + "\n" for r in rows)
    tokens = sum(len(r["response_ids"]) for r in rows)
    grow = len(text.encode()) / len(without.encode())
    return (f"| Dump size | tiny preset, resrl, step 0 (256 responses, {tokens} tokens) | {len(text.encode())} B | "
            f"{len(without.encode())} B | {grow:.3f}× | report | info | "
            f"{(len(text.encode()) - len(without.encode())) / tokens:.1f} B per response token for both fields |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from resrl_analysis.checkpoints import quiet_progress_bars_unless_tty
    from trainer.models import build_tiny_model, qwen3_0p6b_config

    quiet_progress_bars_unless_tty()
    torch.manual_seed(0)
    tiny = build_tiny_model(seed=0).eval()
    lines = [_compare("Rollout forward + entropy", "tiny model (V=101), 256 rows × 8 tokens, 4 passes",
                      tiny, _rows(tiny.config.vocab_size, 256, 7, 8), args.rounds, chunks=4)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = AutoModelForCausalLM.from_config(qwen3_0p6b_config(num_hidden_layers=2)).eval()
    lines.append(_compare("Rollout forward + entropy", "Qwen3-0.6B head (V=151,936, d=1024), 2 layers, fp32, "
                          "8 rows × 128 tokens", head, _rows(head.config.vocab_size, 8, 32, 128), args.rounds, 1))
    del head
    lines.append(_dump_size())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
