"""Ground-truth masks of a slide cohort (tumour; lesion kinds): where they are kept and how they are read."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def tumour_mask_path(root: str | Path, slide_id: str) -> Path:
    """Where a cohort keeps the ground-truth tumour mask of `slide_id`."""
    return Path(root) / "masks" / f"{slide_id}.png"


def kinds_mask_path(root: str | Path, slide_id: str) -> Path:
    """Where a benchmark cohort keeps the lesion-kind map of `slide_id`."""
    return Path(root) / "masks" / f"{slide_id}_kinds.png"


def _read_grey(path: str | Path, what: str) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise FileNotFoundError(f"{path}: {what} missing or unreadable")
    return mask  # (h, w) uint8


def read_tumour_mask(path: str | Path) -> np.ndarray:
    """Read a saved tumour mask as a (h, w) bool array."""
    return _read_grey(path, "tumour mask") > 127


def read_kinds_mask(path: str | Path) -> np.ndarray:
    """Read a saved lesion-kind map as (h, w) uint8 (0 = none, k + 1 = kind k of the cohort)."""
    return _read_grey(path, "lesion-kind mask")
