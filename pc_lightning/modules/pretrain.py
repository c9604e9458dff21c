"""The LightningModule for next-token pre-training.

loss = CE(logits, next tokens) [+ z_loss * mean(logsumexp(logits)^2), PaLM / Wortsman et al.]
Validation: token-weighted mean CE over the fixed validation windows and its perplexity exp(CE),
accumulated with torchmetrics so that it is reduced correctly across DDP ranks, and the tokenizer-independent
bits per byte (``val/bpb``, as in the Pile and OLMo evaluations)

    bpb = Σ_tokens CE (nats) / (ln 2 · Σ bytes of the target tokens' text)

when the validation batches carry their target byte counts (:class:`~pc_lightning.data.datamodule.FixedWindows`).

A non-finite loss, or a loss above the first step's loss by ``monitor.divergence_margin`` nats, raises
:class:`Diverged` naming the step *before* the update is applied, so the last checkpoint stays usable and
the run is recorded as diverged (see :mod:`pc_lightning.train`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, SumMetric

from pc_lightning.config import ExperimentConfig, from_dict
from pc_lightning.distributed import full_parameters
from pc_lightning.model import Llama, count_parameters
from pc_lightning.optim.factory import build_optimizer
from pc_lightning.optim.schedule import build_scheduler


class Diverged(RuntimeError):
    """Training loss became non-finite or blew up; carries the optimizer step where it happened."""

    def __init__(self, step: int, loss: float, reason: str):
        self.step, self.loss, self.reason = step, loss, reason
        super().__init__(f"training diverged at step {step}: {reason} (loss={loss})")


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0):
    """(total loss, cross-entropy, mean log Z) computed in fp32."""
    logits = logits.float().view(-1, logits.size(-1))
    targets = targets.reshape(-1)
    ce = F.cross_entropy(logits, targets)
    if z_loss > 0:
        log_z = torch.logsumexp(logits, dim=-1)
        return ce + z_loss * (log_z**2).mean(), ce, log_z.mean()
    return ce, ce, None


class PretrainModule(L.LightningModule):
    def __init__(self, config: dict[str, Any], total_steps: int):
        super().__init__()
        # The resolved config (a plain dict) is saved into every checkpoint, so a checkpoint alone
        # rebuilds the module: PretrainModule.load_from_checkpoint(path).
        self.save_hyperparameters(logger=False)  # MLflow params: train._log_config (flat keys)
        self.cfg: ExperimentConfig = from_dict(config)
        self.total_steps = total_steps
        self.model = Llama(self.cfg.model)
        self.val_loss = MeanMetric()
        self.val_nats = SumMetric()  # Σ CE over the target tokens (nats), for bits per byte
        self.val_bytes = SumMetric()  # Σ bytes of the target tokens' text
        self.initial_loss: float | None = None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def configure_model(self) -> None:
        if self.cfg.model.compile:
            # nn.Module.compile() compiles in place: state-dict keys (and so checkpoints) stay unchanged.
            self.model.compile()

    # ------------------------------------------------------------------ training
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x, y = batch[:, :-1], batch[:, 1:]
        logits = self.model(x)
        loss, ce, log_z = next_token_loss(logits, y, self.cfg.model.z_loss)
        self.check_divergence(ce)
        self.log("train/loss", ce, on_step=True, prog_bar=True)
        if log_z is not None:
            self.log("train/log_z", log_z, on_step=True)
        return loss

    def check_divergence(self, ce: torch.Tensor) -> None:
        ce = ce.detach()
        if self._trainer is not None:  # decide on the global batch's mean loss, so that all DDP ranks stop together
            ce = self.trainer.strategy.reduce(ce.clone(), reduce_op="mean")  # (all_reduce is in place)
        value = float(ce)  # one host sync per step; the run's cost of not losing a diverged run
        step = self.trainer.global_step if self._trainer is not None else 0
        if not math.isfinite(value):
            raise Diverged(step, value, "loss is not finite")
        if self.initial_loss is None:
            self.initial_loss = value
        elif value > self.initial_loss + self.cfg.monitor.divergence_margin:
            raise Diverged(step, value, f"loss exceeds the initial loss {self.initial_loss:.3f} by more than "
                                        f"monitor.divergence_margin={self.cfg.monitor.divergence_margin}")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["initial_loss"] = self.initial_loss

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.initial_loss = checkpoint.get("initial_loss")

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        target_bytes = None
        if isinstance(batch, (list, tuple)):  # (windows, bytes of each window's targets)
            batch, target_bytes = batch
        x, y = batch[:, :-1], batch[:, 1:]
        _, ce, _ = next_token_loss(self.validation_logits(x), y)
        self.val_loss.update(ce, weight=y.numel())
        if target_bytes is not None:
            self.val_nats.update(ce.detach() * y.numel())
            self.val_bytes.update(target_bytes.sum())

    def validation_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits validation scores: the model's own (Gauss-Newton may evaluate EMA weights instead)."""
        return self.model(x)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # already over every rank's batches: torchmetrics syncs in compute()
        self.val_loss.reset()
        # sync_dist averages the ranks' identical values (one tiny all-reduce per validation); without it Lightning
        # warns on every multi-process validation that the epoch-level value may be a single rank's.
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(loss), sync_dist=True)
        if self.val_bytes.update_count > 0:
            nats, n_bytes = self.val_nats.compute(), self.val_bytes.compute()  # both summed over ranks
            self.log("val/bpb", nats / (math.log(2) * n_bytes.clamp_min(1)), sync_dist=True)
        self.val_nats.reset()
        self.val_bytes.reset()

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        # Under FSDP the parameters are flat 1-D shards at this point, and the factory groups them by shape
        # (weight decay on matrices): build it while FSDP shows the full parameters (same Parameter objects).
        with (full_parameters(self.trainer.strategy, writeback=False) if self._trainer is not None
              else contextlib.nullcontext()):
            optimizer = build_optimizer(self.model, self.cfg.optim)
        scheduler = build_scheduler(optimizer, self.total_steps, self.cfg.optim)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Under FSDP each rank holds a shard of the gradients: the global norm needs the root FSDP module's
        # clip_grad_norm_ (Lightning's FSDP precision plugin refuses norm clipping for that reason).
        from torch.distributed.fsdp import FullyShardedDataParallel

        if gradient_clip_val and isinstance(self.trainer.model, FullyShardedDataParallel):
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_fit_start(self) -> None:
        if self.logger is not None and self.global_step == 0:
            with full_parameters(self.trainer.strategy, writeback=False):  # FSDP: count whole matrices, not shards
                n = count_parameters(self.model)
            self.logger.log_metrics({"model/parameters": float(n)}, step=0)
