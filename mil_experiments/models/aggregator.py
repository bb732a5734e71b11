"""The aggregator contract: a bag of features in, a typed `AggregatorOutput` out.

Every aggregator (`conf/aggregator/<name>.yaml`) is a plain `nn.Module` subclassing
`Aggregator`:

    output = aggregator(features, target=None, levels=None)

- `features`: (N, D) the bag's instance features (for a multi-level bag the levels'
  rows one after another, lowest magnification first; `levels` says where each starts).
- `target`: the bag label (0-d long), given in training so that an aggregator can form
  its own auxiliary loss terms (CLAM's instance clustering, DSMIL's max-instance loss);
  None at evaluation, when no auxiliary term is formed.
- `levels`: the bag's level layout (`mil_experiments.bag.LevelLayout`) or None for a
  single-level bag.

It returns an `AggregatorOutput` (below); nothing is positional. The method forms the
loss: `bag_loss_weight * bag_loss(logits, target) + sum(aux_losses.values())`, each term
logged by name (`train/loss_<term>`), and the engine differentiates that total, so the
ACC engine is exact for any aggregator.

The hyperparameters of an aggregator are the fields of its nested `Config` dataclass
(the schema its yaml is checked against); it is built as
`Cls(in_dim=..., n_outputs=..., **fields)`, so it is equally usable without the CLI.
`in_dim` comes from the encoder, `n_outputs` from the data (1 logit for a binary task
with `method.binary_head=one_logit`, else the number of classes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn


@dataclass
class AggregatorOutput:
    """What an aggregator returns for one bag.

    Attributes:
        logits: (C,) bag logits; C = 1 (binary, one logit with BCE) or the class count.
        instance_scores: (N,) one score per input row, in input order (attention weights,
            instance probabilities, ...): instance AUC and heatmaps read it. Scores of a
            CLS token or padding never appear here. None when the model has none.
        embedding: (E,) the bag embedding before the classifier head (MHIM's consistency
            loss compares it between teacher and student).
        aux_losses: named scalar loss terms, already weighted, added to the bag loss.
        bag_loss_weight: weight of the bag classification loss (CLAM: 0.7, DSMIL: 0.5).
        level_scores: per level (magnification), (N_level,) instance scores of that
            level's rows, for multi-level aggregators.
        maps: other named per-instance maps, e.g. TransMIL's cls-token attention per layer
            as (heads, N); the trailing dimension is always the bag's N rows.
    """

    logits: torch.Tensor
    instance_scores: torch.Tensor | None = None
    embedding: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    bag_loss_weight: float = 1.0
    level_scores: dict[float, torch.Tensor] = field(default_factory=dict)
    maps: dict[str, torch.Tensor] = field(default_factory=dict)

    def detach(self) -> AggregatorOutput:
        """The same output with every tensor detached from the graph."""

        def d(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach()

        return AggregatorOutput(
            logits=self.logits.detach(),
            instance_scores=d(self.instance_scores),
            embedding=d(self.embedding),
            aux_losses={k: v.detach() for k, v in self.aux_losses.items()},
            bag_loss_weight=self.bag_loss_weight,
            level_scores={k: v.detach() for k, v in self.level_scores.items()},
            maps={k: v.detach() for k, v in self.maps.items()},
        )

    def check(self, n_instances: int, n_outputs: int, where: str) -> AggregatorOutput:
        """Raise ValueError unless the shapes fit a bag of `n_instances` rows."""
        if tuple(self.logits.shape) != (n_outputs,):
            raise ValueError(f"{where}: logits of shape {tuple(self.logits.shape)}, expected ({n_outputs},)")
        if self.instance_scores is not None and tuple(self.instance_scores.shape) != (n_instances,):
            raise ValueError(
                f"{where}: instance_scores of shape {tuple(self.instance_scores.shape)} for a bag of {n_instances}"
                f" instances; expected ({n_instances},) (no CLS or padding entries)"
            )
        for name, value in self.maps.items():
            if value.shape[-1] != n_instances:
                raise ValueError(f"{where}: map {name!r} of shape {tuple(value.shape)}, expected (..., {n_instances})")
        for name, value in self.aux_losses.items():
            if value.dim() != 0:
                raise ValueError(f"{where}: auxiliary loss {name!r} is not a scalar (shape {tuple(value.shape)})")
        return self


class Aggregator(nn.Module):
    """Base class of every aggregator: see the module docstring for the contract.

    Class attributes:
        permutation_invariant: the output does not depend on the order of the instances
            (False for TransMIL, whose positional convolutions see the order).
        multi_level: takes a multi-level bag (all magnifications); single-level
            aggregators refuse one.
    """

    permutation_invariant: ClassVar[bool] = True
    multi_level: ClassVar[bool] = False

    @dataclass
    class Config:
        """The aggregator's hyperparameters (none here); subclasses declare their own."""

    def __init__(self, in_dim: int, n_outputs: int) -> None:
        super().__init__()
        if in_dim < 1 or n_outputs < 1:
            raise ValueError(f"{type(self).__name__}: in_dim={in_dim} and n_outputs={n_outputs} must be >= 1")
        self.in_dim = in_dim
        self.n_outputs = n_outputs

    # Subclasses define `forward(self, features, target=None, levels=None) -> AggregatorOutput`.


def bag_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The bag classification loss: BCE on one logit, cross-entropy on several.

    Args:
        logits: (C,) bag logits; C = 1 means a binary task with one logit.
        target: 0-d integer label.
    """
    if logits.numel() == 1:
        return nn.functional.binary_cross_entropy_with_logits(logits.float().reshape(1), target.float().reshape(1))
    return nn.functional.cross_entropy(logits.float().reshape(1, -1), target.reshape(1).long())
