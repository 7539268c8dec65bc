"""Interference between a group's positive and negative tokens: the head's picture and the model's.

Per mixed group (docs/MATH.md § Factorised head gradient):

- token level: the exact cosine cos(g⁺, g⁻) of the head gradients of every positive×negative
  token pair, from the factorised core (two matrix products and gathers; never a V×d gradient,
  never a (Tp, Tn, V) tensor), summarised (mean, quantiles, fraction > 0) plus a bounded sample of
  raw cosines for histograms. A positive cosine means that pushing the negative token down also
  pushes the positive token down;
- group level: the cosine between the advantage-weighted summed head gradients of the positive
  and of the negative responses (:func:`resrl_analysis.interference.group_gradient_alignment`);
- NTHR scores, threshold and flags per negative token (:func:`resrl_analysis.interference.nthr_token_weights`);
- optionally the whole model's gradient cosine between the positive and the negative parts of the
  loss (autograd, two backward passes), with its head-matrix block beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from ..forward import response_forward
from ..interference import GroupGrams, block_picks, nthr_eta, row_blocks, streaming_quantiles
from ..ops import group_advantages
from ..probe_sets import ProbeSet
from ..results import InterferenceResult, ProbeResult
from .capture import (
    GroupForward,
    checkpointing,
    forward_probe_set,
    group_batch,
    model_device,
    pad_id_of,
    row_slice,
)
from .parallel import WholeModelJob, WholeModelJobs, whole_model_fill
from .registry import FinishContext, GroupsContext, Probe, check_positive, option, register_probe

if TYPE_CHECKING:
    from ..plan import PlanInputs

__all__ = ["interference_probe", "full_model_gradient_cosine", "QUANTILES", "InterferenceOptions", "InterferenceProbe"]

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def full_model_gradient_cosine(model: nn.Module, fwd: GroupForward, advantages: Tensor, *, pad_id: int = 0,
                               micro_batch: int | None = 4, use_checkpointing: bool = True) -> dict:
    """Cosine between ∇θ L⁺ and ∇θ L⁻, the gradients of the positive and negative parts of the group's
    token-mean loss L = −(1/Z) Σ A log p (autograd: per micro-batch of ``micro_batch`` responses one
    forward and two backward passes, accumulated; activation checkpointing where it cannot change the
    numbers, :func:`~.capture.checkpointing`).

    Returns ``full_update_cosine`` (all trainable parameters), ``full_update_inner``, and
    ``full_head_cosine`` (the LM head matrix's block only; with tied embeddings it also carries the
    input-embedding gradient).
    """
    batch = group_batch(fwd.group, model_device(model), pad_id)
    mask, pos = batch.mask, batch.is_positive
    adv = advantages.to(mask.device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    head_w = model.get_output_embeddings().weight
    G = mask.shape[0]
    mb = max(1, micro_batch or G)
    Z = mask.sum()

    def acc(total: list, part: tuple) -> list:
        return [b if a is None else (a if b is None else a + b) for a, b in zip(total, part)]

    g_pos: list = [None] * len(params)
    g_neg: list = [None] * len(params)
    with checkpointing(model, enable=use_checkpointing), torch.enable_grad():
        for s in range(0, G, mb):
            i = slice(s, s + mb)
            lp = response_forward(model, row_slice(batch.rows, i)).logp  # (mb, T), 0 on padding
            m, a = mask[i, : lp.shape[1]], adv[i, : lp.shape[1]]
            l_pos = -(a * lp * (m & pos[i, None])).sum() / Z
            l_neg = -(a * lp * (m & ~pos[i, None])).sum() / Z
            # A micro-batch of only positives (or negatives) has a constant other part: no gradient.
            if l_pos.requires_grad and bool((m & pos[i, None]).any()):
                g_pos = acc(g_pos, torch.autograd.grad(l_pos, params, retain_graph=True, allow_unused=True))
            if l_neg.requires_grad and bool((m & ~pos[i, None]).any()):
                g_neg = acc(g_neg, torch.autograd.grad(l_neg, params, allow_unused=True))
            del lp, l_pos, l_neg
    inner = npos = nneg = 0.0
    h_inner = h_pos = h_neg = 0.0
    for p, a, b in zip(params, g_pos, g_neg):
        a64 = a.double() if a is not None else None
        b64 = b.double() if b is not None else None
        ab = float((a64 * b64).sum()) if a64 is not None and b64 is not None else 0.0
        aa = float((a64 * a64).sum()) if a64 is not None else 0.0
        bb = float((b64 * b64).sum()) if b64 is not None else 0.0
        inner, npos, nneg = inner + ab, npos + aa, nneg + bb
        if p is head_w:
            h_inner, h_pos, h_neg = ab, aa, bb

    def cos(i: float, x: float, y: float) -> float:
        d = (x * y) ** 0.5
        return i / d if d > 1e-300 else float("nan")

    return {"full_update_cosine": cos(inner, npos, nneg), "full_update_inner": inner,
            "full_head_cosine": cos(h_inner, h_pos, h_neg)}


def _cosine_pass(gr: GroupGrams, quantiles: Sequence[float], pick: np.ndarray | None) -> tuple[dict, dict, Tensor]:
    """Summary, per-negative-token columns and sampled values of the (Tp, Tn) positive×negative cosine,
    streamed in row blocks (:func:`~resrl_analysis.interference.row_blocks`) so that the whole matrix never
    exists (three passes): mean and std (float64, shifted sums), extremes, fraction > 0, exact quantiles
    (:func:`~resrl_analysis.interference.streaming_quantiles`), column mean/max/fraction > 0, and the values
    at the flat indices ``pick`` (in their order; None: all)."""
    Tp, Tn = gr.n_pos, gr.y.shape[0] - gr.n_pos
    blocks = row_blocks(Tp, Tn, gr.inner.element_size())
    dev = gr.inner.device
    n = Tp * Tn
    # Sums of (c − K) and (c − K)² about the first value K: the variance in one pass without cancellation.
    total, total2, shift, n_pos_vals, lo, hi = 0.0, 0.0, None, 0, float("inf"), float("-inf")
    col_sum = torch.zeros(Tn, dtype=torch.float64, device=dev)
    col_max = torch.full((Tn,), float("-inf"), dtype=gr.inner.dtype, device=dev)
    col_pos = torch.zeros(Tn, dtype=torch.float64, device=dev)
    pk = torch.arange(n, device=dev) if pick is None else torch.as_tensor(pick, device=dev)
    picked = torch.empty(len(pk), dtype=gr.inner.dtype, device=dev)
    for b in blocks:
        c = gr.cosine("pos", "neg", rows=b)
        if shift is None:
            shift = float(c.reshape(-1)[0])
        dc = c.double() - shift
        total, total2 = total + float(dc.sum()), total2 + float((dc * dc).sum())
        del dc
        gt = c > 0
        n_pos_vals += int(gt.sum())
        lo, hi = min(lo, float(c.min())), max(hi, float(c.max()))
        col_sum += c.sum(0, dtype=torch.float64)
        col_max = torch.maximum(col_max, c.max(0).values)
        col_pos += gt.sum(0)
        sel, at = block_picks(pk, b, Tn)
        picked[sel] = c.reshape(-1)[at]
    mean = shift + total / n
    var = max(0.0, total2 / n - (total / n) ** 2)
    out = {"cos_mean": mean, "cos_std": var**0.5, "cos_min": lo, "cos_max": hi, "cos_frac_positive": n_pos_vals / n}
    qs = streaming_quantiles(lambda: (gr.cosine("pos", "neg", rows=b) for b in blocks), quantiles)
    for q, v in zip(quantiles, qs):
        out[f"cos_q{round(q * 100):02d}"] = v
    cols = {"cos_mean": col_sum / Tp, "cos_max": col_max.double(), "cos_frac_positive": col_pos / Tp}
    return out, cols, picked


def _gram_nthr(gr: GroupGrams, n_pos_responses: int, n_responses: int, beta: float) -> dict:
    """NTHR from the shared Gram: s⁻ (Tn,), τ, η, flags and weights (as :func:`nthr_token_weights`)."""
    s = gr.block("pos", "neg").sum(0)  # (Tn,) summed interference with the positive tokens
    pp = gr.block("pos", "pos").sum(0)  # (Tp,) positive-on-positive scores
    uniq, inv = torch.unique(gr.row[: gr.n_pos], return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=pp.dtype, device=pp.device).index_add_(0, inv, pp)
    counts = torch.zeros(len(uniq), dtype=pp.dtype, device=pp.device).index_add_(0, inv, torch.ones_like(pp))
    tau = beta * float((sums / counts).min())
    eta = nthr_eta(n_pos_responses / n_responses)
    flags = s > tau
    return {"scores": s, "flags": flags, "weights": torch.where(flags, eta, 1.0), "tau": tau, "eta": eta}


def _frame(cols: dict, n: int) -> pd.DataFrame:
    """A table from columns: tensors/arrays of length n, or scalars repeated n times."""
    out = {}
    for k, v in cols.items():
        if isinstance(v, Tensor):
            v = v.detach().cpu().numpy()
        out[k] = v if isinstance(v, np.ndarray) else np.full(n, v)
    return pd.DataFrame(out)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def interference_probe(
    model: nn.Module,
    probe_set: ProbeSet,
    *,
    step: int = 0,
    forwards: Sequence[GroupForward] | None = None,
    advantage: str = "grpo",
    full_model: bool = False,
    max_cosine_samples: int = 256,
    nthr_beta: float = 1.0,
    seed: int = 0,
    whole_model: WholeModelJobs | None = None,
) -> InterferenceResult:
    """Token-level and group-level head-gradient interference, NTHR scores and (optionally) the
    whole-model gradient cosine, for every mixed group of the probe set.

    Groups without both a positive and a negative response get a row with their ``status``
    (``no_positive`` / ``no_negative``) and NaN measurements, and are listed in ``meta["skipped"]``.

    Args:
        advantage: the estimator (:func:`resrl_analysis.ops.group_advantages`) weighting the summed
            gradients in the group-level and whole-model cosines.
        full_model: also run the autograd whole-model cosine (two backward passes per group).
        max_cosine_samples: raw cosines kept per group (uniform sample, seeded) for histograms.
        whole_model: a model sharded across ranks: the whole-model cosine is deferred to it (it runs with every
            rank after the group batches and fills the ``full_*`` columns).

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from resrl_analysis.probe_sets import ProbeGroup
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)).eval()
    >>> ps = ProbeSet((ProbeGroup(0, (1, 5), ((6, 2), (7, 8, 2), (9, 2)), (1.0, 0.0, 0.0)),))
    >>> r = interference_probe(m, ps, full_model=True)
    >>> row = r.to_frame().iloc[0]
    >>> row.status, len(r.tokens), bool(abs(row.head_update_cosine - row.full_head_cosine) < 1e-4)
    ('ok', 5, True)
    """
    pad_id = pad_id_of(model)
    if forwards is None:
        forwards = forward_probe_set(model, probe_set, pad_id=pad_id)
    grows, tframes, sframes, skipped = [], [], [], []
    for fwd in forwards:
        g = fwd.group
        base = {"step": step, "group_id": g.group_id, "prompt_uid": g.prompt_uid, "n_pos": g.n_positive,
                "n_neg": g.n_negative}
        if not g.is_mixed:
            grows.append({**base, "status": g.status, "n_pos_tokens": 0, "n_neg_tokens": 0})
            skipped.append({"step": step, "group_id": g.group_id, "reason": g.status})
            continue
        dev = fwd.mask.device
        G = fwd.mask.shape[0]
        gr = fwd.grams()  # shared with the other probes: computed once per group
        Tp, Tn = gr.n_pos, gr.y.shape[0] - gr.n_pos
        pick = None
        if Tp * Tn > max_cosine_samples:
            rng = np.random.default_rng([seed, step, g.group_id])
            pick = np.sort(rng.choice(Tp * Tn, max_cosine_samples, replace=False))
        # The (Tp, Tn) cosines in row blocks: the matrix is never held (1 GB per group at T = 4096).
        summary, cols, flat = _cosine_pass(gr, QUANTILES, pick)
        # Group level: the positive and the negative parts of the update, weighted by the advantages.
        gids = torch.zeros(G, dtype=torch.long, device=dev)
        adv = group_advantages(fwd.rewards.float(), gids, advantage).to(gr.inner.dtype)  # (G,)
        w = adv[gr.row]  # (N,)
        wp, wn = w[:Tp], w[Tp:]
        # <G⁺, G⁻>, ||G⁺||, ||G⁻|| of the summed gradients G = Σ w g: quadratic forms of the shared Gram.
        inner = float(wp @ gr.block("pos", "neg") @ wn)
        npos = max(0.0, float(wp @ gr.block("pos", "pos") @ wp)) ** 0.5
        nneg = max(0.0, float(wn @ gr.block("neg", "neg") @ wn)) ** 0.5
        al_cos = inner / (npos * nneg) if npos * nneg > 1e-30 else 0.0
        nt = _gram_nthr(gr, g.n_positive, G, nthr_beta)
        full = {"full_update_cosine": np.nan, "full_head_cosine": np.nan}
        if full_model:
            adv_tok = adv[:, None].expand_as(fwd.mask).float()  # (G, T)
            if whole_model is not None:  # sharded: computed later by every rank together, then filled in
                whole_model.defer(WholeModelJob("gradient_cosine", g, [adv_tok], pad_id=pad_id),
                                  whole_model_fill("groups", {"step": step, "group_id": g.group_id}, _cosine_columns))
            else:
                f = full_model_gradient_cosine(model, fwd, adv_tok, pad_id=pad_id)
                full = {"full_update_cosine": f["full_update_cosine"], "full_head_cosine": f["full_head_cosine"]}
        grows.append({**base, "status": "ok", "n_pos_tokens": Tp, "n_neg_tokens": Tn,
                      **summary, "head_update_inner": inner, "head_update_cosine": al_cos,
                      "nthr_tau": nt["tau"], "nthr_eta": nt["eta"],
                      "nthr_flagged_frac": float(nt["flags"].float().mean()), **full})
        tframes.append(_frame({
            "step": step, "group_id": g.group_id, "response_index": gr.row[Tp:], "position": gr.pos[Tp:],
            "token_id": gr.y[Tp:], **cols,
            "nthr_score": nt["scores"].double(), "nthr_flagged": nt["flags"], "nthr_weight": nt["weights"].double(),
        }, Tn))
        sframes.append(_frame({"step": step, "group_id": g.group_id, "cosine": flat.double()}, flat.numel()))
    meta = {"advantage": advantage, "full_model": full_model, "nthr_beta": nthr_beta,
            "max_cosine_samples": max_cosine_samples, "quantiles": list(QUANTILES), "seed": seed,
            "tied_embeddings": _tied(model), "probe_set": probe_set.describe(), "skipped": skipped}
    return InterferenceResult(groups=pd.DataFrame(grows), tokens=_concat(tframes),
                              cosine_samples=_concat(sframes), meta=meta)


def _cosine_columns(answer: dict) -> dict:
    return {"full_update_cosine": answer["full_update_cosine"], "full_head_cosine": answer["full_head_cosine"]}


def _tied(model: nn.Module) -> bool:
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    return inp is not None and out is not None and inp.weight is out.weight


# ----------------------------------------------------------------------------- registration


@dataclass(frozen=True)
class InterferenceOptions:
    """Options of the ``interference`` probe."""

    max_cosine_samples: int = option(256, "raw token-pair cosines kept per group for histograms (default 256)",
                                     metavar="N")

    def __post_init__(self) -> None:
        check_positive("interference", max_cosine_samples=self.max_cosine_samples)


@register_probe
class InterferenceProbe(Probe):
    """:func:`interference_probe` on each group batch; the whole-model cosine on ``--full-model-steps``."""

    name = "interference"
    summary = ("head-gradient cosines positive×negative, group update cosine, NTHR scores, whole-model gradient "
               "cosine (on --full-model-steps)")
    result = InterferenceResult
    scope = "groups"
    needs = frozenset({"gram"})
    Options = InterferenceOptions
    live = True
    plan_hint = "--full-model-steps none"

    def plan(self, p: PlanInputs) -> dict[str, int]:
        # One cosine row block and its temporaries (denominator, quotient, where, a float64 copy).
        t = {"gram build": p.gram_build, "cosine blocks": 6 * p.tp_tn_block}
        if p.full_model:
            fs = p.full_step(min(p.micro_batch, p.G), 2)
            fs.pop("parameter copy")
            t.update({f"whole-model {k}": v for k, v in fs.items()})
        return t

    def on_groups(self, ctx: GroupsContext) -> InterferenceResult:
        return interference_probe(ctx.model, ctx.probe_set, step=ctx.step, forwards=ctx.forwards,
                                  full_model=ctx.full_model, max_cosine_samples=self.options.max_cosine_samples,
                                  seed=ctx.seed, whole_model=ctx.whole_model)

    def finish(self, ctx: FinishContext, parts: Sequence[InterferenceResult]) -> InterferenceResult:
        return super().finish(ctx, parts).with_meta(full_model_steps=list(ctx.full_model_steps))

    def live_metrics(self, results: Mapping[str, ProbeResult], step: int) -> dict[str, float]:
        g = results["interference"].groups  # type: ignore[attr-defined]
        g = g[(g.status == "ok") & (g.step == step)]
        if not len(g):
            return {}
        out = {"probe/interference_cos_mean": float(g.cos_mean.mean()),
               "probe/interference_head_update_cosine": float(g.head_update_cosine.mean())}
        return {k: v for k, v in out.items() if np.isfinite(v)}
