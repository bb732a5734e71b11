"""Inference of a trained run on raw slides: `python -m mil_experiments.predict` (see `mil_experiments.predict`).

- `trained_model`: a run folder's config and checkpoint -> the model, the tile encoder that
  produced its inputs and the tiling settings;
- `tile_reader`: reads tiles of one slide by row, counting what it reads;
- `flops`: FLOPs with `torch.utils.flop_counter.FlopCounterMode`;
- `slide_inference`: one slide -> prediction, cost and attention (ZoomMIL zooms, reading only
  the children of its chosen tiles; the other aggregators encode every tile);
- `heatmap`: the attention PNG over the slide's thumbnail.
"""
