"""The evaluation protocols' test report: the full metric set, bootstrap intervals and the
confusion matrix of the selected model, added to a run's results.

`evaluation.threshold_from=same` chooses the binary Youden threshold on the test set itself
(MHIM v1's `five_scores` without `--best_thr_val`); `val` chooses it on the validation set,
evaluated with the selected model by the test protocol. `evaluation.bootstrap=B` adds
`test/<metric>_ci_low` / `_ci_high` (95% percentile intervals of B seeded resamples of the
test slides; 0 disables them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mil_experiments.errors import ConfigError
from mil_experiments.evaluation import BagEvaluation
from mil_experiments.metrics import bootstrap_intervals, classification_metrics, confusion_matrix, youden_threshold

THRESHOLD_SOURCES = ("same", "val")


@dataclass
class EvaluationConfig:
    """Schema of the top-level `evaluation:` key."""

    bootstrap: int = 1000  # resamples of the test set for 95% intervals; 0 = none
    bootstrap_seed: int = 0
    threshold_from: str = "same"  # same | val: where the binary Youden threshold is chosen
    confusion_matrix: bool = True  # write confusion_matrix.png

    def check(self) -> None:
        if self.bootstrap < 0:
            raise ConfigError(f"evaluation.bootstrap={self.bootstrap}: must be >= 0 (0 disables it)")
        if self.threshold_from not in THRESHOLD_SOURCES:
            raise ConfigError(f"evaluation.threshold_from={self.threshold_from!r}: choose one of {THRESHOLD_SOURCES}")


def _arrays(records: list[BagEvaluation]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    probabilities = torch.stack([r.probability.double() for r in records])  # (B,) or (B, C)
    return probabilities, torch.tensor([r.label for r in records]), torch.tensor([r.predicted for r in records])


def protocol_results(
    records: list[BagEvaluation], num_classes: int, config: EvaluationConfig, val_records: list[BagEvaluation] | None = None
) -> dict[str, float]:
    """`test/<metric>` of `classification_metrics` (and its bootstrap intervals) for one bag per record."""
    probabilities, labels, predicted = _arrays(records)
    threshold = None
    if num_classes == 2 and config.threshold_from == "val":
        if not val_records:
            raise ValueError("evaluation.threshold_from=val needs the validation records")
        val_p, val_y, _ = _arrays(val_records)
        threshold = youden_threshold(val_p.numpy(), val_y.numpy())
    results = {f"test/{k}": v for k, v in classification_metrics(probabilities, labels, num_classes, predicted, threshold).items()}
    if config.bootstrap > 0:
        intervals = bootstrap_intervals(probabilities, labels, num_classes, predicted, config.bootstrap, config.bootstrap_seed, threshold)
        for key, (low, high) in intervals.items():
            if key != "youden_threshold" or threshold is None:
                results[f"test/{key}_ci_low"], results[f"test/{key}_ci_high"] = low, high
    return results


def write_predictions_csv(path: Path, records: list[BagEvaluation], num_classes: int) -> None:
    """One row per test bag: bag_id, label, predicted, the class probabilities (p_<k>, 9 significant digits: ranks, so AUCs, survive) and the loss."""
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["bag_id", "label", "predicted", *[f"p_{k}" for k in range(num_classes)], "loss"])
        for r in records:
            p = r.probability.double().reshape(-1)  # (C,) or (1,): the positive class's probability
            probabilities = [1.0 - float(p[0]), float(p[0])] if num_classes == 2 and p.numel() == 1 else [float(v) for v in p]
            writer.writerow([r.bag_id, r.label, r.predicted, *[f"{v:.9g}" for v in probabilities], f"{r.loss:.6f}"])


def write_confusion_png(path: Path, records: list[BagEvaluation], num_classes: int, class_names: list[str] | tuple[str, ...]) -> None:
    """The test confusion matrix (rows: true class, columns: predicted) as a PNG, counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = confusion_matrix(np.array([r.label for r in records]), np.array([r.predicted for r in records]), num_classes)
    names = list(class_names) or [str(i) for i in range(len(matrix))]
    figure, axis = plt.subplots(figsize=(1.2 * len(matrix) + 2, 1.2 * len(matrix) + 1.5))
    axis.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        axis.text(j, i, str(count), ha="center", va="center", color="white" if count > matrix.max() / 2 else "black")
    axis.set_xticks(range(len(matrix)), names)
    axis.set_yticks(range(len(matrix)), names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(f"test confusion matrix ({len(records)} slides)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
