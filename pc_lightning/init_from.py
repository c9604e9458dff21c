"""``trainer.init_from``: start a run from another run's weights (a warm start shared by optimizer comparisons).

Abreu et al. (arXiv 2510.09378) start every optimizer they compare, Gauss-Newton included, from the parameters of
one checkpoint of a normal run (step 1000), with a fresh optimizer. :func:`check_initial_checkpoint` and
:func:`load_initial_weights` do that for any run: they load the ``state_dict`` of a checkpoint written by
``pcl train`` (any optimizer; dense, PC or TSVD model; a TSVD checkpoint written after rank changes resizes the
layers to its ranks) into the run's model before training starts. Nothing else comes along: optimizer state, schedule, step counter (0), data position (the run's
own sampler from index 0), a Gauss-Newton EMA or carried iterate, the divergence reference and the MLflow run
(a new one, tagged ``pcl.init_from``) are all fresh. ``--resume`` of the new run continues it from its own
checkpoint (the initial weights are not loaded again).

The checkpoint's model config must be the run's: every ``model.*`` key equal except :data:`IGNORED`, the keys
that only decide how fresh weights are drawn or how the forward is executed; anything else raises a
:class:`~pc_lightning.config.ConfigError` at ``trainer.init_from`` listing the differing keys.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from pc_lightning.config import ConfigError, ExperimentConfig, ModelConfig, build, flatten, to_dict

KEY = "trainer.init_from"
IGNORED = frozenset({"compile", "init", "init_std", "pc.evaluate", "pc.bf16_matmuls", "pc.merge_on_end",
                     "tsvd.init_rank_fraction", "tsvd.init_from_svd"})


def model_differences(saved: ModelConfig, run: ModelConfig) -> list[str]:
    """``model.<key>: checkpoint X, this run Y`` for every key (not in :data:`IGNORED`) where they differ."""
    a, b = flatten(to_dict(saved)), flatten(to_dict(run))
    return [f"model.{k}: checkpoint {a.get(k)!r}, this run {b.get(k)!r}"
            for k in sorted(set(a) | set(b)) if k not in IGNORED and a.get(k) != b.get(k)]


def check_initial_checkpoint(cfg: ExperimentConfig, path: str) -> dict[str, torch.Tensor]:
    """The model weights of the checkpoint at ``path``, after checking that its model config is the run's (a
    ``model.vocab_size`` still unset here is taken from the tokenizer later, and checked when the weights load)."""
    if not Path(path).is_file():
        raise ConfigError(KEY, f"checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    try:
        saved = checkpoint["hyper_parameters"]["config"]["model"]
        state = checkpoint["state_dict"]
    except (KeyError, TypeError):
        raise ConfigError(KEY, f"{path} is not a checkpoint written by pcl train (no config or state_dict)") from None
    try:
        saved_model = build(ModelConfig, saved, "model")
    except ConfigError as e:
        raise ConfigError(KEY, f"the checkpoint's model config does not load here ({e})") from None
    if cfg.model.vocab_size is None:
        saved_model = dataclasses.replace(saved_model, vocab_size=None)
    differences = model_differences(saved_model, cfg.model)
    if differences:
        raise ConfigError(KEY, "the checkpoint's model differs from this run's: " + "; ".join(differences))
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}


def load_initial_weights(model: nn.Module, weights: dict[str, torch.Tensor], path: str) -> None:
    """Load the weights :func:`check_initial_checkpoint` read from ``path`` into ``model`` (the run's freshly
    built Llama)."""
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ConfigError(KEY, f"the checkpoint's weights do not fit this run's model: {e}") from None
