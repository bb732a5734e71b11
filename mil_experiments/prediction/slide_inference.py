"""One raw slide through a trained model: tissue, tiles, encoder, aggregator; prediction and cost.

The slide is tiled as the model's training data was (`TrainedModel.tiling`: tissue detected
at the lowest magnification, every magnification in depth-first order). Then:

- ZoomMIL on several magnifications (`TrainedModel.zooms`): the tissue tiles of the lowest
  used magnification are read and encoded; the model's incremental forward
  (`ZoomMIL.zoom_step`) picks the top K and returns the rows of their children at the next
  used magnification; only those are read from the slide file and encoded; and so on. No
  unselected tile is read or encoded, and the prediction equals the model's ordinary forward
  on the slide's full feature bag (tested).
- every other model: every tissue tile of each of the bag's magnifications is read and
  encoded, and the bag goes through `method.predict`.

Cost: wall seconds from opening the slide to the logits (`seconds`; `seconds_tissue` of it
for tissue detection and tiling), FLOPs of the encoder and of the aggregator
(`FlopCounterMode`), and tiles read and encoded per magnification.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mil_experiments.bag import Bag, LevelLayout
from mil_experiments.data.wsi.readers import open_slide
from mil_experiments.data.wsi.tiling import tile_slide
from mil_experiments.evaluation import predicted_label, probabilities
from mil_experiments.models.aggregator import AggregatorOutput
from mil_experiments.prediction.flops import FlopMeter
from mil_experiments.prediction.tile_reader import TileReader
from mil_experiments.prediction.trained_model import TrainedModel


@dataclass
class LevelView:
    """What one magnification contributed, for the heatmap: tiles, their scores, the tiles zoomed into."""

    magnification: float
    coords: np.ndarray  # (n, 2) level-0 (x, y) of the tiles read
    size_level0: float  # tile side in level-0 pixels
    scores: np.ndarray | None  # (n,) attention of those tiles
    zoomed: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))  # (k, 2) tiles whose children were read


@dataclass
class SlidePrediction:
    """The prediction and the cost of one slide."""

    slide_id: str
    probabilities: np.ndarray  # (C,)
    predicted: int
    seconds: float
    seconds_tissue: float
    flops_encoder: int
    flops_aggregator: int
    tiles_read: dict[float, int]
    tiles_encoded: dict[float, int]
    tissue_tiles: dict[float, int]
    levels: list[LevelView]
    output: AggregatorOutput

    @property
    def flops(self) -> int:
        return self.flops_encoder + self.flops_aggregator


def predict_slide(model: TrainedModel, slide_path: str | Path, count_flops: bool = True) -> SlidePrediction:
    """Run `model` on the slide file at `slide_path`; see the module docstring."""
    slide_path = Path(slide_path)
    device = next(iter(model.method.parameters())).device
    encoder_flops, aggregator_flops = FlopMeter(count_flops), FlopMeter(count_flops)
    encoded: dict[float, int] = {}

    def encode(magnification: float, tiles: np.ndarray) -> torch.Tensor:
        with encoder_flops.count():
            features = model.encode(tiles)  # (n, D)
        encoded[magnification] = encoded.get(magnification, 0) + len(tiles)
        return features

    start = time.perf_counter()
    s = model.tiling
    with open_slide(slide_path, s.reader) as slide, torch.inference_mode():
        tiling = tile_slide(slide, s.magnifications, s.tile_size, s.tissue, s.base_magnification)
        seconds_tissue = time.perf_counter() - start
        reader = TileReader(slide, tiling)
        layout = LevelLayout(tuple(model.bag_magnifications), tuple(len(tiling.coords[m]) for m in model.bag_magnifications))
        if model.zooms:
            output, levels = _zoom(model, reader, layout, encode, aggregator_flops)
        else:
            output, levels = _all_tiles(model, reader, layout, encode, aggregator_flops, slide_path.stem)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    for view in levels:
        view.size_level0 = tiling.tile_size_level0[view.magnification]
    probability = probabilities(output.logits, model.num_classes)
    per_class = torch.stack([1 - probability, probability]) if probability.ndim == 0 else probability  # (C,)
    return SlidePrediction(
        slide_id=slide_path.stem,
        probabilities=per_class.float().cpu().numpy(),
        predicted=predicted_label(probability, model.num_classes),
        seconds=seconds,
        seconds_tissue=seconds_tissue,
        flops_encoder=encoder_flops.total,
        flops_aggregator=aggregator_flops.total,
        tiles_read=dict(reader.tiles_read),
        tiles_encoded=encoded,
        tissue_tiles={m: int(n) for m, n in zip(layout.magnifications, layout.sizes, strict=True)},
        levels=levels,
        output=output.detach(),
    )


def _zoom(model: TrainedModel, reader: TileReader, layout: LevelLayout, encode, flops: FlopMeter) -> tuple[AggregatorOutput, list[LevelView]]:
    """ZoomMIL one magnification at a time: only the chosen tiles' children are read and encoded."""
    aggregator = model.method.aggregator
    state = aggregator.zoom_start(layout)
    views: list[LevelView] = []
    while state.rows is not None:
        magnification, rows = state.magnification, state.rows.cpu().numpy()
        features = encode(magnification, reader.read(magnification, rows))  # (n_l, D)
        with flops.count():
            next_rows = aggregator.zoom_step(state, features)
        views.append(LevelView(magnification, reader.tiling.coords[magnification][rows], 0.0, state.attentions[-1].float().cpu().numpy()))
        if next_rows is not None:
            ratio = state.ratios[state.level - 1]
            parents = np.unique(next_rows.cpu().numpy() // ratio)  # rows of this level whose children are read next
            views[-1].zoomed = reader.tiling.coords[magnification][parents]
    return aggregator.zoom_output(state), views


def _all_tiles(model: TrainedModel, reader: TileReader, layout: LevelLayout, encode, flops: FlopMeter, slide_id: str) -> tuple[AggregatorOutput, list[LevelView]]:
    """Every tissue tile of every bag magnification, then the ordinary forward."""
    parts = [encode(m, reader.read(m, np.arange(n))) for m, n in zip(layout.magnifications, layout.sizes, strict=True)]
    multi = len(parts) > 1
    bag = Bag(
        instances=torch.cat(parts),  # (N_total, D)
        label=torch.tensor(0),
        bag_id=slide_id,
        magnification=None if multi else layout.magnifications[0],
        levels=layout if multi else None,
    )
    with flops.count():
        output = model.method.predict(bag)
    views = []
    for m in layout.magnifications:
        scores = output.level_scores.get(m) if multi else output.instance_scores
        views.append(LevelView(m, reader.tiling.coords[m], 0.0, None if scores is None else scores.float().cpu().numpy()))
    return output, views
