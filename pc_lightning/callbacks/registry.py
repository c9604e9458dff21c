"""Which callbacks a config switches on. The one place that maps config keys to callbacks.

Each section below belongs to one part of the suite; keep additions inside its section.
"""

from __future__ import annotations

import lightning as L

from pc_lightning.config import ExperimentConfig


def configured_callbacks(cfg: ExperimentConfig, module: L.LightningModule) -> list[L.Callback]:
    callbacks: list[L.Callback] = []
    # --- layers (PC once-per-step, TSVD refresh / rank adaptation, spectrum monitor) ---
    if cfg.model.linear == "pc":
        # Gauss-Newton differentiates the forward at parameters substituted by torch.func, which a per-step
        # W_eff cache would hide: its module runs the power iteration itself, the forward computes W_eff.
        if not cfg.optim.gauss_newton:
            from pc_lightning.distributed import pc_evaluation

            if pc_evaluation(cfg) == "step":
                from pc_lightning.callbacks.pc_step import PCStep

                # first: its on_before_optimizer_step fills the PC gradients other hooks read
                callbacks.append(PCStep(cfg.model.pc.bf16_matmuls))
            else:  # model.pc.evaluate resolved to forward (FSDP): W_eff inside each layer's forward
                from pc_lightning.layers.pc_linear import evaluate_in_forward

                evaluate_in_forward(module)
        if cfg.model.pc.merge_on_end:
            from pc_lightning.callbacks.pc_merge import PCMerge

            callbacks.append(PCMerge())
    if cfg.monitor.spectrum:
        from pc_lightning.callbacks.spectrum_monitor import SpectrumMonitor

        callbacks.append(SpectrumMonitor(cfg.monitor.every))
    if cfg.model.linear == "tsvd":  # refresh first: a rank check then sees freshly retracted factors
        from pc_lightning.callbacks.ortho_refresh import OrthoRefresh
        from pc_lightning.callbacks.rank_adaptation import RankAdaptation

        callbacks.append(OrthoRefresh(cfg.model.tsvd))
        if cfg.model.tsvd.rank_check_every > 0:
            # s is decayed at every inner step of a Gauss-Newton outer step: the dropped values follow suit
            callbacks.append(RankAdaptation(cfg.model.tsvd,
                                            cfg.optim.gn.inner_steps if cfg.optim.gauss_newton else 1))
    # --- QK-clip: after the layers' own post-step work, before the monitors read the step's result ---
    mon = cfg.monitor
    if cfg.model.qk_clip > 0:
        from pc_lightning.callbacks.qk_clip import QKClip

        callbacks.append(QKClip(cfg.model.qk_clip, every=mon.every if mon.attn_logits else None))
    # --- stability monitors and spike detection ---
    # QK-clip measures the max logits on every step: the activation monitor does not compute them again
    attn_logits = mon.attn_logits and not cfg.model.qk_clip > 0
    if mon.activation_norms or attn_logits or mon.log_z or mon.embed_std:
        import dataclasses

        from pc_lightning.callbacks.activation_monitor import ActivationMonitor

        callbacks.append(ActivationMonitor(dataclasses.replace(mon, attn_logits=attn_logits)))
    if mon.grad_norms:  # before spike detection: its skip action drops the gradients
        from pc_lightning.callbacks.grad_monitor import GradNormMonitor

        callbacks.append(GradNormMonitor(mon.every))
    update_signal = mon.spike.enabled and "update_ratio" in mon.spike.signals
    if mon.update_norms or update_signal:  # before spike detection, which reads its ratio
        from pc_lightning.callbacks.update_monitor import UpdateMonitor

        callbacks.append(UpdateMonitor(mon.every, log=mon.update_norms, every_step=update_signal))
    if mon.spike.enabled:
        from pc_lightning.callbacks.spike_detection import SpikeDetection

        callbacks.append(SpikeDetection(mon.spike))
    # --- downstream evaluation (lm-evaluation-harness); after the monitors, whose hooks must not see its forwards ---
    if mon.eval_tasks:
        from pc_lightning.callbacks.downstream_eval import DownstreamEval

        callbacks.append(DownstreamEval(mon, cfg.data))
    return callbacks
