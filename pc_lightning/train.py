"""One training run: config -> data -> model -> Lightning Trainer -> MLflow run -> :class:`RunResult`.

Used by ``pcl train`` and by sweeps/ablations (which pass a parent run id and extra callbacks). The MLflow run
is created (or, on ``--resume``, reopened) before anything else and closed however the run ends, with its
metrics so far (:class:`~pc_lightning.tracked_run.TrackedRun`: finished, diverged, failed, killed or pruned),
and ``last.ckpt`` is written so that ``pcl train --config ... --resume last`` continues the same MLflow run.

The pieces, each also used on its own: :func:`open_run` (the MLflow run), :func:`build_module` (model and
data), :func:`build_trainer` (the Lightning Trainer with its callbacks; the multi-process tests build theirs
here too).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger, MLFlowLogger
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.strategies import Strategy

from pc_lightning import tracking
from pc_lightning.atomic_checkpoint import AtomicCheckpointIO
from pc_lightning.checkpoint_file import CheckpointError, open_checkpoint
from pc_lightning.config import (ConfigError, ExperimentConfig, batches_per_step, flatten, steps_for_budget,
                                 to_dict)
from pc_lightning.data.corpus import check_data_files
from pc_lightning.data.datamodule import PretrainDataModule
from pc_lightning.data.prepare import prepare
from pc_lightning.distributed import lightning_strategy
from pc_lightning.init_from import check_initial_checkpoint, load_initial_weights
from pc_lightning.library_noise import silence_library_noise
from pc_lightning.callbacks.registry import configured_callbacks
from pc_lightning.callbacks.run_metadata import MlflowRunInCheckpoint
from pc_lightning.callbacks.throughput import TokenThroughput
from pc_lightning.model import count_parameters, flops_per_token
from pc_lightning.modules.gauss_newton import GaussNewtonDataModule, GaussNewtonModule
from pc_lightning.modules.pretrain import Diverged, PretrainModule
from pc_lightning.secrets import redact, redact_tree
from pc_lightning.tracked_run import RunStatus, TrackedRun


@dataclass
class RunResult:
    run_id: str  # "" on ranks other than 0
    status: RunStatus  # finished | diverged (other endings raise)
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint_dir: str | None = None
    message: str = ""

    @property
    def val_loss(self) -> float | None:
        return self.metrics.get("val/loss")


def world_size(cfg: ExperimentConfig) -> int:
    devices = cfg.trainer.devices
    if devices == "auto" or devices == -1:
        devices = torch.cuda.device_count() if cfg.trainer.accelerator in ("auto", "gpu", "cuda") and \
            torch.cuda.is_available() else 1
    elif isinstance(devices, str):
        devices = len([d for d in devices.split(",") if d.strip()])
    return max(1, int(devices)) * cfg.trainer.num_nodes


def precision(cfg: ExperimentConfig) -> str:
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    on_gpu = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    return "bf16-mixed" if on_gpu else "32-true"


def resolve_vocab(cfg: ExperimentConfig, tokenizer_vocab: int) -> None:
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tokenizer_vocab
    elif cfg.model.vocab_size != tokenizer_vocab:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} does not match the tokenizer's vocabulary "
                                              f"({tokenizer_vocab}); leave it unset to use the tokenizer's")


RESUMABLE = ("state_dict", "optimizer_states", "loops")  # what Lightning restores a run from


def find_checkpoint(cfg: ExperimentConfig, resume: str) -> Path:
    if resume != "last":
        path = Path(resume)
        if not path.exists():
            raise ConfigError("--resume", f"checkpoint not found: {path}")
        return path
    root = Path(cfg.trainer.checkpoint_dir) / cfg.name
    candidates = sorted(root.glob("*/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ConfigError("--resume", f"no last.ckpt under {root}/ (run name '{cfg.name}')")
    return candidates[-1]


def tokens_per_step(cfg: ExperimentConfig, world: int) -> int:
    return cfg.data.batch_size * cfg.data.seq_len * batches_per_step(cfg) * world


def train(cfg: ExperimentConfig, resume: str | None = None, extra_callbacks: list[L.Callback] | None = None,
          quiet: bool = False, strategy: str | Strategy | None = None) -> RunResult:
    """Train ``cfg``; ``strategy`` replaces :func:`lightning_strategy` (see :func:`build_trainer`)."""
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    tracking.check_server(cfg.tracking)  # a tracking server that is down or refuses us: one line, in seconds

    ckpt_path = find_checkpoint(cfg, resume) if resume else None
    # Inputs named on the command line are checked before anything is recorded: a checkpoint that cannot be read
    # (or, for trainer.init_from, holds another model) or local data files that do not exist stop the run before
    # an MLflow run exists.
    resume_checkpoint = open_checkpoint(ckpt_path, required=RESUMABLE) if ckpt_path is not None else None
    init_from = cfg.trainer.init_from if ckpt_path is None else None  # a resume continues from its own weights
    initial_state = check_initial_checkpoint(cfg, init_from) if init_from else None
    check_data_files(cfg.data)  # local data files that do not exist: one line, no run recorded
    # Multi-process runs (torchrun, srun, Lightning's own launcher) start this function on every rank. Only
    # global rank 0 talks to MLflow; the others log nowhere (opening the SQLite store from every rank at once
    # races on its schema creation). The checkpoint directory named after rank 0's run id reaches the other
    # ranks through ModelCheckpoint, which broadcasts its dirpath from rank 0 in setup().
    run = open_run(cfg, resume_checkpoint, init_from) if rank_zero_only.rank == 0 else None
    with run or contextlib.nullcontext():  # closes the run however this ends (pc_lightning.tracked_run)
        # Data first: the tokenizer fixes the vocabulary, which the config check needs before the model exists.
        prepared = prepare(cfg.data)
        resolve_vocab(cfg, prepared.vocab_size)
        world = world_size(cfg)
        total_steps = steps_for_budget(cfg, world)
        module, datamodule = build_module(cfg, prepared, total_steps)
        if initial_state is not None:
            load_initial_weights(module.model, initial_state, init_from)
        if run is None:
            logger = DummyLogger()
        else:
            uri = tracking.tracking_uri(cfg.tracking)
            # a server's outage must not stop training: metrics go through MLflow's background queue, whose
            # requests MLflow retries (~4 min of backoff) while training goes on
            logger = run.logger(experiment_name=cfg.tracking.experiment, tracking_uri=uri,
                                synchronous=False if tracking.is_server(uri) else None)
            if run.reopened:
                _log_resume(run.client, run.run_id, cfg, ckpt_path)
            else:
                _log_config(logger, cfg, prepared, module, total_steps, tokens_per_step(cfg, world))
        ckpt_dir = ckpt_path.parent if ckpt_path is not None else \
            Path(cfg.trainer.checkpoint_dir) / cfg.name / (run.run_id if run else "run")
        trainer = build_trainer(cfg, module, logger, ckpt_dir, extra_callbacks, quiet=quiet, strategy=strategy)
        status, message = RunStatus.FINISHED, ""
        try:
            with _mismatch_reported(ckpt_path, run):
                trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
            if not math.isfinite(float(trainer.callback_metrics.get("val/loss", 0.0))):
                status, message = RunStatus.DIVERGED, "validation loss is not finite"
        except Diverged as e:
            status, message = RunStatus.DIVERGED, str(e)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        throughput = next(c for c in trainer.callbacks if isinstance(c, TokenThroughput))
        if throughput.last_tokens_per_sec is not None:
            metrics["perf/tokens_per_sec"] = throughput.last_tokens_per_sec
        if run is not None:
            run.finish(status, **({"diverged_message": message} if status == RunStatus.DIVERGED else {}))
    return RunResult(run_id=run.run_id if run else "", status=status, step=trainer.global_step, metrics=metrics,
                     checkpoint_dir=str(trainer.checkpoint_callback.dirpath), message=message)


def open_run(cfg: ExperimentConfig, resume_checkpoint: dict | None = None, init_from: str | None = None) -> TrackedRun:
    """The MLflow run of this training run: the resumed checkpoint's run, else a new one (named
    ``tracking.run_name`` or the config's name, tagged ``pcl.name``, ``pcl.threads`` (and ``pcl.init_from``) and
    nested under ``tracking.parent_run_id``)."""
    uri = tracking.tracking_uri(cfg.tracking)
    mlflow_client = tracking.client(uri)
    run_id = (resume_checkpoint or {}).get("mlflow_run_id")
    if run_id:
        return TrackedRun.reopen(mlflow_client, run_id)
    tags = {**cfg.tracking.tags, "pcl.name": cfg.name,
            "pcl.threads": str(torch.get_num_threads())}  # intra-op threads of the training process
    if init_from:
        tags["pcl.init_from"] = init_from
    if cfg.tracking.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
    return TrackedRun.create(mlflow_client, uri, cfg.tracking.experiment, cfg.tracking.run_name or cfg.name, tags)


def build_module(cfg: ExperimentConfig, prepared, total_steps: int) -> tuple[L.LightningModule, L.LightningDataModule]:
    """The LightningModule and the data module of ``cfg`` (Gauss-Newton: manual optimisation, stacked batches)."""
    gauss_newton = cfg.optim.gauss_newton
    # the config saved in every checkpoint's hyperparameters, with passwords in URLs redacted
    module = (GaussNewtonModule if gauss_newton else PretrainModule)(redact_tree(to_dict(cfg)),
                                                                     total_steps=total_steps)
    datamodule = (GaussNewtonDataModule if gauss_newton else PretrainDataModule)(
        cfg.data, seed=cfg.trainer.seed, accumulate=batches_per_step(cfg))
    datamodule.prepared = prepared
    return module, datamodule


def build_trainer(cfg: ExperimentConfig, module: L.LightningModule, logger: Logger | None = None,
                  checkpoint_dir: str | Path | None = None, extra_callbacks: list[L.Callback] | None = None,
                  quiet: bool = False, strategy: str | Strategy | None = None) -> L.Trainer:
    """The Lightning Trainer of one run of ``cfg``: ``pcl train``, every sweep trial and ablation run, and the
    multi-process tests build it here.

    ``logger``: the run's logger (None: log nowhere). ``checkpoint_dir``: where ``last.ckpt`` is written every
    ``trainer.checkpoint_every`` steps, atomically (:mod:`pc_lightning.atomic_checkpoint`), with the MLflow run
    id in it; None: no checkpoints. ``strategy``: replaces :func:`pc_lightning.distributed.lightning_strategy`
    (the tests run FSDP on CPU processes through a subclass of Lightning's FSDPStrategy).
    """
    world = world_size(cfg)
    throughput = TokenThroughput(tokens_per_step(cfg, world), flops_per_token(cfg.model, cfg.data.seq_len),
                                 cfg.trainer.log_every)
    callbacks: list[L.Callback] = [throughput]
    if logger is not None:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    plugins = []
    if checkpoint_dir is not None:
        plugins.append(AtomicCheckpointIO())  # a process killed while writing never leaves a partial last.ckpt
        # A checkpoint on exception needs collectives (barrier, file-exists reduce) among ranks that a Ctrl-C or
        # a crashed peer leaves out of step: with several processes it could deadlock until the launcher kills
        # rank 0 (and its MLflow run is never closed), so there the last periodic checkpoint is what a resume
        # starts from.
        callbacks.append(ModelCheckpoint(dirpath=str(checkpoint_dir), save_last=True, save_top_k=0,
                                         every_n_train_steps=cfg.trainer.checkpoint_every,
                                         save_on_exception=world == 1))
        callbacks.append(MlflowRunInCheckpoint(logger.run_id if isinstance(logger, MLFlowLogger) else ""))
    callbacks += configured_callbacks(cfg, module) + list(extra_callbacks or [])
    silence_library_noise()  # Lightning's device banner and tips

    return L.Trainer(
        accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes,
        strategy=strategy if strategy is not None else lightning_strategy(cfg), precision=precision(cfg),
        max_steps=steps_for_budget(cfg, world), max_epochs=-1,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        gradient_clip_val=None if cfg.optim.gauss_newton else cfg.optim.grad_clip or None,
        val_check_interval=cfg.trainer.val_every * cfg.trainer.accumulate_grad_batches,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, log_every_n_steps=cfg.trainer.log_every,
        logger=logger if logger is not None else False, callbacks=callbacks, plugins=plugins,
        enable_checkpointing=checkpoint_dir is not None, use_distributed_sampler=False,
        deterministic=cfg.trainer.deterministic, enable_progress_bar=cfg.trainer.progress_bar and not quiet,
        enable_model_summary=not quiet,
    )


@contextlib.contextmanager
def _mismatch_reported(ckpt_path: Path | None, run: TrackedRun | None):
    """A resumed checkpoint whose state dict does not fit the model (other shapes or layers, found by Lightning when
    it loads the state dict) becomes one CheckpointError naming the checkpoint and the first difference. The
    reopened MLflow run then closes with the status it had before this resume: the training it records did not
    fail."""
    try:
        yield
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines()] or [""]
        if ckpt_path is None or not lines[0].startswith("Error(s) in loading state_dict"):  # torch's wording
            raise
        problems = [line for line in lines[1:] if line]
        first = problems[0][:300].rstrip(".") if problems else lines[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        if run is not None:
            run.restore_previous_status()
        raise CheckpointError(f"{ckpt_path}: does not fit the model of this config (were model.* settings "
                              f"changed?): {first}{more}") from None


def _log_resume(mlflow_client, run_id: str, cfg: ExperimentConfig, ckpt_path: Path) -> None:
    """A resume may change the config (e.g. a longer trainer.max_steps): MLflow params are immutable, so the
    run keeps its first config as params and config.yaml, and each resume adds its config as an artifact."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    mlflow_client.log_text(run_id, yaml.safe_dump(redact_tree(to_dict(cfg)), sort_keys=False),
                           f"resumes/config-{stamp}.yaml")
    mlflow_client.set_tag(run_id, "pcl.resumed_from", str(ckpt_path))


def _log_config(logger: MLFlowLogger, cfg: ExperimentConfig, prepared, module: PretrainModule, total_steps: int,
                tokens_per_step: int) -> None:
    """Params (flattened resolved config), the config YAML artifact and the run's fixed reference numbers;
    passwords in URLs (tracking URI, data source) are redacted in both."""
    config = redact_tree(to_dict(cfg))
    params: dict[str, Any] = flatten(config)
    params.update({"derived.total_steps": total_steps, "derived.tokens_per_step": tokens_per_step,
                   "derived.parameters": count_parameters(module.model), "data.cache": redact(str(prepared.dir))})
    logger.log_hyperparams(params)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        logger.experiment.log_artifact(logger.run_id, path)
    logger.log_metrics({"val/unigram_entropy": prepared.meta["val_unigram_entropy"],
                        "data/train_tokens": float(prepared.meta["train_tokens"])}, step=0)
