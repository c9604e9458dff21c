"""In-loop downstream evaluation: lm-evaluation-harness tasks on the live model every ``monitor.eval_every`` steps.

Loss alone hides whether a spike or a method damaged what the model can do; OLMo-core runs downstream evals in
the training loop for that reason. Every ``monitor.eval_every`` optimizer steps (and once more at the end of
training, when the last step was not one of them) the tasks of ``monitor.eval_tasks`` (harness names, or local
task YAMLs under ``monitor.eval_include_path``) run through :class:`~pc_lightning.evaluation.harness_lm.SuiteLM`
on at most ``monitor.eval_limit`` examples each, and every numeric result is logged as
``eval/<task>/<metric>`` (e.g. ``eval/hellaswag/acc_norm``; see :mod:`pc_lightning.evaluation.downstream`).

Global rank 0 alone evaluates, on its replica of the model (other DDP ranks wait at the next collective, so keep
the evaluation shorter than the process group's timeout); FSDP is refused by config validation. The model runs
in eval mode, without gradients, under the run's precision (bf16 autocast under bf16-mixed), then goes back to
training mode; the global random states are restored afterwards, so training continues as without it. PC layers
compute W_eff once per evaluation (as validation does). The tasks and their data are loaded once, when training
starts, so that a wrong task name fails before the first step.
"""

from __future__ import annotations

import contextlib
import random
import time

import lightning as L
import numpy as np
import torch

from pc_lightning.config import DataConfig, MonitorConfig


@contextlib.contextmanager
def preserved_random_state():
    """Restore Python's, NumPy's and torch's (CPU and CUDA) global random states on exit."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


@contextlib.contextmanager
def pc_weights_cached(model: torch.nn.Module):
    """PC layers: W_eff computed once for the whole evaluation instead of in every forward."""
    from pc_lightning.layers.pc_linear import PCLinear, effective_weights

    layers = [m for m in model.modules() if isinstance(m, PCLinear) and m.step_weight is None]
    if layers:
        with torch.no_grad():
            for layer, w_eff in zip(layers, effective_weights(layers)):
                layer.step_weight = w_eff
    try:
        yield
    finally:
        for layer in layers:
            layer.step_weight = None


class DownstreamEval(L.Callback):
    def __init__(self, cfg: MonitorConfig, data: DataConfig):
        """Tasks from ``cfg`` (``monitor.eval_*``); the tokenizer of ``data``'s cache entry; batches of
        ``data.batch_size`` sequences."""
        self.tasks, self.every, self.limit = list(cfg.eval_tasks), cfg.eval_every, cfg.eval_limit
        self.include_path = cfg.eval_include_path
        self.data, self.batch_size = data, data.batch_size
        self._task_dict: dict | None = None
        self._tokenizer = None
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero or self._task_dict is not None:
            return
        from pc_lightning.data.prepare import prepare
        from pc_lightning.data.tokenizer import load_tokenizer
        from pc_lightning.evaluation.downstream import load_tasks

        self._tokenizer = load_tokenizer(str(prepare(self.data).tokenizer_path))  # the cached entry: no work
        self._task_dict = load_tasks(self.tasks, self.include_path, key="monitor.eval_tasks",
                                     include_key="monitor.eval_include_path")

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Run the tasks on the live model; returns (and logs, on rank 0) the flat metrics."""
        self._last_step = trainer.global_step
        if not trainer.is_global_zero:
            return {}
        from pc_lightning.evaluation.downstream import evaluate_tasks, flat_metrics
        from pc_lightning.evaluation.harness_lm import SuiteLM

        model = pl_module.model
        was_training = model.training
        start = time.perf_counter()
        lm = SuiteLM(model, self._tokenizer, batch_size=self.batch_size,
                     forward_context=trainer.strategy.precision_plugin.forward_context)
        model.eval()
        try:
            with preserved_random_state(), torch.no_grad(), pc_weights_cached(model):
                results = evaluate_tasks(lm, self._task_dict, limit=self.limit)
        finally:
            model.train(was_training)
        metrics = flat_metrics(results)
        metrics["eval/seconds"] = time.perf_counter() - start
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        return metrics

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step  # optimizer steps: with accumulation, once per step
        if step > 0 and step != self._last_step and step % self.every == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0 and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)
