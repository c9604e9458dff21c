"""One rank of a multi-process test run (launched by tests/test_distributed.py through torchrun).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py fit OUT key=value ...
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py train [--stop-at N]
        [--resume last] key=value ...

``fit`` builds the tiny experiment (conf/baseline.yaml + the overrides) exactly as pc_lightning.train does for the
model, data and callbacks, but runs the Lightning Trainer without MLflow or checkpoints, so that parameters
can be compared with a single-process run. Each rank writes ``OUT/rank<r>.pt``: its final parameters and
buffers (``params``; the full, gathered state dict under FSDP), the training losses per optimizer step and the
TSVD ranks seen after every step.

``train`` runs :func:`pc_lightning.train.train` itself (MLflow, checkpoints), optionally interrupted after step N
as in tests/test_train.py, or resumed, and ends as ``pcl train`` does; under FSDP through
:func:`cpu_fsdp_checkpoints`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy

from pc_lightning.callbacks.registry import configured_callbacks
from pc_lightning.config import load_config, steps_for_budget, to_dict
from pc_lightning.data.datamodule import PretrainDataModule
from pc_lightning.data.prepare import prepare
from pc_lightning.distributed import exit_follower, leave_together, lightning_strategy
from pc_lightning.layers.tsvd_linear import TSVDLinear
from pc_lightning.modules.pretrain import PretrainModule

ROOT = Path(__file__).resolve().parents[1]


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy made to run on CPU processes (gloo), for tests only.

    Lightning 2.6.6 refuses FSDP without a GPU in two places: the accelerator connector raises "The strategy
    `fsdp` requires a GPU accelerator" unless ``type(strategy) is FSDPStrategy`` is false (a subclass), and
    ``_setup_model`` passes ``device_id=root_device.index`` (None on CPU), for which torch's FSDP raises "FSDP
    needs a non-CPU accelerator device". torch's FSDP itself runs on CPU with ``device_id=cpu``: this wraps the
    model with exactly Lightning's arguments plus that device, and Lightning then takes the wrapped model as is.
    """

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        kwargs = dict(self.kwargs)
        self.kwargs.pop("auto_wrap_policy", None)  # applied here; Lightning warns about it on a wrapped model
        model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                         mixed_precision=self.mixed_precision_config,
                                         sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                         **kwargs)
        return super()._setup_model(model)


def cpu_strategy(cfg):
    """:func:`lightning_strategy`, with FSDP running on CPU processes through :class:`CPUFSDPStrategy`."""
    strategy = lightning_strategy(cfg)
    if type(strategy) is FSDPStrategy:  # the same strategy object, with the CPU wrapping of the test subclass
        strategy.__class__ = CPUFSDPStrategy
    return strategy


class Record(L.Callback):
    """Training loss and TSVD ranks after every optimizer step."""

    def __init__(self):
        self.losses: list[float] = []
        self.ranks: list[dict[str, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.ranks.append({name: int(m.s.shape[0]) for name, m in pl_module.named_modules()
                           if isinstance(m, TSVDLinear)})


def fit_run(out: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    cfg = load_config(ROOT / "conf" / "baseline.yaml", overrides)
    prepared = prepare(cfg.data)  # the test prepared the cache before launching: this only reads it
    cfg.model.vocab_size = prepared.vocab_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    total_steps = steps_for_budget(cfg, world)
    L.seed_everything(cfg.trainer.seed, verbose=False)
    module = PretrainModule(to_dict(cfg), total_steps=total_steps)
    datamodule = PretrainDataModule(cfg.data, seed=cfg.trainer.seed, accumulate=cfg.trainer.accumulate_grad_batches)
    datamodule.prepared = prepared
    record = Record()
    trainer = L.Trainer(
        accelerator="cpu", devices=cfg.trainer.devices, strategy=cpu_strategy(cfg), precision="32-true",
        max_steps=total_steps, max_epochs=-1, accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        gradient_clip_val=cfg.optim.grad_clip or None, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, callbacks=configured_callbacks(cfg, module) + [record],
    )
    trainer.fit(module, datamodule=datamodule)
    # Under FSDP the root module's state_dict() gathers the full tensors on every rank (FSDP's default
    # FullStateDictConfig). Lightning's lightning_module_state_dict() asks for offload_to_cpu, which crashes
    # (SIGSEGV) when the parameters already live on the CPU.
    state = trainer.strategy.model.state_dict()
    params = {k: v.detach().cpu().clone() for k, v in state.items()}
    torch.save({"params": params, "losses": record.losses, "ranks": record.ranks,
                "strategy": type(trainer.strategy).__name__}, Path(out) / f"rank{trainer.global_rank}.pt")
    leave_together()  # as `pcl train` ends: no rank tears its gloo connections down while another still uses them
    if trainer.global_rank != 0:
        exit_follower(0)


def cpu_fsdp_checkpoints() -> None:
    """Let ``pc_lightning.train.train`` run FSDP on CPU processes, checkpoints included (tests only).

    The strategy becomes :class:`CPUFSDPStrategy`, and Lightning's full-state-dict context (model and optimizer
    state gathered for ``last.ckpt``, and scattered back on resume) no longer asks for ``offload_to_cpu``, which
    crashes (SIGSEGV) when the parameters already live on the CPU. On GPUs Lightning's own context is used.
    """
    import lightning.pytorch.strategies.fsdp as lightning_fsdp
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel

    import pc_lightning.train

    def full_state_dict_context(module, world_size: int, rank0_only: bool = True):
        return FullyShardedDataParallel.state_dict_type(
            module, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))

    pc_lightning.train.lightning_strategy = cpu_strategy
    lightning_fsdp._get_full_state_dict_context = full_state_dict_context


def train_run(overrides: list[str], stop_at: int | None, resume: str | None) -> None:
    from helpers import StopAt

    from pc_lightning.train import train

    torch.set_num_threads(1)
    cpu_fsdp_checkpoints()
    cfg = load_config(ROOT / "conf" / "baseline.yaml", overrides)
    result = train(cfg, resume=resume, extra_callbacks=[StopAt(stop_at)] if stop_at else None, quiet=True)
    leave_together()  # as `pcl train` ends (pc_lightning.cli)
    if not result.run_id:
        exit_follower(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["fit", "train"])
    parser.add_argument("--out", help="fit: where each rank writes rank<r>.pt")
    parser.add_argument("--stop-at", type=int, help="train: stop after this optimizer step")
    parser.add_argument("--resume", help="train: resume from last or a checkpoint path")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    if args.mode == "fit":
        fit_run(args.out, args.overrides)
    else:
        train_run(args.overrides, args.stop_at, args.resume)
