"""The Hydra entry point: train, select, test, and write the run's files."""

from __future__ import annotations

import json
import shutil
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from mil_experiments.errors import ConfigError, DataError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


RUN_FILES = ("results.json", "metrics.csv", "config.yaml", "checkpoints")
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
SIGTERM_EXIT = 143  # 128 + SIGTERM, what SLURM and `timeout` expect


class RunInterrupted(RuntimeError):
    """The run was stopped by SIGTERM; what it wrote is kept and it can be resumed."""


@dataclass
class SweepState:
    """What a multirun's jobs leave for the end of the sweep (jobs run in this process)."""

    sweep_dir: Path | None = None
    failed: list[str] = field(default_factory=list)


SWEEP = SweepState()


def prepare_run_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse a folder that holds another run's files, unless told to overwrite them."""
    held = [name for name in RUN_FILES if (output_dir / name).exists()]
    if not held:
        return
    if not overwrite:
        raise ConfigError(
            f"{output_dir}: already holds a run ({', '.join(held)}); resume it with resume={output_dir},"
            " choose another hydra.run.dir, or pass overwrite=true"
        )
    for name in held:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def train_and_test(cfg: DictConfig, output_dir: Path, resume: bool = False) -> dict:
    """Fit with model selection, test the selected model, write results.json; return it.

    With strategy=ddp | tile_parallel and trainer.devices > 1 this process starts the
    ranks (`launch.spawn_ranks`), each of which runs this function in `output_dir`; under
    torchrun / srun every process is already a rank. Rank 0 alone writes files.

    With `resume`, training continues from `<output_dir>/checkpoints/last.ckpt` (the
    model, optimizer, scheduler, loops, selection state and random state of the last
    finished epoch); the final results equal those of an uninterrupted run.
    """
    from mil_experiments import launch
    from mil_experiments.experiment import build_experiment, build_trainer
    from mil_experiments.results import machine, package_versions, write_results
    from mil_experiments.strategies import is_rank_zero

    if not launch.spawned():
        ranks_results = _run_on_spawned_ranks(cfg, output_dir, resume)
        if ranks_results is not None:
            return ranks_results
    writer = is_rank_zero()  # rank 0 alone writes the run's files
    if not resume and writer and not launch.spawned():
        prepare_run_dir(output_dir, overwrite=bool(cfg.get("overwrite", False)))
    experiment = build_experiment(cfg, output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not resume and writer:
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if experiment.datamodule.used_split is not None and writer:
        from mil_experiments.data.slide_splits import write_split_table

        write_split_table(output_dir / "splits.csv", experiment.datamodule.used_split)
    trainer, callbacks = build_trainer(experiment)
    finished = False
    try:
        # The checkpoint is this run's own (it holds numpy and Python random states too).
        trainer.fit(experiment.method, datamodule=experiment.datamodule,
                    ckpt_path=str(output_dir / LAST_CHECKPOINT) if resume else None, weights_only=False)
        trainer.strategy.barrier("selected model written")  # rank 0 wrote checkpoints/selected.ckpt
        callbacks.selection.restore_selected(experiment.method)
        val_records = None
        if experiment.checked.evaluation.threshold_from == "val":  # the selected model on the validation set
            trainer.test(experiment.method, dataloaders=experiment.datamodule.val_dataloader(), verbose=False)
            val_records = next(iter(experiment.method._test_records.values()))
        (test,) = trainer.test(experiment.method, datamodule=experiment.datamodule, verbose=False)
        test.update(_protocol_report(experiment, output_dir, val_records, writes_files=writer))
        finished = True
    except SIGTERMException:
        raise RunInterrupted(
            f"stopped by SIGTERM after {callbacks.metrics_writer.rows} epochs; continue with resume={output_dir}"
        ) from None
    finally:
        _close_wandb(exit_code=0 if finished else 1)
    method = experiment.method
    checked = experiment.checked
    telemetry = callbacks.telemetry.summary()
    results = {
        "method": checked.method.name,
        "aggregator": checked.aggregator_name,
        "engine": {**checked.engine.settings(), "chunk_size": checked.engine.last_chunk_size},
        "strategy": {**vars(checked.strategy), "world_size": checked.world_size, "evaluation_split": method.evaluation_split},
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
        "machine": machine(),
        "run_dir": str(output_dir),
    }
    if writer:
        write_results(output_dir / "results.json", results)
    return results


def _run_on_spawned_ranks(cfg: DictConfig, output_dir: Path, resume: bool) -> dict | None:
    """A multi-process run that nobody else started: start its ranks here and return rank 0's
    results; None when this process is the run (one process, or a torchrun / srun rank)."""
    from mil_experiments import launch
    from mil_experiments.config import validate
    from mil_experiments.strategies import start_method

    checked = validate(cfg)  # bad input stops here, before any rank starts
    environment = launch.external_environment()
    if environment is not None and environment.world_size() != checked.world_size:
        raise ConfigError(
            f"{environment.world_size()} processes were started, but trainer.devices={checked.trainer.devices}"
            f" x trainer.num_nodes={checked.trainer.num_nodes} = {checked.world_size} with strategy={checked.strategy.name}"
        )
    if checked.world_size == 1 or environment is not None:
        return None
    if checked.trainer.num_nodes > 1:
        raise ConfigError(f"trainer.num_nodes={checked.trainer.num_nodes}: start the ranks of every node with torchrun or SLURM (docs/strategies.md)")
    if not resume:
        prepare_run_dir(output_dir, overwrite=bool(cfg.get("overwrite", False)))
    return launch.spawn_ranks(cfg, output_dir, checked.world_size, resume, start_method(cfg), checked.strategy.master_port)


def _protocol_report(experiment, output_dir: Path, val_records, writes_files: bool = True) -> dict:
    """The evaluation protocols' metrics of the test (first inference setting) and its confusion matrix PNG."""
    from mil_experiments.test_report import protocol_results, write_confusion_png, write_predictions_csv

    method, config = experiment.method, experiment.checked.evaluation
    records = next(iter(method._test_records.values()))
    if writes_files:  # rank 0 alone writes
        write_predictions_csv(output_dir / "test_predictions.csv", records, method.num_classes)
    if config.confusion_matrix and writes_files:
        write_confusion_png(output_dir / "confusion_matrix.png", records, method.num_classes, experiment.datamodule.describe().class_names)
    return {k: v for k, v in protocol_results(records, method.num_classes, config, val_records).items() if k not in ("test/accuracy", "test/auc", "test/f1_weighted")}


def _close_wandb(exit_code: int = 0) -> None:
    """Finish the W&B run of this job, marked failed when it did not finish (each multirun job is its own run)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


def is_interrupted_run_of(cfg: DictConfig, run_dir: Path) -> bool:
    """True when `run_dir` holds an unfinished run of exactly `cfg` that can continue (`train_and_test(..., resume=True)`).

    For scripts that train into folders of their own and, started again, continue where they
    were stopped: its config.yaml equals `cfg`, it has a last.ckpt and no results.json.
    """
    saved = run_dir / "config.yaml"
    return ((run_dir / LAST_CHECKPOINT).is_file() and not (run_dir / "results.json").exists()
            and saved.is_file() and saved.read_text() == OmegaConf.to_yaml(cfg, resolve=True))


def resumed_config(run_dir: Path) -> DictConfig:
    """The saved config of the run in `run_dir`, checked that it can be resumed."""
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"resume={run_dir}: no config.yaml there (not a run folder)")
    if (run_dir / "results.json").exists():
        raise ConfigError(f"resume={run_dir}: that run already finished (results.json exists)")
    if not (run_dir / LAST_CHECKPOINT).is_file():
        raise ConfigError(f"resume={run_dir}: no {LAST_CHECKPOINT} (the run ended before its first epoch did); start it again")
    others = [o for o in HydraConfig.get().overrides.task if not o.startswith(("resume=", "hydra."))]
    if others:
        raise ConfigError(f"resume= continues the run with its own config; drop the other overrides {others}")
    saved = OmegaConf.load(run_dir / "config.yaml")
    saved.resume = None
    return saved


def _remove_if_empty(run_dir: Path) -> None:
    """Remove a folder Hydra made for this run if the run wrote nothing into it."""
    if run_dir.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def _record_failure(job_dir: Path, error: BaseException) -> str:
    """A failed multirun job: its one-line reason in failure.json (and the traceback beside it)."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    job_dir.mkdir(parents=True, exist_ok=True)
    if not isinstance(error, (ConfigError, DataError)):
        reason = f"{type(error).__name__}: {reason}"
        (job_dir / "traceback.txt").write_text("".join(traceback.format_exception(error)))
    (job_dir / "failure.json").write_text(json.dumps({"status": "failed", "reason": reason}, indent=2))
    return reason


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """`python -m mil_experiments [overrides]`.

    A single run: bad input exits with one line and status 2, SIGTERM with status 143.
    A multirun job never ends the sweep: it is recorded as failed (failure.json, one
    line) and the sweep goes on; `__main__` exits with the number of failed jobs.
    """
    from mil_experiments import launch
    from mil_experiments.results import format_table
    from mil_experiments.strategies import is_rank_zero

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun:
        SWEEP.sweep_dir = Path(hydra_cfg.sweep.dir)
    environment = launch.external_environment()
    if environment is not None:  # torchrun / srun ranks: one run folder, rank 0's
        output_dir = launch.agree_on_run_dir(output_dir, cfg, environment)
    try:
        if cfg.get("resume"):
            run_dir = Path(str(cfg.resume))
            saved = resumed_config(run_dir)
            _remove_if_empty(output_dir)
            results = train_and_test(saved, run_dir, resume=True)
        else:
            results = train_and_test(cfg, output_dir)
    except RunInterrupted as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(SIGTERM_EXIT)
    except Exception as error:
        if multirun:
            reason = _record_failure(output_dir, error) if is_rank_zero() else str(error)
            SWEEP.failed.append(f"{output_dir.name}: {reason}")
            print(f"error: job {output_dir.name} failed: {reason}", file=sys.stderr)
            return None
        if not isinstance(error, (ConfigError, DataError)):
            raise
        print(f"error: {error}", file=sys.stderr)
        if not cfg.get("resume"):
            _remove_if_empty(output_dir)
        sys.exit(2)
    if is_rank_zero():
        print("\nResults\n" + format_table(results))
    return results["test"].get("test/accuracy")
