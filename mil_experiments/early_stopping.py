"""MHIM's early stopping, as a Lightning `EarlyStopping` callback.

MHIM v1 (`utils.EarlyStopping`, called with -AUC): a counter of epochs whose monitored value
is worse than the best so far (an equal value resets it, as an improvement does); training
stops once counter >= patience and the epoch (0-based) is > `min_epoch` (MHIM's
`stop_epoch`: 130 on CAMELYON16 with patience 30, 70 on TCGA with patience 20). Before
`min_epoch` the counter still counts, so training can stop at the first epoch after it.
An undefined value (an AUC on one class) counts as not better (Lightning's check_finite stop is off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightning.pytorch.callbacks import EarlyStopping

from mil_experiments.errors import ConfigError

MONITORS = {"val/loss": "min", "val/error": "min", "val/auc": "max", "val/f1_weighted": "max"}


@dataclass
class EarlyStoppingConfig:
    """Schema of the top-level `early_stopping:` key."""

    enabled: bool = False
    monitor: str = "val/auc"  # MHIM monitors the validation AUC
    patience: int = 20
    min_epoch: int = 70

    def check(self) -> None:
        if self.monitor not in MONITORS:
            raise ConfigError(f"early_stopping.monitor={self.monitor!r}: choose one of {sorted(MONITORS)}")
        if self.patience < 1:
            raise ConfigError(f"early_stopping.patience={self.patience}: must be >= 1")
        if self.min_epoch < 0:
            raise ConfigError(f"early_stopping.min_epoch={self.min_epoch}: must be >= 0")


class MinEpochEarlyStopping(EarlyStopping):
    """Lightning's EarlyStopping with MHIM's rule (see the module docstring)."""

    def __init__(self, config: EarlyStoppingConfig) -> None:
        config.check()
        super().__init__(monitor=config.monitor, mode=MONITORS[config.monitor], patience=config.patience, check_finite=False)
        self.min_epoch = config.min_epoch
        self._epoch = 0

    def _run_early_stopping_check(self, trainer) -> None:
        self._epoch = trainer.current_epoch
        super()._run_early_stopping_check(trainer)

    def _evaluate_stopping_criteria(self, current: torch.Tensor) -> tuple[bool, str | None]:
        current = current.to(self.best_score.device)
        if torch.isfinite(current) and not self.monitor_op(self.best_score, current):  # as good as the best, or better
            self.best_score, self.wait_count = current, 0
        else:
            self.wait_count += 1
        if self.wait_count >= self.patience and self._epoch > self.min_epoch:
            return True, f"{self.monitor} not better for {self.wait_count} epochs (after min_epoch {self.min_epoch}): stopping"
        return False, None
