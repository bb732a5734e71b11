"""The `strategy` config axis: how a run uses its devices (one, or several processes).

- `strategy=single`: one process, one device (the plain Lightning loop).
- `strategy=ddp`: R = trainer.devices x trainer.num_nodes processes; each trains on its
  own bags (rank r takes the bags r, r + R, ... of the epoch's order, drawn once on rank 0),
  and every gradient is averaged over the ranks before each optimizer step
  (`DataParallelEngine`). One step of R ranks with one bag each is one step of a single
  device with `method.bags_per_step=R` over the same R bags. With an uneven bag count the
  ranks that run out of bags take part in the remaining steps with a zero gradient (the
  average is still over R), exactly as a single device's last, shorter group of
  `bags_per_step=R` with `step_schedule=every_k`.
- `strategy=tile_parallel`: all ranks train on the same bag at the same time; its tiles
  are split across them (`TileParallelEngine`: `shard`, `aggregator` layout), the
  encoder gradients summed over ranks, which is the single-device gradient.

Evaluation is split across the ranks too (`strategy.shard_evaluation`, default true):
`ddp` deals the validation and test bags (rank r evaluates bags r, r + R, ...; the records
are all-gathered in bag order), when evaluation is deterministic (every inference
percentage 100; random passes keep every rank evaluating every bag, drawing alike);
`tile_parallel` splits each evaluation bag's tiles. Either way the metrics are the
single-device metrics, computed over all bags. Only rank 0 writes files, and Lightning
provides the process group, devices and cluster environment, but not its
DistributedDataParallel wrapper: the engines exchange gradients themselves, once per
optimizer step (`GradientEngine.synchronize`), which DDP's per-backward hooks cannot do
for an engine that backpropagates a bag in several pieces.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from mil_experiments.engine import GradientEngine
from mil_experiments.engine.distributed import LAYOUTS, SHARDS, DataParallelEngine, TileParallelEngine
from mil_experiments.errors import ConfigError

BACKENDS = ("auto", "gloo", "nccl")
START_METHODS = ("auto", "spawn", "fork")


@dataclass
class StrategyConfig:
    """`strategy=single`: one process."""

    name: str = "single"

    @property
    def multi_process(self) -> bool:
        return False


@dataclass
class DataParallelConfig(StrategyConfig):
    """`strategy=ddp`: bags split across processes, gradients averaged before each step."""

    name: str = "ddp"
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    start_method: str = "auto"  # how one machine's ranks are started: auto = fork on CPU, spawn on CUDA
    master_port: int = 0  # 0: a free port (spawned ranks only; torchrun / SLURM set their own)
    timeout_s: int = 1800  # a collective waiting longer than this fails the run
    # evaluation split across the ranks: ddp deals the validation / test bags (deterministic
    # evaluation only); tile_parallel splits each bag's tiles. False: every rank evaluates everything
    shard_evaluation: bool = True

    @property
    def multi_process(self) -> bool:
        return True

    def check(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"strategy.backend={self.backend!r}: choose one of {BACKENDS}")
        if self.start_method not in START_METHODS:
            raise ConfigError(f"strategy.start_method={self.start_method!r}: choose one of {START_METHODS}")
        if not 0 <= self.master_port <= 65535:
            raise ConfigError(f"strategy.master_port={self.master_port}: must be in [0, 65535] (0: a free port)")
        if self.timeout_s < 1:
            raise ConfigError(f"strategy.timeout_s={self.timeout_s}: must be >= 1")


@dataclass
class TileParallelConfig(DataParallelConfig):
    """`strategy=tile_parallel`: one bag on every rank, its tiles split across them."""

    name: str = "tile_parallel"
    shard: str = "strided"  # strided: tile i on rank i mod R (the paper's sampler) | contiguous: blocks
    aggregator: str = "replicated"  # replicated: every rank runs the aggregator | dedicated: rank 0 only (the paper)

    def check(self) -> None:
        super().check()
        if self.shard not in SHARDS:
            raise ConfigError(f"strategy.shard={self.shard!r}: choose one of {SHARDS}")
        if self.aggregator not in LAYOUTS:
            raise ConfigError(f"strategy.aggregator={self.aggregator!r}: choose one of {LAYOUTS}")


STRATEGY_CONFIGS: dict[str, type[StrategyConfig]] = {
    "single": StrategyConfig,
    "ddp": DataParallelConfig,
    "tile_parallel": TileParallelConfig,
}


def world_size_of(strategy: StrategyConfig, devices: Any, num_nodes: int) -> int:
    """Processes a run uses: 1 for `single`, trainer.devices x trainer.num_nodes otherwise (checked)."""
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise ConfigError(f"trainer.devices={devices!r}: must be a number of devices >= 1 (processes per node)")
    if num_nodes < 1:
        raise ConfigError(f"trainer.num_nodes={num_nodes}: must be >= 1")
    if not strategy.multi_process:
        if devices * num_nodes != 1:
            raise ConfigError(
                f"trainer.devices={devices} trainer.num_nodes={num_nodes} with strategy=single: one device only;"
                " use strategy=ddp (bags split across devices) or strategy=tile_parallel (tiles split)"
            )
        return 1
    world = devices * num_nodes
    if isinstance(strategy, TileParallelConfig) and strategy.aggregator == "dedicated" and world < 2:
        raise ConfigError("strategy.aggregator=dedicated needs trainer.devices >= 2 (rank 0 runs the aggregator only)")
    return world


def wrap_engine(strategy: StrategyConfig, engine: GradientEngine) -> GradientEngine:
    """The configured engine as the strategy runs it (unchanged for `single`)."""
    if isinstance(strategy, TileParallelConfig):
        try:
            return TileParallelEngine(engine, shard=strategy.shard, layout=strategy.aggregator,
                                      shard_evaluation=strategy.shard_evaluation)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    if isinstance(strategy, DataParallelConfig):
        return DataParallelEngine(engine)
    return engine


def bag_split(strategy: StrategyConfig) -> str | None:
    """How the training bags of an epoch are dealt to ranks: "shard" (ddp), "same" (tile_parallel), None."""
    if isinstance(strategy, TileParallelConfig):
        return "same"
    if isinstance(strategy, DataParallelConfig):
        return "shard"
    return None


def splits_evaluation(strategy: StrategyConfig, inference: float, test_inference: list[float]) -> bool:
    """Whether ddp's ranks split the validation and test bags (`data/evaluation_shards.py`).

    Only deterministic evaluation (every inference percentage 100) is split: random passes
    draw from one random stream in bag order, which splitting the bags would change.
    """
    if bag_split(strategy) != "shard":  # ddp only: tile_parallel splits each bag's tiles instead
        return False
    return strategy.shard_evaluation and all(float(p) >= 100 for p in [inference, *test_inference])


def global_rank() -> int:
    """This process's rank in the run (0 without a process group), before or after Lightning starts."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ and _int_env(key) is not None:
            return _int_env(key)
    return 0


def _int_env(key: str) -> int | None:
    try:
        return int(os.environ[key])
    except (KeyError, ValueError):
        return None


def is_rank_zero() -> bool:
    return global_rank() == 0


def lightning_strategy(strategy: StrategyConfig, spawned: bool):
    """The Lightning strategy for `strategy` ("auto" for single; `ProcessGroupStrategy` otherwise)."""
    if not strategy.multi_process:
        return "auto"
    from datetime import timedelta

    from mil_experiments.process_group import ProcessGroupStrategy

    kwargs: dict[str, Any] = {
        "process_group_backend": None if strategy.backend == "auto" else strategy.backend,
        "timeout": timedelta(seconds=strategy.timeout_s),
    }
    if spawned:  # ranks started by mil_experiments.launch: plain env variables, no cluster manager
        from lightning.fabric.plugins.environments import LightningEnvironment

        kwargs["cluster_environment"] = LightningEnvironment()
    return ProcessGroupStrategy(**kwargs)


def process_group_backend(cfg) -> str:
    """`strategy.backend` of a composed config, with auto resolved: nccl for CUDA devices, gloo otherwise."""
    backend = str(cfg.strategy.get("backend", "auto"))
    if backend != "auto":
        return backend
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    on_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "nccl" if on_cuda else "gloo"


def start_method(cfg) -> str:
    """`strategy.start_method` with auto resolved: fork on CPU (the ranks start in a second; the
    parent has run no torch code), spawn for CUDA (a forked process cannot use CUDA safely)."""
    method = str(cfg.strategy.get("start_method", "auto"))
    if method != "auto":
        return method
    return "spawn" if process_group_backend(cfg) == "nccl" else "fork"
