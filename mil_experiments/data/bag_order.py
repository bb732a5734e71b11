"""The training bags of an epoch: their order per rank, and K tiles per bag.

`EpochOrder` wraps the sampler that orders an epoch's training bags (shuffled, or ZoomMIL's
class-weighted draw). Across processes the order is drawn once, on rank 0, and broadcast,
then dealt: `split="shard"` (strategy=ddp) gives rank r the bags r, r + R, r + 2R, ...
of that order, padded with `NO_BAG` so that every rank takes ceil(B / R) steps (the ranks
step the optimizer together); `split="same"` (strategy=tile_parallel) gives every rank the
whole order. It yields `(index, epoch)` pairs; Lightning calls `set_epoch` every epoch
(and restores the epoch on resume).

`TrainBags` serves those pairs: the bag at `index`, or, with `tiles_per_bag=K`, K of its
tiles drawn without replacement (the all-in-memory multi-GPU paper's K tissue tiles per
slide and step), fresh each epoch and reproducible: the draw depends on (seed, epoch,
index) only, not on the process, the worker or the rank. A bag of K tiles or fewer is
served whole; a multi-level bag keeps the children of its drawn tiles (`Bag.subset`).
Evaluation never goes through here: validation and test bags keep all their tiles.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

from mil_experiments.bag import Bag

SPLITS = ("shard", "same")


class NoBag:
    """A step in which this rank has no bag (the last steps of an uneven ddp epoch)."""

    def __repr__(self) -> str:
        return "NoBag()"


NO_BAG_INDEX = -1


class EpochOrder(Sampler):
    """`(index, epoch)` of the training bags this rank takes, in order (see the module docstring)."""

    def __init__(self, base: Sampler, split: str | None = None) -> None:
        if split is not None and split not in SPLITS:
            raise ValueError(f"split={split!r}: choose one of {SPLITS}")
        self.base = base
        self.split = split
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _ranks(self) -> tuple[int, int]:
        if self.split is None or not (dist.is_available() and dist.is_initialized()):
            return 0, 1
        return dist.get_rank(), dist.get_world_size()

    def __len__(self) -> int:
        rank, world = self._ranks()
        return -(-len(self.base) // world) if self.split == "shard" else len(self.base)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rank, world = self._ranks()
        order = [int(i) for i in self.base] if rank == 0 else None  # rank 0's draw is the epoch's order
        if world > 1:
            box = [order]
            dist.broadcast_object_list(box, src=0)
            order = box[0]
        if self.split == "shard":
            mine = order[rank::world]
            mine += [NO_BAG_INDEX] * (len(self) - len(mine))
            order = mine
        return iter([(index, self.epoch) for index in order])


def tile_positions(n_tiles: int, k: int, seed: int, epoch: int, index: int) -> torch.Tensor | None:
    """K positions of a bag's (lowest-level) tiles, sorted; None for all of them (n_tiles <= K)."""
    if n_tiles <= k:
        return None
    generator = torch.Generator().manual_seed(hash((seed, epoch, index)) % 2**63)  # (seed, epoch, index): ints hash alike everywhere
    return torch.randperm(n_tiles, generator=generator)[:k].sort().values  # (K,)


class TrainBags(Dataset):
    """Items `(index, epoch)` -> the training bag, or K of its tiles (`tiles_per_bag`), or `NoBag`."""

    def __init__(self, bags: Dataset, tiles_per_bag: int | None, seed: int) -> None:
        self.bags = bags
        self.tiles_per_bag = tiles_per_bag
        self.seed = seed

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, item: tuple[int, int]) -> Bag | NoBag:
        index, epoch = item
        if index == NO_BAG_INDEX:
            return NoBag()
        bag = self.bags[index]
        if self.tiles_per_bag is None:
            return bag
        positions = tile_positions(bag.sampling_size, self.tiles_per_bag, self.seed, epoch, index)
        return bag if positions is None else bag.subset(positions)
