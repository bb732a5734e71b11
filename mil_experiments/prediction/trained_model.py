"""A trained run, ready for raw slides: its model, the tile encoder of its inputs, its tiling.

The run folder is `<run>/checkpoints/<name>.ckpt` + `<run>/config.yaml` (what
`python -m mil_experiments` writes). The method is rebuilt from the run's config (without
its data splits) and the checkpoint's weights are loaded strictly. What turns tiles into the
aggregator's inputs depends on how the run was trained:

- on feature bags (`dataset=feature_bags` or a dataset built on it, such as the cohorts; `encoder=identity`): the tile encoder that wrote
  the features, rebuilt from the extraction settings stored in the feature files' attributes
  (`encoder`, `tile_size`, `magnifications`, `tissue`, `reader`, `input_size`; the
  `base_magnification` override from `extraction.json` when there is one), each of which
  `extract.*` can override; tiles are preprocessed as the extraction did (`TileEncoder`);
- end to end on tiles (`dataset=synthetic_wsi`): the checkpoint's own encoder, with the
  dataset's tiling (tissue at `tissue_magnification`, tiles at `magnification`), resizing and
  normalisation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mil_experiments.bag import LevelLayout
from mil_experiments.config import validate
from mil_experiments.data.description import DataDescription
from mil_experiments.data.feature_bags import FeatureBagsDataModule
from mil_experiments.data.synthetic_wsi import SyntheticWSIDataModule, normalised, resized_tiles
from mil_experiments.data.wsi.extraction import (
    ExtractionEncoderConfig,
    TileEncoder,
    build_extraction_encoder,
    extractor_name,
)
from mil_experiments.data.wsi.tissue import TissueConfig
from mil_experiments.errors import ConfigError, DataError
from mil_experiments.methods.base import MILMethod
from mil_experiments.models.encoders import build_encoder
from mil_experiments.models.zoommil import ZoomMIL
from mil_experiments.prediction.settings import ExtractOverrides


@dataclass
class TilingSettings:
    """How a slide is tiled: as the model's training data was."""

    reader: str
    magnifications: list[float]  # every tiling magnification; tissue is detected at the lowest
    tile_size: int
    tissue: TissueConfig
    base_magnification: float | None = None


class TileEncoding:
    """(B, T, T, 3) uint8 tiles -> (B, D) features the aggregator takes, `batch_size` tiles at a time."""

    def __init__(self, encode_batch: Callable[[np.ndarray], torch.Tensor], batch_size: int, name: str) -> None:
        self.encode_batch = encode_batch
        self.batch_size = batch_size
        self.name = name

    def __call__(self, tiles: np.ndarray) -> torch.Tensor:
        parts = [self.encode_batch(tiles[i : i + self.batch_size]) for i in range(0, len(tiles), self.batch_size)]
        return torch.cat(parts)  # (N, D)


@dataclass
class TrainedModel:
    """A trained model and what it needs to run on raw slides.

    Attributes:
        run_dir: the run folder.
        method: the rebuilt method with the checkpoint's weights, in eval mode.
        tiling: the tiling settings of the training data.
        encode: uint8 tiles -> the aggregator's input features.
        bag_magnifications: the levels of the training bags, lowest first.
        num_classes, class_names: the task.
        source: where the tile encoder came from (for the summary).
        declared_classes: the run's `dataset.classes` (text labels), if it declared them.
    """

    run_dir: Path
    method: MILMethod
    tiling: TilingSettings
    encode: TileEncoding
    bag_magnifications: list[float]
    num_classes: int
    class_names: list[str]
    source: str
    declared_classes: list[str] | None = None

    @property
    def zooms(self) -> bool:
        """ZoomMIL on several magnifications: read only the children of the chosen tiles."""
        return isinstance(self.method.aggregator, ZoomMIL) and len(self.bag_magnifications) > 1


def load_trained_model(checkpoint: str | Path, device: str = "cpu", batch_size: int = 64, features_dir: str | None = None,
                       extract: ExtractOverrides | None = None) -> TrainedModel:
    """Rebuild the run of `checkpoint` (`<run>/checkpoints/<name>.ckpt`) for raw-slide inference; see the module docstring.

    Raises:
        ConfigError / DataError (one line, naming the file or key): a missing or unreadable
        checkpoint, no config.yaml beside it, weights that do not fit the config, a run not
        trained on slides, feature files without extraction settings.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ConfigError(f"checkpoint={checkpoint}: file not found")
    run_dir = checkpoint.resolve().parent.parent
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"checkpoint={checkpoint}: no config.yaml in {run_dir} (expected <run>/checkpoints/<name>.ckpt of python -m mil_experiments)")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    except Exception as error:  # torch.load raises assorted types for foreign or broken files
        raise DataError(f"checkpoint={checkpoint}: cannot be read as a run checkpoint ({type(error).__name__}: {error})") from None
    model = build_for_slides(OmegaConf.load(config_path), run_dir, device, batch_size, features_dir, extract)
    try:
        model.method.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise ConfigError(f"checkpoint={checkpoint}: its weights do not fit {config_path} ({first})") from None
    model.method.to(torch.device(device)).eval()
    return model


def build_for_slides(cfg: DictConfig, run_dir: Path, device: str = "cpu", batch_size: int = 64, features_dir: str | None = None,
                     extract: ExtractOverrides | None = None) -> TrainedModel:
    """The model of a run's config (freshly initialised weights, eval mode) with its tile encoder and tiling."""
    cfg = cfg.copy()
    # Inference needs none of the training machinery: a GPU run is rebuilt on this machine, and
    # MHIM's stage-1 teacher (or an fc initialisation) comes from the checkpoint rather than its original folder.
    cfg.trainer.accelerator, cfg.trainer.precision = "auto", "32-true"
    if "teacher_init" in cfg.method:
        cfg.method.teacher_init, cfg.method.allow_random_teacher, cfg.method.init_stu_type = None, True, "none"
    if cfg.method.get("init_fc_from") is not None:  # the weights come from the checkpoint, not from that run
        cfg.method.init_fc_from = None
    checked = validate(cfg)
    on_features = issubclass(checked.dataset_class, FeatureBagsDataModule)  # feature_bags and the cohorts built on it
    if not on_features and not issubclass(checked.dataset_class, SyntheticWSIDataModule):
        raise ConfigError(f"{run_dir}: the run was trained on dataset={checked.dataset.name}, not on slides (feature bags or synthetic_wsi tiles)")
    datamodule = checked.dataset_class(config=checked.dataset, seed=checked.seed)  # labels and classes only: no splits are built
    torch_device = torch.device(device)
    if on_features:
        folder = Path(features_dir or checked.dataset.features_dir or checked.dataset.root)
        tiling, encoder_config = _extraction_settings(folder, extract or ExtractOverrides())
        tile_encoder = build_extraction_encoder(encoder_config, tiling.tile_size)
        instance_shape = (int(tile_encoder.out_dim),)
        bag_mags = [float(m) for m in (checked.dataset.magnifications or tiling.magnifications)]
        missing = [m for m in bag_mags if m not in tiling.magnifications]
        if missing:
            raise ConfigError(f"dataset.magnifications={bag_mags}: the extraction tiled {tiling.magnifications}, not {missing}")
        encoder = build_encoder(checked.encoder, instance_shape)  # identity (with its standardization buffers, if any)
        source = f"{extractor_name(encoder_config)} from the extraction settings of {folder}"
    else:
        d = checked.dataset
        tiling = TilingSettings(d.reader, sorted({float(d.tissue_magnification), float(d.magnification)}), d.tile_size, d.tissue)
        side = d.image_size or d.tile_size
        instance_shape = (3, side, side)
        bag_mags = [float(d.magnification)]
        encoder = build_encoder(checked.encoder, instance_shape)
        source = f"the checkpoint's encoder={checked.encoder.name}"
    multi = len(bag_mags) > 1
    data = DataDescription(datamodule.num_classes, instance_shape, tuple(bag_mags), tuple(datamodule.class_names))
    if multi and not checked.aggregator_class.multi_level:
        raise ConfigError(f"{run_dir}: aggregator={checked.aggregator_name} takes one magnification; the run's bags have {bag_mags}")
    n_outputs = checked.method_class.output_count(checked.method, data.num_classes)
    aggregator = checked.aggregator_class(in_dim=encoder.out_dim, n_outputs=n_outputs, **vars(checked.aggregator))
    if multi and hasattr(aggregator, "bind_levels"):
        aggregator.bind_levels(LevelLayout(tuple(bag_mags), tuple(4 ** i for i in range(len(bag_mags)))))
    method = checked.method_class(checked.method, encoder=encoder, aggregator=aggregator, engine=checked.engine, data=data, sampling=checked.sampling)
    method.to(torch_device).eval()
    if on_features:
        extraction = TileEncoder(tile_encoder, encoder_config.input_size, torch_device)
        # the run's own encoder=identity after the extraction encoder: its standardization (encoder.standardize=true) applies
        encode = TileEncoding(lambda tiles: method.encoder(torch.from_numpy(extraction(tiles)).to(torch_device)), batch_size, source)
    else:
        encode = TileEncoding(_end_to_end_encoder(method, checked.dataset, torch_device), batch_size, source)
    declared = getattr(checked.dataset, "classes", None)
    return TrainedModel(Path(run_dir), method, tiling, encode, bag_mags, data.num_classes, list(data.class_names), source,
                        list(declared) if declared else None)


def _end_to_end_encoder(method: MILMethod, dataset, device: torch.device) -> Callable[[np.ndarray], torch.Tensor]:
    """Tiles -> the trained encoder's features, preprocessed as `dataset=synthetic_wsi` serves them."""
    mean = torch.tensor(dataset.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(dataset.std, device=device).view(1, 3, 1, 1)

    @torch.inference_mode()
    def encode(tiles: np.ndarray) -> torch.Tensor:
        images = normalised(resized_tiles(tiles, dataset.image_size).to(device), mean, std)  # (B, 3, S, S)
        return method.encoder(images)  # (B, D)

    return encode


def _extraction_settings(folder: Path, overrides: ExtractOverrides) -> tuple[TilingSettings, ExtractionEncoderConfig]:
    """The tiling and tile encoder of the features in `folder` (first file's attributes), with `overrides` applied."""
    stored: dict = {}
    files = sorted(folder.glob("*.h5")) + sorted(folder.glob("*.hdf5")) if folder.is_dir() else []
    if files:
        try:
            with h5py.File(files[0], "r") as f:
                stored = {k: f.attrs[k] for k in ("encoder", "tissue", "tile_size", "magnifications", "reader") if k in f.attrs}
        except OSError as error:
            raise DataError(f"{files[0]}: cannot be read as HDF5 ({error})") from None
        stored = {k: json.loads(v) if k in ("encoder", "tissue") else (v.tolist() if isinstance(v, np.ndarray | np.generic) else v) for k, v in stored.items()}
        summary = folder / "extraction.json"
        if summary.is_file():
            stored["base_magnification"] = json.loads(summary.read_text()).get("config", {}).get("base_magnification")
    where = str(files[0]) if files else f"{folder} (no feature files there)"
    given = {k: v for k, v in asdict(overrides).items() if v is not None and k not in ("encoder", "tissue")}
    encoder = {**stored.get("encoder", {}), **{k: v for k, v in overrides.encoder.items() if v is not None}}
    tissue = {**stored.get("tissue", {}), **{k: v for k, v in overrides.tissue.items() if v is not None}}
    settings = {**stored, **given}
    lacking = [k for k, have in (("encoder.name", encoder.get("name")), ("tile_size", settings.get("tile_size")), ("magnifications", settings.get("magnifications"))) if not have]
    if lacking:
        raise ConfigError(
            f"{where}: no extraction settings for {lacking} (features not written by scripts/extract_features.py?);"
            f" give them as extract.{lacking[0]}=..."
        )
    try:
        encoder_config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExtractionEncoderConfig), encoder))
        tissue_config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TissueConfig), tissue))
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or ""
        raise ConfigError(f"extract.{key}: {str(getattr(error, 'msg', error)).splitlines()[0]} (settings of {where})") from None
    tiling = TilingSettings(
        reader=str(settings.get("reader") or "tiffslide"),
        magnifications=sorted(float(m) for m in settings["magnifications"]),
        tile_size=int(settings["tile_size"]),
        tissue=tissue_config,
        base_magnification=settings.get("base_magnification"),
    )
    return tiling, encoder_config
