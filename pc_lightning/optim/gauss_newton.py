"""The Gauss-Newton (GN) model of the next-token loss (cross-entropy [+ z-loss]), built with ``torch.func``.

Abreu, Vyas, Kakade, Morwani, "The Potential of Second-Order Optimization for LLMs: A Study with Full
Gauss-Newton", arXiv 2510.09378. Around fixed parameters θ_t, for one batch of N target tokens, with
z(θ) the (N, V) logits, J = ∂z/∂θ at θ_t, p = softmax(z(θ_t)) per token and y the targets:

    L(θ_t + Δ) ≈ M(Δ) = L0 + g0·(JΔ) + ½ (JΔ)ᵀ H (JΔ) + (λ/2) ‖Δ‖²
    ∇M(Δ)             = Jᵀ (g0 + H JΔ) + λ Δ

* L0 = the training loss at θ_t, g0 = ∂L/∂z at θ_t, so M(0) = L and ∇M(0) = ∇L exactly;
* H: a positive semi-definite logit-space curvature, block-diagonal over tokens, applied in closed form
  (never formed);
* JΔ is a Jacobian-vector product (``torch.func.jvp``, forward mode), Jᵀw a vector-Jacobian product
  (``torch.func.vjp``, reverse mode), both through ``torch.func.functional_call`` at θ_t;
* the GN matrix-vector product is G v = Jᵀ H J v (+ λ v); λ is ``optim.gn.damping``.

The loss (``next_token_loss`` of :mod:`pc_lightning.modules.pretrain`) per token i, with s_i = log Σ_j exp z_ij
and λ_z = ``model.z_loss``, is ℓ_i = CE_i + λ_z s_i², L = (1/N) Σ_i ℓ_i. Since ∂s/∂z = p and
∂²s/∂z² = diag(p) − p pᵀ:

    g0_i = (p − onehot(y) + 2 λ_z s_i p) / N
    ∂²ℓ_i/∂z² = (diag(p) − p pᵀ)  +  2 λ_z p pᵀ  +  2 λ_z s_i (diag(p) − p pᵀ)
                 cross-entropy      ℓ''(s) ∇s ∇sᵀ     ℓ'(s) ∇²s  ("residual" term)

The z-loss is a loss ℓ(s) = λ_z s² of the output s = log Z: its generalised-GN part 2 λ_z p pᵀ is PSD, the
residual part is PSD only where s_i ≥ 0. We keep the residual part clamped at zero:

    H_i = [(1 + 2 λ_z max(s_i, 0)) (diag(p) − p pᵀ) + 2 λ_z p pᵀ] / N,
    H_i v = [(1 + 2 λ_z max(s_i, 0)) (p ⊙ v − p (pᵀv)) + 2 λ_z p (pᵀv)] / N,

which is PSD for every s and *is* the exact logit-space Hessian of ℓ_i wherever s_i ≥ 0 -- the usual case
(s ≥ max_j z_j and s ≥ mean_j z_j + log V, so s < 0 needs every logit well below −log V). Where s ≥ 0 the
GN matrix is thus Jᵀ (exact logit-space Hessian of the loss) J, as Abreu et al. define it for the
cross-entropy, and M stays convex everywhere. With λ_z = 0, H is the cross-entropy part (diag(p) − p pᵀ) / N
alone. (The alternative of dropping the residual term entirely, 2 λ_z p pᵀ only, is also PSD but discards
curvature that is present and positive in the usual case.)

J may be taken with respect to a subset of the parameters (``free``), all others held at θ_t: layer-wise
GN uses one transformer block at a time. Forward-mode AD has no rule for the flash / memory-efficient SDPA
kernels, so every call here runs under the math attention backend. The model's forward must be a function
of its parameters that ``functional_call`` can substitute: PC layers compute W_eff from ``weight`` when no
per-step cache is set, TSVD layers apply their cached factors through a straight-through map of the raw ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel

Params = dict[str, Tensor]


def cross_entropy_hvp(probs: Tensor, v: Tensor) -> Tensor:
    """Per-token Hessian-vector product of the cross-entropy in logit space: p ⊙ v − p (pᵀ v), shape (N, V)."""
    return probs * v - probs * (probs * v).sum(dim=-1, keepdim=True)


def z_loss_hvp(probs: Tensor, log_z: Tensor, v: Tensor, z_loss: float) -> Tensor:
    """Per-token PSD curvature of z_loss · s², s = log Z, applied to v (module docstring), shape (N, V).

    2 λ_z [p (pᵀv) + max(s, 0) (p ⊙ v − p (pᵀv))]: the exact logit-space Hessian of λ_z s² where s ≥ 0.
    """
    pv = (probs * v).sum(dim=-1, keepdim=True)
    residual = log_z.clamp(min=0).unsqueeze(-1) * (probs * v - probs * pv)
    return 2 * z_loss * (probs * pv + residual)


def squared_norm(tensors: Params) -> Tensor:
    return sum((t.to(torch.promote_types(t.dtype, torch.float32)) ** 2).sum() for t in tensors.values())


class GaussNewtonModel:
    """M(Δ) of the mean next-token loss of ``model`` on one batch, around ``theta_t``, for the ``free`` params.

    ``theta_t`` maps every parameter name of ``model`` to its (detached) value at θ_t; Δ is a dict over
    ``free``. ``z_loss`` is ``model.z_loss`` (the loss is CE + z_loss · mean(s²), as in training).
    Building the object runs one forward pass at θ_t and keeps its graph for Jᵀw. ``loss0`` is the
    training loss at θ_t, ``ce0`` its cross-entropy part and ``log_z0`` the mean log Z (None without z-loss).
    """

    def __init__(self, model: nn.Module, theta_t: Params, free: Sequence[str], inputs: Tensor, targets: Tensor,
                 damping: float = 0.0, z_loss: float = 0.0):
        self.model, self.theta_t, self.inputs, self.damping, self.z_loss = model, theta_t, inputs, damping, z_loss
        self.primals = {name: theta_t[name] for name in free}
        with sdpa_kernel(SDPBackend.MATH):
            logits, self._vjp_fn = vjp(self.logits_of, self.primals)
        self.logits_shape, self.logits_dtype = logits.shape, logits.dtype
        self.dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32 at least, as the training loss
        z = logits.detach().to(self.dtype).reshape(-1, logits.size(-1))
        y = targets.reshape(-1)
        self.n_tokens = z.size(0)
        self.probs = torch.softmax(z, dim=-1)
        self.log_z = torch.logsumexp(z, dim=-1)
        self.ce0 = F.cross_entropy(z, y)
        grad = self.probs - F.one_hot(y, z.size(-1)).to(z.dtype)
        if z_loss > 0:
            self.loss0 = self.ce0 + z_loss * (self.log_z**2).mean()
            self.log_z0: Tensor | None = self.log_z.mean()
            grad = grad + 2 * z_loss * self.log_z.unsqueeze(-1) * self.probs
        else:
            self.loss0, self.log_z0 = self.ce0, None
        self.grad_logits = grad / self.n_tokens

    def logits_of(self, free_params: Params) -> Tensor:
        """z(θ): the model's logits with ``free_params`` substituted and every other parameter at θ_t."""
        return functional_call(self.model, {**self.theta_t, **free_params}, (self.inputs,))

    def jvp(self, delta: Params) -> Tensor:
        """JΔ, shape (N, V)."""
        tangents = {name: delta[name].to(p.dtype) for name, p in self.primals.items()}
        with sdpa_kernel(SDPBackend.MATH):
            _, u = jvp(self.logits_of, (self.primals,), (tangents,))
        return u.to(self.dtype).reshape(self.n_tokens, -1)

    def vjp(self, w: Tensor) -> Params:
        """Jᵀw for w of shape (N, V)."""
        (grads,) = self._vjp_fn(w.reshape(self.logits_shape).to(self.logits_dtype))
        return grads

    def hvp_logits(self, v: Tensor) -> Tensor:
        """H v in logit space for the mean loss over N tokens (cross-entropy [+ z-loss] curvature)."""
        hv = cross_entropy_hvp(self.probs, v)
        if self.z_loss > 0:
            hv = hv + z_loss_hvp(self.probs, self.log_z, v, self.z_loss)
        return hv / self.n_tokens

    def vector_product(self, v: Params) -> Params:
        """The damped GN matrix-vector product (Jᵀ H J + λ I) v."""
        product = self.vjp(self.hvp_logits(self.jvp(v)))
        return {name: g + self.damping * v[name] for name, g in product.items()}

    def value(self, delta: Params, alphas: Sequence[float] = (1.0,)) -> list[Tensor]:
        """M(α Δ) for each α, from one jvp: L0 + α g0·u + ½ α² (uᵀHu + λ‖Δ‖²), u = JΔ."""
        u = self.jvp(delta)
        linear = (self.grad_logits * u).sum()
        quadratic = (u * self.hvp_logits(u)).sum() + self.damping * squared_norm(delta)
        return [self.loss0 + a * linear + 0.5 * a * a * quadratic for a in alphas]

    def value_and_grad(self, delta: Params) -> tuple[Tensor, Params]:
        """M(Δ) and ∇M(Δ) = Jᵀ (g0 + H JΔ) + λΔ (one jvp, one vjp)."""
        u = self.jvp(delta)
        hu = self.hvp_logits(u)
        value = (self.loss0 + (self.grad_logits * u).sum() + 0.5 * (u * hu).sum()
                 + 0.5 * self.damping * squared_norm(delta))
        grads = self.vjp(self.grad_logits + hu)
        return value, {name: g + self.damping * delta[name] for name, g in grads.items()}


def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Forget per-parameter state (moments, momentum buffers), keeping the param groups and their lrs."""
    for part in getattr(optimizer, "optimizers", [optimizer]):
        part.state.clear()
