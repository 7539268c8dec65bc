"""Head-gradient interference between tokens, from the factorised form (docs/MATH.md § Factorised head gradient).

For a token with head input h, probabilities p = softmax(W h) and sampled token y, the gradient of
log p[y] with respect to the head matrix W is the rank-one matrix g = (e_y − p) hᵀ. Hence

    <g_a, g_b>_F = <e_a − p_a, e_b − p_b> · <h_a, h_b>
    <e_a − p_a, e_b − p_b> = [y_a = y_b] − p_a[y_b] − p_b[y_a] + <p_a, p_b>

so every pair of two token sets comes from two matrix products (P_a P_bᵀ and H_a H_bᵀ) plus gathers.
No per-token V×d gradient and no (Ta, Tb, V) tensor is ever built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "logit_factor",
    "logit_grad_sqnorm",
    "head_gradient_inner",
    "head_gradient_cosine",
    "head_gradient_sqnorm",
    "entropy_logit_factor",
    "entropy_head_inner",
    "weighted_pair_sum",
    "GroupAlignment",
    "group_gradient_alignment",
    "nthr_scores",
    "nthr_threshold",
    "nthr_eta",
    "NTHRWeights",
    "nthr_token_weights",
    "GroupGrams",
    "group_grams",
    "device_quantiles",
    "streaming_quantiles",
    "row_blocks",
    "block_picks",
    "BLOCK_BYTES",
]


def _check(h: Tensor, p: Tensor, y: Tensor, name: str) -> None:
    if h.ndim != 2 or p.ndim != 2 or y.ndim != 1 or not (h.shape[0] == p.shape[0] == y.shape[0]):
        raise ValueError(
            f"{name}: expected h (T, d), p (T, V), y (T,) with one T, got {tuple(h.shape)}, "
            f"{tuple(p.shape)}, {tuple(y.shape)}"
        )


def _split(p: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(q, s): q = p with its y entry zeroed (T, V), s = Σ q = 1 − p[y] (T,), summed, not subtracted.

    Writing e_y − p = s·e_y − q keeps every term small when p[y] ≈ 1, where the textbook form
    1 − 2p[y] + ||p||² cancels catastrophically in float32 (cosines above 1, zero norms).
    """
    q = p.clone()
    q.scatter_(-1, y[:, None], 0.0)
    return q, q.sum(-1)


def logit_factor(p_a: Tensor, y_a: Tensor, p_b: Tensor, y_b: Tensor) -> Tensor:
    """<e_{y_a} − p_a, e_{y_b} − p_b> for all pairs → (Ta, Tb).

    Computed as s_a s_b [y_a = y_b] − s_a q_b[y_a] − s_b q_a[y_b] + <q_a, q_b> with q = p off its
    sampled token and s = 1 − p[y] (see :func:`_split`): the same value as
    [y_a = y_b] − p_a[y_b] − p_b[y_a] + <p_a, p_b>, without its cancellation.

    >>> p = torch.tensor([[0.5, 0.5]])
    >>> logit_factor(p, torch.tensor([0]), p, torch.tensor([0])).item()
    0.5
    """
    q_a, s_a = _split(p_a, y_a)
    q_b, s_b = _split(p_b, y_b)
    same = (y_a[:, None] == y_b[None, :]).to(p_a.dtype)  # (Ta, Tb)
    qb_ya = q_b[:, y_a].T  # (Ta, Tb): q_b[j, y_a[i]]
    qa_yb = q_a[:, y_b]  # (Ta, Tb): q_a[i, y_b[j]]
    return same * s_a[:, None] * s_b[None, :] - s_a[:, None] * qb_ya - s_b[None, :] * qa_yb + q_a @ q_b.T


def logit_grad_sqnorm(p: Tensor, y: Tensor) -> Tensor:
    """||e_y − p||² = (1 − p[y])² + Σ_{j≠y} p_j² per token → (T,), without cancellation.

    >>> logit_grad_sqnorm(torch.tensor([[0.5, 0.5]]), torch.tensor([1])).item()
    0.5
    """
    q, s = _split(p, y)
    return s * s + (q * q).sum(-1)


def head_gradient_sqnorm(h: Tensor, p: Tensor, y: Tensor) -> Tensor:
    """||∇_W log p[y]||²_F = ||e_y − p||² · ||h||² per token → (T,).

    >>> head_gradient_sqnorm(torch.tensor([[2.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([0])).item()
    2.0
    """
    return logit_grad_sqnorm(p, y) * (h * h).sum(-1)


def head_gradient_inner(h_a: Tensor, p_a: Tensor, y_a: Tensor, h_b: Tensor, p_b: Tensor, y_b: Tensor) -> Tensor:
    """<∇_W log p_a[y_a], ∇_W log p_b[y_b]>_F for all token pairs → (Ta, Tb).

    Args:
        h_a: (Ta, d) head inputs; p_a: (Ta, V) probabilities; y_a: (Ta,) token ids. Same for b.

    >>> g = torch.Generator().manual_seed(0)
    >>> h, p = torch.randn(3, 4, generator=g), torch.softmax(torch.randn(3, 5, generator=g), -1)
    >>> y = torch.tensor([0, 1, 2])
    >>> K = head_gradient_inner(h, p, y, h, p, y)
    >>> bool(torch.allclose(K.diagonal(), head_gradient_sqnorm(h, p, y)))
    True
    """
    _check(h_a, p_a, y_a, "a")
    _check(h_b, p_b, y_b, "b")
    return logit_factor(p_a, y_a, p_b, y_b) * (h_a @ h_b.T)


def head_gradient_cosine(
    h_a: Tensor, p_a: Tensor, y_a: Tensor, h_b: Tensor, p_b: Tensor, y_b: Tensor, eps: float = 1e-12
) -> Tensor:
    """cos(∇_W log p_a[y_a], ∇_W log p_b[y_b]) for all pairs → (Ta, Tb); 0 where a gradient vanishes.

    Equals cos(e_a − p_a, e_b − p_b) · cos(h_a, h_b).

    >>> h = torch.tensor([[1.0, 0.0], [2.0, 0.0]]); p = torch.full((2, 3), 1 / 3); y = torch.tensor([0, 0])
    >>> head_gradient_cosine(h, p, y, h, p, y).round(decimals=5).tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    """
    inner = head_gradient_inner(h_a, p_a, y_a, h_b, p_b, y_b)
    na = head_gradient_sqnorm(h_a, p_a, y_a).clamp(min=0).sqrt()
    nb = head_gradient_sqnorm(h_b, p_b, y_b).clamp(min=0).sqrt()
    denom = na[:, None] * nb[None, :]
    return torch.where(denom > eps, inner / denom.clamp(min=eps), torch.zeros_like(inner))


def entropy_logit_factor(p_a: Tensor, p_b: Tensor, y_b: Tensor) -> Tensor:
    """⟨∂H/∂z (p_a), e_{y_b} − p_b⟩ for all pairs → (Ta, Tb): how token a's entropy moves when its logits move
    along token b's logit gradient (docs/MATH.md § Entropy dynamics).

    With ∂H/∂z_k = −p_k (log p_k + H) this is −p_a[y_b] (log p_a[y_b] + H_a) + ⟨p_a ⊙ log p_a, p_b⟩ +
    H_a ⟨p_a, p_b⟩, from (Ta, V) probabilities directly (the Gram's pass computes it in vocabulary chunks,
    :func:`group_grams` with ``entropy=True``). Not symmetric in a and b.

    >>> p = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    >>> [round(v, 4) for v in entropy_logit_factor(p, p, torch.tensor([0, 0]))[1].tolist()]  # toward token 0
    [-0.1978, -0.0396]
    """
    lp = torch.log(p_a)  # (Ta, V)
    H = -torch.special.xlogy(p_a, p_a).sum(-1)  # (Ta,)
    u = -p_a * (lp + H[:, None])  # (Ta, V) ∂H/∂z, 0 where p is 0
    u = torch.where(p_a > 0, u, torch.zeros_like(u))
    return u[:, y_b] - u @ p_b.T


def entropy_head_inner(h_a: Tensor, p_a: Tensor, h_b: Tensor, p_b: Tensor, y_b: Tensor) -> Tensor:
    """⟨∇_W H_a, ∇_W log p_b[y_b]⟩_F for all pairs → (Ta, Tb): the first-order change of token a's entropy per
    unit step of the head along token b's log-likelihood gradient, ``entropy_logit_factor · ⟨h_a, h_b⟩``.

    Args:
        h_a: (Ta, d) head inputs; p_a: (Ta, V) probabilities; likewise for b, with y_b: (Tb,) token ids.

    >>> g = torch.Generator().manual_seed(0)
    >>> h, p = torch.randn(3, 4, generator=g), torch.softmax(torch.randn(3, 5, generator=g), -1)
    >>> entropy_head_inner(h, p, h, p, torch.tensor([0, 1, 2])).shape
    torch.Size([3, 3])
    """
    _check(h_a, p_a, torch.zeros(h_a.shape[0], dtype=torch.long, device=h_a.device), "a")
    _check(h_b, p_b, y_b, "b")
    return entropy_logit_factor(p_a, p_b, y_b) * (h_a @ h_b.T)


def weighted_pair_sum(
    h_a: Tensor, p_a: Tensor, y_a: Tensor, w_a: Tensor,
    h_b: Tensor, p_b: Tensor, y_b: Tensor, w_b: Tensor,
    *, chunk: int = 1024,
) -> Tensor:
    """Σ_ij w_a[i] w_b[j] <g_a,i, g_b,j> = <Σ w_a g_a, Σ w_b g_b>_F, in row chunks (scalar).

    >>> h = torch.eye(2); p = torch.full((2, 2), 0.5); y = torch.tensor([0, 1]); w = torch.ones(2)
    >>> weighted_pair_sum(h, p, y, w, h, p, y, w).item()
    1.0
    """
    total = torch.zeros((), dtype=torch.promote_types(h_a.dtype, p_a.dtype), device=h_a.device)
    for s in range(0, h_a.shape[0], chunk):
        K = head_gradient_inner(h_a[s : s + chunk], p_a[s : s + chunk], y_a[s : s + chunk], h_b, p_b, y_b)
        total = total + w_a[s : s + chunk] @ K @ w_b
    return total


@dataclass(frozen=True)
class GroupAlignment:
    """Summed head gradients of a group: G⁺ = Σ w⁺ g⁺, G⁻ = Σ w⁻ g⁻ (w⁻ usually the advantage)."""

    inner: float
    """<G⁺, G⁻>_F."""
    cosine: float
    """cos(G⁺, G⁻) (0 when either vanishes)."""
    norm_pos: float
    norm_neg: float


def group_gradient_alignment(
    h_pos: Tensor, p_pos: Tensor, y_pos: Tensor, w_pos: Tensor,
    h_neg: Tensor, p_neg: Tensor, y_neg: Tensor, w_neg: Tensor,
    *, chunk: int = 1024,
) -> GroupAlignment:
    """Inner product and cosine between the weighted summed positive and negative head gradients.

    From Gram-style products only (three weighted pair sums), never from V×d gradients.

    >>> h = torch.eye(2); p = torch.full((2, 2), 0.5); y = torch.tensor([0, 1]); w = torch.ones(2)
    >>> a = group_gradient_alignment(h[:1], p[:1], y[:1], w[:1], h[1:], p[1:], y[1:], -w[1:])
    >>> a.inner, round(a.norm_pos**2, 4)
    (0.0, 0.5)
    """
    inner = weighted_pair_sum(h_pos, p_pos, y_pos, w_pos, h_neg, p_neg, y_neg, w_neg, chunk=chunk)
    npos = weighted_pair_sum(h_pos, p_pos, y_pos, w_pos, h_pos, p_pos, y_pos, w_pos, chunk=chunk).clamp(min=0).sqrt()
    nneg = weighted_pair_sum(h_neg, p_neg, y_neg, w_neg, h_neg, p_neg, y_neg, w_neg, chunk=chunk).clamp(min=0).sqrt()
    denom = float(npos * nneg)
    cos = float(inner) / denom if denom > 1e-30 else 0.0
    return GroupAlignment(inner=float(inner), cosine=cos, norm_pos=float(npos), norm_neg=float(nneg))


def nthr_scores(
    h_neg: Tensor, p_neg: Tensor, y_neg: Tensor, h_pos: Tensor, p_pos: Tensor, y_pos: Tensor,
    *, chunk: int = 1024,
) -> Tensor:
    """NTHR score of each negative token: s⁻ = Σ over the group's positive tokens of <g⁺, g⁻> → (Tn,).

    >>> h = torch.eye(2); p = torch.full((2, 2), 0.5); y = torch.tensor([0, 0])
    >>> nthr_scores(h, p, y, h, p, y).tolist()
    [0.5, 0.5]
    """
    out = torch.zeros(h_neg.shape[0], dtype=torch.promote_types(h_neg.dtype, p_neg.dtype), device=h_neg.device)
    for s in range(0, h_pos.shape[0], chunk):
        out += head_gradient_inner(h_pos[s : s + chunk], p_pos[s : s + chunk], y_pos[s : s + chunk],
                                   h_neg, p_neg, y_neg).sum(0)
    return out


def nthr_threshold(
    h_pos: Tensor, p_pos: Tensor, y_pos: Tensor, pos_response: Tensor, beta: float = 1.0, *, chunk: int = 1024
) -> float:
    """τ = β · min over positive responses of the mean positive-on-positive score of its tokens.

    A positive token's score is its summed inner product with all the group's positive tokens;
    ``pos_response`` (Tp,) says which positive response each token belongs to.

    >>> h = torch.eye(2); p = torch.full((2, 2), 0.5); y = torch.tensor([0, 0])
    >>> nthr_threshold(h, p, y, torch.tensor([0, 1]))
    0.5
    """
    s = nthr_scores(h_pos, p_pos, y_pos, h_pos, p_pos, y_pos, chunk=chunk)  # (Tp,)
    uniq, inv = torch.unique(pos_response, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=s.dtype, device=s.device).index_add_(0, inv, s)
    counts = torch.zeros(len(uniq), dtype=s.dtype, device=s.device).index_add_(0, inv, torch.ones_like(s))
    return beta * float((sums / counts).min())


def nthr_eta(success_rate: float) -> float:
    """NTHR's down-weighting factor η = 2·|0.5 − p̂| for a group with success rate p̂.

    >>> nthr_eta(0.25)
    0.5
    """
    return 2.0 * abs(0.5 - success_rate)


@dataclass(frozen=True)
class NTHRWeights:
    """Output of :func:`nthr_token_weights`: ``weights`` (B, T) multipliers (η on flagged negative
    tokens, 1 elsewhere), ``scores`` (B, T) s⁻ on valid negative tokens (NaN elsewhere), ``flagged``
    (B, T) bool, and one dict per group (``group_id``, ``status``, ``tau``, ``eta``)."""

    weights: Tensor
    scores: Tensor
    flagged: Tensor
    groups: list[dict]


def nthr_token_weights(
    head_input: Tensor,
    logits: Tensor,
    labels: Tensor,
    response_mask: Tensor,
    is_positive: Tensor,
    group_ids: Tensor,
    *,
    beta: float = 1.0,
    temperature: float = 1.0,
    chunk: int = 1024,
    memory_budget_mb: float = 256.0,
    grams: GroupGrams | None = None,
) -> NTHRWeights:
    """NTHR (Deng et al.) token multipliers for a batch, per prompt group.

    A negative token whose score s⁻ (summed head-gradient inner product with the group's positive
    tokens) exceeds τ = β · (smallest mean positive-on-positive score of a positive response) gets
    η = 2|0.5 − p̂| (p̂ the group's success rate); everything else gets 1. Groups without both a
    positive and a negative response keep 1.

    Args:
        head_input: (B, T, d) vectors entering the LM head; logits: (B, T, V) at the same positions
        (probabilities are formed per group, float32); labels: (B, T) the sampled tokens;
        response_mask: (B, T) bool; is_positive: (B,) bool; group_ids: (B,) ints.
        chunk: unused (kept for callers); memory_budget_mb: the vocabulary chunks of :func:`group_grams`.
        grams: the Gram of these very inputs at temperature 1 (:func:`group_grams`), when the caller has it
            already (the probes compute one per group and share it): the batch must then be one group at
            temperature 1, holding the Gram's tokens (a ValueError otherwise). None computes it here.

    >>> g = torch.Generator().manual_seed(0)
    >>> out = nthr_token_weights(torch.randn(4, 3, 8, generator=g), torch.randn(4, 3, 11, generator=g),
    ...     torch.randint(0, 11, (4, 3), generator=g), torch.ones(4, 3, dtype=torch.bool),
    ...     torch.tensor([True, False, False, False]), torch.zeros(4, dtype=torch.long))
    >>> out.groups[0]["eta"], bool(((out.weights == 1) | (out.weights == 0.5)).all())
    (0.5, True)
    """
    from .ops import group_index

    B, T, _ = head_input.shape
    dev = head_input.device
    mask = response_mask.bool()
    if grams is not None and (temperature != 1.0 or len(torch.unique(group_ids)) != 1
                              or grams.y.shape[0] != int(mask.sum())):
        raise ValueError(f"nthr_token_weights: grams is one group's Gram at temperature 1 ({grams.y.shape[0]} "
                         f"tokens); got {len(torch.unique(group_ids))} group(s) with {int(mask.sum())} tokens at "
                         f"temperature {temperature}")
    pos = is_positive.bool().to(dev)
    weights = torch.ones(B, T, dtype=torch.float32, device=dev)
    scores = torch.full((B, T), float("nan"), dtype=torch.float32, device=dev)
    flagged = torch.zeros(B, T, dtype=torch.bool, device=dev)
    groups: list[dict] = []
    uniq, inv = group_index(group_ids.to(dev))
    for gi, gid in enumerate(uniq.tolist()):
        rows = (inv == gi).nonzero().squeeze(-1)
        prow, nrow = rows[pos[rows]], rows[~pos[rows]]
        eta = nthr_eta(len(prow) / len(rows))
        info = {"group_id": gid, "tau": float("nan"), "eta": eta}
        pmask, nmask = mask[prow], mask[nrow]
        if len(prow) == 0 or len(nrow) == 0 or not pmask.any() or not nmask.any():
            info["status"] = "not_mixed"
            groups.append(info)
            continue
        # One Gram of the group's tokens, straight from the logits in vocabulary chunks (no (Tp, V) copies),
        # or the one the caller computed already.
        if grams is not None:
            gr = grams
        else:
            gr = group_grams(head_input, logits, labels, response_mask, is_positive.to(dev), temperature=temperature,
                             rows=torch.cat([prow, nrow]), memory_budget_mb=memory_budget_mb)
        pp = gr.block("pos", "pos").sum(0)  # (Tp,) positive-on-positive scores
        which = gr.row[: gr.n_pos]  # (Tp,) the positive response of each token
        uniq_r, inv_r = torch.unique(which, return_inverse=True)
        sums = torch.zeros(len(uniq_r), dtype=pp.dtype, device=dev).index_add_(0, inv_r, pp)
        counts = torch.zeros(len(uniq_r), dtype=pp.dtype, device=dev).index_add_(0, inv_r, torch.ones_like(pp))
        tau = beta * float((sums / counts).min())
        s = gr.block("pos", "neg").sum(0)  # (Tn,) in the order of nmask (row-major over nrow)
        del gr
        f = s > tau
        wn = torch.ones(len(nrow), T, dtype=torch.float32, device=dev)
        sn = torch.full((len(nrow), T), float("nan"), dtype=torch.float32, device=dev)
        fn = torch.zeros(len(nrow), T, dtype=torch.bool, device=dev)
        wn[nmask] = torch.where(f, torch.full_like(s, eta), torch.ones_like(s)).float()
        sn[nmask], fn[nmask] = s.float(), f
        weights[nrow], scores[nrow], flagged[nrow] = wn, sn, fn
        info.update(status="weighted", tau=tau, n_flagged=int(f.sum()), n_neg_tokens=int(f.numel()))
        groups.append(info)
    return NTHRWeights(weights=weights, scores=scores, flagged=flagged, groups=groups)


# ----------------------------------------------------------------------------- one Gram per group

@dataclass(frozen=True)
class GroupGrams:
    """The head-gradient Gram of one group's valid tokens, positive responses' tokens first.

    ``inner`` (N, N) <g_a, g_b>_F, with the first ``n_pos`` rows/columns the positive tokens (so the
    positive×negative block is the view ``inner[:n_pos, n_pos:]``); ``logit_sqnorm`` (N,) ||e_y − p||²,
    ``rep_sqnorm`` (N,) ||h||²; ``row`` (N,) response index, ``pos`` (N,) position, ``y`` (N,) token id,
    each token in row-major order within the positives and within the negatives. With ``entropy=True``
    (:func:`group_grams`) also ``entropy_inner`` (N, N) and ``entropy`` (N,), from the same pass.
    """

    inner: Tensor
    logit_sqnorm: Tensor
    rep_sqnorm: Tensor
    row: Tensor
    pos: Tensor
    y: Tensor
    n_pos: int
    entropy_inner: Tensor | None = None
    """(N, N) ⟨∇_W H_t, g_j⟩_F: the directional derivative of token t's entropy along token j's head gradient
    (rows t, columns j; :func:`entropy_head_inner`), when built with ``entropy=True``."""
    entropy: Tensor | None = None
    """(N,) the token entropies −Σ p log p of the same pass, when built with ``entropy=True``."""

    @property
    def grad_norm(self) -> Tensor:
        """||g|| = ||e_y − p||·||h|| per token → (N,)."""
        return self.logit_sqnorm.clamp(min=0).sqrt() * self.rep_sqnorm.clamp(min=0).sqrt()

    def block(self, a: str, b: str) -> Tensor:
        """The ``a``×``b`` block of ``inner`` (a view), ``a``, ``b`` in {"pos", "neg", "all"}."""
        cut = {"pos": slice(0, self.n_pos), "neg": slice(self.n_pos, None), "all": slice(None)}
        return self.inner[cut[a], cut[b]]

    def cosine(self, a: str = "pos", b: str = "neg", eps: float = 1e-12, *, rows: slice | None = None) -> Tensor:
        """cos(g_a, g_b) of a block (0 where a gradient vanishes), as :func:`head_gradient_cosine`;
        ``rows`` (a slice of the block's rows) computes only those, for row-block streaming."""
        cut = {"pos": slice(0, self.n_pos), "neg": slice(self.n_pos, None), "all": slice(None)}
        rows = rows or slice(None)
        n = self.grad_norm
        denom = n[cut[a]][rows, None] * n[None, cut[b]]  # (Ta, Tb)
        K = self.block(a, b)[rows]
        return torch.where(denom > eps, K / denom.clamp(min=eps), torch.zeros_like(K))


#: The size of one (rows, columns) block of a positive×negative matrix when a probe streams it row block by
#: row block (about ten such temporaries are alive at once).
BLOCK_BYTES = 32 * 2**20


def row_blocks(n_rows: int, n_cols: int, itemsize: int = 4, block_bytes: int | None = None) -> list[slice]:
    """Row slices covering ``n_rows`` so that a (rows, ``n_cols``) block of ``itemsize`` bytes is at most
    ``block_bytes`` (default :data:`BLOCK_BYTES`; at least one row).

    >>> row_blocks(5, 4, itemsize=4, block_bytes=32)
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    rb = max(1, (BLOCK_BYTES if block_bytes is None else block_bytes) // max(1, n_cols * itemsize))
    return [slice(r, min(n_rows, r + rb)) for r in range(0, n_rows, rb)]


def block_picks(pick: Tensor, rows: slice, n_cols: int) -> tuple[Tensor, Tensor]:
    """Which of the flat indices ``pick`` into a (·, ``n_cols``) matrix fall in the row block ``rows``:
    (their positions in ``pick``, their flat offsets within the block), to gather a sample while streaming.

    >>> block_picks(torch.tensor([7, 1, 4]), slice(1, 3), n_cols=3)
    (tensor([0, 2]), tensor([4, 1]))
    """
    lo, hi = rows.start * n_cols, rows.stop * n_cols
    sel = ((pick >= lo) & (pick < hi)).nonzero().squeeze(-1)
    return sel, pick[sel] - lo


def _vocab_chunk(n_tokens: int, vocab: int, itemsize: int, memory_budget_mb: float) -> int:
    # About three (N, chunk) temporaries are alive at once (logits slice, probabilities, products).
    return int(max(1, min(vocab, memory_budget_mb * 2**20 // max(1, 3 * n_tokens * itemsize))))


@torch.no_grad()
def group_grams(
    head_input: Tensor,
    logits: Tensor,
    labels: Tensor,
    mask: Tensor,
    is_positive: Tensor,
    *,
    temperature: float = 1.0,
    memory_budget_mb: float = 256.0,
    rows: Tensor | None = None,
    entropy: bool = False,
) -> GroupGrams:
    """All token-pair head-gradient inner products of one group, computed once (the probes share it).

    Straight from the (G, T, V) logits in vocabulary chunks (any dtype, accumulating in float32, or
    float64 for float64 logits): a log-sum-exp pass, then per chunk q = p with its sampled entry
    zeroed and Q Qᵀ accumulated, so no (tokens × V) tensor is copied; the gathers p_a[y_b] come from
    the logits directly and the representation Gram H Hᵀ multiplies the logit factor in place, row
    block by row block. Peak: one (N, N) matrix plus ``memory_budget_mb`` of chunks. Same values as
    :func:`head_gradient_inner` (and its cancellation-free form).

    With ``entropy`` the same pass over the chunks also accumulates R Qᵀ, R = q ⊙ log p (the entropy's
    extra contraction, docs/MATH.md § Entropy dynamics), and the token entropies, and the row blocks turn it
    into ``entropy_inner`` (N, N), the derivative of each token's entropy along each token's head gradient
    (:func:`entropy_head_inner`): one more (N, N) matrix and one more full (not triangular) product per
    chunk, the probabilities computed once for both. ``inner`` is bit for bit the same either way.

    Args:
        head_input: (G, T, d); logits: (G, T, V) at the same positions; labels, mask: (G, T);
        is_positive: (G,) bool; rows: the batch rows of the group (default all), read in place.

    >>> g = torch.Generator().manual_seed(0)
    >>> h, z = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 7, generator=g)
    >>> y, m = torch.randint(0, 7, (3, 2), generator=g), torch.ones(3, 2, dtype=torch.bool)
    >>> gr = group_grams(h, z, y, m, torch.tensor([True, False, False]), memory_budget_mb=1e-4)
    >>> p = torch.softmax(z, -1)
    >>> ref = head_gradient_inner(h[0], p[0], y[0], h[1:].reshape(4, 4), p[1:].reshape(4, 7), y[1:].reshape(4))
    >>> bool(torch.allclose(gr.block("pos", "neg"), ref, atol=1e-6)), gr.n_pos
    (True, 2)
    >>> ge = group_grams(h, z, y, m, torch.tensor([True, False, False]), memory_budget_mb=1e-4, entropy=True)
    >>> bool(torch.equal(ge.inner, gr.inner)), tuple(ge.entropy_inner.shape)
    (True, (6, 6))
    """
    _, T, V = logits.shape
    dev = logits.device
    rows = torch.arange(logits.shape[0], device=dev) if rows is None else rows.to(dev)
    pos = is_positive.bool().to(dev)[rows]
    rows = torch.cat([rows[pos], rows[~pos]])  # positives first
    m = mask.bool().to(dev)[rows]  # (R, T)
    ridx = rows[:, None].expand(-1, T)[m]  # (N,)
    tidx = torch.arange(T, device=dev)[None, :].expand(len(rows), -1)[m]  # (N,)
    y = labels.to(dev)[ridx, tidx]  # (N,)
    n_pos = int(m[: int(pos.sum())].sum())
    N = int(y.shape[0])
    cdt = torch.promote_types(logits.dtype, torch.float32)
    c = _vocab_chunk(N, V, torch.finfo(cdt).bits // 8, memory_budget_mb)
    lse = torch.full((N,), float("-inf"), dtype=cdt, device=dev)
    for v0 in range(0, V, c):
        z = logits[ridx, tidx, v0 : v0 + c].to(cdt) / temperature  # (N, c): only this chunk is copied
        lse = torch.logaddexp(lse, torch.logsumexp(z, -1))
    L = torch.zeros(N, N, dtype=cdt, device=dev)  # (N, N): Σ over chunks of Q Qᵀ, then the logit factor
    s = torch.zeros(N, dtype=cdt, device=dev)  # 1 − p[y], summed (no cancellation, see _split)
    qq = torch.zeros(N, dtype=cdt, device=dev)  # Σ_{v≠y} p_v²
    M = torch.zeros(N, N, dtype=cdt, device=dev) if entropy else None  # (N, N): Σ over chunks of R Qᵀ
    rs = torch.zeros(N, dtype=cdt, device=dev) if entropy else None  # Σ_{v≠y} p_v log p_v
    # Q Qᵀ is symmetric: accumulate only the block lower triangle (half the products), mirror it after.
    tb = max(1, -(-N // 4))
    for v0 in range(0, V, c):
        lp = logits[ridx, tidx, v0 : v0 + c].to(cdt) / temperature - lse[:, None]  # (N, c) log p
        q = torch.exp(lp)  # (N, c)
        inside = (y >= v0) & (y < v0 + q.shape[1])
        q[inside.nonzero().squeeze(-1), y[inside] - v0] = 0.0
        s += q.sum(-1)
        qq += (q * q).sum(-1)
        for i0 in range(0, N, tb):
            i1 = min(N, i0 + tb)
            L[i0:i1, :i1].addmm_(q[i0:i1], q[:i1].T)  # (tb, i1): blocks on and below the diagonal
        if M is not None and rs is not None:
            r = lp.mul_(q).masked_fill_(q == 0, 0.0)  # (N, c): q ⊙ log p, 0 at y and where p is 0 (0 log 0)
            rs += r.sum(-1)
            M.addmm_(r, q.T)  # (N, N): not symmetric, so the whole product
            del r
        del q, lp
    for i0 in range(0, N, tb):  # mirror the strictly upper blocks from the lower ones
        i1 = min(N, i0 + tb)
        L[i0:i1, i1:] = L[i1:, i0:i1].T
    h = head_input.to(dev)[ridx, tidx].to(torch.promote_types(head_input.dtype, cdt))  # (N, d)
    ent = None
    if M is not None and rs is not None:
        lpy = logits[ridx, tidx, y].to(cdt) / temperature - lse  # (N,) log p[y]
        py = torch.exp(lpy)  # (N,)
        ent = -(rs + py * lpy)  # (N,) H = −Σ p log p
    rb = max(1, int(memory_budget_mb * 2**20 // max(1, 4 * N * (torch.finfo(cdt).bits // 8))))
    for b0 in range(0, N, rb):
        b = slice(b0, b0 + rb)
        # p_b[y_j] (rows of the block) and p_j[y_b] (columns), gathered from the logits.
        lp_row = logits[ridx[b, None], tidx[b, None], y[None, :]].to(cdt) / temperature - lse[b, None]  # (rb, N)
        p_row = torch.exp(lp_row)
        p_col = torch.exp(logits[ridx[:, None], tidx[:, None], y[None, b]].to(cdt) / temperature - lse[:, None])
        same = y[b, None] == y[None, :]  # (rb, N)
        blk = L[b]
        hh = (h[b] @ h.T).to(cdt)  # (rb, N): the representation factor
        q_col = p_col.T.masked_fill(same, 0.0)  # q_j[y_b]  (rb, N)
        if M is not None and ent is not None:
            _entropy_block(M[b], blk, lp_row, p_row, q_col, s, py, lpy, ent, b, hh)
        q_row = p_row.masked_fill_(same, 0.0)  # q_b[y_j]
        blk += same * (s[b, None] * s[None, :])
        blk -= s[b, None] * q_col + s[None, :] * q_row
        blk *= hh
    return GroupGrams(inner=L, logit_sqnorm=s * s + qq, rep_sqnorm=(h * h).sum(-1).to(cdt), row=ridx, pos=tidx,
                      y=y, n_pos=n_pos, entropy_inner=M, entropy=ent)


def _entropy_block(Mb: Tensor, QQb: Tensor, lp_row: Tensor, p_row: Tensor, q_col: Tensor, s: Tensor, py: Tensor,
                   lpy: Tensor, ent: Tensor, b: slice, hh: Tensor) -> None:
    """Turn a row block of R̃ Qᵀ into the entropy Gram in place: Mb[t, j] ← ⟨∂H_t/∂z, e_{y_j} − p_j⟩ ⟨h_t, h_j⟩.

    With p_t = q_t + π_t e_{y_t} (π = p[y]) and R_t = p_t ⊙ log p_t = R̃_t + π_t log π_t e_{y_t} (R̃ = q ⊙ log p,
    whose product with Q is ``Mb``), every full-vocabulary product is a product of the q's plus gathers:

        ⟨p_t, p_j⟩ = ⟨q_t, q_j⟩ + π_j q_t[y_j] + π_t q_j[y_t] + π_t π_j [y_t = y_j]
        ⟨R_t, p_j⟩ = ⟨R̃_t, q_j⟩ + π_j q_t[y_j] log p_t[y_j] + π_t log π_t (q_j[y_t] + π_j [y_t = y_j])
        ⟨∂H_t/∂z, e_{y_j} − p_j⟩ = −p_t[y_j] (log p_t[y_j] + H_t) + ⟨R_t, p_j⟩ + H_t ⟨p_t, p_j⟩

    Collected (p_t[y_j] = q_t[y_j] + π_t [y_t = y_j], and s_j = 1 − π_j the Gram's cancellation-free sum), the
    terms in q_t[y_j] and in [y_t = y_j] merge back into one in p_t[y_j]:

        = ⟨R̃_t, q_j⟩ + H_t ⟨q_t, q_j⟩ − s_j p_t[y_j] (log p_t[y_j] + H_t) + π_t (log π_t + H_t) q_j[y_t],

    built in place with one (rows, N) temporary. ``QQb`` (rb, N) is the block of Q Qᵀ (before the Gram's own
    in-place steps); ``lp_row``/``p_row`` (rb, N) log p_t[y_j] and p_t[y_j] (``lp_row`` is consumed);
    ``q_col`` (rb, N) q_j[y_t]; ``s`` (N,) 1 − π.
    """
    Ht = ent[b, None]  # (rb, 1)
    Mb.addcmul_(QQb, Ht)
    t = lp_row.add_(Ht).mul_(p_row).mul_(s[None, :])  # (rb, N): s_j p_t[y_j] (log p_t[y_j] + H_t)
    Mb.sub_(t)
    del t
    Mb.addcmul_(q_col, py[b, None] * (lpy[b, None] + Ht))
    Mb.mul_(hh)


def _order_keys(x: Tensor) -> tuple[Tensor, int]:
    """Integer keys of the float values ``x`` (flattened) whose order *as unsigned integers* is the values'
    order, and their width in bits (the bit patterns, in int32 or int64 tensors).

    The IEEE bit pattern read as a signed integer orders non-negative floats; flipping the magnitude bits of
    negative ones orders those too; flipping the sign bit then makes the unsigned order the signed one.
    float16/bfloat16 are widened to float32 (exact).
    """
    x = x.reshape(-1)
    it = torch.int64 if x.dtype == torch.float64 else torch.int32
    k = (x if it == torch.int64 else x.float()).view(it)
    info = torch.iinfo(it)
    return k ^ ((k >> (info.bits - 1)) & info.max) ^ info.min, info.bits


def _from_key(u: int, bits: int) -> float:
    """The float whose unsigned :func:`_order_keys` key is ``u``."""
    k = u ^ (1 << (bits - 1))
    k = k - (1 << bits) if k >= 1 << (bits - 1) else k  # the signed pattern
    k ^= (k >> (bits - 1)) & ((1 << (bits - 1)) - 1)
    it, ft = (torch.int32, torch.float32) if bits == 32 else (torch.int64, torch.float64)
    return float(torch.tensor([k], dtype=it).view(ft))


def _signed(u: int, bits: int) -> int:
    """The signed integer with the bit pattern of the unsigned ``u`` (what a tensor holds)."""
    return u - (1 << bits) if u >= 1 << (bits - 1) else u


def streaming_quantiles(chunks: Callable[[], Iterable], quantiles: Sequence[float], *,
                        streams: int | None = None) -> list:
    """Exact quantiles of all values yielded by ``chunks()`` (called once per pass), interpolated linearly as
    ``np.quantile``, holding one chunk at a time: a radix selection on the values' order keys, 16 bits per pass
    (2 passes for float32, 4 for float64), one histogram per pass for all the quantiles together.

    The values need never exist as one tensor: a caller recomputes them chunk by chunk (a row block of a
    (Tp, Tn) cosine matrix, say), so the memory is one chunk and a (k·65,536) histogram whatever their number.
    With ``streams=m`` each chunk is a tuple of m tensors (m value sets selected in the same passes) and the
    result is one list of quantiles per stream.

    >>> x = torch.tensor([3.0, -1.0, 2.0, 4.0, 0.0])
    >>> streaming_quantiles(lambda: x.split(2), [0.0, 0.5, 0.9, 1.0])
    [-1.0, 2.0, 3.6, 4.0]
    """
    m = 1 if streams is None else streams
    digit = 2**16
    bits = [0] * m  # key width per stream, from the first pass's chunks (32, or 64 for float64)
    # Per stream: the ranks wanted, each with its key prefix fixed so far (unsigned) and its rank below it.
    n = [0] * m
    prefix: list[dict[int, int]] = [{} for _ in range(m)]
    rest: list[dict[int, int]] = [{} for _ in range(m)]
    j = 0
    while True:
        groups = [sorted(set(prefix[i].values())) if j else [0] for i in range(m)]
        hists: list = [None] * m
        for chunk in chunks():
            for i, c in enumerate((chunk,) if streams is None else chunk):
                if c.numel() == 0:
                    continue
                if j and 16 * j >= bits[i]:
                    continue  # this stream's keys are complete (float32 beside float64 streams)
                u, b = _order_keys(c)
                if j == 0:
                    if bits[i] not in (0, b):
                        raise ValueError("streaming_quantiles: float64 and narrower chunks mixed in one stream")
                    bits[i] = b
                    n[i] += u.numel()
                shift = b - 16 * (j + 1)
                if hists[i] is None:
                    hists[i] = torch.zeros(len(groups[i]) * digit, dtype=torch.int64, device=u.device)
                if j == 0:
                    idx = None
                else:
                    pre = u >> (shift + 16)
                    idx = torch.full_like(u, -1)
                    for gi, gp in enumerate(groups[i]):  # prefixes matched by equality (signed patterns)
                        idx.masked_fill_(pre == (_signed(gp, b) >> (shift + 16)), gi)
                    keep = idx >= 0
                    u, idx = u[keep], idx[keep]
                d = (u >> shift) & (digit - 1)
                bins = d if idx is None else idx * digit + d
                if bins.numel() * 8 < hists[i].numel():  # a small chunk: add its counts, not a whole histogram
                    ones = torch.ones(bins.shape, dtype=hists[i].dtype, device=bins.device)
                    hists[i].index_put_((bins.long(),), ones, accumulate=True)
                else:
                    hists[i] += torch.bincount(bins, minlength=hists[i].numel())
        if j == 0:
            for i in range(m):
                if n[i] == 0:
                    raise ValueError("streaming_quantiles: no values")
                spots = [q * (n[i] - 1) for q in quantiles]
                ranks = {r for x in spots for r in (int(x // 1), min(n[i] - 1, int(-(-x // 1))))}
                prefix[i], rest[i] = dict.fromkeys(ranks, 0), {r: r for r in ranks}
        for i in range(m):
            shift = bits[i] - 16 * (j + 1)
            if shift < 0:
                continue
            cums = hists[i].view(len(groups[i]), digit).cumsum(-1).cpu()
            for r in prefix[i]:
                cum = cums[groups[i].index(prefix[i][r])]
                d = int(torch.searchsorted(cum, torch.tensor([rest[i][r]]), right=True))  # first cum > rank
                rest[i][r] -= int(cum[d - 1]) if d else 0
                prefix[i][r] |= d << shift
        j += 1
        if all(16 * j >= b for b in bits):
            break
    out = []
    for i in range(m):
        value = {r: _from_key(u, bits[i]) for r, u in prefix[i].items()}
        qs = []
        for q in quantiles:
            x = q * (n[i] - 1)
            lo, hi = int(x // 1), min(n[i] - 1, int(-(-x // 1)))
            qs.append(value[lo] if hi == lo else value[lo] + (value[hi] - value[lo]) * (x - lo))
        out.append(qs)
    return out[0] if streams is None else out


def device_quantiles(x: Tensor, quantiles: Sequence[float]) -> list[float]:
    """Exact quantiles of all entries of ``x`` on its device, interpolated linearly as ``np.quantile``
    (:func:`streaming_quantiles` over chunks of ``x``: no host copy, no sort, no size limit of
    ``torch.quantile``).

    >>> device_quantiles(torch.tensor([[3.0, 1.0], [2.0, 4.0]]), [0.0, 0.5, 1.0])
    [1.0, 2.5, 4.0]
    """
    flat = x.reshape(-1)
    return streaming_quantiles(lambda: flat.split(2**22), quantiles)
