"""Imagenette-bags: the real loader on a tiny fake Imagenette folder, protocol property by property."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from mil_experiments.data.imagenette_augmentation import build_augmentation
from mil_experiments.data.imagenette_bags import ImagenetteBagsDataModule
from mil_experiments.errors import ConfigError, DataError

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset" / "imagenette_bags.yaml"
GOLF = "n03445777"
CLASSES = ("n01440764", "n02102040", GOLF)
TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 5
BAG_SIZE, KEY_PERCENT = 10, 30.0
N_BAGS = {"train": 4, "val": 2, "test": 3}


def write_fake_imagenette(root: Path, seed: int = 0) -> None:
    """A fast.ai-style folder: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, odd sizes, some grayscale."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for wnid in CLASSES:
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = rng.integers(30, 70, size=2)
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                image = Image.fromarray(pixels).convert("L" if i == 0 else "RGB")
                image.save(folder / f"{wnid}_{i:03d}.JPEG", "JPEG")


def make(root: Path, seed: int = 0, **overrides) -> ImagenetteBagsDataModule:
    config = ImagenetteBagsDataModule.Config(
        root=str(root),
        bag_size=BAG_SIZE,
        key_percent=KEY_PERCENT,
        train_bags=N_BAGS["train"],
        val_bags=N_BAGS["val"],
        test_bags=N_BAGS["test"],
    )
    datamodule = ImagenetteBagsDataModule(dataclasses.replace(config, **overrides), seed=seed)
    datamodule.setup("fit")
    return datamodule


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("imagenette")
    write_fake_imagenette(path)
    return path


@pytest.fixture(scope="module")
def built(root) -> ImagenetteBagsDataModule:
    return make(root)


def splits(dm: ImagenetteBagsDataModule) -> dict:
    return {"train": dm.train_set, "val": dm.val_set, "test": dm.test_set}


def bag_files(dataset, index: int) -> list[Path]:
    return [dataset.files[i] for i in dataset[index].instance_ids.tolist()]


def test_pools_are_disjoint_and_test_is_the_val_folder(built, root):
    files = {name: set(paths) for name, paths in built.split_files.items()}
    assert not files["train"] & files["val"]
    assert files["train"] | files["val"] == set((root / "train").glob("*/*.JPEG"))
    assert files["test"] == set((root / "val").glob("*/*.JPEG"))
    for name, dataset in splits(built).items():
        for i in range(len(dataset)):
            assert set(bag_files(dataset, i)) <= files[name]


def test_validation_takes_the_configured_fraction_of_each_class(built):
    for wnid in CLASSES:
        in_val = [f for f in built.split_files["val"] if f.parent.name == wnid]
        assert len(in_val) == round(0.2 * TRAIN_PER_CLASS)


def test_bags_have_fixed_size_golf_ball_keys_and_half_positive(built):
    n_key = math.ceil(BAG_SIZE * KEY_PERCENT / 100)
    for name, dataset in splits(built).items():
        assert len(dataset) == N_BAGS[name]
        labels = []
        for i in range(len(dataset)):
            bag = dataset[i]
            assert bag.size == BAG_SIZE
            is_golf = [f.parent.name == GOLF for f in bag_files(dataset, i)]
            assert bag.instance_labels.tolist() == [int(g) for g in is_golf]
            assert int(bag.instance_labels.sum()) == (n_key if bag.label == 1 else 0)
            labels.append(int(bag.label))
        assert sum(labels) == math.ceil(N_BAGS[name] / 2)


def test_repeats_are_allowed_by_default_and_refusable(root):
    # 25 instances from a test pool of 10 negatives: only possible with repeats.
    dm = make(root, bag_size=25, train_bags=1, val_bags=1, test_bags=2, augment=False)
    ids = dm.test_set[1].instance_ids
    assert len(torch.unique(ids)) < len(ids)
    with pytest.raises(ConfigError, match=r"dataset \(train pool of 24 Imagenette images\).*negative images"):
        make(root, bag_size=25, allow_repeats=False)


def test_instances_are_112px_normalised_with_imagenet_statistics(built, root):
    assert built.instance_shape == (3, 112, 112)
    plain = make(root, augment=False)
    bag = plain.train_set[0]
    assert bag.instances.shape == (BAG_SIZE, 3, 112, 112) and bag.instances.dtype == torch.float32
    pixels = plain.train_set.pool[bag.instance_ids].float() / 255  # (N, 3, 112, 112)
    mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    torch.testing.assert_close(bag.instances, (pixels - mean) / std, rtol=1e-5, atol=1e-5)
    assert not torch.equal(built.train_set[0].instances, bag.instances)  # augmentation is on by default


def test_augmentation_is_fixed_across_loads_and_runs(built, root):
    first, second = built.train_set[1].instances, built.train_set[1].instances
    assert torch.equal(first, second)
    assert torch.equal(first, make(root).train_set[1].instances)
    # the test split is augmented as well, as in the original
    assert torch.equal(built.test_set[0].instances, built.test_set[0].instances)


def test_same_seed_same_bags_other_seed_other_bags(built, root):
    other = make(root, seed=1)
    assert built.split_files == make(root).split_files
    assert built.split_files["val"] != other.split_files["val"]
    assert not torch.equal(built.test_set[0].instances, other.test_set[0].instances)


def test_augmentation_steps_draw_independently():
    """Each step's "apply?" draw is its own: Blur (p=0.05) and MotionBlur (p=0.05) rarely coincide."""
    compose = A.Compose(build_augmentation().transforms, save_applied_params=True)
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    both, flipped = 0, 0
    for seed in range(400):
        compose.set_random_state(np.random.default_rng(seed), random.Random(seed))
        applied = {name for name, _ in compose(image=image)["applied_transforms"]}
        both += {"Blur", "MotionBlur"} <= applied
        flipped += "HorizontalFlip" in applied
    assert both <= 4 and 160 <= flipped <= 240


def test_missing_root_says_what_layout_is_expected(tmp_path):
    with pytest.raises(DataError) as error:
        make(tmp_path / "nowhere")
    message = str(error.value)
    assert "\n" not in message
    assert "folder not found; expected the fast.ai Imagenette layout <root>/train/<wnid>/*.JPEG" in message
    assert "imagenette2.tgz" in message


def test_malformed_roots_are_named(tmp_path):
    (tmp_path / "train" / GOLF).mkdir(parents=True)
    with pytest.raises(DataError, match=r"no val/ folder; expected the fast.ai Imagenette layout"):
        make(tmp_path)
    (tmp_path / "val" / "n01440764").mkdir(parents=True)
    with pytest.raises(DataError, match=r"train/n03445777/ holds no .JPEG images"):
        make(tmp_path)


def test_missing_key_class_and_broken_image_are_named(tmp_path):
    write_fake_imagenette(tmp_path)
    with pytest.raises(DataError, match=r"no train/n99999999/ folder \(the key class\)"):
        make(tmp_path, key_class="n99999999")
    broken = tmp_path / "val" / GOLF / f"{GOLF}_000.JPEG"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=rf"{broken.name}: cannot decode image"):
        make(tmp_path, test_bags=20)


def test_bad_config_values_are_refused(root):
    with pytest.raises(ConfigError, match="dataset.root is not set"):
        ImagenetteBagsDataModule(ImagenetteBagsDataModule.Config(), seed=0)
    with pytest.raises(ConfigError, match="dataset.val_fraction=1.0"):
        make(root, val_fraction=1.0)


def test_yaml_matches_the_schema_at_paper_scale():
    raw = OmegaConf.load(CONF)
    assert raw.pop("_target_") == "mil_experiments.data.imagenette_bags.ImagenetteBagsDataModule"
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ImagenetteBagsDataModule.Config), raw))
    assert {f.name for f in dataclasses.fields(config)} == set(raw.keys())
    assert (config.train_bags, config.val_bags, config.test_bags) == (300, 60, 60)
    assert (config.bag_size, config.key_percent, config.image_size) == (150, 30.0, 112)
    assert (config.key_class, config.val_fraction, config.allow_repeats, config.augment) == (GOLF, 0.2, True, True)
