"""Feature extraction: tiny slides -> small random encoder -> HDF5 files that line up with
the tiling, resume without redoing work, and refuse to mix settings."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from mil_experiments.data.feature_files import read_feature_file
from mil_experiments.data.wsi.extraction import (
    ExtractionConfig,
    ExtractionEncoderConfig,
    build_extraction_encoder,
    extractor_name,
    run_extraction,
)
from mil_experiments.data.wsi.synthetic import CohortConfig, SyntheticSlideConfig, make_cohort
from mil_experiments.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract_cohort")
    slide = SyntheticSlideConfig(
        width=512, height=512, pyramid_levels=3, tiff_tile=64, large_tumour_radius=[60.0, 90.0],
        small_tumour_radius=[15.0, 25.0], lymphoid_aggregates=[0, 1], lymphoid_radius=[15.0, 30.0], mask_downsample=4,
    )
    make_cohort(root, CohortConfig(num_slides=6, seed=3, num_workers=1, split_fractions=[0.34, 0.33, 0.33], slide=slide))
    return root


def extraction_config(root, out, **overrides) -> ExtractionConfig:
    params = dict(
        slides_dir=str(root / "slides"), out_dir=str(out), labels_csv=str(root / "labels.csv"),
        splits_csv=str(root / "splits.csv"), masks_dir=str(root / "masks"), magnifications=[5.0, 10.0, 20.0],
        tile_size=32, tissue={"downsample": 4, "sigma": 1.0}, batch_size=16, progress=False,
        encoder={"name": "lenet", "input_size": None, "feature_dim": 16, "seed": 0},
    )
    params.update(overrides)
    return ExtractionConfig(**params)


def test_extract_writes_aligned_feature_files_and_resumes(cohort, tmp_path):
    out = tmp_path / "features"
    summary = run_extraction(extraction_config(cohort, out))
    assert summary["extracted"] == 6 and summary["skipped_existing"] == 0 and summary["tiles"] > 0
    assert (out / "labels.csv").is_file() and (out / "splits.csv").is_file() and (out / "extraction.json").is_file()
    features = read_feature_file(out / "slide_000.h5")
    assert features.layout == "mil_experiments" and features.magnifications == [5.0, 10.0, 20.0]
    n_low = features.features[5.0].shape[0]
    assert [features.features[m].shape for m in (5.0, 10.0, 20.0)] == [(n_low, 16), (4 * n_low, 16), (16 * n_low, 16)]
    assert features.features[20.0].dtype == np.float32
    np.testing.assert_array_equal(features.coords[20.0][:4] - features.coords[10.0][0], [[0, 0], [32, 0], [0, 32], [32, 32]])
    with h5py.File(out / "slide_000.h5") as f:
        assert f.attrs["extractor"] == "lenet[random,seed=0]"
        assert f.attrs["tile_size"] == 32 and list(f.attrs["magnifications"]) == [5.0, 10.0, 20.0]
        assert f.attrs["version"] and f.attrs["base_magnification"] == 20.0
        assert sorted(f.keys()) == ["10.0x", "20.0x", "5.0x"]
    # ground truth follows the tiles: some tumour at 20x in positive slides
    positives = [read_feature_file(p) for p in sorted(out.glob("*.h5"))]
    assert max(float(p.tumour_fraction[20.0].max()) for p in positives) > 0.9

    # resumable: a second run skips every slide; a deleted file is redone identically
    record = (out / "extraction.json").read_text()
    again = run_extraction(extraction_config(cohort, out))
    assert again["extracted"] == 0 and again["skipped_existing"] == 6
    assert (out / "extraction.json").read_text() == record  # the record of the run that extracted is kept
    before = features.features[20.0].copy()
    (out / "slide_000.h5").unlink()
    redo = run_extraction(extraction_config(cohort, out))
    assert redo["extracted"] == 1
    np.testing.assert_allclose(read_feature_file(out / "slide_000.h5").features[20.0], before, rtol=1e-5, atol=1e-6)

    # other settings on the same folder: an error, not a silent mix
    with pytest.raises(DataError, match="exists with tile_size=32, not 64"):
        run_extraction(extraction_config(cohort, out, tile_size=64))


def test_tiles_are_encoded_on_the_configured_threads_and_the_setting_is_given_back(cohort, tmp_path, monkeypatch):
    # the benchmark cohorts extract on one thread so that their features do not depend on the core count
    from mil_experiments.data.wsi import extraction

    seen: set[int] = set()
    encode = extraction.TileEncoder.__call__

    def recording(self, tiles):
        seen.add(torch.get_num_threads())
        return encode(self, tiles)

    monkeypatch.setattr(extraction.TileEncoder, "__call__", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        summary = run_extraction(extraction_config(cohort, tmp_path / "one", num_threads=1, limit=1))
        assert seen == {1} and torch.get_num_threads() == 2
        assert summary["torch_threads"] == 1 and json.loads((tmp_path / "one" / "extraction.json").read_text())["torch_threads"] == 1
        assert summary["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        seen.clear()
        run_extraction(extraction_config(cohort, tmp_path / "default", limit=1))
        assert seen == {2}  # null: the process's setting
    finally:
        torch.set_num_threads(before)


def test_single_magnification_uses_clam_names(cohort, tmp_path):
    out = tmp_path / "single"
    run_extraction(extraction_config(cohort, out, magnifications=[10.0], limit=1))
    with h5py.File(out / "slide_000.h5") as f:
        assert {"features", "coords"} <= set(f.keys())
        assert f["coords"].attrs["patch_size"] == 64
    assert read_feature_file(out / "slide_000.h5").magnifications == [10.0]


def test_resnet50_trunk_is_1024d_and_offline_weights_fail_clearly(monkeypatch):
    encoder = build_extraction_encoder(ExtractionEncoderConfig(name="resnet50_trunk", pretrained=False, input_size=64), 64)
    with torch.no_grad():
        assert encoder(torch.randn(2, 3, 64, 64)).shape == (2, 1024)
    assert extractor_name(ExtractionEncoderConfig(pretrained=False, seed=3)) == "resnet50_trunk[random,seed=3]"

    from torchvision.models import ResNet50_Weights

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(ResNet50_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(ConfigError, match="ImageNet weights could not be loaded.*pretrained=false"):
        build_extraction_encoder(ExtractionEncoderConfig(name="resnet50_trunk", pretrained=True), 224)


def test_bad_inputs_are_named(tmp_path, cohort):
    with pytest.raises(DataError, match="slides_dir=.*nowhere: folder not found"):
        run_extraction(extraction_config(cohort, tmp_path / "o", slides_dir=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match="encoder.name='vit'"):
        run_extraction(extraction_config(cohort, tmp_path / "o2", encoder={"name": "vit", "input_size": None}))
