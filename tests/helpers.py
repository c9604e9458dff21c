"""Small pieces the tests share (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import yaml

ROOT = Path(__file__).resolve().parents[1]


class StopAt(L.Callback):
    """Ends training after optimizer step `step`, as an interruption would (a checkpoint is due there)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def write_sweep_spec(path: Path, **fields) -> Path:
    """A tiny sweep file over optim.lr on conf/baseline.yaml; ``fields`` (``overrides`` at least) replace its
    top-level entries."""
    spec = {
        "study_name": "tiny-lr",
        "base": str(ROOT / "conf" / "baseline.yaml"),
        "objective": {"metric": "val/loss", "direction": "minimize"},
        "parameters": {"optim.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True}},
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "n_trials": 3,
        "heartbeat": {"interval": 1, "grace_period": 2, "max_retry": 2},
    }
    spec.update(fields)
    path.write_text(yaml.safe_dump(spec))
    return path
