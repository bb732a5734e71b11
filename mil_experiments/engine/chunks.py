"""Splitting a bag into chunks, and encoding a bag chunk by chunk without gradients."""

from __future__ import annotations

import math

import torch
from torch import nn


def chunk_size_for_alpha(alpha: float, bag_size: int) -> int:
    """ceil(alpha% of the bag), at least 1: the instances forwarded at once by ABMIL-ACC-alpha%."""
    return max(1, math.ceil(alpha * bag_size / 100))


def chunk_slices(n: int, chunk_size: int, balanced: bool = False) -> list[slice]:
    """Consecutive slices of at most `chunk_size` covering range(n).

    `balanced`: the same number of chunks, ceil(n / chunk_size), with sizes that differ by
    at most one (13 at 4 -> 4, 3, 3, 3 instead of 4, 4, 4, 1), so that batch norm never
    sees a chunk of a single instance when it can be avoided.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not balanced:
        return [slice(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]
    count = math.ceil(n / chunk_size)
    small, extra = divmod(n, count) if count else (0, 0)
    sizes = [small + 1] * extra + [small] * (count - extra)
    starts = [sum(sizes[:i]) for i in range(count)]
    return [slice(start, start + size) for start, size in zip(starts, sizes, strict=True)]


@torch.no_grad()
def encode_in_chunks(encoder: nn.Module, instances: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    """Encode a bag without keeping activations, `chunk_size` instances at a time.

    Args:
        encoder: maps (n, ...) instances to (n, D) features.
        instances: (N, ...) the bag.
        chunk_size: instances per forward; None or <= 0 encodes the bag at once.

    Returns:
        (N, D) features.
    """
    n = instances.shape[0]
    if not chunk_size or chunk_size <= 0 or chunk_size >= n:
        return encoder(instances)  # (N, D)
    return torch.cat([encoder(instances[s]) for s in chunk_slices(n, chunk_size)])  # (N, D)
