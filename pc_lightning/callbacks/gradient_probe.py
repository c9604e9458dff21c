"""Dense loss gradients G = ∂L/∂W of the TSVD layers on a probe batch, without touching the parameters' grads.

A TSVD layer's trainable factors only ever see the *tangent* part of G: ∂L/∂U = G V diag(s),
∂L/∂V = Gᵀ U diag(s), ∂L/∂s = diag(Uᵀ G V). The part (I − UUᵀ) G (I − VVᵀ), outside both subspaces, is what
the loss would add in new directions, i.e. what rank growth needs (:mod:`pc_lightning.layers.lookahead`), and
no factor gradient, optimizer moment or optimizer update contains it. :func:`layer_gradients` computes G:

* forward hooks on the TSVD layers record each layer's input x and output y while ``loss_of(batch)`` runs the
  model (the caller runs the plain Python forward, ``model.forward``, so a model compiled in place with
  ``nn.Module.compile`` runs eagerly here, and any DDP wrapper is bypassed: nothing is all-reduced behind our
  back);
* ``torch.autograd.grad(loss, [y, ...])`` gives δ = ∂L/∂y for every layer in one backward that stops at the
  layer outputs, so no parameter's ``.grad`` is written and the optimizer step is not disturbed;
* G = Σ_tokens δᵀ x in fp32 (out × in), handed to ``transform(name, G)`` one layer at a time, so a caller that
  only needs a projection of G (and its mean over processes) never holds every dense gradient at once.

:func:`perturbed_loss` evaluates the loss alone, with some layers applying W + A Bᵀ (a hook adds x·B·Aᵀ to
their output): the rank rule's line search along its step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from pc_lightning.layers.tsvd_linear import TSVDLinear

Perturbation = dict[str, tuple[torch.Tensor, torch.Tensor]]


@contextlib.contextmanager
def record_layers(layers: list[tuple[str, TSVDLinear]], perturb: Perturbation | None = None
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


def layer_gradients(loss_of: Callable[[torch.Tensor], torch.Tensor], layers: list[tuple[str, TSVDLinear]],
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
def perturbed_loss(loss_of: Callable[[torch.Tensor], torch.Tensor], layers: list[tuple[str, TSVDLinear]],
                   batch: torch.Tensor, perturb: Perturbation | None = None) -> torch.Tensor:
    """``loss_of(batch)`` (forward only) with the listed layers applying W + A Bᵀ where ``perturb`` names them."""
    with record_layers(layers, perturb):
        return loss_of(batch).detach().float()
