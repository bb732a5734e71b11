"""Imagenette-bags: the benchmark of the within-bag sampling paper.

Built from an Imagenette folder in the fast.ai layout (`<root>/train/<wnid>/*.JPEG`,
`<root>/val/<wnid>/*.JPEG`), with the protocol of the official notebook
(`MIDA-group/SampledABMIL`, `Create_IMAGENETTE_bags_dataset.ipynb`):

- `val/` is the test set; a fraction of each class of `train/` is withdrawn (seeded, per
  class) for validation, the rest is the training set;
- the key class is golf ball (n03445777), the other nine classes are negatives; a positive
  bag holds ceil(N * pct / 100) golf balls; the first ceil(n / 2) bags are positive; an
  image may appear twice in one bag (`allow_repeats`, as the notebook has no check);
- each used image is decoded and resized to 112x112 (bilinear) once, into a uint8 pool;
- every bag instance, in all three splits, gets the notebook's albumentations
  augmentation (`imagenette_augmentation`), seeded by (seed, split, bag index, position)
  and applied when the bag is loaded: fixed across epochs, as the notebook's offline
  augmentation is, without writing images; then ImageNet mean / std normalisation.

Deviation from the original: it re-encoded the augmented images as JPEG (lossy); here they
stay in memory.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mil_experiments.bag import Bag
from mil_experiments.data.bag_protocol import BagIndices, check_protocol_config, draw_split_bags, split_pool_per_class
from mil_experiments.data.datamodule import BagDataModule
from mil_experiments.data.imagenette_augmentation import FixedAugmentation, build_resize, instance_seed
from mil_experiments.data.pool_bags import PoolBagDataset, resize_and_normalize
from mil_experiments.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
IMAGENETTE_LAYOUT = (
    "expected the fast.ai Imagenette layout <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG "
    "with the key class among the wnids; download the full-size "
    "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2.tgz, extract it and set dataset.root to the "
    "imagenette2 folder"
)


@dataclass
class ImageList:
    """Image files of one Imagenette folder and their class names."""

    files: list[Path]
    classes: np.ndarray  # (P,) wnid of each file


def list_imagenette(root: str, key_class: str) -> dict[str, ImageList]:
    """List the images of `<root>/train` and `<root>/val`, sorted by class and file name.

    Raises:
        DataError: the root, a split folder, its class folders, the key class or a class's
            images are missing.
    """
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"dataset.root={root}: folder not found; {IMAGENETTE_LAYOUT}")
    for split in ("train", "val"):
        if not (base / split).is_dir():
            raise DataError(f"dataset.root={root}: no {split}/ folder; {IMAGENETTE_LAYOUT}")
    listing = {}
    for split in ("train", "val"):
        folder = base / split
        class_dirs = sorted(d for d in folder.iterdir() if d.is_dir())
        if not class_dirs:
            raise DataError(f"dataset.root={root}: {split}/ holds no class folders; {IMAGENETTE_LAYOUT}")
        if key_class not in {d.name for d in class_dirs}:
            raise DataError(f"dataset.root={root}: no {split}/{key_class}/ folder (the key class); {IMAGENETTE_LAYOUT}")
        files, classes = [], []
        for class_dir in class_dirs:
            images = sorted(f for f in class_dir.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise DataError(
                    f"dataset.root={root}: {split}/{class_dir.name}/ holds no .JPEG images; {IMAGENETTE_LAYOUT}"
                )
            files += images
            classes += [class_dir.name] * len(images)
        listing[split] = ImageList(files, np.asarray(classes))
    return listing


def load_image(path: Path, size: int) -> np.ndarray:
    """Decode one image as RGB and resize it to (size, size, 3) uint8, as the original's first step."""
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))  # (h, w, 3)
    except Exception as error:
        raise DataError(f"{path}: cannot decode image ({error}); {IMAGENETTE_LAYOUT}") from None
    return build_resize(size)(image=pixels)["image"]  # (size, size, 3)


def load_pool(files: list[Path], size: int) -> torch.Tensor:
    """Decode and resize images in parallel threads; returns (P, 3, size, size) uint8."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = list(pool.map(lambda f: load_image(f, size), files))
    stack = np.stack(images)  # (P, size, size, 3)
    return torch.from_numpy(stack).permute(0, 3, 1, 2).contiguous()  # (P, 3, size, size)


class ImagenetteBagDataset(PoolBagDataset):
    """Imagenette bags over a uint8 pool, augmented per instance with a fixed seed.

    Args:
        pool: (P, 3, S, S) uint8 images.
        files: the source file of each pool image.
        bags: the bags, as pool indices and labels.
        name: split name ("train", "val" or "test").
        seed: dataset seed, part of every instance's augmentation seed.
        augment: apply the augmentation (else only normalise).
        mean: per-channel mean of [0, 1] pixels.
        std: per-channel std of [0, 1] pixels.
    """

    def __init__(
        self,
        pool: torch.Tensor,
        files: list[Path],
        bags: list[BagIndices],
        name: str,
        seed: int,
        augment: bool,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        super().__init__(pool, bags, transform=_identity, name=name)
        self.files = files
        self.seed = seed
        self.augmentation = FixedAugmentation() if augment else None
        # Pixels stay in [0, 255]: (x - 255 mean) / (255 std) = (x / 255 - mean) / std.
        self.normalize = resize_and_normalize(pool.shape[-1], [m * 255 for m in mean], [s * 255 for s in std])

    def __getitem__(self, index: int) -> Bag:
        bag = super().__getitem__(index)
        images = bag.instances  # (N, 3, S, S) uint8
        if self.augmentation is not None:
            seeds = [instance_seed(self.seed, self.name, index, position) for position in range(bag.size)]
            hwc = self.augmentation(images.permute(0, 2, 3, 1).numpy(), seeds)  # (N, S, S, 3)
            images = torch.from_numpy(hwc).permute(0, 3, 1, 2)  # (N, 3, S, S)
        bag.instances = self.normalize(images)  # (N, 3, S, S) float
        return bag


class ImagenetteBagsDataModule(BagDataModule):
    """Imagenette-bags; see the module docstring for the protocol."""

    @dataclass
    class Config(BagDataModule.Config):
        name: str = "imagenette_bags"
        root: str | None = None
        key_class: str = "n03445777"
        bag_size: int = 150
        key_percent: float = 30.0
        train_bags: int = 300
        val_bags: int = 60
        test_bags: int = 60
        val_fraction: float = 0.2
        allow_repeats: bool = True
        image_size: int = 112
        augment: bool = True
        mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
        std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __init__(self, config: Config, seed: int) -> None:
        super().__init__(config, seed)
        c = config
        if c.root is None:
            raise ConfigError(
                f"dataset.root is not set: give the Imagenette folder (dataset.root=/path); {IMAGENETTE_LAYOUT}"
            )
        if not 0 < c.val_fraction < 1:
            raise ConfigError(f"dataset.val_fraction={c.val_fraction}: must be in (0, 1)")
        check_protocol_config(c)
        if len(c.mean) != 3 or len(c.std) != 3 or min(c.std) <= 0:
            raise ConfigError(
                f"dataset.mean={list(c.mean)}, dataset.std={list(c.std)}: must be 3 numbers each, std positive"
            )
        self.num_classes = 2
        self.instance_shape = (3, c.image_size, c.image_size)
        self.split_files: dict[str, list[Path]] = {}

    def build_splits(self) -> tuple[ImagenetteBagDataset, ImagenetteBagDataset, ImagenetteBagDataset]:
        c = self.config
        listing = list_imagenette(c.root, c.key_class)
        rng = np.random.default_rng(self.seed)
        train_folder = listing["train"]
        val_part, train_part = split_pool_per_class(train_folder.classes, (c.val_fraction, 1 - c.val_fraction), rng)
        sources = {
            "train": (
                ImageList([train_folder.files[i] for i in train_part], train_folder.classes[train_part]),
                c.train_bags,
            ),
            "val": (ImageList([train_folder.files[i] for i in val_part], train_folder.classes[val_part]), c.val_bags),
            "test": (listing["val"], c.test_bags),
        }
        drawn_per_split = {}
        for name, (images, n_bags) in sources.items():
            self.split_files[name] = images.files
            drawn_per_split[name] = draw_split_bags(
                images.classes == c.key_class, n_bags, c, rng, f"{name} pool of {len(images.files)} Imagenette images"
            )
        sets = []
        for name, drawn in drawn_per_split.items():
            # Decode only the images the bags use; bags then index that compact pool.
            used, positions = np.unique(np.concatenate([b.indices for b in drawn]), return_inverse=True)
            bags, start = [], 0
            for b in drawn:
                bags.append(BagIndices(positions[start : start + len(b.indices)], b.instance_labels, b.label))
                start += len(b.indices)
            files = [self.split_files[name][i] for i in used]
            pool = load_pool(files, c.image_size)  # (U, 3, S, S) uint8
            sets.append(
                ImagenetteBagDataset(pool, files, bags, name, self.seed, c.augment, tuple(c.mean), tuple(c.std))
            )
        return tuple(sets)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
