"""Measure the augmented-basis lookahead of every TSVD layer on a batch: what a step of the loss would put inside
and outside each layer's subspaces (the evidence of the rank rule, :mod:`pc_lightning.callbacks.rank_adaptation`).

The lookahead (rank-adaptive augmented-basis step of dynamical low-rank training, Schotthöfer et al. 2022;
Ceruti, Kusch & Lubich 2022; the linear algebra is :mod:`pc_lightning.layers.lookahead`), on the batch of the
step just taken, :func:`measure_lookahead`:

1. the batch's rows are split in two halves A and B (sample splitting: the directions are chosen on A and
   measured on B, so B's noise is not what selected them; :func:`split_rows`);
2. on A: the dense gradient G_A = ∂L/∂W of every TSVD layer (:func:`layer_gradients`), and from it the augmented
   basis Ũ, Ṽ: the top k = min(r, min(m, n) − r) singular pairs of (I − UUᵀ) G_A (I − VVᵀ);
3. on B: the blocks UᵀG_BV and ŨᵀG_BṼ, and the step direction D = −(U UᵀG_BV Vᵀ + Ũ ŨᵀG_BṼ Ṽᵀ) of every layer;
4. the step t: a line search for the minimum of the loss of the *other* half A along D, every layer applying
   W + tD (forward passes only; :func:`perturbed_loss`, :func:`line_search`), over t ∈ [0, ‖W‖/‖D‖] (the step
   never moves the weights by more than their norm), one number for the model; t = 0 (no lookahead) if no step
   lowers A's loss. On a quadratic loss this is the Newton step ‖D‖² / DᵀHD; measured on held-out rows, it
   only goes as far as the step generalises beyond the rows that set its values;
5. per layer, the singular values of blockdiag(diag(s) − t·UᵀG_BV, −t·ŨᵀG_BṼ): ``inside`` and ``outside``.

Why the dense gradient: a TSVD layer's trainable factors only ever see the *tangent* part of G
(∂L/∂U = G V diag(s), ∂L/∂V = Gᵀ U diag(s), ∂L/∂s = diag(UᵀGV)); the part (I − UUᵀ) G (I − VVᵀ) outside both
subspaces is what rank growth needs, and no factor gradient, optimizer moment or optimizer update (AdamW's or
Muon's alike) contains it, so it costs an extra forward/backward at each check. Why this step: the energy rule
compares values with W's singular values, so the step must have W's units: a step of the learning rate's size
puts ~nothing outside (the rule would erode as before), and Adam's and Muon's normalised updates have no length
in W's units either. The line-search minimum along D is the loss's own answer to "how far would the dense matrix
move there", independent of the optimizer, its learning rate and schedule.

How G is computed (:func:`layer_gradients`): forward hooks on the TSVD layers record each layer's input x and
output y while ``loss_of(batch)`` runs the model's plain Python forward (a model compiled in place runs eagerly
here, and any DDP wrapper is bypassed: nothing is all-reduced behind our back);
``torch.autograd.grad(loss, [y, ...])`` gives δ = ∂L/∂y for every layer in one backward that stops at the layer
outputs, so no parameter's ``.grad`` is written; G = Σ_tokens δᵀ x in fp32 (out × in), handed to
``transform(name, G)`` one layer at a time, so only one dense gradient is held at once. Under DDP ``reduce``
averages G (for the basis) and the blocks over the ranks, and the line-search losses, so every rank measures
the global batch's lookahead.

Cost per check: one forward/backward pass of the batch (halves A and B) and typically 5-15 forward passes of
half of it (the line search), in fp32 with IEEE matmuls.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from torch import nn

from pc_lightning.layers.lookahead import Lookahead, augmented_basis, lookahead, project_blocks, step_direction
from pc_lightning.layers.tsvd_linear import TSVDLinear, ieee_fp32_matmuls

# the line search tries steps ‖W‖/‖D‖ · 2^-j for j up to this (a millionth of the longest)
MAX_HALVINGS = 20

Layers = list[tuple[str, TSVDLinear]]
Reduce = Callable[[torch.Tensor], torch.Tensor]
Perturbation = dict[str, tuple[torch.Tensor, torch.Tensor]]


@contextlib.contextmanager
def record_layers(layers: Layers, perturb: Perturbation | None = None
                  ) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Inside: every forward of a listed layer stores (input, output) under its name, the output plus x·B·Aᵀ
    where ``perturb`` names the layer."""
    records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            if perturb and name in perturb:
                a, b = perturb[name]
                output = output + (x @ b.to(x.dtype)) @ a.to(x.dtype).T
            records[name] = (x, output)
            return output
        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def layer_gradients(loss_of: Callable[[torch.Tensor], torch.Tensor], layers: Layers,
                    batch: torch.Tensor, transform: Callable[[str, torch.Tensor], Any] | None = None
                    ) -> dict[str, Any]:
    """{layer name: transform(name, ∂L/∂W)} (the dense out × in fp32 gradient itself without ``transform``)
    of the scalar ``loss_of(batch)``; each layer must run exactly once in that forward."""
    with torch.enable_grad(), record_layers(layers) as records:
        loss = loss_of(batch)
        names = [name for name, _ in layers if name in records]
        deltas = torch.autograd.grad(loss, [records[name][1] for name in names])
    out = {}
    for name, delta in zip(names, deltas):
        x = records.pop(name)[0].detach()
        grad = delta.reshape(-1, delta.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
        out[name] = transform(name, grad) if transform is not None else grad
    return out


@torch.no_grad()
def perturbed_loss(loss_of: Callable[[torch.Tensor], torch.Tensor], layers: Layers,
                   batch: torch.Tensor, perturb: Perturbation | None = None) -> torch.Tensor:
    """``loss_of(batch)`` (forward only) with the listed layers applying W + A Bᵀ where ``perturb`` names them."""
    with record_layers(layers, perturb):
        return loss_of(batch).detach().float()


def split_rows(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and the second half of the batch's rows, or the batch twice when it has one row.

    Contiguous halves keep the split the same under DDP: the sampler deals global samples to the ranks in
    turn (rank i gets samples i, i + world, ...), so the first halves of all ranks' batches together are the
    first half of the global batch, whatever the number of ranks."""
    half = batch.shape[0] // 2
    return (batch[:half], batch[half:]) if half else (batch, batch)


def lm_loss(pl_module: L.LightningModule) -> Callable[[torch.Tensor], torch.Tensor]:
    """batch (B, T+1) -> the training loss (cross-entropy + z-loss) of the model's plain forward."""
    from pc_lightning.modules.pretrain import next_token_loss

    model, z_loss = pl_module.model, pl_module.cfg.model.z_loss
    return lambda batch: next_token_loss(model.forward(batch[:, :-1]), batch[:, 1:], z_loss)[0]


def measure_lookahead(layers: Layers, loss_of: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor,
                      reduce: Reduce = lambda t: t, seed: int = 0) -> tuple[float, dict[str, Lookahead]]:
    """(line-search step t, {layer: lookahead values and directions}); steps 1-5 of the module docstring."""
    half_a, half_b = split_rows(batch)
    by_name = dict(layers)

    def factors(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        layer = by_name[name]
        return layer.U_ortho.float(), layer.V_ortho.float()

    def basis(name: str, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, v = factors(name)
        layer = by_name[name]
        k = min(layer.rank, min(layer.in_features, layer.out_features) - layer.rank)
        return augmented_basis(reduce(grad), u, v, k, seed)

    with torch.autocast(batch.device.type, enabled=False), ieee_fp32_matmuls():
        bases = layer_gradients(loss_of, layers, half_a, transform=basis)
        blocks = layer_gradients(loss_of, layers, half_b, transform=lambda name, grad: tuple(
            reduce(b) for b in project_blocks(grad, *factors(name), *bases[name])))
        directions = {name: step_direction(*factors(name), *bases[name], *blocks[name]) for name in blocks}
        slope = sum(float(inner.square().sum() + outer.square().sum()) for inner, outer in blocks.values())  # ‖D‖²
        weight = sum(float(layer.s.detach().float().square().sum()) for _, layer in layers)  # ‖W‖²
        step = 0.0
        if slope > 0 and weight > 0:
            step = line_search(lambda t: float(reduce(perturbed_loss(
                loss_of, layers, half_a, {name: (t * a, b) for name, (a, b) in directions.items()}))),
                math.sqrt(weight / slope))
        return step, {name: lookahead(by_name[name].s, *bases[name], *blocks[name], step) for name in blocks}


def line_search(loss_at: Callable[[float], float], longest: float) -> float:
    """The step t in [0, longest] that minimises ``loss_at`` (step 4 of the module docstring): the best of
    longest · 2^-j, j = 0..MAX_HALVINGS (scanned from the longest, stopping once the loss rises again), refined
    by the vertex of the parabola through it and its two neighbours (0 and the next shorter step when the
    longest is the best), kept between those neighbours; 0 when no step lowers the loss."""
    points = [(0.0, loss_at(0.0))]
    best = None
    for j in range(MAX_HALVINGS + 1):
        t = longest * 2.0**-j
        points.append((t, loss_at(t)))
        if points[-1][1] < (points[best][1] if best is not None else points[0][1]):
            best = len(points) - 1
        elif best is not None:
            break
    if best is None:
        return 0.0
    if best == 1:  # the longest step is the best: refine below it only (W never moves by more than its norm)
        if len(points) < 3:
            return points[1][0]
        (x0, y0), (x1, y1), (x2, y2) = points[0], points[2], points[1]
    else:
        lower = points[best + 1] if best + 1 < len(points) else points[0]
        (x0, y0), (x1, y1), (x2, y2) = lower, points[best], points[best - 1]
    t = points[best][0]
    curvature = ((y2 - y1) / (x2 - x1) - (y1 - y0) / (x1 - x0)) / (x2 - x0)
    if curvature <= 0:
        return t
    vertex = 0.5 * (x1 + x2) - 0.5 * (y2 - y1) / (x2 - x1) / curvature
    return min(max(vertex, x0), x2)
