"""Feature files: one file of tile features per slide, written and read with clear errors.

Layouts read (chosen from the file's content, not its name):

- `mil_experiments` multi-magnification HDF5: one group per magnification named like
  ZoomMIL's keys ("2.5x", "10.0x"), each with `features` (N_m, D) float32, `coords`
  (N_m, 2) level-0 (x, y) and optionally `tumour_fraction` (N_m,); rows in depth-first
  order (see `mil_experiments.data.wsi.tiling`).
- single-magnification HDF5 with CLAM's / TRIDENT's names: `features` (N, D) and `coords`
  (N, 2) at the root. This project writes this layout when it extracts one magnification.
- ZoomMIL's HDF5: `"{mag}x_patches"` (N_m, D) and `"{mag}x_coords"` (ZoomMIL's coords are
  grid indices, not level-0 pixels, so they are not returned).
- `.pt` (CLAM, slideflow): a (N, D) tensor, or a dict holding one under "features".

The writer adds the extractor's name, tile size, magnifications and project version as
file attributes, and writes to a temporary name first, so an interrupted extraction never
leaves a file that looks finished.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from mil_experiments.data.wsi.tiling import magnification_key
from mil_experiments.errors import DataError

FEATURE_EXTENSIONS = (".h5", ".hdf5", ".pt")
LAYOUT = "mil_experiments"
_GROUP = re.compile(r"^(\d+(?:\.\d+)?)x$")
_ZOOMMIL = re.compile(r"^(\d+(?:\.\d+)?)x_patches$")


@dataclass
class SlideFeatures:
    """The features of one slide, per magnification (ascending).

    Attributes:
        path: the file read.
        layout: "mil_experiments", "clam" (root `features`), "zoommil" or "pt".
        features: magnification -> (N_m, D) float32; the key is None when the file does
            not state its magnification (CLAM, `.pt`).
        coords: magnification -> (N_m, 2) level-0 (x, y), when the file has them.
        tumour_fraction: magnification -> (N_m,) ground-truth tumour fraction of each tile,
            when the file has it (synthetic slides).
        attrs: the file's root attributes.
    """

    path: Path
    layout: str
    features: dict[float | None, np.ndarray]
    coords: dict[float | None, np.ndarray] = field(default_factory=dict)
    tumour_fraction: dict[float | None, np.ndarray] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)

    @property
    def magnifications(self) -> list[float | None]:
        """Magnifications held, ascending (or [None])."""
        return list(self.features)

    @property
    def feature_dim(self) -> int:
        """Feature dimension D (the same at every magnification)."""
        return int(next(iter(self.features.values())).shape[1])


# --- writing --------------------------------------------------------------------------------
def write_feature_file(
    path: str | Path,
    features: dict[float, np.ndarray],
    coords: dict[float, np.ndarray],
    attrs: dict,
    tumour_fraction: dict[float, np.ndarray] | None = None,
    tile_size_level0: dict[float, float] | None = None,
) -> Path:
    """Write one slide's features; one magnification uses CLAM's root names.

    Args:
        path: destination (.h5).
        features: magnification -> (N_m, D) array.
        coords: magnification -> (N_m, 2) level-0 (x, y).
        attrs: root attributes (extractor, tile_size, version, ...); dicts and lists
            are stored as JSON strings.
        tumour_fraction: magnification -> (N_m,) ground-truth tumour fraction, optional.
        tile_size_level0: magnification -> tile side in level-0 pixels, stored on `coords`
            (as CLAM's `patch_size` and TRIDENT's `patch_size_level0`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    mags = sorted(features)
    with h5py.File(tmp, "w") as f:
        for key, value in attrs.items():
            f.attrs[key] = json.dumps(value) if isinstance(value, dict) else value
        f.attrs["layout"] = LAYOUT
        f.attrs["magnifications"] = np.asarray(mags, dtype=np.float64)
        single = len(mags) == 1
        if single:
            f.attrs["magnification"] = float(mags[0])
        for m in mags:
            group = f if single else f.create_group(magnification_key(m))
            feats = np.asarray(features[m], dtype=np.float32)  # (N_m, D)
            group.create_dataset("features", data=feats)
            ds = group.create_dataset("coords", data=np.asarray(coords[m], dtype=np.int64))  # (N_m, 2)
            ds.attrs["target_magnification"] = float(m)
            if tile_size_level0 is not None:
                ds.attrs["patch_size"] = int(round(tile_size_level0[m]))
                ds.attrs["patch_size_level0"] = int(round(tile_size_level0[m]))
            if tumour_fraction is not None:
                group.create_dataset("tumour_fraction", data=np.asarray(tumour_fraction[m], dtype=np.float32))
    os.replace(tmp, path)
    return path


# --- reading --------------------------------------------------------------------------------
def find_feature_file(folder: str | Path, slide_id: str) -> Path | None:
    """The feature file of `slide_id` in `folder` (also CLAM's `h5_files/`, `pt_files/`).

    HDF5 is preferred to `.pt` when both exist, as it carries coordinates.
    """
    folder = Path(folder)
    for candidate in (
        folder / f"{slide_id}.h5",
        folder / f"{slide_id}.hdf5",
        folder / "h5_files" / f"{slide_id}.h5",
        folder / f"{slide_id}.pt",
        folder / "pt_files" / f"{slide_id}.pt",
    ):
        if candidate.is_file():
            return candidate
    return None


def read_feature_file(path: str | Path, magnifications: list[float] | None = None) -> SlideFeatures:
    """Read and check one feature file.

    Args:
        path: an .h5 / .hdf5 / .pt file.
        magnifications: the magnifications to return (all when None).

    Raises:
        DataError: the file is missing, unreadable, holds no features, holds non-finite
            values, lacks a requested magnification, or its magnifications are not aligned
            (N_m must be N_low * 4^depth).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: feature file not found")
    if path.suffix == ".pt":
        result = _read_pt(path)
    elif path.suffix in (".h5", ".hdf5"):
        result = _read_h5(path, magnifications)
    else:
        raise DataError(f"{path}: unknown feature file type (expected {', '.join(FEATURE_EXTENSIONS)})")
    result = _select(result, magnifications)
    _check(result)
    return result


def _read_pt(path: Path) -> SlideFeatures:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise DataError(f"{path}: cannot be read by torch.load: {type(error).__name__}: {error}") from error
    coords = None
    if isinstance(obj, dict):
        if "features" not in obj:
            raise DataError(f"{path}: a dict without a 'features' entry (keys: {sorted(obj)[:8]})")
        coords = obj.get("coords")
        obj = obj["features"]
    if not isinstance(obj, torch.Tensor):
        raise DataError(f"{path}: holds a {type(obj).__name__}, not a feature tensor")
    features = _as_matrix(path, "features", obj.detach().to(torch.float32).numpy())
    result = SlideFeatures(path=path, layout="pt", features={None: features})
    if coords is not None:
        result.coords[None] = np.asarray(coords.numpy() if isinstance(coords, torch.Tensor) else coords)
    return result


def _only_wanted(available: dict[float, str], wanted: list[float] | None) -> dict[float, str]:
    """The magnifications to read: only the wanted ones (levels are read lazily), or all when one is missing."""
    if wanted is None:
        return available
    chosen = {m: key for m, key in available.items() if any(math.isclose(m, w, rel_tol=1e-6) for w in wanted)}
    return chosen if len(chosen) == len(wanted) else available  # a missing one: `_select` names what the file has


def _read_h5(path: Path, wanted: list[float] | None = None) -> SlideFeatures:
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
            groups = {float(_GROUP.match(k).group(1)): k for k in f.keys() if _GROUP.match(k) and isinstance(f[k], h5py.Group)}
            zoommil = {float(_ZOOMMIL.match(k).group(1)): k for k in f.keys() if _ZOOMMIL.match(k)}
            groups, zoommil = _only_wanted(groups, wanted), _only_wanted(zoommil, wanted)
            if groups:
                result = SlideFeatures(path=path, layout=LAYOUT, features={}, attrs=attrs)
                for m, key in sorted(groups.items()):
                    group = f[key]
                    if "features" not in group:
                        raise DataError(f"{path}: group '{key}' has no 'features' dataset")
                    result.features[m] = _as_matrix(path, f"{key}/features", group["features"][()])
                    if "coords" in group:
                        result.coords[m] = group["coords"][()]
                    if "tumour_fraction" in group:
                        result.tumour_fraction[m] = group["tumour_fraction"][()]
                return result
            if zoommil:
                result = SlideFeatures(path=path, layout="zoommil", features={}, attrs=attrs)
                for m, key in sorted(zoommil.items()):
                    result.features[m] = _as_matrix(path, key, f[key][()])
                return result
            if "features" in f:
                mag = attrs.get("magnification")
                if mag is None and "coords" in f:
                    mag = _attr_value(f["coords"].attrs.get("target_magnification"))
                key = float(mag) if mag is not None else None
                result = SlideFeatures(path=path, layout="clam", features={key: _as_matrix(path, "features", f["features"][()])}, attrs=attrs)
                if "coords" in f:
                    result.coords[key] = f["coords"][()]
                if "tumour_fraction" in f:
                    result.tumour_fraction[key] = f["tumour_fraction"][()]
                return result
            raise DataError(
                f"{path}: no features found (expected a 'features' dataset, '<mag>x' groups or '<mag>x_patches' datasets;"
                f" found {sorted(f.keys())[:8]})"
            )
    except DataError:
        raise
    except Exception as error:  # h5py raises OSError / KeyError / ValueError for broken files
        raise DataError(f"{path}: cannot be read as HDF5: {type(error).__name__}: {error}") from error


def _attr_value(value: object) -> object:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _as_matrix(path: Path, key: str, array: np.ndarray) -> np.ndarray:
    """(N, D) float32 from an array; (1, N, D) is squeezed, anything else is an error."""
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise DataError(f"{path}: '{key}' has shape {tuple(array.shape)}; expected (N, D) features")
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{path}: '{key}' has dtype {array.dtype}; expected floating-point features (image patches?)")
    return np.ascontiguousarray(array, dtype=np.float32)


def _select(result: SlideFeatures, magnifications: list[float] | None) -> SlideFeatures:
    if magnifications is None:
        return result
    held = [m for m in result.features if m is not None]
    if not held:
        raise DataError(
            f"{result.path}: the file does not state its magnification, so magnifications={list(magnifications)}"
            " cannot be checked; use dataset.magnifications=null"
        )
    chosen = {}
    for want in sorted(float(m) for m in magnifications):
        match = [m for m in held if math.isclose(m, want, rel_tol=1e-6)]
        if not match:
            raise DataError(f"{result.path}: no features at {want}x (the file holds {held})")
        chosen[want] = match[0]
    return SlideFeatures(
        path=result.path,
        layout=result.layout,
        features={w: result.features[m] for w, m in chosen.items()},
        coords={w: result.coords[m] for w, m in chosen.items() if m in result.coords},
        tumour_fraction={w: result.tumour_fraction[m] for w, m in chosen.items() if m in result.tumour_fraction},
        attrs=result.attrs,
    )


def _check(result: SlideFeatures) -> None:
    dims = set()
    for m, feats in result.features.items():
        where = f"{result.path}" + (f" at {m}x" if m is not None else "")
        if feats.shape[0] == 0:
            raise DataError(f"{where}: no features (0 rows)")
        if not np.isfinite(feats).all():
            bad = int((~np.isfinite(feats)).any(axis=1).sum())
            raise DataError(f"{where}: {bad} of {feats.shape[0]} feature rows hold NaN or infinity")
        dims.add(feats.shape[1])
        if m in result.coords and result.coords[m] is not None and len(result.coords[m]) != feats.shape[0]:
            raise DataError(f"{where}: {len(result.coords[m])} coords for {feats.shape[0]} feature rows")
    if len(dims) > 1:
        raise DataError(f"{result.path}: feature dimensions differ between magnifications: {sorted(dims)}")
    mags = [m for m in result.features if m is not None]
    if len(mags) > 1:
        low = mags[0]
        n_low = result.features[low].shape[0]
        for m in mags[1:]:
            expected = n_low * round((m / low) ** 2)
            if result.features[m].shape[0] != expected:
                raise DataError(
                    f"{result.path}: {result.features[m].shape[0]} rows at {m}x for {n_low} at {low}x;"
                    f" aligned tiling needs {expected}"
                )
