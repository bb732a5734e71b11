"""ABMIL: attention-based MIL pooling (Ilse et al., 2018) with a linear classifier head.

For features H (N x L): a_i = w^T tanh(V h_i) (non-gated) or
a_i = w^T (tanh(V h_i) * sigmoid(U h_i)) (gated); A = softmax(a) over the instances;
the bag embedding is M = sum_i A_i h_i and the logits are a linear map of M. The
non-gated form is the one the gradient-accumulation and sampling papers' code uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mil_experiments.models.aggregator import Aggregator, AggregatorOutput


class ABMIL(Aggregator):
    """Attention pooling + linear classifier.

    Args:
        in_dim: feature dimension L (from the encoder).
        n_outputs: 1 for a binary target (one logit), C for C classes.
        attention_dim: hidden dimension D of the attention network.
        gated: use the gated attention of Ilse et al.
        dropout: dropout on the attention hidden layer (0 = none).
    """

    @dataclass
    class Config:
        attention_dim: int = 128
        gated: bool = False
        dropout: float = 0.0

    def __init__(self, in_dim: int, n_outputs: int, attention_dim: int = 128, gated: bool = False, dropout: float = 0.0) -> None:
        super().__init__(in_dim, n_outputs)
        self.attention_v = nn.Sequential(nn.Linear(in_dim, attention_dim), nn.Tanh())
        self.attention_u = nn.Sequential(nn.Linear(in_dim, attention_dim), nn.Sigmoid()) if gated else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(in_dim, n_outputs)

    def forward(self, features: torch.Tensor, target: torch.Tensor | None = None, levels=None) -> AggregatorOutput:
        """Logits, attention (as instance scores) and embedding of one bag of (N, L) features."""
        hidden = self.attention_v(features)  # (N, D)
        if self.attention_u is not None:
            hidden = hidden * self.attention_u(features)  # (N, D)
        scores = self.attention_w(self.dropout(hidden)).squeeze(-1)  # (N,)
        attention = torch.softmax(scores, dim=0)  # (N,)
        embedding = attention @ features  # (L,)
        return AggregatorOutput(logits=self.classifier(embedding), instance_scores=attention, embedding=embedding)  # (C,), (N,), (L,)
