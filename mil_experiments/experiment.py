"""Building a run's parts from a validated config: datamodule, encoder, aggregator, engine, method, trainer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from mil_experiments.callbacks import EpochMetricsWriter, Telemetry
from mil_experiments.config import ValidatedConfig, validate
from mil_experiments.data.datamodule import BagDataModule
from mil_experiments.errors import ConfigError
from mil_experiments.methods.base import MILMethod
from mil_experiments.models.encoders import build_encoder
from mil_experiments.selection import ModelSelection


@dataclass
class Experiment:
    """One run's config and parts, ready for `Trainer.fit` / `Trainer.test`."""

    cfg: DictConfig
    checked: ValidatedConfig
    datamodule: BagDataModule
    method: MILMethod
    output_dir: Path


def build_experiment(cfg: DictConfig, output_dir: str | Path) -> Experiment:
    """Validate `cfg`, seed everything, build the datamodule and the method.

    Only `ConfigError` / `DataError` become one-line errors; anything else raised while
    building is a bug and keeps its traceback.
    """
    checked = validate(cfg)
    L.seed_everything(checked.seed, workers=True, verbose=False)
    datamodule = checked.dataset_class(config=checked.dataset, seed=checked.seed)
    datamodule.setup("fit")
    data = datamodule.describe()
    aggregator_class = checked.aggregator_class
    if data.multi_level and not aggregator_class.multi_level:
        raise ConfigError(
            f"aggregator={checked.aggregator_name} takes bags of one magnification; the bags have"
            f" {list(data.magnifications)}: choose one (e.g. dataset.magnifications=[{data.magnifications[-1]}])"
        )
    encoder = build_encoder(checked.encoder, data.instance_shape)
    n_outputs = checked.method_class.output_count(checked.method, data.num_classes)
    aggregator = aggregator_class(in_dim=encoder.out_dim, n_outputs=n_outputs, **vars(checked.aggregator))
    method = checked.method_class(
        checked.method,
        encoder=encoder,
        aggregator=aggregator,
        engine=checked.engine,
        data=data,
        sampling=checked.sampling,
    )
    return Experiment(cfg, checked, datamodule, method, Path(output_dir))


@dataclass
class RunCallbacks:
    """The project's callbacks of one run, for reading their state after fit."""

    telemetry: Telemetry
    selection: ModelSelection
    metrics_writer: EpochMetricsWriter


def build_trainer(experiment: Experiment) -> tuple[L.Trainer, RunCallbacks]:
    """A Trainer with the project's callbacks and the configured loggers."""
    c = experiment.checked
    out = experiment.output_dir
    parts = RunCallbacks(
        Telemetry(c.telemetry.count_saved_tensors),
        ModelSelection(c.selection, out / "checkpoints" / "selected.ckpt"),
        EpochMetricsWriter(out / "metrics.csv"),
    )
    callbacks = [parts.telemetry, parts.selection, parts.metrics_writer]
    trainer_kwargs = {k: v for k, v in vars(c.trainer).items() if v is not None}
    trainer = L.Trainer(
        **trainer_kwargs,
        callbacks=callbacks,
        logger=build_loggers(experiment),
        default_root_dir=str(out),
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )
    return trainer, parts


def build_loggers(experiment: Experiment) -> list:
    """W&B (offline unless asked), Lightning's CSV logger, or none."""
    c = experiment.checked.logger
    out = experiment.output_dir
    if c.name == "none":
        return []
    if c.name == "csv":
        return [L.pytorch.loggers.CSVLogger(save_dir=str(out), name="lightning_csv", version="")]
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(
        project=c.project,
        entity=c.entity,
        save_dir=str(out),
        name=f"{out.parent.name}_{out.name}" if out.name.isdigit() else out.name,  # multirun jobs are numbered
        mode=c.mode,
        tags=list(c.tags),
        config=OmegaConf.to_container(experiment.cfg, resolve=True),
    )
    return [logger]
