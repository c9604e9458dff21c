"""What ``trainer.strategy`` becomes in ``L.Trainer(strategy=...)``, and how PC / TSVD layers run under it.

Supported (tested on 2 CPU processes with gloo, tests/test_distributed.py):

* ``ddp``: every linear kind. PC layers keep their once-per-optimizer-step evaluation
  (:class:`pc_lightning.callbacks.pc_step.PCStep`): the forward uses a detached leaf W_eff, so DDP never sees
  a gradient for the raw PC weights; PCStep averages the leaves' gradients over ranks itself and tells DDP to
  ignore the raw PC weights and γ (no ``find_unused_parameters``, no wasted all-reduce of zero gradients).
  TSVD rank changes are decided on rank 0, broadcast, applied on every rank, and the DDP wrapper is rebuilt
  around the resized parameters (:class:`pc_lightning.callbacks.rank_adaptation.RankAdaptation`).
* ``fsdp``: FSDP shards the raw weights, so W_eff cannot be computed outside the forward: PC layers evaluate
  W_eff (and their power iteration) inside their own forward (``model.pc.evaluate: forward``, chosen by
  ``auto``), each transformer block is one FSDP unit, and checkpoints hold the full (gathered) state dict.
  TSVD runs at a fixed rank only (``model.tsvd.rank_check_every: 0``, enforced by config validation); its
  orthonormal refresh and the spectrum monitor gather the full parameters (:func:`full_parameters`) when they run.
  Config validation also refuses, under FSDP, optimizers that need whole matrices (Muon, SOAP, Gauss-Newton),
  ``model.pc.evaluate: step`` and ``model.pc.merge_on_end`` (merge the checkpoint afterwards instead).

Lightning 2.6.6 runs FSDP on GPUs only; the tests run torch's FSDP on CPU processes through a test-only subclass
(tests/distributed_worker.py), checkpoint save/resume included (there Lightning's full-state-dict gather runs
without ``offload_to_cpu``, which crashes on CPU tensors). Not covered by tests: anything on GPUs/NCCL.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NoReturn

import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from torch.distributed.fsdp import FullyShardedDataParallel

from pc_lightning.config import ExperimentConfig, is_fsdp


def pc_evaluation(cfg: ExperimentConfig) -> str:
    """``step`` (PCStep: W_eff once per optimizer step, outside the forward) or ``forward`` (in each forward)."""
    if cfg.model.pc.evaluate != "auto":
        return cfg.model.pc.evaluate
    return "forward" if is_fsdp(cfg.trainer.strategy) else "step"


def lightning_strategy(cfg: ExperimentConfig) -> str | Strategy:
    """The ``strategy`` argument of ``L.Trainer`` for ``cfg.trainer.strategy``.

    ``fsdp`` -> :class:`FSDPStrategy` with each transformer block as one FSDP unit (its weights are gathered for
    that block's forward and backward only) and full-state-dict checkpoints (one ``last.ckpt`` file, which
    ``--resume`` and ``pcl merge`` read). Everything else (``auto``, ``ddp``, ``ddp_spawn``, ...) is passed to
    Lightning unchanged: DDP needs no extra options for any linear kind (no ``find_unused_parameters``: PCStep
    hides the raw PC weights from DDP itself).
    """
    name = cfg.trainer.strategy
    if name == "fsdp":
        from pc_lightning.model.llama import Block

        return FSDPStrategy(auto_wrap_policy={Block}, state_dict_type="full")
    return name


def full_parameters(strategy: Strategy, writeback: bool = True) -> contextlib.AbstractContextManager:
    """Under FSDP: show every rank the full (gathered) parameters, written back to the shards on exit if
    ``writeback``. Elsewhere: nothing to do. For code that reads or changes weights outside the forward."""
    if isinstance(strategy.model, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(strategy.model, writeback=writeback)
    return contextlib.nullcontext()


def multi_process() -> bool:
    """This process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def leave_together(group: dist.ProcessGroup | None = None) -> None:
    """End of a multi-process command: wait until every rank is done (rank 0 closes its MLflow run and Optuna
    trial first), then close the default process group. A rank that tears its connections down while another
    still uses them can abort at exit. Nothing to do in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)
        dist.destroy_process_group()


def exit_follower(code: int = 0) -> NoReturn:
    """Exit a rank other than 0 without the interpreter's teardown, after :func:`leave_together`.

    Everything such a rank owns is done by then (it never talks to MLflow or Optuna). Its teardown sometimes
    aborted in C++ ("terminate called without an active exception", exit -6, about 1 run in 10 on a loaded
    2-core machine with gloo), which torchrun reports as a failed job and answers by killing rank 0.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
