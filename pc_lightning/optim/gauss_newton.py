"""The Gauss-Newton (GN) model of the next-token cross-entropy, built with ``torch.func``.

Abreu, Vyas, Kakade, Morwani, "The Potential of Second-Order Optimization for LLMs: A Study with Full
Gauss-Newton", arXiv 2510.09378. Around fixed parameters θ_t, for one batch of N target tokens, with
z(θ) the (N, V) logits, J = ∂z/∂θ at θ_t, p = softmax(z(θ_t)) per token and y the targets:

    L(θ_t + Δ) ≈ M(Δ) = L0 + g0·(JΔ) + ½ (JΔ)ᵀ H (JΔ) + (λ/2) ‖Δ‖²
    ∇M(Δ)             = Jᵀ (g0 + H JΔ) + λ Δ

* L0 = mean cross-entropy at θ_t, g0 = ∂L/∂z = (p − onehot(y)) / N;
* H = ∂²L/∂z², block-diagonal over tokens with blocks (diag(p) − p pᵀ) / N, applied in closed form,
  H v = (p ⊙ v − p (pᵀ v)) / N per token, never formed;
* JΔ is a Jacobian-vector product (``torch.func.jvp``, forward mode), Jᵀw a vector-Jacobian product
  (``torch.func.vjp``, reverse mode), both through ``torch.func.functional_call`` at θ_t;
* the GN matrix-vector product is G v = Jᵀ H J v (+ λ v); λ is ``optim.damping``.

J may be taken with respect to a subset of the parameters (``free``), all others held at θ_t: layer-wise
GN uses one transformer block at a time. Forward-mode AD has no rule for the flash / memory-efficient SDPA
kernels, so every call here runs under the math attention backend.
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


def squared_norm(tensors: Params) -> Tensor:
    return sum((t.to(torch.promote_types(t.dtype, torch.float32)) ** 2).sum() for t in tensors.values())


class GaussNewtonModel:
    """M(Δ) of the mean cross-entropy of ``model`` on one batch, around ``theta_t``, for the ``free`` params.

    ``theta_t`` maps every parameter name of ``model`` to its (detached) value at θ_t; Δ is a dict over
    ``free``. Building the object runs one forward pass at θ_t and keeps its graph for Jᵀw.
    """

    def __init__(self, model: nn.Module, theta_t: Params, free: Sequence[str], inputs: Tensor, targets: Tensor,
                 damping: float = 0.0):
        self.model, self.theta_t, self.inputs, self.damping = model, theta_t, inputs, damping
        self.primals = {name: theta_t[name] for name in free}
        with sdpa_kernel(SDPBackend.MATH):
            logits, self._vjp_fn = vjp(self.logits_of, self.primals)
        self.logits_shape, self.logits_dtype = logits.shape, logits.dtype
        self.dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32 at least, as the training loss
        z = logits.detach().to(self.dtype).reshape(-1, logits.size(-1))
        y = targets.reshape(-1)
        self.n_tokens = z.size(0)
        self.probs = torch.softmax(z, dim=-1)
        self.loss0 = F.cross_entropy(z, y)
        self.grad_logits = (self.probs - F.one_hot(y, z.size(-1)).to(z.dtype)) / self.n_tokens

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
        """H v in logit space for the mean loss over N tokens."""
        return cross_entropy_hvp(self.probs, v) / self.n_tokens

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
