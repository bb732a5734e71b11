"""Aligned multi-magnification tiling in depth-first order (ZoomMIL's layout).

The tile size in pixels is the same at every magnification, so a tile at magnification m
covers exactly 2 x 2 tiles at 2m, and 4^d tiles at 2^d m. Tissue is detected once, at the
lowest magnification; every descendant of a kept low tile is kept. Tiles of each
magnification are listed depth first: after low tile i come its children (x0, y0),
(x1, y0), (x0, y1), (x1, y1), each recursively followed by its own, so the 4^d descendants
of low tile i are rows [i * 4^d, (i + 1) * 4^d) at magnification 2^d m. This lets ZoomMIL
select the children of chosen tiles with a Kronecker product.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from mil_experiments.data.wsi.readers import WholeSlide, base_magnification
from mil_experiments.data.wsi.tissue import TissueConfig, grid_tissue_fraction, tissue_mask
from mil_experiments.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def magnification_key(magnification: float) -> str:
    """ZoomMIL's name for a magnification: Python float formatting plus "x" ("1.25x", "10.0x")."""
    return f"{float(magnification)}x"


def dfs_offsets(depth: int) -> np.ndarray:
    """Grid offsets (dx, dy) of the 4^depth descendants of a tile, in depth-first order.

    Children come in the order (0, 0), (1, 0), (0, 1), (1, 1); each child is followed by
    its own descendants before the next child.

    Returns:
        (4^depth, 2) int64 array, in units of the descendants' tile size.
    """
    if depth < 0:
        raise ValueError(f"depth must be >= 0; got {depth}")
    offsets = np.zeros((1, 2), dtype=np.int64)
    children = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=np.int64)
    for _ in range(depth):
        offsets = (offsets[:, None, :] * 2 + children[None, :, :]).reshape(-1, 2)  # (4 n, 2)
    return offsets


def check_magnifications(magnifications: list[float] | tuple[float, ...]) -> tuple[float, ...]:
    """Sort magnifications and check that each is the lowest times a power of two."""
    if not magnifications:
        raise ConfigError("magnifications: give at least one")
    mags = tuple(sorted(float(m) for m in magnifications))
    if mags[0] <= 0:
        raise ConfigError(f"magnifications={list(mags)}: must be positive")
    if len(set(mags)) != len(mags):
        raise ConfigError(f"magnifications={list(mags)}: repeated values")
    for m in mags:
        depth = math.log2(m / mags[0])
        if abs(depth - round(depth)) > 1e-6:
            raise ConfigError(f"magnifications={list(mags)}: {m} is not {mags[0]} times a power of two")
    return mags


@dataclass
class MultiMagnificationTiling:
    """Tile coordinates of one slide at several aligned magnifications.

    Attributes:
        magnifications: ascending; each is the lowest times a power of two.
        tile_size: side of every tile in pixels at its own magnification.
        base_magnification: magnification of the slide's level 0.
        low_grid: (N_low, 2) (column, row) of each kept low-magnification tile.
        low_tissue_fraction: (N_low,) tissue fraction of each kept low tile.
        coords: magnification -> (N_m, 2) int64 level-0 (x, y) of each tile's top-left
            corner, in depth-first order; N_m = N_low * 4^depth(m).
        tile_size_level0: magnification -> side of a tile in level-0 pixels.
        tissue_mask: the low-resolution tissue mask, for figures.
        mask_downsample: level-0 pixels per pixel of `tissue_mask`.
    """

    magnifications: tuple[float, ...]
    tile_size: int
    base_magnification: float
    low_grid: np.ndarray
    low_tissue_fraction: np.ndarray
    coords: dict[float, np.ndarray]
    tile_size_level0: dict[float, float]
    tissue_mask: np.ndarray | None = None
    mask_downsample: float | None = None

    @property
    def num_low_tiles(self) -> int:
        """Number of kept tiles at the lowest magnification."""
        return int(self.low_grid.shape[0])

    def depth(self, magnification: float) -> int:
        """log2(magnification / lowest magnification)."""
        return round(math.log2(magnification / self.magnifications[0]))

    def descendants(self, low_index: int, magnification: float) -> slice:
        """Rows at `magnification` that lie inside low tile `low_index`."""
        n = 4 ** self.depth(magnification)
        return slice(low_index * n, (low_index + 1) * n)


def plan_tiling(
    dimensions: tuple[int, int],
    base_mag: float,
    magnifications: list[float] | tuple[float, ...],
    tile_size: int,
    keep: np.ndarray,
    tissue_fraction: np.ndarray | None = None,
) -> MultiMagnificationTiling:
    """Coordinates of the kept low tiles and of all their descendants.

    Args:
        dimensions: (width, height) of level 0 (only used to check the grid's extent).
        base_mag: magnification of level 0.
        magnifications: tiling magnifications (sorted and checked here).
        tile_size: tile side in pixels at every magnification.
        keep: (rows, cols) bool grid of low-magnification tiles to keep.
        tissue_fraction: (rows, cols) tissue fraction of each grid cell, if known.
    """
    mags = check_magnifications(magnifications)
    if tile_size < 1:
        raise ConfigError(f"tile_size={tile_size}: must be positive")
    if mags[-1] > base_mag * (1 + 1e-6):
        raise ConfigError(f"magnifications={list(mags)}: {mags[-1]}x is above the slide's {base_mag:g}x")
    sizes = {m: tile_size * base_mag / m for m in mags}
    rows, cols = keep.shape
    width, height = dimensions
    if cols * sizes[mags[0]] < width or rows * sizes[mags[0]] < height:
        raise ValueError(f"a {rows}x{cols} grid of {sizes[mags[0]]:g}-pixel tiles does not cover {width}x{height}")
    row_idx, col_idx = np.nonzero(keep)  # row-major order
    low_grid = np.stack([col_idx, row_idx], axis=1).astype(np.int64)  # (N_low, 2)
    origins = low_grid.astype(np.float64) * sizes[mags[0]]  # (N_low, 2)
    coords = {}
    for m in mags:
        depth = round(math.log2(m / mags[0]))
        offsets = dfs_offsets(depth).astype(np.float64) * sizes[m]  # (4^d, 2)
        coords[m] = np.rint(origins[:, None, :] + offsets[None, :, :]).reshape(-1, 2).astype(np.int64)  # (N_m, 2)
    fraction = tissue_fraction[row_idx, col_idx] if tissue_fraction is not None else np.ones(len(row_idx))
    return MultiMagnificationTiling(
        magnifications=mags,
        tile_size=int(tile_size),
        base_magnification=float(base_mag),
        low_grid=low_grid,
        low_tissue_fraction=fraction.astype(np.float32),
        coords=coords,
        tile_size_level0=sizes,
    )


def tile_slide(
    slide: WholeSlide,
    magnifications: list[float] | tuple[float, ...],
    tile_size: int,
    tissue: TissueConfig,
    base_mag: float | None = None,
) -> MultiMagnificationTiling:
    """Detect tissue at the lowest magnification and tile the slide at every magnification.

    The slide is treated as padded with white to a whole number of low tiles.

    Args:
        slide: an open slide.
        magnifications: tiling magnifications, e.g. [1.25, 2.5, 10.0].
        tile_size: tile side in pixels at every magnification.
        tissue: tissue detection settings.
        base_mag: overrides the magnification read from the slide's metadata.

    Raises:
        DataError: no tile holds enough tissue (and `tissue.keep_all_if_none` is off).
    """
    mags = check_magnifications(magnifications)
    base = base_magnification(slide, base_mag)
    if mags[-1] > base * (1 + 1e-6):
        raise ConfigError(f"magnifications={list(mags)}: {mags[-1]}x is above {slide.path}'s {base:g}x")
    if tile_size % tissue.downsample:
        raise ConfigError(f"tissue.downsample={tissue.downsample} must divide tile_size={tile_size}")
    low_size = tile_size * base / mags[0]  # level-0 pixels per low tile
    width, height = slide.dimensions
    rows, cols = math.ceil(height / low_size - 1e-9), math.ceil(width / low_size - 1e-9)
    cell = tile_size // tissue.downsample  # mask pixels per low tile
    mask_downsample = low_size / cell
    mask = tissue_mask(slide.thumbnail(mask_downsample), tissue)  # (h, w)
    fraction = grid_tissue_fraction(mask, cell, (rows, cols))  # (rows, cols)
    keep = fraction >= max(tissue.min_tissue_fraction, 1e-9)
    if not keep.any():
        if not tissue.keep_all_if_none:
            raise DataError(
                f"{slide.path}: no tile at {mags[0]}x has tissue fraction >= {tissue.min_tissue_fraction}"
                " (lower tissue.min_tissue_fraction or set tissue.keep_all_if_none=true)"
            )
        log.warning("%s: no tissue found; keeping all %d tiles (tissue.keep_all_if_none)", slide.path, rows * cols)
        keep = np.ones_like(keep)
    tiling = plan_tiling(slide.dimensions, base, mags, tile_size, keep, fraction)
    tiling.tissue_mask = mask
    tiling.mask_downsample = mask_downsample
    return tiling


def read_tile_block(slide: WholeSlide, tiling: MultiMagnificationTiling, low_index: int, magnification: float) -> np.ndarray:
    """Read the tiles at `magnification` that lie inside low tile `low_index`, depth first.

    The low tile's whole area is read once at the target magnification and cut up, so a
    slide costs one read per (low tile, magnification).

    Returns:
        (4^depth, tile_size, tile_size, 3) uint8 array, in the row order of
        `tiling.coords[magnification][tiling.descendants(low_index, magnification)]`.
    """
    if magnification not in tiling.coords:
        raise ValueError(f"magnification {magnification} is not one of {list(tiling.magnifications)}")
    rows = tiling.descendants(low_index, magnification)
    return read_tile_rows(slide, tiling, magnification, rows.start, rows.stop - rows.start)


def read_tile_rows(slide: WholeSlide, tiling: MultiMagnificationTiling, magnification: float, start: int, count: int) -> np.ndarray:
    """Read rows [start, start + count) of `magnification`: the 4^j descendants of one coarser tile.

    `count` must be 4^j and `start` a multiple of it, so the rows are the depth-first
    descendants of one tile j doublings coarser (which need not be a tiling magnification);
    that tile's area is read once at `magnification` and cut up (`read_tile_block` is the
    case of a lowest-magnification tile). ZoomMIL's raw-slide inference reads the children
    of its chosen tiles this way.

    Returns:
        (count, tile_size, tile_size, 3) uint8 array, in the order of
        `tiling.coords[magnification][start:start + count]`.
    """
    if magnification not in tiling.coords:
        raise ValueError(f"magnification {magnification} is not one of {list(tiling.magnifications)}")
    depth = round(math.log(count, 4)) if count >= 1 else -1
    if count < 1 or 4**depth != count or start % count or start + count > len(tiling.coords[magnification]):
        raise ValueError(f"rows [{start}, {start + count}) at {magnification}x are not the 4^j descendants of one tile")
    t = tiling.tile_size
    size = tiling.tile_size_level0[magnification] * 2**depth  # level-0 side of the coarser tile
    origin = tiling.coords[magnification][start].astype(np.float64)  # (2,) its first descendant shares its corner
    block = slide.read_scaled((origin[0], origin[1]), size, t * 2**depth)  # (t 2^j, t 2^j, 3)
    offsets = dfs_offsets(depth)  # (4^j, 2)
    tiles = np.empty((len(offsets), t, t, 3), dtype=np.uint8)
    for i, (dx, dy) in enumerate(offsets):
        tiles[i] = block[dy * t : (dy + 1) * t, dx * t : (dx + 1) * t]
    return tiles


def mask_fraction_per_tile(mask: np.ndarray, dimensions: tuple[int, int], coords: np.ndarray, size_level0: float) -> np.ndarray:
    """Fraction of each tile covered by a mask of the whole slide (e.g. a tumour annotation).

    Args:
        mask: (h, w) bool mask covering the whole slide at a uniform downsample.
        dimensions: the slide's level-0 (width, height).
        coords: (N, 2) level-0 (x, y) of the tiles.
        size_level0: tile side in level-0 pixels.

    Returns:
        (N,) float32 in [0, 1]; the part of a tile outside the slide counts as uncovered.
    """
    h, w = mask.shape
    ds_x, ds_y = dimensions[0] / w, dimensions[1] / h
    if abs(ds_x - ds_y) > 0.02 * max(ds_x, ds_y):
        raise DataError(f"a mask of shape {mask.shape} does not match a {dimensions[0]}x{dimensions[1]} slide")
    integral = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # (h + 1, w + 1)
    x0 = np.clip(np.rint(coords[:, 0] / ds_x).astype(np.int64), 0, w)
    y0 = np.clip(np.rint(coords[:, 1] / ds_y).astype(np.int64), 0, h)
    x1 = np.clip(np.rint((coords[:, 0] + size_level0) / ds_x).astype(np.int64), 0, w)
    y1 = np.clip(np.rint((coords[:, 1] + size_level0) / ds_y).astype(np.int64), 0, h)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = max(1e-9, (size_level0 / ds_x) * (size_level0 / ds_y))
    return np.clip(inside / area, 0, 1).astype(np.float32)
