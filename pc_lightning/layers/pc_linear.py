"""PC layer: a linear layer whose applied weight is a polynomial preconditioning of its raw weight.

Wang, Fang, Zhang, Zhang, Zhao, Schwing, Sun, "PC Layer", arXiv 2606.06470 (docs/pc.md):

    σ̂ = uᵀ W v                         (u, v: unit vectors refined by streaming power iteration, no gradient)
    Ŵ = W / (σ̂ + ε)                     (normaliser ``spectral``; ``none``: Ŵ = W, for ablation)
    W_eff = γ · sg(σ̂) · g_k(Ŵ)          (sg(σ̂) only with ``recover_w_norm``; γ a learnable scalar, init 1)

with g_k the odd polynomial of :mod:`pc_lightning.layers.pc_polynomial`. The normaliser (σ̂ and the
division) always runs in fp32; the polynomial runs in the ambient dtype (bf16 matmuls under autocast).

During training, :class:`pc_lightning.callbacks.pc_step.PCStep` evaluates W_eff for all PC layers once per
optimizer step (batched by shape, :func:`effective_weights`) and sets ``step_weight``, a detached leaf the
forward uses; without it (evaluation, standalone use) the forward computes W_eff itself. Training without
the callback must call :func:`power_iteration` once per optimizer step, or σ̂ goes stale.

Per-forward mode (``evaluate_in_forward``, set by :func:`evaluate_in_forward` when ``model.pc.evaluate``
resolves to ``forward``, e.g. under FSDP, whose raw weights are whole only inside the forward): every training
forward (module in training mode, gradients enabled) first refines σ̂ by ``power_iters`` power-iteration
steps, then computes W_eff with its graph to W and γ. With one micro-batch per optimizer step this is the
same computation as the PCStep path; with gradient accumulation σ̂ is refined once per micro-batch (the
weights do not change between them, so only the estimate's convergence differs) and the polynomial's
forward and backward run per micro-batch. The polynomial then runs in the ambient autocast dtype
(``bf16_matmuls`` applies to the PCStep path only).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pc_lightning.config import PCConfig
from pc_lightning.layers.pc_polynomial import apply_polynomial

# Power-iteration steps run at initialisation, so that σ̂ is accurate from the first step on.
INIT_POWER_ITERS = 50


class PCLinear(nn.Module):
    """y = x W_effᵀ with W_eff = γ·σ̂·g(W/σ̂); ``weight`` (out, in) is the raw trained matrix."""

    def __init__(self, in_features: int, out_features: int, cfg: PCConfig):
        super().__init__()
        if cfg.level is None:
            raise ValueError("model.pc.level must be resolved (config.resolve: the reference's level for optim.name) "
                             "or set before building a PC layer")
        self.in_features, self.out_features = in_features, out_features
        self.level = cfg.level
        self.normalizer = cfg.normalizer
        self.recover_w_norm = cfg.recover_w_norm
        self.power_iters = cfg.power_iters
        self.eps = cfg.eps
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        gamma = torch.full((1,), float(cfg.gamma_init))  # shape (1,), not a scalar: FSDP refuses 0-dim parameters
        if cfg.learnable_gamma:
            self.gamma = nn.Parameter(gamma)
        else:
            self.register_buffer("gamma", gamma)
        self.register_buffer("u", F.normalize(torch.randn(out_features), dim=0))
        self.register_buffer("v", F.normalize(torch.randn(in_features), dim=0))
        # W_eff of the current optimizer step, a leaf requiring grad; set and cleared by the PCStep callback.
        self.step_weight: torch.Tensor | None = None
        # Per-forward mode: power iteration in every training forward (no PCStep); see the module docstring.
        self.evaluate_in_forward = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, level={self.level}, "
                f"normalizer={self.normalizer}, recover_w_norm={self.recover_w_norm}")

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=std)
        power_iteration([self], INIT_POWER_ITERS)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Checkpoints written before γ became shape (1,) hold it as a 0-dim tensor.
        gamma = state_dict.get(prefix + "gamma")
        if gamma is not None and gamma.ndim == 0:
            state_dict[prefix + "gamma"] = gamma.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def effective_weight(self) -> torch.Tensor:
        """W_eff (out, in) in fp32 (fp64 for an fp64 layer) from the current u, v; what merge and monitors read."""
        return effective_weights([self])[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step_weight is not None:
            return F.linear(x, self.step_weight.to(x.dtype))
        if self.evaluate_in_forward and self.training and torch.is_grad_enabled():
            power_iteration([self])
        return F.linear(x, self.effective_weight().to(x.dtype))


def evaluate_in_forward(model: nn.Module) -> None:
    """Switch every PC layer of ``model`` to per-forward mode (W_eff and power iteration in each training forward)."""
    for layer in model.modules():
        if isinstance(layer, PCLinear):
            layer.evaluate_in_forward = True


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """t in fp32, or in fp64 when it already is (fp64 runs stay exact, e.g. in gradient checks)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _group_key(layer: PCLinear) -> tuple:
    return (tuple(layer.weight.shape), layer.weight.device, layer.level, layer.normalizer, layer.recover_w_norm,
            layer.eps)


def group_by_shape(layers: Sequence[PCLinear]) -> list[list[int]]:
    """Indices of layers that can share one batched evaluation (same shape, device and settings)."""
    groups: dict[tuple, list[int]] = {}
    for i, layer in enumerate(layers):
        groups.setdefault(_group_key(layer), []).append(i)
    return list(groups.values())


def power_iterate(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` power-iteration steps on a stack: v ← Wᵀu/‖Wᵀu‖, u ← Wv/‖Wv‖; w (B, m, n), u (B, m), v (B, n)."""
    for _ in range(steps):
        v = F.normalize(torch.einsum("bmn,bm->bn", w, u), dim=-1)
        u = F.normalize(torch.einsum("bmn,bn->bm", w, v), dim=-1)
    return u, v


def group_effective_weight(w: torch.Tensor, gamma: torch.Tensor, u: torch.Tensor, v: torch.Tensor, level: int,
                           normalizer: str, recover_w_norm: bool, eps: float) -> torch.Tensor:
    """W_eff = scale·g(Ŵ) for a stack of same-shape weights w (B, m, n) with gains γ (B,) and power-iteration
    vectors u (B, m), v (B, n): σ̂ = uᵀWv and Ŵ = W/(σ̂ + ε) in fp32, the polynomial in the ambient dtype."""
    with torch.autocast(device_type=w.device.type, enabled=False):  # fp32 normaliser
        w = at_least_fp32(w)
        gamma = at_least_fp32(gamma)
        if normalizer == "spectral":
            sigma = torch.einsum("bm,bmn,bn->b", at_least_fp32(u), w, at_least_fp32(v))
            w_hat = w / (sigma + eps)[:, None, None]
            scale = gamma * sigma.detach() if recover_w_norm else gamma
        else:
            w_hat, scale = w, gamma
    return scale[:, None, None] * at_least_fp32(apply_polynomial(w_hat, level))


@torch.no_grad()
def power_iteration(layers: Sequence[PCLinear], steps: int | None = None) -> None:
    """Refine u, v towards W's top singular vectors (warm-started, fp32), batched over same-shape layers;
    ``steps`` defaults to each layer's ``power_iters``."""
    for idx in group_by_shape(layers):
        group = [layers[i] for i in idx]
        w = at_least_fp32(torch.stack([layer.weight.detach() for layer in group]))
        u = at_least_fp32(torch.stack([layer.u for layer in group]))
        v = at_least_fp32(torch.stack([layer.v for layer in group]))
        u, v = power_iterate(w, u, v, group[0].power_iters if steps is None else steps)
        torch._foreach_copy_([layer.u for layer in group], list(u.unbind()))
        torch._foreach_copy_([layer.v for layer in group], list(v.unbind()))


def effective_weights(layers: Sequence[PCLinear]) -> list[torch.Tensor]:
    """W_eff (fp32; fp64 for fp64 weights) of every layer, differentiable w.r.t. weight and γ.

    One batched normaliser and polynomial per group of same-shape layers (:func:`group_effective_weight`).
    """
    out: list[torch.Tensor | None] = [None] * len(layers)
    for idx in group_by_shape(layers):
        group = [layers[i] for i in idx]
        first = group[0]
        w_eff = group_effective_weight(
            torch.stack([layer.weight for layer in group]), torch.cat([layer.gamma.reshape(1) for layer in group]),
            torch.stack([layer.u for layer in group]), torch.stack([layer.v for layer in group]),
            first.level, first.normalizer, first.recover_w_norm, first.eps)
        for j, i in enumerate(idx):
            out[i] = w_eff[j]
    return out  # type: ignore[return-value]
