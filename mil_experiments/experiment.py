"""Building a run's parts from a validated config: datamodule, encoder, aggregator, engine, method, trainer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mil_experiments import launch
from mil_experiments.callbacks import EpochMetricsWriter, Telemetry
from mil_experiments.config import ValidatedConfig, validate
from mil_experiments.data.datamodule import BagDataModule
from mil_experiments.early_stopping import MinEpochEarlyStopping
from mil_experiments.errors import ConfigError
from mil_experiments.methods.base import MILMethod
from mil_experiments.models.encoders import build_encoder
from mil_experiments.selection import ModelSelection
from mil_experiments.strategies import bag_split, is_rank_zero, lightning_strategy, splits_evaluation


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
    checked.method_class.check_aggregator(checked.method, checked.aggregator_name, checked.aggregator_class)
    L.seed_everything(checked.seed, workers=True, verbose=False)
    datamodule = checked.dataset_class(config=checked.dataset, seed=checked.seed)
    datamodule.bag_split = bag_split(checked.strategy)
    evaluation_split = splits_evaluation(checked.strategy, checked.sampling.inference, checked.sampling.test_inference)
    datamodule.evaluation_split = evaluation_split
    datamodule.setup("fit")
    data = datamodule.describe()
    aggregator_class = checked.aggregator_class
    if data.multi_level and not aggregator_class.multi_level:
        raise ConfigError(
            f"aggregator={checked.aggregator_name} takes bags of one magnification; the bags have"
            f" {list(data.magnifications)}: choose one (e.g. dataset.magnifications=[{data.magnifications[-1]}])"
        )
    if aggregator_class.multi_level and not data.multi_level:
        raise ConfigError(
            f"aggregator={checked.aggregator_name} needs bags of several magnifications; dataset={checked.dataset.name} has"
            f" {_levels(data.magnifications)}: use dataset=feature_bags with dataset.magnifications=[2.5,10.0] (lowest first)"
        )
    encoder = build_encoder(checked.encoder, data.instance_shape)
    if getattr(encoder, "standardize", False):  # encoder=identity encoder.standardize=true: the training bags' statistics
        train = datamodule.train_set
        encoder.fit_standardization([train[i].instances for i in range(len(train))])
    if getattr(checked.dataset, "bag_size", None) == 1 and any(isinstance(m, nn.BatchNorm2d) for m in encoder.modules()):
        raise ConfigError("dataset.bag_size=1 with batch norm: training needs at least 2 instances per forward; use encoder.norm=group or none")
    n_outputs = checked.method_class.output_count(checked.method, data.num_classes)
    aggregator = aggregator_class(in_dim=encoder.out_dim, n_outputs=n_outputs, **vars(checked.aggregator))
    for where, layout in getattr(datamodule, "level_layouts", {}).items() if hasattr(aggregator, "check_layout") else ():
        aggregator.bind_levels(layout)  # per-level modules for the bags' level count, before the optimizer exists
        aggregator.check_layout(layout, where)  # a bad magnification chain is refused naming the file
    method = checked.method_class(
        checked.method,
        encoder=encoder,
        aggregator=aggregator,
        engine=checked.engine,
        data=data,
        sampling=checked.sampling,
    )
    method.evaluation_split = evaluation_split
    return Experiment(cfg, checked, datamodule, method, Path(output_dir))


def _levels(magnifications: tuple) -> str:
    """How the bags' single level reads in a message."""
    return f"one ({magnifications[0]:g}x)" if magnifications[0] is not None else "one (no magnification)"


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
    # The full training state at the end of every epoch, for `resume=<run folder>`.
    last = ModelCheckpoint(dirpath=out / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False)
    callbacks = [parts.telemetry, parts.selection, parts.metrics_writer, last]
    if c.early_stopping.enabled:
        callbacks.append(MinEpochEarlyStopping(c.early_stopping))
    trainer_kwargs = {k: v for k, v in vars(c.trainer).items() if v is not None}
    trainer = L.Trainer(
        **trainer_kwargs,
        strategy=lightning_strategy(c.strategy, spawned=launch.spawned()),
        use_distributed_sampler=False,  # the datamodule deals the bags to ranks (data/bag_order.py)
        callbacks=callbacks,
        logger=build_loggers(experiment) if is_rank_zero() else [],  # one W&B run: rank 0's
        default_root_dir=str(out),
        enable_checkpointing=True,
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

    if c.mode == "online":
        _check_wandb_online()
    logger = WandbLogger(
        project=c.project,
        entity=c.entity,
        save_dir=str(out),
        name=f"{out.parent.name}_{out.name}" if out.name.isdigit() else out.name,  # multirun jobs are numbered
        mode=c.mode,
        tags=list(c.tags),
        config=OmegaConf.to_container(experiment.cfg, resolve=True),
        settings=_wandb_settings(c.mode),
    )
    if c.mode == "online":
        try:
            logger.experiment  # noqa: B018  (starts the run now, not in the middle of training)
        except Exception as error:  # wandb raises its own CommError / UsageError / TimeoutError types
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(f"logger.mode=online: W&B could not start a run ({first}); use logger.mode=offline and `wandb sync` later") from None
    return [logger]


def _check_wandb_online() -> None:
    """logger.mode=online needs credentials; without them wandb fails late with a long traceback."""
    import netrc
    import os

    if os.environ.get("WANDB_API_KEY"):
        return
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    raise ConfigError("logger.mode=online: no W&B credentials (run `wandb login` or set WANDB_API_KEY); or use logger.mode=offline")


def _wandb_settings(mode: str):
    """Online: give up on an unreachable server after 30 s (wandb's own wait is about 90 s)."""
    import wandb

    return wandb.Settings(init_timeout=30) if mode == "online" else None
