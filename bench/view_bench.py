"""`resrl view` at the size of issue 21: 40 steps × 32 groups × 8 responses × 30 tokens, first view in headless
Chromium (target: under 2 s on this machine), and what building the page costs.

A synthetic run of that shape is written (rollout dumps with every per-token field, a 32,000-token word-level
tokenizer in ``checkpoints/step_000000``), then two pages are built from it: with the default data budget
(:data:`resrl_analysis.view.DEFAULT_BUDGET_MB`) and with everything embedded (``--max-mb 0``). Each page is
opened ``--rounds`` times in a fresh tab, the two alternating; the first-view time is what the page itself
stamps (``performance.now()`` after its first groups are laid out: parsing the HTML and the JSON blob, drawing
one step) and, beside it, the driver's wall time from ``get()`` to that stamp being readable. Re-drawing after a
change of colour quantity and of step is timed in the page too. Results go to the VIEW section of RESULTS.md.

    python -m bench.view_bench [--rounds 5] [--no-write] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS_PATH, Row, machine_line, markdown_table, update_results_section

__all__ = ["write_synthetic_run", "main"]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _tokenizer(vocab_size: int):
    """A word-level tokenizer of ``vocab_size`` made-up pieces (like BPE pieces: short, many with a space)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    words = {t: i for i, t in enumerate(specials)}
    while len(words) < vocab_size:
        w = ("Ġ" if rng.random() < 0.6 else "") + "".join(rng.choice(letters, int(rng.integers(1, 8))))
        words.setdefault(w, len(words))
    core = Tokenizer(WordLevel(vocab=words, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def write_synthetic_run(root: Path, *, steps: int = 40, groups: int = 32, group_size: int = 8, tokens: int = 30,
                        vocab_size: int = 32000, seed: int = 0) -> Path:
    """Our run directory with ``steps`` rollout dumps of ``groups`` × ``group_size`` responses of ``tokens``
    tokens, every per-token field filled (a ResRL run's: ω and residuals on negatives), and a tokenizer."""
    run = root / "run"
    (run / "rollouts").mkdir(parents=True)
    _tokenizer(vocab_size).save_pretrained(run / "checkpoints" / "step_000000")
    rng = np.random.default_rng(seed)

    def r4(x: np.ndarray) -> list:
        return [float(v) for v in np.round(x, 5)]

    for s in range(steps):
        lines = []
        for g in range(groups):
            prompt_ids = [int(x) for x in rng.integers(4, vocab_size, 40)]
            shared = [int(x) for x in rng.integers(4, vocab_size, tokens // 2)]
            for i in range(group_size):
                pos = i < group_size // 2
                ids = shared[: int(rng.integers(0, len(shared)))] if i else shared
                ids = ids + [int(x) for x in rng.integers(4, vocab_size, tokens - len(ids))]
                adv = float(rng.uniform(0.2, 1.5)) * (1 if pos else -1)
                w = np.ones(tokens) if pos else rng.uniform(0.1, 1, tokens)
                lines.append(json.dumps({
                    "step": s, "group_id": g, "prompt_uid": f"p{s}-{g}", "data_source": "synthetic",
                    "prompt": f"prompt {s}-{g}: " + " ".join(map(str, prompt_ids[:8])), "prompt_ids": prompt_ids,
                    "response": "", "response_ids": ids, "ground_truth": "42", "reward": float(pos),
                    "is_positive": pos, "finished": True, "advantage": adv,
                    "token_advantages": r4(adv * w), "resrl_weights": r4(w),
                    "resrl_residuals": [None] * tokens if pos else r4(rng.uniform(0, 0.3, tokens)),
                    "nthr_weights": None, "nthr_scores": None,
                    "token_logprobs": r4(-rng.exponential(0.8, tokens)),
                    "token_entropies": r4(rng.uniform(0, 3, tokens))}))
        (run / "rollouts" / f"step_{s:06d}.jsonl").write_text("\n".join(lines) + "\n")
    return run


def _driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _open(driver, page: Path) -> dict[str, float]:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get("about:blank")
    t0 = time.perf_counter()
    driver.get(page.as_uri())
    WebDriverWait(driver, 60).until(lambda d: d.execute_script("return document.documentElement.dataset.ready"))
    wall = time.perf_counter() - t0
    first = float(driver.execute_script("return document.documentElement.dataset.firstViewMs")) / 1e3
    # Re-draw times, measured in the page: the change handlers draw synchronously.
    redraw = driver.execute_script("""
        const t = (f) => { const a = performance.now(); f(); void document.getElementById('groups').offsetHeight;
                           return (performance.now() - a) / 1e3; };
        const set = (id, v) => { const e = document.getElementById(id); e.value = v;
                                 e.dispatchEvent(new Event('change')); };
        const steps = [...document.getElementById('step').options].map(o => o.value);
        return [t(() => set('quantity', 'entropy')), t(() => set('step', steps[steps.length - 1]))];""")
    tokens = int(driver.execute_script("return +document.getElementById('groups').dataset.tokens"))
    return {"first_view_s": first, "wall_s": wall, "quantity_s": redraw[0], "step_s": redraw[1], "tokens": tokens}


def _spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.2f} s (min {min(xs):.2f}, max {max(xs):.2f}, n={len(xs)})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.view_bench", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="page loads per page, alternating (default 5)")
    p.add_argument("--quick", action="store_true", help="a small run (smoke test; never writes RESULTS.md)")
    p.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    args = p.parse_args(argv)
    from resrl_analysis.view import DEFAULT_BUDGET_MB, write_view

    shape = dict(steps=4, groups=4) if args.quick else dict(steps=40, groups=32)
    dims = f"{shape['steps']}×{shape['groups']}×8×30"
    tmp = Path(tempfile.mkdtemp(prefix="view-bench-"))
    try:
        t0 = time.perf_counter()
        run = write_synthetic_run(tmp, **shape)
        n_tok = sum(len(json.loads(x)["response_ids"]) for f in (run / "rollouts").iterdir()
                    for x in f.read_text().splitlines() if x)
        print(f"synthetic run: {n_tok} response tokens in {time.perf_counter() - t0:.1f} s")
        pages, build = {}, {}
        for name, mb in (("default", DEFAULT_BUDGET_MB), ("everything", 0.0)):
            t0 = time.perf_counter()
            pages[name] = write_view([run], tmp / f"{name}.html", budget_mb=mb or None)
            build[name] = time.perf_counter() - t0
            print(f"{name}: built in {build[name]:.1f} s, {pages[name].stat().st_size / 1e6:.2f} MB")
        driver = _driver()
        got: dict[str, list[dict]] = {k: [] for k in pages}
        try:
            for r in range(args.rounds):
                for name in (list(pages) if r % 2 == 0 else list(pages)[::-1]):  # alternate which goes first
                    got[name].append(_open(driver, pages[name]))
        finally:
            driver.quit()
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        rows = []
        for name, page in pages.items():
            first = [x["first_view_s"] for x in got[name]]
            med = statistics.median(first)
            data_note = f"default budget ({DEFAULT_BUDGET_MB:g} MB)" if name == "default" else \
                "--max-mb 0 (every step, every group)"
            rows.append(Row(
                "resrl view: first view", f"{n_tok} tokens ({dims}), page {page.stat().st_size / 1e6:.1f} MB, "
                f"{data_note}; {got[name][0]['tokens']} tokens drawn",
                ours=_spread(first), reference=f"driver wall {_spread([x['wall_s'] for x in got[name]])}",
                target="< 2 s", status="met" if med < 2.0 else "missed",
                note=f"built in {build[name]:.1f} s (Python); re-draw on a colour change "
                     f"{statistics.median([x['quantity_s'] for x in got[name]]):.2f} s, on a step change "
                     f"{statistics.median([x['step_s'] for x in got[name]]):.2f} s"))
        table = markdown_table(rows)
        print(table)
        if not (args.quick or args.no_write):
            body = (f"## resrl view (issue 21)\n\nMeasured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
                    f"`python -m bench.view_bench --rounds {args.rounds}`; headless Chromium "
                    f"({CHROMIUM}), the two pages alternating; load average after: {load}.\n\n"
                    f"- Machine: {machine_line()}.\n\n{table}\n")
            update_results_section("VIEW", body, RESULTS_PATH)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
