"""The Hydra entry point: train, select, test, and write the run's files."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mil_experiments.errors import ConfigError, DataError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def train_and_test(cfg: DictConfig, output_dir: Path) -> dict:
    """Fit with model selection, test the selected model, write results.json; return it."""
    from mil_experiments.experiment import build_experiment, build_trainer
    from mil_experiments.results import package_versions, write_results

    output_dir.mkdir(parents=True, exist_ok=True)
    experiment = build_experiment(cfg, output_dir)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    trainer, callbacks = build_trainer(experiment)
    try:
        trainer.fit(experiment.method, datamodule=experiment.datamodule)
        callbacks.selection.restore_selected(experiment.method)
        (test,) = trainer.test(experiment.method, datamodule=experiment.datamodule, verbose=False)
    finally:
        _close_wandb()
    method = experiment.method
    checked = experiment.checked
    telemetry = callbacks.telemetry.summary()
    results = {
        "method": checked.method.name,
        "aggregator": checked.aggregator_name,
        "engine": {**checked.engine.settings(), "chunk_size": checked.engine.last_chunk_size},
        "dataset": checked.dataset.name,
        "encoder": checked.encoder.name,
        "seed": checked.seed,
        "sampling": {
            "train": checked.sampling.train,
            "inference": checked.sampling.inference,
            "test_inference": method.test_percents,
        },
        "epochs": callbacks.metrics_writer.rows,
        "skipped_files": list(getattr(experiment.datamodule, "skipped", [])),  # feature_bags with skip_invalid
        "selection": {
            "rule": checked.selection.rule,
            "window": callbacks.selection.window,
            "selected_epoch": callbacks.selection.selected_epoch,
            "checkpoint": str(callbacks.selection.checkpoint_path),
        },
        "test": test,
        "time": {k: v for k, v in telemetry.items() if "seconds" in k},
        "memory": {k: v for k, v in telemetry.items() if k.endswith("_mb")},
        "versions": package_versions(),
        "run_dir": str(output_dir),
    }
    write_results(output_dir / "results.json", results)
    return results


def _close_wandb() -> None:
    """Finish the W&B run of this job, also when it failed (each multirun job is its own run)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """`python -m mil_experiments [overrides]`; bad input exits with one line and status 2."""
    from mil_experiments.results import format_table

    try:
        results = train_and_test(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print("\nResults\n" + format_table(results))
    return results["test"].get("test/accuracy")
