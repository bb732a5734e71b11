"""Feature extraction: slide tiles -> encoder -> one HDF5 feature file per slide.

For each slide: detect tissue and tile it at every magnification (aligned, depth first),
encode the tiles in batches, and write `<out_dir>/<slide_id>.h5` (see
`mil_experiments.data.feature_files`). Slides whose file already exists are skipped, so an
interrupted run resumes where it stopped; an existing file made with other settings is an
error rather than being silently reused. The labels and splits CSVs are copied next to the
features, so `dataset=feature_bags dataset.root=<out_dir>` finds everything.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mil_experiments.data.feature_files import write_feature_file
from mil_experiments.data.wsi.masks import read_tumour_mask
from mil_experiments.data.wsi.readers import open_slide
from mil_experiments.data.wsi.tiling import (
    MultiMagnificationTiling,
    check_magnifications,
    mask_fraction_per_tile,
    read_tile_block,
    tile_slide,
)
from mil_experiments.data.wsi.tissue import TissueConfig
from mil_experiments.errors import ConfigError, DataError
from mil_experiments.results import machine

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SLIDE_EXTENSIONS = [".tiff", ".tif", ".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"]


@dataclass
class ExtractionEncoderConfig:
    """The tile encoder.

    Attributes:
        name: `resnet50_trunk` (ImageNet ResNet-50 to layer 3, 1024-d) or one of the
            project's encoders (`lenet`, `resnet_bottleneck`), randomly initialised.
        pretrained: resnet50_trunk: load ImageNet weights (needs them downloadable or cached).
        weights_path: resnet50_trunk: a local state-dict file instead of the download.
        input_size: tiles are resized to this side before encoding (CLAM: 256 -> 224);
            null keeps the tile size.
        feature_dim: lenet's feature size.
        norm: resnet_bottleneck's normalisation (batch, group, none).
        seed: initialisation seed of randomly initialised encoders.
    """

    name: str = "resnet50_trunk"
    pretrained: bool = True
    weights_path: str | None = None
    input_size: int | None = 224
    feature_dim: int = 500
    norm: str = "batch"
    seed: int = 0


@dataclass
class ExtractionConfig:
    """Schema of `conf/extract.yaml`; see that file for the meaning of each key."""

    slides_dir: str = "data/synthetic_wsi/slides"
    out_dir: str = "data/synthetic_wsi_features"
    labels_csv: str | None = None
    splits_csv: str | None = None
    masks_dir: str | None = None
    slide_extensions: list[str] = field(default_factory=lambda: list(SLIDE_EXTENSIONS))
    reader: str = "tiffslide"
    magnifications: list[float] = field(default_factory=lambda: [2.5, 5.0, 10.0, 20.0])
    tile_size: int = 64
    base_magnification: float | None = None
    tissue: TissueConfig = field(default_factory=TissueConfig)
    encoder: ExtractionEncoderConfig = field(default_factory=ExtractionEncoderConfig)
    batch_size: int = 64
    device: str = "cpu"
    num_threads: int | None = None
    skip_existing: bool = True
    skip_failed: bool = False
    limit: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.tissue, dict):
            self.tissue = TissueConfig(**self.tissue)
        if isinstance(self.encoder, dict):
            self.encoder = ExtractionEncoderConfig(**self.encoder)
        self.magnifications = list(check_magnifications(self.magnifications))
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}: must be positive")
        if self.tile_size < 8:
            raise ConfigError(f"tile_size={self.tile_size}: must be at least 8")


def extractor_name(config: ExtractionEncoderConfig) -> str:
    """A short name that identifies the encoder and its weights."""
    if config.name == "resnet50_trunk":
        if config.weights_path:
            return f"resnet50_trunk[{Path(config.weights_path).name}]"
        return "resnet50_trunk[imagenet]" if config.pretrained else f"resnet50_trunk[random,seed={config.seed}]"
    return f"{config.name}[random,seed={config.seed}]"


def build_extraction_encoder(config: ExtractionEncoderConfig, tile_size: int) -> nn.Module:
    """The tile encoder named by `config.name`, in eval mode; it exposes `out_dim`."""
    side = config.input_size or tile_size
    torch.manual_seed(config.seed)
    if config.name == "resnet50_trunk":
        from mil_experiments.models.resnet50_trunk import ResNet50Trunk

        try:
            encoder = ResNet50Trunk(pretrained=config.pretrained, weights_path=config.weights_path)
        except (RuntimeError, FileNotFoundError) as error:
            raise ConfigError(str(error)) from None
    else:
        from mil_experiments.models.encoders import BottleneckResNetConfig, LeNetConfig, build_encoder

        if config.name == "lenet":
            encoder = build_encoder(LeNetConfig(feature_dim=config.feature_dim), (3, side, side))
        elif config.name == "resnet_bottleneck":
            encoder = build_encoder(BottleneckResNetConfig(norm=config.norm), (3, side, side))
        else:
            raise ConfigError(f"encoder.name={config.name!r}: choose resnet50_trunk, lenet or resnet_bottleneck")
    return encoder.eval()


class TileEncoder:
    """Encodes uint8 tiles in batches: resize, ImageNet normalisation, forward, no grad."""

    def __init__(self, encoder: nn.Module, input_size: int | None, device: torch.device) -> None:
        self.encoder = encoder.to(device)
        self.input_size = input_size
        self.device = device
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @torch.inference_mode()
    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """(B, T, T, 3) uint8 -> (B, D) float32."""
        x = torch.from_numpy(tiles).to(self.device).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, T, T)
        if self.input_size is not None and self.input_size != x.shape[-1]:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True, align_corners=False)  # (B, 3, S, S)
        x = (x - self.mean) / self.std
        return self.encoder(x).float().cpu().numpy()  # (B, D)


def list_slides(config: ExtractionConfig) -> list[Path]:
    """The slide files of `slides_dir`, sorted by name (at most `limit`)."""
    folder = Path(config.slides_dir)
    if not folder.is_dir():
        raise DataError(f"slides_dir={folder}: folder not found")
    extensions = {e.lower() for e in config.slide_extensions}
    slides = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)
    if not slides:
        raise DataError(f"slides_dir={folder}: no slide files with extensions {sorted(extensions)}")
    return slides[: config.limit] if config.limit is not None else slides


def _check_existing(path: Path, expected: dict) -> None:
    """An existing output must come from the same settings; say so if not."""
    try:
        with h5py.File(path, "r") as f:
            found = {key: f.attrs.get(key) for key in expected}
    except Exception as error:
        raise DataError(f"{path}: exists but cannot be read ({error}); delete it to extract again") from error
    for key, value in expected.items():
        have = found[key]
        have = have.tolist() if isinstance(have, np.ndarray | np.generic) else have
        if have != value:
            raise DataError(f"{path}: exists with {key}={have!r}, not {value!r}; delete it or choose another out_dir")


def extract_slide(slide_path: Path, out_path: Path, config: ExtractionConfig, encoder: TileEncoder, attrs: dict, progress: tqdm | None = None) -> int:
    """Tile, encode and write one slide; returns the number of tiles encoded."""
    with open_slide(slide_path, config.reader) as slide:
        tiling = tile_slide(slide, config.magnifications, config.tile_size, config.tissue, config.base_magnification)
        features = {m: _encode_magnification(slide, tiling, m, encoder, config.batch_size, progress) for m in tiling.magnifications}
        tumour = None
        if config.masks_dir is not None:
            mask = read_tumour_mask(Path(config.masks_dir) / f"{slide_path.stem}.png")
            tumour = {m: mask_fraction_per_tile(mask, slide.dimensions, tiling.coords[m], tiling.tile_size_level0[m]) for m in tiling.magnifications}
        slide_attrs = {**attrs, "slide_id": slide_path.stem, "base_magnification": tiling.base_magnification, "reader": config.reader}
        write_feature_file(out_path, features, tiling.coords, slide_attrs, tumour, tiling.tile_size_level0)
        return sum(len(c) for c in tiling.coords.values())


def _encode_magnification(slide, tiling: MultiMagnificationTiling, magnification: float, encoder: TileEncoder, batch_size: int, progress: tqdm | None) -> np.ndarray:
    pending: list[np.ndarray] = []
    outputs: list[np.ndarray] = []
    count = 0
    for low_index in range(tiling.num_low_tiles):
        block = read_tile_block(slide, tiling, low_index, magnification)  # (4^d, T, T, 3)
        pending.append(block)
        count += len(block)
        if count >= batch_size or low_index == tiling.num_low_tiles - 1:
            tiles = np.concatenate(pending)  # (B', T, T, 3)
            for start in range(0, len(tiles), batch_size):
                outputs.append(encoder(tiles[start : start + batch_size]))  # (b, D)
            if progress is not None:
                progress.update(len(tiles))
            pending, count = [], 0
    return np.concatenate(outputs)  # (N_m, D)


def run_extraction(config: ExtractionConfig) -> dict:
    """Extract every slide of `config.slides_dir` into `config.out_dir`.

    Returns:
        A summary (also written to `<out_dir>/extraction.json`): slide counts, tiles
        encoded, seconds and tiles per second. A run that only skips finished slides does not
        overwrite the file, so it keeps the record of the run that extracted them.
    """
    slides = list_slides(config)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("labels_csv", "splits_csv"):
        source = getattr(config, name)
        if source is not None:
            if not Path(source).is_file():
                raise DataError(f"{name}={source}: file not found")
            target = out_dir / ("labels.csv" if name == "labels_csv" else "splits.csv")
            if Path(source).resolve() != target.resolve():
                shutil.copyfile(source, target)
    if config.masks_dir is not None and not Path(config.masks_dir).is_dir():
        raise DataError(f"masks_dir={config.masks_dir}: folder not found")
    device = torch.device(config.device)
    name = extractor_name(config.encoder)
    expected = {"extractor": name, "tile_size": int(config.tile_size), "magnifications": [float(m) for m in sorted(config.magnifications)]}

    todo = []
    skipped = 0
    for path in slides:
        out_path = out_dir / f"{path.stem}.h5"
        if out_path.exists() and config.skip_existing:
            _check_existing(out_path, expected)
            skipped += 1
        else:
            todo.append((path, out_path))
    summary = {"extractor": name, "slides": len(slides), "skipped_existing": skipped, "extracted": 0, "failed": [], "tiles": 0}
    start = time.perf_counter()
    threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    summary.update(machine())  # torch_threads, cpu_capability: the features' last float32 bits depend on them
    try:
        if todo:
            _extract_all(todo, config, expected, device, summary)
    finally:
        torch.set_num_threads(threads)  # the setting is process-wide; give it back
    seconds = time.perf_counter() - start
    summary["seconds"] = round(seconds, 2)
    summary["tiles_per_second"] = round(summary["tiles"] / seconds, 1) if summary["tiles"] else None
    summary["config"] = asdict(config)
    if todo or not (out_dir / "extraction.json").is_file():  # a run that only skipped keeps the record of the one that extracted
        (out_dir / "extraction.json").write_text(json.dumps(summary, indent=1))
    return summary


def _extract_all(todo: list[tuple[Path, Path]], config: ExtractionConfig, expected: dict, device: torch.device, summary: dict) -> None:
    """Build the encoder once and extract the slides of `todo`, updating `summary`."""
    from mil_experiments import __version__

    module = build_extraction_encoder(config.encoder, config.tile_size)
    encoder = TileEncoder(module, config.encoder.input_size, device)
    attrs = {
        **expected,
        "feature_dim": int(module.out_dim),
        "input_size": int(config.encoder.input_size or config.tile_size),
        "encoder": asdict(config.encoder),
        "tissue": asdict(config.tissue),
        "version": __version__,
    }
    slide_bar = tqdm(todo, desc="slides", unit="slide", disable=not config.progress)
    tile_bar = tqdm(desc="tiles", unit="tile", disable=not config.progress, leave=False)
    for path, out_path in slide_bar:
        try:
            summary["tiles"] += extract_slide(path, out_path, config, encoder, attrs, tile_bar)
            summary["extracted"] += 1
        except DataError as error:
            if not config.skip_failed:
                raise
            log.warning("skipped %s: %s", path.name, error)
            summary["failed"].append({"slide": path.name, "reason": str(error)})
    tile_bar.close()
