"""A small Python API for notebooks: compose a config, get the datamodule and method back.

    from mil_experiments import compose_experiment
    exp = compose_experiment(["method=abmil_acc", "alpha=25", "trainer.max_epochs=5"])
    trainer = lightning.Trainer(max_epochs=5)
    trainer.fit(exp.method, datamodule=exp.datamodule)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mil_experiments.experiment import Experiment, build_experiment
from mil_experiments.run import CONF_DIR


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The composed config (no Hydra run dir), as `python -m mil_experiments` would see it."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


def compose_experiment(overrides: list[str] | None = None, output_dir: str | Path | None = None) -> Experiment:
    """Config + datamodule + method, validated and seeded, ready for `Trainer.fit`."""
    cfg = compose_config(overrides)
    out = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="mil_experiments_"))
    return build_experiment(cfg, out)
