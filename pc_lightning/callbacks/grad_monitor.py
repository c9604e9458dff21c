"""Gradient-norm monitor: total L2 norm of the gradient and the norm per layer kind.

||g|| = sqrt(sum_p ||g_p||^2) over all parameters, and the same sum restricted to one kind: the block matrices
by Rybakov et al.'s kinds (qkv, proj, fc1, fc2; see :data:`pc_lightning.layers.ROLES`), plus ``embed`` (token embedding),
``head`` (LM head) and ``norm`` (every other parameter: norm gains, PC gammas). Read in
``on_before_optimizer_step``, i.e. after the backward (and the AMP unscale) and before clipping, every
``monitor.every`` optimizer steps; one device->host copy per sampled step. Under FSDP each rank sees its shard,
so the numbers are rank 0's shard norms.

Metric names: ``grad/norm`` and ``grad/norm/<kind>``.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.nn.utils import get_total_norm

from pc_lightning.layers import ROLES, iter_layers


def parameter_kinds(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> kind, for every parameter of the Llama model."""
    kinds = {id(p): "norm" for p in model.parameters()}
    for _, layer in iter_layers(model):
        for p in layer.parameters():
            kinds[id(p)] = ROLES[layer.role].kind
    kinds[id(model.tok_emb.weight)] = "embed"
    kinds[id(model.lm_head.weight)] = "head"
    return kinds


class GradNormMonitor(L.Callback):
    def __init__(self, every: int):
        self.every = every
        self._kinds: dict[int, str] | None = None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if trainer.global_step % self.every != 0 or not trainer.is_global_zero:  # rank 0 alone logs
            return
        if self._kinds is None:
            self._kinds = parameter_kinds(pl_module.model)
        grads: dict[str, list[torch.Tensor]] = {}
        for p in pl_module.model.parameters():
            if p.grad is not None:
                grads.setdefault(self._kinds.get(id(p), "norm"), []).append(p.grad.detach())
        if not grads:
            return
        per_kind = torch.stack([get_total_norm(g).float() for g in grads.values()])
        names = ["grad/norm"] + [f"grad/norm/{kind}" for kind in grads]
        values = torch.cat([per_kind.square().sum().sqrt().view(1), per_kind])
        if trainer.logger is not None:
            trainer.logger.log_metrics(dict(zip(names, values.tolist())), step=trainer.global_step)
