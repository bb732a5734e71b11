"""The engine differentiates any head: random draws replayed, zero-gradient chunks skipped, engines as an axis."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mil_experiments.engine import AccumulationEngine, FullBagEngine, HeadResult, accumulate_gradients, chunk_slices
from mil_experiments.models.abmil import ABMIL
from mil_experiments.models.aggregator import bag_loss
from tests.test_engine import gradients, normalised_l1


def assert_same_gradients(grads: list[torch.Tensor], reference: list[torch.Tensor], tolerance: float = 1e-12) -> None:
    """Normalised L1 over all parameters at once (a softmax's shift-invariant bias has a ~0 gradient)."""
    assert normalised_l1(torch.cat([g.flatten() for g in grads]), torch.cat([r.flatten() for r in reference])) <= tolerance


class RandomSubsetMean(nn.Module):
    """A head with random draws that are not dropout: mean-pools a random half of the instances."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        keep = torch.randperm(features.shape[0])[: max(1, features.shape[0] // 2)]  # (N/2,)
        return self.classifier(features[keep].mean(0))  # (1,)


def encoder_and_bag() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 8)).double()
    return encoder, torch.randn(23, 6, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["cached", "recompute"])
def test_random_draws_of_the_head_and_encoder_are_replayed(mode):
    """Regression: recompute mode replayed only dropout, so a head's own random draws broke it."""
    encoder, bag = encoder_and_bag()
    head_module = RandomSubsetMean(8).double()
    target = torch.tensor(1)

    def head(features):
        return HeadResult(bag_loss(head_module(features), target))

    chunks = chunk_slices(23, 5)
    state = torch.get_rng_state()
    features = torch.cat([encoder(bag[s]) for s in chunks])  # (23, 8): the first pass's dropout masks
    head(features).loss.backward()
    reference = gradients(encoder, head_module)
    rng_after_reference = torch.get_rng_state()
    torch.set_rng_state(state)
    accumulate_gradients(encoder, head, bag, 5, mode=mode, head_parameters=head_module.parameters())
    assert_same_gradients(gradients(encoder, head_module), reference)
    assert torch.equal(torch.get_rng_state(), rng_after_reference)  # as if the bag ran once


def test_skipping_zero_gradient_chunks_gives_the_same_gradients_and_skips_them():
    encoder, bag = encoder_and_bag()
    encoder.eval()
    aggregator = ABMIL(8, 1, attention_dim=4).double()
    target = torch.tensor(0)
    kept = torch.zeros(23, 1, dtype=torch.float64)
    kept[:10] = 1.0  # instances 10.. are masked: their feature gradient is exactly zero

    def head(features):
        return HeadResult(bag_loss(aggregator(features * kept).logits, target))

    calls = []
    encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    accumulate_gradients(encoder, head, bag, 5)
    reference, reference_calls = gradients(encoder, aggregator), list(calls)
    calls.clear()
    accumulate_gradients(encoder, head, bag, 5, skip_zero_grad_chunks=True)
    for g, ref in zip(gradients(encoder, aggregator), reference, strict=True):
        assert torch.equal(g, ref)
    assert reference_calls == [5, 5, 5, 5, 3] * 2
    assert calls == [5, 5, 5, 5, 3, 5, 5]  # chunks 10-14, 15-19, 20-22 are not re-encoded


def test_every_named_term_of_the_loss_is_differentiated():
    """The engine differentiates the sum of the terms, so auxiliary terms reach the encoder too."""
    encoder, bag = encoder_and_bag()
    encoder.eval()
    aggregator = ABMIL(8, 1, attention_dim=4).double()
    target = torch.tensor(1)

    def head(features):
        output = aggregator(features)
        terms = {"bag": bag_loss(output.logits, target), "norm": 0.1 * features.pow(2).mean()}
        return HeadResult(terms["bag"] + terms["norm"], terms, output)

    head(encoder(bag)).loss.backward()
    reference = gradients(encoder, aggregator)
    result = accumulate_gradients(encoder, head, bag, 4)
    assert_same_gradients(gradients(encoder, aggregator), reference)
    assert set(result.terms) == {"bag", "norm"} and not result.terms["norm"].requires_grad


def test_engines_as_config_axis():
    encoder, bag = encoder_and_bag()
    encoder.eval()
    aggregator = ABMIL(8, 1, attention_dim=4).double()

    def head(features):
        return HeadResult(bag_loss(aggregator(features).logits, torch.tensor(1)))

    full = FullBagEngine()
    full.backward_bag(encoder, head, bag)
    reference = gradients(encoder, aggregator)
    engine = AccumulationEngine(alpha=10)
    engine.backward_bag(encoder, head, bag, head_parameters=aggregator.parameters())
    assert engine.last_chunk_size == 3 and full.last_chunk_size == 23
    assert_same_gradients(gradients(encoder, aggregator), reference)
    assert engine.settings() == {"name": "acc", "alpha": 10, "acc_mode": "cached", "acc_keep_last_chunk": False,
                                 "skip_zero_grad_chunks": False, "skip_zero_grad_rows": False}
    with pytest.raises(ValueError, match=r"engine.alpha=0: must be in \(0, 100\]"):
        AccumulationEngine(alpha=0)
    with pytest.raises(ValueError, match="need acc_mode=cached"):
        AccumulationEngine(acc_mode="recompute", skip_zero_grad_chunks=True)


@pytest.mark.parametrize("mode", ["cached", "recompute"])
def test_an_encoder_without_parameters_skips_the_re_encoding(mode):
    """Pre-extracted features (encoder=identity) under engine=acc: head gradients only, no phase 3."""
    aggregator = ABMIL(6, 1, attention_dim=4).double()
    bag = torch.randn(10, 6, dtype=torch.float64)

    def head(features):
        return HeadResult(bag_loss(aggregator(features).logits, torch.tensor(1)))

    head(bag).loss.backward()
    reference = [p.grad.clone() for p in aggregator.parameters()]
    aggregator.zero_grad()
    accumulate_gradients(nn.Identity(), head, bag, 3, mode=mode, head_parameters=aggregator.parameters())
    assert_same_gradients([p.grad for p in aggregator.parameters()], reference)
