"""`accumulate_gradients`: the full-bag gradient, a chunk at a time, at a fraction of the memory."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mil_experiments import accumulate_gradients
from mil_experiments.engine import HeadResult, chunk_size_for_alpha, chunk_slices
from mil_experiments.models.abmil import ABMIL
from mil_experiments.models.encoders import BottleneckResNetEncoder, LeNetEncoder
from mil_experiments.telemetry import measure_saved_bytes


def bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logits, target)


def acc(encoder, aggregator, bag, target, chunk_size, **options) -> HeadResult:
    """`accumulate_gradients` with the head BCE(aggregator(features).logits, target)."""

    def head(features: torch.Tensor) -> HeadResult:
        output = aggregator(features)
        return HeadResult(bce(output.logits, target), output=output)

    return accumulate_gradients(encoder, head, bag, chunk_size, head_parameters=aggregator.parameters(), **options)


def make_models(kind: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "lenet":
        encoder, bag = LeNetEncoder(1, 28), torch.randn(200, 1, 28, 28)
    else:
        encoder, bag = BottleneckResNetEncoder(1, norm="none"), torch.randn(12, 1, 16, 16)
    return encoder, ABMIL(encoder.out_dim, 1, attention_dim=64), bag


def gradients(*modules: nn.Module) -> list[torch.Tensor]:
    out = [p.grad.clone() for m in modules for p in m.parameters()]
    for m in modules:
        m.zero_grad(set_to_none=True)
    return out


def normalised_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum|a - b| / sum|b|; an exactly-zero reference is compared in absolute terms."""
    scale = b.abs().sum()
    return float((a - b).abs().sum() / (scale if scale > 0 else 1.0))


def full_bag_reference(encoder, aggregator, bag, target, chunk_size):
    """Plain autograd through one graph of the whole bag (all activations kept).

    The encoder's forward is evaluated in the same row blocks as the chunked one: CPU
    matrix kernels round differently for different batch sizes (about 1e-7), and the
    softmax-shift-invariant attention parameters, whose true gradient is ~0, amplify that
    into large relative differences; fixing the blocks isolates the decomposition itself.
    """
    features = torch.cat([encoder(bag[s]) for s in chunk_slices(bag.shape[0], chunk_size)])  # (N, D)
    bce(aggregator(features).logits, target).backward()
    return gradients(encoder, aggregator)


@pytest.mark.parametrize("kind", ["lenet", "resnet_no_norm"])
@pytest.mark.parametrize("alpha", [3, 25, 50])
def test_every_parameter_gradient_matches_full_bag(kind, alpha):
    encoder, aggregator, bag = make_models(kind)
    target = torch.tensor([1.0])
    chunk = chunk_size_for_alpha(alpha, bag.shape[0])
    reference = full_bag_reference(encoder, aggregator, bag, target, chunk)
    by_mode = {}
    for mode, keep_last in (("cached", False), ("recompute", False), ("cached_keep_last", True)):
        acc(encoder, aggregator, bag, target, chunk, mode=mode.removesuffix("_keep_last"),
                             keep_last_chunk=keep_last)
        by_mode[mode] = gradients(encoder, aggregator)
        for g, ref in zip(by_mode[mode], reference, strict=True):
            assert normalised_l1(g, ref) <= 1e-6
    for a, b, c in zip(by_mode["cached"], by_mode["recompute"], by_mode["cached_keep_last"], strict=True):
        assert normalised_l1(a, b) <= 1e-6 and normalised_l1(c, a) <= 1e-6


def test_matches_a_single_batch_forward_of_the_whole_bag():
    """Against one batch-of-N forward: identical up to float32 rounding of the kernels."""
    encoder, aggregator, bag = make_models("lenet")
    target = torch.tensor([0.0])
    bce(aggregator(encoder(bag)).logits, target).backward()
    reference = gradients(encoder, aggregator)
    acc(encoder, aggregator, bag, target, chunk_size_for_alpha(25, 200))
    accumulated = gradients(encoder, aggregator)
    total = sum((a - b).abs().sum() for a, b in zip(accumulated, reference, strict=True)) / sum(b.abs().sum() for b in reference)
    assert float(total) <= 1e-6
    # Per parameter, against its own gradient or the model's typical gradient, whichever is larger: the
    # attention biases' true gradients are ~0 (attention_w.bias: exactly, softmax is shift
    # invariant), so their kernel rounding, which depends on the CPU and the thread count, is all that is left.
    typical = float(sum(b.abs().sum() for b in reference) / sum(b.numel() for b in reference))
    for g, ref in zip(accumulated, reference, strict=True):
        scale = max(float(ref.abs().mean()), typical)
        assert float((g - ref).abs().mean()) / scale <= 1e-5


def test_gradients_accumulate_into_existing_grad_like_backward():
    encoder, aggregator, bag = make_models("lenet")
    target = torch.tensor([1.0])
    acc(encoder, aggregator, bag[:40], target, 7)
    once = gradients(encoder, aggregator)
    for _ in range(2):
        acc(encoder, aggregator, bag[:40], target, 7)
    twice = gradients(encoder, aggregator)
    for a, b in zip(twice, once, strict=True):
        assert normalised_l1(a, 2 * b) <= 1e-6


def test_returns_loss_and_aggregator_output():
    encoder, aggregator, bag = make_models("lenet")
    target = torch.tensor([1.0])
    result = acc(encoder, aggregator, bag[:30], target, 8)
    with torch.no_grad():
        reference = aggregator(encoder(bag[:30]))
    assert torch.allclose(result.loss, bce(reference.logits, target), atol=1e-6)
    assert result.output.instance_scores.shape == (30,)
    assert torch.allclose(result.output.instance_scores, reference.instance_scores, atol=1e-6)
    assert not result.loss.requires_grad and not result.output.logits.requires_grad


def test_batch_norm_running_stats_updated_only_in_the_gradient_pass():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    aggregator = ABMIL(4, 1, attention_dim=8)
    bag = torch.randn(12, 1, 8, 8)
    acc(encoder, aggregator, bag, torch.tensor([1.0]), chunk_size=4)
    bn = encoder[1]
    # momentum=None is a cumulative average: 3 chunk updates, none from the no-grad pass.
    assert int(bn.num_batches_tracked) == 3
    with torch.no_grad():
        conv = encoder[0](bag)  # (12, 4, 6, 6)
    chunk_means = torch.stack([conv[s].mean(dim=(0, 2, 3)) for s in chunk_slices(12, 4)])  # (3, 4)
    assert torch.allclose(bn.running_mean, chunk_means.mean(0), atol=1e-5)
    assert bn.track_running_stats


def test_encoder_dropout_draws_the_same_mask_in_both_passes():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5))
    aggregator = ABMIL(32, 1, attention_dim=8)
    bag = torch.randn(20, 1, 4, 4)
    target = torch.tensor([1.0])
    state = torch.get_rng_state()
    features = encoder(bag)  # one pass with the same RNG draws the chunks see
    torch.set_rng_state(state)
    chunked_features = torch.cat([encoder(bag[s]) for s in chunk_slices(20, 5)])
    torch.set_rng_state(state)
    features = torch.cat([encoder(bag[s]) for s in chunk_slices(20, 5)])  # (20, 32), the masks of the first pass
    bce(aggregator(features).logits, target).backward()
    reference = gradients(encoder, aggregator)
    assert torch.equal(features, chunked_features)
    torch.set_rng_state(state)
    acc(encoder, aggregator, bag, target, chunk_size=5)
    for g, ref in zip(gradients(encoder, aggregator), reference, strict=True):
        assert normalised_l1(g, ref) <= 1e-6


@pytest.mark.parametrize("alpha, bound", [(25, 0.35), (3, 0.08)])
def test_saved_activation_memory_shrinks_with_alpha(alpha, bound):
    encoder, aggregator, _ = make_models("lenet")
    bag = torch.randn(240, 1, 28, 28)
    target = torch.tensor([1.0])
    model = nn.ModuleList([encoder, aggregator])

    def step(percent: float):
        return lambda: acc(encoder, aggregator, bag, target, chunk_size_for_alpha(percent, 240))

    full = measure_saved_bytes(model, step(100))
    chunked = measure_saved_bytes(model, step(alpha))
    assert full > 0
    assert chunked <= bound * full, f"alpha={alpha}: {chunked / full:.3f} of full-bag memory"


def test_chunk_size_is_ceil_of_alpha_percent():
    assert chunk_size_for_alpha(25, 10) == 3
    assert chunk_size_for_alpha(3, 200) == 6
    assert chunk_size_for_alpha(100, 7) == 7
    assert chunk_size_for_alpha(0.1, 5) == 1
    assert [s.stop - s.start for s in chunk_slices(10, 3)] == [3, 3, 3, 1]
    assert math.isclose(sum(s.stop - s.start for s in chunk_slices(1000, 30)), 1000)
