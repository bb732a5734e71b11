"""The `Bag` record: one bag of instances as it flows from a dataset through a method.

A dataset yields one `Bag` per item; the DataLoader uses `collate_single_bag`, so a
training step receives one `Bag` (no batch dimension), as every method here works
bag by bag.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Bag:
    """One bag of instances.

    Attributes:
        instances: (N, C, H, W) images or (N, D) features.
        label: bag label, a 0-d long tensor.
        bag_id: a name that identifies the bag in results and figures.
        instance_labels: (N,) long tensor, known only for synthetic and benchmark data;
            used for instance-level evaluation, never for training.
        instance_ids: (N,) long tensor naming each instance inside its source pool, so that
            repeated looks at one instance (within-bag sampling) can be matched up.
        coords: (N, 2) level-0 pixel coordinates of tiles, for slides.
        magnification: magnification of the instances, for slides.
        extras: anything else a dataset needs to pass on (for example per-magnification
            feature tensors).
    """

    instances: torch.Tensor
    label: torch.Tensor
    bag_id: str
    instance_labels: torch.Tensor | None = None
    instance_ids: torch.Tensor | None = None
    coords: torch.Tensor | None = None
    magnification: float | None = None
    extras: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Number of instances in the bag."""
        return int(self.instances.shape[0])

    def subset(self, positions: torch.Tensor) -> Bag:
        """The bag restricted to `positions` (repeats allowed); the label is unchanged."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[positions.to(t.device)]

        return Bag(
            instances=self.instances[positions.to(self.instances.device)],
            label=self.label,
            bag_id=self.bag_id,
            instance_labels=pick(self.instance_labels),
            instance_ids=pick(self.instance_ids),
            coords=pick(self.coords),
            magnification=self.magnification,
            extras=self.extras,
        )


def collate_single_bag(items: list[Bag]) -> Bag:
    """Collate for `batch_size=1` loaders: the one bag, unchanged."""
    if len(items) != 1:
        raise ValueError(f"bags are processed one at a time; got a batch of {len(items)}")
    return items[0]
