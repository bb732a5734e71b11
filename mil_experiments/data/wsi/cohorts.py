"""Benchmark cohorts: synthetic slides whose classes are defined by lesions of named kinds.

The default synthetic cohort (`mil_experiments.data.wsi.synthetic`) is too easy to rank
methods on. A benchmark cohort describes its slides declaratively, so that it can be made
hard in the way a paper's claim is about:

- a **lesion kind** is a morphology: nucleus size, spacing, colour, shape, arrangement, and
  how much its stroma is lightened so that its mean colour matches normal tissue
  (`camouflage`: then it is invisible at low magnification, where nuclei blur into the
  average). `jitter` varies the nucleus size from slide to slide (inter-patient variation),
  so that the classes overlap and a cohort is not separable by construction.
- a **presentation** is one way a slide of a class can look: a list of lesions, each a kind
  with a number of blobs and their radius range, or a share of the tissue it covers
  (`coverage`, as a tumour filling a TCGA slide).
- a **class** is a name, a share of the slides and weighted presentations.

So c16_like's positive slides come as a single micro-metastasis, as macro-metastases, or as
the subtle form only (the hard instances of MHIM-MIL); tcga_like's two classes are two
tumour textures over most of the tissue; bright_like's three grades differ only at high
magnification. The presets are `conf/cohort/*.yaml` (documented in docs/cohorts.md).

Written per slide: the pyramidal TIFF, `masks/<id>.png` (any lesion: the tumour mask the
extractor turns into instance labels) and `masks/<id>_kinds.png` (0 = none, k + 1 = kind k),
at 1/`mask_downsample` of level 0. Per cohort: `labels.csv`, `splits.csv`, `slides.csv`
(class, presentation and per-kind lesion share of each slide) and `cohort.json`.
Slide i draws from `SeedSequence([seed, i])`: the cohort does not depend on the workers.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from mil_experiments.data.wsi.masks import kinds_mask_path, tumour_mask_path
from mil_experiments.data.wsi.synthetic import (
    BACKGROUND_RGB,
    NUCLEUS_RGB,
    STROMA_RGB,
    SyntheticSlideConfig,
    _draw_blob,
    _draw_nuclei,
    _scatter_points,
    _sheet_points,
    _smooth_noise,
    _tissue_field,
    lymphoid_aggregates,
    slide_rng,
    stroma_shade,
    write_csv,
    write_pyramidal_tiff,
    write_slides,
)
from mil_experiments.errors import ConfigError

ARRANGEMENTS = ("sheet", "scatter")


@dataclass
class LesionKind:
    """One lesion morphology (lengths in level-0 pixels).

    Attributes:
        name: how presentations refer to it.
        nucleus_radius, nucleus_spacing: mean nucleus radius; mean distance between nuclei.
        nucleus_rgb: nucleus colour.
        darkness: opacity range of the nuclei (0-255).
        elongation: 0 = round nuclei, up to 1 = flat.
        arrangement: "sheet" (jittered grid, packed cells) or "scatter" (Poisson).
        camouflage: 0 = plain stroma, 1 = stroma lightened so the lesion's mean colour equals
            normal tissue's.
        jitter: standard deviation of a per-slide log-factor on `nucleus_radius`.
    """

    name: str = "tumour"
    nucleus_radius: float = 2.4
    nucleus_spacing: float = 8.5
    nucleus_rgb: list[float] = field(default_factory=lambda: [70.0, 34.0, 122.0])
    darkness: list[int] = field(default_factory=lambda: [120, 200])
    elongation: float = 0.35
    arrangement: str = "sheet"
    camouflage: float = 0.9
    jitter: float = 0.0

    def check(self, where: str) -> None:
        if self.arrangement not in ARRANGEMENTS:
            raise ConfigError(f"{where}.arrangement={self.arrangement!r}: choose one of {list(ARRANGEMENTS)}")
        if self.nucleus_radius <= 0 or self.nucleus_spacing <= 0:
            raise ConfigError(f"{where}: nucleus_radius and nucleus_spacing must be positive")
        if not 0 <= self.camouflage <= 1 or not 0 <= self.elongation < 1 or self.jitter < 0:
            raise ConfigError(f"{where}: camouflage in [0, 1], elongation in [0, 1) and jitter >= 0 required")
        if len(self.nucleus_rgb) != 3 or len(self.darkness) != 2 or not 0 <= self.darkness[0] <= self.darkness[1] <= 255:
            raise ConfigError(f"{where}: nucleus_rgb needs 3 values and darkness [low, high] within 0-255")


@dataclass
class LesionSpec:
    """Lesions of one kind in a presentation.

    Attributes:
        kind: a `LesionKind.name`.
        count: [low, high] blobs (inclusive); ignored with `coverage`.
        radius: [low, high] blob radius, level-0 pixels.
        coverage: [low, high] share of the tissue covered instead of blobs (a thresholded
            smooth noise field inside the tissue); null = blobs.
    """

    kind: str = "tumour"
    count: list[int] = field(default_factory=lambda: [1, 1])
    radius: list[float] = field(default_factory=lambda: [50.0, 120.0])
    coverage: list[float] | None = None


@dataclass
class Presentation:
    """One way a slide of a class looks: its lesions (none for normal tissue)."""

    name: str = "normal"
    weight: float = 1.0
    lesions: list[LesionSpec] = field(default_factory=list)


@dataclass
class ClassSpec:
    """A slide class: its name, its share of the slides and its presentations."""

    name: str = "normal"
    share: float = 0.5
    presentations: list[Presentation] = field(default_factory=lambda: [Presentation()])


@dataclass
class BenchmarkCohortConfig:
    """A benchmark cohort (see the module docstring).

    Attributes:
        name: the cohort's name (`c16_like`, ...).
        imitates: the real data set it stands in for, in words.
        num_slides: number of slides.
        split_fractions: train / validation / test, stratified by class.
        seed: determines every slide, label and split.
        num_workers: worker processes (the cohort does not depend on it).
        slide: size, resolution, pyramid, normal tissue and lymphoid aggregates.
        kinds: the lesion kinds.
        classes: the classes, in label order.
    """

    name: str = "cohort"
    imitates: str = ""
    num_slides: int = 200
    split_fractions: list[float] = field(default_factory=lambda: [0.5, 0.2, 0.3])
    seed: int = 0
    num_workers: int = 2
    slide: SyntheticSlideConfig = field(default_factory=SyntheticSlideConfig)
    kinds: list[LesionKind] = field(default_factory=lambda: [LesionKind()])
    classes: list[ClassSpec] = field(default_factory=lambda: [ClassSpec()])

    def __post_init__(self) -> None:
        if isinstance(self.slide, dict):
            self.slide = SyntheticSlideConfig(**self.slide)
        self.kinds = [k if isinstance(k, LesionKind) else LesionKind(**k) for k in self.kinds]
        self.classes = [_class_spec(c) for c in self.classes]
        if self.num_slides < 2 * len(self.classes):
            raise ConfigError(f"cohort.num_slides={self.num_slides}: need at least 2 per class ({len(self.classes)} classes)")
        if len(self.split_fractions) != 3 or abs(sum(self.split_fractions) - 1) > 1e-6 or min(self.split_fractions) < 0:
            raise ConfigError(f"cohort.split_fractions={list(self.split_fractions)}: must be 3 fractions summing to 1")
        if len(self.classes) < 2:
            raise ConfigError(f"cohort.classes: {len(self.classes)} given, at least 2 needed")
        names = [k.name for k in self.kinds]
        if len(set(names)) != len(names):
            raise ConfigError(f"cohort.kinds: names must be unique, got {names}")
        for i, kind in enumerate(self.kinds):
            kind.check(f"cohort.kinds[{i}] ({kind.name})")
        for c, spec in enumerate(self.classes):
            if spec.share <= 0 or not spec.presentations:
                raise ConfigError(f"cohort.classes[{c}] ({spec.name}): share must be > 0 and presentations non-empty")
            for p, presentation in enumerate(spec.presentations):
                where = f"cohort.classes[{c}].presentations[{p}] ({presentation.name})"
                if presentation.weight <= 0:
                    raise ConfigError(f"{where}.weight={presentation.weight}: must be > 0")
                for lesion in presentation.lesions:
                    if lesion.kind not in names:
                        raise ConfigError(f"{where}: lesion kind {lesion.kind!r} is not one of cohort.kinds {names}")
                    if lesion.coverage is not None and not 0 < lesion.coverage[0] <= lesion.coverage[1] < 1:
                        raise ConfigError(f"{where}: coverage={list(lesion.coverage)} must be [low, high] within (0, 1)")
                    if lesion.coverage is None and not (0 <= lesion.count[0] <= lesion.count[1] and 0 < lesion.radius[0] <= lesion.radius[1]):
                        raise ConfigError(f"{where}: count=[low, high] >= 0 and radius=[low, high] > 0 required")

    @property
    def kind_index(self) -> dict[str, int]:
        return {k.name: i for i, k in enumerate(self.kinds)}


def _class_spec(value: ClassSpec | dict) -> ClassSpec:
    if isinstance(value, ClassSpec):
        return value
    presentations = []
    for p in value.get("presentations", [{}]):
        p = dict(p)
        p["lesions"] = [LesionSpec(**lesion) for lesion in p.get("lesions", [])]
        presentations.append(Presentation(**p))
    return ClassSpec(**{**value, "presentations": presentations})


def cohort_plan(cfg: BenchmarkCohortConfig) -> list[dict]:
    """Slide ids, labels, presentations and splits (cheap: no pixels).

    Each class gets `round(share * num_slides)` slides (the last class the rest); a slide's
    presentation is drawn with the presentations' weights; the split is stratified by class.
    """
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 2**31 - 1]))
    shares = np.array([c.share for c in cfg.classes], dtype=np.float64)
    counts = np.floor(shares / shares.sum() * cfg.num_slides).astype(int)
    counts[np.argsort(-(shares / shares.sum() * cfg.num_slides - counts))[: cfg.num_slides - counts.sum()]] += 1
    labels = rng.permutation(np.repeat(np.arange(len(cfg.classes)), counts))  # (num_slides,)
    splits = np.empty(cfg.num_slides, dtype=object)
    for label in range(len(cfg.classes)):
        idx = rng.permutation(np.nonzero(labels == label)[0])
        n_val = round(len(idx) * cfg.split_fractions[1])
        n_test = round(len(idx) * cfg.split_fractions[2])
        n_train = len(idx) - n_val - n_test
        splits[idx[:n_train]] = "train"
        splits[idx[n_train : n_train + n_val]] = "val"
        splits[idx[n_train + n_val :]] = "test"
    plan = []
    for i in range(cfg.num_slides):
        spec = cfg.classes[labels[i]]
        weights = np.array([p.weight for p in spec.presentations], dtype=np.float64)
        presentation = int(rng.choice(len(weights), p=weights / weights.sum()))
        plan.append({
            "slide_id": f"{cfg.name}_{i:03d}",
            "label": int(labels[i]),
            "class": spec.name,
            "presentation": spec.presentations[presentation].name,
            "presentation_index": presentation,
            "split": str(splits[i]),
            "index": i,
        })
    return plan


def _coverage_mask(rng: np.random.Generator, tissue: np.ndarray, share: float, free: np.ndarray) -> np.ndarray:
    """A smooth region covering `share` of the tissue (within `free` where possible)."""
    h, w = tissue.shape
    coarse = (max(1, h // 16), max(1, w // 16))
    noise = cv2.resize(_smooth_noise(rng, coarse, max(coarse) / 10), (w, h), interpolation=cv2.INTER_LINEAR)  # (h, w)
    allowed = tissue & free
    if not allowed.any():
        return np.zeros_like(tissue)
    threshold = np.quantile(noise[allowed], max(0.0, 1.0 - share * tissue.sum() / allowed.sum()))
    return allowed & (noise >= threshold)


@dataclass
class LesionSlide:
    """One generated slide: image (H, W, 3) uint8, kinds (H, W) uint8 (0 none, k + 1 kind k),
    tissue (H, W) bool, and the drawn lesions."""

    image: np.ndarray
    kinds: np.ndarray
    tissue: np.ndarray
    lesions: list[dict]


def generate_lesion_slide(rng: np.random.Generator, presentation: Presentation, cfg: BenchmarkCohortConfig) -> LesionSlide:
    """Draw one slide (level 0) with the lesions of `presentation`."""
    s = cfg.slide
    h, w = s.height, s.width
    field_coarse = _tissue_field(rng, s, 16)  # (h/16, w/16)
    tissue_alpha = cv2.resize(np.clip((1.0 - field_coarse) * 12.0, 0.0, 1.0), (w, h), interpolation=cv2.INTER_LINEAR)  # (h, w)
    tissue = tissue_alpha > 0.5  # (h, w)
    tissue_points = np.argwhere(tissue[::8, ::8]) * 8  # (P, 2) candidate centres (y, x)
    if len(tissue_points) == 0:
        raise RuntimeError("generated a slide with no tissue; adjust slide.tissue_pieces")

    # --- lesions, in presentation order; a later lesion does not overwrite an earlier one ---
    index = cfg.kind_index
    kinds = np.zeros((h, w), dtype=np.uint8)  # (h, w) 0 = none, k + 1 = kind k
    drawn = []
    for lesion in presentation.lesions:
        k = index[lesion.kind]
        if lesion.coverage is not None:
            share = float(rng.uniform(*lesion.coverage))
            region = _coverage_mask(rng, tissue, share, kinds == 0)
            drawn.append({"kind": lesion.kind, "coverage": share})
        else:
            canvas = np.zeros((h, w), dtype=np.uint8)
            for _ in range(int(rng.integers(lesion.count[0], lesion.count[1] + 1))):
                y, x = tissue_points[rng.integers(len(tissue_points))]
                radius = float(rng.uniform(*lesion.radius))
                _draw_blob(canvas, rng, (x, y), radius)
                drawn.append({"kind": lesion.kind, "x": int(x), "y": int(y), "radius": radius})
            region = (canvas > 0) & tissue & (kinds == 0)
        kinds[region] = k + 1
    lesion_mask = kinds > 0  # (h, w)
    lymphoid_mask = lymphoid_aggregates(rng, s, tissue, tissue_points) & ~lesion_mask  # (h, w)
    normal_area = tissue & ~lesion_mask & ~lymphoid_mask

    # --- nuclei: normal and lymphoid on one canvas, each lesion kind on its own ---------------
    nuclei = np.zeros((h, w), dtype=np.uint8)
    _draw_nuclei(nuclei, rng, _scatter_points(rng, normal_area, s.nucleus_spacing), s.nucleus_radius, (150, 215), 0.5)
    if lymphoid_mask.any():
        _draw_nuclei(nuclei, rng, _scatter_points(rng, lymphoid_mask, s.lymphocyte_spacing), s.lymphocyte_radius, (200, 240), 0.1)
    a_normal = cv2.GaussianBlur(nuclei, (0, 0), 0.6).astype(np.float32) / 255.0  # (h, w)
    shade = stroma_shade(rng, h, w)  # (h, w)
    if normal_area.any():
        an = a_normal[normal_area]
        normal_mean = STROMA_RGB * float((shade[normal_area] * (1 - an)).mean()) + NUCLEUS_RGB * float(an.mean())
    else:
        normal_mean = STROMA_RGB * float(shade[tissue].mean())

    layers = []  # (mask, stroma rgb, nucleus opacity, nucleus rgb) per present kind
    for k, kind in enumerate(cfg.kinds):
        region = kinds == k + 1
        if not region.any():
            continue
        radius = kind.nucleus_radius * math.exp(rng.normal(0.0, kind.jitter)) if kind.jitter > 0 else kind.nucleus_radius
        place = _sheet_points if kind.arrangement == "sheet" else _scatter_points
        canvas = np.zeros((h, w), dtype=np.uint8)
        _draw_nuclei(canvas, rng, place(rng, region, kind.nucleus_spacing), radius, tuple(kind.darkness), kind.elongation)
        alpha = cv2.GaussianBlur(canvas, (0, 0), 0.6).astype(np.float32) / 255.0  # (h, w)
        rgb = np.asarray(kind.nucleus_rgb, dtype=np.float32)
        ak = alpha[region]
        matched = (normal_mean - rgb * float(ak.mean())) / max(float((shade[region] * (1 - ak)).mean()), 1e-3)
        stroma = (STROMA_RGB + kind.camouflage * (np.clip(matched, 0, 255) - STROMA_RGB)).astype(np.float32)
        layers.append((region, stroma, alpha, rgb))
        drawn.append({"kind": kind.name, "nucleus_radius": radius})

    image = np.empty((h, w, 3), dtype=np.uint8)
    grain = rng.integers(-3, 4, (h, w), dtype=np.int8)  # (h, w) shared by the channels
    for c in range(3):  # channel by channel, in place, to keep float temporaries small
        stroma = np.full((h, w), float(STROMA_RGB[c]), dtype=np.float32)  # (h, w)
        for region, stroma_rgb, _, _ in layers:
            stroma[region] = float(stroma_rgb[c])
        value = stroma * shade  # (h, w)
        value += a_normal * (float(NUCLEUS_RGB[c]) - value)
        for _, _, alpha, rgb in layers:
            value += alpha * (float(rgb[c]) - value)
        value -= float(BACKGROUND_RGB[c])
        value *= tissue_alpha
        value += float(BACKGROUND_RGB[c])
        value += grain
        np.clip(value, 0, 255, out=value)
        image[..., c] = value
    return LesionSlide(image=image, kinds=kinds, tissue=tissue, lesions=drawn)


def _make_one(args: tuple[str, dict, BenchmarkCohortConfig]) -> dict:
    root, entry, cfg = args
    rng = slide_rng(cfg.seed, entry["index"])
    presentation = cfg.classes[entry["label"]].presentations[entry["presentation_index"]]
    slide = generate_lesion_slide(rng, presentation, cfg)
    root = Path(root)
    write_pyramidal_tiff(root / "slides" / f"{entry['slide_id']}.tiff", slide.image, cfg.slide)
    d = cfg.slide.mask_downsample
    size = (math.ceil(cfg.slide.width / d), math.ceil(cfg.slide.height / d))
    kinds_small = cv2.resize(slide.kinds, size, interpolation=cv2.INTER_NEAREST)  # (h/d, w/d)
    cv2.imwrite(str(kinds_mask_path(root, entry["slide_id"])), kinds_small)
    any_lesion = cv2.resize((slide.kinds > 0).astype(np.uint8) * 255, size, interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(tumour_mask_path(root, entry["slide_id"])), np.where(any_lesion > 127, 255, 0).astype(np.uint8))
    tissue_px = max(1, int(slide.tissue.sum()))
    shares = {f"{k.name}_share": float((slide.kinds == i + 1).sum() / tissue_px) for i, k in enumerate(cfg.kinds)}
    return {**entry, "lesion_share": float((slide.kinds > 0).sum() / tissue_px), **shares, "lesions": slide.lesions}


def make_benchmark_cohort(root: str | Path, cfg: BenchmarkCohortConfig, progress: bool = True) -> dict:
    """Write a benchmark cohort under `root` (layout in the module docstring).

    Returns:
        The content of `cohort.json`.
    """
    from mil_experiments import __version__

    root = Path(root)
    plan = cohort_plan(cfg)
    facts, seconds = write_slides(root, plan, _make_one, cfg, f"{cfg.name}: slides" if progress else None)
    share_keys = [f"{k.name}_share" for k in cfg.kinds]
    columns = ["slide_id", "label", "class", "presentation", "split", "lesion_share", *share_keys]
    write_csv(root / "slides.csv", columns, [[f[c] if not isinstance(f[c], float) else f"{f[c]:.5f}" for c in columns] for f in facts])
    summary = {
        "version": __version__,
        "config": asdict(cfg),
        "base_magnification": 10.0 / cfg.slide.mpp,
        "mask_downsample": cfg.slide.mask_downsample,
        "class_names": [c.name for c in cfg.classes],
        "kind_names": [k.name for k in cfg.kinds],
        "generation_seconds": round(seconds, 2),
        "slides": facts,
    }
    (root / "cohort.json").write_text(json.dumps(summary, indent=1))
    return summary

