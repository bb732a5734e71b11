"""MaxMIL and MeanMIL: an instance classifier, then max or mean pooling of the instance logits.

    s_i = W_2 Dropout(ReLU(W_1 x_i))          (N, C) instance logits
    logits = max_i s_i  (MaxMIL)   or   mean_i s_i  (MeanMIL)

As the ZoomMIL paper's tables train them (§4.3, after SparseConvMIL), `train_subset=K`
pools only K instances drawn at random (torch's global generator, so the ACC engine can
replay the draw) in training mode; evaluation pools every instance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mil_experiments.models.aggregator import Aggregator, AggregatorOutput


def positive_scores(instance_logits: torch.Tensor) -> torch.Tensor:
    """(N,) per-instance score of the positive class: the logit for one output, else the last class's probability."""
    if instance_logits.shape[1] == 1:
        return instance_logits[:, 0]  # (N,)
    return torch.softmax(instance_logits, dim=1)[:, -1]  # (N,)


class InstancePooling(Aggregator):
    """Shared body of MaxMIL and MeanMIL; `pool` reduces (n, C) logits to (C,) (mean here)."""

    @dataclass
    class Config:
        hidden_dim: int = 128
        dropout: float = 0.25
        train_subset: int = 0  # K > 0: pool K random instances per bag in training (0: all)

    def __init__(self, in_dim: int, n_outputs: int, hidden_dim: int = 128, dropout: float = 0.25, train_subset: int = 0) -> None:
        super().__init__(in_dim, n_outputs)
        self.instance_classifier = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, n_outputs)
        )
        self.train_subset = train_subset

    def pool(self, instance_logits: torch.Tensor) -> torch.Tensor:
        """(n, C) instance logits -> (C,) bag logits."""
        return instance_logits.mean(dim=0)  # (C,)

    def forward(self, features: torch.Tensor, target: torch.Tensor | None = None, levels=None) -> AggregatorOutput:
        instance_logits = self.instance_classifier(features)  # (N, C)
        pooled = instance_logits
        if self.training and 0 < self.train_subset < features.shape[0]:
            pooled = instance_logits[torch.randperm(features.shape[0], device=features.device)[: self.train_subset]]  # (K, C)
        return AggregatorOutput(logits=self.pool(pooled), instance_scores=positive_scores(instance_logits))  # (C,), (N,)


class MaxMIL(InstancePooling):
    """Max pooling of instance logits."""

    def pool(self, instance_logits: torch.Tensor) -> torch.Tensor:
        return instance_logits.max(dim=0).values  # (C,)


class MeanMIL(InstancePooling):
    """Mean pooling of instance logits (the shared `pool`)."""
