"""Whole-slide images: readers, tissue detection, aligned multi-magnification tiling and
the synthetic slide generator."""

from mil_experiments.data.wsi.readers import READERS, WholeSlide, base_magnification, open_slide
from mil_experiments.data.wsi.tiling import (
    MultiMagnificationTiling,
    dfs_offsets,
    magnification_key,
    read_tile_block,
    tile_slide,
)
from mil_experiments.data.wsi.tissue import TissueConfig

__all__ = [
    "READERS",
    "MultiMagnificationTiling",
    "TissueConfig",
    "WholeSlide",
    "base_magnification",
    "dfs_offsets",
    "magnification_key",
    "open_slide",
    "read_tile_block",
    "tile_slide",
]
