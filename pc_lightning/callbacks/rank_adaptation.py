"""Adapt the rank of every TSVD layer at rank checks, with its optimizer state.

Every ``model.tsvd.rank_check_every`` optimizer steps, each layer moves to the rank that
:func:`pc_lightning.layers.energy_rank.next_rank` gives: the energy threshold τ applied to the layer's singular
values together with what lies *outside* its subspace: the values it dropped at earlier checks (kept in
``TSVDLinear.dropped``, decayed by the weight decay the optimizer has applied to s since) and, with
``model.tsvd.lookahead`` (default), what a step of the loss would put outside (the lookahead, below).
Shrinking drops the directions with the smallest value after that step (smallest |s| without it; at most
``max_shrink_fraction`` of the rank), growing appends the lookahead's outside directions with s = 0, within
[r_min, r_max]; an outside direction may also replace a clearly weaker inside one. Docs: docs/tsvd.md.

The lookahead (:mod:`pc_lightning.callbacks.lookahead_probe`: the dense gradient of every TSVD layer on the
batch of the step just taken, an augmented basis from its normal block, a line search for the step length) costs
one forward/backward and typically 5-15 half-batch forwards per check. One check is :meth:`RankAdaptation.check`.

Optimizer state (found through ``optimizer.state[param]``, in every part of a wrapper exposing
``.optimizers`` such as :class:`pc_lightning.optim.combined.CombinedOptimizer`):

* **AdamW** (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; ``step``): the moment tensors have the
  parameter's shape and are indexed by rank along the rank axis (U, V: columns; s: entries), so they are
  gathered with the kept indices, and new directions start at zero; ``step`` is kept.
* **Muon** (``torch.optim.Muon``: ``momentum_buffer``, U and V only): gathered the same way, new columns 0.
* **Anything else** (state that is not a parameter-shaped tensor, a 0-dim tensor or a number, e.g. SOAP's
  Shampoo factors and eigenbases, in whose rotated basis even the parameter-shaped moments live): the
  parameter's whole state is dropped, and the optimizer re-initialises it lazily at its next step.

Logged at every check (and at the start of training): ``tsvd/rank/<layer name>``, ``tsvd/parameters``
(trainable parameters of the model) and, with the lookahead, ``tsvd/lookahead_step`` (the line search's step
t). A compiled model recompiles after each change (the probe runs the model's plain forward).

Under DDP: every rank runs the probe on its own batch and the gradients' blocks are averaged over the ranks
(the global batch's gradient, as in training); rank 0 decides the new ranks and dropped values and broadcasts
them (``trainer.strategy.broadcast``), so every rank resizes the same layers to the same ranks and remaps its
optimizer state alike. The DDP wrapper's reducer was built for the old shapes (its buckets, and the parameters'
gradient accumulators, which it keeps alive), so the wrapper is dropped before the resize and rebuilt afterwards
(``DDPStrategy.configure_ddp``); building it broadcasts parameters and buffers from rank 0. FSDP (flat, sharded
parameters) does not support rank changes: the config refuses ``model.tsvd.rank_check_every > 0`` with
``trainer.strategy: fsdp``.
"""

from __future__ import annotations

import gc
import numbers
from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.strategies import Strategy
from torch.nn.parallel import DistributedDataParallel

from pc_lightning.callbacks.lookahead_probe import Layers, Reduce, lm_loss, measure_lookahead
from pc_lightning.config import TSVDConfig
from pc_lightning.layers import iter_layers
from pc_lightning.layers.energy_rank import RankDecision, next_rank
from pc_lightning.layers.lookahead import Lookahead
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
    def __init__(self, cfg: TSVDConfig, decays_per_step: int = 1):
        """``decays_per_step``: how many times per optimizer step the optimizer that holds s applies its weight
        decay (the inner steps of a Gauss-Newton outer step)."""
        self.cfg = cfg
        self.decays_per_step = decays_per_step
        self._last_step = -1
        self._decayed_step = -1
        self.decay = 1.0  # factor by which weight decay has scaled s since the last check
        self.last_lookahead_step: float | None = None

    def state_dict(self) -> dict:
        return {"decay": self.decay, "decayed_step": self._decayed_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.decay = state_dict.get("decay", 1.0)
        self._decayed_step = state_dict.get("decayed_step", -1)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        self._decayed_step = max(self._decayed_step, trainer.global_step)
        self._log(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step  # optimizer steps: with accumulation, once per step
        if step != self._decayed_step:
            self._decayed_step = step
            self.decay *= self.step_decay(trainer.optimizers, pl_module.model) ** self.decays_per_step
        if step == self._last_step or step % self.cfg.rank_check_every:
            return
        self._last_step = step
        self.check(pl_module.model, trainer.optimizers, lm_loss(pl_module), batch if torch.is_tensor(batch) else None,
                   trainer.strategy, seed=step)
        self._log(trainer, pl_module)

    def check(self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
              loss_of: Callable[[torch.Tensor], torch.Tensor] | None = None, batch: torch.Tensor | None = None,
              strategy: Strategy | None = None, seed: int = 0) -> dict[str, int]:
        """One rank check of every TSVD layer of ``model``: the lookahead of ``loss_of`` on ``batch`` (when both are
        given and ``model.tsvd.lookahead`` is on), the rule's decisions (rank 0's for every rank under a
        distributed ``strategy``), the new dropped values, then the resizes with their optimizer state. Returns
        {layer name: new rank} of the layers whose factors changed."""
        layers = iter_layers(model, TSVDLinear)
        evidence = None
        if self.cfg.lookahead and loss_of is not None and batch is not None:
            reduce: Reduce = (lambda t: t) if strategy is None else (
                lambda t: strategy.reduce(t, reduce_op="mean"))  # in place on DDP
            self.last_lookahead_step, evidence = measure_lookahead(layers, loss_of, batch, reduce, seed)
        decisions = self.decide(layers, evidence)
        if strategy is not None:
            decisions = strategy.broadcast(decisions, src=0)
        changes = self.set_dropped(layers, decisions)
        if changes:
            rewrap = strategy is not None and unwrap_ddp(strategy)
            self.apply(layers, optimizers, changes, evidence)
            if rewrap:
                strategy.configure_ddp()
        self.decay = 1.0
        return {name: rank for name, (rank, _) in changes.items()}

    @staticmethod
    def step_decay(optimizers: list[torch.optim.Optimizer], model: torch.nn.Module) -> float:
        """Π (1 − lr·weight_decay) over the parameter groups holding the TSVD singular values (1 if none decays
        them; Gauss-Newton's outer SGD holds them too, without decay)."""
        layers = iter_layers(model, TSVDLinear)
        if not layers:
            return 1.0
        s, factor = layers[0][1].s, 1.0
        for opt in base_optimizers(optimizers):
            for group in opt.param_groups:
                if any(p is s for p in group["params"]):
                    factor *= 1.0 - group["lr"] * group.get("weight_decay", 0.0)
        return factor

    @torch.no_grad()
    def decide(self, layers: Layers, evidence: dict[str, Lookahead] | None = None) -> dict[str, RankDecision]:
        """{layer name: (new rank, directions kept, new dropped values)} for every TSVD layer (see the module
        docstring)."""
        decisions = {}
        for name, layer in layers:
            found = evidence.get(name) if evidence else None
            inside = found.inside if found is not None else layer.s.detach().abs()
            outside = found.outside if found is not None else inside.new_zeros(0)
            decision = next_rank(inside, outside, layer.dropped.float() * self.decay, self.cfg.energy_threshold,
                                 layer.r_min, layer.r_max, self.cfg.max_shrink_fraction,
                                 min(layer.in_features, layer.out_features))
            decisions[name] = decision._replace(dropped=decision.dropped.cpu())
        return decisions

    @staticmethod
    def set_dropped(layers: Layers, decisions: dict[str, RankDecision]) -> dict[str, tuple[int, int]]:
        """Store each layer's new dropped values; returns {layer name: (new rank, directions kept)} for the
        layers that change."""
        changes = {}
        for name, layer in layers:
            decision = decisions[name]
            layer.dropped = decision.dropped.to(layer.dropped.device, layer.dropped.dtype)
            if decision.rank != layer.rank or decision.keep != layer.rank:
                changes[name] = (decision.rank, decision.keep)
        return changes

    @staticmethod
    @torch.no_grad()
    def apply(layers: Layers, optimizers: list[torch.optim.Optimizer], changes: dict[str, tuple[int, int]],
              evidence: dict[str, Lookahead] | None = None) -> None:
        """Resize the named layers to (new rank, directions kept), the new ones from the lookahead's outside
        directions, and remap their optimizer state."""
        parts = base_optimizers(optimizers)
        for name, layer in layers:
            if name not in changes:
                continue
            rank, kept = changes[name]
            found = evidence.get(name) if evidence else None
            old_shapes = {param: param.shape for param in (layer.U, layer.V, layer.s)}
            keep = layer.resize(rank, None if found is None else (found.u_new, found.v_new), kept,
                                None if found is None else found.per_direction)
            for param, rank_dim in ((layer.U, 1), (layer.V, 1), (layer.s, 0)):
                for opt in parts:
                    remap_state(opt, param, old_shapes[param], keep, rank_dim)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.logger is None:
            return
        metrics = {f"tsvd/rank/{name}": float(layer.rank) for name, layer in iter_layers(pl_module.model, TSVDLinear)}
        metrics["tsvd/parameters"] = float(count_parameters(pl_module.model))
        if self.last_lookahead_step is not None:
            metrics["tsvd/lookahead_step"] = self.last_lookahead_step
        trainer.logger.log_metrics(metrics, step=trainer.global_step)
