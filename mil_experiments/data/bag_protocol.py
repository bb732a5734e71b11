"""How benchmark bags are drawn from a labelled image pool (QMNIST-bags protocol).

Follows the bag generator of the gradient-accumulation paper's code (identical to the
within-bag sampling paper's notebook): half of the bags are positive (the first
ceil(n/2)), each positive bag holds ceil(N * pct / 100) key instances and N minus that
many negatives, a negative bag holds N negatives, and, unless repeats are allowed, no
image appears twice in one bag (an image may appear in several bags).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mil_experiments.errors import ConfigError


@dataclass(frozen=True)
class BagIndices:
    """Pool indices of one bag's instances and the labels that go with them."""

    indices: np.ndarray  # (N,) indices into the image pool
    instance_labels: np.ndarray  # (N,) 1 for key instances
    label: int


def key_instances_per_bag(bag_size: int, key_percent: float) -> int:
    """ceil(N * pct / 100), as the paper's code counts them (50 x 5% gives 3)."""
    return math.ceil(bag_size * key_percent / 100)


def draw_bags(
    is_key: np.ndarray,
    n_bags: int,
    bag_size: int,
    key_percent: float,
    rng: np.random.Generator,
    allow_repeats: bool = False,
) -> list[BagIndices]:
    """Draw `n_bags` bags from a pool whose key images are flagged by `is_key`.

    Args:
        is_key: (P,) boolean, True for key-instance images of the pool.
        n_bags: number of bags; the first ceil(n_bags / 2) are positive.
        bag_size: instances per bag, N.
        key_percent: percent of key instances in a positive bag.
        rng: the generator that makes the draw reproducible.
        allow_repeats: draw with replacement inside a bag (the Imagenette-bags notebook).

    Returns:
        One `BagIndices` per bag, instances shuffled within the bag.
    """
    key_pool = np.flatnonzero(is_key)
    negative_pool = np.flatnonzero(~is_key)
    n_key = key_instances_per_bag(bag_size, key_percent)
    n_positive = math.ceil(n_bags / 2)
    if n_key > bag_size:
        raise ValueError(f"key_percent={key_percent} asks for more key instances than bag_size={bag_size}")
    if not allow_repeats:
        if n_positive and n_key > len(key_pool):
            raise ValueError(f"the pool has {len(key_pool)} key images; a positive bag needs {n_key}")
        if bag_size > len(negative_pool):
            raise ValueError(f"the pool has {len(negative_pool)} negative images; a bag needs {bag_size}")
    bags = []
    for b in range(n_bags):
        positive = b < n_positive
        k = n_key if positive else 0
        keys = rng.choice(key_pool, size=k, replace=allow_repeats)
        negatives = rng.choice(negative_pool, size=bag_size - k, replace=allow_repeats)
        indices = np.concatenate([keys, negatives])  # (N,)
        labels = np.concatenate([np.ones(k, dtype=np.int64), np.zeros(bag_size - k, dtype=np.int64)])
        order = rng.permutation(bag_size)
        bags.append(BagIndices(indices[order], labels[order], int(positive)))
    return bags


PROTOCOL_COUNTS = ("bag_size", "train_bags", "val_bags", "test_bags", "image_size")


def check_protocol_config(config) -> None:
    """The keys every benchmark-bag dataset shares: a ConfigError naming the bad one.

    `config` has `key_percent` and the integer keys of `PROTOCOL_COUNTS`.
    """
    if not 0 < config.key_percent <= 100:
        raise ConfigError(f"dataset.key_percent={config.key_percent}: must be in (0, 100]")
    for key in PROTOCOL_COUNTS:
        if getattr(config, key) < 1:
            raise ConfigError(f"dataset.{key}={getattr(config, key)}: must be a positive integer")


def draw_split_bags(is_key: np.ndarray, n_bags: int, config, rng: np.random.Generator, pool: str) -> list[BagIndices]:
    """`draw_bags` with the dataset config's protocol; an impossible draw is a ConfigError.

    Args:
        pool: what the pool is, for the message (e.g. "train pool of 898 digits").
    """
    try:
        return draw_bags(
            is_key, n_bags, config.bag_size, config.key_percent, rng, getattr(config, "allow_repeats", False)
        )
    except ValueError as error:
        raise ConfigError(f"dataset ({pool}): {error}") from None


def split_pool_per_class(
    labels: np.ndarray, fractions: tuple[float, ...], rng: np.random.Generator
) -> list[np.ndarray]:
    """Split pool indices into disjoint parts with the given fractions, per class.

    Returns one index array per fraction; the last part takes the remainder of each class.
    """
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for value in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == value))
        start = 0
        for i, fraction in enumerate(fractions):
            stop = len(members) if i == len(fractions) - 1 else start + int(round(fraction * len(members)))
            parts[i].append(members[start:stop])
            start = stop
    return [np.sort(np.concatenate(p)) for p in parts]
