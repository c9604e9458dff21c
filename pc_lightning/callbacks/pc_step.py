"""Evaluate the PC layers' polynomial once per optimizer step, not once per forward (docs/pc.md).

PC Layer (Wang et al., arXiv 2606.06470): W_eff = γ·σ̂·g(W/σ̂). Evaluating g inside every forward repeats
the same work for every micro-batch and launches many small matmuls. Instead, with L the loss summed over
the micro-batches of one optimizer step and W_eff = f(W, γ) fixed during that step,

    ∂L/∂W = (∂W_eff/∂W)ᵀ · Σ_micro-batches ∂L_i/∂W_eff

so the chain rule through f needs to run once per step, after the micro-batches' backwards:

1. ``on_train_batch_start`` of the first micro-batch: refine σ̂ (power iteration), compute every W_eff batched by
   weight shape (bf16 matmuls under bf16-mixed, fp32 normaliser), keep that graph, and give each layer a
   *detached leaf copy* of its W_eff that requires grad; the forward uses it.
2. Each micro-batch's backward accumulates ∂L_i/∂W_eff into the leaves' ``.grad``.
3. ``on_before_optimizer_step`` (Lightning calls it after the closure and before gradient clipping, see
   ``Precision._after_closure`` in lightning/pytorch/plugins/precision/precision.py): backpropagate the leaves'
   gradients through the kept graph into ``weight`` and ``gamma`` (added to their ``.grad``), then drop the cache,
   so the optimizer step, validation and the next step see fresh weights.
4. Validation computes W_eff once per validation run (no graph) and drops it afterwards.

Under DDP the leaves' gradients are averaged over ranks (one all-reduce) before step 3: the leaves are not
parameters, so DDP does not reduce them, and the raw PC parameters get their gradient only at step 3, after DDP's
backward. :meth:`PCStep.setup` therefore tells DDP to ignore the raw PC weights and gains (no
``find_unused_parameters`` needed, no all-reduce of their zero gradients, which would double the traffic for
those matrices); as DDP does not broadcast ignored parameters at wrapping, :meth:`PCStep.on_fit_start`
broadcasts them from rank 0 itself. fp16 loss scaling is refused (the leaves' gradients would stay scaled).
FSDP shards the raw weights outside the forward, so there PCStep is not used: the layers compute W_eff in their
own forward (``model.pc.evaluate``, :func:`pc_lightning.distributed.pc_evaluation`).
"""

from __future__ import annotations

import contextlib

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pc_lightning.distributed import multi_process
from pc_lightning.layers import iter_layers
from pc_lightning.layers.pc_linear import PCLinear, effective_weights, power_iteration


def pc_parameter_names(model: nn.Module) -> list[str]:
    """Names of the raw PC weights and learnable gains, the parameters PCStep gives their gradient."""
    return [name for name, param in model.named_parameters()
            if isinstance(model.get_submodule(name.rpartition(".")[0]), PCLinear)]


class PCStep(L.Callback):
    def __init__(self, bf16_matmuls: bool = True, layers: list[PCLinear] | None = None):
        self.bf16_matmuls = bf16_matmuls
        self._layers: list[PCLinear] = layers or []
        self._outputs: list[torch.Tensor] | None = None  # W_eff with its graph to weight and gamma

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if str(trainer.precision) == "16-mixed":
            raise ValueError("PCStep does not support fp16 loss scaling (precision 16-mixed); use bf16-mixed")
        self._layers = [layer for _, layer in iter_layers(pl_module, PCLinear)]
        # Runs before the strategy wraps the module: DDP reads this list when it is built (and again when
        # RankAdaptation rebuilds it).
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(pl_module, pc_parameter_names(pl_module))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Same raw PC parameters on every rank (DDP broadcasts all other parameters when it wraps the model)."""
        if multi_process():
            for layer in self._layers:
                for param in layer.parameters():
                    dist.broadcast(param.data, src=0)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.begin_step(bf16=str(trainer.precision) == "bf16-mixed")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self.end_step()

    def _matmul_precision(self, bf16: bool):
        """bf16 autocast for the polynomial's matmuls (the normaliser opts out of it), or nothing."""
        if bf16 and self.bf16_matmuls:
            return torch.autocast(device_type=self._layers[0].weight.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # The two halves of the design, usable without a Trainer (bench/layers.py calls them around its own loop).
    def begin_step(self, bf16: bool = False) -> None:
        """Power iteration + every W_eff (batched by shape); each layer gets a detached leaf to forward with.

        Does nothing when this optimizer step's W_eff is already built (later micro-batches).
        """
        if self._outputs is not None or not self._layers:
            return
        power_iteration(self._layers)
        with torch.enable_grad(), self._matmul_precision(bf16):
            self._outputs = effective_weights(self._layers)
        for layer, w_eff in zip(self._layers, self._outputs):
            layer.step_weight = w_eff.detach().requires_grad_()

    def end_step(self) -> None:
        """Backpropagate the accumulated ∂L/∂W_eff into weight and gamma once, then drop the cache."""
        if self._outputs is None:
            return
        grads = [layer.step_weight.grad if layer.step_weight.grad is not None
                 else torch.zeros_like(layer.step_weight) for layer in self._layers]
        if multi_process():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            grads = [g.view_as(w) for g, w in zip(flat.split([w.numel() for w in self._outputs]), self._outputs)]
        torch.autograd.backward(self._outputs, grads)
        self.release()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Validation weights do not change: compute W_eff once (no graph) instead of in every forward."""
        if self._outputs is not None or not self._layers:
            return
        with torch.no_grad(), self._matmul_precision(str(trainer.precision) == "bf16-mixed"):
            for layer, w_eff in zip(self._layers, effective_weights(self._layers)):
                layer.step_weight = w_eff

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._outputs is None:
            self.release()

    def release(self) -> None:
        """Drop the cached W_eff (the layers fall back to computing W_eff in their forward)."""
        for layer in self._layers:
            layer.step_weight = None
        self._outputs = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.release()
