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
from mil_experiments.metrics import bag_metrics, instance_auc


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

    def __init__(self, config: Config, encoder: nn.Module, num_classes: int, alpha: float = 100.0) -> None:
        super().__init__()
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

    # --- what a method provides ---------------------------------------------------------
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
    def evaluate_bag(self, bag: Bag) -> dict:
        """Loss, probability and attention of one bag, encoded without gradients."""
        features = encode_in_chunks(self.encoder, bag.instances, self.config.eval_chunk_size)  # (N, D)
        output = self.aggregator(features)
        logits = output[0] if isinstance(output, tuple) else output
        attention = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        return {
            "loss": float(self.bag_loss(logits, bag.label)),
            "probability": self.probabilities(logits).cpu(),
            "attention": None if attention is None else attention.float().cpu().numpy(),
        }

    def _record_eval(self, bag: Bag) -> None:
        result = self.evaluate_bag(bag)
        result["label"] = int(bag.label)
        result["instance_labels"] = None if bag.instance_labels is None else bag.instance_labels.cpu().numpy()
        self._eval_records.append(result)

    def on_validation_epoch_start(self) -> None:
        self._eval_records = []

    def validation_step(self, bag: Bag, batch_idx: int) -> None:
        self._record_eval(bag)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        metrics = {"epoch": self.current_epoch}
        if self._train_records:
            losses, predicted, labels = zip(*self._train_records)
            metrics["train/loss"] = float(np.mean(losses))
            metrics["train/error"] = float(np.mean(np.asarray(predicted) != np.asarray(labels)))
        scores = self._bag_scores()
        metrics["val/loss"] = float(np.mean([r["loss"] for r in self._eval_records]))
        metrics["val/error"] = scores["error"]
        metrics["val/auc"] = scores["auc"]
        metrics.update(self.epoch_telemetry)
        self.last_epoch_metrics = metrics
        self.history.append(metrics)
        self.log_dict({k: float(v) for k, v in metrics.items() if k != "epoch"}, on_epoch=True)

    def _bag_scores(self) -> dict[str, float]:
        probabilities = torch.stack([r["probability"] for r in self._eval_records])
        labels = torch.tensor([r["label"] for r in self._eval_records])
        return bag_metrics(probabilities, labels, self.num_classes)

    def on_test_epoch_start(self) -> None:
        self._eval_records = []

    def test_step(self, bag: Bag, batch_idx: int) -> None:
        self._record_eval(bag)

    def on_test_epoch_end(self) -> None:
        records = self._eval_records
        scores = self._bag_scores()
        results = {
            "test/loss": float(np.mean([r["loss"] for r in records])),
            "test/accuracy": scores["accuracy"],
            "test/auc": scores["auc"],
            "test/f1_weighted": scores["f1_weighted"],
        }
        predicted = [self.predicted_label(r["probability"]) for r in records]
        if self.num_classes == 2:
            hard = bag_metrics(torch.tensor(predicted, dtype=torch.float32), torch.tensor([r["label"] for r in records]), 2)
            results["test/auc_hard_labels"] = hard["auc"]  # the sampling paper's bag AUC
        if self.num_classes == 2 and all(r["instance_labels"] is not None and r["attention"] is not None for r in records):
            results["test/instance_auc"] = instance_auc(
                [r["attention"] for r in records],
                [r["instance_labels"] for r in records],
                [r["label"] for r in records],
                predicted,
            )
        self.test_results = results
        self.log_dict(results)
