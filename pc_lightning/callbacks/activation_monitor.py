"""Forward-activation monitors: linear-output L2 norms, max attention logits, output log Z, embedding std.

Rybakov et al. 2024 (arXiv 2410.16682) watch the L2 norm of the outputs of the QKV, Proj and FC2 layers: they
grow before a run diverges. Dehghani et al. 2023 / Wortsman et al. 2023 (arXiv 2309.14322) watch the max
attention logit max_ij q_i.k_j / sqrt(hd) (attention-logit growth) and the output log Z = logsumexp(logits)
(what z-loss controls). Spike No More (arXiv 2312.16903) asks for embedding outputs of std ~ 1.

Cheap when off: nothing is registered unless a switch is on, and forward hooks are attached only for the
first micro-batch of every ``monitor.every``-th optimizer step and removed right after it, so other steps run
the plain model. The values are gathered on the device and read back once per sampled step, on rank 0 only.
With ``model.compile`` a sampled step runs its own compiled graph (the hooks are part of it).

Metric names (step = optimizer step):
  act/<kind>/l2            mean over the layers of that kind of the per-token L2 norm ||y_t||_2 of the output,
                           kind in qkv (q, k, v), proj (o), fc1 (gate, up), fc2 (down)
  act/<module name>/l2     the same for one layer, e.g. act/blocks.0.attn.q/l2
  attn/max_logit/<i>       max over batch, heads and causal pairs of q.k / sqrt(hd) in block i
                           (after qk-norm and RoPE, before any soft-cap); with model.qk_clip on, QK-clip measures
                           it on every step and logs it instead (max over all micro-batches of the step, before
                           the clip; pc_lightning/callbacks/qk_clip.py), so it is computed once
  logits/log_z             mean over tokens of logsumexp of the output logits (after logit soft-cap)
  embed/std                std of the embedding output (after scaling / LayerNorm), the first block's input
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch.utils.hooks import RemovableHandle

from pc_lightning.config import MonitorConfig
from pc_lightning.layers import ROLES, iter_layers


# Score elements (B·H·T·T) computed at once by max_causal_logit_per_head; longer batches go in chunks of sequences.
SCORE_CHUNK = 1 << 24


def max_causal_logit_per_head(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(H,) max over b and j <= i of q_i . k_j / sqrt(hd) per head, in fp32; q, k: (B, H, T, hd).

    As many sequences at a time as keep the score tensor under SCORE_CHUNK elements (the whole batch at the
    tiny sizes, one sequence of a 124M model at T = 1024), so a block costs a few launches and no host sync."""
    B, H, T, hd = q.shape
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    chunk = max(1, SCORE_CHUNK // max(1, H * T * T))
    best = torch.full((H,), -math.inf, device=q.device)
    for start in range(0, B, chunk):
        qc, kc = q[start:start + chunk].float(), k[start:start + chunk].float()
        scores = (qc @ kc.transpose(-2, -1)) / math.sqrt(hd)
        best = torch.maximum(best, scores.masked_fill(~allowed, -math.inf).amax(dim=(0, 2, 3)))
    return best


def max_causal_logit(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """max over b, h and j <= i of q_i . k_j / sqrt(hd); q, k: (B, H, T, hd)."""
    return max_causal_logit_per_head(q, k).amax()


class ActivationMonitor(L.Callback):
    def __init__(self, cfg: MonitorConfig):
        self.every = cfg.every
        self.norms, self.logits, self.log_z, self.embed_std = (
            cfg.activation_norms, cfg.attn_logits, cfg.log_z, cfg.embed_std)
        self._handles: list[RemovableHandle] = []
        self._values: dict[str, torch.Tensor] = {}
        self._step = 0

    def _sampled(self, trainer: L.Trainer, batch_idx: int) -> bool:
        return trainer.global_step % self.every == 0 and batch_idx % trainer.accumulate_grad_batches == 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if not trainer.is_global_zero or not self._sampled(trainer, batch_idx):  # rank 0 alone logs
            return
        model = pl_module.model
        values = self._values
        self._step = trainer.global_step

        if self.norms:
            for name, layer in iter_layers(model):
                def norm_hook(module, args, output, name=name):
                    values[f"act/{name}/l2"] = output.detach().float().norm(dim=-1).mean()
                self._handles.append(layer.register_forward_hook(norm_hook))
        if self.logits:
            for i, block in enumerate(model.blocks):
                def logit_hook(module, args, output, i=i):
                    q, k = output
                    values[f"attn/max_logit/{i}"] = max_causal_logit(q.detach(), k.detach())
                self._handles.append(block.attn.qk_probe.register_forward_hook(logit_hook))
        if self.log_z:
            def log_z_hook(module, args, output):
                values["logits/log_z"] = torch.logsumexp(output.detach().float(), dim=-1).mean()
            self._handles.append(model.register_forward_hook(log_z_hook))
        if self.embed_std:
            def embed_hook(module, args):
                values["embed/std"] = args[0].detach().float().std()
            self._handles.append(model.blocks[0].register_forward_pre_hook(embed_hook))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if not self._handles:
            return
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        values, self._values = self._values, {}
        if self.norms:
            by_kind: dict[str, list[torch.Tensor]] = {}
            for name, layer in iter_layers(pl_module.model):
                if f"act/{name}/l2" in values:
                    by_kind.setdefault(ROLES[layer.role].kind, []).append(values[f"act/{name}/l2"])
            for kind, norms in by_kind.items():
                values[f"act/{kind}/l2"] = torch.stack(norms).mean()
        if values and trainer.is_global_zero and trainer.logger is not None:
            names = list(values)
            numbers = torch.stack([values[n] for n in names]).tolist()  # one device->host copy per sampled step
            trainer.logger.log_metrics(dict(zip(names, numbers)), step=self._step)
