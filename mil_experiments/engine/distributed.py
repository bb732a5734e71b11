"""Multi-process gradients: tile-parallel slides and data-parallel bags.

Tile parallelism (the all-in-memory multi-GPU paper) is `accumulate_gradients` with its
`FeatureExchange` across processes. For a bag of N instances on R ranks:

1. each encoder rank r takes its shard S_r of the rows (`shard_indices`: strided,
   i mod R as the paper's sampler, or contiguous; uneven shards and empty shards are
   allowed) and encodes it (without grad, in chunks of alpha% of the shard);
2. the features are gathered with their sizes (variable-length all_gather or gather) and
   put back in the bag's own order, Z = (z_1, ..., z_N); the head (aggregator and loss)
   runs once on Z: on every rank (`replicated`, from rank 0's random state, so that
   random draws of the head agree) or on rank 0 only (`dedicated`, the paper's layout:
   rank 0 runs the aggregator, ranks 1..R-1 encode, dL/dZ is scattered);
3. each rank backpropagates dL/dZ[S_r] into its encoder copy, so that its gradient is
   g_r = sum_{i in S_r} (dL/dz_i)(dz_i/dtheta), and the encoder gradients are SUMMED:
   sum_r g_r = dL/dtheta, the single-device gradient. (The paper's code uses DDP, which
   averages, and multiplies its pseudo-loss by R to undo it; summing is the same number.)
   The head's gradient is already whole on the head rank(s): identical on every rank
   when replicated, broadcast from rank 0 when dedicated.

Data parallelism over bags (`strategy=ddp`): every rank trains on its own bags and the
gradients of all parameters are averaged over the ranks before each optimizer step
(what DDP does), so R ranks with one bag each equal one device with `bags_per_step=R`.

Exact up to float summation order, provided the encoder has no random layers and no
batch norm in train mode (dropout masks and shard batch statistics differ from a single
device's, as chunk statistics do in `accumulate_gradients`). Never imports Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from mil_experiments.engine.accumulate import BackwardFn, Head, HeadResult, accumulate_gradients
from mil_experiments.engine.engines import AccumulationEngine, GradientEngine
from mil_experiments.engine.exchange import FeatureExchange

SHARDS = ("strided", "contiguous")
LAYOUTS = ("replicated", "dedicated")


def shard_indices(n: int, part: int, parts: int, shard: str = "strided") -> torch.Tensor:
    """Rows of a bag of `n` held by encoder rank `part` of `parts`.

    strided: part, part + parts, ... (the paper's sampler); contiguous: consecutive blocks
    whose sizes differ by at most one (13 on 4 -> 4, 3, 3, 3). A shard may be empty.
    """
    if shard not in SHARDS:
        raise ValueError(f"shard={shard!r}: choose one of {SHARDS}")
    if shard == "strided":
        return torch.arange(n)[part::parts]  # (ceil((n - part) / parts),), empty when part >= n
    small, extra = divmod(n, parts)
    start = part * small + min(part, extra)
    return torch.arange(start, start + small + (1 if part < extra else 0))  # (n_r,)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """(n, D) -> (rows, D) with zero rows appended (collectives need equal shapes)."""
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])]) if rows > x.shape[0] else x  # (rows, D)


class TileExchange(FeatureExchange):
    """The features of one bag split across the ranks of `group` (see the module docstring).

    Args:
        n: the bag's instance count (the same on every rank).
        layout: "replicated" (every rank encodes and runs the head) or "dedicated" (rank 0
            runs the head only, ranks 1..R-1 encode; needs R >= 2).
        shard: "strided" or "contiguous".
        group: the process group (None: the default group).
    """

    def __init__(self, n: int, layout: str = "replicated", shard: str = "strided", group=None) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r}: choose one of {LAYOUTS}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.layout = layout
        if layout == "dedicated" and self.world < 2:
            raise ValueError("strategy.aggregator=dedicated needs at least 2 processes (rank 0 runs the aggregator only)")
        self.first_encoder = 1 if layout == "dedicated" else 0
        encoders = self.world - self.first_encoder
        self.n = n
        self.shards = [torch.arange(0)] * self.first_encoder + [shard_indices(n, p, encoders, shard) for p in range(encoders)]
        self.local_indices = self.shards[self.rank]  # (n_r,)
        self.runs_head = layout == "replicated" or self.rank == 0

    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def _sizes(self, local: torch.Tensor) -> list[int]:
        """Every rank's row count, exchanged (and checked against the shards)."""
        count = torch.tensor([local.shape[0]], device=local.device)
        counts = [torch.zeros_like(count) for _ in range(self.world)]
        dist.all_gather(counts, count, group=self.group)
        sizes = [int(c) for c in counts]
        if sizes != [len(s) for s in self.shards]:
            raise RuntimeError(f"tile-parallel ranks hold {sizes} rows of a bag of {self.n}; expected {[len(s) for s in self.shards]}")
        return sizes

    def _assemble(self, parts: list[torch.Tensor], sizes: list[int], like: torch.Tensor) -> torch.Tensor:
        features = like.new_empty(self.n, *like.shape[1:])  # (N, D)
        for rank, part in enumerate(parts):
            features[self.shards[rank]] = part[: sizes[rank]]
        return features

    def gather(self, local_features: torch.Tensor) -> torch.Tensor | None:
        """(n_r, D) rows of this rank -> the bag's (N, D) features in its own order (None off the head rank)."""
        local = local_features.detach().contiguous()  # (n_r, D)
        self._local = local
        sizes = self._sizes(local)
        padded = _pad_rows(local, max(sizes))  # (max n_r, D)
        if self.layout == "replicated":
            parts = [torch.empty_like(padded) for _ in range(self.world)]
            dist.all_gather(parts, padded, group=self.group)
            return self._assemble(parts, sizes, local)
        parts = [torch.empty_like(padded) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(padded, parts, dst=self._global(0), group=self.group)
        return self._assemble(parts, sizes, local) if self.rank == 0 else None

    def run_head(self, head: Head, features: torch.Tensor | None, backward: BackwardFn) -> HeadResult:
        """The head once per bag: from rank 0's random state on every rank, or on rank 0 only.

        Every rank returns the head's result (dedicated: broadcast from rank 0), so each
        rank can log the loss and the prediction.
        """
        if self.layout == "replicated":
            _broadcast_rng_state(self._global(0), self.group, features.device)
            return super().run_head(head, features, backward)
        box = [super().run_head(head, features, backward) if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=self._global(0), group=self.group)
        return box[0]

    def scatter(self, feature_grad: torch.Tensor | None) -> torch.Tensor:
        """The bag's (N, D) dL/dZ -> this rank's (n_r, D) rows (dedicated: sent from rank 0)."""
        if self.layout == "replicated":
            return feature_grad[self.local_indices]  # (n_r, D)
        rows = max(len(s) for s in self.shards)
        like = self._local  # (n_r, D): the shape, dtype and device of this rank's rows
        if self.rank == 0:
            pieces = [_pad_rows(feature_grad[s], rows).contiguous() for s in self.shards]  # R x (rows, D)
            mine = torch.empty_like(pieces[0])
        else:
            pieces = None
            mine = like.new_empty(rows, *like.shape[1:])  # (rows, D)
        dist.scatter(mine, pieces, src=self._global(0), group=self.group)
        return mine[: len(self.local_indices)]  # (n_r, D)


def _broadcast_rng_state(src: int, group, device: torch.device) -> None:
    """Set every rank's random state (CPU, and this CUDA device) to rank `src`'s."""
    state = torch.get_rng_state()
    if device.type != "cpu":  # NCCL moves CUDA tensors only
        state = state.to(device)
    dist.broadcast(state, src=src, group=group)
    torch.set_rng_state(state.cpu())
    if device.type == "cuda":
        cuda_state = torch.cuda.get_rng_state(device).to(device)
        dist.broadcast(cuda_state, src=src, group=group)
        torch.cuda.set_rng_state(cuda_state.cpu(), device)


def same_random_state_on_every_rank(device: torch.device) -> None:
    """Every process takes rank 0's random state (no-op without a process group of 2 or more).

    Before evaluation, which every rank runs on every bag: random inference samples, and so
    the metrics that drive model selection, schedulers and early stopping, agree.
    """
    if world_size() > 1:
        _broadcast_rng_state(0, None, device)


def _materialise(parameters: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Parameters with a gradient on some rank, with zeros where this rank has none.

    A parameter no rank has a gradient for stays without one (the optimizer skips it, as
    on one device).
    """
    if not parameters:
        return []
    device = parameters[0].device
    flags = torch.tensor([p.grad is not None for p in parameters], dtype=torch.int32, device=device)  # (P,)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    used = [p for p, flag in zip(parameters, flags.tolist(), strict=True) if flag]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return used


def sum_gradients(parameters: Iterable[torch.Tensor], group=None, average: bool = False) -> None:
    """.grad <- sum over ranks of .grad (or the mean, with `average`), one flat all_reduce."""
    used = _materialise(list(parameters), group)
    if not used:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in used])  # (P,)
    dist.all_reduce(flat, group=group)
    if average:
        flat /= dist.get_world_size(group)
    offset = 0
    for p in used:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def broadcast_gradients(parameters: Iterable[torch.Tensor], src: int = 0, group=None) -> None:
    """.grad <- rank `src`'s .grad on every rank."""
    used = _materialise(list(parameters), group)
    if not used:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in used])  # (P,)
    dist.broadcast(flat, src=src, group=group)
    offset = 0
    for p in used:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()


class TileParallelEngine(GradientEngine):
    """`strategy=tile_parallel`: one bag on all ranks, its instances split across them.

    Args:
        inner: the configured engine: `full` (each rank encodes its shard at once, with
            its graph, as the paper) or `acc` (chunks of alpha% of the shard, cached mode).
        shard: "strided" (i mod R, the paper's sampler) or "contiguous".
        layout: "replicated" or "dedicated" (see `TileExchange`).
        group: the process group (None: the default group).
        shard_evaluation: evaluation bags split across the ranks too (every rank encodes its
            shard without gradients and all ranks get the gathered features); False: every
            rank encodes the whole bag.
    """

    name = "tile_parallel"

    def __init__(self, inner: GradientEngine, shard: str = "strided", layout: str = "replicated", group=None,
                 shard_evaluation: bool = True) -> None:
        super().__init__()
        if shard not in SHARDS:
            raise ValueError(f"strategy.shard={shard!r}: choose one of {SHARDS}")
        if layout not in LAYOUTS:
            raise ValueError(f"strategy.aggregator={layout!r}: choose one of {LAYOUTS}")
        if isinstance(inner, AccumulationEngine) and inner.config.acc_mode == "recompute":
            raise ValueError("strategy=tile_parallel runs the head once per bag: use engine.acc_mode=cached")
        self.inner = inner
        self.shard = shard
        self.layout = layout
        self.group = group
        self.shard_evaluation = shard_evaluation

    def chunk_size(self, n_instances: int) -> int:
        return self.inner.chunk_size(n_instances)

    def backward_bag(
        self,
        encoder: torch.nn.Module,
        head: Head,
        instances: torch.Tensor,
        *,
        backward: BackwardFn | None = None,
        head_parameters: Iterable[torch.Tensor] | None = None,
    ) -> HeadResult:
        """This rank's share of one bag's gradients (call `synchronize` before stepping).

        `instances` is the whole bag (the same on every rank); this rank encodes its rows.
        """
        exchange = TileExchange(instances.shape[0], self.layout, self.shard, self.group)
        local = instances[exchange.local_indices.to(instances.device)]  # (n_r, ...)
        chunk = self.chunk_size(local.shape[0])
        self.last_chunk_size = chunk
        acc = self.inner.config if isinstance(self.inner, AccumulationEngine) else None
        return accumulate_gradients(
            encoder,
            head,
            local,
            chunk,
            backward=backward,
            # full: encode the shard once with its graph (the paper); acc: as configured
            keep_last_chunk=acc.acc_keep_last_chunk if acc else True,
            skip_zero_grad_chunks=acc.skip_zero_grad_chunks if acc else False,
            skip_zero_grad_rows=acc.skip_zero_grad_rows if acc else False,
            exchange=exchange,
        )

    def encode_for_evaluation(self, encoder: torch.nn.Module, instances: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
        """(N, ...) the whole bag (the same on every rank) -> its (N, D) features on every rank.

        Each rank encodes its shard (strided or contiguous, over all R ranks whatever the
        training layout) without gradients, `chunk_size` rows at a time, and the rows are
        all-gathered into the bag's order: evaluation runs R times fewer encoder rows per
        rank. A bag with fewer instances than ranks is encoded whole on every rank, and so
        is every bag without a process group (a tile-parallel run's model loaded by
        `mil_experiments.predict` in one process, say).
        """
        world = dist.get_world_size(self.group) if dist.is_available() and dist.is_initialized() else 1
        if not self.shard_evaluation or world < 2 or instances.shape[0] < world:
            return super().encode_for_evaluation(encoder, instances, chunk_size)  # (N, D)
        exchange = TileExchange(instances.shape[0], "replicated", self.shard, self.group)
        local = instances[exchange.local_indices.to(instances.device)]  # (n_r, ...)
        return exchange.gather(super().encode_for_evaluation(encoder, local, chunk_size))  # (N, D)

    def sync_random_state(self, device: torch.device) -> None:
        """Every rank takes rank 0's random state, so that a method's draws on the bag (a
        within-bag sample, say) agree; the dedicated layout's head leaves the states apart."""
        _broadcast_rng_state(dist.get_global_rank(self.group, 0) if self.group else 0, self.group, device)

    def synchronize(self, encoder_parameters: Iterable[torch.Tensor], head_parameters: Iterable[torch.Tensor]) -> None:
        """Encoder gradients summed over ranks; the head's made whole on every rank."""
        sum_gradients(encoder_parameters, self.group)
        if self.layout == "dedicated":
            broadcast_gradients(head_parameters, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)

    def settings(self) -> dict:
        return {**self.inner.settings(), "strategy": self.name, "shard": self.shard, "aggregator_layout": self.layout,
                "shard_evaluation": self.shard_evaluation}


class DataParallelEngine(GradientEngine):
    """`strategy=ddp`: each rank its own bags; every gradient averaged over ranks before a step."""

    name = "ddp"
    splits_bags = True

    def __init__(self, inner: GradientEngine, group=None) -> None:
        super().__init__()
        self.inner = inner
        self.group = group

    def chunk_size(self, n_instances: int) -> int:
        return self.inner.chunk_size(n_instances)

    def backward_bag(self, encoder, head, instances, *, backward=None, head_parameters=None) -> HeadResult:
        result = self.inner.backward_bag(encoder, head, instances, backward=backward, head_parameters=head_parameters)
        self.last_chunk_size = self.inner.last_chunk_size
        return result

    def synchronize(self, encoder_parameters: Iterable[torch.Tensor], head_parameters: Iterable[torch.Tensor]) -> None:
        sum_gradients([*encoder_parameters, *head_parameters], self.group, average=True)

    def settings(self) -> dict:
        return {**self.inner.settings(), "strategy": self.name}


def world_size(group=None) -> int:
    """Processes in `group` (1 without an initialised process group)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1

