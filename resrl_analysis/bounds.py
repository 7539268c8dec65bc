"""The alignment bound of the ResRL paper and the head-gradient bound (docs/MATH.md § Alignment bound).

Split both vectors into their parts in S (projector P = V Vᵀ) and in S⊥ and apply Cauchy–Schwarz to
each part:

    |<x⁻, x⁺>| ≤ ||P x⁺||·||P x⁻|| + ||(I−P) x⁺||·||(I−P) x⁻||                 (tight form)
              ≤ ||P x⁺||·sqrt(||x⁻||² − d·e(x⁻)) + ||x⁻||·sqrt(d·e(x⁺))         (paper's form)

(d·e(x) = ||(I−P)x||², so the paper's first term equals the tight one and its second is looser.)
The bound is exact mathematics for any vectors; whether it says something about the head gradient
depends on which representation x is (only the head input makes <x⁻, x⁺> a factor of <g⁺, g⁻>).
"""

from __future__ import annotations

from torch import Tensor

from .interference import logit_grad_sqnorm

__all__ = ["projection_norms", "alignment_bound", "alignment_bound_paper", "tight_bound_from_norms",
           "paper_bound_from_norms", "head_gradient_bound"]


def projection_norms(x: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """(||P x||, ||(I − P) x||) per row of ``x`` (N, d) for an orthonormal ``basis`` (d, k).

    >>> a, b = projection_norms(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0], [0.0]]))
    >>> a.item(), b.item()
    (3.0, 4.0)
    """
    coef = x @ basis  # (N, k)
    inside = coef.norm(dim=-1)
    outside = (x - coef @ basis.T).norm(dim=-1)
    return inside, outside


def alignment_bound(x_pos: Tensor, x_neg: Tensor, basis: Tensor) -> Tensor:
    """Tight bound on |<x⁻, x⁺>| for all pairs → (Tp, Tn); ``basis`` (d, k) orthonormal.

    >>> g = torch.Generator().manual_seed(0)
    >>> xp, xn = torch.randn(5, 6, generator=g), torch.randn(7, 6, generator=g)
    >>> B = torch.linalg.qr(torch.randn(6, 2, generator=g)).Q
    >>> bool(((xp @ xn.T).abs() <= alignment_bound(xp, xn, B) + 1e-5).all())
    True
    """
    return tight_bound_from_norms(*projection_norms(x_pos, basis), *projection_norms(x_neg, basis))


def tight_bound_from_norms(in_pos: Tensor, out_pos: Tensor, in_neg: Tensor, out_neg: Tensor) -> Tensor:
    """:func:`alignment_bound` from the projection norms (:func:`projection_norms`) of each side → (Tp, Tn):
    ||P x⁺||·||P x⁻|| + ||(I−P) x⁺||·||(I−P) x⁻||. A probe computes the norms once and the bound in row blocks.

    >>> tight_bound_from_norms(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([3.0]), torch.tensor([4.0]))
    tensor([[11.]])
    """
    return in_pos[:, None] * in_neg[None, :] + out_pos[:, None] * out_neg[None, :]


def paper_bound_from_norms(in_pos: Tensor, out_pos: Tensor, norm_neg: Tensor, out_neg: Tensor) -> Tensor:
    """:func:`alignment_bound_paper` from ||P x⁺||, ||(I−P) x⁺||, ||x⁻|| and ||(I−P) x⁻|| → (Tp, Tn).

    >>> paper_bound_from_norms(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([5.0]), torch.tensor([4.0]))
    tensor([[5.]])
    """
    inside_neg = (norm_neg**2 - out_neg**2).clamp(min=0).sqrt()
    return in_pos[:, None] * inside_neg[None, :] + out_pos[:, None] * norm_neg[None, :]


def alignment_bound_paper(x_pos: Tensor, x_neg: Tensor, basis: Tensor) -> Tensor:
    """The paper's (looser) form ||P x⁺||·sqrt(||x⁻||² − d·e(x⁻)) + ||x⁻||·sqrt(d·e(x⁺)) → (Tp, Tn).

    >>> B = torch.tensor([[1.0], [0.0]])
    >>> alignment_bound_paper(torch.tensor([[0.0, 1.0]]), torch.tensor([[3.0, 4.0]]), B).item()
    5.0
    """
    _, out_neg = projection_norms(x_neg, basis)
    return paper_bound_from_norms(*projection_norms(x_pos, basis), x_neg.norm(dim=-1), out_neg)


def head_gradient_bound(h_a: Tensor, p_a: Tensor, y_a: Tensor, h_b: Tensor, p_b: Tensor, y_b: Tensor) -> Tensor:
    """|<g_a, g_b>| ≤ ||e_a − p_a||·||e_b − p_b||·|<h_a, h_b>| for all pairs → (Ta, Tb).

    >>> h = torch.tensor([[1.0, 0.0]]); p = torch.tensor([[0.5, 0.5]]); y = torch.tensor([0])
    >>> round(head_gradient_bound(h, p, y, h, p, y).item(), 6)
    0.5
    """
    na = logit_grad_sqnorm(p_a, y_a).clamp(min=0).sqrt()
    nb = logit_grad_sqnorm(p_b, y_b).clamp(min=0).sqrt()
    return na[:, None] * nb[None, :] * (h_a @ h_b.T).abs()
