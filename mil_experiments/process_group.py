"""`ProcessGroupStrategy`: Lightning's DDP process handling without the DDP model wrapper.

Lightning's `DDPStrategy` gives each rank its device, the process group (gloo or NCCL),
the cluster environment (torchrun, SLURM, or the ranks `mil_experiments.launch` starts)
and rank-0-only checkpoint writing. Its DistributedDataParallel wrapper all-reduces
gradients inside every backward call, which is wrong for an engine that backpropagates
one bag in several pieces (chunks, shards of tiles) and for tile-parallel training, whose
encoder gradients are summed, not averaged. Here the model stays unwrapped; its weights
are made identical on every rank (broadcast from rank 0) and the engine exchanges the
gradients once per optimizer step (`GradientEngine.synchronize`).

Ranks are never started by Lightning here: its subprocess launcher reruns the command
line, which with Hydra makes an output folder per rank and breaks multiruns.
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import torch
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy

# Every rank logs metrics computed over all bags (the same numbers on every rank): nothing to reduce.
warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")


class ProcessGroupStrategy(DDPStrategy):
    """DDP's process group, devices and rank-0 writes; gradients left to the engine."""

    strategy_name = "mil_process_group"

    def _configure_launcher(self) -> None:
        world = self.num_processes * self.num_nodes
        if world > 1 and not self.cluster_environment.creates_processes_externally:
            raise RuntimeError(
                "ProcessGroupStrategy runs in ranks that are already started (mil_experiments.launch, torchrun or"
                " SLURM); call mil_experiments.run.train_and_test, which starts them"
            )
        self._launcher = None

    def setup_distributed(self) -> None:
        """Lightning re-seeds every rank here; keep the random state the run was built with."""
        states = torch.get_rng_state(), np.random.get_state(), random.getstate()
        super().setup_distributed()
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])

    def configure_ddp(self) -> None:
        """No wrapper: every rank starts from rank 0's weights and buffers."""
        _sync_module_states(self.model)
