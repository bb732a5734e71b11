"""ABMIL: attention MIL (Ilse et al., 2018) trained end to end on the full bag."""

from __future__ import annotations

import torch
from torch import nn

from mil_experiments.bag import Bag
from mil_experiments.methods.base import MILMethod
from mil_experiments.models.attention_mil import AttentionMIL


class ABMIL(MILMethod):
    """Full-bag forward and backward: every instance's activations are held at once."""

    def build_aggregator(self, in_dim: int) -> nn.Module:
        a = self.config.aggregator
        return AttentionMIL(in_dim, a.attention_dim, self.n_outputs, gated=a.gated, dropout=a.dropout)

    def backward_bag(self, bag: Bag, loss_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        logits, _ = self.aggregator(self.encoder(bag.instances))  # (n_outputs,), (N,)
        loss = self.bag_loss(logits, bag.label)
        self.manual_backward(loss * loss_scale)
        return loss.detach(), logits.detach()
