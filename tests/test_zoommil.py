"""ZoomMIL: the perturbed top-K estimator, zooming onto children, ablations, refusals, ACC exactness."""

from __future__ import annotations

import re

import pytest
import torch

from mil_experiments.bag import LevelLayout
from mil_experiments.engine import HeadResult, accumulate_gradients
from mil_experiments.errors import DataError
from mil_experiments.models.aggregator import bag_loss
from mil_experiments.models.perturbed_topk import hard_topk, perturbed_topk
from mil_experiments.models.zoommil import ZoomMIL, chain_ratios

LAYOUT = LevelLayout((1.25, 2.5, 10.0), (6, 24, 384))


def test_estimator_gradient_is_the_diagonal_formula_on_the_same_noise():
    torch.manual_seed(0)
    scores = torch.rand(2, 9, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(2, 50, 9, dtype=torch.float64)
    out = perturbed_topk(scores, 3, num_samples=50, sigma=0.1, noise=noise)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    indices = torch.topk(scores.detach()[:, None] + 0.1 * noise, 3, dim=-1).indices.sort(-1).values  # (B, S, k)
    onehot = torch.nn.functional.one_hot(indices, 9).double()  # (B, S, k, N)
    assert torch.allclose(out, onehot.mean(1))
    jacobian_diag = (onehot * noise[:, :, None, :]).mean(1) / 0.1  # (B, k, N)
    assert torch.allclose(scores.grad, (upstream * jacobian_diag).sum(1))


def test_estimator_expectation_matches_finite_differences_of_the_smoothed_topk():
    """Each diagonal entry dE[P[j, d]]/dx[d] of the estimator vs a central difference of the smoothed top-K (common noise)."""
    torch.manual_seed(0)
    scores = torch.tensor([[0.30, 0.32, 0.10, 0.29, 0.05]], dtype=torch.float64)
    sigma, k, samples, h = 0.05, 2, 400_000, 0.01
    noise = torch.randn(1, samples, 5, dtype=torch.float64)
    for row, d in ((0, 0), (1, 3), (0, 1), (1, 1)):
        weights = torch.zeros(1, k, 5, dtype=torch.float64)
        weights[0, row, d] = 1.0
        x = scores.clone().requires_grad_(True)
        (perturbed_topk(x, k, samples, sigma) * weights).sum().backward()
        plus, minus = scores.clone(), scores.clone()
        plus[0, d] += h
        minus[0, d] -= h
        finite = ((perturbed_topk(plus, k, samples, sigma, noise=noise) - perturbed_topk(minus, k, samples, sigma, noise=noise)) * weights).sum() / (2 * h)
        assert abs(float(x.grad[0, d]) - float(finite)) < 0.1 * abs(float(finite)) + 0.1, (row, d, float(x.grad[0, d]), float(finite))
        assert abs(float(finite)) > 0.5  # a real slope, not two zeros agreeing


def test_hard_topk_is_deterministic_and_torch_topk_sorted_by_position():
    scores = torch.rand(3, 20)
    first, second = hard_topk(scores, 5), hard_topk(scores, 5)
    assert torch.equal(first, second)
    expected = torch.topk(scores, 5).indices.sort(-1).values
    assert torch.equal(first.argmax(-1), expected)


def test_eval_selects_exactly_the_children_of_the_chosen_tiles():
    model = ZoomMIL(4, 2, k=2, hidden_dim=8, attention_dim=4).eval()
    sizes = LAYOUT.sizes
    features = torch.randn(sum(sizes), 4)
    output = model(features, levels=LAYOUT)
    hidden = model.fc[0](features[:6])
    chosen = torch.topk(model.selector[0](hidden), 2).indices.sort().values
    mid = output.level_scores[2.5]
    children = (chosen[:, None] * 4 + torch.arange(4)).reshape(-1)
    assert set(torch.nonzero(mid).reshape(-1).tolist()) == set(children.tolist())
    high = output.level_scores[10.0]
    assert torch.isclose(high.sum(), torch.tensor(1.0)) and int((high > 0).sum()) == 2 * 16
    # every selected high tile descends from a chosen low tile (64 children per low tile)
    assert set((torch.nonzero(high).reshape(-1) // 64).tolist()) <= set(chosen.tolist())


def test_zoom_matches_children_by_coordinates_of_a_depth_first_tiling():
    """Depth-first coordinates: the children of tile i at 2x lie inside tile i's area."""
    tiles = torch.tensor([[0, 0], [64, 0], [0, 64]])  # low tiles (x, y), side 64 level-0 px
    offsets = torch.tensor([[0, 0], [32, 0], [0, 32], [32, 32]])  # _0_0, _1_0, _0_1, _1_1
    children = (tiles[:, None] + offsets[None]).reshape(-1, 2)  # (12, 2)
    rows = torch.tensor([0, 2])
    picked = ZoomMIL.zoom(torch.nn.functional.one_hot(rows, 3).float(), rows, children, 4)
    soft = ZoomMIL.zoom(torch.nn.functional.one_hot(rows, 3).float(), None, children.float(), 4)
    for block, tile in zip(picked.reshape(2, 4, 2), tiles[rows], strict=True):
        assert ((block >= tile) & (block < tile + 64)).all()
    assert torch.equal(soft, picked.float())


def test_gradient_reaches_the_auxiliary_attention_only_through_the_topk():
    torch.manual_seed(0)
    features = torch.randn(sum(LAYOUT.sizes), 4)
    for selection, expect_gradient in (("perturbed", True), ("hard", False)):
        model = ZoomMIL(4, 2, k=2, hidden_dim=8, attention_dim=4, dropout=0.0, selection=selection).train()
        bag_loss(model(features, target=torch.tensor(1), levels=LAYOUT).logits, torch.tensor(1)).backward()
        grads = [p.grad for p in model.selector.parameters()]
        has = any(g is not None and g.abs().sum() > 0 for g in grads)
        assert has == expect_gradient, selection


@pytest.mark.parametrize("n_low", [1, 2, 5])
@pytest.mark.parametrize("selection", ["perturbed", "hard", "random_low", "random_next"])
def test_shapes_for_tiny_bags_and_fewer_tiles_than_k(n_low, selection):
    layout = LevelLayout((1.25, 2.5), (n_low, 4 * n_low))
    for options in ({}, {"fusion": "concat"}, {"dual_attention": False}, {"highest_only": True}):
        model = ZoomMIL(4, 2, k=3, hidden_dim=8, attention_dim=4, selection=selection, **options)
        model.bind_levels(layout)
        for training in (True, False):
            model.train(training)
            output = model(torch.randn(5 * n_low, 4), levels=layout)
            output.check(5 * n_low, 2, "zoommil")
            assert torch.isfinite(output.logits).all()


@pytest.mark.parametrize(
    ("mags", "sizes", "fragment"),
    [((1.25, 3.0), (2, 8), "not a 2^k chain"), ((1.25, 2.5), (2, 9), "9 tiles at 2.5x"), ((2.5, 10.0), (2, 8), "needs 32")],
)
def test_bad_magnification_chains_are_refused_naming_the_file(mags, sizes, fragment):
    with pytest.raises(DataError, match=re.escape(fragment)) as error:
        chain_ratios(mags, sizes, "slide_7.h5")
    assert str(error.value).startswith("slide_7.h5:") and "\n" not in str(error.value)
    assert chain_ratios((1.25, 2.5, 10.0), (2, 8, 128), "ok.h5") == [4, 16]


def test_random_draws_replay_and_acc_gives_the_full_bag_gradient():
    torch.manual_seed(1)
    layout = LevelLayout((1.25, 2.5, 5.0), (4, 16, 64))
    encoder = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Dropout(0.1)).double().train()
    model = ZoomMIL(4, 2, k=2, hidden_dim=8, attention_dim=4).double().train()
    bag, label = torch.randn(84, 6, dtype=torch.float64), torch.tensor(1)

    def head(features):
        return HeadResult(bag_loss(model(features, target=label, levels=layout).logits, label))

    def gradients():
        grads = torch.cat([p.grad.flatten() for m in (encoder, model) for p in m.parameters() if p.grad is not None])
        for m in (encoder, model):
            m.zero_grad(set_to_none=True)
        return grads

    chunk = 30
    state = torch.get_rng_state()
    features = torch.cat([encoder(bag[s:s + chunk]) for s in range(0, 84, chunk)])
    head(features).loss.backward()
    reference = gradients()
    assert reference.abs().sum() > 0
    for mode in ("cached", "recompute"):
        torch.set_rng_state(state)
        accumulate_gradients(encoder, head, bag, chunk, mode=mode, head_parameters=model.parameters())
        difference = (gradients() - reference).abs().sum() / reference.abs().sum()
        assert difference <= 1e-10, (mode, float(difference))
