"""QMNIST-bags: the real loader on tiny fake QMNIST files, protocol property by property."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mil_experiments.data.qmnist_bags import QMNISTBagsDataModule, split_validation
from mil_experiments.errors import ConfigError, DataError

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset" / "qmnist_bags.yaml"
TRAIN_PER_DIGIT, TEST_PER_DIGIT = 40, 31
BAG_SIZE, KEY_PERCENT = 20, 10.0
N_BAGS = {"train": 6, "val": 4, "test": 5}


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an array in the big-endian IDX format of the QMNIST files (uint8 or int32)."""
    type_code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[array.dtype]
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def write_fake_qmnist(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Fake QMNIST files in torchvision's layout; returns the digits of each file, in file order."""
    rng = np.random.default_rng(seed)
    raw = root / "QMNIST" / "raw"
    raw.mkdir(parents=True)
    digits = {}
    for what, per_digit in (("train", TRAIN_PER_DIGIT), ("test", TEST_PER_DIGIT)):
        d = rng.permutation(np.repeat(np.arange(10), per_digit)).astype(np.int32)  # (P,)
        labels = np.zeros((len(d), 8), dtype=np.int32)  # (P, 8): digit, writer id, ...
        labels[:, 0] = d
        labels[:, 2] = np.arange(len(d))
        write_idx(raw / f"qmnist-{what}-images-idx3-ubyte", rng.integers(0, 256, (len(d), 28, 28), dtype=np.uint8))
        write_idx(raw / f"qmnist-{what}-labels-idx2-int", labels)
        digits[what] = d
    return digits


def make(root: Path, seed: int = 0, **overrides) -> QMNISTBagsDataModule:
    config = QMNISTBagsDataModule.Config(
        root=str(root),
        bag_size=BAG_SIZE,
        key_percent=KEY_PERCENT,
        train_bags=N_BAGS["train"],
        val_bags=N_BAGS["val"],
        test_bags=N_BAGS["test"],
    )
    datamodule = QMNISTBagsDataModule(dataclasses.replace(config, **overrides), seed=seed)
    datamodule.setup("fit")
    return datamodule


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("qmnist")
    return root, write_fake_qmnist(root)


@pytest.fixture(scope="module")
def built(fake) -> QMNISTBagsDataModule:
    return make(fake[0])


def splits(dm: QMNISTBagsDataModule) -> dict:
    return {"train": dm.train_set, "val": dm.val_set, "test": dm.test_set}


def test_pools_come_from_the_right_files_and_are_disjoint(built, fake):
    _, digits = fake
    val, test = built.pool_indices["val"], built.pool_indices["test"]
    assert len(np.intersect1d(val, test)) == 0
    assert np.array_equal(np.union1d(val, test), np.arange(len(digits["test"])))
    assert len(built.pool_indices["train"]) == len(digits["train"])
    # train bags index the training file, val and test bags the test file
    assert built.train_set.pool.shape[0] == len(digits["train"])
    assert built.val_set.pool.data_ptr() == built.test_set.pool.data_ptr()
    for name in ("val", "test"):
        used = np.concatenate([splits(built)[name][i].instance_ids.numpy() for i in range(N_BAGS[name])])
        assert np.isin(used, built.pool_indices[name]).all()


@pytest.mark.parametrize("selection", ["random", "file_order"])
def test_validation_is_one_third_of_the_test_set_per_digit(fake, selection):
    digits = fake[1]["test"]
    val, test = split_validation(digits, selection, np.random.default_rng(0))
    for d in range(10):
        members = np.flatnonzero(digits == d)
        in_val = np.intersect1d(val, members)
        assert len(in_val) == round(TEST_PER_DIGIT / 3)
        if selection == "file_order":
            assert np.array_equal(in_val, members[: len(in_val)])
    assert len(np.intersect1d(val, test)) == 0 and len(val) + len(test) == len(digits)


def test_random_validation_differs_across_seeds(fake):
    digits = fake[1]["test"]
    first, _ = split_validation(digits, "random", np.random.default_rng(0))
    second, _ = split_validation(digits, "random", np.random.default_rng(1))
    assert not np.array_equal(first, second)


def test_bags_have_fixed_size_key_counts_and_half_positive(built, fake):
    _, digits = fake
    n_key = math.ceil(BAG_SIZE * KEY_PERCENT / 100)
    for name, dataset in splits(built).items():
        assert len(dataset) == N_BAGS[name]
        labels = []
        for i in range(len(dataset)):
            bag = dataset[i]
            assert bag.size == BAG_SIZE
            source = digits["train" if name == "train" else "test"]
            assert torch.equal(bag.instance_labels, torch.as_tensor(source[bag.instance_ids.numpy()] == 9).long())
            assert int(bag.instance_labels.sum()) == (n_key if bag.label == 1 else 0)
            labels.append(int(bag.label))
        assert sum(labels) == math.ceil(N_BAGS[name] / 2)


def test_no_image_twice_in_a_bag(built):
    for dataset in splits(built).values():
        for i in range(len(dataset)):
            ids = dataset[i].instance_ids
            assert len(torch.unique(ids)) == len(ids)


def test_instances_are_84px_and_normalised_like_the_original(built):
    bag = built.train_set[0]
    assert built.instance_shape == (1, 84, 84)
    assert bag.instances.shape == (BAG_SIZE, 1, 84, 84) and bag.instances.dtype == torch.float32
    pixels = built.train_set.pool[bag.instance_ids].float() / 255  # (N, 1, 28, 28)
    resized = torch.nn.functional.interpolate(pixels, size=(84, 84), mode="bilinear", align_corners=False)
    torch.testing.assert_close(bag.instances, (resized - 0.135) / 0.305, rtol=1e-5, atol=1e-5)


def test_same_seed_same_bags_other_seed_other_bags(built, fake):
    again, other = make(fake[0], seed=0), make(fake[0], seed=1)
    for i in range(N_BAGS["train"]):
        assert torch.equal(built.train_set[i].instances, again.train_set[i].instances)
    assert not all(
        torch.equal(built.train_set[i].instance_ids, other.train_set[i].instance_ids) for i in range(N_BAGS["train"])
    )
    assert not np.array_equal(built.pool_indices["val"], other.pool_indices["val"])


def test_dataloader_yields_bags(built):
    bag = next(iter(built.train_dataloader()))
    assert bag.instances.shape == (BAG_SIZE, 1, 84, 84)


def test_missing_root_says_what_layout_is_expected(tmp_path):
    with pytest.raises(DataError) as error:
        make(tmp_path / "nowhere")
    message = str(error.value)
    assert "\n" not in message
    assert "qmnist-train-images-idx3-ubyte not found" in message
    assert "<root>/QMNIST/raw/" in message and "dataset.download=true" in message


def test_malformed_file_is_named(tmp_path):
    write_fake_qmnist(tmp_path)
    bad = tmp_path / "QMNIST" / "raw" / "qmnist-test-labels-idx2-int"
    bad.write_bytes(b"\xff\xff\xff\xff garbage")
    with pytest.raises(
        DataError, match=r"qmnist-test-labels-idx2-int: not a readable IDX file .*expected torchvision's QMNIST layout"
    ):
        make(tmp_path)


def test_labels_that_do_not_match_the_images_are_refused(tmp_path):
    write_fake_qmnist(tmp_path)
    write_idx(tmp_path / "QMNIST" / "raw" / "qmnist-train-labels-idx2-int", np.zeros((3, 8), dtype=np.int32))
    with pytest.raises(DataError, match="expected one label row per image"):
        make(tmp_path)


def test_bad_config_values_are_refused(fake):
    with pytest.raises(ConfigError, match="dataset.root is not set"):
        QMNISTBagsDataModule(QMNISTBagsDataModule.Config(), seed=0)
    with pytest.raises(ConfigError, match="dataset.val_selection=first"):
        make(fake[0], val_selection="first")
    with pytest.raises(ConfigError, match=r"dataset \(val pool of 100 QMNIST images\)"):
        make(fake[0], bag_size=95)


def test_yaml_matches_the_schema_at_paper_scale():
    raw = OmegaConf.load(CONF)
    assert raw.pop("_target_") == "mil_experiments.data.qmnist_bags.QMNISTBagsDataModule"
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(QMNISTBagsDataModule.Config), raw))
    assert {f.name for f in dataclasses.fields(config)} == set(raw.keys())
    assert (config.train_bags, config.val_bags, config.test_bags) == (100, 30, 60)
    assert (config.bag_size, config.key_percent, config.image_size, config.key_digit) == (500, 5.0, 84, 9)
    assert (config.mean, config.std, config.allow_repeats) == (0.135, 0.305, False)
