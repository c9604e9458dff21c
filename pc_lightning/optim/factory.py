"""Build the optimizer named by ``optim.name`` for a model (DESIGN.md section 5).

Parameter groups: weight decay on matrices (``ndim >= 2``) only; norms, gains and scalars get none.
"""

from __future__ import annotations

import torch
from torch import nn

from pc_lightning.config import OptimConfig


def decay_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float, lr: float) -> list[dict]:
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": lr}]
    return [g for g in groups if g["params"]]


def adamw(params: list[tuple[str, nn.Parameter]], cfg: OptimConfig, lr: float | None = None) -> torch.optim.AdamW:
    lr = cfg.lr if lr is None else lr
    fused = all(p.is_cuda for _, p in params) and len(params) > 0
    return torch.optim.AdamW(decay_groups(params, cfg.weight_decay, lr), lr=lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, fused=fused or None)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.name == "adamw":
        return adamw(params, cfg)
    raise NotImplementedError(f"optim.name={cfg.name} is not available yet")
