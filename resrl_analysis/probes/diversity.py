"""Sampling probes: pass@k, Avg@n, distinct-n, self-BLEU and distinct final answers (docs/MATH.md § Pass@k).

For every prompt of the probe set, ``n`` responses are sampled from the checkpoint at a given
temperature (pure sampling: no top-k, no top-p) with the project's one sampler
(:func:`resrl_analysis.sampling.sample`), all prompts x n in batches of rows. Every prompt draws its
randomness from its own generator (seeded from ``seed`` and its group id; the global RNG is not
touched), so its samples are those of sampling it alone with the same seed, whatever the batching:
the uniforms are identical and only the floating-point effect of batching and padding on the logits
could move a draw that falls within rounding of a token boundary. A response is correct when
``reward_fn(text, ground_truth)`` is > 0 (default: the reward the trainer used for the prompt's data source,
:func:`resrl_analysis.rewards.default_reward_fn`); the unbiased pass@k (:func:`resrl_analysis.ops.pass_at_k`) is
reported for every k ≤ n.
Diversity is measured in model tokens (distinct-n, self-BLEU) and in final answers.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..distributed import DistContext, all_reduce_max
from ..ops import avg_at_n, pass_at_k_curve
from ..probe_sets import ProbeSet
from ..results import DiversityResult
from ..rewards import RewardFn, default_reward_fn, exact_match_reward, math_verify_reward
from ..sampling import SamplingParams, eos_token_ids, sample, sample_prompts
from .config import steps_spec
from .parallel import in_group_order
from .registry import CheckpointContext, Probe, option, register_probe

if TYPE_CHECKING:
    from ..plan import PlanInputs

__all__ = [
    "final_answer",
    "distinct_n",
    "sentence_bleu",
    "self_bleu",
    "diversity_probe",
    "merge_diversity_results",
    "DiversityOptions",
    "DiversityProbe",
]

_BOXED = re.compile(r"\\boxed\{")
# Where a probe set of each kind can get a ground truth from, said when pass@k could not be scored.
_NO_TRUTH = {
    "trl_completions": " (a TRL completion log holds none: give --probe-set the training dataset, prompt plus a "
                       "solution column, to score pass@k)",
    "verl_rollouts": " (this verl dump has no gts: give --probe-set the dataset file, e.g. data/train.parquet)",
    "prime_rl_tokens": " (prime-rl's token exports hold none: give --probe-set the dataset file)",
    "jsonl": " (add a ground_truth field to the probe-set file)",
}


def final_answer(text: str) -> str:
    """The response's final answer: the content of its last ``\\boxed{...}``, else the stripped text.

    >>> final_answer(" 42 "), final_answer("thus $\\\\boxed{\\\\frac{1}{2}}$.")
    ('42', '\\\\frac{1}{2}')
    """
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return text.strip()
    i, depth = starts[-1], 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return text[i:].strip()


def _ngrams(seq: Sequence[Hashable], n: int) -> list[tuple]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(sequences: Sequence[Sequence[Hashable]], n: int) -> float:
    """Distinct-n: unique n-grams / total n-grams over all sequences (NaN when there is none).

    >>> distinct_n([["a", "b", "c"], ["a", "b", "d"]], 1), distinct_n([["a", "b", "c"], ["a", "b", "d"]], 2)
    (0.6666666666666666, 0.75)
    """
    grams = [g for s in sequences for g in _ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def sentence_bleu(hypothesis: Sequence[Hashable], references: Sequence[Sequence[Hashable]], max_n: int = 4,
                  smoothing: float = 0.1) -> float:
    """BLEU of one hypothesis against references (uniform weights over n = 1..max_n).

    Modified n-gram precisions (counts clipped by the maximum count in any reference), a zero
    match count replaced by ``smoothing`` (as NLTK's method 1), orders longer than the hypothesis
    dropped (weights renormalised), and the brevity penalty against the closest reference length.
    An empty hypothesis or no reference scores 0.

    >>> sentence_bleu("a b c d".split(), ["a b c d".split()])
    1.0
    >>> round(sentence_bleu("a b c d".split(), ["a b c e".split()]), 4)  # (3/4 · 2/3 · 1/2 · 0.1/1) ** (1/4)
    0.3976
    """
    if not hypothesis or not references:
        return 0.0
    hyp = [Counter(_ngrams(hypothesis, n)) for n in range(1, max_n + 1)]
    best: list[Counter] = [Counter() for _ in range(max_n)]
    for ref in references:
        for n in range(1, max_n + 1):
            for gram, c in Counter(_ngrams(ref, n)).items():
                best[n - 1][gram] = max(best[n - 1][gram], c)
    return _bleu(hyp, lambda n, gram: best[n - 1][gram], len(hypothesis), (len(ref) for ref in references), smoothing)


def _bleu(hyp: Sequence[Counter], clip: Callable[[int, tuple], int], h: int, ref_lengths: Iterable[int],
          smoothing: float) -> float:
    """BLEU of a hypothesis of ``h`` > 0 tokens from its n-gram counts ``hyp[n - 1]``; ``clip(n, gram)`` is the
    largest count of ``gram`` in any reference (the one formula of :func:`sentence_bleu` and :func:`self_bleu`)."""
    orders = range(1, min(len(hyp), h) + 1)
    log_p = 0.0
    for n in orders:
        match = sum(min(c, clip(n, gram)) for gram, c in hyp[n - 1].items())
        log_p += math.log((match if match > 0 else smoothing) / (h - n + 1))
    log_p /= len(orders)
    r = min(ref_lengths, key=lambda L: (abs(L - h), L))
    bp = 1.0 if h > r else math.exp(1 - r / h)
    return bp * math.exp(log_p)


def self_bleu(sequences: Sequence[Sequence[Hashable]], max_n: int = 4, smoothing: float = 0.1) -> float:
    """Mean BLEU of each sequence against all the others (higher = less diverse); NaN for < 2.

    Equal to the mean of :func:`sentence_bleu` of each sequence against the rest, computed from each sequence's
    n-gram counts taken once: per n-gram the largest count and the largest count in another sequence, so the
    clip "maximum count in any other sequence" costs one lookup (64 samples: 64× fewer n-gram counts).

    >>> self_bleu([["x", "y"], ["x", "y"], ["x", "y"]])
    1.0
    """
    if len(sequences) < 2:
        return float("nan")
    counts = [[Counter(_ngrams(s, n)) for n in range(1, max_n + 1)] for s in sequences]
    # Per order and n-gram: (largest count, the sequence holding it, the largest count in any other sequence).
    top: list[dict[tuple, tuple[int, int, int]]] = [{} for _ in range(max_n)]
    for j, per_order in enumerate(counts):
        for k, cnt in enumerate(per_order):
            t = top[k]
            for gram, c in cnt.items():
                c1, j1, c2 = t.get(gram, (0, -1, 0))
                t[gram] = (c, j, c1) if c > c1 else (c1, j1, max(c2, c))
    lengths = [len(s) for s in sequences]
    scores = []
    for i, s in enumerate(sequences):
        def clip(n: int, gram: tuple, i: int = i) -> int:
            c1, j1, c2 = top[n - 1][gram]
            return c2 if j1 == i else c1

        others = (L for j, L in enumerate(lengths) if j != i)
        scores.append(_bleu(counts[i], clip, len(s), others, smoothing) if s else 0.0)
    return float(np.mean(scores))


def _eos_list(eos: int | Sequence[int] | None) -> list[int]:
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _sample_lockstep(model: nn.Module, prompt_ids: Sequence[Sequence[int]], n: int, seeds: Sequence[int], *,
                     max_new_tokens: int, temperature: float, eos_token_id: int | Sequence[int] | None,
                     pad_token_id: int, max_batch_rows: int, ctx: DistContext, dummy_prompt: Sequence[int]
                     ) -> list[list[list[int]]]:
    """:func:`sample_prompts` on a model sharded with FSDP2 across the ranks of ``ctx``: every forward is a collective,
    so every rank runs as many sampling calls as the busiest rank (the extra ones on ``dummy_prompt``, dropped) and
    every call runs all ``max_new_tokens`` steps (no early stop once all rows have ended: finished rows emit padding,
    so the samples are those of :func:`sample_prompts`). Same per-prompt generators, same samples up to the
    floating-point effect of batching on the logits."""
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, n=n)
    per_call = max(1, max_batch_rows // n)
    calls = math.ceil(len(prompt_ids) / per_call)
    calls = int(all_reduce_max(torch.tensor([calls]), ctx)[0])
    out: list[list[list[int]]] = []
    for c in range(calls):
        chunk = [list(p) for p in prompt_ids[c * per_call : (c + 1) * per_call]]
        real = bool(chunk)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[c * per_call : (c + 1) * per_call]]
        if not real:
            chunk, gens = [list(dummy_prompt)], [torch.Generator().manual_seed(0)]
        batch = sample(model, chunk, params, eos_token_id=eos_token_id, pad_token_id=pad_token_id, generator=gens,
                       return_logprobs=False, backend="dynamic", check_every=max_new_tokens + 1)
        if real:
            rows = batch.response_token_lists()
            out += [rows[i * n : (i + 1) * n] for i in range(len(chunk))]
    return out


def diversity_probe(
    model: nn.Module,
    tokenizer,
    probe_set: ProbeSet,
    *,
    n_samples: int = 8,
    temperature: float = 1.0,
    max_new_tokens: int | None = None,
    seed: int = 0,
    reward_fn: RewardFn | None = None,
    answer_fn: Callable[[str], str] = final_answer,
    step: int = 0,
    max_batch_rows: int = 256,
    lockstep: DistContext | None = None,
) -> DiversityResult:
    """Sample ``n_samples`` responses per probe prompt and measure accuracy and diversity.

    Args:
        tokenizer: decodes the samples (special tokens skipped, EOS cut).
        max_new_tokens: default the longest response in the probe set.
        seed: prompt i is sampled with seed ``seed * 1_000_003 + group_id`` (reproducible, and
            independent of which other prompts are probed).
        reward_fn: ``reward_fn(response_text, ground_truth) -> float``, correct when > 0; default
            each prompt's task reward, :func:`resrl_analysis.rewards.default_reward_fn` of its data source
            (as the trainer scored it). Prompts without a ground truth get NaN correctness (listed in
            ``meta["skipped"]``).
        answer_fn: extracts the final answer for the distinct-answer fraction.
        max_batch_rows: rows (prompts x ``n_samples``) per sampling call; changes speed, not samples.
        lockstep: the ranks of a model sharded with FSDP2 (each rank samples its own prompts, every forward a
            collective: :func:`_sample_lockstep`); pass ``max_new_tokens``, the same on every rank.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from resrl_analysis.probe_sets import ProbeGroup
    >>> class Tok:  # any object with decode() and eos_token_id will do
    ...     eos_token_id, pad_token_id = 2, 0
    ...     def decode(self, ids, skip_special_tokens=True): return " ".join(map(str, ids))
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    >>> ps = ProbeSet((ProbeGroup(0, (1, 5), ((6, 2),), (1.0,), ground_truth="6"),))
    >>> r = diversity_probe(m, Tok(), ps, n_samples=4, max_new_tokens=3)
    >>> r.pass_at_k.k.tolist(), len(r.samples)
    ([1, 2, 3, 4], 4)
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    # The ids that end a response, as in the trainer's rollouts (generation_config first, then the tokenizer).
    eos = eos_token_ids(model, tokenizer)
    stop = set(_eos_list(eos))
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (min(stop) if stop else 0)
    max_new = max_new_tokens or max(len(r) for g in probe_set.groups for r in g.response_ids)
    rfs = {g.data_source: reward_fn or default_reward_fn(g.data_source) for g in probe_set.groups}
    prows, srows, skipped = [], [], []
    counts, correct_matrix = [], []
    prompts, seeds = [g.prompt_ids for g in probe_set.groups], [seed * 1_000_003 + g.group_id for g in probe_set.groups]
    if lockstep is not None:
        if max_new_tokens is None:
            raise ValueError("lockstep sampling needs max_new_tokens (the same on every rank)")
        sampled = _sample_lockstep(model, prompts, n_samples, seeds, max_new_tokens=max_new, temperature=temperature,
                                   eos_token_id=eos, pad_token_id=pad, max_batch_rows=max_batch_rows, ctx=lockstep,
                                   dummy_prompt=prompts[0] if prompts else [pad])
    else:
        sampled = sample_prompts(model, prompts, n_samples, seeds, max_new_tokens=max_new, temperature=temperature,
                                 eos_token_id=eos, pad_token_id=pad, max_batch_rows=max_batch_rows)
    for g, ids in zip(probe_set.groups, sampled):
        texts = [tokenizer.decode([t for t in r if t not in stop], skip_special_tokens=True) for r in ids]
        answers = [answer_fn(t) for t in texts]
        if g.ground_truth is not None:
            rewards = [float(rfs[g.data_source](t, g.ground_truth)) for t in texts]
            correct = [r > 0 for r in rewards]
            counts.append(sum(correct))
            correct_matrix.append(correct)
            n_correct, acc = float(sum(correct)), float(np.mean(correct))
        else:
            rewards = [float("nan")] * n_samples
            n_correct = acc = float("nan")
            skipped.append({"step": step, "group_id": g.group_id,
                            "reason": "no ground truth: correctness not scored" + _NO_TRUTH.get(probe_set.kind, "")})
        prows.append({"step": step, "group_id": g.group_id, "prompt_uid": g.prompt_uid, "n_samples": n_samples,
                      "n_correct": n_correct, "accuracy": acc, "distinct_1": distinct_n(ids, 1),
                      "distinct_2": distinct_n(ids, 2), "distinct_3": distinct_n(ids, 3), "self_bleu": self_bleu(ids),
                      "distinct_answer_frac": len(set(answers)) / n_samples,
                      "mean_length": float(np.mean([len(r) for r in ids]))})
        srows += [{"step": step, "group_id": g.group_id, "sample_index": i, "response": t, "answer": a, "reward": r,
                   "n_tokens": len(x)} for i, (t, a, r, x) in enumerate(zip(texts, answers, rewards, ids))]
    krows = _pass_at_k_rows(step, n_samples, counts, correct_matrix)
    meta = {"n_samples": n_samples, "temperature": temperature, "max_new_tokens": max_new, "seed": seed,
            "reward_fn": ",".join(sorted({getattr(f, "__name__", repr(f)) for f in rfs.values()})),
            "units": "model tokens",
            "probe_set": probe_set.describe(), "skipped": skipped}
    return DiversityResult(prompts=pd.DataFrame(prows), pass_at_k=pd.DataFrame(krows), samples=pd.DataFrame(srows),
                           meta=meta)


def _pass_at_k_rows(step: int, n_samples: int, counts: list[int], correct_matrix: list[list[bool]]) -> list[dict]:
    """The ``pass_at_k`` rows of one step from the correct counts (and 0/1 matrix) of its scored prompts, in order."""
    if not counts:
        return []
    curve = pass_at_k_curve(n_samples, counts)
    avg = avg_at_n(np.asarray(correct_matrix, dtype=np.float64))
    return [{"step": step, "k": k + 1, "pass_at_k": float(v), "avg_at_n": avg, "n_prompts": len(counts)}
            for k, v in enumerate(curve)]


def merge_diversity_results(parts: Sequence[DiversityResult], order: dict[int, int] | None = None) -> DiversityResult:
    """Results of disjoint prompts (the ranks' shares of one checkpoint) as one: prompts and samples stacked in group
    order (``order``: group id → position; default as given), pass@k and Avg@n pooled over all the scored prompts
    again (means over prompts do not average across shares of different sizes).

    >>> import pandas as pd
    >>> def part(gid, correct):
    ...     s = pd.DataFrame([dict(step=0, group_id=gid, sample_index=i, response="x", answer="x", reward=float(c),
    ...                            n_tokens=1) for i, c in enumerate(correct)])
    ...     p = pd.DataFrame([dict(step=0, group_id=gid, prompt_uid=str(gid), n_samples=2,
    ...                            n_correct=float(sum(correct)), accuracy=sum(correct) / 2)])
    ...     return DiversityResult(prompts=p, samples=s, pass_at_k=None)
    >>> merge_diversity_results([part(0, [1, 0]), part(1, [0, 0])]).pass_at_k.pass_at_k.tolist()
    [0.25, 0.5]
    """
    r = DiversityResult.concat(parts)
    if order is not None:
        r = in_group_order(r, order)
    rows = []
    samples = r.samples
    for step, d in r.prompts.groupby("step", sort=False):
        scored = d[d.n_correct.notna()]
        n = int(d.n_samples.iloc[0])
        counts = [int(c) for c in scored.n_correct]
        s = samples[samples.step == step]
        matrix = [(s[s.group_id == g].reward.to_numpy() > 0).tolist() for g in scored.group_id]
        rows += _pass_at_k_rows(int(step), n, counts, matrix)
    return replace(r, pass_at_k=pd.DataFrame(rows, columns=list(DiversityResult.TABLES["pass_at_k"])))


# ----------------------------------------------------------------------------- registration


@dataclass(frozen=True)
class DiversityOptions:
    """Options of the ``diversity`` probe (the sampling settings ``--samples``, ``--temperature`` and
    ``--max-new-tokens`` are the pass's: the heldout/train probe sets sample with them too)."""

    diversity_steps: str = option("ends", "where to sample for pass@k and diversity: 'ends' (default), 'all', 'none', "
                                  "or steps", metavar="SPEC")
    reward: str = option("auto", "correctness of sampled responses: exact match of the stripped text, math-verify, or "
                         "auto (each prompt's task reward, as the trainer scored it: exact match for multiplication, "
                         "the final answer for addition, math-verify otherwise)",
                         choices=("auto", "exact", "math"))


@register_probe
class DiversityProbe(Probe):
    """:func:`diversity_probe` with the checkpoint's model and tokenizer, on ``--diversity-steps``."""

    name = "diversity"
    summary = ("sampling (on --diversity-steps): pass@k for every k ≤ n, Avg@n, distinct-1/2/3, self-BLEU, distinct "
               "final answers")
    result = DiversityResult
    scope = "checkpoint"
    needs = frozenset({"tokenizer"})
    Options = DiversityOptions
    plan_hint = "--samples or --max-new-tokens"

    def plan(self, p: PlanInputs) -> dict[str, int]:
        # Sampling: a KV cache of one call's rows (whole prompts × --samples) × (P + T) tokens and one step's logits.
        m, rows = p.model, p.sampling_rows
        kv = rows * p.L * m.layers * 2 * m.kv_heads * m.head_dim * m.dtype_bytes
        return {"kv cache": kv, "logits": rows * m.vocab * 4 * 2}

    def active_at(self, step: int, steps: Sequence[int]) -> bool:
        return step in steps_spec(self.options.diversity_steps, list(steps))

    def reward_fn(self, ctx: CheckpointContext) -> RewardFn | None:
        """The rule that scores samples: the option's, else None (each prompt's task reward, as the trainer scored
        it: :func:`resrl_analysis.rewards.default_reward_fn` of its data source)."""
        if self.options.reward == "exact":
            return exact_match_reward
        if self.options.reward == "math":
            return math_verify_reward
        return None

    def on_checkpoint(self, ctx: CheckpointContext, parts: Sequence[DiversityResult]) -> DiversityResult | None:
        c = ctx.config
        # The sampling length is the pass's (the longest response of the whole probe set), whatever this rank's share.
        max_new = c.max_new_tokens or max(len(r) for g in ctx.groups.groups for r in g.response_ids)
        sharded = ctx.parallel is not None and ctx.parallel.sharded
        if not ctx.probe_set.groups and not sharded:
            return None  # a rank without prompts (more ranks than groups)
        return diversity_probe(ctx.model, ctx.tokenizer, ctx.probe_set, n_samples=c.samples,
                               temperature=c.temperature, max_new_tokens=max_new, seed=ctx.seed,
                               reward_fn=self.reward_fn(ctx), step=ctx.step,
                               lockstep=ctx.parallel.ctx if sharded else None)  # type: ignore[union-attr]

    def merge_ranks(self, parts: Sequence[DiversityResult], order: Mapping[int, int]) -> DiversityResult:
        return merge_diversity_results(parts, dict(order))
