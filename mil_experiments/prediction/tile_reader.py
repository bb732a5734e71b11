"""Reading tiles of one slide by row (depth-first rows of a tiling), counting every read.

Rows are read in aligned blocks: a run of 4^j consecutive rows starting at a multiple of
4^j is the set of descendants of one coarser tile, read as one region
(`tiling.read_tile_rows`), as the extraction reads a lowest tile's block. ZoomMIL asks for
the children of its chosen tiles, so each chosen tile costs one region read.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from mil_experiments.data.wsi.readers import WholeSlide
from mil_experiments.data.wsi.tiling import MultiMagnificationTiling, read_tile_rows


def aligned_block(rows: np.ndarray, max_block: int) -> int:
    """The largest 4^j <= max_block such that `rows` is a sequence of whole aligned blocks of 4^j rows."""
    block = 4 ** int(round(math.log(max_block, 4))) if max_block >= 1 else 1
    while block > 1:
        if len(rows) % block == 0:
            groups = rows.reshape(-1, block)  # (n / b, b)
            if np.all(groups[:, 0] % block == 0) and np.all(groups - groups[:, :1] == np.arange(block)[None, :]):
                return block
        block //= 4
    return 1


class TileReader:
    """Reads rows of a slide's tiling; `tiles_read[m]` and `regions_read[m]` count what was read."""

    def __init__(self, slide: WholeSlide, tiling: MultiMagnificationTiling) -> None:
        self.slide = slide
        self.tiling = tiling
        self.tiles_read: Counter[float] = Counter()
        self.regions_read: Counter[float] = Counter()

    def read(self, magnification: float, rows: np.ndarray) -> np.ndarray:
        """(n, T, T, 3) uint8 tiles of `rows` at `magnification`, in the order given."""
        rows = np.asarray(rows, dtype=np.int64)  # (n,)
        if len(rows) == 0:
            t = self.tiling.tile_size
            return np.empty((0, t, t, 3), dtype=np.uint8)
        block = aligned_block(rows, 4 ** self.tiling.depth(magnification))
        parts = [read_tile_rows(self.slide, self.tiling, magnification, int(start), block) for start in rows[::block]]
        self.tiles_read[magnification] += len(rows)
        self.regions_read[magnification] += len(parts)
        return np.concatenate(parts)  # (n, T, T, 3)
