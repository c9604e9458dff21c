"""One rank of a multi-process test run (launched by tests/test_distributed.py through torchrun).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py fit OUT key=value ...
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py train [--stop-at N]
        [--resume last] key=value ...

``fit`` builds the tiny experiment (conf/baseline.yaml + the overrides) with pc_lightning.train's own
:func:`build_module` and :func:`build_trainer`, without MLflow or checkpoints (no logger, no checkpoint
directory), so that parameters can be compared with a single-process run. Each rank writes ``OUT/rank<r>.pt``: its final parameters and
buffers (``params``; the full, gathered state dict under FSDP), the training losses per optimizer step and the
TSVD ranks seen after every step.

``train`` runs :func:`pc_lightning.train.train` itself (MLflow, checkpoints), optionally interrupted after step N
as in tests/test_train.py, or resumed, and ends as ``pcl train`` does.

Under FSDP both pass :func:`cpu_strategy` as the Trainer's strategy (FSDP on CPU processes), and ``train``
checkpoints through :func:`cpu_fsdp_checkpoints`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy

from pc_lightning.config import load_config, steps_for_budget
from pc_lightning.data.prepare import prepare
from pc_lightning.distributed import exit_follower, leave_together, lightning_strategy
from pc_lightning.layers.tsvd_linear import TSVDLinear
from pc_lightning.train import build_module, build_trainer, resolve_vocab, train, world_size

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
    # on CPU processes in fp32
    cfg = load_config(ROOT / "conf" / "baseline.yaml", [*overrides, "trainer.accelerator=cpu",
                                                         "trainer.precision=32-true"])
    prepared = prepare(cfg.data)  # the test prepared the cache before launching: this only reads it
    resolve_vocab(cfg, prepared.vocab_size)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    module, datamodule = build_module(cfg, prepared, steps_for_budget(cfg, world_size(cfg)))
    record = Record()
    trainer = build_trainer(cfg, module, extra_callbacks=[record], quiet=True, strategy=cpu_strategy(cfg))
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
    """Let Lightning's FSDP checkpoints run on CPU processes (tests only): its full-state-dict context (model and
    optimizer state gathered for ``last.ckpt``, and scattered back on resume) no longer asks for
    ``offload_to_cpu``, which crashes (SIGSEGV) when the parameters already live on the CPU. On GPUs Lightning's
    own context is used.
    """
    import lightning.pytorch.strategies.fsdp as lightning_fsdp
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel

    def full_state_dict_context(module, world_size: int, rank0_only: bool = True):
        return FullyShardedDataParallel.state_dict_type(
            module, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))

    lightning_fsdp._get_full_state_dict_context = full_state_dict_context


def train_run(overrides: list[str], stop_at: int | None, resume: str | None) -> None:
    from helpers import StopAt

    torch.set_num_threads(1)
    cpu_fsdp_checkpoints()
    cfg = load_config(ROOT / "conf" / "baseline.yaml", overrides)
    result = train(cfg, resume=resume, extra_callbacks=[StopAt(stop_at)] if stop_at else None, quiet=True,
                   strategy=cpu_strategy(cfg))
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
