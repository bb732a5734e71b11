"""`PoolBagDataset`: bags that index into one in-memory pool of images.

Digits-, QMNIST- and Imagenette-bags all keep their image pool once in memory and
describe each bag by pool indices (`BagIndices`); images are transformed (resized,
normalised) when a bag is loaded, so a pool of small originals serves bags of any
image size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from mil_experiments.bag import Bag
from mil_experiments.data.bag_protocol import BagIndices


class PoolBagDataset(Dataset):
    """A list of bags over a shared image pool.

    Args:
        pool: (P, C, h, w) images of the pool, any dtype the transform accepts.
        bags: the bags, as pool indices and labels.
        transform: maps a (N, C, h, w) stack of pool images to the (N, C, H, W) float
            instances the model sees.
        name: split name used in bag ids, e.g. "train".
        targets: (P,) class of each pool image, when known (kept for inspection and tests).
    """

    def __init__(
        self,
        pool: torch.Tensor,
        bags: list[BagIndices],
        transform: Callable[[torch.Tensor], torch.Tensor],
        name: str,
        targets: torch.Tensor | None = None,
    ) -> None:
        self.pool = pool
        self.targets = targets
        self.bags = bags
        self.transform = transform
        self.name = name

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, index: int) -> Bag:
        bag = self.bags[index]
        ids = torch.as_tensor(bag.indices, dtype=torch.long)  # (N,)
        instances = self.transform(self.pool[ids])  # (N, C, H, W)
        return Bag(
            instances=instances,
            label=torch.tensor(bag.label, dtype=torch.long),
            bag_id=f"{self.name}_{index:04d}",
            instance_labels=torch.as_tensor(bag.instance_labels, dtype=torch.long),
            instance_ids=ids,
        )


def resize_and_normalize(size: int, mean: float | list[float], std: float | list[float]) -> Callable:
    """A transform: bilinear resize of a (N, C, h, w) stack to size x size, then (x - mean) / std."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)

    def transform(images: torch.Tensor) -> torch.Tensor:
        x = images.float()  # (N, C, h, w)
        if x.shape[-1] != size or x.shape[-2] != size:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return (x - mean_t) / std_t  # (N, C, size, size)

    return transform
