"""ABMIL as MHIM-MIL's v1 code builds it (`DAttention` behind `patch_to_emb`).

    h_i = Dropout_0.25(ReLU(W_e x_i))                        (N, 512)
    a_i = w^T ReLU(V h_i)        (V: 512 -> 128, w: 128 -> 1, both without bias)
    A = softmax(a);  embedding = sum_i A_i h_i;  logits = W_p embedding

Linear weights xavier-normal, biases zero (MHIM's `initialize_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mil_experiments.models.aggregator import Aggregator, AggregatorOutput
from mil_experiments.models.initialization import xavier_init


class ABMILMHIM(Aggregator):
    """MHIM's ABMIL: embedding layer, bias-free ReLU attention, linear predictor."""

    @dataclass
    class Config:
        dim: int = 512
        attention_dim: int = 128
        dropout: float = 0.25

    def __init__(self, in_dim: int, n_outputs: int, dim: int = 512, attention_dim: int = 128, dropout: float = 0.25) -> None:
        super().__init__(in_dim, n_outputs)
        self.embed = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention = nn.Sequential(nn.Linear(dim, attention_dim, bias=False), nn.ReLU(), nn.Linear(attention_dim, 1, bias=False))
        self.predictor = nn.Linear(dim, n_outputs)
        xavier_init(self)

    def forward(self, features: torch.Tensor, target: torch.Tensor | None = None, levels=None) -> AggregatorOutput:
        hidden = self.embed(features)  # (N, dim)
        attention = torch.softmax(self.attention(hidden).squeeze(-1), dim=0)  # (N,)
        embedding = attention @ hidden  # (dim,)
        return AggregatorOutput(logits=self.predictor(embedding), instance_scores=attention, embedding=embedding)  # (C,), (N,)
