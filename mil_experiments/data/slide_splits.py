"""Slide-level tables: the labels CSV, the splits CSV and seeded stratified k-fold splits.

Labels CSV: a header with `slide_id` and a label column (`label` unless configured);
labels are integers 0..C-1, or text labels from a declared class list (their index in
it); anything else is an error naming the row. The files may start with a UTF-8
byte-order mark (as Excel saves them).
Splits CSV, either layout:
- long: `slide_id, split` with split in {train, val, test};
- wide (ZoomMIL, CLAM): columns `train`, `val`, `test`, each listing slide ids (an extra
  unnamed index column, as CLAM writes, is ignored).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from mil_experiments.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")


def read_labels(
    path: str | Path, label_column: str = "label", classes: list[str] | None = None
) -> tuple[dict[str, int], list[str]]:
    """Slide id -> class index, and the class names (index order).

    Args:
        path: the labels CSV.
        label_column: the column holding the labels.
        classes: declared class names; text labels are their index in this list. Without
            it, labels must be integers 0..C-1 (a typo such as `l` among 0/1 is an error,
            not a third class).
    """
    path = Path(path)
    rows = _read_csv(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    for column in ("slide_id", label_column):
        if column not in rows[0]:
            raise DataError(f"{path}: no '{column}' column (columns: {list(rows[0])})")
    index = {str(name): i for i, name in enumerate(classes)} if classes else None
    labels: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        slide_id, label = (row["slide_id"] or "").strip(), (row[label_column] or "").strip()
        if not slide_id or not label:
            raise DataError(f"{path}:{line}: empty slide_id or {label_column}")
        if slide_id in labels:
            raise DataError(f"{path}:{line}: slide_id {slide_id!r} appears twice")
        if index is not None:
            if label not in index:
                raise DataError(f"{path}:{line}: slide {slide_id}: label {label!r} is not one of dataset.classes={list(index)}")
            labels[slide_id] = index[label]
        elif _is_int(label):
            labels[slide_id] = int(label)
        else:
            raise DataError(
                f"{path}:{line}: slide {slide_id}: label {label!r} is not an integer;"
                " declare text classes with dataset.classes=[name0,name1,...]"
            )
    if index is not None:
        return labels, list(index)
    found = sorted(set(labels.values()))
    if found != list(range(len(found))):
        raise DataError(f"{path}: integer labels must be 0..C-1; found {found}")
    return labels, [str(i) for i in found]


def read_patients(path: str | Path, column: str, labels: dict[str, int]) -> dict[str, str]:
    """Slide id -> patient id from the labels CSV's `column`; every patient's slides must share one label."""
    path = Path(path)
    rows = _read_csv(path)
    if rows and column not in rows[0]:
        raise DataError(f"{path}: no '{column}' column for dataset.patient_column (columns: {list(rows[0])})")
    patients: dict[str, str] = {}
    label_of: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        slide_id, patient = (row["slide_id"] or "").strip(), (row[column] or "").strip()
        if not patient:
            raise DataError(f"{path}:{line}: slide {slide_id}: empty {column}")
        if label_of.setdefault(patient, labels[slide_id]) != labels[slide_id]:
            raise DataError(f"{path}:{line}: patient {patient!r} has slides of two classes; folds by patient need one")
        patients[slide_id] = patient
    return patients


def read_splits(path: str | Path) -> dict[str, str]:
    """Slide id -> "train" | "val" | "test", from either CSV layout."""
    path = Path(path)
    rows = _read_csv(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    columns = list(rows[0])
    result: dict[str, str] = {}

    def assign(slide_id: str, split: str, line: int) -> None:
        if split not in SPLITS:
            raise DataError(f"{path}:{line}: split {split!r} is not one of {', '.join(SPLITS)}")
        if slide_id in result and result[slide_id] != split:
            raise DataError(f"{path}:{line}: slide {slide_id!r} is in both {result[slide_id]} and {split}")
        result[slide_id] = split

    if "slide_id" in columns and "split" in columns:
        for line, row in enumerate(rows, start=2):
            assign((row["slide_id"] or "").strip(), (row["split"] or "").strip(), line)
    elif all(s in columns for s in SPLITS):
        for line, row in enumerate(rows, start=2):
            for split in SPLITS:
                slide_id = (row[split] or "").strip()
                if slide_id:
                    assign(slide_id, split, line)
    else:
        raise DataError(f"{path}: expected columns slide_id,split or train,val,test; found {columns}")
    return result


def kfold_splits(labels: dict[str, int], num_folds: int, fold: int, val_fraction: float, seed: int) -> dict[str, str]:
    """Stratified k-fold: fold `fold` is the test set; a stratified `val_fraction` of the rest
    is the validation set. Deterministic in `seed`, independent of the run's seed."""
    if num_folds < 2:
        raise ConfigError(f"dataset.num_folds={num_folds}: must be >= 2")
    if not 0 <= fold < num_folds:
        raise ConfigError(f"dataset.fold={fold}: must be in 0..{num_folds - 1}")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"dataset.val_fraction={val_fraction}: must be in [0, 1)")
    rng = np.random.default_rng(seed)
    result: dict[str, str] = {}
    ids = sorted(labels)
    for label in sorted(set(labels.values())):
        members = [s for s in ids if labels[s] == label]
        members = [members[i] for i in rng.permutation(len(members))]
        # deal round-robin so fold sizes differ by at most one within each class
        rest = []
        for position, slide_id in enumerate(members):
            if position % num_folds == fold:
                result[slide_id] = "test"
            else:
                rest.append(slide_id)
        n_val = round(len(rest) * val_fraction)
        for position, slide_id in enumerate(rest):
            result[slide_id] = "val" if position < n_val else "train"
    return result


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: Excel's byte-order mark
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: cannot be read as CSV: {error}") from error


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


# --- the papers' split protocols ---------------------------------------------------------
SPLIT_RULES = ("csv", "kfold", "mhim_c16", "mhim_tcga", "holdout", "csv_trainval")
MHIM_C16_FOLDS = 3  # MHIM v1 `cv_fold` on CAMELYON16, val_ratio 0: validation = the test fold
MHIM_TCGA_FOLDS = 4  # MHIM v1 README recipe for TCGA-NSCLC: cv_fold 4, val_ratio 0.13
MHIM_TCGA_VAL_FRACTION = 0.13
HOLDOUT_FRACTIONS = (0.7, 0.1, 0.2)  # ZoomMIL: train / val / test, stratified
TRAINVAL_VAL_FRACTION = 0.1  # ZoomMIL on CAMELYON16: 10% of the official train set for validation


def _shuffled(ids: list[str], rng: np.random.Generator) -> list[str]:
    return [ids[i] for i in rng.permutation(len(ids))]


def stratified_folds(labels: dict[str, int], num_folds: int, seed: int) -> list[list[str]]:
    """MHIM's cross-validation: the slides shuffled with `seed`, then `StratifiedKFold` (no
    further shuffle) cuts them into `num_folds` label-stratified folds (test sets)."""
    from sklearn.model_selection import StratifiedKFold

    ids = _shuffled(sorted(labels), np.random.default_rng(seed))
    y = [labels[s] for s in ids]
    smallest = min(np.bincount(y)[np.unique(y)])
    if smallest < num_folds:
        raise DataError(f"labels: the smallest class has {smallest} slides, fewer than the {num_folds} folds")
    return [[ids[i] for i in test] for _, test in StratifiedKFold(n_splits=num_folds).split(ids, y)]


VAL_ROUNDINGS = ("floor", "round")


def stratified_share(ids: list[str], labels: dict[str, int], fraction: float, rng: np.random.Generator,
                     rounding: str = "round") -> tuple[list[str], list[str]]:
    """Split `ids` into (rest, share): round (or floor) of fraction * n_c slides of each class c, drawn with `rng`."""
    share: list[str] = []
    for label in sorted({labels[s] for s in ids}):
        members = _shuffled(sorted(s for s in ids if labels[s] == label), rng)
        count = int(len(members) * fraction) if rounding == "floor" else round(len(members) * fraction)
        share += members[:count]
    chosen = set(share)
    return [s for s in ids if s not in chosen], share


def protocol_split(
    rule: str, labels: dict[str, int], fold: int, seed: int, official: dict[str, str] | None = None,
    val_rounding: str = "floor", patients: dict[str, str] | None = None,
) -> dict[str, list[str]]:
    """The train / val / test slide lists of one of the papers' protocols (sorted ids).

    - `mhim_c16`: 3 stratified folds (`stratified_folds`); fold `fold` is the test set and
      also the validation set (MHIM v1 with val_ratio 0; its best-AUC model is picked on it).
    - `mhim_tcga`: 4 stratified folds; a label-balanced 13% of the training folds
      (v1's int(0.13 n_c) per class; `val_rounding="round"`: round(0.13 n_c)) is the
      validation set.
    - with `patients` (slide -> patient), both MHIM rules cut the folds and the validation
      share over patients (v1 on TCGA: its label.csv lists patients, each expanded to its
      slides), so one patient's slides never straddle train and test.
    - `holdout`: ZoomMIL's stratified 70 / 10 / 20 train / val / test (per class: round(0.2 n_c)
      test, round(0.1 n_c) val, the rest train); one fold only.
    - `csv_trainval`: the official test set of the splits CSV; its train (and val) slides are
      pooled and 10% of each class becomes the validation set (ZoomMIL on CAMELYON16).

    Deterministic in `seed` (`dataset.split_seed`), independent of the run's seed.
    """
    rng = np.random.default_rng(seed)
    if rule in ("mhim_c16", "mhim_tcga"):
        if val_rounding not in VAL_ROUNDINGS:
            raise ConfigError(f"dataset.val_rounding={val_rounding!r}: choose one of {VAL_ROUNDINGS}")
        units = labels if patients is None else {patients[s]: label for s, label in labels.items()}  # slide or patient -> label
        folds = stratified_folds(units, MHIM_C16_FOLDS if rule == "mhim_c16" else MHIM_TCGA_FOLDS, seed)
        if not 0 <= fold < len(folds):
            raise ConfigError(f"dataset.fold={fold}: split={rule} has folds 0..{len(folds) - 1}")
        test = folds[fold]
        train = [u for i, f in enumerate(folds) if i != fold for u in f]
        val = test
        if rule == "mhim_tcga":
            train, val = stratified_share(train, units, MHIM_TCGA_VAL_FRACTION, rng, val_rounding)
        if patients is not None:  # patients -> their slides
            members = {split: set(ids) for split, ids in (("train", train), ("val", val), ("test", test))}
            train, val, test = ([s for s in labels if patients[s] in members[split]] for split in ("train", "val", "test"))
        return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}
    if fold != 0:
        raise ConfigError(f"dataset.fold={fold}: split={rule} has one fold (0); vary dataset.split_seed instead")
    if rule == "holdout":
        rest, test = stratified_share(sorted(labels), labels, HOLDOUT_FRACTIONS[2], rng)
        train, val = stratified_share(rest, labels, HOLDOUT_FRACTIONS[1] / (1 - HOLDOUT_FRACTIONS[2]), rng)
        return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}
    if rule == "csv_trainval":
        assert official is not None
        test = [s for s, split in official.items() if split == "test"]
        pool = sorted(s for s, split in official.items() if split != "test")
        train, val = stratified_share(pool, labels, TRAINVAL_VAL_FRACTION, rng)
        return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}
    raise ConfigError(f"dataset.split={rule!r}: choose one of {SPLIT_RULES}")


def sets_of(assignment: dict[str, str]) -> dict[str, list[str]]:
    """slide id -> split  =>  split -> its sorted slide ids (every split of `SPLITS`, maybe empty)."""
    return {split: sorted(s for s, v in assignment.items() if v == split) for split in SPLITS}


def write_split_table(path: Path, sets: dict[str, list[str]]) -> None:
    """The split a run used, as `slide_id,split` rows (a slide used twice, as MHIM's C16 test
    fold is for validation too, has two rows)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "split"])
        for split in SPLITS:
            writer.writerows((s, split) for s in sets[split])
