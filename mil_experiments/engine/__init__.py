"""How gradients reach the encoder: the feature-gradient decomposition.

dL/dtheta = sum_i (dL/dz_i)(dz_i/dtheta): the encoder can be trained end to end on a bag
of any size by encoding it without keeping activations, running the head (aggregator and
loss) on the full feature matrix, and backpropagating dL/dZ into the encoder one chunk at
a time. Never imports a method or Lightning.
"""

from mil_experiments.engine.accumulate import Head, HeadResult, accumulate_gradients
from mil_experiments.engine.chunks import chunk_size_for_alpha, chunk_slices, encode_in_chunks
from mil_experiments.engine.engines import ENGINES, AccumulationEngine, FullBagEngine, GradientEngine
from mil_experiments.engine.exchange import FeatureExchange

__all__ = [
    "ENGINES",
    "AccumulationEngine",
    "FeatureExchange",
    "FullBagEngine",
    "GradientEngine",
    "Head",
    "HeadResult",
    "accumulate_gradients",
    "chunk_size_for_alpha",
    "chunk_slices",
    "encode_in_chunks",
]
