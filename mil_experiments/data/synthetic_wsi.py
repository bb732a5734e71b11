"""Synthetic whole-slide tile bags: one bag per synthetic slide, its tissue tiles as instances.

The cohort (pyramidal TIFFs, tumour masks, labels and splits) lives under `root`; when
`root` is empty or absent it is generated first (`mil_experiments.data.wsi.synthetic`,
as `scripts/make_synthetic_slides.py` does). An existing cohort made with other generator
settings is an error, not silently reused. Tissue is detected at `tissue_magnification`
and tiles are cut at `magnification` in depth-first order; each tile's instance label is
1 when at least `instance_label_threshold` of it is tumour in the ground-truth mask.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mil_experiments.bag import Bag
from mil_experiments.data.datamodule import BagDataModule
from mil_experiments.data.slide_splits import SPLITS, read_labels, read_splits
from mil_experiments.data.wsi.masks import read_tumour_mask, tumour_mask_path
from mil_experiments.data.wsi.readers import open_slide
from mil_experiments.data.wsi.synthetic import CohortConfig, make_cohort
from mil_experiments.data.wsi.tiling import (
    MultiMagnificationTiling,
    mask_fraction_per_tile,
    read_tile_block,
    tile_slide,
)
from mil_experiments.data.wsi.tissue import TissueConfig
from mil_experiments.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class SlideTiles:
    """Where the tiles of one slide are: the slide file, its tiling and its labels."""

    slide_id: str
    path: Path
    label: int
    tiling: MultiMagnificationTiling
    instance_labels: np.ndarray


def resized_tiles(tiles: np.ndarray, image_size: int | None) -> torch.Tensor:
    """(N, T, T, 3) uint8 tiles -> (N, 3, S, S) uint8, resized (bilinear, antialiased, rounded) when S != T."""
    out = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()  # (N, 3, T, T) uint8
    if image_size is not None and image_size != out.shape[-1]:
        out = F.interpolate(out.float(), size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        out = out.round().clamp(0, 255).to(torch.uint8)  # (N, 3, S, S)
    return out


def normalised(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) uint8 -> float, scaled to [0, 1] then standardised with (1, 3, 1, 1) mean and std."""
    return (images.float() / 255.0 - mean) / std  # (N, 3, S, S)


class SlideTileDataset(Dataset):
    """Tile bags read from slides (decoded tiles optionally kept in memory)."""

    def __init__(self, slides: list[SlideTiles], reader: str, magnification: float, image_size: int | None, mean: list[float], std: list[float], cache: bool) -> None:
        self.slides = slides
        self.reader = reader
        self.magnification = magnification
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.slides)

    @property
    def labels(self) -> list[int]:
        """Bag labels in dataset order."""
        return [s.label for s in self.slides]

    def _tiles(self, index: int) -> torch.Tensor:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        entry = self.slides[index]
        with open_slide(entry.path, self.reader) as slide:
            blocks = [read_tile_block(slide, entry.tiling, i, self.magnification) for i in range(entry.tiling.num_low_tiles)]
        tiles = resized_tiles(np.concatenate(blocks), self.image_size)  # (N, 3, S, S) uint8
        if self.cache is not None:
            self.cache[index] = tiles
        return tiles

    def __getitem__(self, index: int) -> Bag:
        entry = self.slides[index]
        images = normalised(self._tiles(index), self.mean, self.std)  # (N, 3, S, S)
        coords = entry.tiling.coords[self.magnification]  # (N, 2)
        return Bag(
            instances=images,
            label=torch.tensor(entry.label, dtype=torch.long),
            bag_id=entry.slide_id,
            instance_labels=torch.from_numpy(entry.instance_labels),
            instance_ids=torch.arange(images.shape[0]),
            coords=torch.from_numpy(coords),
            magnification=self.magnification,
        )


class SyntheticWSIDataModule(BagDataModule):
    """Tile bags of the synthetic slide cohort; see the module docstring."""

    @dataclass
    class Config(BagDataModule.Config):
        name: str = "synthetic_wsi"
        root: str = "data/synthetic_wsi"
        generate: bool = True
        reader: str = "tiffslide"
        magnification: float = 10.0
        tissue_magnification: float = 2.5
        tile_size: int = 64
        image_size: int | None = None
        tissue: TissueConfig = field(default_factory=TissueConfig)
        instance_label_threshold: float = 0.5
        cache_tiles: bool = True
        mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
        std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
        generator: CohortConfig = field(default_factory=CohortConfig)

    def __init__(self, config: Config, seed: int) -> None:
        super().__init__(config, seed)
        c = config
        if isinstance(c.tissue, dict):
            c.tissue = TissueConfig(**c.tissue)
        if isinstance(c.generator, dict):
            c.generator = CohortConfig(**c.generator)
        if c.tissue_magnification > c.magnification:
            raise ConfigError(f"dataset.tissue_magnification={c.tissue_magnification} must not exceed dataset.magnification={c.magnification}")
        if len(c.mean) != 3 or len(c.std) != 3:
            raise ConfigError("dataset.mean and dataset.std need 3 values (RGB)")
        self.num_classes = 2
        side = c.image_size or c.tile_size
        self.instance_shape = (3, side, side)
        self.root = Path(c.root)

    def prepare_cohort(self) -> None:
        """Generate the cohort if `root` is empty; check that an existing one matches."""
        c = self.config
        summary = self.root / "cohort.json"
        if summary.is_file():
            made_with = json.loads(summary.read_text()).get("config")
            wanted = json.loads(json.dumps(asdict(c.generator)))
            made_with = {k: v for k, v in (made_with or {}).items() if k != "num_workers"}
            wanted.pop("num_workers")
            if made_with != wanted:
                changed = sorted(k for k in wanted if made_with.get(k) != wanted[k])
                raise DataError(
                    f"{self.root}: holds a cohort made with other generator settings ({', '.join(changed)});"
                    " delete it or choose another dataset.root"
                )
            return
        if self.root.exists() and any(self.root.iterdir()):
            raise DataError(f"{self.root}: not empty and has no cohort.json; choose an empty or new dataset.root")
        if not c.generate:
            raise DataError(f"{self.root}: no synthetic cohort (run scripts/make_synthetic_slides.py or set dataset.generate=true)")
        log.info("generating the synthetic cohort in %s", self.root)
        make_cohort(self.root, c.generator)

    def build_splits(self) -> tuple[SlideTileDataset, SlideTileDataset, SlideTileDataset]:
        c = self.config
        self.prepare_cohort()
        labels, _ = read_labels(self.root / "labels.csv")
        split_of = read_splits(self.root / "splits.csv")
        slides = {split: [] for split in SPLITS}
        for slide_id in sorted(split_of):
            path = self.root / "slides" / f"{slide_id}.tiff"
            with open_slide(path, c.reader) as slide:
                tiling = tile_slide(slide, [c.tissue_magnification, c.magnification], c.tile_size, c.tissue)
                dimensions = slide.dimensions
            mask = read_tumour_mask(tumour_mask_path(self.root, slide_id))
            fraction = mask_fraction_per_tile(mask, dimensions, tiling.coords[c.magnification], tiling.tile_size_level0[c.magnification])
            tiling.tissue_mask = None  # not needed after tiling; keeps the datasets small
            instance_labels = (fraction >= c.instance_label_threshold).astype(np.int64)
            slides[split_of[slide_id]].append(SlideTiles(slide_id, path, labels[slide_id], tiling, instance_labels))
        return tuple(
            SlideTileDataset(slides[s], c.reader, c.magnification, c.image_size, c.mean, c.std, c.cache_tiles) for s in SPLITS
        )
