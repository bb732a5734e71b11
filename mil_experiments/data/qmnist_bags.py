"""QMNIST-bags: the benchmark of the gradient-accumulation and within-bag sampling papers.

Built from torchvision's QMNIST files (`<root>/QMNIST/raw/qmnist-{train,test}-*`), with
the protocol of the official code (`axanderssonuu/ABMIL-ACC`, `qmnist_utils.py`):

- train bags are drawn from the QMNIST training set (60k); validation bags from one third
  of the QMNIST test set, per digit (round(count / 3) images of each digit); test bags from
  the other two thirds;
- the key instance is the digit 9; a positive bag holds ceil(N * pct / 100) nines, a
  negative bag none; the first ceil(n / 2) bags are positive; no image appears twice in
  one bag (an image may appear in several bags);
- images are resized from 28x28 to 84x84 (bilinear) and normalised with mean 0.135 and
  std 0.305, when a bag is loaded: the pool stays uint8 28x28 in memory.

Deviation from the original: it dumped the images to JPEG (lossy) before bagging; here the
raw pixels are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import QMNIST
from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

from mil_experiments.data.bag_protocol import BagIndices, check_protocol_config, draw_split_bags
from mil_experiments.data.datamodule import BagDataModule
from mil_experiments.data.pool_bags import PoolBagDataset, resize_and_normalize
from mil_experiments.errors import ConfigError, DataError

QMNIST_FILES = {
    "train": ("qmnist-train-images-idx3-ubyte", "qmnist-train-labels-idx2-int"),
    "test": ("qmnist-test-images-idx3-ubyte", "qmnist-test-labels-idx2-int"),
}
QMNIST_LAYOUT = (
    "expected torchvision's QMNIST layout <root>/QMNIST/raw/ holding qmnist-train-images-idx3-ubyte, "
    "qmnist-train-labels-idx2-int, qmnist-test-images-idx3-ubyte and qmnist-test-labels-idx2-int; "
    "obtain it with dataset.download=true on a machine with internet, or gunzip the four files of "
    "https://github.com/facebookresearch/qmnist into <root>/QMNIST/raw/"
)
VAL_SELECTIONS = ("random", "file_order")


@dataclass
class QMNISTPart:
    """One QMNIST file pair: the images and their digits."""

    images: torch.Tensor  # (P, 28, 28) uint8
    digits: np.ndarray  # (P,) int64


def load_qmnist(root: str, download: bool) -> dict[str, QMNISTPart]:
    """Read the QMNIST training and test sets (60k images each) from `<root>/QMNIST/raw`.

    Args:
        root: the folder that holds `QMNIST/`.
        download: let torchvision download the files when they are missing.

    Returns:
        {"train": ..., "test": ...}, images in file order.

    Raises:
        DataError: a file is missing or malformed.
    """
    if download:
        for what in QMNIST_FILES:
            try:
                QMNIST(root, what=what, download=True)
            except Exception as error:
                raise DataError(f"dataset.root={root}: downloading QMNIST failed ({error}); {QMNIST_LAYOUT}") from None
    raw = Path(root) / "QMNIST" / "raw"
    parts = {}
    for what, (images_name, labels_name) in QMNIST_FILES.items():
        images = _read_idx(raw / images_name, root)  # (P, 28, 28)
        labels = _read_idx(raw / labels_name, root)  # (P, 8): digit, NIST writer, ...
        if images.dtype != torch.uint8 or images.ndim != 3 or tuple(images.shape[1:]) != (28, 28):
            raise DataError(
                f"{raw / images_name}: not a stack of 28x28 uint8 images "
                f"(got {images.dtype} {tuple(images.shape)}); {QMNIST_LAYOUT}"
            )
        if labels.ndim != 2 or labels.shape[0] != images.shape[0]:
            raise DataError(
                f"{raw / labels_name}: expected one label row per image of {images_name} "
                f"(got shape {tuple(labels.shape)} for {images.shape[0]} images); {QMNIST_LAYOUT}"
            )
        digits = labels[:, 0].long().numpy()  # (P,)
        if digits.min() < 0 or digits.max() > 9:
            raise DataError(f"{raw / labels_name}: digit labels outside 0-9; {QMNIST_LAYOUT}")
        parts[what] = QMNISTPart(images, digits)
    return parts


def _read_idx(path: Path, root: str) -> torch.Tensor:
    """Read one IDX file with torchvision's reader, turning any failure into a one-line `DataError`."""
    if not path.is_file():
        raise DataError(f"dataset.root={root}: QMNIST file {path} not found; {QMNIST_LAYOUT}")
    try:
        return read_sn3_pascalvincent_tensor(str(path), strict=True)
    except Exception as error:  # torchvision signals a bad header with a bare assert
        reason = str(error) or type(error).__name__
        raise DataError(f"{path}: not a readable IDX file ({reason}); {QMNIST_LAYOUT}") from None


def split_validation(digits: np.ndarray, selection: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Withdraw round(count / 3) images of each digit of the QMNIST test set for validation.

    Args:
        digits: (P,) digit of each test-set image, in file order.
        selection: "random" (a seeded random third of each digit: the paper's "randomly
            withdraw") or "file_order" (the first third of each digit in QMNIST file
            order). The code took the first third in the `os.listdir` order of its JPEG
            dump, which depends on the file system (hash order on ext4): "file_order" is
            its reproducible reading.
        rng: the generator used by "random".

    Returns:
        (validation indices, test indices), sorted, disjoint, covering the test set.
    """
    val_parts = []
    for digit in np.unique(digits):
        members = np.flatnonzero(digits == digit)  # file order
        if selection == "random":
            members = rng.permutation(members)
        val_parts.append(members[: int(np.around(len(members) / 3))])
    val = np.sort(np.concatenate(val_parts))
    test = np.setdiff1d(np.arange(len(digits)), val)
    return val, test


class QMNISTBagsDataModule(BagDataModule):
    """QMNIST-bags; see the module docstring for the protocol."""

    @dataclass
    class Config(BagDataModule.Config):
        name: str = "qmnist_bags"
        root: str | None = None
        download: bool = False
        key_digit: int = 9
        bag_size: int = 500
        key_percent: float = 5.0
        train_bags: int = 100
        val_bags: int = 30
        test_bags: int = 60
        val_selection: str = "random"
        allow_repeats: bool = False
        image_size: int = 84
        mean: float = 0.135
        std: float = 0.305

    def __init__(self, config: Config, seed: int) -> None:
        super().__init__(config, seed)
        c = config
        if c.root is None:
            raise ConfigError(
                f"dataset.root is not set: give the folder that holds QMNIST/raw/ (dataset.root=/path); {QMNIST_LAYOUT}"
            )
        if not 0 <= c.key_digit <= 9:
            raise ConfigError(f"dataset.key_digit={c.key_digit}: must be a digit 0-9")
        if c.val_selection not in VAL_SELECTIONS:
            raise ConfigError(f"dataset.val_selection={c.val_selection}: must be one of {', '.join(VAL_SELECTIONS)}")
        check_protocol_config(c)
        if c.std <= 0:
            raise ConfigError(f"dataset.std={c.std}: must be positive")
        self.num_classes = 2
        self.instance_shape = (1, c.image_size, c.image_size)
        self.pool_indices: dict[str, np.ndarray] = {}

    def build_splits(self) -> tuple[PoolBagDataset, PoolBagDataset, PoolBagDataset]:
        c = self.config
        parts = load_qmnist(c.root, c.download)
        rng = np.random.default_rng(self.seed)
        val, test = split_validation(parts["test"].digits, c.val_selection, rng)
        sources = {
            "train": (parts["train"], np.arange(len(parts["train"].digits)), c.train_bags),
            "val": (parts["test"], val, c.val_bags),
            "test": (parts["test"], test, c.test_bags),
        }
        # Pool pixels are uint8 in [0, 255]; (x - 255 mean) / (255 std) = (x / 255 - mean) / std, the
        # original's ToTensor + Normalize(0.135, 0.305) (bilinear resizing is linear, so order is free).
        transform = resize_and_normalize(c.image_size, c.mean * 255, c.std * 255)
        sets = []
        for name, (part, pool, n_bags) in sources.items():
            drawn = draw_split_bags(part.digits[pool] == c.key_digit, n_bags, c, rng, f"{name} pool of {len(pool)} QMNIST images")
            # Bags index the whole QMNIST file, so instance ids are QMNIST file indices.
            bags = [BagIndices(pool[b.indices], b.instance_labels, b.label) for b in drawn]
            self.pool_indices[name] = pool
            sets.append(
                PoolBagDataset(part.images.unsqueeze(1), bags, transform=transform, name=name)
            )  # pool (P, 1, 28, 28)
        return tuple(sets)
