"""Tissue detection at low resolution: Otsu's threshold on HSV saturation, with smoothing.

Stained tissue is saturated and glass is grey-white, so the saturation channel separates
them. As in ZoomMIL's preprocessing the mask is computed once, at the lowest tiling
magnification; tiles are then kept by the fraction of their area that is tissue.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from mil_experiments.errors import ConfigError


@dataclass
class TissueConfig:
    """How tissue is told from background.

    Attributes:
        downsample: the mask is computed at the lowest tiling magnification divided by
            this factor (ZoomMIL's `downsampling_factor`); it must divide the tile size.
        sigma: Gaussian smoothing of the saturation, in pixels of the mask image.
        min_saturation: floor on the threshold, so that Otsu cannot split blank glass
            into "tissue" and "background" on a slide with no tissue.
        min_tissue_fraction: a low-magnification tile is kept when at least this fraction
            of its area is tissue.
        keep_all_if_none: when no tile passes, keep every tile (ZoomMIL's behaviour)
            instead of reporting an error.
    """

    downsample: int = 4
    sigma: float = 2.0
    min_saturation: float = 0.05
    min_tissue_fraction: float = 0.25
    keep_all_if_none: bool = False

    def __post_init__(self) -> None:
        if self.downsample < 1:
            raise ConfigError(f"tissue.downsample={self.downsample}: must be >= 1")
        if self.sigma < 0:
            raise ConfigError(f"tissue.sigma={self.sigma}: must be >= 0")
        if not 0 <= self.min_saturation < 1:
            raise ConfigError(f"tissue.min_saturation={self.min_saturation}: must be in [0, 1)")
        if not 0 <= self.min_tissue_fraction <= 1:
            raise ConfigError(f"tissue.min_tissue_fraction={self.min_tissue_fraction}: must be in [0, 1]")


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (max - min) / max of an RGB image, in [0, 1]."""
    rgb = rgb.astype(np.float32)  # (H, W, 3)
    high = rgb.max(axis=2)  # (H, W)
    low = rgb.min(axis=2)  # (H, W)
    return np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0).astype(np.float32)  # (H, W)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the cut maximising between-class variance."""
    hist, edges = np.histogram(values.ravel(), bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)  # (bins,)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(hist * centers)
    mean_low = sum_low / np.maximum(weight_low, 1e-12)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1e-12)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2  # (bins,)
    return float(edges[int(np.argmax(between)) + 1])


def tissue_mask(rgb: np.ndarray, config: TissueConfig) -> np.ndarray:
    """Boolean tissue mask of a low-resolution RGB image.

    Saturation, Gaussian smoothing (sigma in pixels), then Otsu's threshold (not below
    `config.min_saturation`).

    Returns:
        (H, W) bool array.
    """
    sat = saturation(rgb)  # (H, W)
    if config.sigma > 0:
        sat = cv2.GaussianBlur(sat, (0, 0), sigmaX=config.sigma, sigmaY=config.sigma, borderType=cv2.BORDER_REFLECT)
    threshold = max(otsu_threshold(sat), config.min_saturation)
    return sat > threshold  # (H, W)


def grid_tissue_fraction(mask: np.ndarray, cell: int, grid_shape: tuple[int, int]) -> np.ndarray:
    """Fraction of tissue in each `cell` x `cell` block of a mask, on a (rows, cols) grid.

    The mask is padded with background to the grid's extent (the slide is padded with
    white), so border cells count their outside part as background.

    Returns:
        (rows, cols) float array.
    """
    rows, cols = grid_shape
    padded = np.zeros((rows * cell, cols * cell), dtype=np.float32)
    h, w = min(mask.shape[0], rows * cell), min(mask.shape[1], cols * cell)
    padded[:h, :w] = mask[:h, :w]
    return padded.reshape(rows, cell, cols, cell).mean(axis=(1, 3))  # (rows, cols)
