"""Within-bag sampling (ABMIL-SAMPL) and sampled inference, as the published code does them."""

from __future__ import annotations

import pytest
import torch

from mil_experiments import compose_experiment
from mil_experiments.api import compose_config
from mil_experiments.errors import ConfigError
from mil_experiments.evaluation import evaluate_bag
from mil_experiments.run import train_and_test
from mil_experiments.sampling import count_test_passes, draw_positions, sample_size


def test_sample_size_and_test_passes():
    assert sample_size(25, 10) == 3  # ceil(2.5)
    assert sample_size(3, 50) == 2  # ceil(1.5)
    assert count_test_passes(25, 10, looks=10) == 34  # ceil(10 * 10 / 3)
    assert count_test_passes(100, 10, looks=10) == 1


def test_positions_are_drawn_with_replacement_each_time():
    torch.manual_seed(0)
    draws = [draw_positions(50, 4) for _ in range(200)]
    assert all(d.shape == (2,) for d in draws)
    assert any(d[0] == d[1] for d in draws)  # repeats happen
    assert len({tuple(d.tolist()) for d in draws}) > 5  # a new sample every time
    assert draw_positions(100, 4) is None


def test_abmil_sampl_trains_on_samples_of_the_bag(tiny):
    experiment = compose_experiment(tiny + ["method=abmil_sampl", "sampling.train=25"])
    method = experiment.method
    sizes = []
    original = method.head_for

    def recording(bag):
        sizes.append(bag.size)
        return original(bag)

    method.head_for = recording
    import lightning as L

    L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
              num_sanity_val_steps=0, enable_model_summary=False).fit(method, datamodule=experiment.datamodule)
    assert sizes == [2] * 8  # ceil(25% of 6)


def test_abmil_sampl_without_a_training_percent_is_refused(tiny):
    with pytest.raises(ConfigError, match=r"method=abmil_sampl trains on within-bag samples: set sampling.train below 100"):
        compose_experiment(tiny + ["method=abmil_sampl"])


def test_training_sampling_with_another_method_is_refused(tiny):
    with pytest.raises(ConfigError, match=r"sampling.train=25 applies to within-bag sampling only \(method=sampled or abmil_sampl; method=abmil_acc\)"):
        compose_experiment(tiny + ["method=abmil_acc", "sampling.train=25"])


def test_sampled_test_makes_about_ten_looks_per_instance_and_votes(tiny):
    experiment = compose_experiment(tiny + ["sampling.inference=50"])
    bag = experiment.datamodule.test_set[0]
    result = evaluate_bag(experiment.method, bag, 50, count_test_passes(50, bag.size, 10))
    assert len(result.passes) == 20  # ceil(10 * 6 / 3)
    assert all(len(positions) == 3 for positions, _, _ in result.passes)
    votes = [p for _, _, p in result.passes]
    assert result.predicted == int(sum(votes) >= len(votes) / 2)


def test_every_test_inference_percent_is_reported(tiny, tmp_path):
    results = train_and_test(compose_config(tiny + ["sampling.test_inference=[25,100]", "sampling.val_repeats=2"]), tmp_path)
    for key in ("test/accuracy", "test/instance_auc", "test/accuracy@inference25", "test/instance_auc@inference25"):
        assert 0.0 <= results["test"][key] <= 1.0
    assert results["sampling"]["test_inference"] == [100.0, 25.0]
