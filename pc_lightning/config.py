"""Typed experiment configuration: dataclasses, YAML composition, dotted overrides, validation.

An experiment is one YAML file under ``conf/``. It may list ``defaults:`` (preset files relative to the
``conf/`` root, merged in order, e.g. ``model/tiny``, ``optim/adamw``), then its own keys, then the
command line's ``key.path=value`` overrides. The merged mapping is turned into the dataclasses below with
strict checks: an unknown key, a wrong type or an impossible combination raises :class:`ConfigError`
with one message that names the key, before any data is prepared or any training starts.

We write the loader ourselves instead of using Hydra/jsonargparse because it is ~200 lines, has no
dependency pins of its own (Hydra's Optuna sweeper pins optuna<5), and gives one-line messages that
name the offending key. ``to_dict(cfg)`` gives the fully resolved config (no ``defaults``): it is what
MLflow records and what ``pcl train --config resolved.yaml`` re-runs.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported with the dotted key it concerns."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config error at '{key}': {message}")


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class PCConfig:
    """Polynomial preconditioning of block weights (DESIGN.md section 3)."""

    level: int = 4  # 0 = identity, 1..4 = odd polynomial of degree 3, 5, 7, 9
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


@dataclass
class TSVDConfig:
    """Truncated-SVD factor layers with cached orthonormalisation (DESIGN.md section 4)."""

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
    lookahead: bool = True  # rank checks probe the dense gradient (augmented basis + Newton step): rank can grow
    ns_steps: int = 5  # cubic Newton-Schulz steps per refresh (ortho_method: newton_schulz)


@dataclass
class ModelConfig:
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
    # stability variants (DESIGN.md sections 2 and 6)
    attn_norm: Literal["none", "qk_norm", "qkv_norm"] = "none"
    post_proj_norm: bool = False
    post_fc2_norm: bool = False
    attn_softcap: float = 0.0  # 0 = off; cap * tanh(s / cap) on attention scores
    logit_softcap: float = 0.0  # 0 = off; cap * tanh(z / cap) on the output logits
    z_loss: float = 0.0  # PaLM z-loss coefficient (e.g. 1e-4): adds z_loss * mean(logsumexp(logits)^2)
    init: Literal["normal", "small"] = "normal"
    embed: Literal["plain", "scaled", "layernorm"] = "plain"
    compile: bool = False


@dataclass
class DataConfig:
    """Where text comes from and how it becomes (B, T+1) token windows (DESIGN.md section 1)."""

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


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (DESIGN.md section 5)."""

    name: Literal["adamw", "muon", "soap", "gn", "gn_layerwise"] = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.1  # on matrices (ndim >= 2); norm weights, gains and scalars get none
    decay_pc_gamma: bool = True  # also decay the PC gains gamma, as the PC reference does (it decays everything)
    decay_tsvd_s: bool = True  # also decay the TSVD singular values s: decaying W = U diag(s) V^T is decaying s
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 = off
    # muon: lr above is for the hidden matrices, adamw_lr for embeddings, head, norms and gains
    adamw_lr: float = 3e-3
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    adjust_lr_fn: Literal["original", "match_rms_adamw"] = "match_rms_adamw"
    # soap
    precondition_frequency: int = 10
    max_precond_dim: int = 10000
    # gauss-newton (gn, gn_layerwise): trainer.max_steps counts outer steps; each takes inner_steps + 1 batches
    inner_optimizer: Literal["adamw", "muon"] = "adamw"
    inner_steps: int = 8
    inner_lr: float = 3e-3
    damping: float = 0.0
    line_search: list[float] = field(
        default_factory=lambda: [1.0, 2**-0.5, 0.5, 2**-1.5, 0.25]
    )

    @property
    def gauss_newton(self) -> bool:
        """Full or layer-wise Gauss-Newton: manual optimisation over stacked batches (modules/gauss_newton.py)."""
        return self.name in ("gn", "gn_layerwise")


@dataclass
class TrainerConfig:
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
    checkpoint_dir: str = "results/checkpoints"
    seed: int = 1337
    deterministic: bool = False
    num_threads: Optional[int] = None  # torch CPU threads (None = torch default)
    progress_bar: bool = True


@dataclass
class SpikeConfig:
    """OLMo-core spike rule (DESIGN.md section 6)."""

    enabled: bool = False
    window: int = 128
    warmup: int = 64
    sigmas: float = 6.0
    action: Literal["log", "skip", "rollback"] = "log"
    rollback_steps_back: int = 100
    rollback_skip_batches: int = 200


@dataclass
class MonitorConfig:
    """Callbacks that watch training. Each is off (cheap) unless enabled; sampled every `every` steps."""

    every: int = 50
    activation_norms: bool = False
    attn_logits: bool = False
    log_z: bool = False
    embed_std: bool = False
    grad_norms: bool = False
    spectrum: bool = False
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    divergence_margin: float = 2.0  # diverged if loss > initial loss + margin (nats), or non-finite


@dataclass
class TrackingConfig:
    """MLflow tracking. Default: a SQLite file under results/ (never the refused ./mlruns store)."""

    tracking_uri: Optional[str] = None  # None = sqlite:///<abs>/results/mlflow.db
    experiment: str = "pc-lightning"
    run_name: Optional[str] = None
    tags: dict[str, str] = field(default_factory=dict)
    parent_run_id: Optional[str] = None  # set by sweeps/ablations for nested runs


@dataclass
class ExperimentConfig:
    name: str = "baseline"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# --------------------------------------------------------------------------------------------------
# Building dataclasses from mappings, with type checks
# --------------------------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (converted where lossless)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
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


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(key, f"unknown key (known keys here: {sorted(names)})")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


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
    if path.resolve() in _seen:
        raise ConfigError("defaults", f"cycle through {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
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
    return key, yaml.safe_load(raw) if raw != "" else ""


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
    return _build(ExperimentConfig, data)


def from_dict(data: dict) -> ExperimentConfig:
    cfg = parse(data)
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------------
# Validation of values and combinations
# --------------------------------------------------------------------------------------------------


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


def is_fsdp(strategy: str) -> bool:
    """``trainer.strategy`` names a fully sharded strategy (fsdp, fsdp_cpu_offload, ...)."""
    return strategy.startswith("fsdp")


def validate(cfg: ExperimentConfig) -> None:
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.trainer
    for key in ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
        _require(getattr(m, key) > 0, f"model.{key}", f"must be positive, got {getattr(m, key)}")
    _require(m.d_model % m.n_heads == 0, "model.n_heads",
             f"n_heads={m.n_heads} must divide d_model={m.d_model}")
    _require((m.d_model // m.n_heads) % 2 == 0, "model.n_heads",
             f"head dim d_model/n_heads={m.d_model // m.n_heads} must be even for RoPE")
    _require(m.vocab_size is None or m.vocab_size > 0, "model.vocab_size", "must be positive")
    _require(m.init_std > 0, "model.init_std", "must be positive")
    _require(m.attn_softcap >= 0, "model.attn_softcap", "must be >= 0 (0 = off)")
    _require(m.z_loss >= 0, "model.z_loss", "must be >= 0 (0 = off)")
    _require(m.logit_softcap >= 0, "model.logit_softcap", "must be >= 0 (0 = off)")
    _require(0 <= m.pc.level <= 4, "model.pc.level", f"must be in 0..4, got {m.pc.level}")
    _require(m.pc.power_iters >= 1, "model.pc.power_iters", "must be >= 1")
    _require(m.pc.eps > 0, "model.pc.eps", "must be positive")
    _require(m.pc.learnable_gamma or m.pc.gamma_init > 0, "model.pc.gamma_init",
             "a fixed gamma (learnable_gamma false) must be positive")
    for name, targets in (("pc", m.pc.targets), ("tsvd", m.tsvd.targets)):
        bad = [x for x in targets if x not in ("ffn", "attn_out", "qk", "v")]
        _require(not bad, f"model.{name}.targets", f"unknown targets {bad}; use ffn, attn_out, qk, v")
    ts = m.tsvd
    _require(0 < ts.init_rank_fraction <= 1, "model.tsvd.init_rank_fraction", "must be in (0, 1]")
    _require(0 < ts.energy_threshold <= 1, "model.tsvd.energy_threshold", "must be in (0, 1]")
    _require(0 < ts.min_rank_fraction <= ts.max_rank_fraction <= 1, "model.tsvd.min_rank_fraction",
             "need 0 < min_rank_fraction <= max_rank_fraction <= 1")
    _require(ts.refresh_every >= 1, "model.tsvd.refresh_every", "must be >= 1")
    _require(ts.rank_check_every >= 0, "model.tsvd.rank_check_every", "must be >= 0")
    _require(0 < ts.max_shrink_fraction <= 1, "model.tsvd.max_shrink_fraction", "must be in (0, 1]")
    _require(ts.ns_steps >= 1, "model.tsvd.ns_steps", "must be >= 1")

    _require(d.seq_len > 0, "data.seq_len", "must be positive")
    _require(d.seq_len <= m.max_seq_len, "data.seq_len",
             f"seq_len={d.seq_len} exceeds the RoPE table model.max_seq_len={m.max_seq_len}")
    _require(d.batch_size > 0, "data.batch_size", "must be positive")
    _require(d.val_batches > 0, "data.val_batches", "must be positive")
    _require(0 < d.val_fraction < 1, "data.val_fraction", "must be in (0, 1)")
    _require(d.vocab_size >= 256 + 1, "data.vocab_size", "must be at least 257 (byte alphabet + <eot>)")
    _require(d.vocab_size <= 2**32, "data.vocab_size", "must fit in uint32")
    if d.source == "hf":
        _require(d.path is not None, "data.path", "required when data.source=hf")
    if d.source == "bible":
        _require(d.path is None, "data.path", "only used with data.source=hf")

    _require(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    _require(o.adamw_lr > 0, "optim.adamw_lr", f"must be positive, got {o.adamw_lr}")
    _require(o.inner_lr > 0, "optim.inner_lr", f"must be positive, got {o.inner_lr}")
    _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
             "need two numbers in [0, 1)")
    _require(0 <= o.warmup_fraction < 1, "optim.warmup_fraction", "must be in [0, 1)")
    _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    _require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = off)")
    _require(o.inner_steps >= 1, "optim.inner_steps", "must be >= 1")
    _require(len(o.line_search) > 0 and all(a > 0 for a in o.line_search), "optim.line_search",
             "need positive step sizes")
    _require(o.eps > 0, "optim.eps", "must be positive")
    _require(0 <= o.momentum < 1, "optim.momentum", "must be in [0, 1)")
    _require(1 <= o.ns_steps < 100, "optim.ns_steps", "must be in 1..99 (torch.optim.Muon)")
    _require(o.precondition_frequency >= 1, "optim.precondition_frequency", "must be >= 1")
    _require(o.max_precond_dim >= 1, "optim.max_precond_dim", "must be >= 1")
    _require(o.damping >= 0, "optim.damping", "must be >= 0")

    _require(t.max_tokens > 0, "trainer.max_tokens", "must be positive")
    _require(t.max_steps is None or t.max_steps > 0, "trainer.max_steps", "must be positive")
    _require(t.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches", "must be >= 1")
    _require(t.val_every >= 1, "trainer.val_every", "must be >= 1")
    _require(t.log_every >= 1, "trainer.log_every", "must be >= 1")
    _require(t.checkpoint_every >= 1, "trainer.checkpoint_every", "must be >= 1")
    if is_fsdp(t.strategy):  # what needs whole matrices outside the forward (pc_lightning/distributed.py)
        _require(m.pc.evaluate != "step", "model.pc.evaluate",
                 "step (PCStep, W_eff outside the forward) cannot run on FSDP's sharded weights; use auto or forward")
        _require(not (m.linear == "pc" and m.pc.merge_on_end), "model.pc.merge_on_end",
                 "not under FSDP; merge the checkpoint afterwards with `pcl merge <ckpt>`")
        _require(not (m.linear == "tsvd" and ts.rank_check_every > 0), "model.tsvd.rank_check_every",
                 "TSVD rank changes are not supported under FSDP (flat sharded parameters); set it to 0 "
                 "(fixed rank) or use trainer.strategy=ddp")
        _require(o.name == "adamw", "optim.name",
                 f"{o.name} needs whole matrices but FSDP gives the optimizer flat shards; use adamw, or ddp")
        _require(not cfg.monitor.grad_norms, "monitor.grad_norms",
                 "per-layer gradient norms would be norms of each rank's FSDP shard; turn it off or use ddp")
        _require(not cfg.monitor.spike.enabled, "monitor.spike.enabled",
                 "the spike rule's gradient norm would be one rank's FSDP shard's; turn it off or use ddp")
    if o.gauss_newton:
        _require(t.accumulate_grad_batches == 1, "trainer.accumulate_grad_batches",
                 "Gauss-Newton uses manual optimisation; leave accumulate_grad_batches at 1")
        # Every model variant composes with GN (PC, TSVD, z-loss, norms); compile does not: dynamo refuses to
        # trace a frame entered from inside a torch.func transform and then skips that frame for good.
        _require(not m.compile, "model.compile",
                 "Gauss-Newton builds its model with torch.func jvp/vjp, inside which torch.compile cannot trace "
                 "('Unsupported functorch tracing attempt'): the model would fall back to eager there and, its "
                 "forward frame then being skipped, in the line search and validation too; set model.compile=false")

    sp = cfg.monitor.spike
    _require(sp.window >= 2, "monitor.spike.window", "must be >= 2")
    _require(0 < sp.warmup <= sp.window, "monitor.spike.warmup", "must be in 1..window")
    _require(sp.sigmas > 0, "monitor.spike.sigmas", "must be positive")
    _require(sp.rollback_steps_back >= 1, "monitor.spike.rollback_steps_back", "must be >= 1")
    _require(sp.rollback_skip_batches >= 0, "monitor.spike.rollback_skip_batches", "must be >= 0")
    if sp.enabled and sp.action != "log":
        _require(not o.gauss_newton, "monitor.spike.action",
                 f"{sp.action} acts on Lightning's automatic optimizer step; Gauss-Newton runs support action=log")
        _require(sp.action != "skip" or t.precision != "16-mixed", "monitor.spike.action",
                 "skip drops the step's gradients, which the fp16 grad scaler refuses; use bf16-mixed or 32-true")
    _require(cfg.monitor.every >= 1, "monitor.every", "must be >= 1")
    _require(cfg.monitor.divergence_margin > 0, "monitor.divergence_margin", "must be positive")


def batches_per_step(cfg: ExperimentConfig) -> int:
    """Batches (per rank) one optimizer step consumes: a Gauss-Newton outer step takes inner_steps + 1."""
    if cfg.optim.gauss_newton:
        return cfg.optim.inner_steps + 1
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
