"""QK-clip (MuonClip; Kimi Team, "Kimi K2: Open Agentic Intelligence", arXiv 2507.20534, section 2.1).

For every block and head h, S_max^h = max over the step's batch and causal pairs (j <= i) of q_i^h · k_j^h / √hd,
measured in the training forward (after qk-norm and RoPE, before any soft-cap). After the optimizer step, every
head with S_max^h > τ (``model.qk_clip``) gets γ_h = τ / S_max^h and

    W_q^h ← γ_h^α · W_q^h,   W_k^h ← γ_h^(1−α) · W_k^h,   α = ½ (the report's choice)

(W^h: the rows of W_q, W_k that produce head h), so that head's logits on that batch are scaled by exactly γ_h:
its max logit would have been τ. Heads at or below τ are not touched (γ = 1, a multiplication by 1.0).

Our attention is plain multi-head attention, so the report's MLA details do not apply: there the rotary part of
the key is shared by all heads and left alone while the per-head rotary query part gets the whole γ. Here RoPE
rotates each head's q and k, a linear map that commutes with scaling, so √γ on W_q^h and on W_k^h scales the
logits by γ whatever the positions. Other places the factor goes:

* qk-norm (``model.attn_norm`` qk_norm / qkv_norm): a LayerNorm after the projection undoes any scaling of the
  projection's rows, so √γ goes to the norm's gain and bias entries of head h instead (the norm output of that head
  is then scaled by √γ, exactly). A norm whose gain is shared by all heads cannot be clipped per head (refused).
* attention soft-cap (``model.attn_softcap``): S_max is the logit before the cap, so the clip bounds what goes
  into the tanh; with τ ≥ cap the cap already bounds the applied logits and the clip only bounds the raw ones.
* PC and TSVD q/k layers: their trained parameters are not W; :func:`pc_lightning.layers.row_scale.scale_rows`
  re-factors them so that the applied W_eff (PC) or U·diag(s)·Vᵀ (TSVD) is exactly the row-scaled one.

Measurement and cost: a forward hook on each block's ``qk_probe`` keeps a running per-head maximum on the device
(:func:`~pc_lightning.callbacks.activation_monitor.max_causal_logit_per_head`, the computation the max-logit
monitor uses; with ``monitor.attn_logits`` on, this callback logs ``attn/max_logit/<i>`` and the monitor does not
compute it again). It costs one extra q·kᵀ per block and micro-batch (no backward). Dense layers are clipped
without any host sync; PC and TSVD q/k layers need one host read per step (which blocks have a clipped head),
since re-factoring every layer on every step would cost an SVD each. Under DDP the maxima are reduced over ranks
(one all-reduce, max) so that every rank applies the same clip.

Logged every ``trainer.log_every`` steps: ``qk_clip/max_logit`` (max over blocks and heads of S_max, before the
clip), ``qk_clip/clipped_heads`` (heads clipped at that step) and ``qk_clip/clipped_total`` (heads clipped since
the start, kept in checkpoints); with ``monitor.attn_logits`` every ``monitor.every`` steps ``attn/max_logit/<i>``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from pc_lightning.callbacks.activation_monitor import max_causal_logit_per_head
from pc_lightning.distributed import multi_process
from pc_lightning.layers.dense import DenseLinear
from pc_lightning.layers.row_scale import scale_rows

ALPHA = 0.5  # share of the clip factor on the query (the report's α); the key gets 1 − α


def clip_factors(max_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """γ = τ / S_max where S_max > τ, else 1 (also for non-finite S_max, which the divergence check reports)."""
    return torch.where(max_logits > tau, tau / max_logits, torch.ones_like(max_logits))


def norm_affine(attn: nn.Module, which: str) -> list[torch.Tensor] | None:
    """The gain and bias of the ``which`` (q or k) norm of an attention module, None without a norm; ValueError when
    they are not per channel over all heads (a gain shared by the heads cannot be clipped per head)."""
    norm = getattr(attn, f"{which}_norm", None)
    if norm is None:
        return None
    params = [p for p in (getattr(norm, "weight", None), getattr(norm, "bias", None)) if p is not None]
    if not params or any(p.numel() != attn.n_heads * attn.head_dim for p in params):
        raise ValueError(f"QK-clip scales each head's share of the {which}-norm's gain, which needs a gain per "
                         f"channel over all heads; this {which}-norm has {[p.numel() for p in params]} entries")
    return params


@torch.no_grad()
def scale_head(attn: nn.Module, factors: torch.Tensor) -> None:
    """Scale the logits of every head h of one attention module by ``factors[h]`` (γ_h^α on q, γ_h^(1−α) on k)."""
    for which, power in (("q", ALPHA), ("k", 1.0 - ALPHA)):
        rows = factors.pow(power).repeat_interleave(attn.head_dim)
        affine = norm_affine(attn, which)
        if affine is not None:  # the projection's scale is normalised away: scale the norm's affine output
            for param in affine:
                param.mul_(rows.to(param.dtype).view_as(param))
        else:
            scale_rows(getattr(attn, which), rows)


class QKClip(L.Callback):
    def __init__(self, tau: float, every: int | None = None):
        """``tau``: the threshold τ; ``every``: also log ``attn/max_logit/<i>`` every that many steps (None: not)."""
        self.tau, self.every = tau, every
        self.clipped_total = 0.0
        self._handles: list[RemovableHandle] = []
        self._running: dict[int, torch.Tensor] = {}
        self._active = False
        self._step: int | None = None
        self._total: torch.Tensor | None = None  # clipped heads since the start, on the device

    # ------------------------------------------------------------------ measuring
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._handles:
            return
        self._attention = [block.attn for block in pl_module.model.blocks]
        for attn in self._attention:  # a norm that cannot be clipped per head stops the run here, not mid-training
            norm_affine(attn, "q"), norm_affine(attn, "k")
        self._exact = any(not isinstance(getattr(a, w), DenseLinear) and getattr(a, f"{w}_norm", None) is None
                          for a in self._attention for w in ("q", "k"))
        for i, attn in enumerate(self._attention):
            self._handles.append(attn.qk_probe.register_forward_hook(self._hook(i)))

    def _hook(self, i: int):
        def observe(module, args, output):
            if not self._active:
                return
            q, k = output
            per_head = max_causal_logit_per_head(q.detach(), k.detach())
            previous = self._running.get(i)
            self._running[i] = per_head if previous is None else torch.maximum(previous, per_head)
        return observe

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._step is None:
            self._step = trainer.global_step
        self._active = True

    def max_logits(self) -> torch.Tensor:
        """(blocks, heads) S_max over the micro-batches seen since the last optimizer step."""
        return torch.stack([self._running[i] for i in range(len(self._attention))])

    # ------------------------------------------------------------------ clipping
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self._step is None or trainer.global_step == self._step:  # accumulating micro-batches
            return
        step, self._step, self._active = self._step, None, False
        if len(self._running) != len(self._attention):  # a step without a training forward (cannot happen in fit)
            self._running.clear()
            return
        max_logits = self.max_logits()
        self._running.clear()
        if multi_process():
            dist.all_reduce(max_logits, op=dist.ReduceOp.MAX)
        factors = clip_factors(max_logits, self.tau)
        clipped = factors < 1
        # dense q/k: scale every block, no host sync (a factor of 1.0 changes nothing); PC / TSVD: re-factor only
        # the blocks with a clipped head, which costs one host read of which those are
        blocks = clipped.any(dim=1).tolist() if self._exact else [True] * len(self._attention)
        for attn, block_factors, has_clip in zip(self._attention, factors, blocks):
            if has_clip:
                scale_head(attn, block_factors)
        count = clipped.sum().float()
        self._total = count if self._total is None else self._total + count
        self._log(trainer, step, max_logits, count)

    def _log(self, trainer: L.Trainer, step: int, max_logits: torch.Tensor, count: torch.Tensor) -> None:
        metrics, names = [], []
        if step % max(1, trainer.log_every_n_steps) == 0:
            names += ["qk_clip/max_logit", "qk_clip/clipped_heads", "qk_clip/clipped_total"]
            metrics += [max_logits.max().view(1), count.view(1), (self._total + self.clipped_total).view(1)]
        if self.every is not None and step % self.every == 0:
            names += [f"attn/max_logit/{i}" for i in range(max_logits.shape[0])]
            metrics.append(max_logits.amax(dim=1))
        if not names or not trainer.is_global_zero or trainer.logger is None:
            return
        values = torch.cat([m.float() for m in metrics]).tolist()  # one device->host copy per logging step
        trainer.logger.log_metrics(dict(zip(names, values)), step=step)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        total = self.clipped_total + (float(self._total) if self._total is not None else 0.0)
        return {"clipped_total": total}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.clipped_total, self._total = float(state_dict.get("clipped_total", 0.0)), None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
