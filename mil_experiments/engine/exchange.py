"""`FeatureExchange`: the seam where a bag's features and their gradients cross processes.

`accumulate_gradients` encodes this process's instances, asks the exchange for the whole
bag's feature matrix (`gather`), lets it run the head on it (`run_head`), and asks it for
this process's rows of dL/dZ (`scatter`). On one device all three are the plain thing
(this class); tile-parallel training (`mil_experiments.engine.distributed`) splits a
slide's tiles across processes and implements them with collective communication, so
the same engine code trains the encoder on every rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class FeatureExchange:
    """One process holds the whole bag: gather and scatter are the identity."""

    def gather(self, local_features: torch.Tensor) -> torch.Tensor | None:
        """This process's (n, D) features -> the bag's (N, D) features (None where no head runs)."""
        return local_features

    def run_head(self, head: Callable, features: torch.Tensor | None, backward: Callable[[torch.Tensor], None]):
        """Run the head once on the (N, D) features requiring grad and backpropagate its loss.

        Returns:
            The head's `HeadResult`, detached.
        """
        result = head(features)
        backward(result.loss)
        return result.detach()

    def scatter(self, feature_grad: torch.Tensor | None) -> torch.Tensor:
        """The bag's (N, D) dL/dZ -> this process's (n, D) rows."""
        return feature_grad
