"""Hydra callbacks: the multirun summary table and, over folds, the fold summary."""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mil_experiments.results import write_summary
from mil_experiments.summaries import write_fold_summary


class MultirunSummary(Callback):
    """After a multirun, writes `<sweep dir>/summary.csv` with one row per job, and
    `fold_summary.csv` / `fold_summary.md` (mean ± std over folds) when it swept `dataset.fold`."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from mil_experiments.strategies import is_rank_zero

        if not is_rank_zero():  # torchrun / srun: every rank ran the sweep; rank 0 writes
            return
        path = write_summary(Path(config.hydra.sweep.dir))
        if path is not None:
            print(f"multirun summary: {path}")
        folds = write_fold_summary(Path(config.hydra.sweep.dir))
        if folds is not None:
            print(f"fold summary: {folds} and {folds.with_suffix('.md')}")
