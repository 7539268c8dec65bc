"""Token-level operations shared by the trainer and the probes.

Log-probabilities and entropy are computed in chunks of tokens, in float32, by a custom autograd
function: no float32 (B, T, V) tensor ever exists, neither in the forward pass nor in the backward
pass (which recomputes the softmax chunk by chunk from the saved logits).

Also here: masked reductions, group indexing, the baseline advantages (GRPO, PSR, NSR, W-REINFORCE)
and the unbiased pass@k estimator.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_MEMORY_BUDGET_MB",
    "pass_at_k_by_stratum",
    "stratum_of",
    "chunk_tokens_for_budget",
    "token_logprobs",
    "token_logprobs_and_entropy",
    "token_entropy",
    "softmax_probs",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "group_index",
    "group_advantages",
    "ADVANTAGE_ESTIMATORS",
    "pass_at_k",
    "pass_at_k_curve",
    "avg_at_n",
]

DEFAULT_MEMORY_BUDGET_MB = 256.0


def chunk_tokens_for_budget(vocab_size: int, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB) -> int:
    """Tokens per chunk so that a few float32 (chunk, V) temporaries fit in ``memory_budget_mb``.

    Three float32 temporaries of shape (chunk, V) live at once (upcast logits, exp, gradient).

    >>> chunk_tokens_for_budget(151_936, 256)
    147
    """
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if memory_budget_mb <= 0:
        raise ValueError(f"memory_budget_mb must be positive, got {memory_budget_mb}")
    per_token = 3 * 4 * vocab_size
    return max(1, int(memory_budget_mb * 2**20 // per_token))


class _ChunkedLogProbEntropy(torch.autograd.Function):
    """log p[y] and entropy from logits, chunked over tokens, float32 inside.

    Forward saves only the logits (in their own dtype) and the float32 log-normaliser per token;
    backward recomputes p chunk by chunk:
        d log p[y] / dz = e_y - p
        d H / dz        = -p * (log p + H)
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, scale: float, chunk: int, want_entropy: bool):  # type: ignore[override]
        n = logits.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=logits.device)
        ent = torch.empty(n if want_entropy else 0, dtype=torch.float32, device=logits.device)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        for s in range(0, n, chunk):
            # In-place arithmetic keeps at most two float32 (c, V) temporaries alive (plus logsumexp's own).
            z = logits[s : s + chunk].to(torch.float32, copy=True)  # (c, V); a copy: edited in place below
            if scale != 1.0:
                z.mul_(scale)
            lse_c = torch.logsumexp(z, dim=-1)  # (c,)
            lse[s : s + chunk] = lse_c
            logp[s : s + chunk] = z.gather(-1, labels[s : s + chunk, None]).squeeze(-1) - lse_c
            if want_entropy:
                logq = z.sub_(lse_c[:, None])  # (c, V), in place
                ent[s : s + chunk] = -(logq.exp().mul_(logq)).sum(-1)
        ctx.save_for_backward(logits, labels, lse, ent)
        ctx.scale, ctx.chunk, ctx.want_entropy = scale, chunk, want_entropy
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp: Tensor, g_ent: Tensor):  # type: ignore[override]
        logits, labels, lse, ent = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], chunk):
            e = s + chunk
            logq = logits[s:e].to(torch.float32, copy=True)  # (c, V); a copy: edited in place below
            if scale != 1.0:
                logq.mul_(scale)
            logq.sub_(lse[s:e, None])
            q = logq.exp()  # (c, V)
            use_ent = ctx.want_entropy and g_ent is not None
            if use_ent:  # dH/dz = -q (log q + H): built in place in logq
                logq.add_(ent[s:e, None]).mul_(q).mul_(-g_ent[s:e, None])
            gz = q.mul_(-g_logp[s:e, None])  # d log p[y] / dz = e_y - q, times the incoming gradient
            gz.scatter_add_(-1, labels[s:e, None], g_logp[s:e, None])
            if use_ent:
                gz.add_(logq)
            if scale != 1.0:
                gz.mul_(scale)
            grad[s:e] = gz.to(grad.dtype)
        return grad, None, None, None, None


def _flattens_in_place(x: Tensor) -> bool:
    try:
        x.view(-1, x.shape[-1])
        return True
    except RuntimeError:
        return False


def token_logprobs_and_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    chunk_tokens: int | None = None,
    entropy: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """log p[y] and the entropy of p = softmax(logits / temperature), token by token.

    Differentiable (the backward is chunked too). Works on any leading shape.

    Args:
        logits: (..., V) in any float dtype; upcast to float32 one chunk at a time.
        labels: (...,) integer token ids.
        temperature: logits are divided by it before the softmax.
        memory_budget_mb: bound on the float32 temporaries; sets the chunk size.
        chunk_tokens: explicit chunk size (overrides the budget).
        entropy: also return the entropy (else ``None``).

    Returns:
        (logp, entropy), float32, shape (...,).

    >>> z = torch.tensor([[0.0, 0.0], [0.0, 100.0]])
    >>> lp, h = token_logprobs_and_entropy(z, torch.tensor([0, 1]))
    >>> [round(v, 4) for v in lp.tolist()], [round(v, 4) for v in h.tolist()]
    ([-0.6931, 0.0], [0.6931, 0.0])
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    lead = labels.shape
    V = logits.shape[-1]
    if logits.dim() > 2 and not _flattens_in_place(logits):
        # A strided view (e.g. the response slice of a model's logits): reshape would copy all N·V
        # values, so take one leading row at a time (each row of the slice is a plain (T, V) view).
        parts = [token_logprobs_and_entropy(logits[i], labels[i], temperature=temperature,
                                            memory_budget_mb=memory_budget_mb, chunk_tokens=chunk_tokens,
                                            entropy=entropy) for i in range(logits.shape[0])]
        return (torch.stack([lp for lp, _ in parts]),
                torch.stack([h for _, h in parts]) if entropy else None)  # type: ignore[misc]
    flat = logits.reshape(-1, V)  # (N, V)
    lab = labels.reshape(-1).long()  # (N,)
    chunk = chunk_tokens or chunk_tokens_for_budget(V, memory_budget_mb)
    logp, ent = _ChunkedLogProbEntropy.apply(flat, lab, 1.0 / temperature, chunk, entropy)
    return logp.reshape(lead), (ent.reshape(lead) if entropy else None)


def token_logprobs(logits: Tensor, labels: Tensor, **kw) -> Tensor:
    """log p[y] only; see :func:`token_logprobs_and_entropy`.

    >>> token_logprobs(torch.zeros(1, 4), torch.tensor([2])).item() == -torch.log(torch.tensor(4.0)).item()
    True
    """
    return token_logprobs_and_entropy(logits, labels, entropy=False, **kw)[0]


def token_entropy(
    logits: Tensor, *, temperature: float = 1.0, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB
) -> Tensor:
    """Entropy −Σ p log p per token, chunked, float32. Shape (...,).

    >>> round(token_entropy(torch.zeros(3, 8))[0].item(), 4) == round(float(np.log(8)), 4)
    True
    """
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return token_logprobs_and_entropy(
        logits, labels, temperature=temperature, memory_budget_mb=memory_budget_mb
    )[1]


def softmax_probs(logits: Tensor, *, temperature: float = 1.0, dtype: torch.dtype = torch.float32,
                  memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB) -> Tensor:
    """softmax(logits / temperature) of a (N, V) tensor, computed in float32 chunks, stored as ``dtype``.

    >>> softmax_probs(torch.zeros(2, 4)).sum(-1).tolist()
    [1.0, 1.0]
    """
    V = logits.shape[-1]
    out = torch.empty(logits.shape, dtype=dtype, device=logits.device)
    flat, oflat = logits.reshape(-1, V), out.view(-1, V)
    chunk = chunk_tokens_for_budget(V, memory_budget_mb)
    for s in range(0, flat.shape[0], chunk):
        oflat[s : s + chunk] = torch.softmax(flat[s : s + chunk].float() / temperature, -1).to(dtype)
    return out


# ----------------------------------------------------------------------------- masked reductions


def masked_sum(x: Tensor, mask: Tensor, dim: int | Sequence[int] | None = None) -> Tensor:
    """Sum of ``x`` where ``mask`` is true (masked entries may hold NaN/inf: they are not read).

    >>> masked_sum(torch.tensor([1.0, float("nan"), 3.0]), torch.tensor([True, False, True])).item()
    4.0
    """
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | Sequence[int] | None = None) -> Tensor:
    """Mean of ``x`` over entries where ``mask`` is true; 0 where nothing is selected.

    >>> masked_mean(torch.tensor([[1.0, 2.0], [5.0, 0.0]]), torch.tensor([[1, 1], [1, 0]]), dim=1).tolist()
    [1.5, 5.0]
    """
    m = mask.bool()
    count = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, dim: int | None = None, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over the masked entries (unbiased by default; 0 when fewer than 2).

    >>> round(masked_var(torch.tensor([1.0, 3.0, 99.0]), torch.tensor([1, 1, 0])).item(), 6)
    2.0
    """
    m = mask.bool()
    mean = masked_mean(x, m, dim)
    if dim is not None:
        mean = mean.unsqueeze(dim)
    count = (m.sum() if dim is None else m.sum(dim)).to(x.dtype)
    ss = masked_sum((x - mean) ** 2, m, dim)
    denom = (count - 1) if unbiased else count
    return torch.where(denom > 0, ss / denom.clamp(min=1), torch.zeros_like(ss))


# ----------------------------------------------------------------------------- groups and advantages


def group_index(group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Map arbitrary group ids (B,) to (unique ids (G,), inverse (B,) in [0, G)); order-free.

    Unique ids come sorted, so anything iterating over groups does so in an order that does not depend
    on the order of the rows.

    >>> group_index(torch.tensor([7, 3, 7]))
    (tensor([3, 7]), tensor([1, 0, 1]))
    """
    uniq, inv = torch.unique(group_ids, sorted=True, return_inverse=True)
    return uniq, inv


def _group_mean_std(r: Tensor, inv: Tensor, G: int) -> tuple[Tensor, Tensor, Tensor]:
    count = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inv, r) / count
    dev2 = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inv, (r - mean[inv]) ** 2)
    std = torch.sqrt(dev2 / (count - 1).clamp(min=1))  # unbiased, as torch.std (verl, TRL)
    return mean, std, count


def _adv_grpo(r: Tensor, inv: Tensor, G: int, eps: float, w_lambda: float) -> Tensor:
    mean, std, _ = _group_mean_std(r, inv, G)
    return (r - mean[inv]) / (std[inv] + eps)


def _adv_psr(r: Tensor, inv: Tensor, G: int, eps: float, w_lambda: float) -> Tensor:
    return torch.where(r > 0, r, torch.zeros_like(r))


def _adv_nsr(r: Tensor, inv: Tensor, G: int, eps: float, w_lambda: float) -> Tensor:
    return torch.where(r > 0, torch.zeros_like(r), -torch.ones_like(r))


def _adv_w_reinforce(r: Tensor, inv: Tensor, G: int, eps: float, w_lambda: float) -> Tensor:
    return torch.where(r > 0, w_lambda * r, -torch.ones_like(r))


ADVANTAGE_ESTIMATORS = {
    "grpo": _adv_grpo,
    "psr": _adv_psr,
    "nsr": _adv_nsr,
    "w-reinforce": _adv_w_reinforce,
}


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    estimator: str = "grpo",
    *,
    eps: float = 1e-6,
    w_lambda: float = 0.1,
) -> Tensor:
    """Sequence-level advantages (B,) of the baseline estimators.

    A response is *correct* when its reward is > 0 (a length-scaled positive reward stays positive).

    - ``grpo``: (r − mean_group) / (std_group + eps), std unbiased as ``torch.std``.
    - ``psr``: r on correct (= +1 for binary rewards), 0 on wrong.
    - ``nsr``: 0 on correct, −1 on wrong.
    - ``w-reinforce``: λ·r on correct (λ = ``w_lambda``), −1 on wrong.

    Rows may come in any order; groups are found by ``group_ids``.

    >>> group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0, 0, 0, 0])).round(decimals=4).tolist()
    [1.5, -0.5, -0.5, -0.5]
    >>> group_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), "w-reinforce").tolist()
    [0.10000000149011612, -1.0]
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of {sorted(ADVANTAGE_ESTIMATORS)}")
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be (B,)")
    r = rewards.float() if not rewards.is_floating_point() else rewards
    uniq, inv = group_index(group_ids)
    return ADVANTAGE_ESTIMATORS[estimator](r, inv, len(uniq), eps, w_lambda)


# ----------------------------------------------------------------------------- pass@k


def pass_at_k(n, c, k) -> np.ndarray:
    """Unbiased pass@k estimator 1 − C(n−c, k) / C(n, k), with numpy broadcasting.

    Computed as the stable product 1 − Π_{i=n−c+1}^{n} (1 − k/i) (no large binomials).

    Args:
        n: samples per prompt; c: correct samples; k: budget. Integers or integer arrays,
            broadcast together; requires 0 ≤ c ≤ n and 0 ≤ k ≤ n.

    >>> float(pass_at_k(4, 1, 2))
    0.5
    >>> pass_at_k(10, [0, 3, 10], 1).round(12).tolist()
    [0.0, 0.3, 1.0]
    """
    n_, c_, k_ = np.broadcast_arrays(np.asarray(n), np.asarray(c), np.asarray(k))
    for name, a in (("n", n_), ("c", c_), ("k", k_)):
        if not np.issubdtype(a.dtype, np.integer):
            if not np.all(np.mod(a, 1) == 0):
                raise ValueError(f"pass_at_k: {name} must hold integers")
    n_, c_, k_ = n_.astype(np.int64), c_.astype(np.int64), k_.astype(np.int64)
    if np.any(c_ < 0) or np.any(c_ > n_):
        raise ValueError("pass_at_k: need 0 <= c <= n")
    if np.any(k_ < 0) or np.any(k_ > n_):
        raise ValueError("pass_at_k: need 0 <= k <= n")
    m = int(c_.max()) if c_.size else 0
    j = np.arange(max(m, 1))  # (m,)
    i = (n_ - c_ + 1)[..., None] + j  # (..., m): the factors' denominators n-c+1 .. n
    active = j < c_[..., None]
    terms = np.where(active, 1.0 - k_[..., None] / np.maximum(i, 1), 1.0)
    out = 1.0 - np.prod(terms, axis=-1)
    out = np.where(n_ - c_ < k_, 1.0, out)  # every k-subset holds a correct sample
    return np.asarray(out, dtype=np.float64)


def pass_at_k_curve(n: int, correct_counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """Mean unbiased pass@k over prompts for every k = 1..n; returns an array of length n.

    >>> pass_at_k_curve(2, [0, 1, 2]).round(4).tolist()
    [0.5, 0.6667]
    """
    c = np.asarray(correct_counts, dtype=np.int64)
    if c.ndim != 1 or c.size == 0:
        raise ValueError("pass_at_k_curve: correct_counts must be a non-empty 1-D sequence")
    ks = np.arange(1, n + 1)
    return pass_at_k(n, c[None, :], ks[:, None]).mean(axis=1)


def stratum_of(prompt_uid: str) -> str | None:
    """A held-out prompt's difficulty stratum: its uid's part before ``/`` (None when there is none).

    >>> stratum_of("chain/add-109+997"), stratum_of("add-101+384")
    ('chain', None)
    """
    head, sep, _ = str(prompt_uid).partition("/")
    return head if sep and head else None


def pass_at_k_by_stratum(n: int, prompt_uids: Sequence[str], correct_counts: Sequence[int]) -> dict[str, np.ndarray]:
    """:func:`pass_at_k_curve` of each stratum's prompts (:func:`stratum_of`), and ``"all"`` of every prompt.

    >>> {k: v.round(3).tolist() for k, v in pass_at_k_by_stratum(2, ["a/x", "a/y", "b/z"], [0, 2, 1]).items()}
    {'all': [0.5, 0.667], 'a': [0.5, 0.5], 'b': [0.5, 1.0]}
    """
    counts = np.asarray(correct_counts, dtype=np.int64)
    out = {"all": pass_at_k_curve(n, counts)}
    strata = [stratum_of(u) for u in prompt_uids]
    for s in dict.fromkeys(x for x in strata if x is not None):
        out[s] = pass_at_k_curve(n, counts[[x == s for x in strata]])
    return out


def avg_at_n(correct: np.ndarray | Sequence[Sequence[float]]) -> float:
    """Avg@n: mean accuracy over prompts × samples (``correct`` is (prompts, n) of 0/1 or rewards).

    >>> avg_at_n([[1, 0], [1, 1]])
    0.75
    """
    a = np.asarray(correct, dtype=np.float64)
    if a.size == 0:
        raise ValueError("avg_at_n: empty input")
    return float(a.mean())
