"""`accumulate_gradients`: the exact full-bag gradient with one chunk's activations in memory.

The decomposition (gradient-accumulation paper, Eq. 1): for encoder f_theta, aggregator
g_phi and features z_i = f_theta(x_i),

    dL/dtheta = sum_i (dL/dz_i)(dz_i/dtheta),

so the encoder gradient is a sum over chunks of a vector-Jacobian product with the
chunk's rows of dL/dZ. Two ways to get those rows:

- `cached`: run g_phi and the loss once on the full feature matrix Z (requiring grad),
  backpropagate to get dL/dphi and dL/dZ, then re-encode each chunk with grad and
  backpropagate dL/dZ[chunk] into it. The aggregator runs once per bag (with
  `keep_last_chunk`, the last chunk is encoded with grad in the first pass already).
- `recompute`: what the paper's published code does: after the aggregator's own
  backward on detached features, for each chunk re-encode it with grad, join it to the
  detached features of the rest, rerun the aggregator (its parameters frozen) and
  backpropagate the loss. The aggregator runs ceil(N / c) + 1 times per bag.

Batch norm: the pass without grad does not update running statistics (as in the paper's
code, `track_running_stats` is switched off for it); both passes normalise a chunk with
the chunk's statistics, so with batch norm in train mode the result is the exact gradient
of the "chunk-BN" network, not of a full-bag BN forward. Dropout: the random state of
each chunk's first pass is replayed in its second pass, so both draw the same masks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mil_experiments.engine.chunks import chunk_slices

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BackwardFn = Callable[[torch.Tensor], None]

MODES = ("cached", "recompute")


def accumulate_gradients(
    encoder: nn.Module,
    aggregator: nn.Module,
    loss_fn: LossFn,
    instances: torch.Tensor,
    target: torch.Tensor,
    chunk_size: int,
    mode: str = "cached",
    backward: BackwardFn | None = None,
    keep_last_chunk: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | tuple]:
    """Fill `.grad` of encoder and aggregator as one full-bag forward + backward would.

    Gradients are accumulated into existing `.grad` exactly as `backward()` does, while
    the encoder activations of at most one chunk are held at any time.

    Args:
        encoder: maps (n, ...) instances to (n, D) features.
        aggregator: maps (N, D) features to the logits, or to a tuple whose first element
            is the logits (the rest, such as attention, is passed through).
        loss_fn: `loss_fn(logits, target)` -> scalar loss.
        instances: (N, ...) the bag.
        target: the bag's target, passed to `loss_fn` unchanged.
        chunk_size: instances encoded with grad at once; >= N is a plain full-bag step.
        mode: "cached" (default) or "recompute" (the paper's published code).
        backward: how a loss is backpropagated (default `loss.backward()`); Lightning's
            `manual_backward` goes here so that mixed-precision loss scaling applies.
        keep_last_chunk: cached mode only: encode the last chunk once, with grad, keeping
            its graph through the aggregator's backward (one chunk fewer to re-encode,
            about 0.1x of a full-bag step faster, at the cost of holding that chunk's
            activations together with the aggregator's).

    Returns:
        The loss (detached) and the aggregator's output (detached).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {MODES}")
    backward = backward or _plain_backward
    n = instances.shape[0]
    slices = chunk_slices(n, chunk_size)
    if len(slices) == 1:
        output = aggregator(encoder(instances))
        loss = loss_fn(_logits(output), target)
        backward(loss)
        return loss.detach(), _detached(output)

    replay_encoder_rng = _has_active_dropout(encoder)
    # keep_last_chunk: the last chunk is encoded with grad right away and its graph kept, so
    # it is encoded once, not twice; its activations and the aggregator's are then held
    # together, which raises the peak a little above one chunk's.
    keep_last = mode == "cached" and keep_last_chunk
    no_grad_slices = slices[:-1] if keep_last else slices
    chunk_rng_states = []
    with torch.no_grad(), _no_running_stat_updates(encoder):
        parts = []
        for piece in no_grad_slices:
            if replay_encoder_rng:
                chunk_rng_states.append(_rng_state(instances.device))
            parts.append(encoder(instances[piece]))  # (c, D)

    if mode == "cached":
        if keep_last:
            last_features = encoder(instances[slices[-1]])  # (c, D), with grad
            parts.append(last_features.detach())
        rng_after_first_pass = _rng_state(instances.device) if replay_encoder_rng else None
        features = torch.cat(parts).requires_grad_(True)  # (N, D)
        output = aggregator(features)
        loss = loss_fn(_logits(output), target)
        backward(loss)  # aggregator grads and dL/dZ
        feature_grad = features.grad  # (N, D)
        if keep_last:
            torch.autograd.backward(last_features, feature_grad[slices[-1]])
        for i, piece in enumerate(no_grad_slices):
            if replay_encoder_rng:
                _set_rng_state(chunk_rng_states[i], instances.device)
            chunk_features = encoder(instances[piece])  # (c, D)
            torch.autograd.backward(chunk_features, feature_grad[piece])
    else:
        features = torch.cat(parts)  # (N, D), no grad
        rng_after_first_pass = _rng_state(instances.device) if replay_encoder_rng else None
        replay_aggregator_rng = _has_active_dropout(aggregator)
        aggregator_rng = _rng_state(instances.device) if replay_aggregator_rng else None
        output = aggregator(features)  # features carry no grad: aggregator grads only
        loss = loss_fn(_logits(output), target)
        backward(loss)
        with _frozen_parameters(aggregator):
            for i, piece in enumerate(slices):
                if replay_encoder_rng:
                    _set_rng_state(chunk_rng_states[i], instances.device)
                chunk_features = encoder(instances[piece])  # (c, D)
                joined = torch.cat([features[: piece.start], chunk_features, features[piece.stop :]])  # (N, D)
                if replay_aggregator_rng:
                    _set_rng_state(aggregator_rng, instances.device)
                backward(loss_fn(_logits(aggregator(joined)), target))  # encoder grads only

    if replay_encoder_rng:
        _set_rng_state(rng_after_first_pass, instances.device)
    return loss.detach(), _detached(output)


def _plain_backward(loss: torch.Tensor) -> None:
    loss.backward()


def _logits(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _detached(output: torch.Tensor | tuple) -> torch.Tensor | tuple:
    if isinstance(output, tuple):
        return tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in output)
    return output.detach()


def _has_active_dropout(module: nn.Module) -> bool:
    return any(
        isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0 for m in module.modules()
    )


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
def _frozen_parameters(module: nn.Module) -> Iterator[None]:
    frozen = [p for p in module.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
