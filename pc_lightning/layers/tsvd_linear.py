"""TSVD layer: a linear map held as truncated-SVD factors with cached orthonormal U and V.

Kamali, Schweighofer, Shahrzad, Francon, Hodjat, Miikkulainen, "Efficient Pre-Training of LLMs through
Truncated SVD Layers", arXiv 2605.28573 (2026).

    W = U · diag(s) · Vᵀ,   U ∈ R^{m×r}, V ∈ R^{n×r}, UᵀU = VᵀV = I_r,   y = ((x V) ⊙ s) Uᵀ

so a token costs r(m + n) multiply-adds instead of m·n, and |s| *are* W's singular values (U, V orthonormal).

What the paper does (as far as we could read it): every weight matrix is kept in truncated-SVD form for
the whole of pre-training; U and V are kept *strictly* orthonormal, and the orthonormalisation is cached
so that it is not recomputed on every access; the rank of each layer is adapted during training by a
spectral-energy rule (keep the smallest r with Σ_{i≤r} s_i² ≥ τ Σ_i s_i²). Only the paper's abstract and
introduction were retrievable from the stored copies available to us, not its method section; the exact
recipe below and in the callbacks (retraction, refresh schedule, the rank rule with its memory of dropped
values and its augmented-basis lookahead, :mod:`pc_lightning.layers.energy_rank`,
:mod:`pc_lightning.layers.lookahead`, optimizer-state handling, weight decay of s) is *ours*
(docs/tsvd.md): treat every detail that is not in the paragraph above as a possible deviation from the paper.

How orthonormality and gradients are reconciled here:

* Trainable parameters ``U`` (m×r), ``V`` (n×r), ``s`` (r) are unconstrained. Buffers ``U_ortho`` and
  ``V_ortho`` hold an orthonormalised copy (``ortho_method``: the Q of the QR factorisation with a positive
  diagonal, computed by Cholesky-QR (default) or Householder QR, or a few cubic Newton-Schulz polar steps
  X ← X(3I − XᵀX)/2; :func:`orthonormalize`). Every forward uses the *cached* copies,
  so ‖UᵀU − I‖∞ stays at round-off at every forward, between refreshes too.
* Gradients reach the raw parameters by a straight-through map: the forward value is the cached factor,
  the backward passes ∂L/∂U_ortho to ``U`` unchanged (:func:`straight_through`). The optimizer thus takes
  an unconstrained step from the orthonormal point, and :meth:`TSVDLinear.refresh` (called after the
  optimizer step by :class:`pc_lightning.callbacks.ortho_refresh.OrthoRefresh`, every
  ``refresh_every`` steps) orthonormalises the raw factor and *writes it back* into the parameter: a
  QR / polar retraction. With ``refresh_every = 1`` this is exactly "step, then retract"; with k > 1 the
  forward keeps the last orthonormal factors for k steps while the raw ones accumulate updates.
* Why not ``torch.nn.utils.parametrizations.orthogonal`` + ``parametrize.cached()``: that cache lives only
  inside one ``with cached():`` block (one forward/backward, the graph through the map is needed for the
  gradient), so it cannot carry an orthonormal factor across optimizer steps; and differentiating through
  QR every step is what the caching is meant to avoid.
* ``s`` is a plain parameter (it may change sign: |s| are the singular values). Weight decay of the matrix
  parameter groups hits ``U``/``V``, where the retraction removes it (QR of c·U has the same Q); what decays
  the layer is the decay of ``s`` (``optim.decay_tsvd_s``, default on, optim/factory.py): ‖W‖_F = ‖s‖, so
  decaying s is decaying W in Frobenius norm, as a dense layer is decayed.
* ``dropped`` (buffer): the singular values the rank rule left out at earlier checks, which it keeps counting
  (:func:`pc_lightning.layers.energy_rank.next_rank`); its length changes with them.
* Persistence: the caches are persistent buffers, so a checkpoint resumes with exactly the factors the
  forward used. Loading a state dict whose rank differs from this layer's resizes the layer first
  (:meth:`_load_from_state_dict`), so checkpoints written after a rank change load into a fresh model (one
  written before ``dropped`` existed loads with none).
* Dense conversion: :meth:`effective_weight` returns U_ortho·diag(s)·V_orthoᵀ in fp32, exactly the map the
  forward applies; the generic merge (``pc_lightning.merge``) writes it into a plain linear layer.

Initialisation (``init_weights(std)``): with ``init_from_svd`` the top-r SVD of a normal(0, std²) m×n
matrix (the dense init truncated), else random orthonormal U, V with every s_i = std·sqrt(max(m, n)), the
root-mean-square singular value of that dense matrix. r = round(init_rank_fraction · min(m, n)), clamped
to [r_min, r_max].
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from torch import nn

from pc_lightning.config import TSVDConfig


def straight_through(raw: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """The value of ``cached`` with the derivative of ``raw``: cached + (raw − sg(raw)).

    raw − sg(raw) is exactly zero in floating point (x − x = 0 for every finite x), so the forward applies
    the cached orthonormal factor bit for bit, while ∂/∂raw is the identity: the gradient of the cached
    factor goes to the raw parameter as is. Written as plain tensor ops rather than a custom
    ``autograd.Function`` so that every ``torch.func`` transform sees the same map: ``functional_call``
    with substituted raw factors reaches it, and ``jvp`` / ``vjp`` / ``jacrev`` (the Gauss-Newton model,
    :mod:`pc_lightning.optim.gauss_newton`) need no hand-written rules. The cost is two elementwise ops on
    the r(m + n) factor entries per forward, negligible beside the matmuls. (A non-finite raw factor makes
    the forward non-finite too, which the divergence check then reports.)
    """
    return cached + (raw - raw.detach())


# Cholesky-QR and Newton-Schulz results are accepted when they reach this error; otherwise the retraction
# falls back to Householder QR. Ten times below the 1e-4 the layer promises, above fp32 round-off of a QR.
FALLBACK_TOLERANCE = 1e-5


@contextlib.contextmanager
def ieee_fp32_matmuls():
    """fp32 matmuls at full precision inside, whatever the run chose (``torch.set_float32_matmul_precision``).

    With TF32 (precision ``high``/``medium``, common on GPUs) a Gram product carries a 10-bit mantissa, so
    ‖QᵀQ − I‖ would sit near 1e-3, far above the 1e-4 this layer promises; the retraction and the resize run
    their few small matmuls at IEEE precision instead."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def orthonormality_error(q: torch.Tensor) -> torch.Tensor:
    """‖QᵀQ − I‖∞ (max absolute entry, over the stack too for (B, n, r)), computed in fp32; NaN stays NaN."""
    q = q.detach().float()
    gram = q.mT @ q
    return (gram - torch.eye(gram.shape[-1], device=q.device)).abs().amax()


def orthonormalize(x: torch.Tensor, method: str, ns_steps: int = 5) -> torch.Tensor:
    """Orthonormal columns spanning (close to) x's, in fp32; x is (n, r) or a stack (B, n, r).

    ``qr``: Q of the Householder QR x = QR with the signs fixed so that diag(R) > 0 (the QR retraction; without
    the fix a column could flip sign between refreshes). ``cholesky_qr``: the same Q (the QR factorisation with
    diag(R) > 0 is unique) as Q = x·R⁻¹ with RᵀR = xᵀx the Cholesky factorisation of the r×r Gram matrix: one
    Gram product, a small Cholesky and a triangular solve, all matmul-like and batched, where Householder QR is
    a long chain of small panel operations (slow on GPUs). Its error grows like the round-off times cond(x)²,
    tiny for a raw factor one optimizer step away from orthonormal; where the Cholesky factorisation fails the
    result is NaN. ``newton_schulz``: cubic Newton-Schulz iteration towards the polar factor,
    X ← X(3I − XᵀX)/2; it converges quadratically for singular values in (0, √3). For the last two the caller
    checks the result (:func:`retract`).
    """
    x = x.float()
    if method == "qr":
        q, r = torch.linalg.qr(x)
        sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
        return q * torch.where(sign == 0, torch.ones_like(sign), sign).unsqueeze(-2)
    if method == "cholesky_qr":
        r, info = torch.linalg.cholesky_ex(x.mT @ x, upper=True)
        q = torch.linalg.solve_triangular(r, x, upper=True, left=False)
        return torch.where((info == 0)[..., None, None], q, torch.full_like(q, float("nan")))
    if method == "newton_schulz":
        eye = torch.eye(x.shape[-1], device=x.device)
        for _ in range(ns_steps):
            x = x @ (1.5 * eye - 0.5 * (x.mT @ x))
        return x
    raise ValueError(f"unknown ortho_method {method!r}")


@torch.no_grad()
def retract(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], method: str, ns_steps: int = 5) -> float:
    """The retraction of raw factors onto orthonormal ones: for each (raw, cache), Q = orth(raw) is written into
    the cache *and* the raw parameter. Same-shape factors are orthonormalised as one stack (a handful of
    launches per shape instead of per matrix). ``cholesky_qr`` / ``newton_schulz`` results above
    FALLBACK_TOLERANCE (or NaN) are redone with Householder QR. Returns the largest orthonormality error
    afterwards (one or two host syncs)."""
    groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for raw, cache in factors:
        groups.setdefault((tuple(raw.shape), raw.dtype, raw.device), []).append((raw, cache))
    stacks = [torch.stack([raw for raw, _ in group]) for group in groups.values()]
    with ieee_fp32_matmuls():
        qs = [orthonormalize(x, method, ns_steps) for x in stacks]  # fp32
        errors = [orthonormality_error(q) for q in qs]
        if method != "qr":
            accepted = (torch.stack(errors) <= FALLBACK_TOLERANCE).tolist()  # NaN compares False
            for i, ok in enumerate(accepted):
                if not ok:
                    qs[i] = orthonormalize(stacks[i], "qr")
                    errors[i] = orthonormality_error(qs[i])
        stored = [q.to(x.dtype) for q, x in zip(qs, stacks)]
        # what the forward will use: the same as the fp32 result unless the factors are kept in lower precision
        errors = [e if q.dtype == torch.float32 else orthonormality_error(q) for e, q in zip(errors, stored)]
    for group, q in zip(groups.values(), stored):
        for (raw, cache), q_i in zip(group, q):
            cache.copy_(q_i)
            raw.copy_(q_i)
    return float(torch.stack(errors).max()) if errors else 0.0


def refresh_all(model: nn.Module, method: str) -> float:
    """Refresh every TSVD layer of ``model``, same-shape factors as one stack (:func:`retract`); returns the
    largest orthonormality error afterwards (ends in a host sync)."""
    from pc_lightning.layers import iter_layers

    layers = [layer for _, layer in iter_layers(model, TSVDLinear)]
    if not layers:
        return 0.0
    return retract([pair for layer in layers for pair in layer.raw_and_cached()], method, layers[0].cfg.ns_steps)


def rank_bounds(in_features: int, out_features: int, cfg: TSVDConfig) -> tuple[int, int]:
    """[r_min, r_max] from the config fractions of min(m, n); r_min >= 1."""
    full = min(in_features, out_features)
    r_min = max(1, math.ceil(cfg.min_rank_fraction * full))
    r_max = max(r_min, math.floor(cfg.max_rank_fraction * full))
    return r_min, r_max


class TSVDLinear(nn.Module):
    """y = ((x V) ⊙ s) Uᵀ with U, V orthonormal (cached); see the module docstring."""

    def __init__(self, in_features: int, out_features: int, cfg: TSVDConfig):
        super().__init__()
        self.in_features, self.out_features, self.cfg = in_features, out_features, cfg
        self.r_min, self.r_max = rank_bounds(in_features, out_features, cfg)
        r = min(max(round(cfg.init_rank_fraction * min(in_features, out_features)), self.r_min), self.r_max)
        self.U = nn.Parameter(torch.empty(out_features, r))
        self.V = nn.Parameter(torch.empty(in_features, r))
        self.s = nn.Parameter(torch.empty(r))
        self.register_buffer("U_ortho", torch.empty(out_features, r))
        self.register_buffer("V_ortho", torch.empty(in_features, r))
        # singular values the rank rule left out (energy_rank.next_rank), fp32, variable length
        self.register_buffer("dropped", torch.zeros(0))
        self._random_init(0.02)  # cheap placeholder: the model calls init_weights(std) (an SVD) next

    @property
    def rank(self) -> int:
        return self.s.shape[0]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

    # ------------------------------------------------------------------ init / refresh
    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        if not self.cfg.init_from_svd:
            self._random_init(std)
            return
        m, n, r = self.out_features, self.in_features, self.rank
        u, s, vh = torch.linalg.svd(torch.randn(m, n, device=self.U.device) * std, full_matrices=False)
        self._set_factors(u[:, :r], s[:r], vh[:r].T)

    @torch.no_grad()
    def _random_init(self, std: float) -> None:
        """Random orthonormal U, V; every s_i = std·sqrt(max(m, n)), the dense init's RMS singular value."""
        m, n, r, device = self.out_features, self.in_features, self.rank, self.U.device
        u = orthonormalize(torch.randn(m, r, device=device), "qr")
        v = orthonormalize(torch.randn(n, r, device=device), "qr")
        self._set_factors(u, torch.full((r,), std * math.sqrt(max(m, n)), device=device), v)

    @torch.no_grad()
    def _set_factors(self, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> None:
        """Raw parameters and caches := the given orthonormal factors (shapes may change: resize)."""
        dtype = self.U.dtype
        for param, value in ((self.U, u), (self.V, v), (self.s, s)):
            param.data = value.to(dtype).contiguous()
            param.grad = None
        self.U_ortho = u.to(dtype).clone()
        self.V_ortho = v.to(dtype).clone()

    def raw_and_cached(self) -> tuple[tuple[nn.Parameter, torch.Tensor], ...]:
        """(raw parameter, cached orthonormal copy) for U and V: what :func:`retract` works on."""
        return (self.U, self.U_ortho), (self.V, self.V_ortho)

    def refresh(self, method: str | None = None) -> float:
        """Orthonormalise the raw factors, cache them and write them back into the parameters (retraction);
        returns the orthonormality error afterwards. Whole models: ``ortho_refresh.refresh_all`` (batched)."""
        return retract(self.raw_and_cached(), method or self.cfg.ortho_method, self.cfg.ns_steps)

    @torch.no_grad()
    def orthonormality_error(self) -> torch.Tensor:
        """max(‖UᵀU − I‖∞, ‖VᵀV − I‖∞) of the cached factors the forward uses (a 0-dim tensor)."""
        return torch.maximum(orthonormality_error(self.U_ortho), orthonormality_error(self.V_ortho))

    # ------------------------------------------------------------------ rank changes
    @torch.no_grad()
    def resize(self, new_rank: int, new_directions: tuple[torch.Tensor, torch.Tensor] | None = None,
               keep_count: int | None = None, priority: torch.Tensor | None = None) -> torch.Tensor:
        """Change the rank to ``new_rank``, keeping the top ``keep_count`` (default: as many as fit) singular
        directions (largest |s|, or largest ``priority``: one value per direction) and appending new ones for
        the rest.

        The factors are refreshed first, then sorted by |s| (``priority``) descending; the tail is dropped, and
        new directions
        orthonormal to the kept ones are appended with s = 0 (so W is unchanged by growth): the columns of
        ``new_directions`` = (left m × k, right n × k) first (the rank rule's augmented directions), random ones
        for any still missing. Returns ``keep``: the old rank indices now at positions 0..len(keep)-1 (positions
        beyond are new), which :mod:`pc_lightning.callbacks.rank_adaptation` uses to remap optimizer state.
        """
        self.refresh()
        order = torch.argsort((self.s.abs() if priority is None else priority.to(self.s.device)), descending=True)
        keep = order[: min(new_rank, self.rank) if keep_count is None else min(keep_count, new_rank, self.rank)]
        u, v, s = self.U_ortho[:, keep].float(), self.V_ortho[:, keep].float(), self.s[keep].float()
        grow = new_rank - keep.numel()
        if grow > 0:
            with ieee_fp32_matmuls():  # the new directions must be orthogonal to the kept ones to round-off
                u = torch.cat([u, self._complement(u, grow, None if new_directions is None else new_directions[0])], 1)
                v = torch.cat([v, self._complement(v, grow, None if new_directions is None else new_directions[1])], 1)
            s = torch.cat([s, s.new_zeros(grow)])
        self._set_factors(u, s, v)
        return keep

    @classmethod
    def _complement(cls, q: torch.Tensor, k: int, given: torch.Tensor | None) -> torch.Tensor:
        """k orthonormal columns orthogonal to q's: the first columns of ``given`` (re-orthonormalised), then
        random ones."""
        if given is None or given.shape[1] == 0:
            return cls._orthonormal_complement(q, k)
        x = given[:, :k].to(q)
        for _ in range(2):
            x = x - q @ (q.T @ x)
        x = orthonormalize(x, "qr")
        if x.shape[1] < k:
            x = torch.cat([x, cls._orthonormal_complement(torch.cat([q, x], 1), k - x.shape[1])], 1)
        return x

    @staticmethod
    def _orthonormal_complement(q: torch.Tensor, k: int) -> torch.Tensor:
        """k random orthonormal columns orthogonal to q's (projected twice for round-off)."""
        x = torch.randn(q.shape[0], k, device=q.device)
        for _ in range(2):
            x = x - q @ (q.T @ x)
        return orthonormalize(x, "qr")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A checkpoint written after a rank change: take its shapes, then let the default loader copy.
        saved = state_dict.get(prefix + "s")
        if saved is not None and saved.shape[0] != self.rank:
            r = saved.shape[0]
            with torch.no_grad():
                self._set_factors(self.U.new_empty(self.out_features, r), self.s.new_empty(r),
                                  self.V.new_empty(self.in_features, r))
        dropped = state_dict.get(prefix + "dropped")
        if dropped is not None and dropped.shape != self.dropped.shape:
            self.dropped = self.dropped.new_zeros(dropped.shape)
        elif dropped is None and not self.dropped.numel():  # a checkpoint from before the rank rule kept them
            state_dict[prefix + "dropped"] = self.dropped
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ------------------------------------------------------------------ forward
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, s, V) as the forward uses them: cached orthonormal values, gradients to the raw parameters."""
        return straight_through(self.U, self.U_ortho), self.s, straight_through(self.V, self.V_ortho)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, s, v = self.factors()
        return ((x @ v) * s) @ u.T

    def effective_weight(self) -> torch.Tensor:
        """The dense (out, in) matrix this layer applies, U·diag(s)·Vᵀ in fp32 (merge, spectrum monitor)."""
        u, s, v = self.factors()
        return (u.float() * s.float()) @ v.float().T
