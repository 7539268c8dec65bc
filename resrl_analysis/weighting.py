"""ResRL: the positive subspace, residual energy and the negative-token weights (docs/MATH.md § ResRL weights).

One implementation, used by the trainer (to scale advantages) and by the probes (to measure them).

Representation: x = LN(h) − μ⁺ with LN a LayerNorm without affine parameters and μ⁺ the mean of the
group's (sampled) positive tokens. The subspace S is spanned by the top-k right singular vectors of the
centred positive matrix, k = min(rank, M − 1, d). Residual energy e(x) = ||(I − V_k V_kᵀ) x||² / d.

Randomness (the sub-sampling of positive tokens and the randomized SVD) comes from a per-group
generator derived from one draw of the caller's generator and the group id, so a group's weights do
not depend on which other groups share the batch, nor on the order of the rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .forward import hidden_state_index
from .ops import group_index
from .settings import SettingError

__all__ = [
    "ResRLWeightConfig",
    "Subspace",
    "layer_norm_no_affine",
    "positive_subspace",
    "randomized_right_basis",
    "residual_energy",
    "weights_from_residuals",
    "ResRLWeights",
    "resrl_weight_details",
    "resrl_token_weights",
    "select_representation",
    "explained_variance",
]

SVDMethod = Literal["lowrank", "exact"]


@dataclass(frozen=True)
class ResRLWeightConfig:
    """Hyper-parameters of the ResRL token weights (defaults from the paper; declared only here).

    >>> ResRLWeightConfig(rank=8).q_low, ResRLWeightConfig().rank
    (0.2, 64)
    """

    rank: int = 64
    """Upper bound on the subspace rank k (k = min(rank, M − 1, d))."""
    max_pos_tokens: int = 4096
    """At most this many positive tokens (sampled without replacement) span the subspace."""
    q_low: float = 0.2
    """Quantile of the group's negative residuals mapped to ``min_weight``."""
    q_high: float = 0.8
    """Quantile of the group's negative residuals mapped to weight 1."""
    min_weight: float = 0.1
    """Smallest weight a negative token can get."""
    niter: int = 4
    """Power iterations of the randomized SVD."""
    svd: SVDMethod = "lowrank"
    """``lowrank`` (randomized, as ``torch.pca_lowrank``) or ``exact`` (``torch.linalg.svd``)."""
    min_pos_tokens: int = 4
    """A group with fewer valid positive tokens keeps weight 1."""

    def __post_init__(self) -> None:
        """Every check of these fields (the trainer's ``resrl_*`` settings reuse it): :class:`SettingError`."""
        if self.rank < 1:
            raise SettingError(["rank"], [self.rank], "must be >= 1")
        if self.max_pos_tokens < 2:
            raise SettingError(["max_pos_tokens"], [self.max_pos_tokens], "must be >= 2")
        if not (0.0 <= self.q_low < self.q_high <= 1.0):
            raise SettingError(["q_low", "q_high"], [self.q_low, self.q_high], "must be below {1}, both in [0, 1]")
        if not (0.0 <= self.min_weight <= 1.0):
            raise SettingError(["min_weight"], [self.min_weight], "must lie in [0, 1]", what="a weight")
        if self.niter < 0:
            raise SettingError(["niter"], [self.niter], "must be >= 0")
        if self.svd not in ("lowrank", "exact"):
            raise SettingError(["svd"], [self.svd], choices="'lowrank' or 'exact'")
        if self.min_pos_tokens < 2:
            raise SettingError(["min_pos_tokens"], [self.min_pos_tokens], "must be >= 2")


#: The defaults of :class:`ResRLWeightConfig`, which the functions below take as their own (declared once).
_DEF = ResRLWeightConfig()


@dataclass(frozen=True)
class Subspace:
    """A centred positive subspace: ``basis`` (d, k) orthonormal columns, ``mean`` (d,)."""

    basis: Tensor
    mean: Tensor
    singular_values: Tensor
    n_tokens: int

    @property
    def rank(self) -> int:
        return self.basis.shape[1]


def layer_norm_no_affine(x: Tensor, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dimension without scale or shift.

    >>> layer_norm_no_affine(torch.tensor([[1.0, 3.0]])).round(decimals=3).tolist()
    [[-1.0, 1.0]]
    """
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def select_representation(hidden_states: tuple[Tensor, ...] | list[Tensor], layer: str | int) -> Tensor:
    """Pick a representation by name from HF ``output_hidden_states``
    (:func:`resrl_analysis.forward.hidden_state_index`; the forward hooks of
    :func:`resrl_analysis.forward.capture` read the same vectors without keeping every layer).

    ``"head_input"`` is ``hidden_states[-1]`` (HF applies the final norm before storing the last entry:
    it is exactly the vector the LM head multiplies); ``"penultimate"`` is ``hidden_states[-2]``, the
    output of the second-to-last decoder layer (the paper's choice); an int indexes directly.

    >>> hs = (torch.zeros(1), torch.ones(1), torch.full((1,), 2.0))
    >>> select_representation(hs, "penultimate").item()
    1.0
    """
    return hidden_states[hidden_state_index(layer)]


def randomized_right_basis(
    x: Tensor, q: int, niter: int = _DEF.niter, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Top-q right singular vectors (d, q) and values (q,) of ``x`` (M, d) by randomized subspace iteration.

    The algorithm of ``torch.pca_lowrank`` (Halko et al. 2011, q columns, ``niter`` power iterations,
    no centring), but drawing its Gaussian test matrix from an explicit generator: the global RNG is
    left untouched, which keeps training runs resumable bit for bit.

    >>> x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    >>> V, S = randomized_right_basis(x, 3, generator=torch.Generator().manual_seed(1))
    >>> V.shape, torch.allclose(V.T @ V, torch.eye(3), atol=1e-5)
    (torch.Size([8, 3]), True)
    """
    M, d = x.shape
    omega = torch.randn(d, q, generator=generator, dtype=x.dtype, device="cpu").to(x.device)  # (d, q)
    # Range finder on the column space of x; permuting the rows of x permutes Q's rows alike, so
    # B = Qᵀx (and the basis) does not depend on the order of the tokens.
    Q = torch.linalg.qr(x @ omega).Q  # (M, q)
    for _ in range(niter):
        Q = torch.linalg.qr(x.T @ Q).Q  # (d, q)
        Q = torch.linalg.qr(x @ Q).Q  # (M, q)
    B = Q.T @ x  # (q, d)
    _, S, Vh = torch.linalg.svd(B, full_matrices=False)
    return Vh.T, S  # (d, q), (q,)


def positive_subspace(
    x_pos: Tensor,
    rank: int = _DEF.rank,
    *,
    niter: int = _DEF.niter,
    svd: SVDMethod = _DEF.svd,
    generator: torch.Generator | None = None,
    center: bool = True,
) -> Subspace:
    """Subspace of the top-k right singular vectors of the (centred) positive matrix ``x_pos`` (M, d).

    k = min(rank, M − 1, d) (centring removes one dimension).

    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(20, 2, generator=g) @ torch.randn(2, 6, generator=g)  # rank 2 in R^6
    >>> S = positive_subspace(x, rank=4, svd="exact", center=False)
    >>> S.rank, bool(residual_energy(x, S, center=False).max() < 1e-8)
    (4, True)
    """
    M, d = x_pos.shape
    if M < 2:
        raise ValueError(f"positive_subspace needs at least 2 tokens, got {M}")
    mean = x_pos.mean(0) if center else torch.zeros(d, dtype=x_pos.dtype, device=x_pos.device)
    xc = x_pos - mean  # (M, d)
    k = max(1, min(rank, M - 1 if center else M, d))
    if svd == "exact":
        _, S, Vh = torch.linalg.svd(xc, full_matrices=False)
        basis, sv = Vh[:k].T, S[:k]
    elif svd == "lowrank":
        basis, sv = randomized_right_basis(xc, k, niter, generator)
    else:
        raise ValueError(f"svd must be 'lowrank' or 'exact', got {svd!r}")
    return Subspace(basis=basis, mean=mean, singular_values=sv, n_tokens=M)


def residual_energy(x: Tensor, subspace: Subspace | Tensor, *, center: bool = True) -> Tensor:
    """e(x) = ||(I − V Vᵀ)(x − μ)||² / d for each row of ``x`` (N, d) → (N,).

    ``subspace`` is a :class:`Subspace` (centred on its mean when ``center``) or a bare (d, k) basis.

    >>> B = torch.eye(3)[:, :1]
    >>> residual_energy(torch.tensor([[5.0, 3.0, 0.0]]), B).tolist()
    [3.0]
    """
    if isinstance(subspace, Subspace):
        basis = subspace.basis
        if center:
            x = x - subspace.mean
    else:
        basis = subspace
    r = x - (x @ basis) @ basis.T  # (N, d)
    return (r * r).sum(-1) / x.shape[-1]


def explained_variance(x_pos: Tensor, max_rank: int | None = None, *, center: bool = True) -> Tensor:
    """Cumulative fraction of the (centred) positive matrix's energy captured by ranks 1..K (exact SVD).

    >>> ev = explained_variance(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.1], [0.0, -0.1]]))
    >>> [round(v, 4) for v in ev.tolist()]
    [0.9901, 1.0]
    """
    xc = x_pos - x_pos.mean(0) if center else x_pos
    S = torch.linalg.svdvals(xc)
    e = S**2
    cum = torch.cumsum(e, 0) / e.sum().clamp(min=torch.finfo(e.dtype).tiny)
    return cum[:max_rank] if max_rank is not None else cum


def weights_from_residuals(
    e: Tensor, q_low: float = _DEF.q_low, q_high: float = _DEF.q_high, min_weight: float = _DEF.min_weight
) -> tuple[Tensor, float, float]:
    """ω = min_w + (1 − min_w)·clamp((e − lo)/(hi − lo), 0, 1), lo/hi the q_low/q_high quantiles of e.

    When hi − lo is (near) zero every token gets (min_w + 1)/2. Returns (ω, lo, hi).

    >>> w, lo, hi = weights_from_residuals(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]), 0.25, 0.75, 0.0)
    >>> w.tolist(), lo, hi
    ([0.0, 0.0, 0.5, 1.0, 1.0], 1.0, 3.0)
    """
    if e.numel() == 0:
        return e.clone(), float("nan"), float("nan")
    qs = torch.quantile(e.double(), torch.tensor([q_low, q_high], dtype=torch.float64, device=e.device))
    lo, hi = float(qs[0]), float(qs[1])
    span = hi - lo
    if span <= 1e-8 * max(1.0, abs(hi)):
        return torch.full_like(e, (min_weight + 1.0) / 2.0), lo, hi
    t = ((e.double() - lo) / span).clamp(0.0, 1.0)
    return (min_weight + (1.0 - min_weight) * t).to(e.dtype), lo, hi


@dataclass(frozen=True)
class ResRLWeights:
    """Everything :func:`resrl_weight_details` computed for a batch.

    ``weights`` (B, T) float32: ω on valid negative tokens, 1 elsewhere. ``residuals`` (B, T) float32:
    residual energy on valid negative tokens of weighted groups, NaN elsewhere. ``groups`` lists one
    dict per group id (sorted): ``group_id``, ``status`` ("weighted" or why not), ``rank``, ``lo``,
    ``hi``, ``n_pos_tokens``, ``n_neg_tokens``.
    """

    weights: Tensor
    residuals: Tensor
    groups: list[dict] = field(default_factory=list)


def _group_generator(base_seed: int, group_id: int) -> torch.Generator:
    # A group's randomness depends on (one draw of the caller's generator, the group id) only.
    return torch.Generator().manual_seed((base_seed * 1_000_003 + group_id * 7919 + 17) % (2**63 - 1))


def resrl_weight_details(
    hidden: Tensor,
    response_mask: Tensor,
    is_positive: Tensor,
    group_ids: Tensor,
    *,
    rank: int = _DEF.rank,
    max_pos_tokens: int = _DEF.max_pos_tokens,
    q_low: float = _DEF.q_low,
    q_high: float = _DEF.q_high,
    min_weight: float = _DEF.min_weight,
    niter: int = _DEF.niter,
    svd: SVDMethod = _DEF.svd,
    generator: torch.Generator | None = None,
    layer_norm: bool = True,
    center: bool = True,
    min_pos_tokens: int = _DEF.min_pos_tokens,
) -> ResRLWeights:
    """ResRL weights with their residuals and per-group diagnostics; see :func:`resrl_token_weights`.

    ``layer_norm`` and ``center`` switch the paper's LayerNorm and centring off, for the probes that
    compare representations (the trainer keeps both on).

    >>> g = torch.Generator().manual_seed(0)
    >>> out = resrl_weight_details(torch.randn(4, 6, 8, generator=g), torch.ones(4, 6, dtype=torch.bool),
    ...     torch.tensor([True, True, False, False]), torch.zeros(4, dtype=torch.long), rank=4, svd="exact")
    >>> out.groups[0]["status"], bool(torch.isfinite(out.residuals[2:]).all())
    ('weighted', True)
    """
    ResRLWeightConfig(rank, max_pos_tokens, q_low, q_high, min_weight, niter, svd, min_pos_tokens)  # validates
    if hidden.ndim != 3:
        raise ValueError(f"hidden must be (B, T, d), got shape {tuple(hidden.shape)}")
    B, T, d = hidden.shape
    if response_mask.shape != (B, T):
        raise ValueError(f"response_mask must be (B, T) = {(B, T)}, got {tuple(response_mask.shape)}")
    if is_positive.shape != (B,) or group_ids.shape != (B,):
        raise ValueError(f"is_positive and group_ids must be (B,) = ({B},), got {tuple(is_positive.shape)}, "
                         f"{tuple(group_ids.shape)}")
    dev = hidden.device
    mask = response_mask.bool()
    pos = is_positive.bool().to(dev)
    # float32 at least, whatever the model's dtype: bf16 quantiles and SVDs are too coarse.
    cdt = torch.promote_types(hidden.dtype, torch.float32)
    weights = torch.ones(B, T, dtype=torch.float32, device=dev)
    residuals = torch.full((B, T), float("nan"), dtype=torch.float32, device=dev)
    if generator is not None:
        base_seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    else:
        base_seed = int(torch.randint(0, 2**62, (1,)).item())
    uniq, inv = group_index(group_ids.to(dev))
    groups: list[dict] = []
    for gi, gid in enumerate(uniq.tolist()):
        rows = (inv == gi).nonzero().squeeze(-1)  # (G,)
        prow, nrow = rows[pos[rows]], rows[~pos[rows]]
        pmask, nmask = mask[prow], mask[nrow]  # (Gp, T), (Gn, T)
        info = {"group_id": gid, "n_pos_tokens": int(pmask.sum()), "n_neg_tokens": int(nmask.sum()),
                "rank": 0, "lo": float("nan"), "hi": float("nan")}
        if len(prow) == 0 or len(nrow) == 0:
            info["status"] = "no_positive" if len(prow) == 0 else "no_negative"
        elif info["n_pos_tokens"] < min_pos_tokens:
            info["status"] = "too_few_positive_tokens"
        elif info["n_neg_tokens"] == 0:
            info["status"] = "no_negative_tokens"
        else:
            gen = _group_generator(base_seed, int(gid))
            xp = hidden[prow][pmask].to(cdt)  # (M, d)
            if xp.shape[0] > max_pos_tokens:
                keep = torch.randperm(xp.shape[0], generator=gen)[:max_pos_tokens].to(dev)
                xp = xp[keep.sort().values]
            xn = hidden[nrow][nmask].to(cdt)  # (N, d)
            if layer_norm:
                xp, xn = layer_norm_no_affine(xp), layer_norm_no_affine(xn)
            sub = positive_subspace(xp, rank, niter=niter, svd=svd, generator=gen, center=center)
            e = residual_energy(xn, sub, center=center)  # (N,)
            w, lo, hi = weights_from_residuals(e, q_low, q_high, min_weight)
            # Scatter back into the (B, T) layout of the negative rows.
            wn = torch.ones(len(nrow), T, dtype=torch.float32, device=dev)
            rn = torch.full((len(nrow), T), float("nan"), dtype=torch.float32, device=dev)
            wn[nmask], rn[nmask] = w.float(), e.float()
            weights[nrow], residuals[nrow] = wn, rn
            info.update(status="weighted", rank=sub.rank, lo=lo, hi=hi, n_pos_tokens=int(xp.shape[0]))
        groups.append(info)
    return ResRLWeights(weights=weights, residuals=residuals, groups=groups)


def resrl_token_weights(
    hidden: Tensor,
    response_mask: Tensor,
    is_positive: Tensor,
    group_ids: Tensor,
    *,
    rank: int = _DEF.rank,
    max_pos_tokens: int = _DEF.max_pos_tokens,
    q_low: float = _DEF.q_low,
    q_high: float = _DEF.q_high,
    min_weight: float = _DEF.min_weight,
    niter: int = _DEF.niter,
    svd: SVDMethod = _DEF.svd,
    generator: torch.Generator | None = None,
) -> Tensor:
    """ResRL token weights (B, T), float32 (docs/MATH.md § ResRL weights).

    For each prompt group (all rows sharing a group id, wherever they sit in the batch): LayerNorm (no
    affine) of the raw hidden states, centring on the group's positive mean, the top-k subspace of
    the positive tokens, then each valid negative token's residual energy e mapped to
    ω ∈ [min_weight, 1] between the group's q_low and q_high residual quantiles. Positive tokens,
    padding, and every token of a group with no positive response, no negative response or fewer
    than 4 valid positive tokens get 1.

    Args:
        hidden: (B, T, d) raw states of the chosen layer (any float dtype; computed in float32+).
        response_mask: (B, T) bool, True on response tokens.
        is_positive: (B,) bool, the response's reward is positive.
        group_ids: (B,) ints, one id per prompt group.

    >>> g = torch.Generator().manual_seed(0)
    >>> w = resrl_token_weights(torch.randn(4, 5, 16, generator=g), torch.ones(4, 5, dtype=torch.bool),
    ...     torch.tensor([True, True, False, False]), torch.tensor([0, 0, 0, 0]), rank=8, generator=g)
    >>> w.shape, bool((w[:2] == 1).all()), bool(((w[2:] >= 0.1) & (w[2:] <= 1)).all())
    (torch.Size([4, 5]), True, True)
    """
    return resrl_weight_details(
        hidden, response_mask, is_positive, group_ids, rank=rank, max_pos_tokens=max_pos_tokens,
        q_low=q_low, q_high=q_high, min_weight=min_weight, niter=niter, svd=svd, generator=generator,
    ).weights
