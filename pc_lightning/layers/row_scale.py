"""Scale the output rows of any linear kind exactly: make a layer apply diag(c)·W instead of W.

QK-clip (:mod:`pc_lightning.callbacks.qk_clip`) shrinks the rows of W_q and W_k that belong to one attention
head. For a dense layer that is a row scaling of the weight. For the other kinds the trained parameters are not
W itself, and scaling them naively does not scale W's rows:

* **TSVD** (W = U·diag(s)·Vᵀ, U and V orthonormal): diag(c)·U is no longer orthonormal and scaling s would scale
  every row. Re-factor at the same rank: diag(c)·U = Q·R (thin QR, Q orthonormal), R·diag(s) = P·diag(σ)·Oᵀ (SVD
  of an r×r matrix), so diag(c)·W = (Q P)·diag(σ)·(V O)ᵀ: new U = Q P, s = σ, V = V O, exact, orthonormal and at
  the same rank. The new columns are then matched to the old ones (an assignment on |O|, signs kept, negative s
  kept negative), so that where the clip barely rotates the factors the optimizer's moments stay attached to the
  directions they were accumulated for.
* **PC** (W_eff = γ·σ̂·g(W/σ̂), g the odd polynomial acting on singular values): scaling rows of the raw W
  changes σ̂ (the spectral norm of diag(c)·W is not σ̂) and, since g acts on singular values, not rows,
  g(diag(c)·Ŵ) ≠ diag(c)·g(Ŵ): the polynomial lifts the shrunk directions back towards 1, so at level 4 the
  head's logits barely move, and the other heads' rows change too. Instead we solve for a raw W' whose W_eff is
  exactly diag(c)·W_eff. Take A = diag(c)·W_eff / γ = U'·diag(a)·V'ᵀ (SVD) and an anchor direction j that will be
  W's top one: the direction where the old normalised raw weight Ŵ is largest (u'ᵢᵀ Ŵ v'ᵢ; the old top direction
  when the clip leaves it alone), or the largest aᵢ when the other values would exceed g's maximum on [0, 1].
  With y = a / a_j pick t_i ∈ [0, 1] with g(t_i) = y_i and t_j = 1 (g(0) = 0, g(1) = 1, so roots exist) and set
  W' = σ̂'·U'·diag(t)·V'ᵀ, u = U'_j, v = V'_j, so that the power-iteration estimate is σ̂' exactly. With
  ``recover_w_norm`` σ̂' = a_j (γ unchanged); without it W_eff's scale is γ alone, so γ' = γ·a_j and σ̂' keeps the
  old value. Where g is not monotone a value y has several roots: we take the one nearest to the old raw weight's
  value in that direction (u'ᵢᵀ Ŵ v'ᵢ), so that the raw weight changes as little as the clip allows (a clip by 1
  gives back the old raw weight to round-off). Exact up to the normaliser's ε (relative ε / σ̂) and the
  polynomial's fp32 round-off. The raw weights of the clipped layer change beyond the clipped head's rows (W' is
  a function of the whole of W_eff); the function the layer computes changes in those rows only.
"""

from __future__ import annotations

import torch
from torch import nn

from pc_lightning.layers.pc_linear import PCLinear, group_effective_weight
from pc_lightning.layers.pc_polynomial import scalar_polynomial
from pc_lightning.layers.tsvd_linear import TSVDLinear


@torch.no_grad()
def scale_rows(layer: nn.Module, scale: torch.Tensor) -> None:
    """In place: ``layer`` applies diag(scale)·W afterwards (``scale``: (out_features,), positive)."""
    if isinstance(layer, PCLinear):
        _scale_pc_rows(layer, scale)
    elif isinstance(layer, TSVDLinear):
        _scale_tsvd_rows(layer, scale)
    else:
        layer.weight.mul_(scale.to(layer.weight.dtype)[:, None])


def polynomial_preimage(y: torch.Tensor, level: int, hint: torch.Tensor, grid: int = 4097,
                        iters: int = 60) -> torch.Tensor:
    """t ∈ [0, 1] with g(t) = y elementwise (y ∈ [0, 1], fp64), the root nearest to ``hint`` where there are
    several: a grid locates every sign change of g − y, the cell nearest the hint is bisected."""
    x = torch.linspace(0.0, 1.0, grid, dtype=torch.float64, device=y.device)
    f = scalar_polynomial(x, level)[None, :] - y[:, None]  # (r, grid)
    crossing = (f[:, :-1] <= 0) & (f[:, 1:] >= 0) | (f[:, :-1] >= 0) & (f[:, 1:] <= 0)
    middle = 0.5 * (x[:-1] + x[1:])
    distance = (middle[None, :] - hint[:, None]).abs().masked_fill(~crossing, float("inf"))
    cell = distance.argmin(dim=1)
    # round-off can hide the crossing of a value at the very top (y = 1 = g(1)): take the closest grid point
    none = ~crossing.any(dim=1)
    cell = torch.where(none, f.abs().argmin(dim=1).clamp(max=grid - 2), cell)
    lo, hi = x[cell], x[cell + 1]
    f_lo = f.gather(1, cell[:, None]).squeeze(1)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        f_mid = scalar_polynomial(mid, level) - y
        left = (f_mid > 0) == (f_lo > 0)  # the sign change is in [mid, hi]
        lo, f_lo = torch.where(left, mid, lo), torch.where(left, f_mid, f_lo)
        hi = torch.where(left, hi, mid)
    return torch.where(none, x[cell], 0.5 * (lo + hi))


def _scale_pc_rows(layer: PCLinear, scale: torch.Tensor) -> None:
    if layer.normalizer != "spectral":
        raise ValueError("row scaling of a PC layer needs normalizer=spectral")
    w = layer.weight.detach().double()
    u, v = layer.u.double(), layer.v.double()
    gamma = layer.gamma.detach().double().reshape(1)
    w_eff = group_effective_weight(w[None], gamma, u[None], v[None], layer.level, layer.normalizer,
                                   layer.recover_w_norm, layer.eps)[0]
    a = scale.double()[:, None] * w_eff / gamma
    left, values, right_h = torch.linalg.svd(a, full_matrices=False)
    sigma_old = torch.einsum("m,mn,n->", u, w, v)
    hint = ((left.T @ (w / (sigma_old + layer.eps))) * right_h).sum(dim=1).clamp(0.0, 1.0)
    # The anchor j gets t_j = 1 (it becomes W's top direction, σ̂' = its value): the old top raw direction (largest
    # hint), unless another value would then exceed what g reaches on [0, 1]; then the largest value (y <= 1).
    g_max = float(scalar_polynomial(torch.linspace(0.0, 1.0, 4097, dtype=torch.float64), layer.level).max())
    j = int(hint.argmax())
    if float(values[0]) > g_max * float(values[j]):
        j = 0
    anchor = values[j].clamp_min(torch.finfo(torch.float64).tiny)
    t = polynomial_preimage((values / anchor).clamp(0.0, g_max), layer.level, hint)
    t[j] = 1.0
    if layer.recover_w_norm:
        norm = anchor
    else:  # W_eff = γ·g(Ŵ): the scale is γ alone, so γ carries the change and W keeps its norm
        norm = sigma_old
        layer.gamma.copy_((gamma * anchor).to(layer.gamma.dtype))
    layer.weight.copy_((norm * (left * t) @ right_h).to(layer.weight.dtype))
    layer.u.copy_(left[:, j].to(layer.u.dtype))
    layer.v.copy_(right_h[j].to(layer.v.dtype))


def _scale_tsvd_rows(layer: TSVDLinear, scale: torch.Tensor) -> None:
    from scipy.optimize import linear_sum_assignment

    u, v, s = layer.U_ortho.double(), layer.V_ortho.double(), layer.s.detach().double()
    q, r = torch.linalg.qr(scale.double()[:, None] * u)
    p, sigma, o_h = torch.linalg.svd(r * s[None, :])
    u_new, v_new, o = q @ p, v @ o_h.T, o_h.T  # diag(scale)·W = u_new·diag(sigma)·v_newᵀ, v_new = V·O
    _, perm = linear_sum_assignment(-o.abs().cpu().numpy())  # new column perm[j] continues old column j
    perm = torch.as_tensor(perm, device=u.device)
    u_new, v_new, sigma = u_new[:, perm], v_new[:, perm], sigma[perm]
    sign = torch.sign(o[torch.arange(o.shape[0], device=u.device), perm])
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    u_new, v_new = u_new * sign, v_new * sign
    flip = torch.where(s < 0, -torch.ones_like(s), torch.ones_like(s))  # negative s stays negative
    u_new, sigma = u_new * flip, sigma * flip
    for param, cache, value in ((layer.U, layer.U_ortho, u_new), (layer.V, layer.V_ortho, v_new)):
        param.copy_(value.to(param.dtype))
        cache.copy_(value.to(cache.dtype))
    layer.s.copy_(sigma.to(layer.s.dtype))
