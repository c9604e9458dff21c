"""Gauss-Newton pre-training with an inner optimizer and a line search (Abreu et al., arXiv 2510.09378).

One *outer* step (one Lightning ``global_step``) takes ``inner_steps + 1`` fresh batches of B windows. The
training dataloader (:class:`GaussNewtonDataModule`) yields them stacked as one ((inner_steps + 1)·B, T+1)
tensor: the same windows, in the same order, that ``inner_steps + 1`` plain batches would be, so a resumed
run continues with exactly the batches an uninterrupted one would see.

1. fix θ_t and forget the inner optimizer's state (each outer step solves a new quadratic problem); PC
   layers refine σ̂ (:func:`~pc_lightning.layers.pc_linear.power_iteration`) here, once per outer step, at θ_t;
2. for each of the first ``inner_steps`` batches, build the GN model M(Δ) of that batch's loss around θ_t
   (:class:`~pc_lightning.optim.gauss_newton.GaussNewtonModel`) and take one step of the inner optimizer
   (``inner_optimizer`` = adamw | muon, learning rate ``inner_lr``) on θ = θ_t + Δ with the gradient ∇M(Δ);
3. line search: on the last batch, evaluate the true loss (cross-entropy + z-loss, as trained) at
   θ_t + α (θ̂ − θ_t) for α in ``line_search`` and keep the lowest. TSVD layers are evaluated as they will
   forward after the step: retracted (orthonormalised raw factors) when
   :class:`~pc_lightning.callbacks.ortho_refresh.OrthoRefresh` refreshes at this step, else with the cached
   factors;
4. commit θ_{t+1} = θ_t + α (θ̂ − θ_t) as one SGD step of size α along θ_t − θ̂ (the ``outer``
   optimizer): that is what Lightning counts as the optimizer step, checkpoints and schedules around.

The learning-rate schedule (``optim.schedule``, warmup + cosine by default) runs over outer steps and scales the
inner learning rate (the paper found a global cosine schedule to work best). Weight decay is the inner optimizer's own (decoupled, on θ).

``gn_layerwise``: the parameters are split into solve groups, one per transformer block (``blocks.i.*``)
plus one for everything outside the blocks (embedding, final norm, LM head), so that every parameter
trains. For each group in turn, step 2 runs on the same ``inner_steps`` batches with J taken with respect
to that group only and every other parameter held at θ_t (the GN model is always evaluated at θ_t, whatever
the other groups have reached). The merged update is the concatenation θ̂ − θ_t = (Δ_1, ..., Δ_G): since
the groups' models only couple through θ_t, this is the minimiser of the block-diagonal GN model (no
cross-block curvature) and does not depend on the order of the groups. One line search follows, as above.

Model variants: the GN model differentiates the forward with ``torch.func`` at substituted parameters, so
PC layers run without the per-step W_eff cache of :class:`~pc_lightning.callbacks.pc_step.PCStep` (not
registered for GN runs: the forward computes W_eff from ``weight``), TSVD layers use a straight-through map
that ``torch.func`` differentiates (:func:`~pc_lightning.layers.tsvd_linear.straight_through`), and
OrthoRefresh / RankAdaptation run after each outer step (``on_train_batch_end``, with ``global_step``
counting outer steps); a rank change resizes the Parameters in place, so both optimizers keep pointing at
them (the outer SGD holds no state, the inner state is reset every outer step anyway).

Logged per outer step: ``train/loss`` (cross-entropy at θ_t on the first batch, as in plain training;
``train/log_z`` too with z-loss), ``gn/outer_step``, ``gn/inner_steps`` (inner iterations run, summed over
groups), ``gn/alpha``, ``gn/true_loss`` (training loss, z-loss included, after the step on the line-search
batch) and ``gn/model_loss`` (the GN model's prediction of that same quantity, M(α Δ̂), summed over the
groups' models for the layer-wise variant).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pc_lightning.data.datamodule import PretrainDataModule
from pc_lightning.layers import iter_layers
from pc_lightning.layers.pc_linear import PCLinear, power_iteration
from pc_lightning.layers.tsvd_linear import TSVDLinear, refresh_all
from pc_lightning.modules.pretrain import PretrainModule, next_token_loss
from pc_lightning.optim.factory import build_inner_optimizer
from pc_lightning.optim.gauss_newton import GaussNewtonModel, reset_optimizer_state
from pc_lightning.optim.schedule import build_scheduler


class GaussNewtonModule(PretrainModule):
    def __init__(self, config: dict[str, Any], total_steps: int):
        super().__init__(config, total_steps)
        self.automatic_optimization = False

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        outer = torch.optim.SGD([{"params": params, "name": "alpha"}], lr=1.0)  # lr = the chosen α, per step
        inner = build_inner_optimizer(self.model, self.cfg.optim)
        scheduler = build_scheduler(inner, self.total_steps, self.cfg.optim)
        return [outer, inner], [{"scheduler": scheduler, "interval": "step"}]

    def solve_groups(self) -> list[list[str]]:
        """Parameter names solved together: all of them (gn), or one group per block plus the rest."""
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if self.cfg.optim.name == "gn":
            return [names]
        groups = [[n for n in names if n.startswith(f"blocks.{i}.")] for i in range(len(self.model.blocks))]
        groups.append([n for n in names if not n.startswith("blocks.")])
        return [g for g in groups if g]

    def training_step(self, stacked: torch.Tensor, batch_idx: int) -> None:
        o = self.cfg.optim.gn
        outer, inner = self.optimizers()
        batches = stacked.view(o.inner_steps + 1, -1, stacked.size(-1))
        params = dict(self.model.named_parameters())
        theta_t = {n: p.detach().clone() for n, p in params.items()}
        groups = self.solve_groups()

        reset_optimizer_state(inner.optimizer)
        power_iteration([layer for _, layer in iter_layers(self.model, PCLinear)])  # σ̂ = uᵀWv with u, v fixed for this outer step
        for group in groups:
            for i, batch in enumerate(batches[:-1]):
                gn = GaussNewtonModel(self.model, theta_t, group, batch[:, :-1], batch[:, 1:], o.damping,
                                      self.cfg.model.z_loss)
                if i == 0 and group is groups[0]:
                    self.check_divergence(gn.ce0)
                    self.log("train/loss", gn.ce0, on_step=True, prog_bar=True)
                    if gn.log_z0 is not None:
                        self.log("train/log_z", gn.log_z0, on_step=True)
                _, grads = gn.value_and_grad({n: params[n].detach() - theta_t[n] for n in group})
                for n in group:
                    params[n].grad = grads[n]
                inner.optimizer.step()  # the raw optimizer: inner steps are not Lightning optimizer steps
                inner.optimizer.zero_grad(set_to_none=True)

        direction = {n: params[n].detach() - theta_t[n] for n in params}
        alpha, true_loss = self.line_search(theta_t, direction, batches[-1])
        model_loss = self.model_loss(theta_t, direction, groups, batches[-1], alpha)

        with torch.no_grad():  # θ_{t+1} = θ_t − α (θ_t − θ̂): one SGD step, counted as the outer step
            for n, p in params.items():
                p.copy_(theta_t[n])
                p.grad = -direction[n]
        outer.param_groups[0]["lr"] = alpha
        outer.step()
        outer.zero_grad(set_to_none=True)
        self.lr_schedulers().step()

        self.log_dict({"gn/outer_step": float(self.global_step), "gn/inner_steps": float(o.inner_steps * len(groups)),
                       "gn/alpha": alpha, "gn/true_loss": true_loss, "gn/model_loss": model_loss}, on_step=True)

    @torch.no_grad()
    def line_search(self, theta_t: dict[str, torch.Tensor], direction: dict[str, torch.Tensor],
                    batch: torch.Tensor) -> tuple[float, float]:
        """(α, loss) with the lowest true loss at θ_t + α·direction on ``batch`` over α in ``line_search``.

        The parameters are left at the last α tried (the caller restores θ_t); TSVD caches are restored here.
        """
        tsvd = self.cfg.model.tsvd
        layers = [layer for _, layer in iter_layers(self.model, TSVDLinear)]
        retract = bool(layers) and tsvd.refresh_due(self.global_step + 1)  # OrthoRefresh's schedule
        caches = [(layer.U_ortho.clone(), layer.V_ortho.clone()) for layer in layers] if retract else []
        losses = []
        for alpha in self.cfg.optim.gn.line_search:
            for n, p in self.model.named_parameters():
                p.copy_(theta_t[n] + alpha * direction[n])
            if retract:
                refresh_all(self.model, tsvd.ortho_method)
            loss, _, _ = next_token_loss(self.model(batch[:, :-1]), batch[:, 1:], self.cfg.model.z_loss)
            losses.append(float(loss))
        for layer, (u, v) in zip(layers, caches):
            layer.U_ortho.copy_(u)
            layer.V_ortho.copy_(v)
        best = min(range(len(losses)), key=lambda i: losses[i] if math.isfinite(losses[i]) else math.inf)
        return self.cfg.optim.gn.line_search[best], losses[best]

    def model_loss(self, theta_t: dict[str, torch.Tensor], direction: dict[str, torch.Tensor],
                   groups: list[list[str]], batch: torch.Tensor, alpha: float) -> float:
        """The GN model's prediction M(α Δ̂) of the loss on ``batch`` (block-diagonal sum for gn_layerwise)."""
        total = None
        for group in groups:
            gn = GaussNewtonModel(self.model, theta_t, group, batch[:, :-1], batch[:, 1:], self.cfg.optim.gn.damping,
                                  self.cfg.model.z_loss)
            (value,) = gn.value({n: direction[n] for n in group}, alphas=(alpha,))
            total = value if total is None else total + value - gn.loss0
        return float(total)


class GaussNewtonDataModule(PretrainDataModule):
    """Training batches of ``accumulate`` (= inner_steps + 1) plain batches stacked into one tensor.

    The parent's stream already reserves ``accumulate · B`` windows per optimizer step and starts at
    ``global_step`` on resume; only the loader's batch size changes. Validation is unchanged.
    """

    @property
    def train_batch_size(self) -> int:
        return self.cfg.batch_size * self.accumulate
