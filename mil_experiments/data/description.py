"""`DataDescription`: what a method and its models need to know about the data."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataDescription:
    """The data a run trains on, as the method and the models see it.

    Attributes:
        num_classes: bag classes (2 = binary).
        instance_shape: shape of one instance, e.g. (1, 28, 28) images or (1024,) features.
        magnifications: the levels of every bag, lowest first; one entry for single-level
            bags (None where the magnification is not known).
        class_names: names of the classes, in label order, when the data has them.
    """

    num_classes: int
    instance_shape: tuple[int, ...]
    magnifications: tuple[float | None, ...] = (None,)
    class_names: tuple[str, ...] = ()

    @property
    def multi_level(self) -> bool:
        return len(self.magnifications) > 1
