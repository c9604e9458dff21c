"""One training run: config -> data -> model -> Lightning Trainer -> MLflow run -> :class:`RunResult`.

Used by ``pcl train`` and by sweeps/ablations (which pass a parent run id and extra callbacks).
Whatever happens, the MLflow run ends finished, FAILED (exception or divergence; a diverged run also gets
the tag ``status=diverged``) or KILLED (Ctrl-C), with its metrics so far, and ``last.ckpt`` is written so
that ``pcl train --config ... --resume last`` continues the same MLflow run.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import DummyLogger

from pc_lightning import tracking
from pc_lightning.config import (ConfigError, ExperimentConfig, batches_per_step, flatten, steps_for_budget,
                                 to_dict)
from pc_lightning.data.datamodule import PretrainDataModule
from pc_lightning.data.prepare import prepare
from pc_lightning.distributed import lightning_strategy
from pc_lightning.callbacks.registry import configured_callbacks
from pc_lightning.callbacks.run_metadata import MlflowRunInCheckpoint
from pc_lightning.callbacks.throughput import TokenThroughput
from pc_lightning.model import count_parameters, flops_per_token
from pc_lightning.modules.gauss_newton import GaussNewtonDataModule, GaussNewtonModule
from pc_lightning.modules.pretrain import Diverged, PretrainModule
from pc_lightning.secrets import redact, redact_tree


@dataclass
class RunResult:
    run_id: str
    status: str  # finished | diverged | failed | killed
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


def train(cfg: ExperimentConfig, resume: str | None = None, extra_callbacks: list[L.Callback] | None = None,
          quiet: bool = False) -> RunResult:
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    tracking.check_server(cfg.tracking)  # a tracking server that is down or refuses us: one line, in seconds

    # Data first: the tokenizer fixes the vocabulary, which the config check needs before the model exists.
    prepared = prepare(cfg.data)
    resolve_vocab(cfg, prepared.vocab_size)

    ckpt_path = find_checkpoint(cfg, resume) if resume else None
    run_id = None
    if ckpt_path is not None:
        run_id = torch.load(ckpt_path, map_location="cpu", weights_only=False).get("mlflow_run_id")

    world = world_size(cfg)
    total_steps = steps_for_budget(cfg, world)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * batches_per_step(cfg) * world

    # Multi-process runs (torchrun, srun, Lightning's own launcher) start this function on every rank. Only
    # global rank 0 talks to MLflow; the others log nowhere (opening the SQLite store from every rank at once
    # races on its schema creation). The checkpoint directory named after rank 0's run id reaches the other
    # ranks through ModelCheckpoint, which broadcasts its dirpath from rank 0 in setup().
    lead = rank_zero_only.rank == 0
    uri = tracking.tracking_uri(cfg.tracking)
    mlflow_client = None
    if lead:
        tracking.ensure_results_dir(uri)
        mlflow_client = tracking.client(uri)
        tracking.get_or_create_experiment(mlflow_client, cfg.tracking.experiment, uri)
        tags = dict(cfg.tracking.tags)
        tags["pcl.name"] = cfg.name
        if cfg.tracking.parent_run_id:
            tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
        logger = MLFlowLogger(experiment_name=cfg.tracking.experiment, run_name=cfg.tracking.run_name or cfg.name,
                              tracking_uri=uri, tags=tags, run_id=run_id,
                              artifact_location=tracking.artifact_location(uri),
                              # a server's outage must not stop training: metrics go through MLflow's background
                              # queue, whose requests MLflow retries (~4 min of backoff) while training goes on
                              synchronous=False if tracking.is_server(uri) else None)
    else:
        logger, run_id = DummyLogger(), None

    gauss_newton = cfg.optim.gauss_newton  # manual optimisation, stacked batches
    # the config saved in every checkpoint's hyperparameters, with passwords in URLs redacted
    module = (GaussNewtonModule if gauss_newton else PretrainModule)(redact_tree(to_dict(cfg)),
                                                                     total_steps=total_steps)
    datamodule = (GaussNewtonDataModule if gauss_newton else PretrainDataModule)(
        cfg.data, seed=cfg.trainer.seed, max_steps=total_steps, accumulate=batches_per_step(cfg))
    datamodule.prepared = prepared

    if lead:
        run_id = logger.run_id  # creates the MLflow run (or reopens the resumed one)
    with _closed_on_exit(mlflow_client, run_id):
        if lead and ckpt_path is not None:
            mlflow_client.update_run(run_id, status="RUNNING")
            _log_resume(mlflow_client, run_id, cfg, ckpt_path)
        elif lead:
            _log_config(logger, cfg, prepared, module, total_steps, tokens_per_step)
        trainer, checkpoint, throughput = _trainer(cfg, logger, module, run_id, ckpt_path, world, total_steps,
                                                   tokens_per_step, extra_callbacks, quiet)
        status, message = "finished", ""
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
            if not math.isfinite(float(trainer.callback_metrics.get("val/loss", 0.0))):
                status, message = "diverged", "validation loss is not finite"
        except Diverged as e:
            status, message = "diverged", str(e)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if throughput.last_tokens_per_sec is not None:
            metrics["perf/tokens_per_sec"] = throughput.last_tokens_per_sec
        if run_id:
            mlflow_client.set_tag(run_id, "status", status)
            if status == "diverged":
                mlflow_client.set_tag(run_id, "diverged_message", message)
                mlflow_client.set_terminated(run_id, "FAILED")
    return RunResult(run_id=run_id or "", status=status, step=trainer.global_step, metrics=metrics,
                     checkpoint_dir=str(checkpoint.dirpath), message=message)


@contextmanager
def _closed_on_exit(mlflow_client, run_id: str | None):
    """Whatever stops the run after its MLflow run exists (while logging the config, building the Trainer,
    training, or closing) leaves that run closed: KILLED for Ctrl-C/SIGTERM, FAILED with the error otherwise.
    Inside ``trainer.fit`` Lightning has already closed it as FAILED and written ``last.ckpt``."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        if run_id:
            mlflow_client.set_terminated(run_id, "KILLED")
            mlflow_client.set_tag(run_id, "status", "killed")
        raise
    except Exception as e:
        if run_id:
            mlflow_client.set_terminated(run_id, "FAILED")
            mlflow_client.set_tag(run_id, "status", "failed")
            mlflow_client.set_tag(run_id, "error", redact(f"{type(e).__name__}: {e}")[:5000])
        raise


def _trainer(cfg: ExperimentConfig, logger, module: PretrainModule, run_id: str | None, ckpt_path: Path | None,
             world: int, total_steps: int, tokens_per_step: int, extra_callbacks, quiet: bool):
    """The Lightning Trainer of one run, with its checkpoint and throughput callbacks."""
    ckpt_dir = Path(cfg.trainer.checkpoint_dir) / cfg.name / (run_id or "run")
    if ckpt_path is not None:
        ckpt_dir = ckpt_path.parent
    # A checkpoint on exception needs collectives (barrier, file-exists reduce) among ranks that a Ctrl-C or a
    # crashed peer leaves out of step: with several processes it could deadlock until the launcher kills rank 0
    # (and its MLflow run is never closed), so there the last periodic checkpoint is what a resume starts from.
    checkpoint = ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0,
                                 every_n_train_steps=cfg.trainer.checkpoint_every, save_on_exception=world == 1)
    throughput = TokenThroughput(tokens_per_step, flops_per_token(cfg.model, cfg.data.seq_len), cfg.trainer.log_every)
    callbacks = [checkpoint, throughput, LearningRateMonitor(logging_interval="step"),
                 MlflowRunInCheckpoint(run_id or "")]
    callbacks += configured_callbacks(cfg, module) + list(extra_callbacks or [])

    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes,
        strategy=lightning_strategy(cfg), precision=precision(cfg), max_steps=total_steps, max_epochs=-1,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        gradient_clip_val=None if cfg.optim.gauss_newton else cfg.optim.grad_clip or None,
        val_check_interval=cfg.trainer.val_every * cfg.trainer.accumulate_grad_batches,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, log_every_n_steps=cfg.trainer.log_every,
        logger=logger, callbacks=callbacks, use_distributed_sampler=False, deterministic=cfg.trainer.deterministic,
        enable_progress_bar=cfg.trainer.progress_bar and not quiet, enable_model_summary=not quiet,
    )
    return trainer, checkpoint, throughput


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
