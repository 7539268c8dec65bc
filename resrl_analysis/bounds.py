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

__all__ = ["projection_norms", "alignment_bound", "alignment_bound_paper", "head_gradient_bound"]


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
    ip, op = projection_norms(x_pos, basis)
    ineg, oneg = projection_norms(x_neg, basis)
    return ip[:, None] * ineg[None, :] + op[:, None] * oneg[None, :]


def alignment_bound_paper(x_pos: Tensor, x_neg: Tensor, basis: Tensor) -> Tensor:
    """The paper's (looser) form ||P x⁺||·sqrt(||x⁻||² − d·e(x⁻)) + ||x⁻||·sqrt(d·e(x⁺)) → (Tp, Tn).

    >>> B = torch.tensor([[1.0], [0.0]])
    >>> alignment_bound_paper(torch.tensor([[0.0, 1.0]]), torch.tensor([[3.0, 4.0]]), B).item()
    5.0
    """
    ip, op = projection_norms(x_pos, basis)
    nneg = x_neg.norm(dim=-1)
    _, oneg = projection_norms(x_neg, basis)
    inside_neg = (nneg**2 - oneg**2).clamp(min=0).sqrt()
    return ip[:, None] * inside_neg[None, :] + op[:, None] * nneg[None, :]


def head_gradient_bound(h_a: Tensor, p_a: Tensor, y_a: Tensor, h_b: Tensor, p_b: Tensor, y_b: Tensor) -> Tensor:
    """|<g_a, g_b>| ≤ ||e_a − p_a||·||e_b − p_b||·|<h_a, h_b>| for all pairs → (Ta, Tb).

    >>> h = torch.tensor([[1.0, 0.0]]); p = torch.tensor([[0.5, 0.5]]); y = torch.tensor([0])
    >>> round(head_gradient_bound(h, p, y, h, p, y).item(), 6)
    0.5
    """
    na = logit_grad_sqnorm(p_a, y_a).clamp(min=0).sqrt()
    nb = logit_grad_sqnorm(p_b, y_b).clamp(min=0).sqrt()
    return na[:, None] * nb[None, :] * (h_a @ h_b.T).abs()
