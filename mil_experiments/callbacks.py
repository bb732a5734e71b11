"""Lightning callbacks: telemetry and the per-epoch CSV (model selection: `selection.py`)."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import numpy as np
import torch

from mil_experiments.data.bag_order import NoBag
from mil_experiments.metrics import log_values
from mil_experiments.strategies import is_rank_zero
from mil_experiments.telemetry import SavedTensorMeter, Stopwatch


class Telemetry(L.Callback):
    """Training wall time per epoch and per bag, and peak memory per epoch.

    Logs `time/epoch_train_s`, `time/bag_s` (mean per bag), `memory/peak_saved_mb`
    (activations saved for backward in one bag, any device) and, on CUDA,
    `memory/peak_cuda_mb` (`torch.cuda.max_memory_allocated`) once the training part of
    an epoch is over. With several processes these are rank 0's, and
    `time/max_rank_bag_s`, `memory/max_rank_peak_saved_mb` (and
    `memory/max_rank_peak_cuda_mb`) are the largest over the ranks.
    """

    def __init__(self, count_saved_tensors: bool = True) -> None:
        self.count_saved_tensors = count_saved_tensors
        self.total_train_seconds = 0.0
        self.peak_saved_bytes = 0
        self.peak_cuda_bytes = 0
        self.bag_seconds: list[float] = []
        self.max_rank_bag_seconds = 0.0  # several processes: the worst rank's epoch mean, worst epoch
        self.max_rank_saved_bytes = 0
        self.max_rank_cuda_bytes = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_watch = Stopwatch()
        self._epoch_bags: list[float] = []
        self._epoch_saved = 0
        self._train_seconds: float | None = None
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._bag_watch = Stopwatch()
        self._meter = SavedTensorMeter(exclude=pl_module.parameters()) if self.count_saved_tensors else None
        if self._meter is not None:
            self._meter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._meter is not None:
            self._meter.__exit__(None, None, None)
            self._epoch_saved = max(self._epoch_saved, self._meter.peak_bytes)
            self._meter = None
        if not isinstance(batch, NoBag):  # a ddp rank's empty step is not a bag
            self._epoch_bags.append(self._bag_watch.elapsed())

    def _close_training_part(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._train_seconds is not None:
            return
        self._train_seconds = self._epoch_watch.elapsed()
        self.total_train_seconds += self._train_seconds
        self.bag_seconds.extend(self._epoch_bags)
        self.peak_saved_bytes = max(self.peak_saved_bytes, self._epoch_saved)
        telemetry = {
            "time/epoch_train_s": self._train_seconds,
            "time/bag_s": float(np.mean(self._epoch_bags)) if self._epoch_bags else 0.0,
            "memory/peak_saved_mb": self._epoch_saved / 2**20,
        }
        peak = 0
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device)
            self.peak_cuda_bytes = max(self.peak_cuda_bytes, peak)
            telemetry["memory/peak_cuda_mb"] = peak / 2**20
        if trainer.world_size > 1:  # every rank's numbers; the columns above are rank 0's
            mine = torch.tensor([telemetry["time/bag_s"], self._epoch_saved, peak], dtype=torch.float64, device=pl_module.device)
            every = [torch.empty_like(mine) for _ in range(trainer.world_size)]
            torch.distributed.all_gather(every, mine)
            worst = torch.stack(every).amax(0)  # (3,): max over ranks
            self.max_rank_bag_seconds = max(self.max_rank_bag_seconds, float(worst[0]))
            self.max_rank_saved_bytes = max(self.max_rank_saved_bytes, int(worst[1]))
            self.max_rank_cuda_bytes = max(self.max_rank_cuda_bytes, int(worst[2]))
            telemetry["time/max_rank_bag_s"] = float(worst[0])
            telemetry["memory/max_rank_peak_saved_mb"] = float(worst[1]) / 2**20
            if pl_module.device.type == "cuda":
                telemetry["memory/max_rank_peak_cuda_mb"] = float(worst[2]) / 2**20
        pl_module.log_dict(log_values(telemetry), on_epoch=True)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and hasattr(self, "_epoch_watch"):
            self._close_training_part(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_training_part(trainer, pl_module)

    def state_dict(self) -> dict:
        return {"total_train_seconds": self.total_train_seconds, "peak_saved_bytes": self.peak_saved_bytes,
                "peak_cuda_bytes": self.peak_cuda_bytes, "bag_seconds": list(self.bag_seconds),
                "max_rank_bag_seconds": self.max_rank_bag_seconds, "max_rank_saved_bytes": self.max_rank_saved_bytes,
                "max_rank_cuda_bytes": self.max_rank_cuda_bytes}

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)

    def summary(self) -> dict[str, float]:
        """Totals over the whole fit, for results.json."""
        out = {
            "train_seconds": self.total_train_seconds,
            "seconds_per_bag": float(np.mean(self.bag_seconds)) if self.bag_seconds else 0.0,
            "peak_saved_activations_mb": self.peak_saved_bytes / 2**20,
        }
        if self.peak_cuda_bytes:
            out["peak_cuda_allocated_mb"] = self.peak_cuda_bytes / 2**20
        if self.max_rank_saved_bytes or self.max_rank_bag_seconds:  # several processes
            out["max_rank_seconds_per_bag"] = self.max_rank_bag_seconds
            out["max_rank_peak_saved_activations_mb"] = self.max_rank_saved_bytes / 2**20
            if self.max_rank_cuda_bytes:
                out["max_rank_peak_cuda_allocated_mb"] = self.max_rank_cuda_bytes / 2**20
        return out


class EpochMetricsWriter(L.Callback):
    """Appends one row per epoch of the logged metrics to `metrics.csv`.

    Columns: `epoch`, then the `train/` and `val/` metrics, then the rest (time, memory),
    as first logged; `rows` counts the epochs written.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.columns: list[str] | None = None
        self.rows = 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        if trainer.sanity_checking or "val/loss" not in metrics:
            return
        if not getattr(trainer, "is_global_zero", True):  # rank 0 alone writes; every rank counts the epochs
            self.rows += 1
            return
        row = {"epoch": trainer.current_epoch, **{k: float(v) for k, v in metrics.items()}}
        if self.columns is None:
            names = [k for k in row if k != "epoch"]
            ordered = [k for k in names if k.startswith("train/")] + [k for k in names if k.startswith("val/")]
            self.columns = ["epoch", *ordered, *[k for k in names if k not in ordered]]
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(self.columns)
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in self.columns])
        self.rows += 1

    def state_dict(self) -> dict:
        return {"columns": self.columns, "rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        """On resume: keep the rows of the epochs the checkpoint holds, drop any written after it."""
        self.columns, self.rows = state["columns"], state["rows"]
        if self.path.exists() and self.columns is not None and is_rank_zero():
            with self.path.open(newline="") as f:
                lines = list(csv.reader(f))
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerows(lines[: 1 + self.rows])
