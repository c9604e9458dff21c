"""Which callbacks a config switches on. The one place that maps config keys to callbacks.

Each section below belongs to one part of the suite; keep additions inside its section.
"""

from __future__ import annotations

import lightning as L

from pc_lightning.config import ExperimentConfig


def configured_callbacks(cfg: ExperimentConfig, module: L.LightningModule) -> list[L.Callback]:
    callbacks: list[L.Callback] = []
    # --- layers (PC once-per-step, TSVD refresh / rank adaptation, spectrum monitor) ---
    # --- stability monitors and spike detection ---
    return callbacks
