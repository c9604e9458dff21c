"""Which callbacks a config switches on. The one place that maps config keys to callbacks."""

from __future__ import annotations

import lightning as L

from pc_lightning.config import ExperimentConfig


def configured_callbacks(cfg: ExperimentConfig, module: L.LightningModule) -> list[L.Callback]:
    callbacks: list[L.Callback] = []
    return callbacks
