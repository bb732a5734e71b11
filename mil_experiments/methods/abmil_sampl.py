"""ABMIL-SAMPL: ABMIL trained on within-bag samples (Koriakina et al., ISPA 2021).

Every time a bag is used for training, ceil(p * N / 100) of its instances are drawn with
replacement (p = `sampling.train`); inference sampling (`sampling.inference`) is
separate and handled by the shared evaluation (see `mil_experiments.sampling`).
"""

from __future__ import annotations

from mil_experiments.methods.abmil import ABMIL


class ABMILSampled(ABMIL):
    """ABMIL on a fresh within-bag sample of each bag at every training step."""

    trains_on_samples = True

    def __init__(self, config: ABMIL.Config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        if self.sampling.train >= 100:
            raise ValueError(
                "method=abmil_sampl trains on within-bag samples: set sampling.train below 100 (e.g. sampling.train=25)"
            )
