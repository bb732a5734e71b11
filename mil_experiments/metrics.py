"""Bag- and instance-level metrics, as the papers compute them.

Bag metrics use torchmetrics. The instance-level AUC follows the within-bag sampling
paper's `evaluation.py` (Koriakina et al., 2021), which the gradient-accumulation paper
reuses: per positive bag, attention weights min-max normalised (+1e-11), an instance is
called positive at threshold t iff its score >= t and its bag is predicted positive,
TPR/FPR over the thresholds 0, 0.001, ..., 1, trapezoidal AUC; the reported number is
the sum of the positive bags' AUCs divided by their count (the paper divides by half the
number of test bags, which is the same for the balanced test sets used here).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from sklearn.metrics import auc as trapezoid_auc
from torchmetrics.functional.classification import binary_auroc, multiclass_auroc, multiclass_f1_score

THRESHOLDS = np.round(np.arange(0, 1.0005, 0.001), 3)  # (1001,) the published threshold grid
NORMALISATION_EPS = 1e-11


def minmax_normalise(weights: np.ndarray) -> np.ndarray:
    """(w - min) / (max - min + 1e-11), as the published evaluation normalises attention."""
    return (weights - weights.min()) / (weights.max() - weights.min() + NORMALISATION_EPS)


def bag_instance_auc(
    scores: np.ndarray, instance_labels: np.ndarray, bag_predicted_positive: bool | np.ndarray
) -> float:
    """Instance AUC of one bag over the published 1001-threshold grid.

    Args:
        scores: (N,) min-max normalised attention of the bag's instances.
        instance_labels: (N,) 1 for key instances.
        bag_predicted_positive: the (majority) predicted bag label, one for the bag or
            (N,) per instance; an instance whose bag is predicted negative is called
            negative at every threshold (a bag predicted negative has AUC 0).

    Returns:
        The area under the (FPR, TPR) curve traced by the thresholds.
    """
    positives = instance_labels == 1
    predicted = (scores[None, :] >= THRESHOLDS[:, None]) & np.asarray(bag_predicted_positive, dtype=bool)  # (T, N)
    tpr = (predicted & positives).sum(1) / max(positives.sum(), 1)  # (T,)
    fpr = (predicted & ~positives).sum(1) / max((~positives).sum(), 1)  # (T,)
    return float(trapezoid_auc(fpr, tpr))


def instance_auc(
    attention: list[np.ndarray],
    instance_labels: list[np.ndarray],
    bag_labels: list[int],
    predicted_bag_labels: list[int],
    gate_by_prediction: bool = True,
) -> float:
    """Mean instance AUC over the positive bags (one pass per bag).

    Args:
        attention: per bag, (N,) attention weights.
        instance_labels: per bag, (N,) instance labels.
        bag_labels: true bag labels; only positive bags count.
        predicted_bag_labels: predicted bag labels (used when `gate_by_prediction`).
        gate_by_prediction: the published rule (an instance is positive only if its bag
            is predicted positive); False scores every positive bag's attention alone.

    Returns:
        The mean AUC over positive bags (nan when there are none).
    """
    aucs = [
        bag_instance_auc(minmax_normalise(a), y, bool(p) or not gate_by_prediction)
        for a, y, label, p in zip(attention, instance_labels, bag_labels, predicted_bag_labels, strict=True)
        if label == 1
    ]
    return float(np.mean(aucs)) if aucs else float("nan")


def multi_pass_instance_auc(
    passes: list[list[tuple[np.ndarray, np.ndarray, int]]],
    instance_labels: list[np.ndarray],
    bag_labels: list[int],
) -> float:
    """Instance AUC when each bag is seen in several sampled passes (published evaluation).

    An instance drawn several times in one pass (sampling with replacement) counts as one
    look of that pass, with the weight of its last draw, and each pass is min-max
    normalised over its distinct instances: the published test saves one file per image
    and pass, so a second draw overwrites the first. For each instance: its majority predicted bag label over the passes that
    saw it is 1 iff the count of label-1 passes exceeds round(n / 2); its score is the
    mean weight over the passes whose label equals that majority. An instance never
    sampled scores 0 with majority label 0.

    Args:
        passes: per bag, a list of (instance positions (s,), attention (s,), predicted
            bag label) for each pass; positions index the bag's instances.
        instance_labels: per bag, (N,) instance labels.
        bag_labels: true bag labels; only positive bags count.
    """
    aucs = []
    for bag_passes, labels, bag_label in zip(passes, instance_labels, bag_labels, strict=True):
        if bag_label != 1:
            continue
        seen: dict[int, list[tuple[float, int]]] = defaultdict(list)
        for positions, weights, predicted in bag_passes:
            positions = np.asarray(positions)
            distinct, last_from_end = np.unique(positions[::-1], return_index=True)  # one look per pass
            last = len(positions) - 1 - last_from_end  # (distinct,) the last draw of each
            normalised = minmax_normalise(np.asarray(weights, dtype=np.float64)[last])  # (distinct,)
            for position, weight in zip(distinct, normalised, strict=True):
                seen[int(position)].append((float(weight), int(predicted)))
        scores = np.zeros(len(labels))
        majority = np.zeros(len(labels), dtype=bool)
        for position, looks in seen.items():
            n_positive = sum(p for _, p in looks)
            majority_label = int(n_positive > round(len(looks) / 2))
            scores[position] = np.mean([w for w, p in looks if p == majority_label])
            majority[position] = majority_label == 1
        aucs.append(bag_instance_auc(scores, labels, majority))
    return float(np.mean(aucs)) if aucs else float("nan")


def bag_metrics(
    probabilities: torch.Tensor, labels: torch.Tensor, num_classes: int, predicted: torch.Tensor | None = None
) -> dict[str, float]:
    """Accuracy, error, AUC (from probabilities) and weighted F1 of bag predictions.

    Args:
        probabilities: (B,) positive-class probabilities for a binary task, (B, C) otherwise.
        labels: (B,) integer labels.
        predicted: (B,) predicted labels when they are not the thresholded probabilities
            (the majority vote of sampled passes); accuracy and F1 use them.
    """
    labels = labels.long()
    if predicted is None:
        predicted = (probabilities >= 0.5).long() if num_classes == 2 else probabilities.argmax(1)  # (B,)
    predicted = predicted.long()
    if num_classes == 2:
        area = binary_auroc(probabilities, labels).item() if labels.unique().numel() == 2 else float("nan")
    else:
        area = multiclass_auroc(probabilities, labels, num_classes).item()
    accuracy = float((predicted == labels).float().mean())
    f1 = multiclass_f1_score(predicted, labels, max(num_classes, 2), average="weighted").item()
    return {"accuracy": accuracy, "error": 1.0 - accuracy, "auc": area, "f1_weighted": f1}


def log_values(metrics: dict[str, float]) -> dict[str, torch.Tensor]:
    """Metrics as float64 tensors for `LightningModule.log_dict`, so that every digit is kept."""
    return {k: torch.tensor(float(v), dtype=torch.float64) for k, v in metrics.items()}


# --- the ZoomMIL / MHIM evaluation protocols ---------------------------------------------
def youden_threshold(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """MHIM's `optimal_thresh`: the ROC threshold minimising FPR - TPR (maximising Youden's
    J = TPR - FPR; the first such point of sklearn's `roc_curve` on ties). nan with one class.
    When no threshold beats calling every slide negative, that point's threshold is max(p) + 1
    (sklearn < 1.3's value, which MHIM's code ran with; newer sklearn gives inf)."""
    from sklearn.metrics import roc_curve

    if len(np.unique(labels)) < 2:
        return float("nan")
    fpr, tpr, thresholds = roc_curve(labels, probabilities, pos_label=1)
    threshold = float(thresholds[int(np.argmin(fpr - tpr))])
    return threshold if np.isfinite(threshold) else float(np.max(probabilities)) + 1.0


def classification_metrics(
    probabilities: torch.Tensor, labels: torch.Tensor, num_classes: int, predicted: torch.Tensor, threshold: float | None = None
) -> dict[str, float]:
    """The protocols' slide metrics (keys without the `test/` prefix).

    - `accuracy`: micro, the share of correct slides; `accuracy_macro`: the mean over classes
      of each class's recall (balanced accuracy; torchmetrics' macro accuracy, MHIM v2's default);
    - `auc`: binary ROC AUC of the positive-class probability; one-vs-rest macro for C > 2;
    - `f1_weighted`, `f1_macro`, `f1_class<k>` (per class); `kappa_quadratic`: Cohen's kappa
      with quadratic weights 1 - (i - j)^2 / (C - 1)^2 (ZoomMIL);
    - binary only: `youden_threshold` t (MHIM's, on this set unless `threshold` is given),
      and `accuracy_youden`, `precision_youden`, `recall_youden`, `f1_youden` of p >= t.

    Args:
        probabilities: (B,) positive-class probabilities (binary) or (B, C).
        labels: (B,) integer labels.
        predicted: (B,) predicted labels (threshold 0.5 / argmax, or the sampled passes' vote).
        threshold: a Youden threshold chosen elsewhere (on the validation set).
    """
    from torchmetrics.functional.classification import (
        binary_f1_score,
        binary_precision,
        binary_recall,
        multiclass_accuracy,
        multiclass_cohen_kappa,
    )

    labels, predicted = labels.long(), predicted.long()
    classes = max(num_classes, 2)
    out = bag_metrics(probabilities, labels, num_classes, predicted)
    out.pop("error")
    out["accuracy_macro"] = multiclass_accuracy(predicted, labels, classes, average="macro").item()
    out["f1_macro"] = multiclass_f1_score(predicted, labels, classes, average="macro").item()
    per_class = multiclass_f1_score(predicted, labels, classes, average="none")  # (C,)
    out.update({f"f1_class{k}": float(v) for k, v in enumerate(per_class)})
    out["kappa_quadratic"] = multiclass_cohen_kappa(predicted, labels, classes, weights="quadratic").item()
    if num_classes == 2:
        p, y = probabilities.double().numpy(), labels.numpy()
        t = youden_threshold(p, y) if threshold is None else float(threshold)
        out["youden_threshold"] = t
        if np.isfinite(t):
            hard = (probabilities.double() >= t).long()  # (B,)
            out["accuracy_youden"] = float((hard == labels).double().mean())
            out["precision_youden"] = binary_precision(hard, labels).item()
            out["recall_youden"] = binary_recall(hard, labels).item()
            out["f1_youden"] = binary_f1_score(hard, labels).item()
    return out


def bootstrap_intervals(
    probabilities: torch.Tensor, labels: torch.Tensor, num_classes: int, predicted: torch.Tensor,
    samples: int, seed: int, threshold: float | None = None, level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals of `classification_metrics`.

    `samples` resamples of the B slides with replacement (numpy generator seeded by `seed`,
    so the intervals are reproducible, as MHIM v2's deterministic bootstrap); each metric's
    interval is the (1 - level) / 2 and (1 + level) / 2 quantiles of its resampled values,
    ignoring resamples where it is undefined (e.g. an AUC of one class). A resample with a
    Youden threshold uses the threshold chosen on it (or the fixed `threshold`).
    """
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = defaultdict(list)
    n = labels.shape[0]
    for _ in range(samples):
        index = torch.from_numpy(rng.integers(0, n, n))  # (B,)
        for key, value in classification_metrics(probabilities[index], labels[index], num_classes, predicted[index], threshold).items():
            if np.isfinite(value):
                values[key].append(value)
    low, high = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    return {k: (float(np.percentile(v, low)), float(np.percentile(v, high))) for k, v in values.items() if v}


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class."""
    classes = max(num_classes, 2)
    return np.bincount(np.asarray(labels) * classes + np.asarray(predicted), minlength=classes * classes).reshape(classes, classes)
