"""`MILMethod`: the LightningModule every MIL method here builds on.

Manual optimization, one bag per training step: `backward_bag` (the only thing a method
must provide) fills the gradients of one bag, scaled by 1/`bags_per_step`, and the
optimizer steps every `bags_per_step` bags. Validation and test encode each bag without
gradients (a chunk at a time, so bags of any size fit) and compute the papers' metrics.
Per-epoch metrics are gathered at the end of validation (train and validation of one
epoch together), logged once, and kept in `history`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch
from torch import nn

from mil_experiments.bag import Bag
from mil_experiments.engine import encode_in_chunks
from mil_experiments.metrics import bag_metrics, multi_pass_instance_auc
from mil_experiments.sampling import SamplingConfig, count_test_passes, draw_positions


@dataclass
class OptimizerConfig:
    """Adam settings (the papers' code uses Adam for every data set)."""

    lr: float = 5e-5
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class AggregatorConfig:
    """Attention pooling settings; the input dimension comes from the encoder."""

    attention_dim: int = 128
    gated: bool = False
    dropout: float = 0.0


STEP_SCHEDULES = ("modulo", "every_k")


class MILMethod(L.LightningModule, ABC):
    """Shared training, evaluation and logging of MIL methods.

    Args:
        config: the method's validated config (`conf/method/<name>.yaml`).
        encoder: instance encoder with an `out_dim` attribute.
        num_classes: number of bag classes (2 = binary, one logit with BCE).
        alpha: percent of a bag's instances forwarded at once (top-level `alpha`).
        sampling: within-bag sampling at training and inference (top-level `sampling`).
    """

    @dataclass
    class Config:
        name: str = "abmil"
        aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
        optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
        bags_per_step: int = 1
        # "modulo": step when batch_idx % bags_per_step == 0, as the paper's code does (the
        # first step comes after one bag; the last bags' gradients carry into the next
        # epoch). "every_k": step after every bags_per_step bags and at the epoch's end.
        step_schedule: str = "modulo"
        eval_chunk_size: int = 512

    def __init__(
        self,
        config: Config,
        encoder: nn.Module,
        num_classes: int,
        alpha: float = 100.0,
        sampling: SamplingConfig | None = None,
    ) -> None:
        super().__init__()
        self.sampling = sampling or SamplingConfig()
        self.sampling.check()
        if self.sampling.train < 100 and not self.trains_on_samples:
            raise ValueError(f"sampling.train={self.sampling.train:g} applies to method=abmil_sampl only (method={config.name})")
        if config.step_schedule not in STEP_SCHEDULES:
            raise ValueError(f"method.step_schedule={config.step_schedule!r}: choose one of {STEP_SCHEDULES}")
        if config.bags_per_step < 1:
            raise ValueError(f"method.bags_per_step={config.bags_per_step}: must be >= 1")
        self.automatic_optimization = False
        self.config = config
        self.num_classes = num_classes
        self.alpha = alpha
        self.encoder = encoder
        self.aggregator = self.build_aggregator(encoder.out_dim)
        self.history: list[dict[str, float]] = []
        self.last_epoch_metrics: dict[str, float] = {}
        self.epoch_telemetry: dict[str, float] = {}
        self.test_results: dict[str, float] = {}
        self._train_records: list[tuple[float, int, int]] = []
        self._eval_records: list[dict] = []
        self._test_records: dict[float, list[dict]] = {}

    # --- what a method provides ---------------------------------------------------------
    trains_on_samples: bool = False  # within-bag sampling at training (ABMIL-SAMPL)

    @abstractmethod
    def build_aggregator(self, in_dim: int) -> nn.Module:
        """The aggregator: (N, in_dim) features -> logits or (logits, attention, ...)."""

    @abstractmethod
    def backward_bag(self, bag: Bag, loss_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate the gradients of `loss_scale * loss(bag)`; return (loss, logits), detached."""

    # --- losses and predictions ---------------------------------------------------------
    @property
    def n_outputs(self) -> int:
        return 1 if self.num_classes == 2 else self.num_classes

    def bag_loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """BCE on one logit for binary bags (the papers' loss), cross-entropy otherwise."""
        if self.num_classes == 2:
            return nn.functional.binary_cross_entropy_with_logits(logits.float(), label.float().reshape(1))
        return nn.functional.cross_entropy(logits.float().reshape(1, -1), label.reshape(1))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Positive-class probability (binary) or class probabilities."""
        if self.num_classes == 2:
            return torch.sigmoid(logits.float()).reshape(())
        return torch.softmax(logits.float(), dim=-1)

    def predicted_label(self, probability: torch.Tensor) -> int:
        return int(probability >= 0.5) if self.num_classes == 2 else int(probability.argmax())

    # --- training -----------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        o = self.config.optimizer
        return torch.optim.Adam(self.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)

    def on_train_epoch_start(self) -> None:
        self._train_records = []

    def training_step(self, bag: Bag, batch_idx: int) -> None:
        k = self.config.bags_per_step
        positions = draw_positions(self.sampling.train, bag.size)
        if positions is not None:
            bag = bag.subset(positions)
        loss, logits = self.backward_bag(bag, loss_scale=1.0 / k)
        predicted = self.predicted_label(self.probabilities(logits))
        self._train_records.append((float(loss), predicted, int(bag.label)))
        if self._step_now(batch_idx):
            optimizer = self.optimizers()
            optimizer.step()
            optimizer.zero_grad()

    def _step_now(self, batch_idx: int) -> bool:
        k = self.config.bags_per_step
        if self.config.step_schedule == "modulo":
            return batch_idx % k == 0
        return (batch_idx + 1) % k == 0 or batch_idx + 1 == self.trainer.num_training_batches

    # --- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_features(self, features: torch.Tensor, label: torch.Tensor) -> dict:
        """Loss, probability and attention of one bag from its (N, D) features."""
        output = self.aggregator(features)
        logits = output[0] if isinstance(output, tuple) else output
        attention = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        return {
            "loss": float(self.bag_loss(logits, label)),
            "probability": self.probabilities(logits).cpu(),
            "attention": None if attention is None else attention.float().cpu().numpy(),
        }

    @torch.no_grad()
    def evaluate_sampled(self, bag: Bag, percent: float, passes: int) -> dict:
        """Evaluate `passes` samples of `percent`% of the bag (one whole pass at 100%).

        The bag is encoded once, without gradients and a chunk at a time; each pass then
        pools the features of its sample (in eval mode the encoder treats instances
        independently, so this equals encoding every sample anew).

        Returns the mean loss and probability over the passes, the majority-vote label,
        per pass (positions, attention, predicted label) for the instance AUC, and the
        passes' own results under "looks".
        """
        features = encode_in_chunks(self.encoder, bag.instances, self.config.eval_chunk_size)  # (N, D)
        looks = []
        for _ in range(passes):
            positions = draw_positions(percent, bag.size)
            if positions is None:
                positions = torch.arange(bag.size)
            result = self.evaluate_features(features[positions.to(features.device)], bag.label)  # (s, D) pooled
            result["positions"] = positions.numpy()
            result["predicted"] = self.predicted_label(result["probability"])
            looks.append(result)
        votes = np.bincount([r["predicted"] for r in looks], minlength=max(self.num_classes, 2))
        majority = int(votes[1] >= 0.5 * len(looks)) if self.num_classes == 2 else int(votes.argmax())
        return {
            "loss": float(np.mean([r["loss"] for r in looks])),
            "probability": torch.stack([r["probability"] for r in looks]).mean(0),
            "predicted": majority,
            "label": int(bag.label),
            "instance_labels": None if bag.instance_labels is None else bag.instance_labels.cpu().numpy(),
            "passes": [(r["positions"], r["attention"], r["predicted"]) for r in looks],
            "looks": looks,
        }

    def on_validation_epoch_start(self) -> None:
        self._eval_records = []

    def validation_step(self, bag: Bag, batch_idx: int) -> None:
        repeats = self.sampling.val_repeats if self.sampling.inference < 100 else 1
        result = self.evaluate_sampled(bag, self.sampling.inference, passes=repeats)
        for look in result["looks"]:  # each repeat counts as one evaluation of the bag
            self._eval_records.append({**look, "label": result["label"]})

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        metrics = {"epoch": self.current_epoch}
        if self._train_records:
            losses, predicted, labels = zip(*self._train_records)
            metrics["train/loss"] = float(np.mean(losses))
            metrics["train/error"] = float(np.mean(np.asarray(predicted) != np.asarray(labels)))
        scores = self._bag_scores(self._eval_records)
        metrics["val/loss"] = float(np.mean([r["loss"] for r in self._eval_records]))
        metrics["val/error"] = scores["error"]
        metrics["val/auc"] = scores["auc"]
        metrics.update(self.epoch_telemetry)
        self.last_epoch_metrics = metrics
        self.history.append(metrics)
        self.log_dict({k: float(v) for k, v in metrics.items() if k != "epoch"}, on_epoch=True)

    def _bag_scores(self, records: list[dict]) -> dict[str, float]:
        probabilities = torch.stack([r["probability"] for r in records])
        labels = torch.tensor([r["label"] for r in records])
        predicted = torch.tensor([r["predicted"] for r in records])
        return bag_metrics(probabilities, labels, self.num_classes, predicted)

    @property
    def test_percents(self) -> list[float]:
        """Inference percentages evaluated at test: `sampling.inference` first, then the extras."""
        percents = [float(self.sampling.inference)]
        return percents + [float(p) for p in self.sampling.test_inference if float(p) not in percents]

    def on_test_epoch_start(self) -> None:
        self._test_records: dict[float, list[dict]] = {p: [] for p in self.test_percents}

    def test_step(self, bag: Bag, batch_idx: int) -> None:
        for percent, records in self._test_records.items():
            passes = count_test_passes(percent, bag.size, self.sampling.test_looks)
            records.append(self.evaluate_sampled(bag, percent, passes))

    def on_test_epoch_end(self) -> None:
        results: dict[str, float] = {}
        for i, (percent, records) in enumerate(self._test_records.items()):
            suffix = "" if i == 0 else f"@inference{percent:g}"
            for key, value in self._test_metrics(records).items():
                results[key + suffix] = value
        self.test_results = results
        self.log_dict(results)

    def _test_metrics(self, records: list[dict]) -> dict[str, float]:
        scores = self._bag_scores(records)
        results = {
            "test/loss": float(np.mean([r["loss"] for r in records])),
            "test/accuracy": scores["accuracy"],
            "test/auc": scores["auc"],
            "test/f1_weighted": scores["f1_weighted"],
        }
        if self.num_classes == 2:
            predicted = torch.tensor([r["predicted"] for r in records], dtype=torch.float32)
            labels = torch.tensor([r["label"] for r in records])
            results["test/auc_hard_labels"] = bag_metrics(predicted, labels, 2)["auc"]  # the sampling paper's bag AUC
            has_instances = all(r["instance_labels"] is not None and r["passes"][0][1] is not None for r in records)
            if has_instances:
                results["test/instance_auc"] = multi_pass_instance_auc(
                    [r["passes"] for r in records], [r["instance_labels"] for r in records], [r["label"] for r in records]
                )
        return results
