"""Ground-truth tumour masks of a slide cohort: where they are kept and how they are read."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def tumour_mask_path(root: str | Path, slide_id: str) -> Path:
    """Where a cohort keeps the ground-truth tumour mask of `slide_id`."""
    return Path(root) / "masks" / f"{slide_id}.png"


def read_tumour_mask(path: str | Path) -> np.ndarray:
    """Read a saved tumour mask as a (h, w) bool array."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise FileNotFoundError(f"{path}: tumour mask missing or unreadable")
    return mask > 127
