"""Small pieces the tests share (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


class StopAt(L.Callback):
    """Ends training after optimizer step `step`, as an interruption would (a checkpoint is due there)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def assert_identical(a, b, where: str = "") -> None:
    """Nested dicts/lists of tensors and plain values, equal bit for bit (``where`` names the entry that is not)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        if not torch.equal(a, b):
            raise AssertionError(f"{where}: max |difference| {float((a.double() - b.double()).abs().max()):.3g}")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_training_state(a: dict, b: dict) -> None:
    """Two checkpoints (dicts): same step, parameters and optimizer state bit for bit."""
    assert a["global_step"] == b["global_step"]
    assert_identical(a["state_dict"], b["state_dict"], "state_dict")
    assert_identical(a["optimizer_states"], b["optimizer_states"], "optimizer_states")


class SignalAt(L.Callback):
    """Sends ``sig`` once, after optimizer step ``step``, from rank 0 to its whole process group: the launcher
    and every rank, as a terminal's Ctrl-C does (SIGINT), or all killed at once (SIGKILL). Start the process in
    a session of its own (``start_new_session=True``), or the signal reaches the test too."""

    def __init__(self, step: int, sig: signal.Signals = signal.SIGINT):
        self.step, self.sig, self.sent = step, sig, False

    def on_train_batch_end(self, trainer, *args) -> None:
        if not self.sent and trainer.global_step >= self.step and trainer.global_rank == 0:
            self.sent = True
            os.killpg(0, self.sig)


class SignalParentAt(L.Callback):
    """Sends SIGINT once, after optimizer step ``step``, to the parent process: in a worker of ``pcl ablate
    --workers`` that is the command itself, which a terminal's Ctrl-C reaches (its workers run in process groups
    of their own). Picklable, so it can travel to the worker processes."""

    def __init__(self, step: int):
        self.step, self.sent = step, False

    def on_train_batch_end(self, trainer, *args) -> None:
        if not self.sent and trainer.global_step >= self.step:
            self.sent = True
            os.kill(os.getppid(), signal.SIGINT)


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
