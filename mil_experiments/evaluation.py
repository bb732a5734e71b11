"""Evaluating bags: the multi-pass protocol of the within-bag sampling paper, for any method.

A bag is encoded once without gradients (a chunk at a time, so bags of any size fit) by
the method, then pooled in one or several passes, each on a sample of `percent`% of the
bag (positions of its lowest level, drawn with replacement; a multi-level bag keeps the
children of the drawn tiles), through the method's bag-level forward. The passes'
losses and probabilities are averaged, the bag label is their majority vote, and the
per-pass instance scores feed the instance AUC. In eval mode the encoder treats
instances independently, so pooling samples of the encoded bag equals encoding every
sample anew.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mil_experiments.bag import Bag
from mil_experiments.metrics import bag_metrics, multi_pass_instance_auc
from mil_experiments.models.aggregator import AggregatorOutput
from mil_experiments.sampling import draw_positions


def probabilities(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """0-d positive-class probability (binary, one or two logits) or (C,) class probabilities."""
    logits = logits.float()
    if num_classes == 2:
        if logits.numel() == 1:
            return torch.sigmoid(logits).reshape(())
        return torch.softmax(logits, dim=-1)[1]
    return torch.softmax(logits, dim=-1)


def predicted_label(probability: torch.Tensor, num_classes: int) -> int:
    """Threshold 0.5 for a binary task, argmax otherwise."""
    return int(probability >= 0.5) if num_classes == 2 else int(probability.argmax())


@dataclass
class BagEvaluation:
    """One bag evaluated in one or several passes.

    Attributes:
        loss: mean classification loss over the passes.
        probability: mean probability over the passes (0-d, or (C,)).
        predicted: majority-vote label.
        label: true label.
        instance_labels: (N,) per row, or None.
        passes: per pass, (rows of the bag it pooled, instance scores (rows,) or None,
            its predicted label).
        looks: per pass, (loss, probability, predicted label).
        bag_id: the bag's id (slide id), when it has one.
    """

    loss: float
    probability: torch.Tensor
    predicted: int
    label: int
    instance_labels: np.ndarray | None
    passes: list[tuple[np.ndarray, np.ndarray | None, int]]
    looks: list[tuple[float, torch.Tensor, int]]
    bag_id: str | None = None


@torch.no_grad()
def evaluate_bag(method, bag: Bag, percent: float, passes: int) -> BagEvaluation:
    """Evaluate `passes` samples of `percent`% of `bag` (one whole pass at 100%).

    `method` provides `encode_for_evaluation(bag) -> Bag` (instances replaced by features),
    `predict(bag) -> AggregatorOutput` and `evaluation_loss(output, bag) -> Tensor`, and
    `num_classes`.
    """
    encoded = method.encode_for_evaluation(bag)
    num_classes = method.num_classes
    looks, pass_records = [], []
    for _ in range(passes):
        positions = draw_positions(percent, encoded.sampling_size)
        sample = encoded if positions is None else encoded.subset(positions)
        rows = np.arange(encoded.size) if positions is None else encoded.rows_of(positions).numpy()
        output: AggregatorOutput = method.predict(sample)
        probability = probabilities(output.logits, num_classes).cpu()
        predicted = predicted_label(probability, num_classes)
        scores = None if output.instance_scores is None else output.instance_scores.float().cpu().numpy()
        looks.append((float(method.evaluation_loss(output, sample)), probability, predicted))
        pass_records.append((rows, scores, predicted))
    votes = np.bincount([p for _, _, p in looks], minlength=max(num_classes, 2))
    majority = int(votes[1] >= 0.5 * len(looks)) if num_classes == 2 else int(votes.argmax())
    return BagEvaluation(
        loss=float(np.mean([loss for loss, _, _ in looks])),
        probability=torch.stack([p for _, p, _ in looks]).mean(0),
        predicted=majority,
        label=int(bag.label),
        instance_labels=None if bag.instance_labels is None else bag.instance_labels.cpu().numpy(),
        passes=pass_records,
        looks=looks,
        bag_id=None if bag.bag_id is None else str(bag.bag_id),
    )


def bag_scores(probabilities_: list[torch.Tensor], labels: list[int], predicted: list[int], num_classes: int) -> dict[str, float]:
    """Accuracy, error, AUC and weighted F1 of bag predictions."""
    return bag_metrics(torch.stack(probabilities_), torch.tensor(labels), num_classes, torch.tensor(predicted))


def validation_metrics(looks: list[tuple[float, torch.Tensor, int, int]], num_classes: int) -> dict[str, float]:
    """`val/loss`, `val/error`, `val/auc`, `val/f1_weighted` over every look (each repeat counts as one evaluation).

    Args:
        looks: (loss, probability, predicted label, true label) per look.
    """
    scores = bag_scores([p for _, p, _, _ in looks], [y for *_, y in looks], [q for _, _, q, _ in looks], num_classes)
    return {
        "val/loss": float(np.mean([loss for loss, *_ in looks])),
        "val/error": scores["error"],
        "val/auc": scores["auc"],
        "val/f1_weighted": scores["f1_weighted"],
    }


def test_metrics(records: list[BagEvaluation], num_classes: int) -> dict[str, float]:
    """The test metrics of one inference setting (one record per bag)."""
    scores = bag_scores([r.probability for r in records], [r.label for r in records], [r.predicted for r in records], num_classes)
    results = {
        "test/loss": float(np.mean([r.loss for r in records])),
        "test/accuracy": scores["accuracy"],
        "test/auc": scores["auc"],
        "test/f1_weighted": scores["f1_weighted"],
    }
    if num_classes == 2:
        predicted = torch.tensor([r.predicted for r in records], dtype=torch.float32)
        labels = torch.tensor([r.label for r in records])
        results["test/auc_hard_labels"] = bag_metrics(predicted, labels, 2)["auc"]  # the sampling paper's bag AUC
        if all(r.instance_labels is not None and r.passes[0][1] is not None for r in records):
            results["test/instance_auc"] = multi_pass_instance_auc(
                [r.passes for r in records], [r.instance_labels for r in records], [r.label for r in records]
            )
    return results
