"""Optimizer, learning-rate scheduler and optimizer-step schedule of a method, from config.

Adam is the default (the gradient-accumulation and sampling papers, ZoomMIL and MHIM all
use Adam); the schedulers are the ones the papers use: ReduceLROnPlateau on the
validation loss (ZoomMIL: factor 0.8, patience 5) and cosine annealing per epoch (MHIM).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mil_experiments.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "plateau", "cosine")
STEP_SCHEDULES = ("modulo", "every_k")


@dataclass
class OptimizerConfig:
    """`method.optimizer`: Adam by default, with the papers' settings."""

    name: str = "adam"  # adam | adamw | sgd
    lr: float = 5e-5
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)  # adam, adamw
    momentum: float = 0.9  # sgd

    def check(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"method.optimizer.name={self.name!r}: choose one of {OPTIMIZERS}")
        if not self.lr > 0:
            raise ConfigError(f"method.optimizer.lr={self.lr:g}: must be > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"method.optimizer.weight_decay={self.weight_decay:g}: must be >= 0")


@dataclass
class SchedulerConfig:
    """`method.scheduler`: none, ReduceLROnPlateau on `val/loss`, or cosine annealing per epoch."""

    name: str = "none"  # none | plateau | cosine
    factor: float = 0.8  # plateau: lr *= factor
    patience: int = 5  # plateau: epochs without improvement of val/loss
    min_lr: float = 0.0  # plateau: lower bound; cosine: eta_min
    t_max: int | None = None  # cosine: epochs of one half period (default: trainer.max_epochs)

    def check(self) -> None:
        if self.name not in SCHEDULERS:
            raise ConfigError(f"method.scheduler.name={self.name!r}: choose one of {SCHEDULERS}")
        if self.name == "plateau" and not 0 < self.factor < 1:
            raise ConfigError(f"method.scheduler.factor={self.factor:g}: must be in (0, 1)")


def build_optimizer(parameters: Iterable[torch.nn.Parameter], config: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer named by `config` over `parameters`."""
    params = list(parameters)
    if config.name == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
    if config.name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: SchedulerConfig, max_epochs: int):
    """The scheduler named by `config`, or None."""
    if config.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=config.factor, patience=config.patience, min_lr=config.min_lr
        )
    if config.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.t_max or max(max_epochs, 1), eta_min=config.min_lr)
    return None


def step_now(schedule: str, bags_per_step: int, batch_idx: int, batches_in_epoch: int) -> bool:
    """Whether the optimizer steps after bag `batch_idx` of the epoch.

    "modulo": when batch_idx % k == 0, as the gradient-accumulation paper's code does (the
    first step comes after one bag; the last bags' gradients carry into the next epoch).
    "every_k": after every k bags and at the epoch's end.
    """
    k = bags_per_step
    if schedule == "modulo":
        return batch_idx % k == 0
    return (batch_idx + 1) % k == 0 or batch_idx + 1 == batches_in_epoch
