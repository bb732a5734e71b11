"""Digits-bags: QMNIST-style bags built from scikit-learn's bundled handwritten digits.

Real data with no download (1,797 8x8 images of the UCI digits set, shipped inside
scikit-learn), bagged with the QMNIST-bags protocol of the gradient-accumulation paper:
the key instance is the digit 9, the train / validation / test bags are drawn from
disjoint image pools (split per digit), every bag has the same size, no image appears
twice in one bag, a positive bag holds ceil(N * pct / 100) nines, half of the bags are
positive, and everything is determined by the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits

from mil_experiments.data.bag_protocol import check_protocol_config, draw_split_bags, split_pool_per_class
from mil_experiments.data.datamodule import BagDataModule
from mil_experiments.data.pool_bags import PoolBagDataset, resize_and_normalize
from mil_experiments.errors import ConfigError


class DigitsBagsDataModule(BagDataModule):
    """Digits-bags; see the module docstring for the protocol."""

    @dataclass
    class Config(BagDataModule.Config):
        name: str = "digits_bags"
        key_digit: int = 9
        bag_size: int = 10
        key_percent: float = 10.0
        train_bags: int = 200
        val_bags: int = 50
        test_bags: int = 100
        pool_fractions: tuple[float, float, float] = (0.5, 0.2, 0.3)
        image_size: int = 28

    def __init__(self, config: Config, seed: int) -> None:
        super().__init__(config, seed)
        c = config
        if not 0 <= c.key_digit <= 9:
            raise ConfigError(f"dataset.key_digit={c.key_digit}: must be a digit 0-9")
        check_protocol_config(c)
        if abs(sum(c.pool_fractions) - 1) > 1e-6 or min(c.pool_fractions) <= 0:
            raise ConfigError(f"dataset.pool_fractions={list(c.pool_fractions)}: must be 3 positive numbers summing to 1")
        self.num_classes = 2
        self.instance_shape = (1, c.image_size, c.image_size)

    def build_splits(self) -> tuple[PoolBagDataset, PoolBagDataset, PoolBagDataset]:
        c = self.config
        digits = load_digits()
        pixels = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (P, 1, 8, 8)
        images = resize_and_normalize(c.image_size, 0.0, 1.0)(pixels)  # (P, 1, S, S), bilinear
        targets = digits.target.astype(np.int64)  # (P,)
        rng = np.random.default_rng(self.seed)
        pools = split_pool_per_class(targets, c.pool_fractions, rng)
        train_pixels = images[torch.as_tensor(pools[0])]
        mean, std = float(train_pixels.mean()), float(train_pixels.std())  # of the training pool
        sets = []
        for name, pool, n_bags in zip(("train", "val", "test"), pools, (c.train_bags, c.val_bags, c.test_bags), strict=True):
            bags = draw_split_bags(targets[pool] == c.key_digit, n_bags, c, rng, f"{name} pool of {len(pool)} digits")
            pool_images = (images[torch.as_tensor(pool)] - mean) / std  # (P_split, 1, S, S)
            sets.append(PoolBagDataset(pool_images, bags, _identity, name, torch.as_tensor(targets[pool])))
        return tuple(sets)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
