"""The `Bag` record: multi-level bags stay consistent when subset, or are refused."""

from __future__ import annotations

import pytest
import torch

from mil_experiments.bag import Bag, LevelLayout


def two_level_bag() -> Bag:
    """3 tiles at 5x, their 4 children each at 10x (depth-first), instance id = row."""
    rows = torch.arange(3 + 12)
    return Bag(
        instances=rows.float()[:, None].repeat(1, 2),  # (15, 2)
        label=torch.tensor(1),
        bag_id="slide",
        instance_labels=(rows % 2),
        instance_ids=rows,
        coords=torch.stack([rows, rows], 1),
        levels=LevelLayout((5.0, 10.0), (3, 12)),
    )


def test_subset_of_a_multi_level_bag_keeps_the_children_of_the_chosen_tiles():
    """Regression: a sampled multi-level bag kept its stale levels (2 instances next to levels of 3 and 12)."""
    bag = two_level_bag()
    sample = bag.subset(torch.tensor([2, 0]))
    assert sample.levels == LevelLayout((5.0, 10.0), (2, 8))
    assert sample.instance_ids.tolist() == [2, 0, 3 + 8, 3 + 9, 3 + 10, 3 + 11, 3 + 0, 3 + 1, 3 + 2, 3 + 3]
    assert torch.equal(sample.instances[:, 0].long(), sample.instance_ids)
    assert torch.equal(sample.coords[:, 0], sample.instance_ids) and torch.equal(sample.instance_labels, sample.instance_ids % 2)
    assert sample.level(1).instance_ids.tolist() == [11, 12, 13, 14, 3, 4, 5, 6]
    assert bag.sampling_size == 3


def test_subset_of_unaligned_levels_is_refused_with_the_bag_named():
    bag = two_level_bag()
    bag.levels = LevelLayout((5.0, 10.0), (4, 11))
    with pytest.raises(ValueError, match=r"bag slide: cannot subset its levels: level 10.0x has 11 rows"):
        bag.subset(torch.tensor([0]))


def test_levels_must_cover_the_instances():
    with pytest.raises(ValueError, match="levels hold 5 rows but there are 15 instances"):
        Bag(torch.zeros(15, 2), torch.tensor(0), "b", levels=LevelLayout((5.0, 10.0), (1, 4)))


def test_single_level_subset_and_encoded_copy():
    bag = Bag(torch.arange(6.0)[:, None], torch.tensor(0), "b", instance_ids=torch.arange(6))
    sample = bag.subset(torch.tensor([5, 5, 1]))
    assert sample.instance_ids.tolist() == [5, 5, 1] and sample.levels is None
    encoded = bag.with_instances(torch.zeros(6, 3))
    assert encoded.instances.shape == (6, 3) and encoded.bag_id == "b"
    with pytest.raises(ValueError, match="2 rows given for 6 instances"):
        bag.with_instances(torch.zeros(2, 3))


def test_a_multi_level_bag_moves_to_a_device_as_lightning_moves_batches():
    """Lightning copies a batch's dataclasses field by field (a frozen LevelLayout made ZoomMIL runs fail)."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    layout = LevelLayout((5.0, 10.0), (2, 8))
    bag = Bag(instances=torch.randn(10, 3), label=torch.tensor(1), bag_id="b", levels=layout)
    moved = move_data_to_device(bag, torch.device("cpu"))
    assert moved.levels == layout and torch.equal(moved.instances, bag.instances)
