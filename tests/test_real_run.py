"""The real thing at CPU scale: conf/baseline.yaml for its default token budget must learn the corpus.

Slow (~2-3 minutes on 2 cores): marked `slow`, run by .ci/run after the fast suite.
"""

from __future__ import annotations

import os

import pytest

from pc_lightning.config import load_config
from pc_lightning.train import train

ROOT = os.path.dirname(os.path.dirname(__file__))


@pytest.mark.slow
def test_tiny_baseline_beats_unigram_entropy_by_one_nat(data_cache, results_dir):
    cfg = load_config(os.path.join(ROOT, "conf", "baseline.yaml"),
                      [f"data.cache_dir={data_cache}", f"trainer.checkpoint_dir={results_dir / 'ckpt'}",
                       "trainer.progress_bar=false"])
    result = train(cfg, quiet=True)
    assert result.status == "finished"
    entropy = result.metrics.get("val/unigram_entropy")
    if entropy is None:
        from pc_lightning.data.prepare import prepare

        entropy = prepare(cfg.data).meta["val_unigram_entropy"]
    assert result.metrics["val/loss"] <= entropy - 1.0, (result.metrics["val/loss"], entropy)
