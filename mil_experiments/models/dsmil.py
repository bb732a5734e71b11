"""DSMIL (Li et al., CVPR 2021): dual-stream MIL with a critical instance.

    c = W_i x                                  (N, C) instance logits (max-pooling stream)
    m_k = x[argmax_i c_ik]                     critical instance of class k
    Q = q(x) (N, 128), q = Linear-ReLU-Linear-Tanh;  V = x (the official default; with
    `passing_v`, V = ReLU(W_v Dropout(x)))
    U = softmax(Q q(m)^T / sqrt(128), over instances)      (N, C) distance-based attention
    B = U^T V (C, L);  logits = Conv1d_{C->C, kernel L}(B)    (C,)
    loss = 0.5 bag_loss(logits) + 0.5 bag_loss(max_i c_i)

Single magnification here; the multi-scale input of the ZoomMIL tables (each tile's
features concatenated with its parent's) is a dataset-side concatenation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mil_experiments.models.aggregator import Aggregator, AggregatorOutput, bag_loss


class DSMIL(Aggregator):
    """Dual-stream MIL: instance classifier + critical-instance attention, half of each loss."""

    @dataclass
    class Config:
        query_dim: int = 128
        passing_v: bool = False
        value_dropout: float = 0.0
        max_loss_weight: float = 0.5

    def __init__(self, in_dim: int, n_outputs: int, query_dim: int = 128, passing_v: bool = False, value_dropout: float = 0.0,
                 max_loss_weight: float = 0.5) -> None:
        super().__init__(in_dim, n_outputs)
        self.instance_classifier = nn.Linear(in_dim, n_outputs)
        self.query = nn.Sequential(nn.Linear(in_dim, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim), nn.Tanh())
        self.value = nn.Sequential(nn.Dropout(value_dropout), nn.Linear(in_dim, in_dim), nn.ReLU()) if passing_v else nn.Identity()
        self.bag_classifier = nn.Conv1d(n_outputs, n_outputs, kernel_size=in_dim)
        self.max_loss_weight = max_loss_weight

    def forward(self, features: torch.Tensor, target: torch.Tensor | None = None, levels=None) -> AggregatorOutput:
        instance_logits = self.instance_classifier(features)  # (N, C)
        queries = self.query(features)  # (N, q)
        critical = features[instance_logits.argmax(dim=0)]  # (C, L)
        attention = torch.softmax(queries @ self.query(critical).T / math.sqrt(queries.shape[1]), dim=0)  # (N, C)
        bag = attention.T @ self.value(features)  # (C, L)
        logits = self.bag_classifier(bag[None]).reshape(-1)  # (C,)
        column = 0 if self.n_outputs == 1 else (self.n_outputs - 1 if self.n_outputs == 2 else int(logits.argmax()))
        output = AggregatorOutput(logits=logits, instance_scores=attention[:, column], embedding=bag.reshape(-1))
        if target is not None and self.training:
            output.bag_loss_weight = 1 - self.max_loss_weight
            output.aux_losses["max_instance"] = self.max_loss_weight * bag_loss(instance_logits.max(dim=0).values, target)
        return output
