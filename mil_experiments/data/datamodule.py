"""`BagDataModule`: the one LightningDataModule shape every bag dataset shares.

A concrete dataset subclasses it, declares its config keys in a nested `Config`
dataclass (the schema that `conf/dataset/<name>.yaml` is checked against) and implements
`build_splits`, which returns the train / validation / test datasets of `Bag` records.

Training order: shuffled each epoch (or ZoomMIL's class-weighted draw); with
`tiles_per_bag=K` each training bag is K of its tiles, drawn afresh each epoch, and with a
multi-process strategy the epoch's order is dealt to the ranks (`data/bag_order.py`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, WeightedRandomSampler

from mil_experiments.bag import collate_single_bag
from mil_experiments.data.bag_order import EpochOrder, TrainBags
from mil_experiments.data.description import DataDescription
from mil_experiments.data.evaluation_shards import shard_for_this_rank
from mil_experiments.errors import ConfigError


class BagDataModule(L.LightningDataModule, ABC):
    """Serves bags one at a time to `Trainer.fit` / `Trainer.test`.

    Subclasses set `num_classes` and `instance_shape` (the shape of one instance, e.g.
    (1, 28, 28) or (1024,)), and `magnifications` for multi-level bags, so that encoders
    and aggregators derive their dimensions (`describe()`).
    """

    @dataclass
    class Config:
        num_workers: int = 0
        class_weighted_sampler: bool = False  # ZoomMIL: training bags drawn with weight N / n_c
        # K tiles of each training bag (seeded, fresh each epoch; all tiles at evaluation); None = all
        tiles_per_bag: int | None = None

        def __post_init__(self) -> None:
            if self.tiles_per_bag is not None and self.tiles_per_bag < 1:
                raise ConfigError(f"dataset.tiles_per_bag={self.tiles_per_bag}: must be >= 1 (or null for all tiles)")

    def __init__(self, config: Config, seed: int) -> None:
        super().__init__()
        self.config = config
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.used_split: dict[str, list[str]] | None = None  # slide ids per split, where a dataset has them
        # Multi-process strategies: "shard" (ddp: each rank its bags) or "same" (tile_parallel: every rank every bag)
        self.bag_split: str | None = None
        # strategy=ddp with deterministic evaluation: each rank loads only its validation / test bags
        self.evaluation_split: bool = False
        # the class-weighted sampler's random state: saved in checkpoints, so a resumed run draws the bags it would have
        self._weighted_generator: torch.Generator | None = None
        self._restored_generator_state: torch.Tensor | None = None

    # --- to be provided by each dataset -------------------------------------------------
    num_classes: int = 2
    instance_shape: tuple[int, ...] = ()
    magnifications: tuple[float | None, ...] = (None,)  # levels of every bag, lowest first
    class_names: tuple[str, ...] = ()

    def describe(self) -> DataDescription:
        """The data as the method sees it (after `setup`)."""
        return DataDescription(
            num_classes=self.num_classes,
            instance_shape=tuple(self.instance_shape),
            magnifications=tuple(self.magnifications),
            class_names=tuple(self.class_names),
        )

    @abstractmethod
    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        """Return (train, validation, test) datasets whose items are `Bag`s."""

    # --- Lightning hooks ----------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self.build_splits()

    def train_labels(self) -> list[int]:
        """The training bags' labels, in dataset order."""
        labels = getattr(self.train_set, "labels", None)
        return list(labels) if labels is not None else [int(bag.label) for bag in self.train_set]

    def class_weighted_sampler(self) -> WeightedRandomSampler:
        """ZoomMIL's sampler: bag i of class c drawn with weight N / n_c, N draws per epoch with
        replacement, so every class is drawn equally often in expectation; seeded by `seed`."""
        labels = np.asarray(self.train_labels())
        counts = np.bincount(labels)
        weights = len(labels) / counts[labels]  # (N,)
        generator = torch.Generator().manual_seed(self.seed)
        if self._restored_generator_state is not None:  # resumed: continue the draws where the checkpointed epoch left them
            generator.set_state(self._restored_generator_state)
            self._restored_generator_state = None
        self._weighted_generator = generator
        return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.float64), len(labels), replacement=True, generator=generator)

    def state_dict(self) -> dict:
        """Lightning checkpoints this: the class-weighted sampler's generator (one draw per epoch so far)."""
        return {} if self._weighted_generator is None else {"class_weighted_sampler": self._weighted_generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored_generator_state = state_dict.get("class_weighted_sampler")

    def _loader(self, dataset: Dataset, shuffle: bool, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=1,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=self.config.num_workers,
            collate_fn=collate_single_bag,
            persistent_workers=self.config.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        sampler = self.class_weighted_sampler() if self.config.class_weighted_sampler else None
        if self.bag_split is None and self.config.tiles_per_bag is None:
            return self._loader(self.train_set, shuffle=True, sampler=sampler)
        # the same draw as the plain loader's (RandomSampler), dealt to ranks and/or cut to K tiles
        order = EpochOrder(sampler or RandomSampler(self.train_set), split=self.bag_split)
        return self._loader(TrainBags(self.train_set, self.config.tiles_per_bag, self.seed), shuffle=False, sampler=order)

    def _evaluation_bags(self, bags: Dataset) -> Dataset:
        return shard_for_this_rank(bags) if self.evaluation_split else bags

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._evaluation_bags(self.val_set), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._evaluation_bags(self.test_set), shuffle=False)
