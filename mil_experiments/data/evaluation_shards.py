"""Validation and test bags split across the ranks of `strategy=ddp`.

Every rank walks the whole evaluation set in the same order (so every rank runs the same
number of steps and reaches the epoch's collectives together, whatever the set's size),
but loads and evaluates only its own bags: bag i belongs to rank i mod R, every other step
is a `NoBag`. At the epoch's end `every_rank_items` all-gathers each rank's
`(bag index, record)` pairs and puts them in bag order, so that the metrics, the
predictions CSV and the selection are those of one device evaluating every bag.

Only deterministic evaluation is split (`sampling.inference` and every
`sampling.test_inference` at 100%): random evaluation passes draw their samples from one
random stream in bag order, which a split would change (`strategies.splits_evaluation`).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch.utils.data import Dataset

from mil_experiments.bag import Bag
from mil_experiments.data.bag_order import NoBag


class EvaluationShard(Dataset):
    """Bag i of `bags` on rank i mod `world`, `NoBag` on the others; the length of `bags` everywhere."""

    def __init__(self, bags: Dataset, rank: int, world: int) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} of {world}")
        self.bags, self.rank, self.world = bags, rank, world

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, index: int) -> Bag | NoBag:
        return self.bags[index] if index % self.world == self.rank else NoBag()


def shard_for_this_rank(bags: Dataset) -> Dataset:
    """`bags` split for this process's rank when a process group of 2 or more runs, else `bags`."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return bags
    return EvaluationShard(bags, dist.get_rank(), dist.get_world_size())


def every_rank_items(pairs: list[tuple[int, Any]], split: bool) -> list[Any]:
    """The records of every rank's bags in bag order, from this rank's `(bag index, record)` pairs.

    Several records of one bag keep their order. Without `split` (or a process group)
    this rank evaluated every bag: its own records, in order. A collective when split:
    every rank calls it at the same point.
    """
    if split and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[list[tuple[int, Any]] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, pairs)
        pairs = sorted((pair for part in gathered for pair in part), key=lambda pair: pair[0])  # stable: a bag's records stay in order
    return [record for _, record in pairs]
