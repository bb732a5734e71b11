"""Hydra callbacks: the multirun summary table."""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mil_experiments.results import write_summary


class MultirunSummary(Callback):
    """After a multirun, writes `<sweep dir>/summary.csv` with one row per job."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        path = write_summary(Path(config.hydra.sweep.dir))
        if path is not None:
            print(f"multirun summary: {path}")
