"""Settings of raw-slide inference that are read before any model is built (no torch import here)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ExtractOverrides:
    """`extract.*` of conf/predict.yaml: extraction settings that replace the stored ones (null: keep)."""

    reader: str | None = None
    magnifications: list[float] | None = None
    tile_size: int | None = None
    base_magnification: float | None = None
    tissue: dict = field(default_factory=dict)
    encoder: dict = field(default_factory=dict)
