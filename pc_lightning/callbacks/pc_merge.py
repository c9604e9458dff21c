"""Merge the trained PC (or TSVD) model into a plain dense checkpoint when training ends.

W_plain = γ·σ̂·g(W/σ̂) per PC matrix (Wang et al., arXiv 2606.06470), via
:func:`pc_lightning.merge.merge_module`: ``<checkpoint dir>/merged/merged.ckpt`` and, where the architecture maps, the Hugging Face export in ``merged/hf``.
Switched on by ``model.pc.merge_on_end``; the merged directory is recorded as the MLflow tag ``pcl.merged_dir``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L


class PCMerge(L.Callback):
    def __init__(self, hf_export: bool = True):
        self.hf_export = hf_export
        self.merged_dir: Path | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from pc_lightning.merge import merge_module

        ckpt_dir = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback is not None else None
        root = Path(ckpt_dir) if ckpt_dir else Path(trainer.default_root_dir)
        self.merged_dir = merge_module(pl_module, root / "merged", hf_export=self.hf_export,
                                       source=f"end of training, step {trainer.global_step}")
        logger = trainer.logger
        if logger is not None and getattr(logger, "run_id", None):
            logger.experiment.set_tag(logger.run_id, "pcl.merged_dir", str(self.merged_dir.resolve()))
