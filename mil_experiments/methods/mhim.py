"""`method=mhim`: masked hard-instance mining with a momentum teacher (MHIM-MIL v1, ICCV 2023).

One training step on a bag of features Z (N, D) (v1 `main.py::train_loop`):

    a, z_t = teacher(Z)                 no grad, full bag, train mode (v1; `teacher_mode=eval`)
    kept = complement of the union of the random / low / high-attention masks of a
    out = student(Z[kept])              the student sees only the kept instances, in bag order
    L = cls_alpha * (bag loss + the aggregator's terms) + cl_alpha * SoftCE(z_s / tau_s, z_t / tau_t)
    step; then teacher <- m teacher + (1 - m) student (every parameter)

Teacher and student are the same aggregator (`aggregator=abmil_mhim | transmil | dsmil`);
the attention that drives the masks is ABMIL's / DSMIL's instance attention, or
TransMIL's cls row of layer 0 (`attn_layer`) per head, fused by `msa_fusion`. beta_h
decays by cosine to 0 per iteration (`mrh_sche`), the momentum rises by cosine to
`mm_final` (`mm_sche`), both over `schedule_epochs` x batches per epoch iterations.

Two stages: the teacher is initialised from a stage-1 run of the plain aggregator
(`teacher_init=<run folder or its selected.ckpt>`: every aggregator weight, and the
encoder's when it has any), the student's first fc too with `init_stu_type=fc`
(`all`: every weight). Stage 1 is the same command with `method=abmil` (same aggregator, seed, fold).

Validation and test evaluate the student (selection on its metrics); the teacher's are
logged beside them as `val/teacher_*` and `test/teacher_*`.

Masked instances are not in the student's graph, so their rows of dL/dZ are exactly
zero (tested). With an encoder in the loop, `engine=acc engine.skip_zero_grad_rows=true`
re-encodes only the kept rows, gathered into dense chunks, so a step costs a no-grad forward
of the bag plus a forward-backward of the kept rows (exact: tested in float64 against the
full bag; docs/mhim.md has the measured cost); `skip_zero_grad_chunks` skips a chunk only
when all its rows are masked. Recipes: `experiment=mhim_<abmil|transmil>_<c16|tcga>` and
`scripts/mhim_two_stage.py`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from mil_experiments.bag import Bag
from mil_experiments.data.bag_order import NoBag
from mil_experiments.engine import HeadResult
from mil_experiments.errors import ConfigError
from mil_experiments.evaluation import evaluate_bag, test_metrics, validation_metrics
from mil_experiments.methods.base import MILMethod
from mil_experiments.methods.fc_init import first_fc
from mil_experiments.methods.mhim_masks import FUSIONS, KEPT_ORDERS, MaskRatios, mhim_masks
from mil_experiments.methods.mhim_teacher import (
    ENCODER_PREFIX,
    consistency_loss,
    cosine_value,
    ema_update,
    load_exactly,
    stage_one_state,
)
from mil_experiments.methods.optimization import OptimizerConfig, SchedulerConfig
from mil_experiments.metrics import log_values
from mil_experiments.models.abmil_mhim import ABMILMHIM
from mil_experiments.models.aggregator import AggregatorOutput
from mil_experiments.models.dsmil import DSMIL
from mil_experiments.models.transmil import TransMIL

AGGREGATORS = {ABMILMHIM: "abmil_mhim", TransMIL: "transmil", DSMIL: "dsmil"}
ATTENTION_LAYERS = ("0", "1", "last")
TEACHER_MODES = ("train", "eval")
STUDENT_INITS = ("none", "fc", "all")


class MHIM(MILMethod):
    """A student trained on the teacher-masked bag, a momentum teacher, and their consistency loss."""

    @dataclass
    class Config(MILMethod.Config):
        name: str = "mhim"
        optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=2e-4, weight_decay=1e-5))
        scheduler: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(name="cosine"))
        binary_head: str = "two_logits"
        cls_alpha: float = 1.0
        cl_alpha: float = 0.0
        temp_teacher: float = 0.1
        temp_student: float = 1.0
        mask_ratio: float = 0.0  # beta_r: random
        mask_ratio_l: float = 0.0  # beta_l: low attention
        mask_ratio_h: float = 0.0  # beta_h: high attention
        mask_ratio_hr: float = 1.0  # rho: share of the top ceil(N beta_h / rho) masked at random
        mrh_sche: bool = False  # beta_h by cosine to 0, per iteration
        msa_fusion: str = "vote"  # multi-head attention: vote | mean
        kept_order: str = "v1"  # the student's rows: v1 (its set-difference order) | ascending (named deviation)
        attn_layer: str = "0"  # TransMIL layer whose cls row drives the masks: 0 | 1 | last
        mm: float = 0.9999  # EMA momentum
        mm_final: float = 1.0
        mm_sche: bool = False  # momentum by cosine to mm_final, per iteration
        schedule_epochs: int | None = None  # horizon of both schedules (v1 num_epoch); null = trainer.max_epochs
        teacher_mode: str = "train"  # the teacher's forward in train mode (v1: its dropout active) or eval
        teacher_init: str | None = None  # stage-1 run folder or checkpoint
        allow_random_teacher: bool = False  # without teacher_init: a random teacher (v1's silent bug) only if set
        init_stu_type: str = "none"  # none | fc (v1 recipes) | all

        def check(self) -> None:
            super().check()
            if self.init_fc_from is not None:
                raise ConfigError("method.init_fc_from: not for method=mhim; its student's fc comes from method.teacher_init"
                                  " with method.init_stu_type=fc")
            for key in ("mask_ratio", "mask_ratio_l", "mask_ratio_h"):
                if not 0 <= getattr(self, key) < 1:
                    raise ConfigError(f"method.{key}={getattr(self, key):g}: must be in [0, 1)")
            if not 0 < self.mask_ratio_hr <= 1:
                raise ConfigError(f"method.mask_ratio_hr={self.mask_ratio_hr:g}: must be in (0, 1]")
            if not 0 <= self.mm <= 1 or not 0 <= self.mm_final <= 1:
                raise ConfigError(f"method.mm={self.mm:g}, mm_final={self.mm_final:g}: must be in [0, 1]")
            if self.temp_teacher <= 0 or self.temp_student <= 0:
                raise ConfigError("method.temp_teacher and method.temp_student must be > 0")
            for key, choices in (("msa_fusion", FUSIONS), ("kept_order", KEPT_ORDERS), ("attn_layer", ATTENTION_LAYERS),
                                 ("teacher_mode", TEACHER_MODES), ("init_stu_type", STUDENT_INITS)):
                if str(getattr(self, key)) not in choices:
                    raise ConfigError(f"method.{key}={getattr(self, key)!r}: choose one of {choices}")
            if self.teacher_init is None and not self.allow_random_teacher:
                raise ConfigError("method.teacher_init is not set: give the stage-1 run folder (the same command with method=abmil,"
                                  " or experiment=mhim_<recipe>_baseline; scripts/mhim_two_stage.py runs both)"
                                  ", or method.allow_random_teacher=true for a random teacher")
            if self.teacher_init is None and self.init_stu_type != "none":
                raise ConfigError(f"method.init_stu_type={self.init_stu_type} needs method.teacher_init")

    @classmethod
    def check_aggregator(cls, config: Config, aggregator_name: str, aggregator_class: type) -> None:
        """MHIM masks by the attention of its three aggregators (and their first fc); any other is refused."""
        if aggregator_class not in AGGREGATORS:
            raise ConfigError(f"method=mhim with aggregator={aggregator_name}: MHIM masks instances by the attention of"
                              f" aggregator={'|'.join(AGGREGATORS.values())} only; choose one of those")

    def __init__(self, config: Config, encoder, aggregator, engine, data, sampling=None) -> None:
        self.check_aggregator(config, AGGREGATORS.get(type(aggregator), type(aggregator).__name__), type(aggregator))
        super().__init__(config, encoder, aggregator, engine, data, sampling)
        if config.teacher_init is not None:
            self._initialise_from_stage_one(config)
        if config.init_stu_type == "fc" and first_fc(aggregator) is None:
            raise ConfigError(f"method.init_stu_type=fc: aggregator={AGGREGATORS[type(aggregator)]} has no first fc; use none or all")
        self.teacher = copy.deepcopy(aggregator)
        self.teacher.requires_grad_(False)
        if config.teacher_init is not None:
            self.teacher.load_state_dict(self._stage_one)
            self._init_student(config)
            del self._stage_one
        self._iteration = 0
        self._teacher_embedding: torch.Tensor | None = None
        self._val_teacher_looks: list = []
        self._test_teacher_records: list = []
        self.last_kept: int | None = None

    # --- stage 2 initialisation --------------------------------------------------------
    def _initialise_from_stage_one(self, config: Config) -> None:
        where = f"method.teacher_init={config.teacher_init}"
        weights = stage_one_state(config.teacher_init)
        load_exactly(copy.deepcopy(self.aggregator), weights, where)  # refuse a mismatch before touching anything
        self._stage_one = weights
        if any(p.requires_grad for p in self.encoder.parameters()):
            load_exactly(self.encoder, stage_one_state(config.teacher_init, ENCODER_PREFIX), where)

    def _init_student(self, config: Config) -> None:
        if config.init_stu_type == "all":
            self.aggregator.load_state_dict(self.teacher.state_dict())
        elif config.init_stu_type == "fc":
            first_fc(self.aggregator).load_state_dict(first_fc(self.teacher).state_dict())

    # --- MILMethod hooks ---------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The encoder's and the student's; the teacher only follows by EMA."""
        return [p for m in (self.encoder, self.aggregator) for p in m.parameters() if p.requires_grad]

    def _total_iterations(self) -> int:
        epochs = self.config.schedule_epochs or (self.trainer.max_epochs if self._trainer is not None else 1)
        per_epoch = self.trainer.num_training_batches if self._trainer is not None else 1
        return int(epochs * per_epoch)

    def current_ratios(self) -> MaskRatios:
        """This iteration's beta_r, beta_l, beta_h (cosine-decayed with `mrh_sche`) and rho."""
        c = self.config
        high = cosine_value(c.mask_ratio_h, 0.0, self._iteration, self._total_iterations()) if c.mrh_sche else c.mask_ratio_h
        return MaskRatios(c.mask_ratio, c.mask_ratio_l, high, c.mask_ratio_hr)

    def current_momentum(self) -> float:
        c = self.config
        return cosine_value(c.mm, c.mm_final, self._iteration, self._total_iterations()) if c.mm_sche else c.mm

    def mining_attention(self, output: AggregatorOutput) -> torch.Tensor:
        """(N,) or (H, N): the teacher's attention that drives the masks."""
        if isinstance(self.teacher, TransMIL):
            layer = "1" if self.config.attn_layer == "last" else self.config.attn_layer
            return output.maps[f"cls_attention_layer{layer}"]
        return output.instance_scores

    def loss_terms(self, output: AggregatorOutput, bag: Bag) -> dict[str, torch.Tensor]:
        """`bag` (and the aggregator's terms) times cls_alpha, and `consistency` times cl_alpha."""
        c = self.config
        terms = {k: c.cls_alpha * v for k, v in super().loss_terms(output, bag).items()}
        if c.cl_alpha > 0 and self._teacher_embedding is not None:
            terms["consistency"] = c.cl_alpha * consistency_loss(output.embedding, self._teacher_embedding,
                                                                 c.temp_student, c.temp_teacher)
        return terms

    def head_for(self, bag: Bag):
        """features -> teacher on all rows (no grad) -> masks -> student on the kept rows -> loss."""
        student_head = super().head_for(bag)

        def head(features: torch.Tensor) -> HeadResult:
            with torch.no_grad():
                self.teacher.train(self.config.teacher_mode == "train")
                teacher_output = self.teacher(features.detach(), target=None, levels=bag.levels)  # on all N rows
            self._teacher_embedding = teacher_output.embedding
            kept, _ = mhim_masks(self.mining_attention(teacher_output), self.current_ratios(), self.config.msa_fusion,
                                 kept_order=self.config.kept_order)  # (K,)
            if kept.numel() == 0:  # the union covered the whole bag (tiny bags): keep one instance at random
                kept = torch.randint(features.shape[0], (1,), device=features.device)
            self.last_kept = int(kept.numel())
            result = student_head(features[kept])  # (K, D): masked rows get exactly zero gradient
            self._teacher_embedding = None
            return result

        return head

    def training_step(self, bag: Bag, batch_idx: int) -> None:
        self._iteration = self.current_epoch * self.trainer.num_training_batches + batch_idx
        super().training_step(bag, batch_idx)

    def on_after_optimizer_step(self) -> None:
        """The teacher follows the student by EMA, every optimizer step."""
        ema_update(self.teacher, self.aggregator, self.current_momentum())

    # --- the teacher's metrics beside the student's ------------------------------------
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val_teacher_looks = []

    def validation_step(self, bag: Bag | NoBag, batch_idx: int) -> None:
        super().validation_step(bag, batch_idx)
        if isinstance(bag, NoBag):
            return
        result = evaluate_bag(_TeacherView(self), bag, 100.0, passes=1)
        self._val_teacher_looks += [(batch_idx, (loss, p, q, result.label)) for loss, p, q in result.looks]

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.trainer.sanity_checking:
            return
        self._val_teacher_looks = self.every_rank_records(self._val_teacher_looks)
        if not self._val_teacher_looks:
            return
        metrics = validation_metrics(self._val_teacher_looks, self.num_classes)
        self.log_dict(log_values({k.replace("val/", "val/teacher_"): v for k, v in metrics.items()}), on_epoch=True)

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._test_teacher_records = []

    def test_step(self, bag: Bag | NoBag, batch_idx: int) -> None:
        super().test_step(bag, batch_idx)
        if isinstance(bag, NoBag):
            return
        self._test_teacher_records.append((batch_idx, evaluate_bag(_TeacherView(self), bag, 100.0, passes=1)))

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._test_teacher_records = self.every_rank_records(self._test_teacher_records)
        metrics = test_metrics(self._test_teacher_records, self.num_classes)
        self.log_dict(log_values({k.replace("test/", "test/teacher_"): v for k, v in metrics.items()}))


class _TeacherView:
    """What `evaluate_bag` needs, with the teacher in the student's place."""

    def __init__(self, method: MHIM) -> None:
        self.method = method
        self.num_classes = method.num_classes

    def encode_for_evaluation(self, bag: Bag) -> Bag:
        return self.method.encode_for_evaluation(bag)

    def predict(self, bag: Bag) -> AggregatorOutput:
        m = self.method
        return m.teacher(bag.instances, target=None, levels=bag.levels).check(bag.size, m.n_outputs, "mhim teacher")

    def evaluation_loss(self, output: AggregatorOutput, bag: Bag) -> torch.Tensor:
        return self.method.evaluation_loss(output, bag)
