"""`FeatureExchange`: the seam where a bag's features and their gradients cross processes.

`accumulate_gradients` encodes this process's instances, asks the exchange for the whole
bag's feature matrix (`gather`), runs the head on it, and asks the exchange for this
process's rows of dL/dZ (`scatter`). On one device both are the identity (this class);
tile-parallel training splits a slide's tiles across processes and implements them with
collective communication, so the same engine code trains the encoder on every rank.
"""

from __future__ import annotations

import torch


class FeatureExchange:
    """One process holds the whole bag: gather and scatter are the identity."""

    def gather(self, local_features: torch.Tensor) -> torch.Tensor:
        """This process's (n, D) features -> the bag's (N, D) features."""
        return local_features

    def scatter(self, feature_grad: torch.Tensor) -> torch.Tensor:
        """The bag's (N, D) dL/dZ -> this process's (n, D) rows."""
        return feature_grad
