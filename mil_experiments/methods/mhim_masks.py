"""MHIM-MIL's masks (v1 `MHIM.get_mask` + `select_mask_fn`): which instances the student does not see.

Three masks, applied in this order on the teacher's attention a (N,) or, for multi-head
attention, (H, N), and combined as a union (so overlaps shrink the masked count):

1. random, ratio r: `select(a, largest=False, ratio=r, random_ratio=0.001)`; since
   r / 0.001 > 1 the selection swaps to ratio 1, random_ratio r: all N candidates, of
   which a uniform random ceil(N r) are masked;
2. low attention, ratio r_l: the ceil(N r_l) lowest-attention instances;
3. high attention, ratio r_h with "randomly HAM" share rho: the top ceil(N r_h / rho)
   by attention, of which a uniform random ceil(k rho) are masked.

`select` is v1's rule: ratio' = ratio / random_ratio; if ratio' > 1 then random_ratio :=
ratio and ratio' := 1; the candidates are the top-k (k = ceil(N ratio')) by attention,
then a random ceil(k random_ratio) of them when random_ratio < 1. Multi-head attention
is fused by `vote` (each head votes 1 for its own top-k, the top-k of the vote counts is
taken; ties as `torch.topk` breaks them) or `mean` (the union of every head's top
k // H, v1's name for it).

The kept instances are returned in v1's order by default (`kept_order="v1"`): v1 builds them
as `list(set(range(N)).difference(set(masked)))`, and the student sees them in that order.
CPython iterates that set in ascending order only while fewer than N/4 instances are masked
(the set is copied and the masked ids discarded) or while every kept id is below the new
set's table size; otherwise the high ids come interleaved with the low ones (N = 600 with
half of it masked, or N = 300 with 76% masked). Aggregators that are permutation invariant
see the same bag either way (up to float rounding); TransMIL's PPEG neighbourhoods and
Nyström landmark groups do not. `kept_order="ascending"` keeps them in bag order (named
deviation; what this repository did before). The masked ids are returned ascending.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FUSIONS = ("vote", "mean")
KEPT_ORDERS = ("v1", "ascending")


@dataclass
class MaskRatios:
    """The mask ratios of one iteration (r_h already scheduled)."""

    random: float = 0.0  # beta_r (v1 mask_ratio)
    low: float = 0.0  # beta_l (v1 mask_ratio_l)
    high: float = 0.0  # beta_h (v1 mask_ratio_h)
    high_random: float = 1.0  # rho (v1 mask_ratio_hr)


def _top_k(attention: torch.Tensor, k: int, largest: bool, fusion: str) -> torch.Tensor:
    """Indices of the top-k instances by (fused) attention: (k,) or, with `mean`, the union of per-head picks."""
    if attention.dim() == 1:
        return torch.topk(attention, k, largest=largest).indices  # (k,)
    heads, n = attention.shape
    if fusion == "mean":
        per_head = k // heads
        return torch.unique(torch.topk(attention, per_head, dim=1, largest=largest).indices.flatten())  # (<= k,)
    picks = torch.topk(attention, k, dim=1, largest=largest).indices  # (H, k)
    votes = torch.zeros(heads, n, device=attention.device).scatter_(1, picks, 1.0).sum(0)  # (N,)
    return torch.topk(votes, k).indices  # (k,)


def select(attention: torch.Tensor, largest: bool, ratio: float, random_ratio: float = 1.0,
           fusion: str = "vote", generator: torch.Generator | None = None) -> torch.Tensor:
    """v1's `select_mask_fn` without the bookkeeping: the ids one mask picks.

    Args:
        attention: (N,) or (H, N) teacher attention.
        largest: pick the highest (True) or lowest (False) attention.
        ratio: share of the bag picked by attention, before the random subsample.
        random_ratio: share of those picks kept, uniformly at random (1 = all).
        fusion: multi-head fusion, `vote` or `mean`.
        generator: random source of the subsample (default: torch's global one).

    Returns:
        (M,) long, the picked instance ids (unordered).
    """
    n = attention.shape[-1]
    scaled = ratio / random_ratio
    if scaled > 1:
        random_ratio, scaled = ratio, 1.0
    k = min(math.ceil(n * scaled), n)
    picked = _top_k(attention, k, largest, fusion)  # (k,)
    if random_ratio < 1.0:
        order = torch.randperm(picked.shape[0], generator=generator, device="cpu").to(picked.device)  # (k,)
        picked = picked[order[: math.ceil(picked.shape[0] * random_ratio)]]
    return picked


def v1_kept_order(n: int, masked: torch.Tensor) -> torch.Tensor:
    """The ids of range(n) not in `masked`, in the order v1's `set(range(n)).difference(set(masked))` iterates them."""
    kept = list(set(range(n)).difference(set(masked.tolist())))
    return torch.tensor(kept, dtype=torch.long, device=masked.device)  # (K,)


def mhim_masks(attention: torch.Tensor, ratios: MaskRatios, fusion: str = "vote",
               generator: torch.Generator | None = None, kept_order: str = "v1") -> tuple[torch.Tensor, torch.Tensor]:
    """The union of the random, low- and high-attention masks, in v1's order.

    Args:
        attention: (N,) or (H, N) teacher attention over the bag's instances.
        ratios: beta_r, beta_l, beta_h (this iteration's) and rho.
        fusion: multi-head fusion (`vote` | `mean`).
        generator: random source (default: torch's global one).
        kept_order: `v1` (v1's set-difference order, see the module docstring) or `ascending`.

    Returns:
        kept (K,) instance ids in `kept_order`, and masked (N - K,) instance ids, ascending.
    """
    n = attention.shape[-1]
    parts = []
    if ratios.random > 0:
        parts.append(select(attention, False, ratios.random, random_ratio=0.001, fusion=fusion, generator=generator))
    if ratios.low > 0:
        parts.append(select(attention, False, ratios.low, fusion=fusion, generator=generator))
    if ratios.high > 0:
        parts.append(select(attention, True, ratios.high, random_ratio=ratios.high_random, fusion=fusion, generator=generator))
    is_masked = torch.zeros(n, dtype=torch.bool, device=attention.device)  # (N,)
    for picked in parts:
        is_masked[picked] = True
    ids = torch.arange(n, device=attention.device)  # (N,)
    masked = ids[is_masked]  # (N - K,)
    if kept_order == "v1":
        return v1_kept_order(n, masked), masked
    return ids[~is_masked], masked
