"""Time and memory meters that work the same on any machine.

Peak memory: on CUDA `torch.cuda.max_memory_allocated`; everywhere, the bytes of
activations saved for backward, counted with `torch.autograd.graph.saved_tensors_hooks`
(parameters excluded, each storage counted once, released when autograd frees it), so
that memory can be compared on a CPU-only machine too.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
from torch import nn


class _Released:
    """Holds a saved tensor; tells the meter when autograd lets go of it."""

    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor: torch.Tensor, meter: SavedTensorMeter, key: int | None) -> None:
        self.tensor = tensor
        self.meter = meter
        self.key = key

    def __del__(self) -> None:
        if self.key is not None:
            self.meter._release(self.key)


class SavedTensorMeter:
    """Counts the bytes of activations held for backward; `peak_bytes` is their maximum.

    Use as a context manager around forward + backward. Storages of `exclude` (the
    model's parameters) are not counted; a storage saved by several ops counts once.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self.excluded = {p.untyped_storage().data_ptr() for p in exclude}
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, references]
        self.current_bytes = 0
        self.peak_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> _Released:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.excluded or storage.nbytes() == 0:
            return _Released(tensor, self, None)
        if key in self.live:
            self.live[key][1] += 1
        else:
            self.live[key] = [storage.nbytes(), 1]
            self.current_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        return _Released(tensor, self, key)

    @staticmethod
    def _unpack(held: _Released) -> torch.Tensor:
        return held.tensor

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current_bytes -= entry[0]
            del self.live[key]

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def measure_saved_bytes(model: nn.Module, step) -> int:
    """Peak saved-for-backward bytes of `step()` (a forward + backward of `model`)."""
    with SavedTensorMeter(exclude=model.parameters()) as meter:
        step()
    return meter.peak_bytes


class Stopwatch:
    """Wall-clock seconds, synchronising CUDA first so GPU work is counted."""

    def __init__(self) -> None:
        self.start = self._now()

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def elapsed(self) -> float:
        return self._now() - self.start
