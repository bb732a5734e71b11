"""The attention heatmap of one slide's prediction: thumbnail | attention over the thumbnail [| tumour mask].

The tiles of the lowest magnification read are painted with their attention as a percentile
within the slide (as CLAM's heatmaps); for ZoomMIL the tiles it zoomed into at each
magnification are outlined, one colour per magnification (the paper's Figure 4). With a
ground-truth mask (`masks_dir=`, e.g. a cohort's `masks/`), a third panel shows it over the
thumbnail, with the same outlines, so where the model zoomed can be checked against the tumour.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from mil_experiments.data.wsi.masks import read_tumour_mask  # noqa: E402
from mil_experiments.data.wsi.readers import open_slide  # noqa: E402
from mil_experiments.prediction.slide_inference import LevelView  # noqa: E402

OUTLINE_COLOURS = ("#00e5ff", "#76ff03", "#ffea00", "#ff4081")


def percentiles(values: np.ndarray) -> np.ndarray:
    """Each value's rank in [0, 1] (0 = lowest)."""
    return np.argsort(np.argsort(values)) / max(len(values) - 1, 1)


def percentile_map(shape: tuple[int, int], coords: np.ndarray, scores: np.ndarray, size_level0: float, downsample: float) -> np.ndarray:
    """(h, w) map of each tile's score percentile over a thumbnail `downsample` times smaller than level 0; NaN off the tiles."""
    heat = np.full(shape, np.nan, dtype=np.float32)  # (h, w)
    for (x, y), value in zip(coords, percentiles(scores), strict=True):
        x0, y0 = int(x / downsample), int(y / downsample)
        x1, y1 = int(np.ceil((x + size_level0) / downsample)), int(np.ceil((y + size_level0) / downsample))
        heat[y0:y1, x0:x1] = value
    return heat


def overlay_heat(fig, ax, thumb: np.ndarray, heat: np.ndarray) -> None:
    """The thumbnail with `heat` over it; colour and opacity both grow with it, so low-attention tissue stays visible."""
    ax.imshow(thumb)
    colours = plt.get_cmap("inferno")(np.nan_to_num(heat))  # (h, w, 4)
    colours[..., 3] = np.where(np.isnan(heat), 0.0, 0.25 + 0.7 * np.nan_to_num(heat))
    ax.imshow(colours)
    fig.colorbar(plt.cm.ScalarMappable(cmap="inferno", norm=plt.Normalize(0, 1)), ax=ax, fraction=0.046, pad=0.02)


def mask_overlay(thumb: np.ndarray, mask_path: Path) -> np.ndarray:
    """(h, w, 3) uint8: the thumbnail in grey with the mask's tumour pixels in red (any size of mask, resized to the thumbnail)."""
    import cv2

    mask = read_tumour_mask(mask_path).astype(np.uint8)  # (H, W) 0 / 1
    mask = cv2.resize(mask, (thumb.shape[1], thumb.shape[0]), interpolation=cv2.INTER_NEAREST) > 0  # (h, w)
    grey = thumb.mean(axis=2, keepdims=True).repeat(3, axis=2)  # (h, w, 3)
    shown = 0.55 * grey + 0.45 * 255.0
    shown[mask] = (214.0, 39.0, 40.0)
    return shown.astype(np.uint8)


def draw_heatmap(slide_path: Path, reader: str, levels: list[LevelView], title: str, out: Path, thumbnail_size: int = 512,
                 mask_path: Path | None = None) -> Path:
    """Write the PNG at `out`; the thumbnail's longest side is about `thumbnail_size` pixels.

    `mask_path`: the slide's ground-truth mask (white = tumour); a third panel when the file
    exists, "no mask" there when it does not.
    """
    with open_slide(slide_path, reader) as slide:
        downsample = max(1.0, max(slide.dimensions) / thumbnail_size)
        thumb = slide.thumbnail(downsample)  # (h, w, 3)
    base = levels[0]
    if base.scores is not None and len(base.scores):
        heat = percentile_map(thumb.shape[:2], base.coords, base.scores, base.size_level0, downsample)  # (h, w)
    else:
        heat = np.full(thumb.shape[:2], np.nan, dtype=np.float32)  # (h, w)
    panels = 3 if mask_path is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 4.6))
    axes[0].imshow(thumb)
    axes[0].set_title("slide")
    overlay_heat(fig, axes[1], thumb, heat)
    outlined = [axes[1]]
    if mask_path is not None:
        if mask_path.is_file():
            axes[2].imshow(mask_overlay(thumb, mask_path))
            axes[2].set_title("tumour mask (red), zoomed tiles outlined")
            outlined.append(axes[2])
        else:
            axes[2].imshow(thumb)
            axes[2].set_title(f"no mask ({mask_path.name})")
    legend = []
    for i, view in enumerate(v for v in levels if len(v.zoomed)):
        colour = OUTLINE_COLOURS[i % len(OUTLINE_COLOURS)]
        side = view.size_level0 / downsample
        for ax in outlined:
            for x, y in view.zoomed:
                ax.add_patch(Rectangle((x / downsample, y / downsample), side, side, fill=False, edgecolor=colour, linewidth=1.2))
        legend.append(Patch(fill=False, edgecolor=colour, label=f"zoomed in at {view.magnification:g}x ({len(view.zoomed)})"))
    if legend:
        axes[1].legend(handles=legend, loc="lower right", fontsize=7, framealpha=0.7)
    axes[1].set_title(f"attention percentile, {base.magnification:g}x tiles")
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
