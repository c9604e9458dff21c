"""The PC layer's odd matrix polynomial g(Ŵ) = Ŵ·p_k(ŴᵀŴ), evaluated on the smaller Gram side.

Wang, Fang, Zhang, Zhang, Zhao, Schwing, Sun, "PC Layer", arXiv 2606.06470 (docs/pc.md). For a
matrix Ŵ = U·diag(σ)·Vᵀ with singular values in about [0, 1], g acts on each singular value separately:
g(Ŵ) = U·diag(g(σ))·Vᵀ with g(σ) = σ·p_k(σ²). The polynomial in the Gram matrix is evaluated where the Gram
matrix is smaller:

    tall (rows >= cols):  Ŵ·p_k(ŴᵀŴ)     wide (rows < cols):  p_k(ŴŴᵀ)·Ŵ

p_k(G) = c_0·I + c_1·G + ... + c_k·G^k by Horner: P = c_k·I, then P = G·P + c_j·I for j = k-1 … 0.
Every level has g(1) = 1, so the top singular value is kept while small ones are lifted.
"""

from __future__ import annotations

import torch

# p_k(x) coefficients, constant term first (docs/pc.md). Level 0 is the identity map.
PC_COEFFICIENTS: dict[int, tuple[float, ...]] = {
    0: (1.0,),
    1: (1.507, -0.507),
    2: (2.083, -1.643, 0.560),
    3: (2.909, -4.649, 4.023, -1.283),
    4: (3.625, -9.261, 14.097, -10.351, 2.890),
}


def scalar_polynomial(sigma: torch.Tensor, level: int) -> torch.Tensor:
    """g(σ) = σ·p_k(σ²) elementwise: what :func:`apply_polynomial` does to each singular value."""
    x = sigma * sigma
    p = torch.zeros_like(sigma)
    for c in reversed(PC_COEFFICIENTS[level]):
        p = p * x + c
    return sigma * p


def apply_polynomial(w_hat: torch.Tensor, level: int) -> torch.Tensor:
    """g(Ŵ) for one matrix (m, n) or a stack of same-shape matrices (B, m, n), in Ŵ's dtype.

    One Gram product, ``level - 1`` Horner products and one product with Ŵ (``torch.matmul`` batches over
    the leading dimension, so a stack costs one launch per product).
    """
    coeffs = PC_COEFFICIENTS[level]
    if level == 0:
        return w_hat
    tall = w_hat.size(-2) >= w_hat.size(-1)
    w_t = w_hat.transpose(-2, -1)
    gram = w_t @ w_hat if tall else w_hat @ w_t  # (.., r, r), r = min(m, n)
    eye = torch.eye(gram.size(-1), dtype=gram.dtype, device=gram.device)
    # Horner from the top: P = c_k·G + c_{k-1}·I, then P = G·P + c_j·I.
    p = coeffs[-1] * gram + coeffs[-2] * eye
    for c in reversed(coeffs[:-2]):
        p = gram @ p + c * eye
    return w_hat @ p if tall else p @ w_hat
