"""Gauss-Newton pre-training with an inner optimizer and a line search (Abreu et al., arXiv 2510.09378).

One *outer* step (one Lightning ``global_step``) takes ``inner_steps + line_search_batches`` fresh batches of B
windows. The training dataloader (:class:`GaussNewtonDataModule`) yields them stacked as one
((inner_steps + line_search_batches)·B, T+1) tensor: the same windows, in the same order, that as many plain
batches would be, so a resumed run continues with exactly the batches an uninterrupted one would see.

1. fix θ_t. The inner iterate θ starts at θ_t with fresh inner-optimizer state (each outer step solves a new
   quadratic problem), or, with ``carry_inner_state`` (the reference's ``reset_start=False``), at the previous
   outer step's inner iterate θ̂ with the inner optimizer's state (moments, step counts) kept. PC layers refine
   σ̂ (:func:`~pc_lightning.layers.pc_linear.power_iteration`) here, once per outer step, at θ_t;
2. for each of the first ``inner_steps`` batches, build the GN model M(Δ) of that batch's loss around θ_t
   (:class:`~pc_lightning.optim.gauss_newton.GaussNewtonModel`), Δ = θ − θ_t, clip its gradient ∇M(Δ) to
   global norm ``inner_grad_clip`` (if > 0) and take one step of the inner optimizer (``inner_optimizer`` =
   adamw | muon at ``inner_lr``, betas / weight decay ``inner_betas`` / ``inner_weight_decay`` /
   ``inner_muon_weight_decay`` where set) on θ;
3. line search: on the last ``line_search_batches`` batches, evaluate the true loss (cross-entropy + z-loss, as
   trained) at θ_t + α (θ̂ − θ_t) for α in ``line_search`` and keep the α with the lowest mean over those
   batches. TSVD layers are evaluated as they will forward after the step: retracted (orthonormalised raw
   factors) when :class:`~pc_lightning.callbacks.ortho_refresh.OrthoRefresh` refreshes at this step, else with
   the cached factors;
4. commit θ_{t+1} = θ_t + α (θ̂ − θ_t) as one SGD step of size α along θ_t − θ̂ (the ``outer``
   optimizer): that is what Lightning counts as the optimizer step, checkpoints and schedules around. With
   carried state the next outer step starts its inner iterate at θ̂, not at θ_{t+1} (they differ when α < 1).
   With ``ema_decay`` = d > 0, e ← d·e + (1 − d)·θ_{t+1} (e starts at the run's first θ).

Inner learning rate (``inner_schedule``): ``global_cosine`` scales ``inner_lr`` by ``optim.schedule`` over
outer steps (warmup + cosine by default, or WSD / constant; constant within an outer step); ``per_outer_cosine``
multiplies ``inner_lr`` at inner step k by ½(1 + cos(πk/inner_steps)), the same cosine in every outer step,
after a linear warmup over ``optim.warmup_fraction`` of the outer steps (the reference's
``constant_with_inner_cosine``; ``optim.schedule=wsd`` is refused with it). Weight decay is the inner
optimizer's own (decoupled, on θ).

``gn_layerwise``: the parameters are split into solve groups (``layer_groups``): ``blocks_plus_rest`` = one
per transformer block (``blocks.i.*``) plus one for everything outside the blocks (embedding, final norm, LM
head); ``reference`` = the embedding, each block and the LM head apart (anything else, i.e. the final norm
unless ``freeze_final_norm``, one more group). For each group in turn, step 2 runs on the same
``inner_steps`` batches with J taken with respect to that group only and every other parameter held at θ_t
(the GN model is always evaluated at θ_t, whatever the other groups have reached); the cosine of
``per_outer_cosine`` runs over each group's inner steps, and the clip applies to the group's gradient. The
merged update is the concatenation θ̂ − θ_t = (Δ_1, ..., Δ_G): since the groups' models only couple through
θ_t, this is the minimiser of the block-diagonal GN model (no cross-block curvature) and does not depend on the
order of the groups. One line search follows, as above. ``freeze_final_norm`` (either variant) keeps the final
norm's weight at its initial value, as the reference's layer-wise script does (its groups leave it out).

Model variants: the GN model differentiates the forward with ``torch.func`` at substituted parameters, so
PC layers run without the per-step W_eff cache of :class:`~pc_lightning.callbacks.pc_step.PCStep` (not
registered for GN runs: the forward computes W_eff from ``weight``), TSVD layers use a straight-through map
that ``torch.func`` differentiates (:func:`~pc_lightning.layers.tsvd_linear.straight_through`), and
OrthoRefresh / RankAdaptation run after each outer step (``on_train_batch_end``, with ``global_step``
counting outer steps); a rank change resizes the Parameters in place, so both optimizers keep pointing at
them (the outer SGD holds no state; RankAdaptation remaps the inner optimizer's state). A carried inner iterate
or an EMA entry whose layer changed rank restarts at the layer's current value.

State kept in checkpoints (so that a resumed run is bit-identical to an uninterrupted one): the inner optimizer's
state and the schedule (Lightning's), the carried inner iterate θ̂ (``gn_inner_iterate``) and the EMA
(``gn_ema``). With ``ema_decay`` > 0, validation evaluates the EMA weights (through ``functional_call``, the
module's own parameters untouched; TSVD factors are orthonormalised for it) and the checkpoint's ``state_dict``
keeps the raw θ.

Logged per outer step: ``train/loss`` (cross-entropy at θ_t on the first batch, as in plain training;
``train/log_z`` too with z-loss), ``gn/outer_step``, ``gn/inner_steps`` (inner iterations run, summed over
groups), ``gn/alpha``, ``gn/line_search_loss`` (the line search's objective at the chosen α: the training
loss, z-loss included, after the step, averaged over the line-search batches), ``gn/true_loss`` (the same on the
first line-search batch) and ``gn/model_loss`` (the GN model's prediction of that same quantity, M(α Δ̂),
summed over the groups' models for the layer-wise variant), ``gn/inner_grad_norm`` (mean norm of the inner
gradients before clipping).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from pc_lightning.data.datamodule import PretrainDataModule
from pc_lightning.layers import iter_layers
from pc_lightning.layers.pc_linear import PCLinear, power_iteration
from pc_lightning.layers.tsvd_linear import TSVDLinear, refresh_all, retract
from pc_lightning.modules.pretrain import PretrainModule, next_token_loss
from pc_lightning.optim.factory import build_inner_optimizer
from pc_lightning.optim.gauss_newton import GaussNewtonModel, reset_optimizer_state
from pc_lightning.optim.schedule import build_scheduler, inner_cosine

Params = dict[str, Tensor]


class GaussNewtonModule(PretrainModule):
    def __init__(self, config: dict[str, Any], total_steps: int):
        super().__init__(config, total_steps)
        self.automatic_optimization = False
        if self.cfg.optim.gn.freeze_final_norm:
            self.model.norm.requires_grad_(False)
        self.inner_iterate: Params | None = None  # θ̂ of the last outer step (carry_inner_state)
        self.ema: Params | None = None  # EMA of the trainable parameters (ema_decay > 0)
        self._ema_eval: Params | None = None  # what validation substitutes, built once per validation

    def configure_optimizers(self):
        o = self.cfg.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        outer = torch.optim.SGD([{"params": params, "name": "alpha"}], lr=1.0)  # lr = the chosen α, per step
        inner = build_inner_optimizer(self.model, o)
        # per_outer_cosine: the cosine is per outer step (training_step); over outer steps warmup, then constant
        outer_shape = replace(o, schedule="constant") if o.gn.inner_schedule == "per_outer_cosine" else o
        scheduler = build_scheduler(inner, self.total_steps, outer_shape)
        return [outer, inner], [{"scheduler": scheduler, "interval": "step"}]

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def solve_groups(self) -> list[list[str]]:
        """Parameter names solved together: all of them (gn), or the ``layer_groups`` of gn_layerwise."""
        names = list(self.trainable())
        if self.cfg.optim.name == "gn":
            return [names]
        blocks = [[n for n in names if n.startswith(f"blocks.{i}.")] for i in range(len(self.model.blocks))]
        rest = [n for n in names if not n.startswith("blocks.")]
        if self.cfg.optim.gn.layer_groups == "blocks_plus_rest":
            groups = blocks + [rest]
        else:  # reference: embedding (with its norm, if any), each block, LM head, then whatever is left
            embedding = [n for n in rest if n.startswith(("tok_emb.", "emb_norm."))]
            head = [n for n in rest if n.startswith("lm_head.")]
            groups = [embedding] + blocks + [head, [n for n in rest if n not in embedding and n not in head]]
        return [g for g in groups if g]

    def training_step(self, stacked: torch.Tensor, batch_idx: int) -> None:
        o = self.cfg.optim.gn
        outer, inner = self.optimizers()
        batches = stacked.view(o.inner_steps + o.line_search_batches, -1, stacked.size(-1))
        inner_batches, search_batches = batches[: o.inner_steps], batches[o.inner_steps:]
        params = self.trainable()
        theta_t = {n: p.detach().clone() for n, p in self.model.named_parameters()}  # frozen ones too: M needs all
        groups = self.solve_groups()

        power_iteration([layer for _, layer in iter_layers(self.model, PCLinear)])  # σ̂ = uᵀWv with u, v fixed for this outer step
        self.start_inner_iterate(params, inner.optimizer)  # after the power iteration, which must see θ_t
        scheduled = [g["lr"] for g in inner.optimizer.param_groups]
        grad_norms = []
        for group in groups:
            for k, batch in enumerate(inner_batches):
                gn = GaussNewtonModel(self.model, theta_t, group, batch[:, :-1], batch[:, 1:], o.damping,
                                      self.cfg.model.z_loss)
                if k == 0 and group is groups[0]:
                    self.check_divergence(gn.ce0)
                    self.log("train/loss", gn.ce0, on_step=True, prog_bar=True)
                    if gn.log_z0 is not None:
                        self.log("train/log_z", gn.log_z0, on_step=True)
                _, grads = gn.value_and_grad({n: params[n].detach() - theta_t[n] for n in group})
                grad_norms.append(self.inner_step(inner.optimizer, [params[n] for n in group],
                                                  [grads[n] for n in group], k, scheduled))
        for g, lr in zip(inner.optimizer.param_groups, scheduled):
            g["lr"] = lr  # the schedule's value again (LearningRateMonitor, the scheduler's next step)

        iterate = {n: p.detach().clone() for n, p in params.items()}  # θ̂
        direction = {n: iterate[n] - theta_t[n] for n in params}
        losses = self.line_search_losses(theta_t, direction, search_batches)
        best = lowest(losses.mean(dim=1))
        alpha = o.line_search[best]
        model_loss = self.model_loss(theta_t, direction, groups, search_batches[0], alpha)

        with torch.no_grad():  # θ_{t+1} = θ_t − α (θ_t − θ̂): one SGD step, counted as the outer step
            for n, p in params.items():
                p.copy_(theta_t[n])
                p.grad = -direction[n]
        outer.param_groups[0]["lr"] = alpha
        outer.step()
        outer.zero_grad(set_to_none=True)
        self.lr_schedulers().step()
        self.inner_iterate = iterate if o.carry_inner_state else None
        if o.ema_decay > 0:
            self.update_ema(theta_t, params)

        self.log_dict({"gn/outer_step": float(self.global_step), "gn/inner_steps": float(o.inner_steps * len(groups)),
                       "gn/alpha": alpha, "gn/line_search_loss": float(losses[best].mean()),
                       "gn/true_loss": float(losses[best, 0]), "gn/model_loss": model_loss,
                       "gn/inner_grad_norm": float(torch.stack(grad_norms).mean())}, on_step=True)

    @torch.no_grad()
    def start_inner_iterate(self, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        """θ := θ̂ of the last outer step with the inner state kept (``carry_inner_state``), else θ := θ_t (the
        parameters as they are) with the inner state forgotten. A parameter whose shape changed since θ̂ was
        kept (a TSVD rank change) starts at θ_t."""
        if not self.cfg.optim.gn.carry_inner_state:
            reset_optimizer_state(optimizer)
            return
        for n, p in params.items():
            kept = (self.inner_iterate or {}).get(n)
            if kept is not None and kept.shape == p.shape:
                p.copy_(kept)

    def inner_step(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], grads: list[Tensor],
                   k: int, scheduled: list[float]) -> Tensor:
        """One step of the inner optimizer on ``params`` with the GN-model gradients ``grads``, at inner step
        ``k`` of the outer step (``scheduled``: the groups' learning rates from the outer schedule). Returns the
        gradients' global norm before clipping."""
        o = self.cfg.optim.gn
        for p, g in zip(params, grads):
            p.grad = g
        if o.inner_grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, o.inner_grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm(grads)
        factor = inner_cosine(k, o.inner_steps) if o.inner_schedule == "per_outer_cosine" else 1.0
        for group, lr in zip(optimizer.param_groups, scheduled):
            group["lr"] = lr * factor
        optimizer.step()  # the raw optimizer: inner steps are not Lightning optimizer steps
        optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    @torch.no_grad()
    def line_search_losses(self, theta_t: Params, direction: Params, batches: Tensor) -> Tensor:
        """The true loss at θ_t + α·direction, (len(line_search), L): one row per α, one column per batch of
        ``batches`` ((L, B, T+1), or one (B, T+1) batch). The parameters are left at the last α tried (the caller
        restores θ_t); TSVD caches are restored here."""
        if batches.dim() == 2:
            batches = batches[None]
        tsvd = self.cfg.model.tsvd
        layers = [layer for _, layer in iter_layers(self.model, TSVDLinear)]
        retract_now = bool(layers) and tsvd.refresh_due(self.global_step + 1)  # OrthoRefresh's schedule
        caches = [(layer.U_ortho.clone(), layer.V_ortho.clone()) for layer in layers] if retract_now else []
        params = dict(self.model.named_parameters())
        rows = []
        for alpha in self.cfg.optim.gn.line_search:
            for n, d in direction.items():
                params[n].copy_(theta_t[n] + alpha * d)
            if retract_now:
                refresh_all(self.model, tsvd.ortho_method)
            rows.append(torch.stack([next_token_loss(self.model(b[:, :-1]), b[:, 1:], self.cfg.model.z_loss)[0]
                                     for b in batches]))
        for layer, (u, v) in zip(layers, caches):
            layer.U_ortho.copy_(u)
            layer.V_ortho.copy_(v)
        return torch.stack(rows).float().cpu()

    def line_search(self, theta_t: Params, direction: Params, batches: Tensor) -> tuple[float, float]:
        """(α, loss): the α of ``line_search`` with the lowest true loss at θ_t + α·direction averaged over
        ``batches`` (:meth:`line_search_losses`), and that mean loss."""
        losses = self.line_search_losses(theta_t, direction, batches).mean(dim=1)
        best = lowest(losses)
        return self.cfg.optim.gn.line_search[best], float(losses[best])

    def model_loss(self, theta_t: Params, direction: Params, groups: list[list[str]], batch: torch.Tensor,
                   alpha: float) -> float:
        """The GN model's prediction M(α Δ̂) of the loss on ``batch`` (block-diagonal sum for gn_layerwise)."""
        total = None
        for group in groups:
            gn = GaussNewtonModel(self.model, theta_t, group, batch[:, :-1], batch[:, 1:], self.cfg.optim.gn.damping,
                                  self.cfg.model.z_loss)
            (value,) = gn.value({n: direction[n] for n in group}, alphas=(alpha,))
            total = value if total is None else total + value - gn.loss0
        return float(total)

    # ------------------------------------------------------------------ EMA of the outer parameters
    @torch.no_grad()
    def update_ema(self, theta_t: Params, params: dict[str, torch.nn.Parameter]) -> None:
        """e ← d·e + (1 − d)·θ_{t+1}; e starts at θ_t on the run's first outer step (a layer that changed rank
        restarts at its current value)."""
        d = self.cfg.optim.gn.ema_decay
        if self.ema is None:
            self.ema = {n: theta_t[n].clone() for n in params}
        for n, p in params.items():
            e = self.ema.get(n)
            if e is None or e.shape != p.shape:
                self.ema[n] = p.detach().clone()
            else:
                self.ema[n] = e.to(p.device).mul_(d).add_(p.detach(), alpha=1 - d)

    @torch.no_grad()
    def ema_parameters(self) -> Params:
        """What validation substitutes into the model: the EMA of every trainable parameter (the current value
        where the shapes differ); TSVD factors orthonormalised, into both the raw factor and its cache."""
        params = self.trainable()
        out = {n: e.to(params[n].device) if e.shape == params[n].shape else params[n].detach()
               for n, e in self.ema.items() if n in params}
        pairs = []
        for name, layer in iter_layers(self.model, TSVDLinear):
            for raw, cache in ((f"{name}.U", f"{name}.U_ortho"), (f"{name}.V", f"{name}.V_ortho")):
                if raw in out:
                    out[raw] = out[raw].clone()
                    out[cache] = torch.empty_like(out[raw])
                    pairs.append((out[raw], out[cache]))
        if pairs:
            retract(pairs, self.cfg.model.tsvd.ortho_method, self.cfg.model.tsvd.ns_steps)
        return out

    def on_validation_epoch_start(self) -> None:
        self._ema_eval = self.ema_parameters() if self.ema is not None else None

    def validation_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self._ema_eval is None:
            return super().validation_logits(x)
        return functional_call(self.model, self._ema_eval, (x,))

    def on_validation_epoch_end(self) -> None:
        self._ema_eval = None
        super().on_validation_epoch_end()

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["gn_inner_iterate"] = self.inner_iterate
        checkpoint["gn_ema"] = self.ema

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.inner_iterate = checkpoint.get("gn_inner_iterate")
        self.ema = checkpoint.get("gn_ema")


def lowest(losses: Tensor) -> int:
    """Index of the lowest finite value (non-finite ones never win; the first if none is finite)."""
    return int(torch.where(torch.isfinite(losses), losses, torch.inf).argmin())


class GaussNewtonDataModule(PretrainDataModule):
    """Training batches of ``accumulate`` (= inner_steps + line_search_batches) plain batches stacked into one
    tensor.

    The parent's stream already reserves ``accumulate · B`` windows per optimizer step and starts at
    ``global_step`` on resume; only the loader's batch size changes. Validation is unchanged.
    """

    @property
    def train_batch_size(self) -> int:
        return self.cfg.batch_size * self.accumulate
