"""Model selection: which epoch's model gets tested, chosen from the logged validation metrics.

`moving_average` (the gradient-accumulation and sampling papers' rule): once `window`
epochs exist, the mean validation error over the last `window` epochs; whenever it is
strictly lower than the best window so far, the epoch with the lowest validation error
inside that window (the earliest on ties) is selected. The window is capped at
`max_epochs`, so short runs select too. `best_val_loss`: the epoch of lowest validation
loss. `best_val_auc` (MHIM: `model_best_auc`) and `best_val_f1_weighted` (ZoomMIL:
`model_best_f1`): the epoch of highest validation AUC / weighted F1; for each `best_*` rule
only a strict improvement selects a later epoch (the earliest best epoch is kept), and an
undefined value (nan) never selects. `last`: the last epoch.

With several processes every rank sees the same validation metrics and makes the same
choice; rank 0 alone writes the checkpoints. Memory stays bounded: the states an epoch could still be selected from are kept on disk
(`checkpoints/candidates/`), and only those: an epoch followed inside the window by a
strictly lower validation error can never be the argmin of a later window, so its state
is dropped at once.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch

from mil_experiments.errors import ConfigError

SELECTION_RULES = ("moving_average", "best_val_loss", "best_val_auc", "best_val_f1_weighted", "last")
BEST_RULES = {"best_val_loss": ("val/loss", 1.0), "best_val_auc": ("val/auc", -1.0), "best_val_f1_weighted": ("val/f1_weighted", -1.0)}


@dataclass
class SelectionConfig:
    """Schema of the top-level `selection:` key."""

    rule: str = "moving_average"  # moving_average | best_val_loss | best_val_auc | best_val_f1_weighted | last
    window: int = 15

    def check(self) -> None:
        if self.rule not in SELECTION_RULES:
            raise ConfigError(f"selection.rule={self.rule!r}: choose one of {SELECTION_RULES}")
        if self.window < 1:
            raise ConfigError(f"selection.window={self.window}: must be >= 1")


class ModelSelection(L.Callback):
    """Choose the model that gets tested, and save it as `checkpoints/selected.ckpt`."""

    def __init__(self, config: SelectionConfig, checkpoint_path: Path) -> None:
        config.check()
        self.config = config
        self.checkpoint_path = Path(checkpoint_path)
        self.candidates_dir = self.checkpoint_path.parent / "candidates"
        self.window = config.window
        self.selected_epoch: int | None = None
        self.best_score = float("inf")
        self._recent: list[tuple[int, float]] = []  # (epoch, val/error) of the last `window` epochs
        self._candidates: list[tuple[int, float]] = []  # epochs that can still be selected, on disk
        self.writes = True  # False on ranks other than 0: the same choices, no files

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.writes = getattr(trainer, "is_global_zero", True)
        max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else self.config.window
        self.window = min(self.config.window, max_epochs)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        if trainer.sanity_checking or "val/error" not in metrics:
            return
        scores = {k: float(v) for k, v in metrics.items() if k.startswith("val/")}
        self.observe(trainer.current_epoch, float(metrics["val/error"]), float(metrics["val/loss"]), pl_module, scores)

    def observe(
        self, epoch: int, val_error: float, val_loss: float, pl_module: torch.nn.Module, scores: dict[str, float] | None = None
    ) -> None:
        """Take one epoch's validation metrics (and its model) into account.

        `scores`: every logged `val/...` value (the `best_*` rules read theirs from it).
        """
        if self.config.rule == "moving_average":
            self._recent = (self._recent + [(epoch, val_error)])[-self.window :]
            self._keep_candidate(epoch, val_error, pl_module)
            if len(self._recent) == self.window:
                window_mean = float(np.mean([e for _, e in self._recent]))
                if window_mean < self.best_score:
                    self.best_score = window_mean
                    best = int(np.argmin([e for _, e in self._recent]))
                    self._select_candidate(self._recent[best][0], window_mean)
        elif self.config.rule in BEST_RULES:
            key, sign = BEST_RULES[self.config.rule]
            value = val_loss if key == "val/loss" else (scores or {}).get(key, float("nan"))
            if sign * value < self.best_score:  # False for nan
                self.best_score = sign * value
                self._save(self.checkpoint_path, pl_module, epoch, value)
                self.selected_epoch = epoch
        else:
            self._save(self.checkpoint_path, pl_module, epoch, val_loss)
            self.selected_epoch = epoch

    def _keep_candidate(self, epoch: int, val_error: float, pl_module: torch.nn.Module) -> None:
        oldest_in_window = self._recent[0][0]
        keep = []
        for e, error in self._candidates:
            if e >= oldest_in_window and error <= val_error:
                keep.append((e, error))
            elif self.writes:
                self._candidate_path(e).unlink(missing_ok=True)
        self._candidates = keep + [(epoch, val_error)]
        self._save(self._candidate_path(epoch), pl_module, epoch, val_error)

    def _select_candidate(self, epoch: int, score: float) -> None:
        self.selected_epoch = epoch
        if not self.writes:
            return
        checkpoint = torch.load(self._candidate_path(epoch), map_location="cpu", weights_only=False)
        checkpoint["selection_score"] = score
        _atomic_save(checkpoint, self.checkpoint_path)
        self.selected_epoch = epoch

    def _candidate_path(self, epoch: int) -> Path:
        return self.candidates_dir / f"epoch={epoch}.ckpt"

    def _save(self, path: Path, pl_module: torch.nn.Module, epoch: int, score: float) -> None:
        if not self.writes:
            return
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        _atomic_save({"state_dict": state, "epoch": epoch, "selection_rule": self.config.rule, "selection_score": score}, path)

    def state_dict(self) -> dict:
        return {"window": self.window, "selected_epoch": self.selected_epoch, "best_score": self.best_score,
                "recent": list(self._recent), "candidates": list(self._candidates)}

    def load_state_dict(self, state: dict) -> None:
        """On resume: the moving-average window and the candidates (their states are on disk)."""
        self.window, self.selected_epoch, self.best_score = state["window"], state["selected_epoch"], state["best_score"]
        self._recent = [tuple(r) for r in state["recent"]]
        self._candidates = [tuple(c) for c in state["candidates"]]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.writes:
            shutil.rmtree(self.candidates_dir, ignore_errors=True)
        self._candidates = []

    def restore_selected(self, pl_module: torch.nn.Module) -> None:
        """Load the selected weights into `pl_module` (before testing)."""
        if self.selected_epoch is None:
            raise RuntimeError("no model was selected: did validation run during fit?")
        checkpoint = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        pl_module.load_state_dict(checkpoint["state_dict"])


def _atomic_save(payload: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
