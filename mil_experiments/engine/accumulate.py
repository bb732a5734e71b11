"""`accumulate_gradients`: the exact full-bag gradient with one chunk's activations in memory.

The decomposition (gradient-accumulation paper, Eq. 1): for encoder f_theta, a head
(aggregator and loss, whatever the method makes of them) and features z_i = f_theta(x_i),

    dL/dtheta = sum_i (dL/dz_i)(dz_i/dtheta),

so the encoder gradient is a sum over chunks of a vector-Jacobian product with the
chunk's rows of dL/dZ. The engine runs in three phases:

1. encode every chunk without grad (batch norm running statistics untouched);
2. gather the features (the seam where processes exchange them: `FeatureExchange`), run
   the head once on the full feature matrix Z requiring grad and backpropagate: the
   head's gradients and dL/dZ;
3. scatter dL/dZ back, re-encode each chunk with grad and backpropagate dL/dZ[chunk]
   into it; a chunk whose dL/dZ rows are all exactly zero (masked or unselected
   instances) can be skipped (`skip_zero_grad_chunks`): its contribution is zero.
   `skip_zero_grad_rows` goes further: the rows with a nonzero dL/dZ (MHIM's kept
   instances) are gathered, re-encoded in dense chunks of at most `chunk_size` and their
   rows of dL/dZ backpropagated; with K such rows phase 3 costs ceil(K / c) chunk
   forward-backwards instead of ceil(N / c). Exact when the encoder treats rows
   independently (no batch norm or dropout in training: refused otherwise), since
   dL/dtheta = sum_{i: dL/dz_i != 0} (dL/dz_i)(dz_i/dtheta).

`mode="recompute"` does phase 3 as the paper's published code does: for each chunk, re-
encode it with grad, join it to the detached features of the rest, rerun the head (its
parameters frozen) and backpropagate the loss; the head runs ceil(N / c) + 1 times.

Random draws are replayed: each chunk's second encoding starts from the random state of
its first, and every rerun of the head in recompute mode from the state of its first run,
so dropout masks, random pseudo-bags and random subsets are the same in every pass. When
the engine returns, the random state is the one after the head's first run, as if the bag
had been processed once.

Batch norm: both passes normalise a chunk with the chunk's statistics, so with batch norm
in train mode the result is the exact gradient of the "chunk-BN" network, not of a
full-bag BN forward (as in the paper's code). With batch norm in train mode the chunks are
balanced (13 instances at 4 -> 4, 3, 3, 3), so no chunk holds a single instance.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from mil_experiments.engine.chunks import chunk_slices
from mil_experiments.engine.exchange import FeatureExchange

BackwardFn = Callable[[torch.Tensor], None]

MODES = ("cached", "recompute")


@dataclass
class HeadResult:
    """What the head makes of a bag's features.

    Attributes:
        loss: the scalar that is differentiated.
        terms: named parts of the loss (for logging), summing to `loss`.
        output: whatever else the caller wants back (e.g. the aggregator's output).
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    output: Any = None

    def detach(self) -> HeadResult:
        output = self.output.detach() if hasattr(self.output, "detach") else self.output
        return HeadResult(self.loss.detach(), {k: v.detach() for k, v in self.terms.items()}, output)


Head = Callable[[torch.Tensor], HeadResult]


def accumulate_gradients(
    encoder: nn.Module,
    head: Head,
    instances: torch.Tensor,
    chunk_size: int,
    *,
    mode: str = "cached",
    backward: BackwardFn | None = None,
    keep_last_chunk: bool = False,
    skip_zero_grad_chunks: bool = False,
    skip_zero_grad_rows: bool = False,
    head_parameters: Iterable[torch.Tensor] | None = None,
    exchange: FeatureExchange | None = None,
) -> HeadResult:
    """Fill `.grad` of the encoder and the head as one full-bag forward + backward would.

    Gradients are accumulated into existing `.grad` exactly as `backward()` does, while
    the encoder activations of at most one chunk are held at any time.

    Args:
        encoder: maps (n, ...) instances to (n, D) features.
        head: maps the (N, D) features to a `HeadResult` whose `loss` is differentiated.
        instances: (N, ...) the bag (this process's rows of it, with an `exchange`).
        chunk_size: instances encoded with grad at once; >= N is a plain full-bag step.
        mode: "cached" (default) or "recompute" (the paper's published code).
        backward: how a loss is backpropagated (default `loss.backward()`); Lightning's
            `manual_backward` goes here so that mixed-precision loss scaling applies.
        keep_last_chunk: cached mode only: encode the last chunk once, with grad, keeping
            its graph through the head's backward (one chunk fewer to re-encode, at the
            cost of holding that chunk's activations together with the head's).
        skip_zero_grad_chunks: cached mode only: do not re-encode a chunk whose dL/dZ rows
            are all exactly zero (their gradient contribution is zero; batch norm running
            statistics are then not updated for that chunk).
        skip_zero_grad_rows: cached mode only: re-encode only the rows whose dL/dZ is not
            all zero, gathered into dense chunks of at most `chunk_size` (supersedes
            `skip_zero_grad_chunks`); also for a bag that fits one chunk, so the encoder's
            backward always covers only those rows. The encoder must treat rows
            independently: batch norm or dropout in training is refused (ValueError).
        head_parameters: the head's parameters, frozen while the head reruns in recompute
            mode (required there).
        exchange: where features and their gradients cross processes (tile-parallel);
            None = this process holds the whole bag.

    Returns:
        The head's result, detached.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {MODES}")
    if mode == "recompute" and (skip_zero_grad_chunks or skip_zero_grad_rows or exchange is not None):
        raise ValueError("mode='recompute' reruns the head per chunk: it cannot skip chunks or exchange features")
    if mode == "recompute" and head_parameters is None:
        raise ValueError("mode='recompute' needs head_parameters (frozen while the head reruns)")
    backward = backward or _plain_backward
    device = instances.device
    n = instances.shape[0]
    batch_norm = _batch_norm_in_training(encoder)
    if batch_norm and n == 1:
        raise ValueError("a bag of 1 instance: batch norm in training needs at least 2 per forward (use group norm or none)")
    encoder_trains = any(p.requires_grad for p in encoder.parameters())
    if skip_zero_grad_rows and encoder_trains:
        _check_rows_independent(encoder)
    slices = chunk_slices(n, chunk_size, balanced=batch_norm) if n else []
    if len(slices) == 1 and exchange is None and not (skip_zero_grad_rows and encoder_trains):
        result = head(encoder(instances))  # (N, D) features with their graph
        backward(result.loss)
        return result.detach()

    keep_last = mode == "cached" and keep_last_chunk and len(slices) > 0
    no_grad_slices = slices[:-1] if keep_last else slices
    chunk_rng_states = []
    with torch.no_grad(), _no_running_stat_updates(encoder):
        parts = []
        for piece in no_grad_slices:
            chunk_rng_states.append(_rng_state(device))
            parts.append(encoder(instances[piece]))  # (c, D)

    # An encoder without trainable parameters (pre-extracted features) needs no phase 3.
    if mode == "recompute":
        return _recompute(encoder, head, instances, slices, parts, chunk_rng_states, backward, head_parameters, encoder_trains)

    if keep_last:
        last_features = encoder(instances[slices[-1]])  # (c, D), with grad
        parts.append(last_features.detach())
    local = torch.cat(parts) if parts else _empty_features(encoder, instances)  # (n, D)
    exchange = exchange or FeatureExchange()
    gathered = exchange.gather(local)  # (N, D); None where this process runs no head
    features = gathered.detach().requires_grad_(True) if gathered is not None else None  # (N, D)
    result = exchange.run_head(head, features, backward)  # head grads and dL/dZ
    rng_after_head = _rng_state(device)
    feature_grad = exchange.scatter(_grad_or_zeros(features) if features is not None else None)  # (n, D)
    if keep_last and encoder_trains:
        torch.autograd.backward(last_features, feature_grad[slices[-1]])
    if skip_zero_grad_rows and encoder_trains:
        limit = slices[-1].start if keep_last else n  # the kept last chunk is done
        _backward_nonzero_rows(encoder, instances[:limit], feature_grad[:limit], chunk_size)
        _set_rng_state(rng_after_head, device)
        return result
    for i, piece in enumerate(no_grad_slices if encoder_trains else []):
        rows = feature_grad[piece]  # (c, D)
        if skip_zero_grad_chunks and not bool(rows.any()):
            continue
        _set_rng_state(chunk_rng_states[i], device)
        chunk_features = encoder(instances[piece])  # (c, D)
        torch.autograd.backward(chunk_features, rows)
    _set_rng_state(rng_after_head, device)
    return result


def _recompute(encoder, head, instances, slices, parts, chunk_rng_states, backward, head_parameters, encoder_trains) -> HeadResult:
    """Phase 3 as the paper's code: per chunk, rerun the head with that chunk's graph."""
    device = instances.device
    features = torch.cat(parts)  # (N, D), no grad
    head_rng = _rng_state(device)
    result = head(features)  # features carry no grad: head grads only
    backward(result.loss)
    rng_after_head = _rng_state(device)
    with _frozen_parameters(head_parameters):
        for i, piece in enumerate(slices if encoder_trains else []):
            _set_rng_state(chunk_rng_states[i], device)
            chunk_features = encoder(instances[piece])  # (c, D)
            joined = torch.cat([features[: piece.start], chunk_features, features[piece.stop :]])  # (N, D)
            _set_rng_state(head_rng, device)
            backward(head(joined).loss)  # encoder grads only
    _set_rng_state(rng_after_head, device)
    return result.detach()


def nonzero_rows(feature_grad: torch.Tensor) -> torch.Tensor:
    """(K,) ascending indices of the rows of dL/dZ (N, D) that are not all exactly zero."""
    return feature_grad.ne(0).any(dim=1).nonzero().squeeze(1)  # (K,)


def _backward_nonzero_rows(encoder: nn.Module, instances: torch.Tensor, feature_grad: torch.Tensor, chunk_size: int) -> None:
    """Phase 3 on the gathered rows with a nonzero dL/dZ: dense chunks of at most `chunk_size`."""
    rows = nonzero_rows(feature_grad)  # (K,)
    for piece in chunk_slices(rows.numel(), chunk_size):
        index = rows[piece]  # (c,)
        chunk_features = encoder(instances[index])  # (c, D)
        torch.autograd.backward(chunk_features, feature_grad[index])


def _check_rows_independent(encoder: nn.Module) -> None:
    """Refuse an encoder whose output rows depend on the chunk they are encoded in (training mode)."""
    for module in encoder.modules():
        if isinstance(module, _BatchNorm) and module.training:
            raise ValueError("skip_zero_grad_rows re-encodes the kept rows in new chunks: batch norm in training would"
                             " normalise them with other statistics (use encoder.norm=group|none)")
        if isinstance(module, _DropoutNd) and module.training and module.p > 0:
            raise ValueError("skip_zero_grad_rows re-encodes the kept rows in new chunks: dropout in the encoder"
                             " cannot be replayed row by row (set its p to 0 or use skip_zero_grad_chunks)")


def _batch_norm_in_training(module: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) and m.training for m in module.modules())


def _plain_backward(loss: torch.Tensor) -> None:
    loss.backward()


def _grad_or_zeros(features: torch.Tensor) -> torch.Tensor:
    """dL/dZ; zeros when the loss did not depend on the features at all."""
    return features.grad if features.grad is not None else torch.zeros_like(features)


@torch.no_grad()
def _empty_features(encoder: nn.Module, instances: torch.Tensor) -> torch.Tensor:
    """(0, D) features for a process that holds no instance of the bag."""
    return encoder(instances[:0])  # (0, D)


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda_state


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@contextmanager
def _no_running_stat_updates(module: nn.Module) -> Iterator[None]:
    """Batch norm layers keep their running statistics untouched inside the block.

    In train mode they still normalise with the batch's statistics; in eval mode they
    still use the running ones (see `torch.nn.modules.batchnorm._BatchNorm.forward`).
    """
    switched = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in switched:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True


@contextmanager
def _frozen_parameters(parameters: Iterable[torch.Tensor]) -> Iterator[None]:
    frozen = [p for p in parameters if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
