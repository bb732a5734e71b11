"""Lightning callbacks: telemetry, the papers' model selection, and the per-epoch CSV."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch

from mil_experiments.telemetry import SavedTensorMeter, Stopwatch


class Telemetry(L.Callback):
    """Training wall time per epoch and per bag, and peak memory per epoch.

    Writes `time/epoch_train_s`, `time/bag_s` (mean per bag), `memory/peak_saved_mb`
    (activations saved for backward in one bag, any device) and, on CUDA,
    `memory/peak_cuda_mb` (`torch.cuda.max_memory_allocated`) into the method's
    `epoch_telemetry` before its validation metrics are gathered.
    """

    def __init__(self, count_saved_tensors: bool = True) -> None:
        self.count_saved_tensors = count_saved_tensors
        self.total_train_seconds = 0.0
        self.peak_saved_bytes = 0
        self.peak_cuda_bytes = 0
        self.bag_seconds: list[float] = []

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
        self._epoch_bags.append(self._bag_watch.elapsed())

    def _close_training_part(self, pl_module: L.LightningModule) -> None:
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
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device)
            self.peak_cuda_bytes = max(self.peak_cuda_bytes, peak)
            telemetry["memory/peak_cuda_mb"] = peak / 2**20
        pl_module.epoch_telemetry = telemetry

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and hasattr(self, "_epoch_watch"):
            self._close_training_part(pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_training_part(pl_module)

    def summary(self) -> dict[str, float]:
        """Totals over the whole fit, for results.json."""
        out = {
            "train_seconds": self.total_train_seconds,
            "seconds_per_bag": float(np.mean(self.bag_seconds)) if self.bag_seconds else 0.0,
            "peak_saved_activations_mb": self.peak_saved_bytes / 2**20,
        }
        if self.peak_cuda_bytes:
            out["peak_cuda_allocated_mb"] = self.peak_cuda_bytes / 2**20
        return out


@dataclass
class SelectionConfig:
    """Schema of the top-level `selection:` key."""

    rule: str = "moving_average"  # moving_average | best_val_loss | last
    window: int = 15


SELECTION_RULES = ("moving_average", "best_val_loss", "last")


class ModelSelection(L.Callback):
    """Choose the model that gets tested, and save it as a checkpoint.

    `moving_average` (the papers' rule): once `window` epochs exist, the mean validation
    error over the last `window` epochs; whenever it is strictly lower than the best
    window so far, the epoch with the lowest validation error inside that window (the
    earliest on ties) is selected. The window is capped at `max_epochs`, so short runs
    select too. `best_val_loss`: the epoch of lowest validation loss. `last`: the last.
    """

    def __init__(self, config: SelectionConfig, checkpoint_path: Path) -> None:
        if config.rule not in SELECTION_RULES:
            raise ValueError(f"selection.rule={config.rule!r}: choose one of {SELECTION_RULES}")
        if config.window < 1:
            raise ValueError(f"selection.window={config.window}: must be >= 1")
        self.config = config
        self.checkpoint_path = Path(checkpoint_path)
        self.selected_epoch: int | None = None
        self.selected_state: dict[str, torch.Tensor] | None = None
        self.best_score = float("inf")
        self._recent: list[tuple[int, float, dict[str, torch.Tensor]]] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else self.config.window
        self.window = min(self.config.window, max_epochs)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not pl_module.last_epoch_metrics:
            return
        metrics = pl_module.last_epoch_metrics
        epoch = int(metrics["epoch"])
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        if self.config.rule == "moving_average":
            self._recent = (self._recent + [(epoch, metrics["val/error"], state)])[-self.window :]
            if len(self._recent) == self.window:
                window_mean = float(np.mean([e for _, e, _ in self._recent]))
                if window_mean < self.best_score:
                    self.best_score = window_mean
                    best = int(np.argmin([e for _, e, _ in self._recent]))
                    self._select(self._recent[best][0], self._recent[best][2], window_mean)
        elif self.config.rule == "best_val_loss":
            if metrics["val/loss"] < self.best_score:
                self.best_score = metrics["val/loss"]
                self._select(epoch, state, self.best_score)
        else:
            self._select(epoch, state, metrics["val/loss"])

    def _select(self, epoch: int, state: dict[str, torch.Tensor], score: float) -> None:
        self.selected_epoch, self.selected_state = epoch, state
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"state_dict": state, "epoch": epoch, "selection_rule": self.config.rule, "selection_score": score},
            self.checkpoint_path,
        )

    def restore_selected(self, pl_module: L.LightningModule) -> None:
        """Load the selected weights into `pl_module` (before testing)."""
        if self.selected_state is None:
            raise RuntimeError("no model was selected: did validation run during fit?")
        pl_module.load_state_dict(self.selected_state)


class EpochMetricsWriter(L.Callback):
    """Appends one row per epoch (train, validation, telemetry) to `metrics.csv`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.columns: list[str] | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not pl_module.last_epoch_metrics:
            return
        row = pl_module.last_epoch_metrics
        if self.columns is None:
            self.columns = list(row)
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(self.columns)
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in self.columns])
