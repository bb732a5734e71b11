"""Metric values checked against numbers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mil_experiments.metrics import (
    bag_instance_auc,
    bag_metrics,
    instance_auc,
    minmax_normalise,
    multi_pass_instance_auc,
)


def test_minmax_normalise_matches_the_published_formula():
    w = np.array([0.1, 0.3, 0.6])
    np.testing.assert_allclose(minmax_normalise(w), [0.0, 0.2 / (0.5 + 1e-11), 0.5 / (0.5 + 1e-11)])


def test_perfect_attention_ranking_gives_auc_one():
    scores = minmax_normalise(np.array([0.05, 0.1, 0.7, 0.15]))
    assert bag_instance_auc(scores, np.array([0, 0, 1, 0]), True) == pytest.approx(1.0)


def test_partial_ranking_auc_by_hand():
    # Key instances score 1.0 and 0.4; negatives 0.0 and 0.6 (after normalisation).
    # Thresholds in (0.6, 1]: TPR 1/2, FPR 0; (0.4, 0.6]: TPR 1/2, FPR 1/2; (0, 0.4]: TPR 1, FPR 1/2;
    # 0: TPR 1, FPR 1. Trapezoids: 0.5*0.5 + 0.5*(0.5+1)/2... computed over FPR:
    # (0,0)->(0,.5)->(.5,.5)->(.5,1)->(1,1): area = 0.5*0.5 + 0.5*1 = 0.75.
    scores = np.array([1.0 - 1e-12, 0.4, 0.0, 0.6])
    labels = np.array([1, 1, 0, 0])
    assert bag_instance_auc(scores, labels, True) == pytest.approx(0.75, abs=1e-9)


def test_bag_predicted_negative_scores_zero():
    scores = minmax_normalise(np.array([0.05, 0.1, 0.7, 0.15]))
    assert bag_instance_auc(scores, np.array([0, 0, 1, 0]), False) == 0.0


def test_instance_auc_averages_positive_bags_only():
    attention = [np.array([0.1, 0.9]), np.array([0.9, 0.1]), np.array([0.5, 0.5])]
    labels = [np.array([0, 1]), np.array([0, 1]), np.array([0, 0])]
    # Bag 1: perfect (1.0); bag 2: reversed (0.0 at the grid); bag 3 is negative and ignored.
    assert instance_auc(attention, labels, [1, 1, 0], [1, 1, 0]) == pytest.approx(0.5)
    # With the published gate, a positive bag predicted negative counts as 0.
    assert instance_auc(attention, labels, [1, 1, 0], [0, 1, 0]) == pytest.approx(0.0)
    assert instance_auc(attention, labels, [1, 1, 0], [0, 1, 0], gate_by_prediction=False) == pytest.approx(0.5)


def test_multi_pass_instance_auc_uses_majority_passes():
    # Bag of 3 instances (key = position 2). Pass 1 sees {0, 2}, pass 2 sees {1, 2}; both predict positive.
    passes = [[(np.array([0, 2]), np.array([0.2, 0.8]), 1), (np.array([1, 2]), np.array([0.3, 0.7]), 1)]]
    # Normalised: pass 1 -> 0, ~1; pass 2 -> 0, ~1. Instance 2 has mean ~1; 0 and 1 have 0. Perfect ranking.
    assert multi_pass_instance_auc(passes, [np.array([0, 0, 1])], [1]) == pytest.approx(1.0)
    # If most passes predict the bag negative, the key instance's majority label is 0: AUC 0.
    passes_negative = [[(np.array([0, 2]), np.array([0.2, 0.8]), 0), (np.array([1, 2]), np.array([0.3, 0.7]), 0)]]
    assert multi_pass_instance_auc(passes_negative, [np.array([0, 0, 1])], [1]) == 0.0


def test_bag_metrics_by_hand():
    probabilities = torch.tensor([0.9, 0.2, 0.6, 0.4])
    labels = torch.tensor([1, 0, 0, 1])
    m = bag_metrics(probabilities, labels, num_classes=2)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["error"] == pytest.approx(0.5)
    # Pairs (pos, neg): (0.9,0.2) ok, (0.9,0.6) ok, (0.4,0.2) ok, (0.4,0.6) wrong -> 3/4.
    assert m["auc"] == pytest.approx(0.75)
    # Predicted [1,0,1,0]: class 0 F1 = 0.5, class 1 F1 = 0.5, weighted by support 2/2 -> 0.5.
    assert m["f1_weighted"] == pytest.approx(0.5)


def test_weighted_f1_uses_supports():
    probabilities = torch.tensor([0.9, 0.8, 0.7, 0.1])
    labels = torch.tensor([1, 1, 0, 0])
    m = bag_metrics(probabilities, labels, num_classes=2)
    # Predicted [1,1,1,0]. Class 1: P=2/3, R=1 -> F1=0.8. Class 0: P=1, R=1/2 -> F1=2/3. Weighted (2,2): 0.7333.
    assert m["f1_weighted"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_multi_pass_instance_auc_counts_one_look_per_pass_for_repeated_draws():
    """Regression: an instance drawn three times in one pass counted as three looks (official code: one).

    Instance 1 (the key) is seen in passes A, C, D (predicted positive) and three times in pass B
    (predicted negative). One look per pass: 3 of 4 looks positive > round(4 / 2), so its majority is
    positive and its score is ~1; instance 0 (majority positive, score 0) is a false positive only at
    threshold 0; instance 2 has a negative majority. TPR = 1 up to 0.999, FPR = 1/2 at 0 only: AUC 0.5.
    Counting B three times gives 3 of 6 looks, a negative majority and AUC 0.
    """
    passes = [
        (np.array([1, 0]), np.array([0.9, 0.1]), 1),  # A
        (np.array([1, 2]), np.array([0.8, 0.2]), 1),  # C
        (np.array([1, 0]), np.array([0.7, 0.3]), 1),  # D
        (np.array([1, 1, 1, 2]), np.array([0.4, 0.4, 0.4, 0.6]), 0),  # B: instance 1 drawn three times
    ]
    assert multi_pass_instance_auc([passes], [np.array([0, 1, 0])], [1]) == pytest.approx(0.5)


def test_a_repeated_draw_keeps_its_last_weight_and_the_pass_is_normalised_over_distinct_instances():
    """Official: one file per image and pass, so a second draw's weight overwrites the first."""
    passes = [(np.array([0, 1, 0]), np.array([0.9, 0.5, 0.1]), 1)]  # instance 0 drawn twice: its last weight, 0.1
    # distinct looks: instance 0 -> 0.1, instance 1 -> 0.5; normalised: 0 and ~1; the key (1) ranks above 0
    assert multi_pass_instance_auc([passes], [np.array([0, 1])], [1]) == pytest.approx(1.0)
