"""Adapt the rank of every TSVD layer by the spectral-energy rule, with its optimizer state.

Kamali et al., arXiv 2605.28573 (DESIGN.md section 4): every ``model.tsvd.rank_check_every`` optimizer
steps, each layer moves to :func:`pc_lightning.layers.energy_rank.next_rank` of its |s| (smallest r with
Σ_{i≤r} s_i² ≥ τ Σ s_i², shrinking by at most ``max_shrink_fraction``, growing by ``grow_fraction`` when
all directions are needed, within [r_min, r_max]). :meth:`TSVDLinear.resize` keeps the directions with the
largest |s| and appends new ones with s = 0, and replaces each parameter's ``.data`` so that the optimizer
still holds the same ``Parameter`` objects.

Optimizer state (found through ``optimizer.state[param]``, in every part of a wrapper exposing
``.optimizers`` such as :class:`pc_lightning.optim.combined.CombinedOptimizer`):

* **AdamW** (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; ``step``): the moment tensors have the
  parameter's shape and are indexed by rank along the rank axis (U, V: columns; s: entries), so they are
  gathered with the kept indices, and new directions start at zero; ``step`` is kept.
* **Muon** (``torch.optim.Muon``: ``momentum_buffer``, U and V only): gathered the same way, new columns 0.
* **Anything else** (state that is not a parameter-shaped tensor, a 0-dim tensor or a number, e.g. SOAP's
  Shampoo factors and eigenbases, in whose rotated basis even the parameter-shaped moments live): the
  parameter's whole state is dropped, and the optimizer re-initialises it lazily at its next step.

Logged at every check (and at the start of training): ``tsvd/rank/<layer name>`` and ``tsvd/parameters``
(trainable parameters of the model). A compiled model recompiles after each change.

Under DDP: rank 0 decides the new ranks and broadcasts them (``trainer.strategy.broadcast``), so every rank
resizes the same layers to the same ranks and remaps its optimizer state alike. The DDP wrapper's reducer was
built for the old shapes (its buckets, and the parameters' gradient accumulators, which it keeps alive), so the
wrapper is dropped before the resize and rebuilt afterwards (``DDPStrategy.configure_ddp``); building it
broadcasts parameters and buffers from rank 0, which also makes the randomly drawn new directions of a grown
layer identical on every rank. FSDP (flat, sharded parameters) does not support rank changes: the config
refuses ``model.tsvd.rank_check_every > 0`` with ``trainer.strategy: fsdp``.
"""

from __future__ import annotations

import gc
import numbers

import lightning as L
import torch
from lightning.pytorch.strategies import Strategy
from torch.nn.parallel import DistributedDataParallel

from pc_lightning.config import TSVDConfig
from pc_lightning.layers import iter_layers
from pc_lightning.layers.energy_rank import next_rank
from pc_lightning.layers.tsvd_linear import TSVDLinear
from pc_lightning.model import count_parameters


def base_optimizers(optimizers: list[torch.optim.Optimizer]) -> list[torch.optim.Optimizer]:
    """The optimizers that hold per-parameter state, unwrapping any wrapper with ``.optimizers``."""
    out: list[torch.optim.Optimizer] = []
    for opt in optimizers:
        parts = getattr(opt, "optimizers", None)
        out += base_optimizers(list(parts)) if parts is not None else [opt]
    return out


def remap_state(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter, old_shape: torch.Size,
                keep: torch.Tensor, rank_dim: int) -> str:
    """Follow a resize of ``param`` (old rank index keep[i] -> new index i, the rest new) in its state.

    Returns what was done: ``none`` (no state), ``mapped`` or ``reset``.
    """
    state = optimizer.state.get(param)
    if not state:
        return "none"

    def mappable(value) -> bool:
        if torch.is_tensor(value):
            return value.ndim == 0 or value.shape == old_shape
        return isinstance(value, numbers.Number)

    if not all(mappable(v) for v in state.values()):
        del optimizer.state[param]
        return "reset"
    for key, value in state.items():
        if torch.is_tensor(value) and value.ndim > 0:
            new = value.new_zeros(param.shape)
            new.narrow(rank_dim, 0, keep.numel()).copy_(value.index_select(rank_dim, keep.to(value.device)))
            state[key] = new
    return "mapped"


def unwrap_ddp(strategy: Strategy) -> bool:
    """Drop the strategy's DistributedDataParallel wrapper, if any (rebuild it with ``configure_ddp``).

    The wrapper's reducer holds the parameters' gradient accumulators, created for the old shapes; they must be
    freed before a new wrapper looks them up again. The wrapper sits in reference cycles, hence ``gc.collect``.
    """
    if not isinstance(strategy.model, DistributedDataParallel):
        return False
    strategy.model = strategy.lightning_module
    gc.collect()
    return True


class RankAdaptation(L.Callback):
    def __init__(self, cfg: TSVDConfig):
        self.cfg = cfg
        self._last_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        self._log(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.cfg.rank_check_every:
            return
        self._last_step = step
        changes = trainer.strategy.broadcast(self.decide(pl_module.model), src=0)  # rank 0's decision for all
        if changes:
            rewrap = unwrap_ddp(trainer.strategy)
            self.apply(pl_module.model, trainer.optimizers, changes)
            if rewrap:
                trainer.strategy.configure_ddp()
        self._log(trainer, pl_module)

    @torch.no_grad()
    def decide(self, model: torch.nn.Module) -> dict[str, int]:
        """{layer name: new rank} for the TSVD layers of ``model`` whose rank the energy rule changes."""
        changes: dict[str, int] = {}
        for name, layer in iter_layers(model, TSVDLinear):
            rank = next_rank(layer.s, self.cfg.energy_threshold, layer.r_min, layer.r_max,
                             self.cfg.max_shrink_fraction, self.cfg.grow_fraction)
            if rank != layer.rank:
                changes[name] = rank
        return changes

    @staticmethod
    @torch.no_grad()
    def apply(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], changes: dict[str, int]) -> None:
        """Resize the named layers to their new ranks and remap their optimizer state."""
        parts = base_optimizers(optimizers)
        for name, layer in iter_layers(model, TSVDLinear):
            if name not in changes:
                continue
            old_shapes = {param: param.shape for param in (layer.U, layer.V, layer.s)}
            keep = layer.resize(changes[name])
            for param, rank_dim in ((layer.U, 1), (layer.V, 1), (layer.s, 0)):
                for opt in parts:
                    remap_state(opt, param, old_shapes[param], keep, rank_dim)

    def adapt(self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, int]:
        """Apply the rank rule to every TSVD layer of ``model`` (one process); returns the changes made."""
        changes = self.decide(model)
        self.apply(model, optimizers, changes)
        return changes

    @staticmethod
    def _log(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.logger is None:
            return
        metrics = {f"tsvd/rank/{name}": float(layer.rank) for name, layer in iter_layers(pl_module.model, TSVDLinear)}
        metrics["tsvd/parameters"] = float(count_parameters(pl_module.model))
        trainer.logger.log_metrics(metrics, step=trainer.global_step)
