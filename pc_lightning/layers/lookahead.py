"""The augmented-basis lookahead of a TSVD layer: what one step of the loss would put inside and outside its rank.

Rank-adaptive dynamical low-rank training (Schotthöfer, Zangrando, Kusch, Ceruti, Tudisco, "Low-rank lottery
tickets", NeurIPS 2022; Ceruti, Kusch, Lubich, "A rank-adaptive robust integrator for dynamical low-rank
approximation", BIT 2022) decides a factored layer's rank on an *augmented* basis: U and V are extended by r
directions taken from the gradient, the 2r × 2r core takes a gradient step, and the energy rule truncates the
core's spectrum, so the rank can grow where the step puts energy outside the old subspaces. Here, for a layer
W = U diag(s) Vᵀ with the dense gradient G = ∂L/∂W (:mod:`pc_lightning.callbacks.lookahead_probe`):

* **basis** (:func:`augmented_basis`): Ũ, Ṽ = the top k singular pairs of the gradient's *normal* block
  (I − UUᵀ) G (I − VVᵀ), k = min(r, min(m, n) − r). DLRT augments with span[G V] and span[Gᵀ U]; those mixed
  blocks only rotate U and V (to first order a tangent step keeps the rank, and the layer's own optimizer step
  plus retraction already takes it), while the normal block is the part of the step that raises the rank, so
  it is the part whose energy decides growth;
* **core** (:func:`lookahead`): Ŝ = blockdiag(diag(s) − t·UᵀGV, −t·ŨᵀGṼ), the core of W − t·G restricted to
  the two blocks, with the step length t chosen by the caller (a line search on the loss, see
  :mod:`pc_lightning.callbacks.rank_adaptation`). Its singular values split into ``inside`` (the layer's r
  directions after the step: a direction grown at the last check with s = 0 counts with the value the loss
  asks of it) and ``outside`` (what the step puts in the k new directions), with the directions that carry
  the outside values, ready to be appended to the layer; ``per_direction`` ranks the layer's own directions
  by their value after the step (which to keep when some must go).

The energy rule that turns these values into a rank is :func:`pc_lightning.layers.energy_rank.next_rank`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# exact SVD of the normal block up to this min(m, n); above it, a seeded randomised range finder
EXACT_SVD_MAX = 256


class Lookahead(NamedTuple):
    inside: torch.Tensor  # (r,) singular values of diag(s) − t·UᵀGV
    per_direction: torch.Tensor  # (r,) |s_i − t·(UᵀGV)_ii|: which of the layer's directions matter most
    outside: torch.Tensor  # (k,) singular values of −t·ŨᵀGṼ, descending
    u_new: torch.Tensor  # (m, k) left directions of the outside values, orthonormal and orthogonal to U
    v_new: torch.Tensor  # (n, k) right directions, orthonormal and orthogonal to V


def project_out(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x − q qᵀ x, twice (for round-off), for q with orthonormal columns."""
    for _ in range(2):
        x = x - q @ (q.T @ x)
    return x


def normal_block(grad: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(I − UUᵀ) G (I − VVᵀ)."""
    return project_out(project_out(grad, u).T, v).T


def top_singular_pairs(a: torch.Tensor, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) singular vectors of the k largest singular values of ``a`` (m × n), fp32.

    Exact for small matrices; otherwise a randomised range finder (Halko, Martinsson, Tropp 2011: k + 10
    Gaussian probes, two power iterations) drawn from its own generator, so the run's random stream and the
    result on every process are the same."""
    m, n = a.shape
    if k <= 0:
        return a.new_zeros(m, 0), a.new_zeros(n, 0)
    if min(m, n) <= EXACT_SVD_MAX:
        left, _, right_h = torch.linalg.svd(a, full_matrices=False)
        return left[:, :k], right_h[:k].T
    gen = torch.Generator(device=a.device).manual_seed(seed)
    probes = torch.randn(n, min(k + 10, min(m, n)), generator=gen, device=a.device)
    q = torch.linalg.qr(a @ probes).Q
    for _ in range(2):
        q = torch.linalg.qr(a @ torch.linalg.qr(a.T @ q).Q).Q
    left, _, right_h = torch.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ left)[:, :k], right_h[:k].T


def augmented_basis(grad: torch.Tensor, u: torch.Tensor, v: torch.Tensor, k: int,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ũ (m × k), Ṽ (n × k): orthonormal, orthogonal to U and V, spanning the top of the gradient's normal
    block (see the module docstring)."""
    ut, vt = top_singular_pairs(normal_block(grad, u, v), k, seed)
    return (torch.linalg.qr(project_out(ut, u)).Q if k else ut), (torch.linalg.qr(project_out(vt, v)).Q if k else vt)


def project_blocks(grad: torch.Tensor, u: torch.Tensor, v: torch.Tensor, ut: torch.Tensor,
                   vt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(UᵀGV, ŨᵀGṼ): the two blocks of the gradient the lookahead core uses (linear in G, so a mean over
    processes can be taken on them instead of on G)."""
    return u.T @ grad @ v, ut.T @ grad @ vt


def step_direction(u: torch.Tensor, v: torch.Tensor, ut: torch.Tensor, vt: torch.Tensor, inner: torch.Tensor,
                   outer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with D = A Bᵀ = −(U (UᵀGV) Vᵀ + Ũ (ŨᵀGṼ) Ṽᵀ): the negative gradient restricted to the two blocks
    of the lookahead core, the direction along which the step length is measured. ‖D‖² = ‖UᵀGV‖² + ‖ŨᵀGṼ‖²
    = −⟨G, D⟩ (the bases are orthonormal)."""
    return torch.cat([u @ -inner, ut @ -outer], dim=1), torch.cat([v, vt], dim=1)


def lookahead(s: torch.Tensor, ut: torch.Tensor, vt: torch.Tensor, inner: torch.Tensor, outer: torch.Tensor,
              step: float) -> Lookahead:
    """The singular values of the lookahead core blockdiag(diag(s) − t·UᵀGV, −t·ŨᵀGṼ) and the directions of
    the outside ones (fp32)."""
    core = torch.diag(s.detach().float()) - step * inner
    inside, per_direction = torch.linalg.svdvals(core), torch.diagonal(core).abs()
    if ut.shape[1] == 0:
        return Lookahead(inside, per_direction, inside.new_zeros(0), ut, vt)
    p, outside, q_h = torch.linalg.svd(-step * outer)
    return Lookahead(inside, per_direction, outside, ut @ p, vt @ q_h.T)
