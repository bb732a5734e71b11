"""ABMIL-ACC: ABMIL trained end to end with gradient accumulation over alpha% chunks.

Andersson, Koriakina et al., "End-to-end multiple instance learning with gradient
accumulation" (2022). Each bag is forwarded ceil(alpha% of N) instances at a time with
the exact full-bag gradient (see `mil_experiments.engine.accumulate`); alpha = 100 is
the full-bag ABMIL step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mil_experiments.bag import Bag
from mil_experiments.engine import accumulate_gradients, chunk_size_for_alpha
from mil_experiments.engine.accumulate import MODES
from mil_experiments.methods.abmil import ABMIL


class ABMILACC(ABMIL):
    """ABMIL with `accumulate_gradients`; `acc_mode` picks cached or recompute."""

    @dataclass
    class Config(ABMIL.Config):
        name: str = "abmil_acc"
        acc_mode: str = "cached"
        # cached only: encode the last chunk once, keeping its graph (a little faster, a
        # little more memory: see `accumulate_gradients`).
        acc_keep_last_chunk: bool = False

    def __init__(self, config: Config, *args, **kwargs) -> None:
        if config.acc_mode not in MODES:
            raise ValueError(f"method.acc_mode={config.acc_mode!r}: choose one of {MODES}")
        super().__init__(config, *args, **kwargs)
        self.last_chunk_size = 0

    def backward_bag(self, bag: Bag, loss_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        chunk_size = chunk_size_for_alpha(self.alpha, bag.size)
        self.last_chunk_size = chunk_size
        loss, (logits, _) = accumulate_gradients(
            self.encoder,
            self.aggregator,
            lambda logits, label: self.bag_loss(logits, label) * loss_scale,
            bag.instances,
            bag.label,
            chunk_size,
            mode=self.config.acc_mode,
            backward=self.manual_backward,
            keep_last_chunk=self.config.acc_keep_last_chunk,
        )
        return loss / loss_scale, logits
