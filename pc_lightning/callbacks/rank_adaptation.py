"""Adapt the rank of every TSVD layer at rank checks, with its optimizer state.

Every ``model.tsvd.rank_check_every`` optimizer steps, each layer moves to the rank that
:func:`pc_lightning.layers.energy_rank.next_rank` gives: the energy threshold τ applied to the layer's singular
values together with what lies *outside* its subspace: the values it dropped at earlier checks (kept in
``TSVDLinear.dropped``, decayed by the weight decay the optimizer has applied to s since) and, with
``model.tsvd.lookahead`` (default), what a step of the loss would put outside (:func:`measure_lookahead`).
Shrinking drops the directions with the smallest value after that step (smallest |s| without it; at most
``max_shrink_fraction`` of the rank), growing appends the lookahead's outside directions with s = 0, within
[r_min, r_max]; an outside direction may also replace a clearly weaker inside one. Docs: docs/tsvd.md.

The lookahead (rank-adaptive augmented-basis step of dynamical low-rank training, Schotthöfer et al. 2022;
Ceruti, Kusch & Lubich 2022; :mod:`pc_lightning.layers.lookahead`), on the batch of the step just taken:

1. the batch's rows are split in two halves A and B (sample splitting: the directions are chosen on A and
   measured on B, so B's noise is not what selected them; :func:`split_rows`);
2. on A: the dense gradient G_A of every TSVD layer (:mod:`pc_lightning.callbacks.gradient_probe`), and from
   it the augmented basis Ũ, Ṽ: the top k = min(r, min(m, n) − r) singular pairs of (I − UUᵀ) G_A (I − VVᵀ);
3. on B: the blocks UᵀG_BV and ŨᵀG_BṼ, and the step direction D = −(U UᵀG_BV Vᵀ + Ũ ŨᵀG_BṼ Ṽᵀ) of every layer;
4. the step t: a line search for the minimum of the loss of the *other* half A along D, every layer applying
   W + tD (forward passes only; :func:`line_search`), over t ∈ [0, ‖W‖/‖D‖] (the step never moves the
   weights by more than their norm), one number for the model; t = 0 (no lookahead) if no step lowers A's
   loss. On a quadratic loss this is the Newton step ‖D‖² / DᵀHD; measured on held-out rows, it only goes
   as far as the step generalises beyond the rows that set its values;
5. per layer, the singular values of blockdiag(diag(s) − t·UᵀG_BV, −t·ŨᵀG_BṼ): ``inside`` and ``outside``.

Why this gradient and this step: growth needs the normal block of G, which neither the factors' gradients nor
any optimizer's moments or updates contain (they live in the tangent space of the rank-r matrices: for AdamW
and Muon alike), so the dense gradient is computed by an extra forward/backward (no accumulation over the
interval, which would need it at every step). The energy rule compares values with W's singular values, so
the step must have W's units: a step of the learning rate's size puts ~nothing outside (the rule would erode
as before), and Adam's and Muon's normalised updates have no length in W's units either. The line-search
minimum along D is the loss's own answer to "how far would the dense matrix move there", independent of the
optimizer, its learning rate and schedule. In the tiny CPU model it is small (t ≈ 0.02-0.06, outside
energies ≲ 1% of a layer's), so growth there comes only where the loss pulls hard; the dropped-energy
memory is what stops the erosion.

Cost per check: one forward/backward pass of the batch (halves A and B) and typically 5-15 forward passes of
half of it (the line search), run in fp32 with IEEE matmuls, and one dense out × in fp32 gradient at a time.

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
(trainable parameters of the model) and, with the lookahead, ``tsvd/lookahead_step`` (t above). A compiled
model recompiles after each change (the probe runs the model's plain forward).

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
import math
import numbers
from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.strategies import Strategy
from torch.nn.parallel import DistributedDataParallel

from pc_lightning.callbacks.gradient_probe import layer_gradients, perturbed_loss
from pc_lightning.callbacks.ortho_refresh import tsvd_layers
from pc_lightning.config import TSVDConfig
from pc_lightning.layers.energy_rank import RankDecision, next_rank
from pc_lightning.layers.lookahead import Lookahead, augmented_basis, lookahead, project_blocks, step_direction
from pc_lightning.layers.tsvd_linear import TSVDLinear, ieee_fp32_matmuls
from pc_lightning.model import count_parameters

# the line search tries steps ‖W‖/‖D‖ · 2^-j for j up to this (a millionth of the longest)
MAX_HALVINGS = 20

Layers = list[tuple[str, TSVDLinear]]
Reduce = Callable[[torch.Tensor], torch.Tensor]


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
        layers = tsvd_layers(pl_module.model)
        evidence = None
        if self.cfg.lookahead and torch.is_tensor(batch):
            reduce = lambda t: trainer.strategy.reduce(t, reduce_op="mean")  # noqa: E731 (in place on DDP)
            self.last_lookahead_step, evidence = measure_lookahead(layers, lm_loss(pl_module), batch, reduce,
                                                                   seed=step)
        decisions = trainer.strategy.broadcast(self.decide(layers, evidence), src=0)  # rank 0's for all
        changes = self.set_dropped(layers, decisions)
        if changes:
            rewrap = unwrap_ddp(trainer.strategy)
            self.apply(pl_module.model, trainer.optimizers, changes, evidence)
            if rewrap:
                trainer.strategy.configure_ddp()
        self.decay = 1.0
        self._log(trainer, pl_module)

    @staticmethod
    def step_decay(optimizers: list[torch.optim.Optimizer], model: torch.nn.Module) -> float:
        """1 − lr·weight_decay of the parameter group holding the TSVD singular values (1 if none decays them)."""
        layers = tsvd_layers(model)
        if not layers:
            return 1.0
        s = layers[0][1].s
        for opt in base_optimizers(optimizers):
            for group in opt.param_groups:
                if any(p is s for p in group["params"]):
                    return 1.0 - group["lr"] * group.get("weight_decay", 0.0)
        return 1.0

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
    def apply(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], changes: dict[str, tuple[int, int]],
              evidence: dict[str, Lookahead] | None = None) -> None:
        """Resize the named layers to (new rank, directions kept), the new ones from the lookahead's outside
        directions, and remap their optimizer state."""
        parts = base_optimizers(optimizers)
        for name, layer in tsvd_layers(model):
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

    def adapt(self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
              loss_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
              batch: torch.Tensor | None = None) -> dict[str, int]:
        """One rank check of every TSVD layer of ``model`` in one process (the lookahead on ``batch`` when
        ``loss_of`` is given and ``model.tsvd.lookahead`` is on); returns the rank changes made."""
        layers = tsvd_layers(model)
        evidence = None
        if loss_of is not None and batch is not None and self.cfg.lookahead:
            self.last_lookahead_step, evidence = measure_lookahead(layers, loss_of, batch)
        changes = self.set_dropped(layers, self.decide(layers, evidence))
        self.apply(model, optimizers, changes, evidence)
        self.decay = 1.0
        return {name: rank for name, (rank, _) in changes.items()}

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.logger is None:
            return
        metrics = {f"tsvd/rank/{name}": float(layer.rank) for name, layer in tsvd_layers(pl_module.model)}
        metrics["tsvd/parameters"] = float(count_parameters(pl_module.model))
        if self.last_lookahead_step is not None:
            metrics["tsvd/lookahead_step"] = self.last_lookahead_step
        trainer.logger.log_metrics(metrics, step=trainer.global_step)
