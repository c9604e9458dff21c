"""Typed experiment configuration: dataclasses, YAML composition, dotted overrides, validation.

An experiment is one YAML file under ``conf/``. It may list ``defaults:`` (preset files relative to the
``conf/`` root, merged in order, e.g. ``model/tiny``, ``optim/adamw``, or another experiment such as
``baseline``), then its own keys, then the command line's ``key.path=value`` overrides. The merged mapping is
turned into the dataclasses below by :func:`build` with strict checks: an unknown key, a wrong type or an
impossible combination raises :class:`ConfigError` with one message that names the key, before any data is
prepared or any training starts. Keys whose default depends on another section (``model.pc.level: null`` = the
PC reference's level for the optimizer) are filled in by :func:`resolve` in between, so the resolved config holds
the number.

Each section (:class:`Section`) checks its own values in ``check()``, with keys relative to the section;
rules that span sections (a sequence length against the RoPE table, what FSDP or Gauss-Newton refuse) live in
:meth:`ExperimentConfig.check`. :func:`validate` runs them all and prefixes each error with the section's path.

We write the loader ourselves instead of using Hydra/jsonargparse because it is ~200 lines, has no
dependency pins of its own (Hydra's Optuna sweeper pins optuna<5), and gives one-line messages that
name the offending key. ``to_dict(cfg)`` gives the fully resolved config (no ``defaults``): it is what
MLflow records and what ``pcl train --config resolved.yaml`` re-runs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported with the dotted key it concerns."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"config error at '{key}': {message}")

    def under(self, prefix: str) -> "ConfigError":
        """The same error with its key placed under the section ``prefix`` (``lr`` -> ``optim.lr``)."""
        return ConfigError(f"{prefix}.{self.key}" if prefix else self.key, self.message)


def require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


class Section:
    """Base of the config sections.

    ``check()`` validates the section's own values (keys relative to the section). ``moved`` maps keys that
    used to live in this section to their new dotted path: :func:`build` refuses them with a message naming it.
    """

    moved: ClassVar[dict[str, str]] = {}

    def check(self) -> None:
        pass


def _positive(section: Section, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        require(value > 0, name, f"must be positive, got {value}")


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------

LAYER_GROUPS = ("ffn", "attn_out", "qk", "v")  # what model.pc.targets / model.tsvd.targets name (the groups of pc_lightning.layers.ROLES)


def results_root() -> Path:
    """Where MLflow, Optuna and checkpoints go by default: ``$PCL_RESULTS_DIR``, else ``results/``."""
    return Path(os.environ.get("PCL_RESULTS_DIR", "results"))


@dataclass
class PCConfig(Section):
    """Polynomial preconditioning of block weights (docs/pc.md)."""

    # 0 = identity, 1..4 = odd polynomial of degree 3, 5, 7, 9; None = the PC reference's level for the optimizer
    # (reference_pc_level: 4 with AdamW, 2 with Muon), filled in when the config is loaded (resolve)
    level: Optional[int] = None
    normalizer: Literal["spectral", "none"] = "spectral"
    power_iters: int = 10  # streaming power-iteration steps per optimizer step
    recover_w_norm: bool = True  # multiply back the (detached) spectral-norm estimate
    learnable_gamma: bool = True
    gamma_init: float = 1.0
    targets: list[str] = field(default_factory=lambda: ["ffn", "attn_out"])  # of ffn, attn_out, qk, v
    eps: float = 1e-6
    bf16_matmuls: bool = True  # under bf16-mixed precision, run the polynomial's matmuls in bf16 (else fp32)
    merge_on_end: bool = False  # write the merged dense checkpoint (+ HF export) when training ends
    # where W_eff is computed during training: step = once per optimizer step outside the forward (PCStep),
    # forward = inside every forward (needed under FSDP, whose weights are sharded outside it), auto = forward
    # under trainer.strategy fsdp*, else step (pc_lightning/distributed.py)
    evaluate: Literal["auto", "step", "forward"] = "auto"

    def check(self) -> None:
        require(self.level is None or 0 <= self.level <= 4, "level", f"must be in 0..4 (or null), got {self.level}")
        require(self.power_iters >= 1, "power_iters", "must be >= 1")
        _positive(self, "eps")
        require(self.learnable_gamma or self.gamma_init > 0, "gamma_init",
                "a fixed gamma (learnable_gamma false) must be positive")
        _check_targets(self.targets)


@dataclass
class TSVDConfig(Section):
    """Truncated-SVD factor layers with cached orthonormalisation (docs/tsvd.md)."""

    targets: list[str] = field(default_factory=lambda: ["ffn", "attn_out", "qk", "v"])
    init_rank_fraction: float = 0.5  # initial rank as a fraction of min(m, n)
    init_from_svd: bool = True  # SVD of a normally initialised dense matrix, else random orthonormal
    ortho_method: Literal["cholesky_qr", "qr", "newton_schulz"] = "cholesky_qr"  # qr: Householder (same Q)
    refresh_every: int = 1  # optimizer steps between refreshes of the cached orthonormal factors
    energy_threshold: float = 0.95  # tau: keep the smallest r with sum_{i<=r} s_i^2 >= tau * sum s_i^2
    rank_check_every: int = 100  # steps between rank adaptations (0 = fixed rank)
    min_rank_fraction: float = 0.01
    max_rank_fraction: float = 1.0
    max_shrink_fraction: float = 0.5  # never drop more than this fraction of the rank at once
    lookahead: bool = True  # rank checks probe the dense gradient (augmented basis + line-search step): rank can grow
    ns_steps: int = 5  # cubic Newton-Schulz steps per refresh (ortho_method: newton_schulz)

    def check(self) -> None:
        _check_targets(self.targets)
        require(0 < self.init_rank_fraction <= 1, "init_rank_fraction", "must be in (0, 1]")
        require(0 < self.energy_threshold <= 1, "energy_threshold", "must be in (0, 1]")
        require(0 < self.min_rank_fraction <= self.max_rank_fraction <= 1, "min_rank_fraction",
                "need 0 < min_rank_fraction <= max_rank_fraction <= 1")
        require(self.refresh_every >= 1, "refresh_every", "must be >= 1")
        require(self.rank_check_every >= 0, "rank_check_every", "must be >= 0")
        require(0 < self.max_shrink_fraction <= 1, "max_shrink_fraction", "must be in (0, 1]")
        require(self.ns_steps >= 1, "ns_steps", "must be >= 1")

    def refresh_due(self, step: int) -> bool:
        """Whether the orthonormal factors are refreshed after optimizer step ``step`` (1-based global step)."""
        return step % self.refresh_every == 0


def _check_targets(targets: list[str]) -> None:
    bad = [x for x in targets if x not in LAYER_GROUPS]
    require(not bad, "targets", f"unknown targets {bad}; use {', '.join(LAYER_GROUPS)}")


@dataclass
class ModelConfig(Section):
    """Llama-style decoder. Size fields come from a preset (conf/model/*.yaml); the rest are variants."""

    name: str = "tiny"
    vocab_size: Optional[int] = None  # None = the tokenizer's vocabulary size
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 384
    max_seq_len: int = 256  # size of the RoPE table
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # which linear layer kind the block matrices use
    linear: Literal["dense", "pc", "tsvd"] = "dense"
    pc: PCConfig = field(default_factory=PCConfig)
    tsvd: TSVDConfig = field(default_factory=TSVDConfig)
    # stability variants (docs/stability.md)
    attn_norm: Literal["none", "qk_norm", "qkv_norm"] = "none"
    # what attn_norm's LayerNorms normalise over: head = each head's head_dim values with one LayerNorm(head_dim)
    # shared by the heads (Dehghani et al. 2023, Megatron-core, Qwen3; the Rybakov presets), full = the whole
    # width d (OLMo 2). The default stays full so that configs and checkpoints written before this key keep
    # their model.
    qk_norm_scope: Literal["head", "full"] = "full"
    post_proj_norm: bool = False
    post_fc2_norm: bool = False
    attn_softcap: float = 0.0  # 0 = off; cap * tanh(s / cap) on attention scores
    logit_softcap: float = 0.0  # 0 = off; cap * tanh(z / cap) on the output logits
    z_loss: float = 0.0  # PaLM z-loss coefficient (e.g. 1e-4): adds z_loss * mean(logsumexp(logits)^2)
    # normal: N(0, init_std²), out-projections /√(2 n_layers); small: Spike No More; torchtitan: the PC
    # reference's Llama init (per-layer depth scaling, N(0, 1) embedding, truncated d^-½ head; see
    # block_init_stds in model/llama.py)
    init: Literal["normal", "small", "torchtitan"] = "normal"
    embed: Literal["plain", "scaled", "layernorm"] = "plain"
    # QK-clip (MuonClip, Kimi K2): tau; after each optimizer step the q/k weights of every head whose max
    # attention logit exceeded tau are rescaled so that it would be tau (docs/monitoring.md). 0 = off
    qk_clip: float = 0.0
    compile: bool = False

    def check(self) -> None:
        _positive(self, "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "init_std")
        require(self.d_model % self.n_heads == 0, "n_heads",
                f"n_heads={self.n_heads} must divide d_model={self.d_model}")
        require((self.d_model // self.n_heads) % 2 == 0, "n_heads",
                f"head dim d_model/n_heads={self.d_model // self.n_heads} must be even for RoPE")
        require(self.vocab_size is None or self.vocab_size > 0, "vocab_size", "must be positive")
        for name in ("attn_softcap", "logit_softcap", "z_loss", "qk_clip"):
            require(getattr(self, name) >= 0, name, "must be >= 0 (0 = off)")


@dataclass
class DataConfig(Section):
    """Where text comes from and how it becomes (B, T+1) token windows (docs/data.md)."""

    source: Literal["bible", "hf"] = "bible"
    # for source=hf: anything datasets.load_dataset takes (hub name, or "text"/"json"/"parquet" + data_files)
    path: Optional[str] = None
    name: Optional[str] = None
    data_files: Optional[list[str]] = None
    split: str = "train"
    text_field: str = "text"
    streaming: bool = False
    max_docs: Optional[int] = None  # cap the number of documents (useful with streaming)
    # tokenizer: trained BPE of vocab_size, or loaded from a tokenizer.json
    tokenizer_path: Optional[str] = None
    vocab_size: int = 4096
    val_fraction: float = 0.02  # fraction of *documents* held out
    seq_len: int = 128
    batch_size: int = 16
    val_batches: int = 8  # fixed validation windows = val_batches * batch_size
    num_workers: int = 0
    cache_dir: str = ".cache/pcl-data"
    num_proc: Optional[int] = None  # datasets.map workers

    def check(self) -> None:
        _positive(self, "seq_len", "batch_size", "val_batches")
        require(0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)")
        require(self.vocab_size >= 256 + 1, "vocab_size", "must be at least 257 (byte alphabet + <eot>)")
        require(self.vocab_size <= 2**32, "vocab_size", "must fit in uint32")
        if self.source == "hf":
            require(self.path is not None, "path", "required when data.source=hf")
        if self.source == "bible":
            require(self.path is None, "path", "only used with data.source=hf")


@dataclass
class MuonConfig(Section):
    """torch.optim.Muon on the hidden matrices; AdamW at ``adamw_lr`` on everything else (docs/optimizers.md)."""

    adamw_lr: float = 3e-3  # embeddings, head, norms and gains (optim.lr is the hidden matrices' LR)
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    adjust_lr_fn: Literal["original", "match_rms_adamw"] = "match_rms_adamw"

    def check(self) -> None:
        _positive(self, "adamw_lr")
        require(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        require(1 <= self.ns_steps < 100, "ns_steps", "must be in 1..99 (torch.optim.Muon)")


@dataclass
class SoapConfig(Section):
    """pytorch_optimizer.SOAP (docs/optimizers.md); betas, eps and weight decay are optim's own keys."""

    precondition_frequency: int = 10
    max_precond_dim: int = 10000

    def check(self) -> None:
        require(self.precondition_frequency >= 1, "precondition_frequency", "must be >= 1")
        require(self.max_precond_dim >= 1, "max_precond_dim", "must be >= 1")


@dataclass
class GaussNewtonConfig(Section):
    """Full and layer-wise Gauss-Newton (gn, gn_layerwise; docs/optimizers.md). trainer.max_steps counts outer
    steps; each takes inner_steps + line_search_batches batches."""

    inner_optimizer: Literal["adamw", "muon"] = "adamw"
    inner_steps: int = 4  # conf/optim/gn.yaml's value, the one results/bench/optimizers.md measured
    inner_lr: float = 3e-3
    damping: float = 0.0
    line_search: list[float] = field(default_factory=lambda: [1.0, 2**-0.5, 0.5, 2**-1.5, 0.25])
    # global_cosine: optim's warmup + cosine over outer steps scales the inner lr (constant within an outer step);
    # per_outer_cosine: inner lr · ½(1 + cos(πk/inner_steps)) at inner step k, restarting every outer step,
    # after a linear warmup over optim.warmup_fraction of the outer steps (constant afterwards)
    inner_schedule: Literal["global_cosine", "per_outer_cosine"] = "global_cosine"
    inner_grad_clip: float = 0.0  # max global norm of each inner step's gradient ∇M (0 = off)
    inner_betas: Optional[list[float]] = None  # the inner AdamW's betas (None = optim.betas)
    inner_weight_decay: Optional[float] = None  # the inner optimizer's weight decay (None = optim.weight_decay)
    inner_muon_weight_decay: Optional[float] = None  # its Muon part's (None = inner_weight_decay)
    # keep the inner iterate θ̂ and the inner optimizer state from one outer step to the next (else restart both
    # at θ_t with fresh state)
    carry_inner_state: bool = False
    line_search_batches: int = 1  # fresh batches the line-search loss is averaged over
    ema_decay: float = 0.0  # EMA of the outer parameters, validated and checkpointed (0 = off)
    # gn_layerwise solve groups: blocks_plus_rest = each block + one group of everything else; reference = the
    # embedding, each block and the LM head apart (anything else, i.e. the final norm, one more group)
    layer_groups: Literal["blocks_plus_rest", "reference"] = "blocks_plus_rest"
    freeze_final_norm: bool = False  # the final norm's weight is not trained

    def check(self) -> None:
        _positive(self, "inner_lr")
        require(self.inner_steps >= 1, "inner_steps", "must be >= 1")
        require(self.damping >= 0, "damping", "must be >= 0")
        require(len(self.line_search) > 0 and all(a > 0 for a in self.line_search), "line_search",
                "need positive step sizes")
        require(self.inner_grad_clip >= 0, "inner_grad_clip", "must be >= 0 (0 = off)")
        require(self.inner_betas is None or (len(self.inner_betas) == 2 and all(0 <= b < 1 for b in self.inner_betas)),
                "inner_betas", "need two numbers in [0, 1), or null for optim.betas")
        for name in ("inner_weight_decay", "inner_muon_weight_decay"):
            value = getattr(self, name)
            require(value is None or value >= 0, name, "must be >= 0, or null")
        require(self.line_search_batches >= 1, "line_search_batches", "must be >= 1")
        require(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1) (0 = off)")


@dataclass
class WSDConfig(Section):
    """Warmup-stable-decay schedule (optim.schedule: wsd; Hägele et al. 2024, arXiv 2405.18392)."""

    decay_fraction: float = 0.2  # fraction of the total steps spent in the final decay (cooldown)
    decay_shape: Literal["linear", "1-sqrt"] = "1-sqrt"  # 1-sqrt: multiplier 1 - sqrt(progress) (Hägele et al.)

    def check(self) -> None:
        require(0 < self.decay_fraction <= 1, "decay_fraction", f"must be in (0, 1], got {self.decay_fraction}")


def _moved_to(section: str, names: tuple[str, ...]) -> dict[str, str]:
    return {name: f"optim.{section}.{name}" for name in names}


@dataclass
class OptimConfig(Section):
    """Optimizer and learning-rate schedule (docs/optimizers.md). Keys every optimizer reads sit here;
    optimizer-specific ones under ``muon``, ``soap`` and ``gn``."""

    name: Literal["adamw", "muon", "soap", "gn", "gn_layerwise"] = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.1  # on matrices (ndim >= 2); norm weights, gains and scalars get none
    # false: decoupled decay scaled by the LR, as torch's AdamW (p -= lr_t * weight_decay * p); true: independent of
    # the peak LR, scaled by the schedule only (p -= s_t * weight_decay * p; Wortsman et al. 2023, arXiv 2309.14322,
    # who use 1e-4): each optimizer part is given weight_decay / its peak LR
    independent_weight_decay: bool = False
    decay_pc_gamma: bool = True  # also decay the PC gains gamma, as the PC reference does (it decays everything)
    decay_tsvd_s: bool = True  # also decay the TSVD singular values s: decaying W = U diag(s) V^T is decaying s
    decay_all: bool = False  # decay every parameter (norms, gains, embedding, head too), as the PC reference does
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_fraction: float = 0.05
    # after the linear warmup: cosine to min_lr_ratio, wsd = flat then a final decay to min_lr_ratio (optim.wsd),
    # constant = flat (docs/monitoring.md)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # cosine and wsd decay to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 = off
    wsd: WSDConfig = field(default_factory=WSDConfig)
    muon: MuonConfig = field(default_factory=MuonConfig)
    soap: SoapConfig = field(default_factory=SoapConfig)
    gn: GaussNewtonConfig = field(default_factory=GaussNewtonConfig)

    moved: ClassVar[dict[str, str]] = {
        **_moved_to("muon", ("adamw_lr", "momentum", "nesterov", "ns_steps", "adjust_lr_fn")),
        **_moved_to("soap", ("precondition_frequency", "max_precond_dim")),
        **_moved_to("gn", ("inner_optimizer", "inner_steps", "inner_lr", "damping", "line_search")),
    }

    @property
    def gauss_newton(self) -> bool:
        """Full or layer-wise Gauss-Newton: manual optimisation over stacked batches (modules/gauss_newton.py)."""
        return self.name in ("gn", "gn_layerwise")

    def check(self) -> None:
        _positive(self, "lr", "eps")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "need two numbers in [0, 1)")
        require(0 <= self.warmup_fraction < 1, "warmup_fraction", "must be in [0, 1)")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 = off)")
        require(self.decay_pc_gamma or not self.decay_all, "decay_pc_gamma",
                "false contradicts decay_all=true, which decays the PC gains too")
        require(self.decay_tsvd_s or not self.decay_all, "decay_tsvd_s",
                "false contradicts decay_all=true, which decays the TSVD singular values too")
        require(self.gn.layer_groups == "blocks_plus_rest" or self.name == "gn_layerwise", "gn.layer_groups",
                f"only gn_layerwise has solve groups (optim.name is {self.name})")
        if self.schedule == "wsd":
            require(self.warmup_fraction + self.wsd.decay_fraction <= 1, "wsd.decay_fraction",
                    f"warmup_fraction ({self.warmup_fraction}) + decay_fraction ({self.wsd.decay_fraction}) "
                    "must be <= 1: the decay cannot start before the warmup ends")
            require(not (self.gauss_newton and self.gn.inner_schedule == "per_outer_cosine"), "schedule",
                    "wsd does not apply with optim.gn.inner_schedule=per_outer_cosine (a cosine inside every outer "
                    "step, constant over outer steps); use gn.inner_schedule=global_cosine for WSD over outer steps")


@dataclass
class TrainerConfig(Section):
    """Training length, hardware and checkpointing. Lightning Trainer arguments by name."""

    max_tokens: int = 2_000_000  # token budget; sets max_steps
    max_steps: Optional[int] = None  # overrides max_tokens when set
    accumulate_grad_batches: int = 1
    accelerator: str = "auto"
    devices: Union[int, str] = "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp | ...
    precision: str = "auto"  # auto = bf16-mixed on GPU, 32-true on CPU
    val_every: int = 50  # optimizer steps between validations
    log_every: int = 10
    checkpoint_every: int = 100  # optimizer steps between checkpoints (last.ckpt)
    checkpoint_dir: str = field(default_factory=lambda: str(results_root() / "checkpoints"))
    # start from this checkpoint's weights with a fresh optimizer, schedule, step 0 and a new MLflow run
    # (pc_lightning/init_from.py); the checkpoint's model config must match the run's. --resume wins over it.
    init_from: Optional[str] = None
    seed: int = 1337
    deterministic: bool = False
    num_threads: Optional[int] = None  # torch CPU threads (None = torch default)
    progress_bar: bool = True

    def check(self) -> None:
        _positive(self, "max_tokens")
        require(self.max_steps is None or self.max_steps > 0, "max_steps", "must be positive")
        for name in ("accumulate_grad_batches", "val_every", "log_every", "checkpoint_every"):
            require(getattr(self, name) >= 1, name, "must be >= 1")


@dataclass
class SpikeConfig(Section):
    """OLMo-core spike rule (docs/monitoring.md)."""

    enabled: bool = False
    window: int = 128
    warmup: int = 64
    sigmas: float = 6.0
    action: Literal["log", "skip", "rollback"] = "log"
    # the series the rule watches: loss, gradient norm, and the update/parameter norm ratio ||dW|| / ||W|| of each
    # optimizer step (known only after the step, so not with action=skip)
    signals: list[Literal["loss", "grad_norm", "update_ratio"]] = field(default_factory=lambda: ["loss", "grad_norm"])
    rollback_steps_back: int = 100
    rollback_skip_batches: int = 200

    def check(self) -> None:
        require(self.window >= 2, "window", "must be >= 2")
        require(0 < self.warmup <= self.window, "warmup", "must be in 1..window")
        _positive(self, "sigmas")
        require(len(self.signals) > 0, "signals", "name at least one of loss, grad_norm, update_ratio")
        require(len(set(self.signals)) == len(self.signals), "signals", f"duplicates in {self.signals}")
        require(not (self.action == "skip" and "update_ratio" in self.signals), "signals",
                "update_ratio is known only after the optimizer step, which action=skip would have to undo; "
                "use action=log or rollback with it, or drop update_ratio")
        require(self.rollback_steps_back >= 1, "rollback_steps_back", "must be >= 1")
        require(self.rollback_skip_batches >= 0, "rollback_skip_batches", "must be >= 0")


@dataclass
class MonitorConfig(Section):
    """Callbacks that watch training. Each is off (cheap) unless enabled; sampled every `every` steps."""

    every: int = 50
    activation_norms: bool = False
    attn_logits: bool = False
    log_z: bool = False
    embed_std: bool = False
    grad_norms: bool = False
    update_norms: bool = False  # ||dW|| / ||W|| per group and AdamW's second-moment RMS (docs/monitoring.md)
    spectrum: bool = False
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    divergence_margin: float = 2.0  # diverged if loss > initial loss + margin (nats), or non-finite
    # downstream evaluation with lm-evaluation-harness (pip install -e '.[eval]'); off while eval_tasks is empty
    eval_tasks: list[str] = field(default_factory=list)  # harness task/group names, or tasks under eval_include_path
    eval_every: int = 500  # optimizer steps between evaluations (and once at the end of training)
    eval_limit: Optional[int] = None  # examples per task (None = all)
    eval_include_path: Optional[str] = None  # a directory of local task YAMLs

    def check(self) -> None:
        require(self.every >= 1, "every", "must be >= 1")
        _positive(self, "divergence_margin")
        require(all(name.strip() for name in self.eval_tasks), "eval_tasks", "task names must not be empty")
        require(len(set(self.eval_tasks)) == len(self.eval_tasks), "eval_tasks", "a task is named twice")
        require(self.eval_every >= 1, "eval_every", "must be >= 1")
        require(self.eval_limit is None or self.eval_limit >= 1, "eval_limit", "must be >= 1 (or null = all)")
        if self.eval_include_path is not None:
            require(Path(self.eval_include_path).exists(), "eval_include_path",
                    f"task directory not found: {self.eval_include_path}")
        if self.eval_tasks:
            require(importlib.util.find_spec("lm_eval") is not None, "eval_tasks",
                    "needs lm-evaluation-harness: pip install -e '.[eval]'")


@dataclass
class TrackingConfig(Section):
    """MLflow tracking. Default: a SQLite file under results/ (never the refused ./mlruns store)."""

    tracking_uri: Optional[str] = None  # None = sqlite:///<abs>/results/mlflow.db
    experiment: str = "pc-lightning"
    run_name: Optional[str] = None
    tags: dict[str, str] = field(default_factory=dict)
    parent_run_id: Optional[str] = None  # set by sweeps/ablations for nested runs


@dataclass
class ExperimentConfig(Section):
    name: str = "baseline"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def check(self) -> None:
        """Rules that span sections (each section's own values are checked by its ``check``)."""
        m, o, t = self.model, self.optim, self.trainer
        require(self.data.seq_len <= m.max_seq_len, "data.seq_len",
                f"seq_len={self.data.seq_len} exceeds the RoPE table model.max_seq_len={m.max_seq_len}")
        if is_fsdp(t.strategy):  # what needs whole matrices outside the forward (pc_lightning/distributed.py)
            require(m.pc.evaluate != "step", "model.pc.evaluate",
                    "step (PCStep, W_eff outside the forward) cannot run on FSDP's sharded weights; use auto or forward")
            require(not (m.linear == "pc" and m.pc.merge_on_end), "model.pc.merge_on_end",
                    "not under FSDP; merge the checkpoint afterwards with `pcl merge <ckpt>`")
            require(not (m.linear == "tsvd" and m.tsvd.rank_check_every > 0), "model.tsvd.rank_check_every",
                    "TSVD rank changes are not supported under FSDP (flat sharded parameters); set it to 0 "
                    "(fixed rank) or use trainer.strategy=ddp")
            require(o.name == "adamw", "optim.name",
                    f"{o.name} needs whole matrices but FSDP gives the optimizer flat shards; use adamw, or ddp")
            require(not self.monitor.grad_norms, "monitor.grad_norms",
                    "per-layer gradient norms would be norms of each rank's FSDP shard; turn it off or use ddp")
            require(not self.monitor.spike.enabled, "monitor.spike.enabled",
                    "the spike rule's gradient norm would be one rank's FSDP shard's; turn it off or use ddp")
            require(not self.monitor.update_norms, "monitor.update_norms",
                    "per-group update norms would be norms of each rank's FSDP shard; turn it off or use ddp")
            require(not m.qk_clip, "model.qk_clip",
                    "QK-clip rescales rows of whole q/k matrices, which FSDP holds as flat shards; use ddp")
            require(not self.monitor.eval_tasks, "monitor.eval_tasks",
                    "in-loop evaluation runs rank 0's model alone, which FSDP shards; evaluate the checkpoints with "
                    "`pcl eval` instead, or use ddp")
        if o.gauss_newton:
            require(t.accumulate_grad_batches == 1, "trainer.accumulate_grad_batches",
                    "Gauss-Newton uses manual optimisation; leave accumulate_grad_batches at 1")
            # Every model variant composes with GN (PC, TSVD, z-loss, norms); compile does not: dynamo refuses to
            # trace a frame entered from inside a torch.func transform and then skips that frame for good.
            require(not m.compile, "model.compile",
                    "Gauss-Newton builds its model with torch.func jvp/vjp, inside which torch.compile cannot trace "
                    "('Unsupported functorch tracing attempt'): the model would fall back to eager there and, its "
                    "forward frame then being skipped, in the line search and validation too; set model.compile=false")
        if m.qk_clip:
            require(not o.gauss_newton, "model.qk_clip",
                    "Gauss-Newton runs its forwards inside torch.func transforms, where the max-logit probe cannot "
                    "measure them; QK-clip runs with adamw, muon and soap")
            if m.linear == "pc" and "qk" in m.pc.targets:
                require(m.pc.normalizer == "spectral", "model.pc.normalizer",
                        "QK-clip on PC q/k layers re-factors W_eff through the spectrally normalised polynomial; "
                        "use normalizer=spectral or leave qk out of model.pc.targets")
                require(m.pc.recover_w_norm or m.pc.learnable_gamma, "model.pc.learnable_gamma",
                        "without recover_w_norm the scale of a PC layer's W_eff is gamma alone, which QK-clip must "
                        "lower; a fixed gamma (learnable_gamma false) cannot be")
        spike = self.monitor.spike
        if spike.enabled and spike.action != "log":
            require(not o.gauss_newton, "monitor.spike.action",
                    f"{spike.action} acts on Lightning's automatic optimizer step; Gauss-Newton runs support action=log")
            require(spike.action != "skip" or t.precision != "16-mixed", "monitor.spike.action",
                    "skip drops the step's gradients, which the fp16 grad scaler refuses; use bf16-mixed or 32-true")


def is_fsdp(strategy: str) -> bool:
    """``trainer.strategy`` names a fully sharded strategy (fsdp, fsdp_cpu_offload, ...)."""
    return strategy.startswith("fsdp")


# --------------------------------------------------------------------------------------------------
# Building dataclasses from mappings, with type checks
# --------------------------------------------------------------------------------------------------


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (converted where lossless, sections built)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return build(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return {str(k): coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():  # 2e6 written in YAML
                return int(value)
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected a number, got {value!r}")
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(key, f"expected a number, got {value!r}") from None
        if not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} at {key}")


def _type_name(tp: Any) -> str:
    """Readable annotation: 'dense|pc|tsvd', 'int|None', 'list[str]'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return "|".join(_type_name(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))




def build(cls: type, data: dict, prefix: str = "") -> Any:
    """The dataclass ``cls`` from a mapping, every value type-checked (:func:`coerce`); an unknown key, or one
    that moved (``cls.moved``), raises :class:`ConfigError` naming it. Values are not validated here."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    moved = getattr(cls, "moved", {})
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k in moved:
            raise ConfigError(key, f"this key moved to '{moved[k]}'")
        if k not in names:
            raise ConfigError(key, f"unknown key (known keys here: {sorted(names)})")
        kwargs[k] = coerce(v, hints[k], key)
    return cls(**kwargs)


def field_type(cls: type, path: str) -> Any:
    """The annotation of the dotted key ``path`` under ``cls``; ConfigError naming the first unknown part."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(path, f"'{'.'.join(parts[:i])}' is not a config section")
        hints = typing.get_type_hints(cls)
        if part in getattr(cls, "moved", {}):
            raise ConfigError(path, f"'{here}' moved to '{cls.moved[part]}'")
        if part not in hints:
            raise ConfigError(path, f"unknown config key '{here}' (known keys there: {sorted(hints)})")
        cls = hints[part]
    return cls


def to_dict(cfg: Any) -> dict:
    """The fully resolved config as plain Python types (what MLflow records)."""
    return dataclasses.asdict(cfg)


def describe_keys(cls: type = None, prefix: str = "") -> list[str]:
    """One line per config key: dotted name, type and default (for ``pcl train --help``)."""
    cls = cls or ExperimentConfig
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines += describe_keys(tp, key)
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"  {key:<36} {_type_name(tp):<34} default: {default!r}")
    return lines


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists are kept as values."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


# --------------------------------------------------------------------------------------------------
# YAML composition and overrides
# --------------------------------------------------------------------------------------------------


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def find_conf_root(path: Path) -> Path:
    """The nearest ancestor directory named ``conf`` (where presets live), else the file's directory."""
    for parent in path.resolve().parents:
        if parent.name == "conf":
            return parent
    return path.resolve().parent


def load_yaml_with_defaults(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a YAML file and merge its ``defaults:`` presets (recursively) underneath its own keys."""
    path = Path(path)
    if not path.exists():
        raise ConfigError("--config", f"file not found: {path}")
    if not path.is_file():
        raise ConfigError("--config", f"not a file: {path}")
    if path.resolve() in _seen:
        raise ConfigError("defaults", f"cycle through {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(str(path), f"not valid YAML: {yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "top level must be a mapping")
    defaults = data.pop("defaults", []) or []
    if not isinstance(defaults, list):
        raise ConfigError("defaults", f"expected a list of preset names in {path}")
    root = find_conf_root(path)
    merged: dict = {}
    for name in defaults:
        preset = root / f"{name}.yaml"
        if not preset.exists():
            raise ConfigError("defaults", f"preset '{name}' not found (looked for {preset})")
        merged = deep_merge(merged, load_yaml_with_defaults(preset, _seen + (path.resolve(),)))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=1e-3' -> ('optim.lr', 0.001). The value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(text, "overrides look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(text, "empty key in override")
    try:
        return key, yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(key, f"value {raw!r} is not valid YAML: {yaml_problem(e)}") from None


def yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's (multi-line) error as one line: what is wrong, and where."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Compose presets + file + overrides, build the typed config and validate it."""
    data = load_yaml_with_defaults(path) if path is not None else {}
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    return from_dict(data)


def parse(data: dict) -> ExperimentConfig:
    """Typed config from a mapping: keys and types checked, values and combinations not yet."""
    return build(ExperimentConfig, data)


def from_dict(data: dict) -> ExperimentConfig:
    cfg = parse(data)
    resolve(cfg)
    validate(cfg)
    return cfg


# The PC reference's polynomial level per optimizer (Wang et al., arXiv 2606.06470; its released configs: AdamW
# runs at level 4, Muon runs at level 2). SOAP has no reference run: it is Adam in a rotated basis and, unlike
# Muon, does not flatten the update's spectrum, so it gets AdamW's level.
REFERENCE_PC_LEVEL = {"adamw": 4, "soap": 4, "muon": 2}


def reference_pc_level(optim: OptimConfig) -> int:
    """The PC level the reference pairs with the optimizer that updates the weights: ``optim.name``, or for
    Gauss-Newton its inner optimizer (``optim.gn.inner_optimizer``), which takes every weight step."""
    updater = optim.gn.inner_optimizer if optim.gauss_newton else optim.name
    return REFERENCE_PC_LEVEL[updater]


def resolve(cfg: ExperimentConfig) -> None:
    """Fill in the keys whose default depends on other sections, so the resolved config (what MLflow records and
    ``pcl train --config resolved.yaml`` re-runs) holds the numbers: ``model.pc.level`` = null becomes
    :func:`reference_pc_level`; a level set explicitly is kept."""
    if cfg.model.pc.level is None:
        cfg.model.pc.level = reference_pc_level(cfg.optim)


def sections(obj: Any, prefix: str = "") -> Iterator[tuple[str, Section]]:
    """Every section under ``obj`` (itself included), innermost first, with its dotted path."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Section):
            yield from sections(value, f"{prefix}.{f.name}" if prefix else f.name)
    yield prefix, obj


def validate(cfg: ExperimentConfig) -> None:
    """Each section's own ``check`` (its errors placed under the section's path), then the cross-section rules
    of :meth:`ExperimentConfig.check` (which name full keys themselves)."""
    for path, section in sections(cfg):
        if section is cfg:
            continue
        try:
            section.check()
        except ConfigError as e:
            raise e.under(path) from None
    cfg.check()


def batches_per_step(cfg: ExperimentConfig) -> int:
    """Batches (per rank) one optimizer step consumes: a Gauss-Newton outer step takes inner_steps +
    line_search_batches."""
    if cfg.optim.gauss_newton:
        return cfg.optim.gn.inner_steps + cfg.optim.gn.line_search_batches
    return cfg.trainer.accumulate_grad_batches


def steps_for_budget(cfg: ExperimentConfig, world_size: int = 1) -> int:
    """Optimizer steps: trainer.max_steps if set, else ceil(max_tokens / tokens per step)."""
    if cfg.trainer.max_steps is not None:
        return cfg.trainer.max_steps
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * batches_per_step(cfg) * world_size
    return max(1, math.ceil(cfg.trainer.max_tokens / tokens_per_step))


def save_yaml(cfg: ExperimentConfig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    return path
