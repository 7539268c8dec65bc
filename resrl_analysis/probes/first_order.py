"""First-order prediction of one SGD step's effect on log π(y), from one forward pass
(docs/MATH.md § First-order prediction).

For the loss L = −(1/Z) Σ_{j,s} A_{j,s} log p_{j,s}[y_{j,s}] of one group (Z = its number of
response tokens, token-mean), one SGD step of size η on the head matrix W moves W by
(η/Z) Σ A_{j,s} g_{j,s}, so for every response i

    Δ log π(y_i) ≈ (η/Z) Σ_t Σ_{j,s} A_{j,s} <g_{i,t}, g_{j,s}>,

split into the terms with j positive and j negative (the driver of lazy likelihood displacement).
The inner products come from the factorised core (:func:`resrl_analysis.interference.head_gradient_inner`);
the advantages from the registry the trainer uses (:mod:`resrl_analysis.advantages`), with the same typed
parameters (:class:`~resrl_analysis.advantages.AdvantageParams`). The prediction is checked against a
real SGD step of the head alone (:func:`head_step_delta`, autograd; agrees to first order in η)
and reported beside a real SGD step of the whole model (:func:`full_step_delta`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pandas as pd
import torch
from torch import Tensor, nn

from ..advantages import ALGORITHM_NAMES, AdvantageParams, AlgoInputs, get_algorithm
from ..checkpoints import ProbeSet
from ..forward import response_forward
from ..interference import sharing_grams
from ..results import FirstOrderResult
from .capture import GroupForward, checkpointing, forward_probe_set, group_batch, model_device, pad_id_of, row_slice

__all__ = [
    "ALGORITHMS",
    "AdvantageOptions",
    "PROBE_PARAMS",
    "token_advantages",
    "predict_delta",
    "head_step_delta",
    "full_step_delta",
    "first_order_prediction",
]

#: The algorithms of the registry (:data:`resrl_analysis.advantages.ALGORITHM_NAMES`).
ALGORITHMS: tuple[str, ...] = ALGORITHM_NAMES

#: The probes' parameters, the training defaults except an exact SVD (deterministic probes).
PROBE_PARAMS = AdvantageParams(resrl=dataclasses.replace(AdvantageParams().resrl, svd="exact"))

#: The former name of the parameters of the probes' advantages.
AdvantageOptions = AdvantageParams


def token_advantages(fwd: GroupForward, algorithm: str, options: AdvantageParams | None = None, *,
                     seed: int = 0) -> Tensor:
    """Per-token advantages (G, T) float32 of ``algorithm`` for one group (0 on padding).

    The registered estimator the trainer uses (:data:`resrl_analysis.advantages.ALGORITHMS`), on the probe
    forward: ResRL reads the state ``options.resrl_layer`` names (``penultimate`` or ``head_input``), NTHR
    the head inputs and logits at ``options.temperature``. ``options`` defaults to :data:`PROBE_PARAMS`;
    ``seed`` (with the group's id) seeds ResRL's sub-sampling and randomized SVD, as the trainer's step seed does.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from resrl_analysis.checkpoints import ProbeGroup
    >>> from resrl_analysis.probes.capture import forward_group
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)).eval()
    >>> f = forward_group(m, ProbeGroup(0, (1, 5), ((6, 2), (7,)), (1.0, 0.0)))
    >>> token_advantages(f, "nsr").tolist()
    [[0.0, 0.0], [-1.0, 0.0]]
    """
    o = options or PROBE_PARAMS
    algo = get_algorithm(algorithm)
    if "hidden" in algo.needs:
        if o.resrl_layer not in ("penultimate", "head_input"):
            raise ValueError(f"resrl_layer={o.resrl_layer!r}: the probes keep 'penultimate' and 'head_input' only")
        hidden = fwd.penultimate if o.resrl_layer == "penultimate" else fwd.head_input
        if hidden is None:
            raise ValueError(f"{algorithm} advantages need hidden states (forward with keep_hidden=True)")
    else:
        hidden = None
    if {"head_input", "logits"} & algo.needs and (fwd.logits is None or fwd.head_input is None):
        raise ValueError(f"{algorithm} advantages need logits and head inputs (keep_hidden=True, keep_logits=True)")
    G = fwd.mask.shape[0]
    inp = AlgoInputs(
        # The group's own id: ResRL's per-group draws then match the trainer's for the same group and seed.
        rewards=fwd.rewards.float(), group_ids=torch.full((G,), fwd.group.group_id, device=fwd.mask.device),
        response_ids=fwd.labels, response_mask=fwd.mask, params=o, hidden=hidden, head_input=fwd.head_input,
        logits=fwd.logits, generator=torch.Generator().manual_seed(seed),
    )
    if "logits" in algo.needs and o.temperature == 1.0:
        # NTHR's Gram is the probes' shared one: computed once per group, not again inside the registry.
        with sharing_grams(fwd.logits, fwd.grams()):  # type: ignore[arg-type]
            return algo.fn(inp).token_advantages.float()  # (G, T)
    return algo.fn(inp).token_advantages.float()  # (G, T)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def predict_delta(fwd: GroupForward, advantages: Tensor | Sequence[Tensor], lr: float, *,
                  chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Predicted Δ log π(y_i) of every response from a head-only SGD step, split by source.

    Args:
        fwd: a forward with head inputs and logits.
        advantages: (G, T) per-token advantages, or a list of them (one column pair each: the
            prediction is linear in the advantages, so every algorithm's comes from the one shared
            Gram, :meth:`GroupForward.grams`, times its advantage vector).
        chunk: unused (kept for callers; the Gram is computed in vocabulary chunks once).
        lr: the step size η.

    Returns:
        (from positives, from negatives), each (G,) — or (G, n) for a list of n advantage tensors.
    """
    single = isinstance(advantages, Tensor)
    advs = [advantages] if single else list(advantages)
    G = fwd.mask.shape[0]
    gr = fwd.grams()  # (N, N) Gram shared with the other probes; the prediction is linear in A
    cdt = gr.inner.dtype
    dev = gr.inner.device
    row = gr.row  # (N,)
    pos = fwd.is_positive.to(dev)[row]  # (N,)
    a = torch.stack([adv.to(dev)[row, gr.pos].to(cdt) for adv in advs], 1)  # (N, n)
    w = torch.cat([a * pos[:, None], a * ~pos[:, None]], 1)  # (N, 2n): [positive sources | negative sources]
    out = gr.inner @ w  # (N, 2n): one matrix product for every algorithm at once
    Z = row.shape[0]
    per_resp = torch.zeros(G, w.shape[1], dtype=cdt, device=dev).index_add_(0, row, out) * (lr / Z)  # (G, 2n)
    n = len(advs)
    from_pos, from_neg = per_resp[:, :n], per_resp[:, n:]
    return (from_pos[:, 0], from_neg[:, 0]) if single else (from_pos, from_neg)


def head_step_delta(fwd: GroupForward, advantages: Tensor, lr: float, head: nn.Module, *,
                    dtype: torch.dtype | None = None) -> Tensor:
    """Real Δ log π(y_i) (G,) after one SGD step of size ``lr`` on the head matrix alone (autograd).

    The head inputs stay fixed (the body is frozen) and logits are recomputed as W h (+ bias); the
    bias is not stepped. ``dtype`` (default: the head input's, at least float32) is the precision of
    this check: float64 shows the first-order agreement down to small steps.
    """
    G = fwd.mask.shape[0]
    tok = fwd.tokens(torch.arange(G, device=fwd.mask.device), with_logits=False)
    cdt = dtype or _compute_dtype(tok["h"])
    h, y, row = tok["h"].to(cdt), tok["y"], tok["row"]  # (N, d), (N,), (N,)
    a = advantages[fwd.mask].to(cdt)  # (N,)
    bias = head.bias.detach().to(cdt) if getattr(head, "bias", None) is not None else None
    W = head.weight.detach().to(cdt).clone().requires_grad_(True)  # (V, d)

    def logp_chunk(Wm: Tensor, s: int, chunk: int) -> Tensor:
        # A plain log-softmax in ``cdt``, independent of the core (this is the reference);
        # ops.token_logprobs would round to float32.
        z = h[s : s + chunk] @ Wm.T  # (c, V)
        z = z + bias if bias is not None else z
        return torch.log_softmax(z, -1).gather(-1, y[s : s + chunk, None]).squeeze(-1)  # (c,)

    # Row chunks of about 64 MB, each differentiated at once (the gradient is a sum over tokens), so
    # autograd never holds more than one chunk's (c, V) log-softmax: not the (N, V) of one graph.
    N, V = h.shape[0], W.shape[0]
    chunk = max(1, min(N, (64 * 2**20) // max(1, V * torch.finfo(cdt).bits // 8)))
    g = torch.zeros_like(W)  # (V, d)
    lp0 = torch.empty(N, dtype=cdt, device=h.device)
    with torch.enable_grad():
        for s in range(0, N, chunk):
            lp = logp_chunk(W, s, chunk)
            (part,) = torch.autograd.grad(-(a[s : s + chunk] * lp).sum() / N, W)
            g += part
            lp0[s : s + chunk] = lp.detach()
    with torch.no_grad():
        W1 = W.detach() - lr * g
        lp1 = torch.cat([logp_chunk(W1, s, chunk) for s in range(0, N, chunk)])
    return torch.zeros(G, dtype=cdt, device=h.device).index_add_(0, row, lp1 - lp0)


def full_step_delta(model: nn.Module, fwd: GroupForward, advantages: Tensor, lr: float, *,
                    pad_id: int = 0, micro_batch: int | None = None, use_checkpointing: bool = True) -> Tensor:
    """Real Δ log π(y_i) (G,) after one SGD step of size ``lr`` on every trainable parameter.

    The parameters are copied before the step and restored afterwards (also on error), so the
    model is unchanged on return. Same loss as the prediction (token-mean over the group). The
    gradient is accumulated over ``micro_batch`` responses at a time (default: all at once), with
    activation checkpointing where it cannot change the result (:func:`~.capture.checkpointing`), so peak
    activation memory is one micro-batch's layer inputs.
    """
    batch = group_batch(fwd.group, model_device(model), pad_id)
    mask = batch.mask
    adv = advantages.to(mask.device)
    G = mask.shape[0]
    mb = max(1, micro_batch or G)
    Z = mask.sum()
    params = [p for p in model.parameters() if p.requires_grad]
    grads: list[Tensor | None] = [None] * len(params)
    lp0 = torch.zeros(G, dtype=torch.float32, device=mask.device)
    with checkpointing(model, enable=use_checkpointing), torch.enable_grad():
        for s in range(0, G, mb):
            i = slice(s, s + mb)
            lp = response_forward(model, row_slice(batch.rows, i)).logp  # (mb, T), 0 on padding
            m = mask[i, : lp.shape[1]]
            loss = -(adv[i, : lp.shape[1]] * lp * m).sum() / Z
            part = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [g if a is None else (a if g is None else a + g) for a, g in zip(grads, part)]
            lp0[i] = (lp.detach() * m).sum(1).float()
            del lp, loss, part
    saved = [p.detach().clone() for p in params]
    lp1 = torch.zeros_like(lp0)
    try:
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p.add_(g, alpha=-lr)
            for s in range(0, G, mb):
                i = slice(s, s + mb)
                lp = response_forward(model, row_slice(batch.rows, i)).logp  # (mb, T)
                lp1[i] = (lp * mask[i, : lp.shape[1]]).sum(1).float()
    finally:
        with torch.no_grad():
            for p, s_ in zip(params, saved):
                p.copy_(s_)
    return lp1 - lp0


def first_order_prediction(
    model: nn.Module,
    probe_set: ProbeSet,
    *,
    algorithms: Sequence[str] = ALGORITHMS,
    lr: float = 1e-3,
    head_step: bool = True,
    full_step: bool = False,
    step: int = 0,
    forwards: Sequence[GroupForward] | None = None,
    options: AdvantageParams | None = None,
    head_step_dtype: torch.dtype | None = None,
    seed: int = 0,
    step_algorithms: Sequence[str] | None = None,
    step_groups: int | Sequence[int] | None = 4,
    micro_batch: int | None = 4,
) -> FirstOrderResult:
    """Predicted (head-only, first-order) Δ log π(y) of one SGD step for every probe response and
    algorithm, split into the contributions of positive and negative responses; with ``head_step``
    beside the real head-only step, with ``full_step`` beside a real whole-model step. ``options``
    (default :data:`PROBE_PARAMS`) are the algorithms' parameters; ``seed`` seeds ResRL's draws.

    The predictions of all algorithms come from one shared Gram per group (linear in the advantages).
    The real steps are the expensive part and run only where asked: for ``step_algorithms`` (default:
    all of ``algorithms``) on the first ``step_groups`` groups of ``forwards`` (default 4; None: every
    group; a sequence: those group ids, which keeps the choice the same however the groups are
    batched), the whole-model step accumulated over ``micro_batch`` responses at a time with
    gradient checkpointing. The subsample is stated in ``meta`` (``real_step_algorithms``,
    ``real_step_group_ids``); rows outside it have NaN ``actual_*``.

    Every group is probed (a group without negatives has no negative contribution; GRPO gives a
    group without a mixed reward zero advantages); ``groups`` records each group's status.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from resrl_analysis.checkpoints import ProbeGroup
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)).eval()
    >>> ps = ProbeSet((ProbeGroup(0, (1, 5), ((6, 2), (7, 8, 2), (9, 2)), (1.0, 0.0, 0.0)),))
    >>> df = first_order_prediction(m, ps, algorithms=["grpo"]).to_frame()
    >>> bool(((df.predicted - df.predicted_from_pos - df.predicted_from_neg).abs() < 1e-9).all())
    True
    """
    step_algs = list(algorithms) if step_algorithms is None else list(step_algorithms)
    for alg in [*algorithms, *step_algs]:
        if alg not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {alg!r}; expected one of {ALGORITHMS}")
    if isinstance(step_groups, int) and step_groups < 0:
        raise ValueError(f"step_groups must be >= 0, a list of group ids or None, got {step_groups}")
    options = options or PROBE_PARAMS
    pad_id = pad_id_of(model)
    if forwards is None:
        forwards = forward_probe_set(model, probe_set, pad_id=pad_id)
    head = model.get_output_embeddings()
    ids = [f.group.group_id for f in forwards]
    stepped = set(ids if step_groups is None else ids[:step_groups] if isinstance(step_groups, int) else step_groups)
    rows, grows = [], []
    for fwd in forwards:
        g = fwd.group
        advs = [token_advantages(fwd, alg, options, seed=seed) for alg in algorithms]
        from_pos, from_neg = predict_delta(fwd, advs, lr)  # (G, n) each
        n_tok = fwd.mask.sum(1).tolist()
        is_pos = fwd.is_positive.tolist()
        fp_all, fn_all = from_pos.tolist(), from_neg.tolist()
        for k, alg in enumerate(algorithms):
            real = g.group_id in stepped and alg in step_algs
            act_head = head_step_delta(fwd, advs[k], lr, head, dtype=head_step_dtype) if head_step and real else None
            act_full = (full_step_delta(model, fwd, advs[k], lr, pad_id=pad_id, micro_batch=micro_batch)
                        if full_step and real else None)
            act_head = act_head.tolist() if act_head is not None else None
            act_full = act_full.tolist() if act_full is not None else None
            grows.append({"step": step, "group_id": g.group_id, "prompt_uid": g.prompt_uid, "algorithm": alg,
                          "status": g.status, "n_pos": g.n_positive, "n_neg": g.n_negative,
                          "loss_tokens": int(fwd.mask.sum())})
            for i in range(g.n_responses):  # G rows per (group, algorithm): no per-token loop
                fp, fn = fp_all[i][k], fn_all[i][k]
                rows.append({"step": step, "group_id": g.group_id, "prompt_uid": g.prompt_uid, "algorithm": alg,
                             "response_index": i, "is_positive": bool(is_pos[i]), "n_tokens": int(n_tok[i]),
                             "lr": lr, "predicted": fp + fn, "predicted_from_pos": fp, "predicted_from_neg": fn,
                             "actual_head": float(act_head[i]) if act_head is not None else float("nan"),
                             "actual_full": float(act_full[i]) if act_full is not None else float("nan")})
    meta = {"lr": lr, "algorithms": list(algorithms), "loss": "token-mean over the group's response tokens",
            "head_step": head_step, "full_step": full_step, "pos_weight": options.pos_weight,
            "w_lambda": options.w_reinforce_lambda, "nthr_beta": options.nthr_beta,
            "resrl_layer": options.resrl_layer, "temperature": options.temperature,
            "probe_set": probe_set.describe(), "skipped": [],
            "real_step_algorithms": step_algs if (head_step or full_step) else [],
            "real_step_group_ids": sorted(stepped) if (head_step or full_step) else [],
            "real_step_micro_batch": micro_batch}
    return FirstOrderResult(predictions=pd.DataFrame(rows), groups=pd.DataFrame(grows), meta=meta)
