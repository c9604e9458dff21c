"""Update and optimizer-state diagnostics: ‖ΔW‖ / ‖W‖ per parameter group, and AdamW's second-moment RMS.

Large updates relative to the weights precede loss spikes (Wortsman et al. 2023, arXiv 2309.14322, section 3.4,
relate spikes to the update size; marin's stability investigations report update-norm spikes a few steps before
loss spikes). For one optimizer step with weights W before and W' after it,

    update/ratio/<kind> = ‖W' − W‖_F / ‖W‖_F    over the parameters of one kind (the ratio of their RMS values)
    update/ratio        = the same over every parameter

with the kinds of :mod:`pc_lightning.callbacks.grad_monitor` (qkv, proj, fc1, fc2, embed, head, norm). W is
snapshotted in ``on_before_optimizer_step`` (after the backward, before clipping and the step) and W' read in
``on_train_batch_end`` after the callbacks registered before this one, so ΔW is everything the step changed
before the next forward: the optimizer's update plus a TSVD retraction or a QK-clip rescaling of that step.
What is measured is the trained parameter: the raw weight of a PC layer, the factors U, V, s of a TSVD layer.
A layer whose rank changed at that step is left out of that step's ratio. Gauss-Newton: the outer step
(θ_t → θ_t+1).

For AdamW (and the AdamW half of Muon's ``CombinedOptimizer``; the Gauss-Newton inner AdamW, whose state is
reset every outer step) also ``optim/exp_avg_sq_rms/<kind>`` = sqrt(mean of v²) over the entries of the
second-moment estimate v (``exp_avg_sq``) of that kind's parameters, after the step.

Cost: nothing when off (the callback is not registered). When on, on every ``monitor.every``-th step: one copy
of the parameters (``_foreach_copy_`` into kept buffers), one fused norm before and one fused subtract + norm
after the step, the group sums on the device, and one device→host read for logging on rank 0. When the spike
rule watches ``update_ratio`` (``monitor.spike.signals``) the ratio is computed on every step and handed to it
as a device scalar (no host sync of its own: the rule reads it with its loss and gradient norm).
"""

from __future__ import annotations

import lightning as L
import torch

from pc_lightning.callbacks.grad_monitor import parameter_kinds

KINDS = ("qkv", "proj", "fc1", "fc2", "embed", "head", "norm")


class UpdateRatio:
    """‖ΔW‖ / ‖W‖ per kind around one update of a fixed list of parameters (no Lightning; tests use it directly)."""

    def __init__(self, params: list[torch.nn.Parameter], kinds: list[str]):
        self.params, self.kinds = params, kinds
        self.kind_names = sorted(set(kinds), key=KINDS.index)
        self._index = torch.tensor([self.kind_names.index(k) for k in kinds])
        self._before: list[torch.Tensor] = []
        self._weight_sq: torch.Tensor | None = None

    @torch.no_grad()
    def snapshot(self) -> None:
        """Keep W (copied into buffers that are reused while the shapes stay) and ‖W_p‖ per parameter."""
        params = [p.detach() for p in self.params]
        if [b.shape for b in self._before] != [p.shape for p in params]:
            self._before = [torch.empty_like(p) for p in params]
        torch._foreach_copy_(self._before, params)
        self._weight_sq = torch.stack(torch._foreach_norm(params)).float().square()

    @torch.no_grad()
    def ratios(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(global ratio, per-kind ratios in ``kind_names`` order) after the update, on the device. Parameters
        whose shape changed since the snapshot (a TSVD rank change) count in neither norm."""
        params = [p.detach() for p in self.params]
        same = [b.shape == p.shape for b, p in zip(self._before, params)]
        if not all(same):
            keep = [i for i, s in enumerate(same) if s]
            deltas = torch._foreach_sub([params[i] for i in keep], [self._before[i] for i in keep])
            mask = torch.tensor(same, device=self._weight_sq.device)
            delta_sq = torch.zeros_like(self._weight_sq)
            delta_sq[mask] = torch.stack(torch._foreach_norm(deltas)).float().square()
            weight_sq = torch.where(mask, self._weight_sq, torch.zeros_like(self._weight_sq))
        else:
            torch._foreach_sub_(self._before, params)  # W - W': the buffers are refilled at the next snapshot
            delta_sq = torch.stack(torch._foreach_norm(self._before)).float().square()
            weight_sq = self._weight_sq
        index = self._index.to(delta_sq.device)
        n = len(self.kind_names)
        per_delta = torch.zeros(n, device=delta_sq.device).index_add_(0, index, delta_sq)
        per_weight = torch.zeros(n, device=delta_sq.device).index_add_(0, index, weight_sq)
        tiny = torch.finfo(torch.float32).tiny
        total = per_delta.sum().sqrt() / per_weight.sum().sqrt().clamp_min(tiny)
        return total, per_delta.sqrt() / per_weight.sqrt().clamp_min(tiny)


def adamw_parts(optimizers: list[torch.optim.Optimizer]) -> list[torch.optim.AdamW]:
    """The AdamW optimizers among ``optimizers``, looking inside CombinedOptimizer (``.optimizers``)."""
    parts = [part for opt in optimizers for part in getattr(opt, "optimizers", [opt])]
    return [part for part in parts if isinstance(part, torch.optim.AdamW)]


@torch.no_grad()
def second_moment_rms(optimizers: list[torch.optim.Optimizer], kinds: dict[int, str]) -> dict[str, torch.Tensor]:
    """kind -> sqrt(mean v²) over AdamW's ``exp_avg_sq`` entries of that kind's parameters (device scalars)."""
    by_kind: dict[str, list[torch.Tensor]] = {}
    for opt in adamw_parts(optimizers):
        for group in opt.param_groups:
            for p in group["params"]:
                v = opt.state.get(p, {}).get("exp_avg_sq")
                if v is not None:
                    by_kind.setdefault(kinds.get(id(p), "norm"), []).append(v)
    out = {}
    for kind in sorted(by_kind, key=KINDS.index):
        vs = by_kind[kind]
        sq = torch.stack(torch._foreach_norm(vs)).float().square().sum()
        out[kind] = (sq / sum(v.numel() for v in vs)).sqrt()
    return out


class UpdateMonitor(L.Callback):
    """Logs the update ratios (and AdamW's second-moment RMS) every ``every`` steps when ``log``; with
    ``every_step`` measures the global ratio on every step for the spike rule (:attr:`last_ratio`)."""

    def __init__(self, every: int, log: bool = True, every_step: bool = False):
        self.every, self.log, self.every_step = every, log, every_step
        self._tracker: UpdateRatio | None = None
        self._kinds: dict[int, str] = {}
        self._step: int | None = None  # the optimizer step being measured (set before it, cleared after)
        self.last_ratio: torch.Tensor | None = None  # the global ratio of the last step measured (device scalar)
        self.last_step: int | None = None

    def _sampled(self, step: int) -> bool:
        return self.log and step % self.every == 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        step = trainer.global_step
        if not (self.every_step or self._sampled(step)):
            return
        model = pl_module.model
        params = [p for p in model.parameters() if p.requires_grad]
        if self._tracker is None or len(self._tracker.params) != len(params) or \
                any(a is not b for a, b in zip(self._tracker.params, params)):
            self._kinds = parameter_kinds(model)
            self._tracker = UpdateRatio(params, [self._kinds.get(id(p), "norm") for p in params])
        self._tracker.snapshot()
        self._step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self._step is None or trainer.global_step == self._step:  # no step yet (accumulating micro-batches)
            return
        step, self._step = self._step, None
        total, per_kind = self._tracker.ratios()
        self.last_ratio, self.last_step = total, step
        if not self._sampled(step) or not trainer.is_global_zero or trainer.logger is None:
            return
        names = ["update/ratio"] + [f"update/ratio/{k}" for k in self._tracker.kind_names]
        values = [total.view(1), per_kind]
        moments = second_moment_rms(trainer.optimizers, self._kinds)
        names += [f"optim/exp_avg_sq_rms/{k}" for k in moments]
        values += [v.view(1) for v in moments.values()]
        numbers = torch.cat(values).tolist()  # one device->host copy per sampled step
        trainer.logger.log_metrics(dict(zip(names, numbers)), step=step)
