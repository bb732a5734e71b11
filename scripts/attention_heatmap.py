"""Draw a trained model's attention over a slide's thumbnail, next to its ground-truth mask.

    python scripts/attention_heatmap.py run=outputs/runs/<run> slides_dir=data/synthetic_wsi/slides \
        masks_dir=data/synthetic_wsi/masks out=docs/img/attention_heatmap.png [slide=<slide_id>]

The run folder is one written by `python -m mil_experiments` (config.yaml and
checkpoints/selected.ckpt). The model is rebuilt from that config, the selected weights are
loaded, and the bag of the chosen test slide (by default the positive test slide with the
most tumour) is passed through encoder and aggregator. Each tile is painted with its
attention, as its percentile within the slide (as CLAM's heatmaps). Arguments are Hydra-style key=value pairs.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from mil_experiments.data.wsi.masks import read_tumour_mask  # noqa: E402
from mil_experiments.data.wsi.readers import open_slide  # noqa: E402
from mil_experiments.errors import ConfigError, DataError  # noqa: E402

USAGE = "usage: attention_heatmap.py run=<run dir> slides_dir=<dir> out=<png> [masks_dir=<dir>] [slide=<id>] [reader=tiffslide] [thumbnail_downsample=16]"


def run_config(run_dir: Path) -> DictConfig:
    """A run folder's config.yaml, after checking that it and checkpoints/selected.ckpt exist."""
    config_path, checkpoint = run_dir / "config.yaml", run_dir / "checkpoints" / "selected.ckpt"
    for path in (config_path, checkpoint):
        if not path.is_file():
            raise DataError(f"{path}: not found (is {run_dir} a run folder of python -m mil_experiments?)")
    return OmegaConf.load(config_path)


def load_run(run_dir: Path, overrides: dict[str, object] | None = None):
    """Rebuild a run from its config.yaml (with `overrides`, dotted keys) and load its selected weights, in eval mode.

    Returns:
        the `Experiment` of `mil_experiments.experiment.build_experiment`.
    """
    from mil_experiments.experiment import build_experiment

    cfg = run_config(run_dir)
    for key, value in (overrides or {}).items():
        OmegaConf.update(cfg, key, value, merge=False)
    experiment = build_experiment(cfg, Path(tempfile.mkdtemp(prefix="heatmap_")))
    checkpoint = run_dir / "checkpoints" / "selected.ckpt"
    experiment.method.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"])
    experiment.method.eval()
    return experiment


def bag_attention(run_dir: Path, slide_id: str | None) -> tuple[str, int, float, np.ndarray, np.ndarray, float]:
    """Rebuild the run, load its selected weights, and score one test bag.

    Returns:
        (slide id, label, predicted probability, attention (N,), coords (N, 2), magnification).
    """
    experiment = load_run(run_dir)
    method = experiment.method
    test = experiment.datamodule.test_set
    bags = [test[i] for i in range(len(test))]
    if slide_id is not None:
        chosen = [b for b in bags if b.bag_id == slide_id]
        if not chosen:
            raise DataError(f"slide={slide_id}: not in the test set ({', '.join(b.bag_id for b in bags)})")
        bag = chosen[0]
    else:
        positives = [b for b in bags if int(b.label) == 1] or bags
        bag = max(positives, key=lambda b: -1 if b.instance_labels is None else int(b.instance_labels.sum()))
    if bag.coords is None:
        raise DataError(f"bag {bag.bag_id}: its instances have no coordinates to draw")
    from mil_experiments.evaluation import probabilities

    with torch.no_grad():
        output = method.predict(method.encode_for_evaluation(bag))
    if output.instance_scores is None:
        raise ConfigError(f"aggregator={experiment.checked.aggregator_name} returns no instance scores")
    probability = probabilities(output.logits, method.num_classes)
    probability = float(probability if probability.ndim == 0 else probability[-1])
    return bag.bag_id, int(bag.label), probability, output.instance_scores.numpy().reshape(-1), bag.coords.numpy(), bag.magnification


def draw(slide_path: Path, mask_path: Path | None, reader: str, attention: np.ndarray, coords: np.ndarray, magnification: float, downsample: float, title: str, out: Path) -> None:
    """Thumbnail | thumbnail with attention | ground-truth mask, saved as a PNG."""
    with open_slide(slide_path, reader) as slide:
        thumb = slide.thumbnail(downsample)  # (h, w, 3)
    from mil_experiments.prediction.heatmap import overlay_heat, percentile_map

    # percentile of each tile's attention within the slide (CLAM's heatmaps do the same)
    heat = percentile_map(thumb.shape[:2], coords, attention, _tile_pixels(coords), downsample)  # (h, w)
    panels = 3 if mask_path is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4.4))
    axes[0].imshow(thumb)
    axes[0].set_title("slide")
    overlay_heat(fig, axes[1], thumb, heat)
    axes[1].set_title(f"attention percentile, {magnification:g}x tiles")
    if mask_path is not None:
        mask = read_tumour_mask(mask_path)
        axes[2].imshow(thumb)
        axes[2].imshow(np.ma.masked_where(~mask, mask), cmap="autumn", alpha=0.6, extent=(0, thumb.shape[1], thumb.shape[0], 0))
        axes[2].set_title("ground-truth tumour")
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _tile_pixels(coords: np.ndarray) -> float:
    """Tile side in level-0 pixels: the smallest step between tile columns (siblings touch)."""
    steps = np.diff(np.unique(coords[:, 0]))
    if len(steps) == 0:
        raise DataError("cannot infer the tile size from a single column of tiles")
    return float(steps.min())


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    if not {"run", "slides_dir", "out"} <= set(args) or len(args) != len(argv):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        slide_id, label, probability, attention, coords, magnification = bag_attention(Path(args["run"]), args.get("slide"))
        masks = Path(args["masks_dir"]) / f"{slide_id}.png" if "masks_dir" in args else None
        title = f"{slide_id}: label {label}, predicted p(tumour) = {probability:.2f}"
        draw(
            Path(args["slides_dir"]) / f"{slide_id}.tiff", masks, args.get("reader", "tiffslide"), attention, coords,
            magnification, float(args.get("thumbnail_downsample", 16)), title, Path(args["out"]),
        )
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args['out']} ({slide_id}, {len(attention)} tiles)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
