"""The `Bag` record: one bag of instances as it flows from a dataset through a method.

A dataset yields one `Bag` per item; the DataLoader uses `collate_single_bag`, so a
training step receives one `Bag` (no batch dimension), as every method here works
bag by bag.

A bag may have several levels (magnifications of one slide). Their rows are stored one
level after another, lowest magnification first, in every per-row field (`instances`,
`instance_labels`, `instance_ids`, `coords`), and `levels` says how many rows each level
has. Within a level the tiles are in depth-first order, so the 4^Δ children of tile i of
a level lie in rows i·4^Δ … (i+1)·4^Δ − 1 of the level Δ magnification doublings above.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(unsafe_hash=True)
class LevelLayout:
    """Where each level's rows are in a multi-level bag (treat as immutable).

    Not a frozen dataclass: Lightning moves a batch to its device by copying every
    dataclass field by field, which a frozen one refuses.

    Attributes:
        magnifications: per level, lowest first (None where a file does not say).
        sizes: per level, its number of rows.
    """

    magnifications: tuple[float | None, ...]
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.magnifications) != len(self.sizes) or not self.sizes:
            raise ValueError(f"levels: {len(self.magnifications)} magnifications for {len(self.sizes)} sizes")

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def slices(self) -> list[slice]:
        """Per level, its rows of the bag."""
        starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        return [slice(start, start + size) for start, size in zip(starts, self.sizes, strict=True)]

    def children_per_tile(self) -> list[int]:
        """Per level, how many of its rows belong to one row of the lowest level.

        Raises ValueError when a level's size is not a whole multiple of the lowest's.
        """
        base = self.sizes[0]
        ratios = []
        for magnification, size in zip(self.magnifications, self.sizes, strict=True):
            if base == 0 or size % base:
                raise ValueError(
                    f"level {magnification}x has {size} rows, not a whole multiple of the lowest level's {base}:"
                    " the levels are not aligned parent/children tiles"
                )
            ratios.append(size // base)
        return ratios


@dataclass
class Bag:
    """One bag of instances.

    Attributes:
        instances: (N, C, H, W) images or (N, D) features (all levels' rows for a
            multi-level bag).
        label: bag label, a 0-d long tensor.
        bag_id: a name that identifies the bag in results and figures.
        instance_labels: (N,) long tensor, known only for synthetic and benchmark data;
            used for instance-level evaluation, never for training.
        instance_ids: (N,) long tensor naming each instance inside its source pool, so that
            repeated looks at one instance (within-bag sampling) can be matched up.
        coords: (N, 2) level-0 pixel coordinates of tiles, for slides.
        magnification: magnification of a single-level bag's instances, for slides.
        levels: the level layout of a multi-level bag; None for a single-level bag.
    """

    instances: torch.Tensor
    label: torch.Tensor
    bag_id: str
    instance_labels: torch.Tensor | None = None
    instance_ids: torch.Tensor | None = None
    coords: torch.Tensor | None = None
    magnification: float | None = None
    levels: LevelLayout | None = None

    def __post_init__(self) -> None:
        if self.levels is not None and self.levels.total != self.instances.shape[0]:
            raise ValueError(
                f"bag {self.bag_id}: levels hold {self.levels.total} rows but there are {self.instances.shape[0]} instances"
            )

    @property
    def size(self) -> int:
        """Number of instances in the bag (all levels)."""
        return int(self.instances.shape[0])

    @property
    def sampling_size(self) -> int:
        """Number of positions `subset` draws from: the lowest level's rows for a multi-level bag."""
        return self.size if self.levels is None else self.levels.sizes[0]

    def level(self, index: int) -> Bag:
        """Level `index` (0 = lowest magnification) as a single-level bag."""
        if self.levels is None:
            if index != 0:
                raise IndexError(f"bag {self.bag_id} has one level; asked for level {index}")
            return self
        rows = self.levels.slices[index]
        return replace(
            self._pick(torch.arange(rows.start, rows.stop)),
            magnification=self.levels.magnifications[index],
            levels=None,
        )

    def subset(self, positions: torch.Tensor) -> Bag:
        """The bag restricted to `positions` (repeats allowed); the label is unchanged.

        For a multi-level bag, positions index the lowest level and every higher level
        keeps the children of the chosen tiles, so the levels stay consistent; a bag whose
        levels are not parent/children aligned is refused with a ValueError.
        """
        picked = self._pick(self.rows_of(positions))
        if self.levels is not None:
            ratios = self.levels.children_per_tile()
            picked.levels = LevelLayout(self.levels.magnifications, tuple(len(positions) * r for r in ratios))
        return picked

    def rows_of(self, positions: torch.Tensor) -> torch.Tensor:
        """The rows of the bag that `subset(positions)` keeps, in its order."""
        if self.levels is None:
            return positions
        try:
            ratios = self.levels.children_per_tile()
        except ValueError as error:
            raise ValueError(f"bag {self.bag_id}: cannot subset its levels: {error}") from None
        positions = positions.long().cpu()
        rows = []
        for ratio, level_rows in zip(ratios, self.levels.slices, strict=True):
            children = positions[:, None] * ratio + torch.arange(ratio)[None, :]  # (s, ratio)
            rows.append(level_rows.start + children.reshape(-1))  # (s * ratio,)
        return torch.cat(rows)  # (sum_l s * ratio_l,)

    def with_instances(self, instances: torch.Tensor) -> Bag:
        """The same bag with other per-row instances (e.g. its encoded features)."""
        if instances.shape[0] != self.size:
            raise ValueError(f"bag {self.bag_id}: {instances.shape[0]} rows given for {self.size} instances")
        return replace(self, instances=instances)

    def _pick(self, rows: torch.Tensor) -> Bag:
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows.to(t.device)]

        return Bag(
            instances=self.instances[rows.to(self.instances.device)],
            label=self.label,
            bag_id=self.bag_id,
            instance_labels=pick(self.instance_labels),
            instance_ids=pick(self.instance_ids),
            coords=pick(self.coords),
            magnification=self.magnification,
            levels=None,
        )


def collate_single_bag(items: list[Bag]) -> Bag:
    """Collate for `batch_size=1` loaders: the one bag, unchanged."""
    if len(items) != 1:
        raise ValueError(f"bags are processed one at a time; got a batch of {len(items)}")
    return items[0]
