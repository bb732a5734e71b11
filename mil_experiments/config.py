"""Checking a composed config against the schemas of the classes it names.

Each yaml of a config group names its class with `_target_` (datasets, methods) or a
`name` (encoders); the class's nested `Config` dataclass is the schema. Unknown keys,
wrong types and out-of-range values become a `ConfigError` that names the key.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mil_experiments.callbacks import SELECTION_RULES, SelectionConfig
from mil_experiments.errors import ConfigError
from mil_experiments.models.encoders import EncoderConfig
from mil_experiments.sampling import SamplingConfig

TOP_LEVEL_KEYS = {"dataset", "encoder", "method", "strategy", "trainer", "logger", "seed", "alpha", "selection", "sampling", "telemetry"}
STRATEGIES = ("single",)
LOGGERS = ("wandb", "csv", "none")


@dataclass
class TrainerConfig:
    """The `trainer:` keys passed to `lightning.Trainer`."""

    max_epochs: int = 20
    accelerator: str = "auto"
    devices: Any = 1
    precision: str = "32-true"
    deterministic: bool = False
    enable_progress_bar: bool = True
    log_every_n_steps: int = 50
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None


@dataclass
class LoggerConfig:
    """The `logger:` group: which dashboard gets the metrics (metrics.csv is always written)."""

    name: str = "wandb"
    project: str = "mil_experiments"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled
    tags: list[str] = field(default_factory=list)


@dataclass
class StrategyConfig:
    name: str = "single"


@dataclass
class TelemetryConfig:
    count_saved_tensors: bool = True


@dataclass
class ValidatedConfig:
    """Everything a run needs, checked."""

    seed: int
    alpha: float
    dataset_class: type
    dataset: Any
    encoder: EncoderConfig
    method_class: type
    method: Any
    trainer: TrainerConfig
    logger: LoggerConfig
    strategy: StrategyConfig
    selection: SelectionConfig
    sampling: SamplingConfig
    telemetry: TelemetryConfig


def _checked(schema: type, node: Any, where: str) -> Any:
    """Merge `node` into the dataclass `schema`; unknown keys and bad types raise ConfigError."""
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{where}: expected a mapping of keys, got {node!r}")
    values = OmegaConf.to_container(node, resolve=True)
    values.pop("_target_", None)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or ""
        message = str(getattr(error, "msg", error)).splitlines()[0]
        raise ConfigError(f"{where}.{key}: {message}" if key else f"{where}: {message}") from None


def _target_class(node: DictConfig, where: str) -> type:
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not target:
        raise ConfigError(f"{where}: missing `_target_` naming its class")
    module_name, _, class_name = str(target).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise ConfigError(f"{where}._target_={target!r}: no such class") from None


def _scalar(cfg: DictConfig, key: str, kind: type) -> Any:
    value = cfg.get(key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: must be {'a number' if kind is float else 'an integer'}")
    return value


def validate(cfg: DictConfig) -> ValidatedConfig:
    """Check a composed config; return its validated, typed parts."""
    unknown = set(cfg.keys()) - TOP_LEVEL_KEYS - {"hydra"}
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {sorted(unknown)}; known: {sorted(TOP_LEVEL_KEYS)}")
    seed = _scalar(cfg, "seed", int)
    alpha = _scalar(cfg, "alpha", float)
    if not 0 < alpha <= 100:
        raise ConfigError(f"alpha={alpha:g}: must be in (0, 100] (percent of a bag's instances forwarded at once)")
    dataset_class = _target_class(cfg.dataset, "dataset")
    method_class = _target_class(cfg.method, "method")
    validated = ValidatedConfig(
        seed=seed,
        alpha=alpha,
        dataset_class=dataset_class,
        dataset=_checked(dataset_class.Config, cfg.dataset, "dataset"),
        encoder=_checked(EncoderConfig, cfg.encoder, "encoder"),
        method_class=method_class,
        method=_checked(method_class.Config, cfg.method, "method"),
        trainer=_checked(TrainerConfig, cfg.trainer, "trainer"),
        logger=_checked(LoggerConfig, cfg.logger, "logger"),
        strategy=_checked(StrategyConfig, cfg.strategy, "strategy"),
        selection=_checked(SelectionConfig, cfg.selection, "selection"),
        sampling=_checked(SamplingConfig, cfg.sampling, "sampling"),
        telemetry=_checked(TelemetryConfig, cfg.telemetry, "telemetry"),
    )
    if validated.logger.name not in LOGGERS:
        raise ConfigError(f"logger.name={validated.logger.name!r}: choose one of {LOGGERS}")
    if validated.strategy.name not in STRATEGIES:
        raise ConfigError(f"strategy.name={validated.strategy.name!r}: choose one of {STRATEGIES}")
    try:
        validated.sampling.check()
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if validated.selection.rule not in SELECTION_RULES:
        raise ConfigError(f"selection.rule={validated.selection.rule!r}: choose one of {SELECTION_RULES}")
    return validated
