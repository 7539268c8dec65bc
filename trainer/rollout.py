"""What a rollout batch is: :class:`ScoredBatch`, sampling with the run's settings, and the batch's metrics.

The loop (:mod:`trainer.loop`) fills a :class:`ScoredBatch` step by step (sample → reward → no-grad forward →
advantages); the update, the rollout dump (:mod:`trainer.rollout_dump`), in-batch LLD (:mod:`trainer.in_batch`)
and validation (:mod:`trainer.validation`) read it.

>>> import torch
>>> b = ScoredBatch(prompt_ids=torch.ones(4, 2, dtype=torch.long), prompt_mask=torch.ones(4, 2, dtype=torch.bool),
...                 response_ids=torch.ones(4, 3, dtype=torch.long), response_mask=torch.ones(4, 3, dtype=torch.bool),
...                 finished=torch.ones(4, dtype=torch.bool), group_ids=torch.tensor([0, 0, 1, 1]),
...                 rewards=torch.tensor([1.0, 0.0, 1.0, 1.0]), old_logp=torch.zeros(4, 3),
...                 advantages=torch.zeros(4), token_advantages=torch.zeros(4, 3))
>>> b.mixed_rows().tolist(), b.select(slice(2, 4)).num_rows
([True, True, False, False], 2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from resrl_analysis.advantages import get_algorithm
from resrl_analysis.distributed import DistContext, all_gather_objects
from resrl_analysis.sampling import SampledBatch, SamplingParams, encode_prompts, eos_token_ids, sample
from trainer.config import TrainConfig
from trainer.tasks import Prompt

__all__ = ["ScoredBatch", "rollout_metrics", "sample_rollout"]


@dataclass
class ScoredBatch:
    """This rank's rows of one rollout batch, scored: what was sampled, its rewards, the old (and reference)
    log-probs and the algorithm's advantages, group after group (``n`` contiguous rows per prompt).

    Tensors are on the training device; (B, Tp) prompts left-padded, (B, Tr) responses right-padded.
    ``group_ids`` are unique within the step across ranks. Advantages and the algorithm's ``extras`` (its
    registered per-token outputs, e.g. ResRL's ``resrl_weights``; see ``resrl_analysis.advantages.EXTRAS``)
    are computed on whole groups before any micro-batching. ``old_logp`` and ``entropy`` come from the same
    no-grad forward of the rollout policy (``entropy`` only when the batch is dumped or a live update diagnostic
    reads entropies: :func:`trainer.in_batch.needs_rollout_entropy`). ``live``: per-token quantities the enabled
    live diagnostics computed in that forward (their ``rollout`` hooks, :mod:`trainer.in_batch`).
    """

    prompt_ids: Tensor  # (B, Tp)
    prompt_mask: Tensor  # (B, Tp) bool
    response_ids: Tensor  # (B, Tr)
    response_mask: Tensor  # (B, Tr) bool
    finished: Tensor  # (B,) bool
    group_ids: Tensor  # (B,)
    rewards: Tensor  # (B,) float32
    old_logp: Tensor  # (B, Tr)
    advantages: Tensor  # (B,)
    token_advantages: Tensor  # (B, Tr)
    ref_logp: Tensor | None = None  # (B, Tr)
    extras: dict[str, Tensor] = field(default_factory=dict)  # name -> (B, Tr)
    prompts: list[Prompt] | None = None  # one per row
    texts: list[str] | None = None  # decoded responses, one per row
    entropy: Tensor | None = None  # (B, Tr) token entropy of the rollout policy (0 on padding)
    live: dict[str, Tensor] = field(default_factory=dict)  # name -> (B, Tr): live diagnostics' rollout quantities

    def select(self, rows: slice) -> ScoredBatch:
        """The rows ``rows`` (tensors sliced, lists and extras too)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, dict):
                out[f.name] = {k: t[rows] for k, t in v.items()}
            else:
                out[f.name] = v[rows] if v is not None else None
        return ScoredBatch(**out)

    @property
    def num_rows(self) -> int:
        return int(self.response_ids.shape[0])

    def mixed_rows(self) -> Tensor:
        """(B,) bool: the rows of groups holding both a positive (reward > 0) and a negative response."""
        pos = self.rewards > 0
        mixed = torch.zeros_like(pos)
        for g in torch.unique(self.group_ids):
            rows = self.group_ids == g
            if pos[rows].any() and not pos[rows].all():
                mixed |= rows
        return mixed


def sample_rollout(
    model: torch.nn.Module, tokenizer: Any, prompts: list[Prompt], *, n: int, temperature: float, cfg: TrainConfig,
    generator: torch.Generator, ctx: DistContext,
) -> tuple[SampledBatch, list[str]]:
    """``n`` responses per prompt with the run's sampler settings; returns the batch and the decoded texts.

    ``temperature`` 0 is greedy (top-p and top-k off). The caller gathers FSDP2 weights around it
    (:func:`resrl_analysis.distributed.gathered_for_inference`).
    """
    if cfg.rollout_compile == "auto":
        compile = ctx.device.type == "cuda" and not ctx.use_fsdp
    else:
        compile = cfg.rollout_compile == "on"
    greedy = temperature == 0
    params = SamplingParams(temperature=temperature, top_p=1.0 if greedy else cfg.top_p,
                            top_k=0 if greedy else cfg.top_k, max_new_tokens=cfg.max_response_length, n=n)
    batch = sample(model, encode_prompts(tokenizer, [p.text for p in prompts]), params,
                   eos_token_id=eos_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                   generator=generator, backend=cfg.rollout_backend, compile=compile, return_logprobs=False)
    texts = tokenizer.batch_decode(batch.response_token_lists(), skip_special_tokens=True)
    return batch, texts


def rollout_metrics(data: ScoredBatch, cfg: TrainConfig, ctx: DistContext) -> dict[str, Any]:
    """Reward, prompt and response length, advantage and the algorithm's own statistics of the whole rollout
    batch (all ranks: every rank passes its rows and gets the same dictionary)."""
    algo = get_algorithm(cfg.algorithm)
    lengths = data.response_mask.sum(1)
    neg_tok = data.response_mask & (data.rewards <= 0)[:, None]  # (B, Tr) tokens of negative responses
    adv = data.token_advantages[data.response_mask].double()  # (N,) valid response tokens
    local: dict[str, Any] = {
        "rewards": data.rewards.tolist(), "groups": data.group_ids.tolist(), "lengths": lengths.tolist(),
        "finished": data.finished.tolist(), "prompt_lengths": data.prompt_mask.sum(1).tolist(),
        # (sum, count, min, max) of the token advantages: exact across ranks without gathering every token
        "adv": (float(adv.sum()), adv.numel(), float(adv.min()), float(adv.max())) if adv.numel() else None,
    }
    if algo.metrics is not None:
        local["algo"] = algo.metrics.local(data.extras, neg_tok, neg_tok & data.mixed_rows()[:, None])
    every = all_gather_objects(local, ctx)
    r = torch.tensor([x for e in every for x in e["rewards"]], dtype=torch.float64)
    g = torch.tensor([x for e in every for x in e["groups"]])
    ln = torch.tensor([x for e in every for x in e["lengths"]], dtype=torch.float64)
    pl = torch.tensor([x for e in every for x in e["prompt_lengths"]], dtype=torch.float64)
    uniq, inv = torch.unique(g, return_inverse=True)
    gmax = torch.full((len(uniq),), -math.inf, dtype=torch.float64).scatter_reduce(0, inv, r, "amax")
    gmin = torch.full((len(uniq),), math.inf, dtype=torch.float64).scatter_reduce(0, inv, r, "amin")
    m: dict[str, Any] = {
        "reward/mean": float(r.mean()), "reward/std": float(r.std()) if r.numel() > 1 else 0.0,
        "reward/zero_std_group_frac": float((gmax == gmin).double().mean()),
        "prompt/length_mean": float(pl.mean()),
        "response/length_mean": float(ln.mean()), "response/length_min": float(ln.min()),
        "response/length_max": float(ln.max()),
        "response/finished_frac": float(sum(sum(e["finished"]) for e in every) / r.numel()),
    }
    advs = [e["adv"] for e in every if e["adv"] is not None]
    if advs:
        m.update({"actor/advantage_mean": sum(a[0] for a in advs) / sum(a[1] for a in advs),
                  "actor/advantage_min": min(a[2] for a in advs), "actor/advantage_max": max(a[3] for a in advs)})
    if algo.metrics is not None:
        m.update(algo.metrics.reduce([e["algo"] for e in every]))
    return m
