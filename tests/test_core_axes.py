"""The config axes (dataset x encoder x aggregator x method x engine) and the contracts between them."""

from __future__ import annotations

import csv
import json

import lightning as L
import numpy as np
import pytest
import torch

from mil_experiments import compose_experiment
from mil_experiments.api import compose_config
from mil_experiments.bag import Bag
from mil_experiments.config import validate
from mil_experiments.data.feature_files import write_feature_file
from mil_experiments.errors import ConfigError
from mil_experiments.evaluation import evaluate_bag
from mil_experiments.models.abmil import ABMIL
from mil_experiments.models.aggregator import Aggregator, AggregatorOutput
from mil_experiments.run import train_and_test
from tests.test_feature_bags import write_csvs

FAST = ["telemetry.count_saved_tensors=false"]


def fit(experiment, epochs: int = 1) -> L.Trainer:
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, enable_model_summary=False)
    trainer.fit(experiment.method, datamodule=experiment.datamodule)
    return trainer


def test_engine_acc_with_any_aggregator_from_the_command_line_names(tiny, tmp_path):
    results = train_and_test(compose_config(tiny + FAST + ["engine=acc", "alpha=10", "aggregator=abmil"]), tmp_path)
    assert results["engine"] == {"name": "acc", "alpha": 10.0, "acc_mode": "cached", "acc_keep_last_chunk": False,
                                 "skip_zero_grad_chunks": False, "skip_zero_grad_rows": False, "chunk_size": 1}
    assert results["aggregator"] == "abmil" and results["method"] == "abmil"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["engine"]["alpha"] == 10.0


def test_everyday_aliases_select_method_and_engine():
    acc = validate(compose_config(["method=abmil_acc", "alpha=25"]))
    assert acc.engine.name == "acc" and acc.engine.config.alpha == 25.0 and acc.method_class.__name__ == "Supervised"
    assert validate(compose_config(["method=abmil_acc"])).engine.config.alpha == 25.0  # engine=acc's own default
    sampled = validate(compose_config(["method=abmil_sampl", "sampling.train=25"]))
    assert sampled.engine.name == "full" and sampled.method_class.__name__ == "Sampled"
    both = validate(compose_config(["method=sampled", "engine=acc", "sampling.train=50", "engine.acc_mode=recompute"]))
    assert both.engine.config.acc_mode == "recompute"


@pytest.mark.parametrize("overrides, message", [
    (["alpha=25"], r"alpha=25 applies to engine=acc only \(this run has engine=full\)"),
    (["+engine.alpha=3"], r"engine\.alpha: Key 'alpha' not in 'Config'"),
    (["method=abmil_acc", "+method.acc_mode=recompute"], r"method\.acc_mode: Key 'acc_mode' not in 'Config'"),
    (["method=abmil_acc", "engine.acc_mode=fast"], r"engine\.acc_mode='fast': choose one of"),
    (["method.optimizer.lr=-1"], r"method\.optimizer\.lr=-1: must be > 0"),
    (["method.scheduler.name=step"], r"method\.scheduler\.name='step': choose one of"),
    (["method.binary_head=three"], r"method\.binary_head='three'"),
    (["selection.window=0"], r"selection\.window=0: must be >= 1"),
    (["+encoder.norm=batch"], r"encoder\.norm: Key 'norm' not in 'LeNetConfig'"),
])
def test_settings_the_chosen_axes_would_ignore_or_cannot_take_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(overrides))


class CLSOffsetAggregator(Aggregator):
    """Returns N + 1 scores, as a transformer that forgot to drop its CLS token would."""

    def __init__(self, in_dim: int, n_outputs: int) -> None:
        super().__init__(in_dim, n_outputs)
        self.head = torch.nn.Linear(in_dim, n_outputs)

    def forward(self, features, target=None, levels=None):
        scores = torch.softmax(torch.cat([features.new_zeros(1), features.sum(1)]), 0)  # (N + 1,)
        return AggregatorOutput(logits=self.head(features.mean(0)), instance_scores=scores)


def test_instance_scores_with_a_cls_entry_are_refused_not_scored():
    """Regression: an attention vector with a CLS entry in front gave a wrong instance AUC with no error."""
    experiment = compose_experiment(["dataset.train_bags=4", "dataset.val_bags=2", "dataset.test_bags=2", "dataset.bag_size=5"])
    experiment.method.aggregator = CLSOffsetAggregator(500, 1)
    bag = experiment.datamodule.test_set[0]
    with pytest.raises(ValueError, match=r"instance_scores of shape \(6,\) for a bag of 5 instances"):
        evaluate_bag(experiment.method, bag, 100, 1)
    output = AggregatorOutput(torch.zeros(1), maps={"cls_attention_layer0": torch.zeros(8, 6)})
    with pytest.raises(ValueError, match=r"map 'cls_attention_layer0' of shape \(8, 6\), expected \(\.\.\., 5\)"):
        output.check(5, 1, "transmil")


class BrokenAggregator(ABMIL):
    def __init__(self, in_dim: int, n_outputs: int, **settings) -> None:
        raise ValueError("a bug inside a model")


def test_a_bug_while_building_keeps_its_traceback_instead_of_becoming_a_config_error(tiny):
    with pytest.raises(ValueError, match="a bug inside a model") as caught:
        compose_experiment(tiny + ["aggregator._target_=tests.test_core_axes.BrokenAggregator"])
    assert not isinstance(caught.value, ConfigError)


@pytest.mark.parametrize("schedule, steps", [("modulo", [0, 3, 6]), ("every_k", [2, 5, 7])])
def test_bags_per_step_steps_the_optimizer_on_schedule_and_runs_the_after_step_hook(tiny, schedule, steps):
    experiment = compose_experiment(tiny + FAST + ["method.bags_per_step=3", f"method.step_schedule={schedule}"])
    method = experiment.method
    seen = []
    method.on_after_optimizer_step = lambda: seen.append(method.trainer.fit_loop.epoch_loop.batch_idx)
    fit(experiment)
    assert seen == steps  # 8 bags: modulo steps at batch_idx % 3 == 0, every_k after 3 bags and at the end


def test_gated_attention_trains_end_to_end_with_acc(tiny, tmp_path):
    results = train_and_test(compose_config(tiny + FAST + ["aggregator.gated=true", "method=abmil_acc", "alpha=50"]), tmp_path)
    assert 0.0 <= results["test"]["test/accuracy"] <= 1.0
    state = torch.load(tmp_path / "checkpoints/selected.ckpt", weights_only=False)["state_dict"]
    assert "aggregator.attention_u.0.weight" in state


def test_optimizer_and_schedulers_from_config(tiny, tmp_path):
    train_and_test(compose_config(tiny + FAST + ["method.scheduler.name=cosine", "method.optimizer.name=adamw",
                                                 "trainer.max_epochs=2"]), tmp_path / "cosine")
    rows = list(csv.DictReader((tmp_path / "cosine/metrics.csv").open()))
    assert float(rows[0]["train/lr"]) == pytest.approx(5e-5) and float(rows[1]["train/lr"]) == pytest.approx(2.5e-5)
    experiment = compose_experiment(tiny + FAST + ["method.scheduler.name=plateau", "method.scheduler.patience=0",
                                                   "method.scheduler.factor=0.5", "method.optimizer.lr=1e-6"])
    trainer = fit(experiment, epochs=3)  # lr 1e-6: the validation loss cannot improve by 1e-4, so lr halves
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(2.5e-7)
    assert isinstance(trainer.optimizers[0], torch.optim.Adam)


def test_trainable_parameters_are_declared_by_the_method(tiny):
    method = compose_experiment(tiny).method
    method.teacher = torch.nn.Linear(3, 3)  # a module that is not trained (an EMA teacher, say)
    optimizer = method.configure_optimizers()
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in [*method.encoder.parameters(), *method.aggregator.parameters()]}


def feature_cohort(root, classes: int, magnifications: list[float], slides: int = 36, dim: int = 6) -> None:
    """Slides whose class c raises feature c; 4 children per tile per magnification step."""
    rng = np.random.default_rng(0)
    labels, splits = {}, {}
    for i in range(slides):
        label = i % classes
        n = 3 + i % 4
        shift = 3.0 * np.eye(dim)[label]  # (dim,): class c raises feature c
        features = {m: (rng.standard_normal((n * 4**k, dim)) + shift).astype(np.float32) for k, m in enumerate(magnifications)}
        coords = {m: rng.integers(0, 1000, (n * 4**k, 2)) for k, m in enumerate(magnifications)}
        write_feature_file(root / f"s{i}.h5", features, coords, {"extractor": "test", "tile_size": 8})
        labels[f"s{i}"] = label
        splits[f"s{i}"] = ("train", "train", "train", "val", "test", "test")[(i // classes) % 6]  # every class in every split
    write_csvs(root, labels, splits)


def test_three_classes_end_to_end_on_feature_bags(tmp_path):
    feature_cohort(tmp_path, classes=3, magnifications=[10.0])
    overrides = ["dataset=feature_bags", f"dataset.root={tmp_path}", "encoder=identity", "logger=none",
                 "trainer.max_epochs=8", "trainer.enable_progress_bar=false", "method.optimizer.lr=1e-2", *FAST]
    results = train_and_test(compose_config(overrides), tmp_path / "run")
    assert results["test"]["test/accuracy"] >= 5 / 6  # well-separated classes
    assert 0 <= results["test"]["test/auc"] <= 1 and "test/instance_auc" not in results["test"]
    state = torch.load(tmp_path / "run/checkpoints/selected.ckpt", weights_only=False)["state_dict"]
    assert state["aggregator.classifier.weight"].shape == (3, 6)
    two_logits = compose_experiment(overrides[:-1] + ["method.binary_head=two_logits"])
    assert two_logits.method.n_outputs == 3  # binary_head only changes binary tasks


def test_binary_task_with_two_logits_trains(tiny, tmp_path):
    results = train_and_test(compose_config(tiny + FAST + ["method.binary_head=two_logits"]), tmp_path)
    assert 0 <= results["test"]["test/auc"] <= 1 and 0 <= results["test"]["test/instance_auc"] <= 1
    state = torch.load(tmp_path / "checkpoints/selected.ckpt", weights_only=False)["state_dict"]
    assert state["aggregator.classifier.weight"].shape[0] == 2


def test_multi_level_bags_are_refused_by_a_single_level_aggregator(tmp_path):
    feature_cohort(tmp_path, classes=2, magnifications=[5.0, 10.0])
    with pytest.raises(ConfigError, match=r"aggregator=abmil takes bags of one magnification; the bags have \[5\.0, 10\.0\]"):
        compose_experiment(["dataset=feature_bags", f"dataset.root={tmp_path}", "encoder=identity"])


def test_bag_level_evaluation_of_a_multi_level_bag_through_the_method():
    """Evaluation pools whole multi-level bags through `predict`, sampling consistent across levels."""
    experiment = compose_experiment(["dataset.train_bags=4", "dataset.val_bags=2", "dataset.test_bags=2", "dataset.bag_size=5"])
    seen = []

    class LevelAware(CLSOffsetAggregator):
        multi_level = True

        def forward(self, features, target=None, levels=None):
            seen.append(levels)
            return AggregatorOutput(logits=self.head(features.mean(0)), instance_scores=torch.softmax(features.sum(1), 0))

    from mil_experiments.bag import LevelLayout

    experiment.method.aggregator = LevelAware(500, 1)
    image_bag = experiment.datamodule.test_set[0]
    images = torch.cat([image_bag.instances[:2], image_bag.instances[:1].repeat(8, 1, 1, 1)])  # (10, C, H, W)
    bag = Bag(images, image_bag.label, "two_level", instance_labels=torch.zeros(10, dtype=torch.long),
              levels=LevelLayout((5.0, 10.0), (2, 8)))
    result = evaluate_bag(experiment.method, bag, 50, 3)
    assert all(layout == LevelLayout((5.0, 10.0), (1, 4)) for layout in seen)
    assert all(len(rows) == 5 and rows[1:].tolist() in ([2, 3, 4, 5], [6, 7, 8, 9]) for rows, _, _ in result.passes)
