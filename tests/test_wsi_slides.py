"""Synthetic slides and the two slide readers: pyramid levels, microns per pixel, padding,
determinism, and clear errors."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from mil_experiments.data.wsi.masks import read_tumour_mask, tumour_mask_path
from mil_experiments.data.wsi.readers import base_magnification, open_slide
from mil_experiments.data.wsi.synthetic import (
    CohortConfig,
    SyntheticSlideConfig,
    cohort_plan,
    generate_slide,
    make_cohort,
    slide_rng,
)
from mil_experiments.errors import ConfigError, DataError

READERS = ["tiffslide", "openslide"]


def tiny_cohort_config(**slide) -> CohortConfig:
    """Six small lossless slides: fast to write, exact to compare."""
    params = dict(
        width=640, height=512, pyramid_levels=3, tiff_tile=64, compression="deflate",
        large_tumour_radius=[60.0, 90.0], small_tumour_radius=[15.0, 25.0], tumour_regions=[1, 2],
        lymphoid_aggregates=[0, 1], lymphoid_radius=[15.0, 30.0], mask_downsample=4,
    )
    params.update(slide)
    return CohortConfig(num_slides=6, seed=1, num_workers=1, split_fractions=[0.34, 0.33, 0.33], slide=SyntheticSlideConfig(**params))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    cfg = tiny_cohort_config()
    return root, cfg, make_cohort(root, cfg)


def test_cohort_files_labels_and_splits(cohort):
    root, cfg, summary = cohort
    with open(root / "labels.csv") as f:
        labels = {r["slide_id"]: int(r["label"]) for r in csv.DictReader(f)}
    with open(root / "splits.csv") as f:
        splits = {r["slide_id"]: r["split"] for r in csv.DictReader(f)}
    assert sorted(labels) == sorted(splits) == [f"slide_{i:03d}" for i in range(6)]
    assert sorted(labels.values()) == [0, 0, 0, 1, 1, 1]
    for split in ("train", "val", "test"):
        assert sorted(labels[s] for s in splits if splits[s] == split) == [0, 1], "stratified"
    for slide_id, label in labels.items():
        assert (root / "slides" / f"{slide_id}.tiff").is_file()
        mask = read_tumour_mask(tumour_mask_path(root, slide_id))
        assert mask.shape == (512 // 4, 640 // 4)
        assert mask.any() == bool(label), "positive slides, and only they, have tumour"
    assert summary["base_magnification"] == 20.0


@pytest.mark.parametrize("reader", READERS)
def test_both_readers_see_all_levels_and_mpp(cohort, reader):
    root, cfg, _ = cohort
    with open_slide(root / "slides" / "slide_000.tiff", reader) as slide:
        assert slide.dimensions == (640, 512)
        assert slide.level_count == 3
        assert slide.level_downsamples == pytest.approx([1.0, 2.0, 4.0])
        assert slide.level_dimensions == [(640, 512), (320, 256), (160, 128)]
        assert slide.mpp == pytest.approx(0.5)
        assert base_magnification(slide) == pytest.approx(20.0)
        assert base_magnification(slide, override=40.0) == 40.0


@pytest.mark.parametrize("reader", READERS)
def test_reads_match_the_generated_pixels(cohort, reader):
    root, cfg, summary = cohort
    entry = summary["slides"][1]
    truth = generate_slide(slide_rng(cfg.seed, entry["index"]), bool(entry["label"]), cfg.slide).image
    with open_slide(root / "slides" / f"{entry['slide_id']}.tiff", reader) as slide:
        region = slide.read_region((100, 60), 0, (200, 150))
        np.testing.assert_array_equal(region, truth[60:210, 100:300])
        # outside the slide: white padding, same shape
        edge = slide.read_region((600, 480), 0, (64, 64))
        np.testing.assert_array_equal(edge[:32, :40], truth[480:512, 600:640])
        assert (edge[32:] == 255).all() and (edge[:, 40:] == 255).all()
        assert (slide.read_region((-50, -50), 1, (10, 10)) == 255).all()
        thumb = slide.thumbnail(8.0)
        assert thumb.shape == (64, 80, 3)


def test_generation_is_determined_by_the_seed():
    cfg = tiny_cohort_config().slide
    a = generate_slide(slide_rng(3, 0), True, cfg)
    b = generate_slide(slide_rng(3, 0), True, cfg)
    c = generate_slide(slide_rng(4, 0), True, cfg)
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)
    assert cohort_plan(CohortConfig(num_slides=10, seed=5)) == cohort_plan(CohortConfig(num_slides=10, seed=5, num_workers=1))


def test_tumour_is_weak_at_low_and_plain_at_high_magnification():
    """Mean colour of tumour and normal tissue nearly agree; nuclei sizes do not."""
    import cv2

    cfg = SyntheticSlideConfig(width=1024, height=1024, large_tumour_radius=[250.0, 300.0], tumour_regions=[1, 1], lymphoid_aggregates=[0, 0])
    slide = generate_slide(slide_rng(0, 0), True, cfg)
    normal = slide.tissue & ~slide.tumour
    assert slide.tumour.sum() > 10_000 and normal.sum() > 10_000
    low = cv2.resize(slide.image, (128, 128), interpolation=cv2.INTER_AREA).astype(np.float32)  # 2.5x
    t_low = cv2.resize(slide.tumour.astype(np.uint8), (128, 128), interpolation=cv2.INTER_AREA) > 0
    n_low = cv2.resize(normal.astype(np.uint8), (128, 128), interpolation=cv2.INTER_AREA) > 0
    mean_gap = np.abs(low[t_low].mean(0) - low[n_low].mean(0)).max()
    assert mean_gap < 8, "tumour should not stand out by colour at low magnification"
    dark = slide.image.astype(np.float32).mean(axis=2) < 150
    assert dark[slide.tumour].mean() > 2 * dark[normal].mean(), "tumour nuclei are larger and denser"


def test_errors_name_the_file_and_reason(tmp_path):
    with pytest.raises(DataError, match="missing.tiff: slide file not found"):
        open_slide(tmp_path / "missing.tiff")
    junk = tmp_path / "junk.tiff"
    junk.write_bytes(b"not a tiff at all")
    for reader in READERS:
        with pytest.raises(DataError, match=f"junk.tiff: {reader} cannot open it"):
            open_slide(junk, reader)
    with pytest.raises(ConfigError, match="reader='pillow'"):
        open_slide(junk, "pillow")
    with pytest.raises(ConfigError, match="generator.slide.compression"):
        SyntheticSlideConfig(compression="lzw")
