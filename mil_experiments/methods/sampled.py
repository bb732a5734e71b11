"""`method=sampled`: training on within-bag samples (ABMIL-SAMPL, Koriakina et al., ISPA 2021).

Every time a bag is used for training, ceil(p * N / 100) of its instances are drawn with
replacement (p = `sampling.train`; a multi-level bag keeps the children of the drawn
tiles); inference sampling (`sampling.inference`) is separate and applies to every method
(see `mil_experiments.evaluation`).
"""

from __future__ import annotations

from mil_experiments.bag import Bag
from mil_experiments.errors import ConfigError
from mil_experiments.methods.base import MILMethod
from mil_experiments.sampling import SamplingConfig, draw_positions


class Sampled(MILMethod):
    """A fresh within-bag sample of each bag at every training step."""

    trains_on_samples = True

    @classmethod
    def check_config(cls, config: MILMethod.Config, sampling: SamplingConfig) -> None:
        super().check_config(config, sampling)
        if sampling.train >= 100:
            raise ConfigError(
                f"method={config.name} trains on within-bag samples: set sampling.train below 100 (e.g. sampling.train=25)"
            )

    def training_bag(self, bag: Bag) -> Bag:
        positions = draw_positions(self.sampling.train, bag.sampling_size)
        return bag if positions is None else bag.subset(positions)
