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
    trainer, telemetry, selection = build_trainer(experiment)
    try:
        trainer.fit(experiment.method, datamodule=experiment.datamodule)
        selection.restore_selected(experiment.method)
        trainer.test(experiment.method, datamodule=experiment.datamodule, verbose=False)
    finally:
        _close_wandb()
    method = experiment.method
    checked = experiment.checked
    results = {
        "method": checked.method.name,
        "dataset": checked.dataset.name,
        "encoder": checked.encoder.name,
        "seed": checked.seed,
        "alpha": checked.alpha,
        "acc_mode": getattr(checked.method, "acc_mode", None),
        "chunk_size": getattr(method, "last_chunk_size", None) or None,
        "sampling": {
            "train": checked.sampling.train,
            "inference": checked.sampling.inference,
            "test_inference": method.test_percents,
        },
        "epochs": len(method.history),
        "skipped_files": list(getattr(experiment.datamodule, "skipped", [])),  # feature_bags with skip_invalid
        "selection": {
            "rule": checked.selection.rule,
            "window": selection.window,
            "selected_epoch": selection.selected_epoch,
            "checkpoint": str(selection.checkpoint_path),
        },
        "test": method.test_results,
        "time": {k: v for k, v in telemetry.summary().items() if "seconds" in k},
        "memory": {k: v for k, v in telemetry.summary().items() if k.endswith("_mb")},
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
