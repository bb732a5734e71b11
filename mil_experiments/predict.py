"""`python -m mil_experiments.predict checkpoint=<run>/checkpoints/selected.ckpt slides=<dir> [key=value ...]`.

Runs a trained model on every slide file of a folder (raw slides: tissue detection, tiling,
tile encoder, aggregator; see `mil_experiments.prediction.slide_inference`) and writes to
`out_dir`:

- `predictions.csv`: per slide `slide_id`, `label` (with `labels_csv`), `predicted`,
  `prob_<class>`, `seconds`, `seconds_tissue`, `flops`, `flops_encoder`, `flops_aggregator`,
  and per magnification `tissue_tiles_<m>x`, `tiles_read_<m>x`, `tiles_encoded_<m>x`;
- `heatmaps/<slide_id>.png`: the attention over the thumbnail;
- `summary.json`: the model, the means per slide (seconds, TFLOPs, tiles), the accuracy and
  the slides skipped with `skip_failed=true` (each with its one-line reason);
- `config.yaml`: the settings used.

Settings: `conf/predict.yaml` (Hydra override syntax). Bad input is one line naming the key or
file, and exit status 2.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from mil_experiments.data.wsi.extraction import SLIDE_EXTENSIONS
from mil_experiments.errors import ConfigError, DataError
from mil_experiments.prediction.settings import ExtractOverrides

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
log = logging.getLogger(__name__)


@dataclass
class PredictConfig:
    """Schema of conf/predict.yaml; see that file for each key."""

    checkpoint: str | None = None
    slides: str | None = None
    out_dir: str | None = None
    overwrite: bool = False
    labels_csv: str | None = None
    label_column: str = "label"
    slide_extensions: list[str] = field(default_factory=lambda: list(SLIDE_EXTENSIONS))
    limit: int | None = None
    skip_failed: bool = False
    features_dir: str | None = None
    extract: ExtractOverrides = field(default_factory=ExtractOverrides)
    device: str = "cpu"
    batch_size: int = 64
    num_threads: int | None = None
    flops: bool = True
    heatmaps: bool = True
    thumbnail_size: int = 512
    masks_dir: str | None = None

    def check(self) -> None:
        for key in ("checkpoint", "slides"):
            if not getattr(self, key):
                raise ConfigError(f"{key} is not set: python -m mil_experiments.predict checkpoint=<run>/checkpoints/selected.ckpt slides=<dir>")
        if not Path(self.checkpoint).is_file():
            raise ConfigError(f"checkpoint={self.checkpoint}: file not found")
        if not Path(self.slides).is_dir():
            raise DataError(f"slides={self.slides}: folder not found")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}: must be >= 1")
        if self.thumbnail_size < 16:
            raise ConfigError(f"thumbnail_size={self.thumbnail_size}: must be >= 16")
        if self.masks_dir is not None and not Path(self.masks_dir).is_dir():
            raise DataError(f"masks_dir={self.masks_dir}: folder not found")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"device={self.device}: no CUDA GPU is available here; use device=cpu")


def compose(overrides: list[str]) -> PredictConfig:
    """conf/predict.yaml with Hydra-style `overrides`, checked against `PredictConfig`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="predict", overrides=overrides)
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PredictConfig), OmegaConf.to_container(cfg)))
    except (HydraException, OmegaConfBaseException) as error:
        key = getattr(error, "full_key", None) or ""
        lines = str(getattr(error, "msg", error)).strip().splitlines()
        message = f"{lines[0]} (no such key in conf/predict.yaml)" if lines[0].startswith("Could not override") else lines[0]
        raise ConfigError(f"{key}: {message}" if key else message) from None
    config.check()
    return config


def list_slides(config: PredictConfig) -> list[Path]:
    """The slide files of `config.slides`, sorted by name (at most `limit`)."""
    folder = Path(config.slides)
    if not folder.is_dir():
        raise DataError(f"slides={folder}: folder not found")
    extensions = {e.lower() for e in config.slide_extensions}
    slides = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)
    if not slides:
        raise DataError(f"slides={folder}: no slide files with extensions {sorted(extensions)}")
    return slides[: config.limit] if config.limit is not None else slides


def run_predictions(config: PredictConfig) -> dict:
    """Predict every slide of `config.slides`; write the files of the module docstring; return the summary."""
    slides = list_slides(config)
    import torch

    from mil_experiments.data.slide_splits import read_labels
    from mil_experiments.prediction.heatmap import draw_heatmap
    from mil_experiments.prediction.slide_inference import predict_slide
    from mil_experiments.prediction.trained_model import load_trained_model

    if config.labels_csv and not Path(config.labels_csv).is_file():
        raise DataError(f"labels_csv={config.labels_csv}: file not found")
    model = load_trained_model(config.checkpoint, config.device, config.batch_size, config.features_dir, config.extract)
    labels = read_labels(config.labels_csv, config.label_column, model.declared_classes)[0] if config.labels_csv else None
    out = Path(config.out_dir) if config.out_dir else Path("outputs/predict") / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{model.run_dir.name}"
    if (out / "predictions.csv").exists() and not config.overwrite:
        raise ConfigError(f"out_dir={out}: already holds predictions.csv; choose another out_dir or pass overwrite=true")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
    threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    names = model.class_names or [str(c) for c in range(model.num_classes)]
    rows, failed = [], []
    try:
        for path in slides:
            try:
                result = predict_slide(model, path, count_flops=config.flops)
            except DataError as error:
                if not config.skip_failed:
                    raise
                log.warning("skipped %s: %s", path.name, error)
                failed.append({"slide": path.name, "reason": str(error)})
                continue
            row = {"slide_id": result.slide_id}
            if labels is not None:
                row["label"] = labels.get(result.slide_id, "")
            row["predicted"] = result.predicted
            row.update({f"prob_{name}": round(float(p), 6) for name, p in zip(names, result.probabilities, strict=True)})
            row.update(seconds=round(result.seconds, 4), seconds_tissue=round(result.seconds_tissue, 4),
                       flops=result.flops, flops_encoder=result.flops_encoder, flops_aggregator=result.flops_aggregator)
            for m in model.bag_magnifications:
                row[f"tissue_tiles_{m:g}x"] = result.tissue_tiles[m]
                row[f"tiles_read_{m:g}x"] = result.tiles_read.get(m, 0)
                row[f"tiles_encoded_{m:g}x"] = result.tiles_encoded.get(m, 0)
            rows.append(row)
            if config.heatmaps:
                title = f"{result.slide_id}: predicted {names[result.predicted]} (p = {result.probabilities[result.predicted]:.2f})"
                if labels is not None and result.slide_id in labels:
                    title += f", label {names[labels[result.slide_id]]}"
                mask = Path(config.masks_dir) / f"{result.slide_id}.png" if config.masks_dir else None
                draw_heatmap(path, model.tiling.reader, result.levels, title, out / "heatmaps" / f"{result.slide_id}.png", config.thumbnail_size, mask)
    finally:
        torch.set_num_threads(threads)  # process-wide; give it back
    if not rows:
        raise DataError(f"slides={config.slides}: no slide could be predicted (first failure: {failed[0]['slide']}: {failed[0]['reason']})")
    with (out / "predictions.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {**_summary(config, model, rows, out), "failed": failed}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _summary(config: PredictConfig, model, rows: list[dict], out: Path) -> dict:
    """Means per slide over `rows`, and the accuracy where labels are known."""
    import torch

    def mean(key: str) -> float:
        return sum(float(r[key]) for r in rows) / len(rows)

    labelled = [r for r in rows if r.get("label", "") != ""]
    tiles = {k: round(mean(k), 1) for k in rows[0] if k.startswith(("tissue_tiles_", "tiles_read_", "tiles_encoded_"))}
    return {
        "checkpoint": str(config.checkpoint),
        "aggregator": type(model.method.aggregator).__name__,
        "zooms": model.zooms,
        "tile_encoder": model.encode.name,
        "magnifications": model.bag_magnifications,
        "slides": len(rows),
        "seconds_per_slide": round(mean("seconds"), 4),
        "tflops_per_slide": mean("flops") / 1e12 if config.flops else None,
        "tflops_encoder_per_slide": mean("flops_encoder") / 1e12 if config.flops else None,
        "tiles_per_slide": tiles,
        "accuracy": sum(int(r["predicted"]) == int(r["label"]) for r in labelled) / len(labelled) if labelled else None,
        "device": config.device,
        "torch_threads": config.num_threads or torch.get_num_threads(),
        "flops_counted_during_timing": config.flops,
        "out_dir": str(out),
        "extract_overrides": _given(asdict(config.extract)),
    }


def _given(values: dict) -> dict:
    """The settings that were set (not null), nested."""
    out = {}
    for key, value in values.items():
        value = _given(value) if isinstance(value, dict) else value
        if value not in (None, {}):
            out[key] = value
    return out


def main(argv: list[str]) -> int:
    """The command; returns the exit status (2: bad input, reported as one line)."""
    try:
        summary = run_predictions(compose(argv))
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("slides", "seconds_per_slide", "tflops_per_slide", "tiles_per_slide", "accuracy", "out_dir")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
