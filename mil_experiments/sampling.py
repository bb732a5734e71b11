"""Within-bag sampling (Koriakina et al., 2021), as the published code does it.

Each time a bag is used, s = ceil(p * N / 100) instance positions are drawn uniformly
*with replacement* (`torch.randint`), so every epoch sees a new sample. Training and
inference percentages are separate (decoupled as in the gradient-accumulation paper), and
inference sampling applies to every method: validation is repeated `val_repeats` times
and averaged; the test makes ceil(test_looks * N / s) passes per bag (about `test_looks`
looks at each instance), the bag label is the majority vote of the passes and the
instance AUC uses the attention averaged over the passes that saw each instance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingConfig:
    """Schema of the top-level `sampling:` key (percentages of a bag's instances)."""

    train: float = 100.0
    inference: float = 100.0
    val_repeats: int = 5
    test_looks: int = 10
    # Extra inference percentages evaluated at test time (each reported separately), so
    # one trained model serves every inference setting of the paper's Figure 2.
    test_inference: list[float] = field(default_factory=list)

    def check(self) -> None:
        for name in ("train", "inference"):
            value = getattr(self, name)
            if not 0 < value <= 100:
                raise ValueError(f"sampling.{name}={value:g}: must be in (0, 100]")
        for value in self.test_inference:
            if not 0 < value <= 100:
                raise ValueError(f"sampling.test_inference contains {value:g}: each must be in (0, 100]")
        if self.val_repeats < 1 or self.test_looks < 1:
            raise ValueError("sampling.val_repeats and sampling.test_looks must be >= 1")


def sample_size(percent: float, bag_size: int) -> int:
    """s = ceil(p * N / 100)."""
    return max(1, math.ceil(percent * bag_size / 100))


def draw_positions(percent: float, bag_size: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """(s,) positions drawn with replacement, or None when the bag is used whole.

    As in the published loader, a bag no larger than s is used whole.
    """
    s = sample_size(percent, bag_size)
    if percent >= 100 or bag_size <= s:
        return None
    return torch.randint(bag_size, (s,), generator=generator)


def count_test_passes(percent: float, bag_size: int, looks: int) -> int:
    """ceil(looks * N / s) passes, or 1 when the bag is used whole."""
    s = sample_size(percent, bag_size)
    if percent >= 100 or bag_size <= s:
        return 1
    return math.ceil(looks * bag_size / s)
