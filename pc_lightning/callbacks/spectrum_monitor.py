"""Singular-value spectrum of every block matrix: top/bottom singular value, condition number, GMCN.

The PC paper's central quantity (Wang et al., arXiv 2606.06470, docs/pc.md). For each block matrix's
effective weight W (whatever its linear kind: ``effective_weight()``), with singular values σ_1 ≥ … ≥ σ_r (r = the layer's rank: TSVD
layers hold r < min(m, n) and their other singular values are exact zeros, not part of the spectrum):

    cond = σ_1 / σ_r        mcn = σ_1 / mean(σ_i over the bottom 10%, at least one)
    GMCN = exp(mean over matrices of log mcn)      (global modified condition number)

Logged every ``monitor.every`` optimizer steps (and at the start of training) as
``spectrum/<module name>/{top,bottom,cond}`` (e.g. ``spectrum/blocks.0.attn.o/cond``), ``spectrum/gmcn`` and
``spectrum/max_cond``. Singular values are computed in fp32, batched over same-shape matrices.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn

from pc_lightning.layers import iter_layers
from pc_lightning.distributed import full_parameters

BOTTOM_FRACTION = 0.1


@torch.no_grad()
def spectrum_metrics(model: nn.Module) -> dict[str, float]:
    """{metric name: value} for every block matrix of ``model`` plus the GMCN (one host sync)."""
    by_shape: dict[tuple[int, int, int], list[tuple[str, torch.Tensor]]] = {}
    for name, layer in iter_layers(model):
        w = layer.effective_weight().detach().float()
        # A rank-r layer (TSVD) has min(m, n) - r exact zeros: its spectrum is the r values it holds.
        rank = getattr(layer, "rank", min(w.shape))
        by_shape.setdefault((*w.shape, rank), []).append((name, w))
    names, rows = [], []
    for (_, _, rank), group in by_shape.items():
        sv = torch.linalg.svdvals(torch.stack([w for _, w in group]))[:, :rank]  # (B, r), descending
        k = max(1, math.ceil(BOTTOM_FRACTION * sv.size(-1)))
        top, bottom = sv[:, 0], sv[:, -1]
        mcn = top / sv[:, -k:].mean(dim=-1)
        names += [name for name, _ in group]
        rows.append(torch.stack([top, bottom, top / bottom, mcn], dim=-1))
    if not rows:
        return {}
    values = torch.cat(rows).cpu()
    metrics: dict[str, float] = {}
    for name, (top, bottom, cond, _) in zip(names, values.tolist()):
        metrics.update({f"spectrum/{name}/top": top, f"spectrum/{name}/bottom": bottom,
                        f"spectrum/{name}/cond": cond})
    metrics["spectrum/gmcn"] = float(values[:, 3].log().mean().exp())
    metrics["spectrum/max_cond"] = float(values[:, 2].max())
    return metrics


class SpectrumMonitor(L.Callback):
    def __init__(self, every: int):
        self.every = every
        self._last_step = -1

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        with full_parameters(trainer.strategy, writeback=False):  # FSDP: whole matrices, on every rank
            metrics = spectrum_metrics(pl_module.model)
        if metrics and trainer.is_global_zero and trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step  # optimizer steps: with accumulation, once per step
        if step != self._last_step and step % self.every == 0:
            self._log(trainer, pl_module)
