"""Building a run's parts from a validated config: datamodule, encoder, method, trainer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from mil_experiments.callbacks import EpochMetricsWriter, ModelSelection, Telemetry
from mil_experiments.config import ValidatedConfig, validate
from mil_experiments.data.datamodule import BagDataModule
from mil_experiments.errors import ConfigError, DataError
from mil_experiments.methods.base import MILMethod
from mil_experiments.models.encoders import build_encoder


@dataclass
class Experiment:
    """One run's config and parts, ready for `Trainer.fit` / `Trainer.test`."""

    cfg: DictConfig
    checked: ValidatedConfig
    datamodule: BagDataModule
    method: MILMethod
    output_dir: Path


def build_experiment(cfg: DictConfig, output_dir: str | Path) -> Experiment:
    """Validate `cfg`, seed everything, build the datamodule and the method."""
    checked = validate(cfg)
    L.seed_everything(checked.seed, workers=True, verbose=False)
    try:
        datamodule = checked.dataset_class(config=checked.dataset, seed=checked.seed)
        datamodule.setup("fit")
        encoder = build_encoder(checked.encoder, tuple(datamodule.instance_shape))
        method = checked.method_class(
            checked.method,
            encoder=encoder,
            num_classes=datamodule.num_classes,
            alpha=checked.alpha,
            sampling=checked.sampling,
        )
    except ValueError as error:
        if isinstance(error, (ConfigError, DataError)):
            raise
        raise ConfigError(str(error)) from None
    return Experiment(cfg, checked, datamodule, method, Path(output_dir))


def build_trainer(experiment: Experiment) -> tuple[L.Trainer, Telemetry, ModelSelection]:
    """A Trainer with the project's callbacks and the configured loggers."""
    c = experiment.checked
    out = experiment.output_dir
    telemetry = Telemetry(c.telemetry.count_saved_tensors)
    selection = ModelSelection(c.selection, out / "checkpoints" / "selected.ckpt")
    callbacks = [telemetry, selection, EpochMetricsWriter(out / "metrics.csv")]
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
    return trainer, telemetry, selection


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
