"""Run lm-evaluation-harness tasks on the suite's model: task loading, metric names, results table and JSON.

Used by ``pcl eval CHECKPOINT`` (:func:`evaluate_checkpoint`) and by the in-loop callback
(:class:`pc_lightning.callbacks.downstream_eval.DownstreamEval`). Tasks are the harness's (by name: hub
datasets, downloaded once into the Hugging Face cache) or local task YAMLs under an include path (e.g.
``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``).

Metric names: the harness reports ``<metric>,<filter>`` per task (``acc,none``, ``acc_norm,none``,
``exact_match,strict-match``); they are logged as ``eval/<task>/<metric>`` for the ``none`` filter and
``eval/<task>/<metric>/<filter>`` otherwise (``eval/hellaswag/acc_norm``, ``eval/gsm8k/exact_match/strict-match``),
stderrs as ``eval/<task>/<metric>_stderr``.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Sequence

import torch

from pc_lightning.config import ConfigError, ExperimentConfig

NOT_METRICS = ("alias", "name", "sample_len", "sample_count")  # bookkeeping entries of a task's results
FEWSHOT_SEED = 1234  # the harness's default few-shot sampler seed: the same few-shot examples at every evaluation


def task_manager(names: Sequence[str], include_path: str | None = None, key: str = "--include-path"):
    """The harness's task index; only the local YAMLs when every task is found there (indexing the harness's
    own ~15k task YAMLs takes seconds)."""
    from lm_eval.tasks import TaskManager

    if include_path is None:
        return TaskManager()
    if not Path(include_path).exists():
        raise ConfigError(key, f"task directory not found: {include_path}")
    local = TaskManager(include_path=include_path, include_defaults=False)
    if all(name in local.all_tasks for name in names):
        return local
    return TaskManager(include_path=include_path)


def load_tasks(names: Sequence[str], include_path: str | None = None, key: str = "--tasks",
               include_key: str = "--include-path") -> dict:
    """``TaskManager.load`` of the named tasks/groups/tags (datasets loaded here), or a ConfigError naming ``key``."""
    if not names:
        raise ConfigError(key, "name at least one task")
    manager = task_manager(names, include_path, include_key)
    try:
        return manager.load(list(names))
    except KeyError as e:
        raise ConfigError(key, f"{e.args[0] if e.args else e} (harness task names: `lm-eval ls tasks`; local task "
                               f"YAMLs go under {include_key})") from None


def evaluate_tasks(lm, task_dict: dict, limit: int | None = None, bootstrap_iters: int = 0) -> dict:
    """The harness's ``evaluate`` on already loaded tasks (the in-loop path: no environment report, no seeding)."""
    from lm_eval.evaluator import evaluate

    for task in task_dict["tasks"].values():
        task.set_fewshot_seed(FEWSHOT_SEED)
    return evaluate(lm=lm, task_dict=task_dict, limit=limit, bootstrap_iters=bootstrap_iters, log_samples=False)


def metric_name(task: str, key: str) -> str:
    """('hellaswag', 'acc_norm,none') -> 'eval/hellaswag/acc_norm'; other filters become a last path part."""
    metric, _, filt = key.partition(",")
    name = f"eval/{task}/{metric}" + (f"/{filt}" if filt and filt != "none" else "")
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)  # MLflow's allowed characters


def flat_metrics(results: dict) -> dict[str, float]:
    """{eval/<task>/<metric>: value} for every numeric result of every task and group."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if key in NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # names, counts and "N/A" stderrs
            out[metric_name(task, key)] = float(value)
    return out


def results_table(results: dict) -> str:
    """The harness's own Markdown table(s) of the results."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


# ---------------------------------------------------------------------------------------------- checkpoints


def checkpoint_tokenizer(cfg: ExperimentConfig, override: str | None = None) -> Path:
    """The tokenizer.json a run trained with: the data cache entry of its resolved ``data.*`` config (what
    ``pcl prepare`` writes), else its ``data.tokenizer_path``; ``override`` wins."""
    from pc_lightning.data.prepare import cache_dir_for

    if override is not None:
        if not Path(override).is_file():
            raise ConfigError("--tokenizer", f"file not found: {override}")
        return Path(override)
    looked = []
    try:
        cached = cache_dir_for(cfg.data) / "tokenizer.json"
        if cached.is_file():
            return cached
        looked.append(str(cached))
    except OSError as e:  # the cache key hashes data.tokenizer_path, which may be gone
        looked.append(f"the data cache ({e})")
    if cfg.data.tokenizer_path and Path(cfg.data.tokenizer_path).is_file():
        return Path(cfg.data.tokenizer_path)
    raise ConfigError("--tokenizer", f"no tokenizer for this checkpoint: looked for {', '.join(looked)} (the data "
                                     "cache of its data.* config); run `pcl prepare` with the run's config, or "
                                     "pass --tokenizer PATH/tokenizer.json")


def load_checkpoint_model(path: str | Path, device: str = "cpu", tokenizer: str | None = None):
    """(model in eval mode on ``device``, tokenizer, resolved config) of a checkpoint written by ``pcl train``
    or ``pcl merge``."""
    from pc_lightning.data.tokenizer import load_tokenizer
    from pc_lightning.modules.pretrain import PretrainModule

    if not Path(path).is_file():
        raise ConfigError("CHECKPOINT", f"file not found: {path}")
    module = PretrainModule.load_from_checkpoint(path, map_location="cpu")
    tok = load_tokenizer(str(checkpoint_tokenizer(module.cfg, tokenizer)))
    model = module.model.to(device).eval()
    return model, tok, module.cfg


def default_output(checkpoint: str | Path) -> Path:
    """``<checkpoint dir>/<checkpoint stem>.eval.json``, e.g. ``last.eval.json`` beside ``last.ckpt``."""
    path = Path(checkpoint)
    return path.with_name(f"{path.stem}.eval.json")


def evaluate_checkpoint(checkpoint: str | Path, tasks: Sequence[str], limit: int | None = None, batch_size: int = 16,
                        include_path: str | None = None, out: str | Path | None = None, device: str | None = None,
                        tokenizer: str | None = None) -> tuple[dict, Path]:
    """``pcl eval``: the harness's ``simple_evaluate`` on a checkpoint; its JSON results written to ``out``."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    from pc_lightning.evaluation.harness_lm import SuiteLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok, cfg = load_checkpoint_model(checkpoint, device, tokenizer)
    manager = task_manager(tasks, include_path)
    lm = SuiteLM(model, tok, batch_size=batch_size)
    start = time.perf_counter()
    try:
        results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                  batch_size=batch_size, device=device, log_samples=False)
    except KeyError as e:
        raise ConfigError("--tasks", f"{e.args[0] if e.args else e} (harness task names: `lm-eval ls tasks`; "
                                     "local task YAMLs go under --include-path)") from None
    results["pcl"] = {"checkpoint": str(Path(checkpoint).resolve()), "run_name": cfg.name,
                      "linear": cfg.model.linear, "tokenizer": str(checkpoint_tokenizer(cfg, tokenizer)),
                      "max_seq_len": cfg.model.max_seq_len, "seconds": round(time.perf_counter() - start, 3),
                      "metrics": flat_metrics(results)}
    out_path = Path(out) if out is not None else default_output(checkpoint)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    return results, out_path
