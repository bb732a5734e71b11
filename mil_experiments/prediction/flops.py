"""FLOPs of what runs inside a `with meter.count():` block, summed over blocks.

Counted by `torch.utils.flop_counter.FlopCounterMode`, torch's maintained counter: 2·M·N·K
for each matrix product (mm, addmm, bmm, matmul) and 2·(output elements)·(C_in/groups·k_h·k_w)
for each convolution, attention kernels likewise; element-wise work (activations, softmax,
pooling, normalisation) and bias additions are not counted, as in the papers' FLOP tables.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch.utils.flop_counter import FlopCounterMode


class FlopMeter:
    """Sums the FLOPs of every `count()` block (or counts nothing when disabled)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.total = 0

    @contextmanager
    def count(self) -> Iterator[None]:
        """Count the FLOPs of the block into `total`."""
        if not self.enabled:
            yield
            return
        mode = FlopCounterMode(display=False)
        with mode:
            yield
        self.total += int(mode.get_total_flops())
