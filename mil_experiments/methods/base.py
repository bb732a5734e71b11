"""`MILMethod`: the LightningModule every training method builds on.

A method says what is trained and how the loss is formed; it owns an encoder, an
aggregator (`mil_experiments.models.aggregator`) and a gradient engine
(`mil_experiments.engine`), and never knows which engine or aggregator it was given.
Manual optimization, one bag per training step:

- `training_bag` may change the bag first (within-bag sampling);
- the engine fills the gradients of the head's loss (`loss_terms`, summed; each term is
  logged as `train/loss_<term>`), scaled by 1/`bags_per_step`;
- the optimizer steps every `bags_per_step` bags, after the engine has exchanged the
  gradients across ranks (`synchronize`, multi-process strategies), then
  `on_after_optimizer_step` runs (an EMA teacher updates there); the LR scheduler steps
  per epoch.

Evaluation goes through `mil_experiments.evaluation` on whole bags: `encode_for_evaluation`
and `predict`, so multi-level and multi-head models are evaluated by the same code.
Per-epoch metrics are logged with Lightning (`self.log_dict`); callbacks read them from
`trainer.callback_metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from torch import nn

from mil_experiments.bag import Bag
from mil_experiments.data.bag_order import NoBag
from mil_experiments.data.description import DataDescription
from mil_experiments.data.evaluation_shards import every_rank_items
from mil_experiments.engine import GradientEngine, HeadResult
from mil_experiments.engine.distributed import same_random_state_on_every_rank
from mil_experiments.errors import ConfigError
from mil_experiments.evaluation import (
    evaluate_bag,
    predicted_label,
    probabilities,
    test_metrics,
    validation_metrics,
)
from mil_experiments.methods.fc_init import init_first_fc
from mil_experiments.methods.optimization import (
    STEP_SCHEDULES,
    OptimizerConfig,
    SchedulerConfig,
    build_optimizer,
    build_scheduler,
    step_now,
)
from mil_experiments.metrics import log_values
from mil_experiments.models.aggregator import Aggregator, AggregatorOutput, bag_loss
from mil_experiments.sampling import SamplingConfig, count_test_passes

BINARY_HEADS = ("one_logit", "two_logits")


class MILMethod(L.LightningModule):
    """Supervised bag classification; the base of every method.

    Args:
        config: the method's validated config (`conf/method/<name>.yaml`).
        encoder: instance encoder with an `out_dim` attribute.
        aggregator: features -> `AggregatorOutput`, built for `output_count(config, classes)` outputs.
        engine: how one bag's gradients are produced.
        data: the description of the data (classes, instance shape, levels).
        sampling: within-bag sampling at training and inference (top-level `sampling`).
    """

    @dataclass
    class Config:
        name: str = "supervised"
        optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
        scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
        bags_per_step: int = 1
        # "modulo": step when batch_idx % bags_per_step == 0 (the ACC paper's code);
        # "every_k": after every bags_per_step bags and at the epoch's end.
        step_schedule: str = "modulo"
        eval_chunk_size: int = 512
        # Binary tasks: one logit with BCE (the ACC and sampling papers' code) or two
        # logits with cross-entropy (ZoomMIL's and MHIM's code).
        binary_head: str = "one_logit"
        # The aggregator's first fc from a run's selected checkpoint (MHIM supplement Table 5's
        # "w/ init" baselines; abmil_mhim and transmil): its run folder or .ckpt.
        init_fc_from: str | None = None

        def check(self) -> None:
            self.optimizer.check()
            self.scheduler.check()
            if self.step_schedule not in STEP_SCHEDULES:
                raise ConfigError(f"method.step_schedule={self.step_schedule!r}: choose one of {STEP_SCHEDULES}")
            if self.bags_per_step < 1:
                raise ConfigError(f"method.bags_per_step={self.bags_per_step}: must be >= 1")
            if self.binary_head not in BINARY_HEADS:
                raise ConfigError(f"method.binary_head={self.binary_head!r}: choose one of {BINARY_HEADS}")

    trains_on_samples: bool = False  # within-bag sampling at training (the `sampled` method)

    def __init__(
        self,
        config: Config,
        encoder: nn.Module,
        aggregator: Aggregator,
        engine: GradientEngine,
        data: DataDescription,
        sampling: SamplingConfig | None = None,
    ) -> None:
        super().__init__()
        self.sampling = sampling or SamplingConfig()
        self.check_config(config, self.sampling)
        self.automatic_optimization = False
        self.config = config
        self.data = data
        self.num_classes = data.num_classes
        self.n_outputs = self.output_count(config, data.num_classes)
        self.encoder = encoder
        self.aggregator = aggregator
        if config.init_fc_from is not None:
            init_first_fc(aggregator, config.init_fc_from)
        self.engine = engine
        self._train_records: list[tuple[float, int, int, dict[str, float]]] = []
        # evaluation records as (bag index, record) while an epoch runs; every rank's, in bag order, after it
        self._val_looks: list = []
        self._test_records: dict[float, list] = {}
        # strategy=ddp: this rank evaluates only its bags, the records are gathered (data/evaluation_shards.py)
        self.evaluation_split = False

    @classmethod
    def check_config(cls, config: Config, sampling: SamplingConfig) -> None:
        """Raise ConfigError for settings this method refuses (before any data is built)."""
        config.check()
        if sampling.train < 100 and not cls.trains_on_samples:
            raise ConfigError(
                f"sampling.train={sampling.train:g} applies to within-bag sampling only"
                f" (method=sampled or abmil_sampl; method={config.name})"
            )

    @classmethod
    def check_aggregator(cls, config: Config, aggregator_name: str, aggregator_class: type) -> None:
        """Raise ConfigError naming both when this method cannot train `aggregator=<aggregator_name>` (before any data is built)."""

    @staticmethod
    def output_count(config: Config, num_classes: int) -> int:
        """Logits the aggregator must produce: 1 for a binary task with one logit, else the classes."""
        return 1 if num_classes == 2 and config.binary_head == "one_logit" else num_classes

    # --- what a method may override -----------------------------------------------------
    def training_bag(self, bag: Bag) -> Bag:
        """The bag a training step actually uses (the `sampled` method draws a sample)."""
        return bag

    def loss_terms(self, output: AggregatorOutput, bag: Bag) -> dict[str, torch.Tensor]:
        """Named loss terms of one bag, summed for the gradient: the bag loss and the aggregator's own terms."""
        classification = bag_loss(output.logits, bag.label)
        if output.bag_loss_weight != 1.0:
            classification = output.bag_loss_weight * classification
        return {"bag": classification, **output.aux_losses}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates (a teacher, say, is left out)."""
        return [p for m in (self.encoder, self.aggregator) for p in m.parameters() if p.requires_grad]

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of everything after the encoder (frozen by the engine's recompute mode)."""
        return list(self.aggregator.parameters())

    def on_after_optimizer_step(self) -> None:
        """Runs after every optimizer step (an EMA teacher updates here)."""

    def encode_for_evaluation(self, bag: Bag) -> Bag:
        """The bag with its instances encoded without gradients, a chunk at a time."""
        return bag.with_instances(self.engine.encode_for_evaluation(self.encoder, bag.instances, self.config.eval_chunk_size))  # (N, D)

    def predict(self, bag: Bag) -> AggregatorOutput:
        """The aggregator's output for an encoded bag, shape-checked."""
        output = self.aggregator(bag.instances, target=None, levels=bag.levels)
        return output.check(bag.size, self.n_outputs, f"aggregator {type(self.aggregator).__name__}")

    def evaluation_loss(self, output: AggregatorOutput, bag: Bag) -> torch.Tensor:
        """The loss reported at validation and test: the bag classification loss."""
        return bag_loss(output.logits, bag.label)

    # --- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The random state too, so that a resumed run draws what the uninterrupted one would."""
        checkpoint["rng_states"] = _collect_rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "rng_states" in checkpoint:
            _set_rng_states(checkpoint["rng_states"])

    # --- training -----------------------------------------------------------------------
    def head_for(self, bag: Bag):
        """features -> `HeadResult` of `bag`: what the engine differentiates."""

        def head(features: torch.Tensor) -> HeadResult:
            output = self.aggregator(features, target=bag.label, levels=bag.levels)
            output.check(features.shape[0], self.n_outputs, f"aggregator {type(self.aggregator).__name__}")
            terms = self.loss_terms(output, bag)
            values = list(terms.values())
            loss = values[0]
            for value in values[1:]:
                loss = loss + value
            return HeadResult(loss, terms, output)

        return head

    def configure_optimizers(self):
        optimizer = build_optimizer(self.trainable_parameters(), self.config.optimizer)
        max_epochs = self.trainer.max_epochs if self._trainer is not None and self.trainer.max_epochs else 1
        scheduler = build_scheduler(optimizer, self.config.scheduler, max_epochs)
        return optimizer if scheduler is None else {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_train_epoch_start(self) -> None:
        self._train_records = []

    def training_step(self, bag: Bag | NoBag, batch_idx: int) -> None:
        if not isinstance(bag, NoBag):  # NoBag: this rank ran out of bags (ddp), it still steps with the others
            self.engine.sync_random_state(self.device)
            bag = self.training_bag(bag)
            scale = 1.0 / self.config.bags_per_step
            result = self.engine.backward_bag(
                self.encoder,
                self.head_for(bag),
                bag.instances,
                backward=lambda loss: self.manual_backward(loss * scale),
                head_parameters=self.head_parameters(),
            )
            predicted = predicted_label(probabilities(result.output.logits, self.num_classes), self.num_classes)
            self._train_records.append((float(result.loss), predicted, int(bag.label), {k: float(v) for k, v in result.terms.items()}))
        if step_now(self.config.step_schedule, self.config.bags_per_step, batch_idx, self.trainer.num_training_batches):
            optimizer = self.optimizers()
            self.engine.synchronize(*self._encoder_and_head_trainables())
            optimizer.step()
            optimizer.zero_grad()
            self.on_after_optimizer_step()

    def _encoder_and_head_trainables(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The trainable parameters, split into the encoder's and the rest (what the engine synchronises)."""
        in_encoder = {id(p) for p in self.encoder.parameters()}
        trainable = self.trainable_parameters()
        return [p for p in trainable if id(p) in in_encoder], [p for p in trainable if id(p) not in in_encoder]

    def _epoch_train_records(self) -> list:
        """This epoch's training records, of every rank's bags when the ranks train on different bags."""
        if not self.engine.splits_bags or not torch.distributed.is_initialized():
            return self._train_records
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, self._train_records)
        return [record for records in gathered for record in records]

    def on_train_epoch_end(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None and not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step()

    # --- evaluation ---------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_looks = []
        same_random_state_on_every_rank(self.device)  # several processes: identical evaluation on every rank

    def validation_step(self, bag: Bag | NoBag, batch_idx: int) -> None:
        if isinstance(bag, NoBag):  # another rank's bag (strategy=ddp)
            return
        repeats = self.sampling.val_repeats if self.sampling.inference < 100 else 1
        result = evaluate_bag(self, bag, self.sampling.inference, passes=repeats)
        self._val_looks += [(batch_idx, (loss, p, q, result.label)) for loss, p, q in result.looks]  # each repeat counts once

    def every_rank_records(self, pairs: list) -> list:
        """This epoch's `(bag index, record)` pairs -> the records of every bag, in bag order."""
        return every_rank_items(pairs, self.evaluation_split)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        metrics = {}
        records = self._epoch_train_records()
        if records:
            losses, predicted, labels, terms = zip(*records, strict=True)
            metrics["train/loss"] = float(np.mean(losses))
            metrics["train/error"] = float(np.mean(np.asarray(predicted) != np.asarray(labels)))
            for name in terms[0]:
                metrics[f"train/loss_{name}"] = float(np.mean([t[name] for t in terms]))
        self._val_looks = self.every_rank_records(self._val_looks)
        metrics.update(validation_metrics(self._val_looks, self.num_classes))
        metrics["train/lr"] = self.optimizers().param_groups[0]["lr"]
        self.log_dict(log_values(metrics), on_epoch=True)
        scheduler = self.lr_schedulers()
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(metrics["val/loss"])

    @property
    def test_percents(self) -> list[float]:
        """Inference percentages evaluated at test: `sampling.inference` first, then the extras."""
        percents = [float(self.sampling.inference)]
        return percents + [float(p) for p in self.sampling.test_inference if float(p) not in percents]

    def on_test_epoch_start(self) -> None:
        self._test_records = {p: [] for p in self.test_percents}
        same_random_state_on_every_rank(self.device)

    def test_step(self, bag: Bag | NoBag, batch_idx: int) -> None:
        if isinstance(bag, NoBag):  # another rank's bag (strategy=ddp)
            return
        for percent, records in self._test_records.items():
            passes = count_test_passes(percent, bag.sampling_size, self.sampling.test_looks)
            records.append((batch_idx, evaluate_bag(self, bag, percent, passes)))

    def on_test_epoch_end(self) -> None:
        self._test_records = {percent: self.every_rank_records(pairs) for percent, pairs in self._test_records.items()}
        results: dict[str, float] = {}
        for i, (percent, records) in enumerate(self._test_records.items()):
            suffix = "" if i == 0 else f"@inference{percent:g}"
            for key, value in test_metrics(records, self.num_classes).items():
                results[key + suffix] = value
        self.log_dict(log_values(results))
