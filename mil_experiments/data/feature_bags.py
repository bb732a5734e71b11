"""Feature bags: one bag per slide, read from a folder of feature files (HDF5 or `.pt`).

The folder holds `<slide_id>.h5` (or `.hdf5`, `.pt`; CLAM's `h5_files/`, `pt_files/` too),
a labels CSV and, unless k-fold splits are generated, a splits CSV (see
`mil_experiments.data.slide_splits`). The feature dimension is read from the files. With
several magnifications, each bag has one level per magnification (`Bag.levels`), lowest first.

Every file is read and checked once at setup. A missing or unreadable file, one with no
features, with NaN or infinite values, or with a dimension unlike the others is an error
naming it; with `skip_invalid=true` it is skipped with a warning instead, and listed in
`skipped` (slide, file, reason) so that the run can report how many were left out.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mil_experiments.bag import Bag, LevelLayout
from mil_experiments.data.datamodule import BagDataModule
from mil_experiments.data.feature_files import SlideFeatures, find_feature_file, read_feature_file
from mil_experiments.data.slide_splits import (
    SPLIT_RULES,
    SPLITS,
    VAL_ROUNDINGS,
    kfold_splits,
    protocol_split,
    read_labels,
    read_patients,
    read_splits,
    sets_of,
)
from mil_experiments.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def slide_to_bag(slide_id: str, label: int, features: SlideFeatures, instance_label_threshold: float) -> Bag:
    """A `Bag` from one slide's features; several magnifications become levels, lowest first."""
    mags = features.magnifications

    def rows(per_magnification: dict, dtype=None) -> torch.Tensor | None:
        if any(per_magnification.get(m) is None for m in mags):
            return None
        parts = [torch.from_numpy(np.ascontiguousarray(per_magnification[m])) for m in mags]
        joined = torch.cat(parts)  # (N_total, ...)
        return joined if dtype is None else joined.to(dtype)

    tumour = {m: (t >= instance_label_threshold).astype(np.int64) for m, t in features.tumour_fraction.items()}
    coords = {m: c for m, c in features.coords.items() if c is not None and np.ndim(c) == 2 and np.shape(c)[1] == 2}
    instances = rows(features.features)  # (N_total, D)
    return Bag(
        instances=instances,
        label=torch.tensor(label, dtype=torch.long),
        bag_id=slide_id,
        instance_labels=rows(tumour),
        instance_ids=torch.arange(instances.shape[0]),
        coords=rows(coords),
        magnification=mags[0] if len(mags) == 1 else None,
        levels=LevelLayout(tuple(mags), tuple(features.features[m].shape[0] for m in mags)) if len(mags) > 1 else None,
    )


class FeatureBagDataset(Dataset):
    """Bags of pre-extracted features; kept in memory, or re-read from disk per item."""

    def __init__(self, entries: list[tuple[str, Path, int]], magnifications: list[float] | None, threshold: float, cache: dict[str, Bag] | None) -> None:
        self.entries = entries
        self.magnifications = magnifications
        self.threshold = threshold
        self.cache = cache

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Bag:
        slide_id, path, label = self.entries[index]
        if self.cache is not None:
            return self.cache[slide_id]
        return slide_to_bag(slide_id, label, read_feature_file(path, self.magnifications), self.threshold)

    @property
    def labels(self) -> list[int]:
        """Bag labels in dataset order."""
        return [label for _, _, label in self.entries]


class FeatureBagsDataModule(BagDataModule):
    """Bags of pre-extracted slide features; see the module docstring."""

    @dataclass
    class Config(BagDataModule.Config):
        name: str = "feature_bags"
        root: str = ""
        features_dir: str | None = None
        labels_csv: str = "labels.csv"
        label_column: str = "label"
        split: str = "csv"
        splits_csv: str = "splits.csv"
        num_folds: int = 5
        fold: int = 0
        val_fraction: float = 0.2
        split_seed: int = 0
        val_rounding: str = "floor"
        patient_column: str | None = None
        magnifications: list[float] | None = None
        preload: bool = True
        skip_invalid: bool = False
        instance_label_threshold: float = 0.5
        classes: list[str] | None = None

    def __init__(self, config: Config, seed: int) -> None:
        super().__init__(config, seed)
        c = config
        if not c.root:
            raise ConfigError("dataset.root is not set: give the folder of feature files (dataset.root=<dir>)")
        if c.split not in SPLIT_RULES:
            raise ConfigError(f"dataset.split={c.split!r}: choose one of {', '.join(SPLIT_RULES)}")
        if c.val_rounding not in VAL_ROUNDINGS:
            raise ConfigError(f"dataset.val_rounding={c.val_rounding!r}: choose one of {', '.join(VAL_ROUNDINGS)}")
        if c.patient_column and c.split not in ("mhim_c16", "mhim_tcga"):
            raise ConfigError(f"dataset.patient_column={c.patient_column}: folds by patient apply to split=mhim_c16|mhim_tcga"
                              f" (this run has split={c.split})")
        self.root = Path(c.root)
        self.features_dir = Path(c.features_dir) if c.features_dir else self.root
        if not self.features_dir.is_dir():
            key = "dataset.features_dir" if c.features_dir else "dataset.root"
            raise DataError(f"{key}={self.features_dir}: folder not found")
        self.skipped: list[dict] = []
        self.class_names: list[str] = []
        self._labels, self.class_names = read_labels(self._resolve(c.labels_csv), c.label_column, c.classes)
        self.num_classes = len(self.class_names)
        self.instance_shape: tuple[int, ...] = ()

    def _resolve(self, name: str) -> Path:
        """CSV paths are relative to `root` unless absolute."""
        path = Path(name)
        return path if path.is_absolute() else self.root / path

    def split_sets(self) -> dict[str, list[str]]:
        """The train / val / test slide ids of `dataset.split` (see `slide_splits`)."""
        c = self.config
        if c.split == "kfold":
            return sets_of(kfold_splits(self._labels, c.num_folds, c.fold, c.val_fraction, c.split_seed))
        if c.split in ("mhim_c16", "mhim_tcga"):
            patients = read_patients(self._resolve(c.labels_csv), c.patient_column, self._labels) if c.patient_column else None
            return protocol_split(c.split, self._labels, c.fold, c.split_seed, val_rounding=c.val_rounding, patients=patients)
        if c.split == "holdout":
            return protocol_split(c.split, self._labels, c.fold, c.split_seed)
        splits = read_splits(self._resolve(c.splits_csv))
        unknown = sorted(set(splits) - set(self._labels))
        if unknown:
            raise DataError(f"{self._resolve(c.splits_csv)}: {len(unknown)} slides have no label, e.g. {unknown[:3]}")
        if c.split == "csv_trainval":
            return protocol_split(c.split, self._labels, c.fold, c.split_seed, official=splits)
        return sets_of(splits)

    def build_splits(self) -> tuple[FeatureBagDataset, FeatureBagDataset, FeatureBagDataset]:
        c = self.config
        sets_of = self.split_sets()
        split_of = {s: split for split in SPLITS for s in sets_of[split]}
        loaded: dict[str, SlideFeatures] = {}
        paths: dict[str, Path] = {}
        for slide_id in sorted(split_of):
            try:
                path = find_feature_file(self.features_dir, slide_id)
                if path is None:
                    raise DataError(f"{self.features_dir}: no feature file for slide {slide_id} (.h5, .hdf5 or .pt)")
                loaded[slide_id] = read_feature_file(path, c.magnifications)
                paths[slide_id] = path
            except DataError as error:
                self._skip_or_raise(slide_id, error)
        self._check_dimensions(loaded)
        if not loaded:
            raise DataError(f"{self.features_dir}: no usable feature files")
        first = next(iter(loaded.values()))
        self.instance_shape = (first.feature_dim,)
        self.magnifications = first.magnifications
        self.level_layouts = {
            str(paths[s]): LevelLayout(tuple(f.magnifications), tuple(f.features[m].shape[0] for m in f.magnifications))
            for s, f in loaded.items() if len(f.magnifications) > 1
        }  # file -> its levels, for multi-level aggregators to check before training
        cache = {s: slide_to_bag(s, self._labels[s], f, c.instance_label_threshold) for s, f in loaded.items()} if c.preload else None
        sets = []
        for split in SPLITS:
            entries = [(s, paths[s], self._labels[s]) for s in sets_of[split] if s in loaded]
            if not entries:
                raise DataError(f"dataset: the {split} split is empty (slides: { {k: len(v) for k, v in sets_of.items()} })")
            self._check_classes(split, [label for _, _, label in entries])
            sets.append(FeatureBagDataset(entries, c.magnifications, c.instance_label_threshold, cache))
        self.used_split = {split: [s for s, _, _ in d.entries] for split, d in zip(SPLITS, sets, strict=True)}
        if self.skipped:
            log.warning("feature_bags: skipped %d slides with invalid feature files", len(self.skipped))
        return tuple(sets)

    def _check_classes(self, split: str, labels: list[int]) -> None:
        """A training split needs every class; an evaluation split without one is warned about."""
        missing = sorted(set(range(self.num_classes)) - set(labels))
        if not missing:
            return
        names = [self.class_names[i] for i in missing]
        where = f"{self._resolve(self.config.labels_csv)}: the {split} split ({len(labels)} slides)"
        if split == "train":
            raise DataError(f"{where} has no slide of class {names}; a classifier cannot learn them")
        log.warning("%s has no slide of class %s: its AUC is undefined and reported as null", where, names)

    def _skip_or_raise(self, slide_id: str, error: DataError) -> None:
        if not self.config.skip_invalid:
            raise error
        log.warning("skipping slide %s: %s", slide_id, error)
        self.skipped.append({"slide_id": slide_id, "reason": str(error)})

    def _check_dimensions(self, loaded: dict[str, SlideFeatures]) -> None:
        """Every file must have the feature dimension (and magnifications) of the majority."""
        if not loaded:
            return
        signature = {s: (f.feature_dim, tuple(f.magnifications)) for s, f in loaded.items()}
        common, _ = Counter(signature.values()).most_common(1)[0]
        for slide_id, sig in signature.items():
            if sig != common:
                error = DataError(
                    f"{loaded[slide_id].path}: features of dimension {sig[0]} at magnifications {list(sig[1])};"
                    f" the other files have dimension {common[0]} at {list(common[1])}"
                )
                self._skip_or_raise(slide_id, error)
                del loaded[slide_id]
