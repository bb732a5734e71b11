"""Checking a composed config against the schemas of the classes it names.

A run is dataset x encoder x aggregator x method x engine x strategy, each a config group.
Each yaml names its class with `_target_` (datasets, aggregators, methods, engines) or a
`name` (encoders); the class's nested `Config` dataclass is the schema. Unknown keys,
wrong types and out-of-range values become a `ConfigError` that names the key, and so
does a setting that the chosen engine or method would ignore.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mil_experiments.early_stopping import EarlyStoppingConfig
from mil_experiments.engine import GradientEngine
from mil_experiments.errors import ConfigError
from mil_experiments.models.encoders import ENCODER_CONFIGS, EncoderConfig
from mil_experiments.sampling import SamplingConfig
from mil_experiments.selection import SelectionConfig
from mil_experiments.strategies import STRATEGY_CONFIGS, StrategyConfig, world_size_of, wrap_engine
from mil_experiments.test_report import EvaluationConfig

TOP_LEVEL_KEYS = {
    "dataset", "encoder", "aggregator", "method", "engine", "strategy", "trainer", "logger",
    "seed", "alpha", "selection", "sampling", "telemetry", "resume", "overwrite", "evaluation", "early_stopping",
}  # fmt: skip
PRECISIONS = ("32-true", "32", "64-true", "64", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "transformer-engine")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
MAX_SEED = 2**32 - 1
STRATEGIES = tuple(STRATEGY_CONFIGS)
LOGGERS = ("wandb", "csv", "none")


@dataclass
class TrainerConfig:
    """The `trainer:` keys passed to `lightning.Trainer`."""

    max_epochs: int = 20
    accelerator: str = "auto"
    devices: Any = 1  # processes per node for strategy=ddp | tile_parallel
    num_nodes: int = 1  # machines (torchrun / SLURM start the processes on each)
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


def check_trainer(trainer: TrainerConfig) -> None:
    """Trainer settings Lightning would only refuse (or loop on) after the data is built."""
    if trainer.max_epochs < 1:
        raise ConfigError(f"trainer.max_epochs={trainer.max_epochs}: must be >= 1 (a run must end to write its results)")
    if str(trainer.precision) not in PRECISIONS:
        raise ConfigError(f"trainer.precision={trainer.precision!r}: choose one of {PRECISIONS}")
    if trainer.accelerator not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={trainer.accelerator!r}: choose one of {ACCELERATORS}")
    if trainer.accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={trainer.accelerator}: no CUDA GPU is available here; use trainer.accelerator=cpu")
    if str(trainer.precision).startswith("16"):
        import torch

        if trainer.accelerator == "cpu" or not torch.cuda.is_available():
            raise ConfigError(f"trainer.precision={trainer.precision}: float16 needs a CUDA GPU; on CPU use bf16-mixed or 32-true")


@dataclass
class TelemetryConfig:
    count_saved_tensors: bool = True


@dataclass
class ValidatedConfig:
    """Everything a run needs, checked."""

    seed: int
    dataset_class: type
    dataset: Any
    encoder: EncoderConfig
    aggregator_name: str
    aggregator_class: type
    aggregator: Any
    method_class: type
    method: Any
    engine: GradientEngine  # as the strategy runs it (wrapped by strategy=ddp | tile_parallel)
    trainer: TrainerConfig
    logger: LoggerConfig
    strategy: StrategyConfig
    selection: SelectionConfig
    sampling: SamplingConfig
    telemetry: TelemetryConfig
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    world_size: int = 1  # processes of the run (trainer.devices x trainer.num_nodes; 1 for strategy=single)


def _checked(schema: type, node: Any, where: str, strip: tuple[str, ...] = ("_target_",)) -> Any:
    """Merge `node` into the dataclass `schema`; unknown keys and bad types raise ConfigError."""
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{where}: expected a mapping of keys, got {node!r}")
    values = OmegaConf.to_container(node, resolve=True)
    for key in strip:
        values.pop(key, None)
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


def _encoder(node: Any) -> EncoderConfig:
    name = node.get("name") if isinstance(node, DictConfig) else None
    if name not in ENCODER_CONFIGS:
        raise ConfigError(f"encoder.name={name!r}: choose one of {sorted(ENCODER_CONFIGS)}")
    return _checked(ENCODER_CONFIGS[name], node, "encoder")


def _strategy(node: Any) -> StrategyConfig:
    """`strategy=single | ddp | tile_parallel`, checked against that strategy's own keys."""
    name = node.get("name") if isinstance(node, DictConfig) else None
    if name not in STRATEGY_CONFIGS:
        raise ConfigError(f"strategy.name={name!r}: choose one of {STRATEGIES}")
    strategy = _checked(STRATEGY_CONFIGS[name], node, "strategy")
    if hasattr(strategy, "check"):
        strategy.check()
    return strategy


def _engine(cfg: DictConfig) -> GradientEngine:
    """The engine of `cfg.engine`, with the top-level `alpha` shorthand applied (acc only)."""
    engine_class = _target_class(cfg.engine, "engine")
    name = str(cfg.engine.get("name", engine_class.name))
    settings = _checked(engine_class.Config, cfg.engine, "engine", strip=("_target_", "name"))
    if cfg.get("alpha") is not None:
        alpha = _scalar(cfg, "alpha", float)
        if not 0 < alpha <= 100:
            raise ConfigError(f"alpha={alpha:g}: must be in (0, 100] (percent of a bag's instances forwarded at once)")
        if not hasattr(settings, "alpha"):
            raise ConfigError(
                f"alpha={alpha:g} applies to engine=acc only (this run has engine={name}): "
                "add engine=acc, or use method=abmil_acc"
            )
        settings = replace(settings, alpha=alpha)
    try:
        return engine_class(**vars(settings))
    except ValueError as error:  # the engine's own argument checks
        raise ConfigError(str(error)) from None


def validate(cfg: DictConfig) -> ValidatedConfig:
    """Check a composed config; return its validated, typed parts."""
    unknown = set(cfg.keys()) - TOP_LEVEL_KEYS - {"hydra"}
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {sorted(unknown)}; known: {sorted(TOP_LEVEL_KEYS)}")
    seed = _scalar(cfg, "seed", int)
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed={seed}: must be in [0, {MAX_SEED}]")
    engine = _engine(cfg)
    dataset_class = _target_class(cfg.dataset, "dataset")
    aggregator_class = _target_class(cfg.aggregator, "aggregator")
    method_class = _target_class(cfg.method, "method")
    validated = ValidatedConfig(
        seed=seed,
        dataset_class=dataset_class,
        dataset=_checked(dataset_class.Config, cfg.dataset, "dataset"),
        encoder=_encoder(cfg.encoder),
        aggregator_name=str(cfg.aggregator.get("name", aggregator_class.__name__)),
        aggregator_class=aggregator_class,
        aggregator=_checked(aggregator_class.Config, cfg.aggregator, "aggregator", strip=("_target_", "name")),
        method_class=method_class,
        method=_checked(method_class.Config, cfg.method, "method"),
        engine=engine,
        trainer=_checked(TrainerConfig, cfg.trainer, "trainer"),
        logger=_checked(LoggerConfig, cfg.logger, "logger"),
        strategy=_strategy(cfg.strategy),
        selection=_checked(SelectionConfig, cfg.selection, "selection"),
        sampling=_checked(SamplingConfig, cfg.sampling, "sampling"),
        telemetry=_checked(TelemetryConfig, cfg.telemetry, "telemetry"),
        evaluation=_checked(EvaluationConfig, cfg.get("evaluation") or OmegaConf.create({}), "evaluation"),
        early_stopping=_checked(EarlyStoppingConfig, cfg.get("early_stopping") or OmegaConf.create({}), "early_stopping"),
    )
    if getattr(engine, "config", None) is not None and getattr(engine.config, "skip_zero_grad_rows", False) \
            and getattr(validated.encoder, "norm", None) == "batch":
        raise ConfigError("engine.skip_zero_grad_rows=true re-encodes the kept rows in new chunks, where batch norm would"
                          " see other statistics: use encoder.norm=group|none (or engine.skip_zero_grad_chunks=true)")
    validated.evaluation.check()
    validated.early_stopping.check()
    if validated.logger.name not in LOGGERS:
        raise ConfigError(f"logger.name={validated.logger.name!r}: choose one of {LOGGERS}")
    try:
        validated.sampling.check()
    except ValueError as error:
        raise ConfigError(str(error)) from None
    validated.selection.check()
    check_trainer(validated.trainer)
    validated.world_size = world_size_of(validated.strategy, validated.trainer.devices, validated.trainer.num_nodes)
    validated.engine = wrap_engine(validated.strategy, validated.engine)
    method_class.check_config(validated.method, validated.sampling)
    return validated
