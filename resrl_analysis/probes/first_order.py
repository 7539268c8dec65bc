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
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import pandas as pd
import torch
from torch import Tensor, nn

from ..advantages import ALGORITHM_NAMES, MAIN_ALGORITHMS, AdvantageParams, AlgoInputs, get_algorithm
from ..forward import PackedRows, response_forward, stop_at_head
from ..probe_sets import ProbeSet
from ..results import FirstOrderResult
from .capture import (
    GroupBatch,
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

__all__ = [
    "ALGORITHMS",
    "AdvantageOptions",
    "REAL_STEP_GROUPS",
    "PROBE_PARAMS",
    "token_advantages",
    "cached_token_advantages",
    "shared_full_steps",
    "predict_delta",
    "head_step_delta",
    "head_step_deltas",
    "full_step_delta",
    "full_step_deltas",
    "full_steps",
    "FullSteps",
    "first_order_prediction",
    "FirstOrderOptions",
    "FirstOrderProbe",
    "SubspaceSettings",
]

#: The algorithms of the registry (:data:`resrl_analysis.advantages.ALGORITHM_NAMES`), all accepted.
ALGORITHMS: tuple[str, ...] = ALGORITHM_NAMES
#: The default list: the registry's algorithms less the controls of another (``resrl-shuffled``, ...), which
#: ``--algorithms`` adds on request.
DEFAULT_ALGORITHMS: tuple[str, ...] = MAIN_ALGORITHMS
_CONTROLS = tuple(a for a in ALGORITHMS if a not in DEFAULT_ALGORITHMS)

#: Groups that take the real (head and whole-model) steps by default: the first this many.
REAL_STEP_GROUPS = 4

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
    >>> from resrl_analysis.probe_sets import ProbeGroup
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
    hidden_own = None
    if "hidden_own" in algo.needs:
        if o.resrl_layer != "penultimate" or fwd.penultimate_own is None:
            raise ValueError(f"{algorithm} needs the penultimate state at the tokens' own positions (the probes keep "
                             "it for resrl_layer='penultimate', with keep_hidden=True)")
        hidden_own = fwd.penultimate_own
    if {"head_input", "logits"} & algo.needs and (fwd.logits is None or fwd.head_input is None):
        raise ValueError(f"{algorithm} advantages need logits and head inputs (keep_hidden=True, keep_logits=True)")
    G = fwd.mask.shape[0]
    inp = AlgoInputs(
        # The group's own id: ResRL's per-group draws then match the trainer's for the same group and seed.
        rewards=fwd.rewards.float(), group_ids=torch.full((G,), fwd.group.group_id, device=fwd.mask.device),
        response_ids=fwd.labels, response_mask=fwd.mask, params=o, hidden=hidden, head_input=fwd.head_input,
        logits=fwd.logits, generator=torch.Generator().manual_seed(seed), hidden_own=hidden_own,
        # NTHR's Gram is the probes' shared one: computed once per group, not again inside the registry.
        grams=fwd.grams() if "logits" in algo.needs and o.temperature == 1.0 else None,
    )
    return algo.fn(inp).token_advantages.float()  # (G, T)


def cached_token_advantages(fwd: GroupForward, algorithm: str, options: AdvantageParams | None = None, *,
                            seed: int = 0) -> Tensor:
    """:func:`token_advantages`, computed once per forward, algorithm, parameters and seed (the probes of a pass
    that read the same forward share them; :meth:`GroupForward.release` drops them)."""
    key = ("advantages", algorithm, repr(options or PROBE_PARAMS), seed)
    if key not in fwd._cache:
        fwd._cache[key] = token_advantages(fwd, algorithm, options, seed=seed)
    return fwd._cache[key]


def shared_full_steps(model: nn.Module, fwd: GroupForward, named: Sequence[tuple[str, Tensor]], lr: float, *,
                      pad_id: int = 0, micro_batch: int | None = 4, head_pass: _HeadPass | None = None) -> FullSteps:
    """:func:`full_steps` with entropies for (algorithm, advantages) pairs, each computed once per forward, step
    size and micro-batch: the ``first_order`` and ``entropy_dynamics`` probes of one pass share the whole-model
    steps (the costly part of both). ``head_pass`` (for exactly ``named``) is used when none is cached."""
    cache = fwd._cache.setdefault("full_steps", {})

    def hit(name: str, adv: Tensor) -> tuple | None:
        got = cache.get((name, lr, micro_batch))
        return got if got is not None and torch.equal(got[0], adv) else None

    missing = [k for k, (name, adv) in enumerate(named) if hit(name, adv) is None]
    if missing:
        fs = full_steps(model, fwd, [named[k][1] for k in missing], lr, pad_id=pad_id, micro_batch=micro_batch,
                        head_pass=head_pass if len(missing) == len(named) else None, entropy=True)
        for j, k in enumerate(missing):
            assert fs.entropy_after is not None
            cache[(named[k][0], lr, micro_batch)] = (named[k][1], fs.logp_delta[:, j], fs.entropy_after[..., j])
    got = [hit(name, adv) for name, adv in named]
    return FullSteps(torch.stack([g[1] for g in got], 1), torch.stack([g[2] for g in got], -1))  # type: ignore[index]


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


class _HeadPass(NamedTuple):
    """What one closed-form pass over the head gives for n advantage vectors of one group (see
    :func:`_head_pass`): head-only Δ log π per response (G, n) or None, and for the whole-model step
    the head's descent directions ``S`` (n, V, d), the bias's ``s_b`` (n, V) or None, the per-token
    ``D`` = (e_y − p)ᵀ W (N, d) and the token layout (``row`` (N,), ``Z``); with ``entropy`` the head-only
    step's ΔH of every token (N, n), tokens row-major (:meth:`GroupForward.tokens` order)."""

    head_delta: Tensor | None
    S: Tensor | None
    s_b: Tensor | None
    D: Tensor | None
    row: Tensor
    Z: int
    entropy_delta: Tensor | None = None


def _entropy_accumulate(lse: Tensor, acc: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """One vocabulary chunk ``z`` (..., c) into a running (log-sum-exp, E_p[z]) pair, so that after the last
    chunk H = lse − E_p[z] (the softmax's entropy, −Σ p log p = lse − Σ p z) without a second pass."""
    cl = torch.logsumexp(z, -1)  # (...,) the chunk's log-sum-exp
    cw = (torch.exp(z - cl[..., None]) * z).sum(-1)  # (...,) E[z] under the chunk's own softmax
    new = torch.logaddexp(lse, cl)
    acc = acc * torch.exp(lse - new) + cw * torch.exp(cl - new)
    return new, acc


def _linear_head(head: nn.Module) -> tuple[Tensor, Tensor | None]:
    W = head.weight.detach()  # (V, d)
    b = head.bias.detach() if getattr(head, "bias", None) is not None else None  # (V,)
    return W, b


@torch.no_grad()
def _head_pass(fwd: GroupForward, advantages: Sequence[Tensor], lr: float, head: nn.Module, *,
               dtype: torch.dtype | None = None, head_step: bool = True, for_full_step: bool = False,
               memory_budget_mb: float = 64.0, entropy: bool = False) -> _HeadPass:
    """Every head quantity of the real steps of n algorithms, in two passes over vocabulary chunks.

    The head-only step's gradient is exact in closed form: for L = −(1/Z) Σ_n a_n log p_n[y_n],
    −∂L/∂W = (1/Z) (E − P)ᵀ diag(a) H, so ΔW_k = (η/Z) S_k with S_k = (E − P)ᵀ diag(a_k) H. A vocabulary
    chunk's rows of S_k need only that chunk of P (given the log-sum-exp of a first pass), so per chunk:
    z = H W_cᵀ (+ b_c) once, all algorithms' S_k[c] by one stacked product (E − P)_cᵀ [a_1 ⊙ H | … | a_n ⊙ H],
    then their after-step logits z + H ΔW_k[c]ᵀ by one more and an online log-sum-exp: no autograd, no
    (N, V) tensor, and the shared work (z, P) done once for every algorithm instead of once each. With
    ``entropy`` the same passes also carry E_p[z] before and after (:func:`_entropy_accumulate`), giving each
    token's realised ΔH of the head-only step.
    """
    G = fwd.mask.shape[0]
    tok = fwd.tokens(torch.arange(G, device=fwd.mask.device), with_logits=False)
    cdt = dtype or _compute_dtype(tok["h"])
    h, y, row = tok["h"].to(cdt), tok["y"], tok["row"]  # (N, d), (N,), (N,)
    W, b = _linear_head(head)
    W, b = W.to(cdt), (b.to(cdt) if b is not None else None)  # (V, d), (V,)
    dev = h.device
    N, d = h.shape
    V = W.shape[0]
    n = len(advantages)
    A = torch.stack([a.to(dev)[fwd.mask].to(cdt) for a in advantages], 1)  # (N, n)
    B, C = _advantage_basis(A, row, G)  # A = B C exactly: (N, nb), (nb, n), nb ≤ n
    nb = B.shape[1]
    Hb = (B[:, :, None] * h[:, None, :]).reshape(N, nb * d)  # (N, nb·d): b_j ⊙ H side by side
    scale = lr / N
    # Live per chunk: z, E − P and exp temporaries (N, c), after-step logits and their exp (N, n, c).
    item = torch.finfo(cdt).bits // 8
    ent = entropy and head_step  # the entropies' exp and product temporaries: two more (N, n, c)
    c = int(max(1, min(V, memory_budget_mb * 2**20 // max(1, (3 + 2 * n + 2 * n * ent) * N * item))))

    def logits_chunk(v0: int) -> Tensor:
        z = h @ W[v0 : v0 + c].T  # (N, c)
        return z + b[v0 : v0 + c] if b is not None else z

    def at_y(z: Tensor, v0: int) -> tuple[Tensor, Tensor]:
        inside = (y >= v0) & (y < v0 + z.shape[-1])  # (N,)
        return inside, (y - v0).clamp(0, z.shape[-1] - 1)

    lse0 = torch.full((N,), float("-inf"), dtype=cdt, device=dev)
    zy0 = torch.zeros(N, dtype=cdt, device=dev)
    e_lse0, e_acc0 = lse0.clone(), torch.zeros(N, dtype=cdt, device=dev)  # entropy before: lse and E_p[z]
    for v0 in range(0, V, c):
        z = logits_chunk(v0)  # (N, c)
        lse0 = torch.logaddexp(lse0, torch.logsumexp(z, -1))
        if ent:
            e_lse0, e_acc0 = _entropy_accumulate(e_lse0, e_acc0, z)
        inside, j = at_y(z, v0)
        zy0 = torch.where(inside, z.gather(1, j[:, None]).squeeze(1), zy0)
    lse1 = torch.full((N, n), float("-inf"), dtype=cdt, device=dev)
    zy1 = torch.zeros(N, n, dtype=cdt, device=dev)
    e_lse1, e_acc1 = lse1.clone(), torch.zeros(N, n, dtype=cdt, device=dev)  # entropy after the step
    S = torch.empty(n, V, d, dtype=head.weight.dtype, device=dev) if for_full_step else None  # (n, V, d)
    s_b = torch.empty(n, V, dtype=cdt, device=dev) if for_full_step and b is not None else None  # (n, V)
    D = torch.zeros(N, d, dtype=cdt, device=dev) if for_full_step else None  # (N, d)
    for v0 in range(0, V, c):
        z = logits_chunk(v0)  # (N, c)
        cc = z.shape[1]
        r = torch.exp(z - lse0[:, None]).neg_()  # (N, c): −P, then + E (the one-hot of y)
        inside, j = at_y(z, v0)
        idx = inside.nonzero().squeeze(-1)
        r[idx, j[idx]] += 1.0
        SB = (r.T @ Hb).view(cc, nb, d)  # (c, nb, d): the basis directions' rows of S by one product
        if for_full_step:
            S[:, v0 : v0 + cc] = torch.einsum("cjd,jk->kcd", SB, C).to(S.dtype)  # type: ignore[index]  # (n, c, d)
            D += r @ W[v0 : v0 + cc]  # (N, d)
            if s_b is not None:
                s_b[:, v0 : v0 + cc] = (A.T @ r)  # (n, c)
        if head_step:
            Y = (h @ SB.reshape(cc * nb, d).T).view(N, cc, nb)  # (N, c, nb): H S_j[c]ᵀ of the basis
            dz = (Y @ C).transpose(1, 2)  # (N, n, c): H S_k[c]ᵀ = Σ_j C_jk H S_j[c]ᵀ (linear in the advantages)
            z1 = z[:, None, :] + scale * dz  # (N, n, c) after-step logits (the bias is not stepped)
            lse1 = torch.logaddexp(lse1, torch.logsumexp(z1, -1))
            if ent:
                e_lse1, e_acc1 = _entropy_accumulate(e_lse1, e_acc1, z1)
            zy1 = torch.where(inside[:, None], z1.gather(2, j[:, None, None].expand(N, n, 1)).squeeze(2), zy1)
            del Y, dz, z1
        del z, r, SB
    head_delta = None
    if head_step:
        lp_delta = (zy1 - lse1) - (zy0 - lse0)[:, None]  # (N, n)
        head_delta = torch.zeros(G, n, dtype=cdt, device=dev).index_add_(0, row, lp_delta)  # (G, n)
    ent_delta = (e_lse1 - e_acc1) - (e_lse0 - e_acc0)[:, None] if ent else None  # (N, n) H after − H before
    return _HeadPass(head_delta, S, s_b, D, row, N, ent_delta)


def _advantage_basis(A: Tensor, row: Tensor, G: int) -> tuple[Tensor, Tensor]:
    """An exact factorisation A = B C of the (N, n) token advantages of n algorithms, with fewer columns
    where it can: the head steps' products cost one column each, and they are linear in the advantages.

    A column constant within every response (GRPO, PSR, NSR, W-REINFORCE) is a combination of the
    indicators of the responses' classes (responses with equal advantages in all such columns: with
    binary rewards, the positives and the negatives), with its own values as coefficients, so no rounding
    enters; a token-level column (ResRL, NTHR) stays its own. Returns (B (N, nb), C (nb, n)), or (A, I)
    when that is not smaller.

    >>> A = torch.tensor([[1.0, 2.0, 0.5], [1.0, 2.0, 0.7], [-1.0, 0.0, 0.9]])
    >>> B, C = _advantage_basis(A, torch.tensor([0, 0, 1]), 2)
    >>> B.shape, bool(torch.equal(B @ C, A))
    (torch.Size([3, 3]), True)
    """
    N, n = A.shape
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    if N == 0:
        return A, eye
    idx = row[:, None].expand(N, n)
    hi = torch.full((G, n), float("-inf"), dtype=A.dtype, device=A.device).scatter_reduce(0, idx, A, "amax")
    lo = torch.full((G, n), float("inf"), dtype=A.dtype, device=A.device).scatter_reduce(0, idx, A, "amin")
    present = torch.zeros(G, dtype=torch.bool, device=A.device)
    present[row] = True
    resp_level = (hi[present] == lo[present]).all(0)  # (n,) constant within every response
    kr, kt = resp_level.nonzero().squeeze(1), (~resp_level).nonzero().squeeze(1)
    if len(kr) == 0:
        return A, eye
    vals, inv = torch.unique(hi[present][:, kr], dim=0, return_inverse=True)  # (u, |kr|): response classes
    cls = torch.zeros(G, dtype=torch.long, device=A.device)
    cls[present] = inv  # (G,) class of each response with tokens
    if len(vals) + len(kt) >= n:
        return A, eye
    B = torch.cat([torch.nn.functional.one_hot(cls[row], len(vals)).to(A.dtype), A[:, kt]], 1)  # (N, u + |kt|)
    C = torch.zeros(B.shape[1], n, dtype=A.dtype, device=A.device)  # (nb, n)
    C[: len(vals), kr] = vals
    C[len(vals) + torch.arange(len(kt), device=A.device), kt] = 1.0
    return B, C


def _head_inputs_with_graph(model: nn.Module, rows: PackedRows) -> Tensor:
    """The head inputs (B, Tr, d) at the positions that predict response tokens, with the body's graph,
    from a forward stopped before the head (its (B, Tr, V) logits are never computed)."""
    tr = rows.response_len
    with stop_at_head(model, slice(-(tr + 1), -1)) as store:  # counted from the end, as response_forward does
        model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, position_ids=rows.position_ids,
              use_cache=False)
    return store["head_input"]  # (B, Tr, d)


def _closed_form_head_ok(model: nn.Module, fwd: GroupForward) -> bool:
    """Whether the model's logits are its head's W h + b (no soft-capping or scaling after the head), checked
    on a few tokens of the forward: the closed-form head gradient needs it."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or fwd.logits is None or fwd.head_input is None:
        return False
    m = fwd.mask
    h, z = fwd.head_input[m][:8], fwd.logits[m][:8]  # (k, d), (k, V)
    with torch.no_grad():
        ref = head(h.to(head.weight.dtype)).to(z.dtype)  # (k, V)
    low = torch.finfo(z.dtype).bits < 32
    return bool(torch.allclose(ref, z, rtol=2e-2 if low else 1e-4, atol=2e-2 if low else 1e-4))


def full_step_deltas(model: nn.Module, fwd: GroupForward, advantages: Sequence[Tensor], lr: float, *,
                     pad_id: int = 0, micro_batch: int | None = None, use_checkpointing: bool = True,
                     head_pass: _HeadPass | None = None) -> Tensor:
    """Real Δ log π(y_i) (G, n) after one SGD step of size ``lr`` on every trainable parameter, for each of
    n advantage tensors (G, T).

    The parameters are copied before the steps and restored afterwards (also on error), so the model is
    unchanged on return. Same loss as the prediction (token-mean over the group). Where the model's
    logits are its head's W h + b (checked on the forward's logits), the head's gradient is taken in closed
    form for all n algorithms at once (:func:`_head_pass`, shared with the head-only step) and the body's by
    backpropagating −(a/Z)·(e_y − p)ᵀW from the head inputs of a forward stopped before the head, ``micro_batch``
    responses at a time with activation checkpointing (:func:`~.capture.checkpointing`), so peak activation
    memory is one micro-batch's layer inputs. Otherwise each algorithm takes the autograd path of the whole
    model (forward and backward of every micro-batch). Log π before the step is the forward's own.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from resrl_analysis.probe_sets import ProbeGroup
    >>> from resrl_analysis.probes.capture import forward_group
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)).eval()
    >>> f = forward_group(m, ProbeGroup(0, (1, 5), ((6, 2), (7,)), (1.0, 0.0)))
    >>> w = m.lm_head.weight.clone()
    >>> d = full_step_deltas(m, f, [token_advantages(f, a) for a in ("psr", "nsr")], 0.1)
    >>> d.shape, bool(torch.equal(w, m.lm_head.weight))  # the model is restored
    (torch.Size([2, 2]), True)
    """
    return full_steps(model, fwd, advantages, lr, pad_id=pad_id, micro_batch=micro_batch,
                      use_checkpointing=use_checkpointing, head_pass=head_pass).logp_delta


class FullSteps(NamedTuple):
    """Real whole-model SGD steps of n advantage tensors: ``logp_delta`` Δ log π(y_i) (G, n); with ``entropy``,
    ``entropy_after`` (G, T, n), each token's entropy after the step (0 on padding; before: the forward's)."""

    logp_delta: Tensor
    entropy_after: Tensor | None = None


def full_steps(model: nn.Module, fwd: GroupForward, advantages: Sequence[Tensor], lr: float, *,
               pad_id: int = 0, micro_batch: int | None = None, use_checkpointing: bool = True,
               head_pass: _HeadPass | None = None, entropy: bool = False) -> FullSteps:
    """:func:`full_step_deltas` (which says how), and with ``entropy`` every token's entropy after each step
    (the after-step forward computes it too).

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from resrl_analysis.probe_sets import ProbeGroup
    >>> from resrl_analysis.probes.capture import forward_group
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)).eval()
    >>> f = forward_group(m, ProbeGroup(0, (1, 5), ((6, 2), (7,)), (1.0, 0.0)))
    >>> r = full_steps(m, f, [token_advantages(f, "nsr")], 0.1, entropy=True)
    >>> r.logp_delta.shape, r.entropy_after.shape, float(r.entropy_after[1, 1, 0])  # padding holds 0
    (torch.Size([2, 1]), torch.Size([2, 2, 1]), 0.0)
    """
    batch = group_batch(fwd.group, model_device(model), pad_id)
    mask = batch.mask
    G, T = mask.shape
    mb = max(1, micro_batch or G)
    n = len(advantages)
    if head_pass is None and not _closed_form_head_ok(model, fwd):
        each = [_full_step_autograd(model, batch, a, lr, mb, use_checkpointing, entropy) for a in advantages]
        return FullSteps(torch.stack([d for d, _ in each], 1),
                         torch.stack([e for _, e in each], -1) if entropy else None)  # type: ignore[misc]
    head = model.get_output_embeddings()
    hp = head_pass or _head_pass(fwd, advantages, lr, head, head_step=False, for_full_step=True)
    assert hp.S is not None and hp.D is not None
    params = [p for p in model.parameters() if p.requires_grad]
    W, b = head.weight, getattr(head, "bias", None)
    Dg = torch.zeros(G, T, hp.D.shape[1], dtype=hp.D.dtype, device=mask.device)  # (G, T, d)
    Dg[mask] = hp.D.to(mask.device)
    lp0 = (fwd.logp.to(mask.device) * mask).sum(1).float()  # (G,) the forward's log π (0 on padding)
    saved = [p.detach().clone() for p in params]
    out = torch.zeros(G, n, dtype=torch.float32, device=mask.device)
    ent_after = torch.zeros(G, T, n, dtype=torch.float32, device=mask.device) if entropy else None  # (G, T, n)
    try:
        for k, adv in enumerate(advantages):
            a = adv.to(mask.device).to(Dg.dtype)  # (G, T)
            grads: list[Tensor | None] = [None] * len(params)
            with checkpointing(model, enable=use_checkpointing), torch.enable_grad():
                for s in range(0, G, mb):
                    i = slice(s, s + mb)
                    h = _head_inputs_with_graph(model, row_slice(batch.rows, i))  # (mb, T, d)
                    if not h.requires_grad:
                        break  # only the head trains: its gradient is the closed form alone
                    gh = (-a[i, :, None] / hp.Z * Dg[i]).to(h.dtype)  # (mb, T, d) ∂L/∂h
                    part = torch.autograd.grad(h, params, grad_outputs=gh, allow_unused=True)
                    grads = [g if acc is None else (acc if g is None else acc + g) for acc, g in zip(grads, part)]
                    del h, gh, part
            with torch.no_grad():
                for p, g in zip(params, grads):
                    if g is not None:
                        p.add_(g, alpha=-lr)
                    if p is W:  # −lr ∂L/∂W = (lr/Z) S_k; a tied embedding adds its own part above
                        p.add_(hp.S[k].to(p.dtype), alpha=lr / hp.Z)
                    elif b is not None and p is b and hp.s_b is not None:
                        p.add_(hp.s_b[k].to(p.dtype), alpha=lr / hp.Z)
                del grads
                for s in range(0, G, mb):
                    i = slice(s, s + mb)
                    fo = response_forward(model, row_slice(batch.rows, i), entropy=entropy)
                    lp = fo.logp  # (mb, T)
                    out[i, k] = (lp * mask[i, : lp.shape[1]]).sum(1).float() - lp0[i]
                    if ent_after is not None and fo.entropy is not None:
                        ent_after[i, : lp.shape[1], k] = fo.entropy.float()
                for p, s_ in zip(params, saved):
                    p.copy_(s_)
    finally:
        with torch.no_grad():
            for p, s_ in zip(params, saved):
                p.copy_(s_)
    return FullSteps(out, ent_after)


def _full_step_autograd(model: nn.Module, batch: GroupBatch, adv: Tensor, lr: float, mb: int,
                        use_checkpointing: bool, entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """The whole-model step by autograd through the whole model (any head): Δ log π(y_i) (G,), and with
    ``entropy`` the entropies after the step (G, T)."""
    mask = batch.mask
    adv = adv.to(mask.device)
    G = mask.shape[0]
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
    ent = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device) if entropy else None  # (G, T)
    try:
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p.add_(g, alpha=-lr)
            for s in range(0, G, mb):
                i = slice(s, s + mb)
                fo = response_forward(model, row_slice(batch.rows, i), entropy=entropy)
                lp = fo.logp  # (mb, T)
                lp1[i] = (lp * mask[i, : lp.shape[1]]).sum(1).float()
                if ent is not None and fo.entropy is not None:
                    ent[i, : lp.shape[1]] = fo.entropy.float()
    finally:
        with torch.no_grad():
            for p, s_ in zip(params, saved):
                p.copy_(s_)
    return lp1 - lp0, ent


def head_step_delta(fwd: GroupForward, advantages: Tensor, lr: float, head: nn.Module, *,
                    dtype: torch.dtype | None = None) -> Tensor:
    """Real Δ log π(y_i) (G,) after one SGD step of size ``lr`` on the head matrix alone.

    The head inputs stay fixed (the body is frozen) and logits are recomputed as W h (+ bias); the
    bias is not stepped. The gradient is exact in closed form, (1/Z)(E − P)ᵀ diag(a) H (no autograd,
    :func:`_head_pass`), and the after-step log-probs come from W h + H ΔWᵀ in vocabulary chunks.
    ``dtype`` (default: the head input's, at least float32) is the precision of this check: float64
    shows the first-order agreement down to small steps.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from resrl_analysis.probe_sets import ProbeGroup
    >>> from resrl_analysis.probes.capture import forward_group
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)).eval()
    >>> f = forward_group(m, ProbeGroup(0, (1, 5), ((6, 2), (7,)), (1.0, 0.0)))
    >>> d = head_step_delta(f, token_advantages(f, "psr"), 1.0, m.get_output_embeddings())
    >>> d.shape, bool(d[0] > 0)  # PSR raises the positive response's likelihood
    (torch.Size([2]), True)
    """
    hp = _head_pass(fwd, [advantages], lr, head, dtype=dtype)
    return hp.head_delta[:, 0]  # type: ignore[index]


def head_step_deltas(fwd: GroupForward, advantages: Sequence[Tensor], lr: float, head: nn.Module, *,
                     dtype: torch.dtype | None = None) -> Tensor:
    """:func:`head_step_delta` for n advantage tensors at once → (G, n); the work they share (the head's
    logits and probabilities) is done once.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from resrl_analysis.probe_sets import ProbeGroup
    >>> from resrl_analysis.probes.capture import forward_group
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)).eval()
    >>> f = forward_group(m, ProbeGroup(0, (1, 5), ((6, 2), (7,)), (1.0, 0.0)))
    >>> advs = [token_advantages(f, a) for a in ("psr", "nsr")]
    >>> d = head_step_deltas(f, advs, 1.0, m.get_output_embeddings())
    >>> d.shape, bool(torch.allclose(d[:, 1], head_step_delta(f, advs[1], 1.0, m.get_output_embeddings())))
    (torch.Size([2, 2]), True)
    """
    return _head_pass(fwd, list(advantages), lr, head, dtype=dtype).head_delta  # type: ignore[return-value]


def full_step_delta(model: nn.Module, fwd: GroupForward, advantages: Tensor, lr: float, *,
                    pad_id: int = 0, micro_batch: int | None = None, use_checkpointing: bool = True) -> Tensor:
    """Real Δ log π(y_i) (G,) after one SGD step of size ``lr`` on every trainable parameter
    (:func:`full_step_deltas` for one advantage tensor, which says how).

    The parameters are copied before the step and restored afterwards (also on error), so the
    model is unchanged on return. The gradient is accumulated over ``micro_batch`` responses at a
    time (default: all at once), with activation checkpointing where it cannot change the result.
    """
    return full_step_deltas(model, fwd, [advantages], lr, pad_id=pad_id, micro_batch=micro_batch,
                            use_checkpointing=use_checkpointing)[:, 0]


def first_order_prediction(
    model: nn.Module,
    probe_set: ProbeSet,
    *,
    algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
    lr: float = 1e-3,
    head_step: bool = True,
    full_step: bool = False,
    step: int = 0,
    forwards: Sequence[GroupForward] | None = None,
    options: AdvantageParams | None = None,
    head_step_dtype: torch.dtype | None = None,
    seed: int = 0,
    step_algorithms: Sequence[str] | None = None,
    step_groups: int | Sequence[int] | None = REAL_STEP_GROUPS,
    micro_batch: int | None = 4,
    whole_model: WholeModelJobs | None = None,
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
    ``real_step_group_ids``); rows outside it have NaN ``actual_*``. With ``whole_model`` (a model sharded across
    ranks) the whole-model steps are deferred to it: every rank runs them together after the group batches (by
    autograd through the whole model) and the ``actual_full`` column is filled then.

    Every group is probed (a group without negatives has no negative contribution; GRPO gives a
    group without a mixed reward zero advantages); ``groups`` records each group's status.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from resrl_analysis.probe_sets import ProbeGroup
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
        advs = [cached_token_advantages(fwd, alg, options, seed=seed) for alg in algorithms]
        from_pos, from_neg = predict_delta(fwd, advs, lr)  # (G, n) each
        n_tok = fwd.mask.sum(1).tolist()
        is_pos = fwd.is_positive.tolist()
        fp_all, fn_all = from_pos.tolist(), from_neg.tolist()
        # The real steps of every stepped algorithm at once: one closed-form pass over the head gives the
        # head-only steps and the head's part of the whole-model steps (their gradient on W is the same).
        ks = [k for k, alg in enumerate(algorithms) if alg in step_algs] if g.group_id in stepped else []
        act_head: dict[int, list[float]] = {}
        act_full: dict[int, list[float]] = {}
        if ks and (head_step or full_step):
            sub = [advs[k] for k in ks]
            if full_step and whole_model is not None:  # sharded: with every rank, later
                lp0 = (fwd.logp * fwd.mask).sum(1).float()  # (G,) the forward's log π, as full_step_deltas uses
                whole_model.defer(WholeModelJob("step_deltas", g, sub, lr=lr, micro_batch=micro_batch or 4,
                                                logp0=lp0, pad_id=pad_id),
                                  _fill_steps(step, g.group_id, [algorithms[k] for k in ks]))
            closed = full_step and whole_model is None and _closed_form_head_ok(model, fwd)
            hp = (_head_pass(fwd, sub, lr, head, dtype=head_step_dtype, head_step=head_step, for_full_step=closed)
                  if head_step or closed else None)
            if head_step:
                act_head = dict(zip(ks, hp.head_delta.T.tolist()))  # type: ignore[union-attr]
            if full_step and whole_model is None:  # with the entropies after each step (entropy_dynamics reads them)
                full = shared_full_steps(model, fwd, [(algorithms[k], advs[k]) for k in ks], lr, pad_id=pad_id,
                                         micro_batch=micro_batch, head_pass=hp if closed else None).logp_delta
                act_full = dict(zip(ks, full.T.tolist()))  # (G, len(ks))
            del hp
        for k, alg in enumerate(algorithms):
            grows.append({"step": step, "group_id": g.group_id, "prompt_uid": g.prompt_uid, "algorithm": alg,
                          "status": g.status, "n_pos": g.n_positive, "n_neg": g.n_negative,
                          "loss_tokens": int(fwd.mask.sum())})
            ah, af = act_head.get(k), act_full.get(k)
            for i in range(g.n_responses):  # G rows per (group, algorithm): no per-token loop
                fp, fn = fp_all[i][k], fn_all[i][k]
                rows.append({"step": step, "group_id": g.group_id, "prompt_uid": g.prompt_uid, "algorithm": alg,
                             "response_index": i, "is_positive": bool(is_pos[i]), "n_tokens": int(n_tok[i]),
                             "lr": lr, "predicted": fp + fn, "predicted_from_pos": fp, "predicted_from_neg": fn,
                             "actual_head": float(ah[i]) if ah is not None else float("nan"),
                             "actual_full": float(af[i]) if af is not None else float("nan")})
    meta = {"lr": lr, "algorithms": list(algorithms), "loss": "token-mean over the group's response tokens",
            "head_step": head_step, "full_step": full_step, "pos_weight": options.pos_weight,
            "w_lambda": options.w_reinforce_lambda, "nthr_beta": options.nthr_beta,
            "resrl_layer": options.resrl_layer, "temperature": options.temperature,
            "probe_set": probe_set.describe(), "skipped": [],
            "real_step_algorithms": step_algs if (head_step or full_step) else [],
            "real_step_group_ids": sorted(stepped) if (head_step or full_step) else [],
            "real_step_micro_batch": micro_batch}
    return FirstOrderResult(predictions=pd.DataFrame(rows), groups=pd.DataFrame(grows), meta=meta)


def _fill_steps(step: int, group_id: int, algorithms: list[str]):
    """The ``fill`` of a deferred whole-model step job: column k of its (G, n) answer is ``actual_full`` of the
    group's rows for ``algorithms[k]`` (in response order)."""
    fills = [whole_model_fill("predictions", {"step": step, "group_id": group_id, "algorithm": alg},
                              lambda ans, k=k: {"actual_full": ans[:, k].tolist()}) for k, alg in enumerate(algorithms)]

    def fill(part: FirstOrderResult, answer: Tensor) -> FirstOrderResult:
        for f in fills:
            part = f(part, answer)
        return part

    return fill


# ----------------------------------------------------------------------------- registration


@dataclass(frozen=True)
class SubspaceSettings:
    """The ResRL subspace settings the ``first_order`` (ResRL advantages) and ``subspace`` probes share."""

    rank: int = option(PROBE_PARAMS.resrl.rank, f"subspace rank bound k (default {PROBE_PARAMS.resrl.rank})")
    svd: str = option(PROBE_PARAMS.resrl.svd, f"subspace SVD (default {PROBE_PARAMS.resrl.svd})",
                      choices=("exact", "lowrank"))

    def __post_init__(self) -> None:
        check_positive("subspace", rank=self.rank)
        if self.svd not in ("exact", "lowrank"):
            raise ValueError(f"--svd must be exact or lowrank, got {self.svd!r}")

    def params(self) -> AdvantageParams:
        """The probes' :data:`PROBE_PARAMS` with this rank and SVD."""
        return dataclasses.replace(PROBE_PARAMS, resrl=dataclasses.replace(PROBE_PARAMS.resrl, rank=self.rank,
                                                                           svd=self.svd))


@dataclass(frozen=True)
class FirstOrderOptions(SubspaceSettings):
    """Options of the ``first_order`` probe."""

    algorithms: list[str] = option(list(DEFAULT_ALGORITHMS), f"advantages for the first-order prediction (default: "
                                   f"{','.join(DEFAULT_ALGORITHMS)}; also: {','.join(_CONTROLS)})", csv=str)
    lr: float = option(1e-3, "SGD step size η of the first-order prediction (default 1e-3)")

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = sorted(set(self.algorithms) - set(ALGORITHMS))
        if bad:
            raise ValueError(f"unknown algorithms {bad}; choose from {','.join(ALGORITHMS)}")


@register_probe
class FirstOrderProbe(Probe):
    """:func:`first_order_prediction` on each group batch; the real steps on the probe set's first groups."""

    name = "first_order"
    summary = ("first-order (head-only) prediction of one SGD step's Δ log π(y), split into the positive and "
               "negative contributions, beside real head-only and whole-model steps")
    result = FirstOrderResult
    scope = "groups"
    needs = frozenset({"gram"})
    Options = FirstOrderOptions
    plan_hint = "--full-model-steps none or fewer --algorithms"

    def plan(self, p: PlanInputs) -> dict[str, int]:
        m, N, V, d = p.model, p.N, p.model.vocab, p.model.hidden
        # _head_pass's vocabulary chunks (64 MB), the token advantages' head inputs side by side (N, n·d) and the
        # head inputs themselves, float32.
        n_alg = max(1, len(self.options.algorithms))
        t = {"head pass": min(64 * 2**20, (3 + 2 * n_alg) * N * V * 4) + N * (n_alg + 1) * d * 4}
        if p.full_model and p.sharded:
            # Sharded: autograd through the whole model from the loss (logits and their gradient included) over this
            # rank's block of the group's responses, one gradient shard and one parameter-shard copy.
            t.update({f"whole-model {k}": v for k, v in p.full_step(min(p.micro_batch, p.G), 1).items()})
        elif p.full_model:
            # The whole-model steps keep every algorithm's head direction S_k (n, V, d) in the model's dtype and
            # (e_y − p)ᵀW per token; the body's backward starts at the head inputs, so no logits (or their
            # gradient) are part of the graph; the after-step forward holds one micro-batch's.
            mb = min(p.micro_batch, p.G)
            fs = p.full_step(mb, 1)
            fs.pop("logits grad")
            fs["logits"] = p.logits(mb)
            t.update({"head directions": n_alg * V * d * m.dtype_bytes, "head-input gradients": 2 * N * d * 4})
            t.update({f"whole-model {k}": v for k, v in fs.items()})
        return t

    def on_groups(self, ctx: GroupsContext) -> FirstOrderResult:
        o = self.options
        # The real steps on the probe set's first groups, whatever the group batching.
        step_ids = [g.group_id for g in ctx.all_groups.groups[:REAL_STEP_GROUPS]]
        return first_order_prediction(ctx.model, ctx.probe_set, algorithms=o.algorithms, lr=o.lr, head_step=True,
                                      full_step=ctx.full_model, step=ctx.step, forwards=ctx.forwards,
                                      options=o.params(), seed=ctx.seed, step_groups=step_ids,
                                      whole_model=ctx.whole_model)

    def finish(self, ctx: FinishContext, parts: Sequence[FirstOrderResult]) -> FirstOrderResult:
        return super().finish(ctx, parts).with_meta(full_model_steps=list(ctx.full_model_steps))
