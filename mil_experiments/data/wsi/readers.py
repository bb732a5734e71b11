"""Whole-slide readers chosen by name (`tiffslide` or `openslide`) behind one small interface.

Both libraries expose the OpenSlide API; `WholeSlide` hides their differences (RGB vs
RGBA regions, property prefixes, behaviour outside the slide) and adds what tiling needs:
level-0 reads padded with white outside the slide, reads rescaled to a target pixel size,
and the slide's base magnification from its metadata.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np

from mil_experiments.errors import ConfigError, DataError

READERS = ("tiffslide", "openslide")

# Objective power conventionally assigned to a scan's pixel size: 10x <-> 1 um/px.
MICRONS_AT_10X = 1.0


class WholeSlide:
    """An open slide: levels, metadata and RGB pixel reads.

    Attributes:
        path: the slide file.
        reader: name of the library that reads it.
        dimensions: (width, height) of level 0 in pixels.
        level_count: number of pyramid levels.
        level_dimensions: (width, height) of each level.
        level_downsamples: downsample factor of each level relative to level 0.
        mpp: microns per level-0 pixel (x), or None when the file does not say.
        objective_power: scanner objective power, or None when the file does not say.
    """

    def __init__(self, path: Path, reader: str, handle: object) -> None:
        self.path = path
        self.reader = reader
        self._handle = handle
        self.dimensions: tuple[int, int] = tuple(int(v) for v in handle.dimensions)
        self.level_count: int = int(handle.level_count)
        self.level_dimensions: list[tuple[int, int]] = [tuple(int(v) for v in d) for d in handle.level_dimensions]
        self.level_downsamples: list[float] = [float(d) for d in handle.level_downsamples]
        props = handle.properties
        self.mpp: float | None = _positive_float(props.get(f"{reader}.mpp-x"))
        self.objective_power: float | None = _positive_float(props.get(f"{reader}.objective-power"))

    # --- context manager --------------------------------------------------------------
    def close(self) -> None:
        """Release the file handle."""
        self._handle.close()

    def __enter__(self) -> WholeSlide:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"WholeSlide({str(self.path)!r}, reader={self.reader!r}, dimensions={self.dimensions}, levels={self.level_count})"

    # --- reads -------------------------------------------------------------------------
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read an RGB region; pixels outside the slide are white.

        Args:
            location: (x, y) of the top-left corner in level-0 pixels (may be negative or
                beyond the slide).
            level: pyramid level to read from.
            size: (width, height) of the region in pixels of `level`.

        Returns:
            (height, width, 3) uint8 array.
        """
        if not 0 <= level < self.level_count:
            raise DataError(f"{self.path}: level {level} does not exist (the slide has {self.level_count})")
        x, y = int(location[0]), int(location[1])
        w, h = int(size[0]), int(size[1])
        out = np.full((h, w, 3), 255, dtype=np.uint8)  # (h, w, 3)
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        # the requested window in `level` pixels, clipped to the level's extent
        lx, ly = x / ds, y / ds
        cx0, cy0 = max(0, math.floor(lx)), max(0, math.floor(ly))
        cx1, cy1 = min(lw, math.floor(lx) + w), min(lh, math.floor(ly) + h)
        if cx1 <= cx0 or cy1 <= cy0:
            return out
        ox, oy = cx0 - math.floor(lx), cy0 - math.floor(ly)
        try:
            region = self._handle.read_region((round(cx0 * ds), round(cy0 * ds)), level, (cx1 - cx0, cy1 - cy0))
        except Exception as error:  # the libraries raise assorted types for corrupt tiles
            raise DataError(f"{self.path}: {self.reader} cannot read level {level} at {location}: {error}") from error
        out[oy : oy + (cy1 - cy0), ox : ox + (cx1 - cx0)] = _to_rgb_on_white(np.asarray(region))
        return out

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed `downsample` (so no upsampling)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-6):
                best = level
        return best

    def read_scaled(self, location: tuple[float, float], size_level0: float, out_size: int) -> np.ndarray:
        """Read a level-0 square and resample it to `out_size` x `out_size` pixels.

        The square is read from the coarsest level that is at least as fine as the target
        and resized bilinearly (ZoomMIL's preprocessing), so any magnification at or below
        the scan's can be served whatever the pyramid holds.

        Args:
            location: (x, y) top-left corner in level-0 pixels.
            size_level0: side of the square in level-0 pixels.
            out_size: side of the returned image in pixels.

        Returns:
            (out_size, out_size, 3) uint8 array.
        """
        downsample = size_level0 / out_size
        level = self.best_level_for_downsample(downsample)
        ds = self.level_downsamples[level]
        side = max(1, round(size_level0 / ds))
        region = self.read_region((round(location[0]), round(location[1])), level, (side, side))  # (side, side, 3)
        if side == out_size:
            return region
        return cv2.resize(region, (out_size, out_size), interpolation=cv2.INTER_LINEAR)  # (out, out, 3)

    def thumbnail(self, downsample: float) -> np.ndarray:
        """The whole slide at `downsample` x its level-0 size (bilinear from the best level).

        Returns:
            (ceil(H / downsample), ceil(W / downsample), 3) uint8 array.
        """
        if downsample < 1:
            raise ValueError(f"thumbnail downsample must be >= 1; got {downsample}")
        width, height = self.dimensions
        out_w, out_h = max(1, math.ceil(width / downsample)), max(1, math.ceil(height / downsample))
        level = self.best_level_for_downsample(downsample)
        lw, lh = self.level_dimensions[level]
        region = self.read_region((0, 0), level, (lw, lh))  # (lh, lw, 3)
        # scale so that one output pixel covers `downsample` level-0 pixels exactly
        scale = self.level_downsamples[level] / downsample
        cover_w, cover_h = max(1, round(lw * scale)), max(1, round(lh * scale))
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        resized = cv2.resize(region, (cover_w, cover_h), interpolation=interpolation)  # (cover_h, cover_w, 3)
        out = np.full((out_h, out_w, 3), 255, dtype=np.uint8)
        h, w = min(out_h, cover_h), min(out_w, cover_w)
        out[:h, :w] = resized[:h, :w]
        return out


def open_slide(path: str | Path, reader: str = "tiffslide") -> WholeSlide:
    """Open a whole-slide image with the reader named `reader` (`tiffslide` or `openslide`).

    Raises:
        ConfigError: the reader name is unknown.
        DataError: the file is missing or the reader cannot open it.
    """
    path = Path(path)
    if reader not in READERS:
        raise ConfigError(f"reader={reader!r}: choose one of {', '.join(READERS)}")
    if not path.is_file():
        raise DataError(f"{path}: slide file not found")
    try:
        if reader == "tiffslide":
            import tiffslide

            handle = tiffslide.TiffSlide(str(path))
        else:
            import openslide

            handle = openslide.OpenSlide(str(path))
    except ImportError as error:
        raise ConfigError(f"reader={reader!r} is not installed ({error})") from error
    except Exception as error:  # each library has its own exception types for unreadable files
        raise DataError(f"{path}: {reader} cannot open it: {type(error).__name__}: {error}") from error
    return WholeSlide(path, reader, handle)


def base_magnification(slide: WholeSlide, override: float | None = None) -> float:
    """The magnification of a slide's level 0.

    Taken from `override` when given, else the objective power in the metadata, else
    10 / mpp (1 um/px <-> 10x). A slide with neither is an error, not a guess.
    """
    if override is not None:
        if override <= 0:
            raise ConfigError(f"base_magnification={override}: must be positive")
        return float(override)
    if slide.objective_power is not None:
        return slide.objective_power
    if slide.mpp is not None:
        return 10.0 * MICRONS_AT_10X / slide.mpp
    raise DataError(
        f"{slide.path}: no objective power and no microns-per-pixel in its metadata; set base_magnification"
    )


def _positive_float(value: object) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 and math.isfinite(number) else None


def _to_rgb_on_white(region: np.ndarray) -> np.ndarray:
    """RGB, or RGBA composited onto white (OpenSlide marks missing pixels as transparent)."""
    if region.ndim != 3:
        raise ValueError(f"expected an (h, w, c) region, got shape {region.shape}")
    if region.shape[2] == 3:
        return region
    rgb = region[..., :3].astype(np.float32)  # (h, w, 3)
    alpha = region[..., 3:4].astype(np.float32) / 255.0  # (h, w, 1)
    return np.clip(rgb * alpha + 255.0 * (1.0 - alpha), 0, 255).round().astype(np.uint8)
