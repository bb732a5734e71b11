"""MSMIL: the multi-scale attention-MIL baseline of the ZoomMIL tables (after Hashimoto et al., 2020).

Every magnification's tiles are encoded and pooled by their own attention MIL; the pooled
vectors are fused and classified. For the levels l = 0..L-1 of a multi-level bag, X_l (N_l, D):

    h_l = Dropout(ReLU(W_l X_l)),  A_l = softmax(GA_l(h_l)),  M_l = A_l h_l     (H,)
    logits = W [M_0; ...; M_{L-1}]   (fusion=concat)   or   W Σ_l M_l   (fusion=sum)

Simplified from Hashimoto et al.: no domain-adversarial branch and no stain/domain labels;
the scales are pooled separately and fused late rather than in one joint multi-scale bag.
Instance scores: each level's attention on its own rows, divided by the level count so that
they sum to 1 over the bag. A single-level bag is one scale (gated-attention ABMIL).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mil_experiments.bag import LevelLayout
from mil_experiments.errors import ConfigError
from mil_experiments.models.aggregator import Aggregator, AggregatorOutput
from mil_experiments.models.zoommil import GatedAttention


class MSMIL(Aggregator):
    """Attention MIL per magnification, fused; see the module docstring."""

    multi_level = True

    @dataclass
    class Config:
        levels: int = 3  # magnifications the bags have (set by the experiment from the data)
        hidden_dim: int = 512
        attention_dim: int = 256
        dropout: float = 0.25
        fusion: str = "concat"

    def __init__(
        self, in_dim: int, n_outputs: int, levels: int = 3, hidden_dim: int = 512, attention_dim: int = 256, dropout: float = 0.25, fusion: str = "concat"
    ) -> None:
        super().__init__(in_dim, n_outputs)
        if fusion not in ("sum", "concat"):
            raise ConfigError(f"aggregator.fusion={fusion!r}: choose sum or concat")
        self.hidden_dim, self.attention_dim, self.dropout, self.fusion = hidden_dim, attention_dim, dropout, fusion
        self._build(levels)

    def _build(self, n_levels: int) -> None:
        h = self.hidden_dim
        self.fc = nn.ModuleList(nn.Sequential(nn.Linear(self.in_dim, h), nn.ReLU(), nn.Dropout(self.dropout)) for _ in range(n_levels))
        self.attention = nn.ModuleList(GatedAttention(h, self.attention_dim, self.dropout) for _ in range(n_levels))
        self.classifier = nn.Linear(h * (n_levels if self.fusion == "concat" else 1), self.n_outputs)
        self.built_levels = n_levels

    def bind_levels(self, levels: LevelLayout) -> None:
        """Build the per-level modules for the bags' level count (before the optimizer exists)."""
        if len(levels.sizes) != self.built_levels:
            self._build(len(levels.sizes))

    def check_layout(self, levels: LevelLayout, where: str) -> None:
        """Any level layout will do: the scales are pooled independently."""

    def forward(self, features: torch.Tensor, target: torch.Tensor | None = None, levels: LevelLayout | None = None) -> AggregatorOutput:
        slices = [slice(0, features.shape[0])] if levels is None else levels.slices
        if len(slices) > self.built_levels:
            raise ConfigError(f"msmil built for {self.built_levels} magnifications gets {len(slices)}: set aggregator.levels")
        pooled, scores = [], []
        for level, rows in enumerate(slices):
            hidden = self.fc[level](features[rows])  # (N_l, H)
            attention = self.attention[level](hidden)  # (N_l,)
            pooled.append(attention @ hidden)  # (H,)
            scores.append(attention / len(slices))  # (N_l,)
        if self.fusion == "concat" and len(pooled) < self.built_levels:  # a single-level bag: the other scales absent
            pooled += [features.new_zeros(self.hidden_dim)] * (self.built_levels - len(pooled))
        embedding = torch.cat(pooled) if self.fusion == "concat" else torch.stack(pooled).sum(dim=0)  # (H * L,) or (H,)
        level_scores = {} if levels is None else {m: s.detach() for m, s in zip(levels.magnifications, scores, strict=True)}
        return AggregatorOutput(logits=self.classifier(embedding), instance_scores=torch.cat(scores), embedding=embedding, level_scores=level_scores)
