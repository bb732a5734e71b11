"""A small Python API for notebooks: compose a config, get the datamodule and method back.

    from mil_experiments import compose_experiment
    exp = compose_experiment(["method=abmil_acc", "alpha=25", "trainer.max_epochs=5"])
    trainer = lightning.Trainer(max_epochs=5)
    trainer.fit(exp.method, datamodule=exp.datamodule)
"""

from __future__ import annotations

import json
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


def train_or_reuse(overrides: list[str], run_dir: Path, say=print) -> dict:
    """The results of the run of `overrides` in `run_dir`, for scripts that train into folders of their own.

    - results.json there: read back (`say`s so when its overrides.json records other settings);
    - an unfinished run of exactly these settings (a stopped sweep's): continued from its last.ckpt;
    - otherwise trained and tested from the start, over an unfinished run of other settings.
    The overrides are written to overrides.json beside results.json.
    """
    from mil_experiments.results import write_results
    from mil_experiments.run import LAST_CHECKPOINT, is_interrupted_run_of, train_and_test

    results_path = run_dir / "results.json"
    stored = run_dir / "overrides.json"
    if results_path.is_file():
        if stored.is_file() and json.loads(stored.read_text()) != overrides:
            say(f"note: {run_dir} was trained with other overrides; reused as it is (delete it to retrain)")
        return json.loads(results_path.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = compose_config([*overrides, "overwrite=true"])  # overwrite: an interrupted run's files
    resume = is_interrupted_run_of(cfg, run_dir)
    if resume:
        say(f"resuming {run_dir} from {LAST_CHECKPOINT}")
    results = train_and_test(cfg, run_dir, resume=resume)
    write_results(stored, overrides)
    return results
