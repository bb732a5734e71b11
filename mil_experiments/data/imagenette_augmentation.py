"""The Imagenette-bags augmentation of the within-bag sampling paper, in albumentations 2.

The original (`MIDA-group/SampledABMIL`, `Create_IMAGENETTE_bags_dataset.ipynb`,
albumentations 0.4.6) runs one `Compose` on every bag instance, once, when the bag images
are written to disk, so an instance's augmentation is fixed across epochs. Its steps:

    Resize 112x112 (bilinear) -> Rotate +-25 (p=1) -> GaussNoise var 2..5 (p=0.1)
    -> HorizontalFlip (p=0.5) -> Blur 3..5 (p=0.05) -> RandomBrightnessContrast (p=0.8)
    -> MotionBlur 3 (p=0.05) -> RGBShift +-20 (p=0.9) -> RandomFog 0.3..0.4, alpha 0.08 (p=0.05)

Here the deterministic first step (`build_resize`) runs once per image when the image pool
is built, and the random rest (`build_augmentation`) runs when a bag is loaded, seeded per
bag instance by `FixedAugmentation`, so that the same instance always gets the same
augmentation without writing images. Every parameter is carried over with its meaning and
probability; the comments note where the 2.x API names it differently.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def build_resize(size: int) -> A.Resize:
    """The original's first step: resize to size x size, bilinear (cv2.INTER_LINEAR = 1), no crop."""
    return A.Resize(height=size, width=size, interpolation=cv2.INTER_LINEAR, p=1.0)


def build_augmentation() -> A.Compose:
    """The original's random steps (everything after Resize), with the published probabilities."""
    return A.Compose(
        [
            # 0.4.6 Rotate defaults to border_mode=BORDER_REFLECT_101; 2.x to BORDER_CONSTANT, so set it.
            A.Rotate(limit=25, interpolation=cv2.INTER_LINEAR, border_mode=cv2.BORDER_REFLECT_101, p=1.0),
            # 0.4.6 var_limit=(2, 5) is a variance in uint8 units, sigma = sqrt(var); 2.x takes the standard
            # deviation as a fraction of 255: sigma in [sqrt(2), sqrt(5)] / 255. (0.4.6 drew var uniformly,
            # 2.x draws sigma uniformly: the same range, a slightly different spread within it.)
            A.GaussNoise(
                std_range=(np.sqrt(2.0) / 255, np.sqrt(5.0) / 255), mean_range=(0.0, 0.0), per_channel=True, p=0.1
            ),
            A.HorizontalFlip(p=0.5),
            # 0.4.6 blur_limit=5 means odd kernels in (3, 5).
            A.Blur(blur_limit=(3, 5), p=0.05),
            # 0.4.6 defaults, unchanged in 2.x: brightness and contrast +-0.2, brightness by max.
            A.RandomBrightnessContrast(
                brightness_limit=(-0.2, 0.2), contrast_limit=(-0.2, 0.2), brightness_by_max=True, p=0.8
            ),
            # 0.4.6 drew a line between two random kernel points; 2.x parameterises the line by angle and
            # direction: any angle, any direction and shifted kernels allowed are the nearest match.
            A.MotionBlur(
                blur_limit=(3, 3), allow_shifted=True, angle_range=(0, 360), direction_range=(-1.0, 1.0), p=0.05
            ),
            # Shifts in uint8 units, as in 0.4.6.
            A.RGBShift(r_shift_limit=(-20, 20), g_shift_limit=(-20, 20), b_shift_limit=(-20, 20), p=0.9),
            # 0.4.6 fog_coef_lower=0.3, fog_coef_upper=0.4 is 2.x fog_coef_range=(0.3, 0.4).
            A.RandomFog(fog_coef_range=(0.3, 0.4), alpha_coef=0.08, p=0.05),
        ]
    )


def instance_seed(dataset_seed: int, split: str, bag_index: int, position: int) -> int:
    """The seed of one bag instance's augmentation, from (dataset seed, split, bag index, position)."""
    sequence = np.random.SeedSequence([dataset_seed, SPLIT_CODES[split], bag_index, position])
    return int(sequence.generate_state(1, dtype=np.uint32)[0])


class FixedAugmentation:
    """Augments each image with its own seed, so an instance's augmentation never changes.

    The seed drives one numpy and one Python generator that all steps of the `Compose`
    share and draw from in turn. (`Compose.set_random_seed` would instead give every step
    a generator with the same seed, so that every step's "apply?" draw is the same number
    and the probabilities are no longer independent.)
    """

    def __init__(self) -> None:
        self.compose = build_augmentation()

    def __call__(self, images: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        """Augment a stack of images.

        Args:
            images: (N, H, W, 3) uint8 RGB images.
            seeds: N seeds, one per image (see `instance_seed`).

        Returns:
            (N, H, W, 3) uint8 augmented images.
        """
        if len(seeds) != len(images):
            raise ValueError(f"got {len(images)} images but {len(seeds)} seeds")
        out = np.empty_like(images)  # (N, H, W, 3)
        for i, (image, seed) in enumerate(zip(images, seeds, strict=True)):
            self.compose.set_random_state(np.random.default_rng(seed), random.Random(seed))
            out[i] = self.compose(image=image)["image"]  # (H, W, 3)
        return out
