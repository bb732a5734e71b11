"""Synthetic whole slides: tiled pyramidal TIFFs of textured tissue with tumour regions.

Each slide is H&E-like: pink fibrous stroma with scattered small nuclei on a white
background, sometimes with lymphoid aggregates (dense small dark nuclei, in every class).
Positive slides also hold tumour regions, large and small, whose nuclei are larger,
darker and more crowded. The stroma between tumour nuclei is lightened so that a tumour
region's mean colour nearly matches normal tissue (`low_mag_camouflage`): at low
magnification, where nuclei blur into the average, tumour is only weakly visible; at
high magnification its morphology is plain. So zooming in matters.

The files are read by both tiffslide and OpenSlide (generic TIFF): level 0 and each 2x
downsampled level are top-level tiled pages (lower levels with `subfiletype=1`), with
resolution in centimetres, so both report the microns per pixel.

A cohort is fully determined by its seed: slide i draws from `SeedSequence([seed, i])`,
so the result does not depend on the number of worker processes.
"""

from __future__ import annotations

import csv
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import tifffile

from mil_experiments.data.wsi.masks import tumour_mask_path
from mil_experiments.errors import ConfigError

STROMA_RGB = np.array([226.0, 160.0, 200.0], dtype=np.float32)
NUCLEUS_RGB = np.array([92.0, 52.0, 140.0], dtype=np.float32)
TUMOUR_NUCLEUS_RGB = np.array([70.0, 34.0, 122.0], dtype=np.float32)
LYMPHOCYTE_RGB = np.array([60.0, 30.0, 110.0], dtype=np.float32)
BACKGROUND_RGB = np.array([243.0, 243.0, 241.0], dtype=np.float32)


@dataclass
class SyntheticSlideConfig:
    """Sizes and morphology of the synthetic slides (lengths in level-0 pixels).

    Attributes:
        width, height: level-0 size.
        mpp: microns per level-0 pixel (0.5 <-> 20x).
        pyramid_levels: number of levels, each half the size of the one above.
        tiff_tile: tile side inside the TIFF.
        compression: "jpeg" (default, like scanners), "deflate" (lossless) or "none".
        jpeg_quality: JPEG quality, 1-100.
        tissue_pieces: number of tissue fragments per slide (range, inclusive).
        nucleus_radius, nucleus_spacing: normal nuclei (mean radius; mean distance
            between neighbours, so the density is 1 / spacing^2).
        tumour_nucleus_radius, tumour_nucleus_spacing: tumour nuclei.
        lymphocyte_radius, lymphocyte_spacing: nuclei of the lymphoid aggregates.
        tumour_regions: number of tumour regions in a positive slide (range, inclusive).
        large_tumour_radius, small_tumour_radius: radius ranges of the two kinds.
        small_tumour_probability: chance that a tumour region is a small one.
        lymphoid_aggregates: number of lymphoid aggregates per slide (range, inclusive).
        lymphoid_radius: radius range of the lymphoid aggregates.
        low_mag_camouflage: 0 = no compensation, 1 = tumour regions have the same mean
            colour as normal tissue.
        mask_downsample: the saved tumour masks are level 0 divided by this factor.
    """

    width: int = 4096
    height: int = 4096
    mpp: float = 0.5
    pyramid_levels: int = 4
    tiff_tile: int = 256
    compression: str = "jpeg"
    jpeg_quality: int = 90
    tissue_pieces: list[int] = field(default_factory=lambda: [1, 3])
    nucleus_radius: float = 1.3
    nucleus_spacing: float = 10.0
    tumour_nucleus_radius: float = 2.4
    tumour_nucleus_spacing: float = 8.5
    lymphocyte_radius: float = 1.1
    lymphocyte_spacing: float = 4.5
    tumour_regions: list[int] = field(default_factory=lambda: [1, 4])
    large_tumour_radius: list[float] = field(default_factory=lambda: [250.0, 550.0])
    small_tumour_radius: list[float] = field(default_factory=lambda: [50.0, 120.0])
    small_tumour_probability: float = 0.5
    lymphoid_aggregates: list[int] = field(default_factory=lambda: [0, 3])
    lymphoid_radius: list[float] = field(default_factory=lambda: [40.0, 110.0])
    low_mag_camouflage: float = 0.9
    mask_downsample: int = 8

    def __post_init__(self) -> None:
        if min(self.width, self.height) < 64:
            raise ConfigError(f"generator.slide.width/height={self.width}x{self.height}: must be at least 64")
        if self.pyramid_levels < 1 or min(self.width, self.height) >> (self.pyramid_levels - 1) < 1:
            raise ConfigError(f"generator.slide.pyramid_levels={self.pyramid_levels}: must be >= 1 and fit the slide size")
        if self.tiff_tile % 16:
            raise ConfigError(f"generator.slide.tiff_tile={self.tiff_tile}: must be a multiple of 16 (TIFF rule)")
        if self.compression not in ("jpeg", "deflate", "none"):
            raise ConfigError(f"generator.slide.compression={self.compression!r}: choose jpeg, deflate or none")
        if not 0 <= self.low_mag_camouflage <= 1:
            raise ConfigError(f"generator.slide.low_mag_camouflage={self.low_mag_camouflage}: must be in [0, 1]")
        if self.mpp <= 0:
            raise ConfigError(f"generator.slide.mpp={self.mpp}: must be positive")
        for name in ("tissue_pieces", "tumour_regions", "lymphoid_aggregates", "large_tumour_radius", "small_tumour_radius", "lymphoid_radius"):
            low_high = getattr(self, name)
            if len(low_high) != 2 or low_high[0] > low_high[1] or low_high[0] < 0:
                raise ConfigError(f"generator.slide.{name}={list(low_high)}: must be [low, high] with 0 <= low <= high")
        if self.tissue_pieces[0] < 1 or self.tumour_regions[0] < 1:
            raise ConfigError("generator.slide.tissue_pieces and generator.slide.tumour_regions must start at >= 1")


@dataclass
class SyntheticSlide:
    """One generated slide, in memory.

    Attributes:
        image: (H, W, 3) uint8 level-0 RGB.
        tumour: (H, W) bool tumour mask (inside tissue only).
        tissue: (H, W) bool tissue mask.
        label: 1 if the slide holds tumour, else 0.
        regions: the tumour regions drawn, as dicts (x, y, radius, kind).
    """

    image: np.ndarray
    tumour: np.ndarray
    tissue: np.ndarray
    label: int
    regions: list[dict]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian noise blurred by `sigma` pixels and rescaled to zero mean, unit std."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    return (noise - noise.mean()) / (noise.std() + 1e-6)


def _blob_field(rng: np.random.Generator, shape: tuple[int, int], centre: tuple[float, float], radii: tuple[float, float], angle: float, wobble: np.ndarray) -> np.ndarray:
    """Normalised elliptical distance (1 on the boundary), perturbed by `wobble`."""
    h, w = shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = xs - centre[0], ys - centre[1]
    c, s = math.cos(angle), math.sin(angle)
    u, v = (c * dx + s * dy) / radii[0], (-s * dx + c * dy) / radii[1]
    return np.sqrt(u * u + v * v) + wobble  # (h, w)


def _tissue_field(rng: np.random.Generator, cfg: SyntheticSlideConfig, coarse: int) -> np.ndarray:
    """Coarse (H/coarse, W/coarse) field that is < 1 inside tissue."""
    h, w = math.ceil(cfg.height / coarse), math.ceil(cfg.width / coarse)
    pieces = int(rng.integers(cfg.tissue_pieces[0], cfg.tissue_pieces[1] + 1))
    field_ = np.full((h, w), 10.0, dtype=np.float32)
    for _ in range(pieces):
        scale = 1.0 / math.sqrt(pieces)
        radii = (rng.uniform(0.22, 0.36) * w * scale * 1.3, rng.uniform(0.22, 0.36) * h * scale * 1.3)
        centre = (rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h)
        wobble = 0.25 * _smooth_noise(rng, (h, w), max(h, w) / 24)
        field_ = np.minimum(field_, _blob_field(rng, (h, w), centre, radii, rng.uniform(0, math.pi), wobble))
    return field_


def _scatter_points(rng: np.random.Generator, allowed: np.ndarray, spacing: float) -> np.ndarray:
    """Uniform random points inside a boolean mask, with density 1 / spacing^2.

    Returns:
        (P, 2) float array of (x, y).
    """
    h, w = allowed.shape
    area = float(allowed.mean()) * h * w
    n = rng.poisson(area / spacing**2) if area > 0 else 0
    if n == 0:
        return np.zeros((0, 2), dtype=np.float64)
    # draw more than needed over the bounding box, keep those inside
    ys_any, xs_any = np.nonzero(allowed.any(axis=1))[0], np.nonzero(allowed.any(axis=0))[0]
    y0, y1, x0, x1 = ys_any[0], ys_any[-1] + 1, xs_any[0], xs_any[-1] + 1
    box_fraction = allowed[y0:y1, x0:x1].mean()
    m = int(n / max(box_fraction, 1e-3) * 1.2) + 16
    pts = np.stack([rng.uniform(x0, x1, m), rng.uniform(y0, y1, m)], axis=1)  # (m, 2)
    inside = allowed[pts[:, 1].astype(np.int64), pts[:, 0].astype(np.int64)]
    return pts[inside][:n]


def _sheet_points(rng: np.random.Generator, allowed: np.ndarray, spacing: float, jitter: float = 0.3) -> np.ndarray:
    """Points on a jittered square grid inside a boolean mask (cells packed in a sheet).

    Regular packing keeps the low-frequency variation of a crowded region small, so it
    does not stand out at low magnification the way Poisson clumps would.

    Returns:
        (P, 2) float array of (x, y).
    """
    ys_any, xs_any = np.nonzero(allowed.any(axis=1))[0], np.nonzero(allowed.any(axis=0))[0]
    if len(ys_any) == 0:
        return np.zeros((0, 2), dtype=np.float64)
    gx = np.arange(xs_any[0], xs_any[-1] + 1, spacing)
    gy = np.arange(ys_any[0], ys_any[-1] + 1, spacing)
    pts = np.stack(np.meshgrid(gx, gy), axis=-1).reshape(-1, 2)  # (m, 2)
    pts = pts + rng.uniform(-jitter, jitter, pts.shape) * spacing
    h, w = allowed.shape
    pts[:, 0] = np.clip(pts[:, 0], 0, w - 1)
    pts[:, 1] = np.clip(pts[:, 1], 0, h - 1)
    return pts[allowed[pts[:, 1].astype(np.int64), pts[:, 0].astype(np.int64)]]


def _draw_nuclei(canvas: np.ndarray, rng: np.random.Generator, points: np.ndarray, radius: float, darkness: tuple[int, int], elongation: float) -> None:
    """Draw filled ellipses (nuclei) onto a uint8 density canvas, in place (max blending)."""
    radii = np.clip(rng.normal(radius, 0.18 * radius, len(points)), 0.6 * radius, 1.6 * radius)
    ratios = rng.uniform(1.0 - elongation, 1.0, len(points))
    angles = rng.uniform(0, 180, len(points))
    values = rng.integers(darkness[0], darkness[1] + 1, len(points))
    shift = 4  # sub-pixel precision for cv2 drawing
    centres = np.rint(points * 16).astype(np.int64).tolist()
    axes = np.maximum(1, np.rint(np.stack([radii, radii * ratios], axis=1) * 16)).astype(np.int64).tolist()
    for centre, axis, angle, value in zip(centres, axes, angles.tolist(), values.tolist(), strict=True):
        cv2.ellipse(canvas, centre, axis, angle, 0, 360, value, thickness=-1, lineType=cv2.LINE_AA, shift=shift)


def stroma_shade(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w) multiplicative shade of pink fibrous stroma: two fibre orientations mixed by a smooth field."""
    half = (h // 2, w // 2)
    fibres_a = cv2.GaussianBlur(rng.standard_normal(half, dtype=np.float32), (0, 0), sigmaX=5.0, sigmaY=0.7)
    fibres_b = cv2.GaussianBlur(rng.standard_normal(half, dtype=np.float32), (0, 0), sigmaX=0.7, sigmaY=5.0)
    coarse_shape = (max(1, h // 32), max(1, w // 32))
    mix = cv2.resize(1.0 / (1.0 + np.exp(-3.0 * _smooth_noise(rng, coarse_shape, 2.0))), half[::-1])  # (h/2, w/2)
    fibres = mix * fibres_a + (1.0 - mix) * fibres_b  # (h/2, w/2)
    fibres *= 0.07 / (fibres.std() + 1e-6)
    fibres += 0.05 * cv2.resize(_smooth_noise(rng, coarse_shape, 4.0), half[::-1])
    return cv2.resize(1.0 - np.clip(fibres, -0.3, 0.3), (w, h), interpolation=cv2.INTER_LINEAR)  # (h, w)


def lymphoid_aggregates(rng: np.random.Generator, cfg: SyntheticSlideConfig, tissue: np.ndarray, tissue_points: np.ndarray) -> np.ndarray:
    """(h, w) bool mask of the slide's lymphoid aggregates: blobs centred on `tissue_points` ((P, 2) y, x), inside the tissue."""
    lymphoid = np.zeros(tissue.shape, dtype=np.uint8)
    for _ in range(int(rng.integers(cfg.lymphoid_aggregates[0], cfg.lymphoid_aggregates[1] + 1))):
        y, x = tissue_points[rng.integers(len(tissue_points))]
        _draw_blob(lymphoid, rng, (x, y), rng.uniform(*cfg.lymphoid_radius))
    return (lymphoid > 0) & tissue


def generate_slide(rng: np.random.Generator, positive: bool, cfg: SyntheticSlideConfig) -> SyntheticSlide:
    """Draw one slide (level 0 only) and its tumour mask."""
    h, w = cfg.height, cfg.width
    coarse = 16
    field_coarse = _tissue_field(rng, cfg, coarse)  # (h/16, w/16)
    alpha_coarse = np.clip((1.0 - field_coarse) * 12.0, 0.0, 1.0)  # soft edge
    tissue_alpha = cv2.resize(alpha_coarse, (w, h), interpolation=cv2.INTER_LINEAR)  # (h, w)
    tissue = tissue_alpha > 0.5  # (h, w)

    # --- regions: tumours (positive slides) and lymphoid aggregates (all slides) ----------
    regions = []
    tumour = np.zeros((h, w), dtype=np.uint8)
    tissue_points = np.argwhere(tissue[::8, ::8]) * 8  # candidate centres (y, x)
    if len(tissue_points) == 0:
        raise RuntimeError("generated a slide with no tissue; adjust generator.tissue_pieces")
    if positive:
        count = int(rng.integers(cfg.tumour_regions[0], cfg.tumour_regions[1] + 1))
        for _ in range(count):
            small = rng.uniform() < cfg.small_tumour_probability
            low, high = cfg.small_tumour_radius if small else cfg.large_tumour_radius
            radius = rng.uniform(low, high)
            y, x = tissue_points[rng.integers(len(tissue_points))]
            _draw_blob(tumour, rng, (x, y), radius)
            regions.append({"x": int(x), "y": int(y), "radius": float(radius), "kind": "small" if small else "large"})
    tumour_mask = (tumour > 0) & tissue  # (h, w)
    lymphoid_mask = lymphoid_aggregates(rng, cfg, tissue, tissue_points) & ~tumour_mask  # (h, w)

    # --- nuclei density: uint8 canvases, 0 = none, 255 = opaque --------------------------
    normal_area = tissue & ~tumour_mask & ~lymphoid_mask
    nuclei = np.zeros((h, w), dtype=np.uint8)
    _draw_nuclei(nuclei, rng, _scatter_points(rng, normal_area, cfg.nucleus_spacing), cfg.nucleus_radius, (150, 215), 0.5)
    tumour_nuclei = np.zeros((h, w), dtype=np.uint8)
    if tumour_mask.any():
        pts = _sheet_points(rng, tumour_mask, cfg.tumour_nucleus_spacing)
        _draw_nuclei(tumour_nuclei, rng, pts, cfg.tumour_nucleus_radius, (120, 200), 0.35)
    if lymphoid_mask.any():
        pts = _scatter_points(rng, lymphoid_mask, cfg.lymphocyte_spacing)
        _draw_nuclei(nuclei, rng, pts, cfg.lymphocyte_radius, (200, 240), 0.1)

    shade = stroma_shade(rng, h, w)  # (h, w)

    # soften the drawn polygons into round nuclei
    a_normal = cv2.GaussianBlur(nuclei, (0, 0), 0.6).astype(np.float32) / 255.0  # (h, w)
    has_tumour = bool(tumour_mask.any())
    a_tumour = cv2.GaussianBlur(tumour_nuclei, (0, 0), 0.6).astype(np.float32) / 255.0 if has_tumour else None  # (h, w)
    stroma_tumour = STROMA_RGB.copy()
    if has_tumour and cfg.low_mag_camouflage > 0:
        # lighten tumour stroma so its mean colour approaches that of normal tissue
        # mean colour = stroma * E[shade * (1 - a)] + nucleus colour * E[a], per region
        if normal_area.any():
            an = a_normal[normal_area]
            normal_mean = STROMA_RGB * float((shade[normal_area] * (1 - an)).mean()) + NUCLEUS_RGB * float(an.mean())
        else:
            normal_mean = STROMA_RGB * float(shade[tissue].mean())
        at = a_tumour[tumour_mask]
        matched = (normal_mean - TUMOUR_NUCLEUS_RGB * float(at.mean())) / max(float((shade[tumour_mask] * (1 - at)).mean()), 1e-3)
        matched = np.clip(matched, 0, 255)
        stroma_tumour = (STROMA_RGB + cfg.low_mag_camouflage * (matched - STROMA_RGB)).astype(np.float32)

    image = np.empty((h, w, 3), dtype=np.uint8)
    tumour_f = tumour_mask.astype(np.float32) if has_tumour else None  # (h, w)
    grain = rng.integers(-3, 4, (h, w), dtype=np.int8)  # (h, w), std 2, shared by the channels
    for c in range(3):  # channel by channel, in place, to keep float temporaries small
        if has_tumour:
            value = tumour_f * float(stroma_tumour[c] - STROMA_RGB[c])  # (h, w)
            value += float(STROMA_RGB[c])
            value *= shade  # stroma
        else:
            value = shade * float(STROMA_RGB[c])  # (h, w)
        value += a_normal * (float(NUCLEUS_RGB[c]) - value)  # normal nuclei over stroma
        if has_tumour:
            value += a_tumour * (float(TUMOUR_NUCLEUS_RGB[c]) - value)  # tumour nuclei
        value -= float(BACKGROUND_RGB[c])
        value *= tissue_alpha  # tissue over background
        value += float(BACKGROUND_RGB[c])
        value += grain
        np.clip(value, 0, 255, out=value)
        image[..., c] = value
    return SyntheticSlide(image=image, tumour=tumour_mask, tissue=tissue, label=int(positive), regions=regions)


def _draw_blob(canvas: np.ndarray, rng: np.random.Generator, centre: tuple[int, int], radius: float) -> None:
    """An irregular blob: a union of a few overlapping ellipses around `centre`."""
    for _ in range(4):
        dx, dy = rng.normal(0, 0.3 * radius, 2)
        axes = (max(2, int(radius * rng.uniform(0.5, 0.9))), max(2, int(radius * rng.uniform(0.5, 0.9))))
        cv2.ellipse(canvas, (int(centre[0] + dx), int(centre[1] + dy)), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)


def write_pyramidal_tiff(path: str | Path, image: np.ndarray, cfg: SyntheticSlideConfig) -> None:
    """Write a tiled pyramidal TIFF that tiffslide and OpenSlide both read.

    Every level is a top-level tiled page; lower levels are marked reduced-resolution
    (`subfiletype=1`); each page carries its resolution in pixels per centimetre.
    """
    compression = None if cfg.compression == "none" else cfg.compression
    compressionargs = {"level": cfg.jpeg_quality} if cfg.compression == "jpeg" else None
    level = image
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        for i in range(cfg.pyramid_levels):
            px_per_cm = 1e4 / (cfg.mpp * 2**i)
            tif.write(
                level,
                photometric="rgb",
                tile=(cfg.tiff_tile, cfg.tiff_tile),
                compression=compression,
                compressionargs=compressionargs,
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
                description="mil_experiments synthetic slide" if i == 0 else None,
                metadata=None,
            )
            if i + 1 < cfg.pyramid_levels:
                size = (max(1, level.shape[1] // 2), max(1, level.shape[0] // 2))
                level = cv2.resize(level, size, interpolation=cv2.INTER_AREA)


@dataclass
class CohortConfig:
    """A synthetic cohort.

    Attributes:
        num_slides: number of slides.
        positive_fraction: fraction of slides with tumour (rounded to whole slides).
        split_fractions: train / validation / test fractions, stratified by label.
        seed: determines every slide, label and split.
        num_workers: worker processes (the result does not depend on it).
        slide: the slides' sizes and morphology.
    """

    num_slides: int = 40
    positive_fraction: float = 0.5
    split_fractions: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    seed: int = 0
    num_workers: int = 2
    slide: SyntheticSlideConfig = field(default_factory=SyntheticSlideConfig)

    def __post_init__(self) -> None:
        if isinstance(self.slide, dict):
            self.slide = SyntheticSlideConfig(**self.slide)
        if self.num_slides < 2:
            raise ConfigError(f"generator.num_slides={self.num_slides}: must be >= 2")
        if not 0 < self.positive_fraction < 1:
            raise ConfigError(f"generator.positive_fraction={self.positive_fraction}: must be in (0, 1)")
        if len(self.split_fractions) != 3 or abs(sum(self.split_fractions) - 1) > 1e-6 or min(self.split_fractions) < 0:
            raise ConfigError(f"generator.split_fractions={list(self.split_fractions)}: must be 3 fractions summing to 1")


def cohort_plan(cfg: CohortConfig) -> list[dict]:
    """Slide ids, labels and splits of a cohort (cheap: no pixels)."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 2**31 - 1]))
    n_pos = min(cfg.num_slides - 1, max(1, round(cfg.num_slides * cfg.positive_fraction)))
    labels = np.zeros(cfg.num_slides, dtype=np.int64)
    labels[rng.permutation(cfg.num_slides)[:n_pos]] = 1
    splits = np.empty(cfg.num_slides, dtype=object)
    for label in (0, 1):
        idx = rng.permutation(np.nonzero(labels == label)[0])
        n = len(idx)
        # at least one slide per class in each split that asks for any, when there are enough
        n_val = max(round(n * cfg.split_fractions[1]), int(cfg.split_fractions[1] > 0 and n >= 3))
        n_test = max(round(n * cfg.split_fractions[2]), int(cfg.split_fractions[2] > 0 and n >= 3))
        n_train = n - n_val - n_test
        splits[idx[:n_train]] = "train"
        splits[idx[n_train : n_train + n_val]] = "val"
        splits[idx[n_train + n_val :]] = "test"
    return [{"slide_id": f"slide_{i:03d}", "label": int(labels[i]), "split": str(splits[i]), "index": i} for i in range(cfg.num_slides)]


def slide_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of slide `index` in a cohort with seed `seed`."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def _make_one(args: tuple[str, dict, CohortConfig]) -> dict:
    root, entry, cfg = args
    rng = slide_rng(cfg.seed, entry["index"])
    slide = generate_slide(rng, bool(entry["label"]), cfg.slide)
    root = Path(root)
    write_pyramidal_tiff(root / "slides" / f"{entry['slide_id']}.tiff", slide.image, cfg.slide)
    d = cfg.slide.mask_downsample
    small = cv2.resize(slide.tumour.astype(np.uint8) * 255, (math.ceil(cfg.slide.width / d), math.ceil(cfg.slide.height / d)), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(tumour_mask_path(root, entry["slide_id"])), np.where(small > 127, 255, 0).astype(np.uint8))
    return {
        **entry,
        "tumour_fraction_of_tissue": float(slide.tumour.sum() / max(1, slide.tissue.sum())),
        "tissue_fraction": float(slide.tissue.mean()),
        "regions": slide.regions,
    }


def make_cohort(root: str | Path, cfg: CohortConfig) -> dict:
    """Write a synthetic cohort under `root`.

    Layout: `slides/<id>.tiff`, `masks/<id>.png` (tumour masks at 1/`mask_downsample`),
    `labels.csv` (slide_id, label), `splits.csv` (slide_id, split) and `cohort.json`
    (the config, seed, timings and per-slide facts).

    Returns:
        The content of `cohort.json`.
    """
    from mil_experiments import __version__

    root = Path(root)
    plan = cohort_plan(cfg)
    facts, seconds = write_slides(root, plan, _make_one, cfg)
    summary = {
        "version": __version__,
        "config": asdict(cfg),
        "base_magnification": 10.0 / cfg.slide.mpp,
        "mask_downsample": cfg.slide.mask_downsample,
        "generation_seconds": round(seconds, 2),
        "slides": facts,
    }
    (root / "cohort.json").write_text(json.dumps(summary, indent=1))
    return summary


def write_slides(root: Path, plan: list[dict], make_one, cfg, description: str | None = None) -> tuple[list[dict], float]:
    """Every slide of `plan` written by `make_one((root, entry, cfg))` (in `cfg.num_workers` processes),
    then `labels.csv` and `splits.csv`; returns the per-slide facts and the seconds the slides took."""
    (root / "slides").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    facts = run_slide_jobs(make_one, [(str(root), entry, cfg) for entry in plan], cfg.num_workers, description)
    seconds = time.perf_counter() - start
    write_csv(root / "labels.csv", ["slide_id", "label"], [[e["slide_id"], e["label"]] for e in plan])
    write_csv(root / "splits.csv", ["slide_id", "split"], [[e["slide_id"], e["split"]] for e in plan])
    return facts, seconds


def run_slide_jobs(make_one, jobs: list, num_workers: int, description: str | None = None) -> list[dict]:
    """`make_one(job)` for every job, in order, in `num_workers` processes when > 1; a progress bar with `description`."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=description, disable=description is None)
    facts = []
    if num_workers > 1:
        with ProcessPoolExecutor(max_workers=num_workers) as pool:
            for fact in pool.map(make_one, jobs):
                facts.append(fact)
                bar.update()
    else:
        for job in jobs:
            facts.append(make_one(job))
            bar.update()
    bar.close()
    return facts


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    """A CSV file with a header row."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
