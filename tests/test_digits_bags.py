"""The digits-bags protocol, property by property."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mil_experiments.data.bag_protocol import key_instances_per_bag
from mil_experiments.data.digits_bags import DigitsBagsDataModule


def build(seed: int = 0, **overrides) -> DigitsBagsDataModule:
    dm = DigitsBagsDataModule(DigitsBagsDataModule.Config(**overrides), seed=seed)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def dm() -> DigitsBagsDataModule:
    return build(seed=0, bag_size=20, key_percent=12, train_bags=40, val_bags=10, test_bags=20)


def test_key_instance_count_is_ceil():
    assert key_instances_per_bag(50, 5) == 3
    assert key_instances_per_bag(500, 5) == 25
    assert key_instances_per_bag(20, 12) == math.ceil(2.4)


def test_fixed_bag_size_and_shape(dm):
    for split in (dm.train_set, dm.val_set, dm.test_set):
        for bag in split:
            assert bag.instances.shape == (20, 1, 28, 28)


def test_key_instances_per_positive_bag_and_none_in_negatives(dm):
    for split in (dm.train_set, dm.val_set, dm.test_set):
        for bag in split:
            n_key = int(bag.instance_labels.sum())
            assert n_key == (3 if int(bag.label) == 1 else 0)


def test_key_instances_are_nines_and_negatives_are_not(dm):
    for split in (dm.train_set, dm.val_set, dm.test_set):
        for bag in split:
            digits = split.targets[bag.instance_ids]  # (N,)
            assert torch.equal(digits == 9, bag.instance_labels == 1)


def test_half_of_the_bags_positive(dm):
    for split in (dm.train_set, dm.val_set, dm.test_set):
        labels = [int(b.label) for b in split]
        assert sum(labels) == math.ceil(len(labels) / 2)


def test_no_image_twice_in_one_bag(dm):
    for split in (dm.train_set, dm.val_set, dm.test_set):
        for bag in split:
            assert len(set(bag.instance_ids.tolist())) == bag.size


def test_pools_are_disjoint():
    from sklearn.datasets import load_digits

    from mil_experiments.data.bag_protocol import split_pool_per_class

    targets = load_digits().target
    pools = split_pool_per_class(targets, (0.5, 0.2, 0.3), np.random.default_rng(0))
    assert sum(len(p) for p in pools) == len(targets)
    assert not set(pools[0]) & set(pools[1]) and not set(pools[0]) & set(pools[2]) and not set(pools[1]) & set(pools[2])
    for p in pools:  # every digit is in every pool
        assert set(targets[p]) == set(range(10))


def test_pool_images_do_not_overlap_across_splits(dm):
    train = dm.train_set.pool.flatten(1)
    test = dm.test_set.pool.flatten(1)
    # No test image is pixel-identical to a train image drawn from another pool position.
    distances = torch.cdist(test[:50], train)
    assert (distances.min(1).values > 0).float().mean() > 0.9


def test_same_seed_same_bags_other_seed_other_bags():
    a, b, c = build(seed=1), build(seed=1), build(seed=2)
    assert all(torch.equal(x.instances, y.instances) for x, y in zip(a.train_set, b.train_set, strict=True))
    assert not all(torch.equal(x.instances, y.instances) for x, y in zip(a.train_set, c.train_set, strict=True))


def test_images_are_upsampled_and_normalised(dm):
    assert dm.instance_shape == (1, 28, 28)
    pixels = dm.train_set.pool
    assert abs(float(pixels.mean())) < 0.05 and abs(float(pixels.std()) - 1) < 0.05
    small = build(image_size=16)
    assert small.train_set[0].instances.shape[-2:] == (16, 16)
