"""DTFD-MIL with AFS distillation (Zhang et al., CVPR 2022): a double-tier model on pseudo-bags.

Tier 1: the bag is split into G pseudo-bags (a random permutation cut into G nearly equal
parts in training; in input order at evaluation, so that evaluation is deterministic); each
is reduced (Linear L -> 512, ReLU), pooled by gated attention (512 -> 128 -> 1) into f_g and
classified: p_g = W_1 f_g. Tier 2 (AFS: the pseudo-bag features themselves are distilled):
gated attention over {f_g} pools them into the bag embedding, classified by W_2.

    loss = bag_loss(tier-2 logits) + mean_g bag_loss(p_g, y)    (each pseudo-bag takes the bag label)

as the official code's two backward passes sum into the tier-1 gradients. Instance scores:
an instance's tier-1 attention inside its pseudo-bag times its pseudo-bag's tier-2 weight.

Deviations for a same-architecture comparison with torchmil's DTFDMIL (which keeps neither):
`input_layer=false` drops the reduction (f_g pools the features themselves, dim = in_dim),
`gated=false` drops the sigmoid gate of both attentions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mil_experiments.models.aggregator import Aggregator, AggregatorOutput, bag_loss


class GatedAttention(nn.Module):
    """a_i = w^T (tanh(V h_i) ⊙ sigmoid(U h_i)), or w^T tanh(V h_i) when not `gated`; returns softmax(a) over the rows."""

    def __init__(self, dim: int, attention_dim: int, gated: bool = True) -> None:
        super().__init__()
        self.v = nn.Sequential(nn.Linear(dim, attention_dim), nn.Tanh())
        self.u = nn.Sequential(nn.Linear(dim, attention_dim), nn.Sigmoid()) if gated else None
        self.w = nn.Linear(attention_dim, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate = self.v(hidden) if self.u is None else self.v(hidden) * self.u(hidden)  # (n, attention_dim)
        return torch.softmax(self.w(gate).squeeze(-1), dim=0)  # (n,)


class DTFD(Aggregator):
    """Double-tier feature distillation MIL (AFS)."""

    @dataclass
    class Config:
        dim: int = 512
        attention_dim: int = 128
        pseudo_bags: int = 5
        dropout: float = 0.0
        input_layer: bool = True  # false: no reduction in -> dim (torchmil's DTFDMIL)
        gated: bool = True  # false: tanh attention without the sigmoid gate (torchmil's DTFDMIL)

    def __init__(self, in_dim: int, n_outputs: int, dim: int = 512, attention_dim: int = 128, pseudo_bags: int = 5, dropout: float = 0.0,
                 input_layer: bool = True, gated: bool = True) -> None:
        super().__init__(in_dim, n_outputs)
        if not input_layer:
            dim = in_dim
        self.reduce = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Dropout(dropout)) if input_layer else nn.Identity()
        self.tier1_attention = GatedAttention(dim, attention_dim, gated)
        self.tier1_classifier = nn.Linear(dim, n_outputs)
        self.tier2_attention = GatedAttention(dim, attention_dim, gated)
        self.tier2_classifier = nn.Linear(dim, n_outputs)
        self.pseudo_bags = pseudo_bags

    def split(self, n: int, device: torch.device) -> list[torch.Tensor]:
        """Rows of each pseudo-bag: min(G, n) nearly equal parts of a random (training) or the input order."""
        order = torch.randperm(n, device=device) if self.training else torch.arange(n, device=device)  # (n,)
        return list(torch.tensor_split(order, min(self.pseudo_bags, n)))

    def forward(self, features: torch.Tensor, target: torch.Tensor | None = None, levels=None) -> AggregatorOutput:
        hidden = self.reduce(features)  # (N, dim)
        groups = self.split(features.shape[0], features.device)
        pooled, tier1_logits, inner = [], [], []
        for rows in groups:
            group = hidden[rows]  # (n_g, dim): gathered once, so that one copy is saved for backward, not two
            weights = self.tier1_attention(group)  # (n_g,)
            feature = weights @ group  # (dim,)
            pooled.append(feature)
            tier1_logits.append(self.tier1_classifier(feature))  # (C,)
            inner.append(weights)
        pseudo = torch.stack(pooled)  # (G, dim)
        outer = self.tier2_attention(pseudo)  # (G,)
        embedding = outer @ pseudo  # (dim,)
        scores = features.new_zeros(features.shape[0])  # (N,)
        for g, rows in enumerate(groups):
            scores = scores.index_put((rows,), inner[g] * outer[g])
        output = AggregatorOutput(logits=self.tier2_classifier(embedding), instance_scores=scores, embedding=embedding)
        if target is not None and self.training:
            output.aux_losses["tier1"] = torch.stack([bag_loss(logits, target) for logits in tier1_logits]).mean()
        return output
