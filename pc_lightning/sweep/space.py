"""The sweep file: a typed, validated description of one Optuna study; docs/sweeps.md).

A sweep file (``sweeps/*.yaml``) names a base experiment config plus overrides, the parameters to search
(dotted config paths with a type and a range or choices), the objective metric and direction, the sampler,
the pruner, the trial budget and the storage. Everything is checked when the file is read, before any
trial runs: unknown keys, parameter paths that are not config fields, ``low > high``, unknown samplers or
pruner arguments all raise :class:`pc_lightning.config.ConfigError` naming the offending key.

Example::

    study_name: pc_degree_lr
    base: conf/baseline.yaml
    overrides: [variant/pc, trainer.max_steps=200]   # presets under conf/ or key.path=value
    objective: {metric: val/loss, direction: minimize}
    parameters:
      model.pc.level: {type: int, low: 1, high: 4}
      optim.lr: {type: float, low: 1.0e-4, high: 3.0e-2, log: true}
    sampler: {name: tpe, seed: 0}
    pruner: {name: median, n_startup_trials: 3, n_warmup_steps: 100}
    n_trials: 20
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from pc_lightning import tracking
from pc_lightning.config import (ConfigError, ExperimentConfig, build, coerce, deep_merge, field_type, find_conf_root,
                                 from_dict, load_yaml_with_defaults, parse_override, set_dotted)

# build/coerce are the config module's strict mapping -> dataclass builders; reusing them gives sweep
# files the same one-line "config error at '<key>'" messages as experiment files.


@dataclass
class ParamSpec:
    type: Literal["float", "int", "categorical"]
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: Optional[list[Any]] = None


@dataclass
class ObjectiveSpec:
    metric: str = "val/loss"
    direction: Literal["minimize", "maximize"] = "minimize"
    # Value a diverged trial counts as. None = the loss of a uniform predictor, ln(vocab) (the loss at
    # initialisation) for '*loss' metrics, vocab for '*ppl' metrics; other metrics must set it.
    diverged_value: Optional[float] = None


@dataclass
class SamplerSpec:
    name: Literal["tpe", "random", "grid", "cmaes"] = "tpe"
    seed: Optional[int] = 0


@dataclass
class PrunerSpec:
    name: Literal["median", "hyperband", "none"] = "median"
    args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the Optuna pruner


@dataclass
class HeartbeatSpec:
    """RDB storages only: a trial whose worker stopped beating for grace_period seconds is failed and retried."""

    interval: int = 10
    grace_period: int = 30
    max_retry: int = 2


@dataclass
class SweepSpec:
    study_name: str
    base: str
    parameters: dict[str, ParamSpec]
    overrides: list[str] = field(default_factory=list)  # key.path=value or preset names (see compose_config)
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    n_trials: int = 20
    timeout: Optional[float] = None  # seconds for this command (each worker), None = no limit
    storage: Optional[str] = None  # None = sqlite:///<results>/optuna.db; *.log / *.journal = journal file
    heartbeat: HeartbeatSpec = field(default_factory=HeartbeatSpec)


def resolve_relative(path: str, spec_file: Path) -> Path:
    """A relative path in a spec file: tried from the current directory, then the spec's directory upwards."""
    p = Path(path)
    if p.is_absolute():
        return p
    for root in (Path.cwd(), *spec_file.resolve().parents):
        if (root / p).exists():
            return (root / p).resolve()
    raise ConfigError("base", f"config file not found: {path} (looked in the current directory and above "
                              f"{spec_file})")


def compose_config(base: str | Path, items: list[str]) -> ExperimentConfig:
    """The base experiment config with ``items`` applied in order and validated.

    An item ``key.path=value`` is a dotted override; an item without '=' names a preset under the base
    file's ``conf/`` root (e.g. ``variant/qk_norm``, ``optim/muon``), merged like a ``defaults:`` entry.
    """
    data = load_yaml_with_defaults(base)
    root = find_conf_root(Path(base))
    for item in items:
        if "=" in item:
            set_dotted(data, *parse_override(item))
            continue
        preset = root / f"{item}.yaml"
        if not preset.exists():
            raise ConfigError(item, f"neither key.path=value nor a preset (looked for {preset})")
        data = deep_merge(data, load_yaml_with_defaults(preset))
    return from_dict(data)


def default_storage() -> str:
    return f"sqlite:///{(tracking.RESULTS_DIR / 'optuna.db').resolve()}"


def storage_url(spec: SweepSpec, override: str | None = None) -> str:
    return override or spec.storage or default_storage()


def is_journal(url: str) -> bool:
    return url.endswith((".log", ".journal")) and "://" not in url


def config_field_type(path: str) -> Any:
    """The annotation of a dotted config key, or ConfigError naming the first unknown (or moved) part."""
    try:
        tp = field_type(ExperimentConfig, path)
    except ConfigError as e:
        raise ConfigError(f"parameters.{path}", e.message) from None
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"parameters.{path}", "names a config section, not a value")
    return tp


def _check_param(path: str, p: ParamSpec) -> None:
    key = f"parameters.{path}"
    tp = config_field_type(path)
    if p.type == "categorical":
        if not p.choices:
            raise ConfigError(f"{key}.choices", "categorical parameters need a non-empty list of choices")
        for i, choice in enumerate(p.choices):
            coerce(choice, tp, f"{key}.choices[{i}]")
        return
    if p.low is None or p.high is None:
        raise ConfigError(f"{key}.low", f"{p.type} parameters need low and high")
    if p.low > p.high:
        raise ConfigError(f"{key}.low", f"low={p.low} is greater than high={p.high}")
    if p.log and p.low <= 0:
        raise ConfigError(f"{key}.low", "log-scaled parameters need low > 0")
    if p.log and p.step is not None:
        raise ConfigError(f"{key}.step", "Optuna does not combine log=true with a step")
    if p.type == "int":
        for name in ("low", "high", "step"):
            value = getattr(p, name)
            if value is not None and not float(value).is_integer():
                raise ConfigError(f"{key}.{name}", f"int parameters need integer bounds, got {value}")
    coerce(p.low if p.type == "float" else int(p.low), tp, key)  # the config field accepts this type


def grid_values(path: str, p: ParamSpec) -> list[Any]:
    """Values a grid sampler enumerates: the choices, or low..high in steps."""
    if p.type == "categorical":
        return list(p.choices or [])
    if p.step is None:
        if p.type == "int":
            return list(range(int(p.low), int(p.high) + 1))
        raise ConfigError(f"parameters.{path}.step", "the grid sampler needs a step (or choices) for floats")
    n = int(math.floor((p.high - p.low) / p.step + 1e-9)) + 1
    values = [p.low + i * p.step for i in range(n)]
    return [int(v) for v in values] if p.type == "int" else values


def load_spec(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """Read and fully check a sweep file (and that its base config plus overrides is a valid config)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError("spec", f"sweep file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "top level must be a mapping")
    for required in ("study_name", "base", "parameters"):
        if required not in data:
            raise ConfigError(required, f"missing in {path}")
    pruner = data.get("pruner")
    if isinstance(pruner, dict):  # pruner arguments sit beside its name in the file
        data["pruner"] = {"name": pruner.get("name", "median"),
                          "args": {k: v for k, v in pruner.items() if k != "name"}}
    spec: SweepSpec = build(SweepSpec, data)
    spec.base = str(resolve_relative(spec.base, path))
    if not spec.parameters:
        raise ConfigError("parameters", "declare at least one parameter to search")
    for name, p in spec.parameters.items():
        _check_param(name, p)
    if spec.n_trials < 1:
        raise ConfigError("n_trials", "must be >= 1")
    if spec.sampler.name == "grid":
        for name, p in spec.parameters.items():
            grid_values(name, p)
    if spec.sampler.name == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise ConfigError("sampler.name", "cmaes needs the 'cmaes' package (pip install cmaes)") from None
    build_pruner(spec)  # checks the pruner arguments
    if spec.objective.diverged_value is None and not spec.objective.metric.endswith(("loss", "ppl")):
        raise ConfigError("objective.diverged_value", f"set the value a diverged trial counts as for "
                                                      f"metric '{spec.objective.metric}'")
    compose_config(spec.base, list(spec.overrides) + list(overrides or []))
    return spec


def build_sampler(spec: SweepSpec, worker: int = 0):
    """The Optuna sampler; each local worker offsets the seed so parallel workers do not propose the same points."""
    import optuna

    seed = None if spec.sampler.seed is None else spec.sampler.seed + worker
    name = spec.sampler.name
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        space = {path: grid_values(path, p) for path, p in spec.parameters.items()}
        return optuna.samplers.GridSampler(space, seed=seed)
    return optuna.samplers.CmaEsSampler(seed=seed)


def build_pruner(spec: SweepSpec):
    import optuna

    kinds = {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner,
             "none": optuna.pruners.NopPruner}
    cls = kinds[spec.pruner.name]
    try:
        return cls(**spec.pruner.args)
    except TypeError as e:
        raise ConfigError("pruner", f"bad arguments for the {spec.pruner.name} pruner: {e}") from None
    except ValueError as e:
        raise ConfigError("pruner", str(e)) from None


def suggest(trial, spec: SweepSpec) -> list[str]:
    """Sample every parameter from the trial; returns them as config overrides ``path=value``."""
    out = []
    for path, p in spec.parameters.items():
        if p.type == "categorical":
            value = trial.suggest_categorical(path, p.choices)
        elif p.type == "int":
            value = trial.suggest_int(path, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            value = trial.suggest_float(path, p.low, p.high, step=p.step, log=p.log)
        out.append(f"{path}={json.dumps(value)}")  # JSON is YAML: the override parser reads it back typed
    return out
