"""The `engine` config axis: how the gradients of one bag are produced.

- `engine=full` (`FullBagEngine`): one forward of the whole bag with its graph, one
  backward; every instance's activations are held at once.
- `engine=acc` (`AccumulationEngine`): the bag is encoded ceil(alpha% of N) instances
  at a time with the exact full-bag gradient (`accumulate_gradients`); alpha = 100 is
  the full-bag step.

A method hands an engine its encoder and a head (features -> loss); the engine never
knows which method, aggregator or loss it serves.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mil_experiments.engine.accumulate import MODES, BackwardFn, Head, HeadResult, accumulate_gradients
from mil_experiments.engine.chunks import chunk_size_for_alpha, encode_in_chunks


class GradientEngine:
    """Base of the engines: `backward_bag` fills the gradients of one bag."""

    name = "engine"

    @dataclass
    class Config:
        pass

    def __init__(self) -> None:
        self.last_chunk_size: int | None = None

    def chunk_size(self, n_instances: int) -> int:
        """Instances encoded with grad at once for a bag of `n_instances`."""
        return max(n_instances, 1)

    def backward_bag(
        self,
        encoder: nn.Module,
        head: Head,
        instances: torch.Tensor,
        *,
        backward: BackwardFn | None = None,
        head_parameters: Iterable[torch.Tensor] | None = None,
    ) -> HeadResult:
        """Accumulate the gradients of the head's loss on this bag; return its result, detached."""
        chunk = self.chunk_size(instances.shape[0])
        self.last_chunk_size = chunk
        return accumulate_gradients(encoder, head, instances, chunk, backward=backward, head_parameters=head_parameters)

    def encode_for_evaluation(self, encoder: nn.Module, instances: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
        """(N, ...) instances -> (N, D) features without gradients, `chunk_size` at a time (tile-parallel: sharded)."""
        return encode_in_chunks(encoder, instances, chunk_size)  # (N, D)

    # Multi-process engines (`engine/distributed.py`) override the three below.
    splits_bags = False  # True: each rank trains on its own bags (the epoch's metrics gather all ranks')

    def sync_random_state(self, device: torch.device) -> None:
        """Before a bag: make the random state agree across the ranks that share the bag (no-op here)."""

    def synchronize(self, encoder_parameters: Iterable[torch.Tensor], head_parameters: Iterable[torch.Tensor]) -> None:
        """Before an optimizer step: exchange the gradients across ranks (no-op on one device)."""

    def settings(self) -> dict:
        """What results.json records about the engine."""
        return {"name": self.name, **asdict(self.config)} if hasattr(self, "config") else {"name": self.name}


class FullBagEngine(GradientEngine):
    """`engine=full`: the plain full-bag forward and backward."""

    name = "full"

    def __init__(self) -> None:
        super().__init__()
        self.config = self.Config()


class AccumulationEngine(GradientEngine):
    """`engine=acc`: chunks of ceil(alpha% of the bag) with the exact full-bag gradient.

    Args:
        alpha: percent of a bag's instances encoded with grad at once, in (0, 100].
        acc_mode: "cached" (dL/dZ cached, the head runs once) or "recompute" (the
            paper's published code: the head reruns per chunk).
        acc_keep_last_chunk: cached only: encode the last chunk once, keeping its graph
            (a little faster, a little more memory).
        skip_zero_grad_chunks: cached only: skip re-encoding chunks whose feature gradient
            is exactly zero (masked or unselected instances).
        skip_zero_grad_rows: cached only: re-encode only the rows whose feature gradient
            is not zero (MHIM's kept instances), gathered into dense chunks; the cost of
            the gradient pass falls with the masked share. Needs an encoder without batch
            norm or dropout in training.
    """

    name = "acc"

    @dataclass
    class Config:
        alpha: float = 25.0
        acc_mode: str = "cached"
        acc_keep_last_chunk: bool = False
        skip_zero_grad_chunks: bool = False
        skip_zero_grad_rows: bool = False

    def __init__(self, alpha: float = 25.0, acc_mode: str = "cached", acc_keep_last_chunk: bool = False,
                 skip_zero_grad_chunks: bool = False, skip_zero_grad_rows: bool = False) -> None:
        super().__init__()
        if not 0 < alpha <= 100:
            raise ValueError(f"engine.alpha={alpha:g}: must be in (0, 100] (percent of a bag's instances forwarded at once)")
        if acc_mode not in MODES:
            raise ValueError(f"engine.acc_mode={acc_mode!r}: choose one of {MODES}")
        if acc_mode == "recompute" and (acc_keep_last_chunk or skip_zero_grad_chunks or skip_zero_grad_rows):
            raise ValueError("engine.acc_mode=recompute: acc_keep_last_chunk, skip_zero_grad_chunks and skip_zero_grad_rows"
                             " need acc_mode=cached")
        self.config = self.Config(alpha, acc_mode, acc_keep_last_chunk, skip_zero_grad_chunks, skip_zero_grad_rows)

    def chunk_size(self, n_instances: int) -> int:
        return chunk_size_for_alpha(self.config.alpha, n_instances)

    def backward_bag(self, encoder, head, instances, *, backward=None, head_parameters=None) -> HeadResult:
        c = self.config
        chunk = self.chunk_size(instances.shape[0])
        self.last_chunk_size = chunk
        return accumulate_gradients(
            encoder,
            head,
            instances,
            chunk,
            mode=c.acc_mode,
            backward=backward,
            keep_last_chunk=c.acc_keep_last_chunk,
            skip_zero_grad_chunks=c.skip_zero_grad_chunks,
            skip_zero_grad_rows=c.skip_zero_grad_rows,
            head_parameters=head_parameters,
        )


ENGINES = {"full": FullBagEngine, "acc": AccumulationEngine}
