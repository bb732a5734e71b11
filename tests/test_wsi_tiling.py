"""Tissue detection and aligned multi-magnification tiling, checked against the generator's
ground truth (its pixels and tumour masks) with both readers."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from mil_experiments.data.wsi.masks import read_tumour_mask, tumour_mask_path
from mil_experiments.data.wsi.readers import open_slide
from mil_experiments.data.wsi.synthetic import (
    CohortConfig,
    SyntheticSlideConfig,
    generate_slide,
    make_cohort,
    slide_rng,
)
from mil_experiments.data.wsi.tiling import (
    check_magnifications,
    dfs_offsets,
    magnification_key,
    mask_fraction_per_tile,
    plan_tiling,
    read_tile_block,
    tile_slide,
)
from mil_experiments.data.wsi.tissue import TissueConfig, otsu_threshold, tissue_mask
from mil_experiments.errors import ConfigError, DataError

MAGS = [5.0, 10.0, 20.0]
TILE = 32  # pixels at every magnification: a 5x tile covers 128 level-0 pixels


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiling_cohort")
    slide = SyntheticSlideConfig(
        width=640, height=512, pyramid_levels=3, tiff_tile=64, compression="deflate",
        large_tumour_radius=[70.0, 90.0], small_tumour_radius=[15.0, 25.0], tumour_regions=[1, 2],
        lymphoid_aggregates=[0, 0], mask_downsample=4,
    )
    cfg = CohortConfig(num_slides=2, seed=7, num_workers=1, positive_fraction=0.5, slide=slide)
    summary = make_cohort(root, cfg)
    positive = next(e for e in summary["slides"] if e["label"] == 1)
    truth = generate_slide(slide_rng(cfg.seed, positive["index"]), True, slide)
    return root, positive["slide_id"], truth


def test_dfs_offsets_order():
    assert dfs_offsets(0).tolist() == [[0, 0]]
    assert dfs_offsets(1).tolist() == [[0, 0], [1, 0], [0, 1], [1, 1]]
    two = dfs_offsets(2)
    assert two[:4].tolist() == [[0, 0], [1, 0], [0, 1], [1, 1]], "first child's own children come first"
    assert two[4:8].tolist() == [[2, 0], [3, 0], [2, 1], [3, 1]]
    assert sorted(map(tuple, dfs_offsets(3).tolist())) == [(x, y) for x in range(8) for y in range(8)]


def test_magnification_names_and_checks():
    assert [magnification_key(m) for m in (1.25, 2.5, 5, 10, 20)] == ["1.25x", "2.5x", "5.0x", "10.0x", "20.0x"]
    assert check_magnifications([10, 1.25, 2.5]) == (1.25, 2.5, 10.0)
    with pytest.raises(ConfigError, match="not 5.0 times a power of two"):
        check_magnifications([5, 15])
    with pytest.raises(ConfigError, match="above"):
        plan_tiling((100, 100), 20.0, [40.0], 32, np.ones((1, 1), bool))


@pytest.mark.parametrize("reader", ["tiffslide", "openslide"])
def test_aligned_depth_first_tiling_against_ground_truth(cohort, reader):
    root, slide_id, truth = cohort
    with open_slide(root / "slides" / f"{slide_id}.tiff", reader) as slide:
        tiling = tile_slide(slide, MAGS, TILE, TissueConfig(downsample=4, sigma=1.0))
        n_low = tiling.num_low_tiles
        assert 0 < n_low <= 5 * 4  # a 5 x 4 grid of 128-pixel tiles covers 640 x 512
        assert [len(tiling.coords[m]) for m in MAGS] == [n_low, 4 * n_low, 16 * n_low]
        assert tiling.tile_size_level0 == {5.0: 128.0, 10.0: 64.0, 20.0: 32.0}

        # each tile at m has exactly its 4 children at 2m, in (x0,y0),(x1,y0),(x0,y1),(x1,y1) order
        for m, child_m in ((5.0, 10.0), (10.0, 20.0)):
            half = tiling.tile_size_level0[child_m]
            parents, children = tiling.coords[m], tiling.coords[child_m]
            expected = parents[:, None, :] + np.array([[0, 0], [half, 0], [0, half], [half, half]])[None]
            np.testing.assert_array_equal(children.reshape(-1, 4, 2), expected)
        # the descendants of low tile i are contiguous at every magnification
        for i, (x, y) in enumerate(tiling.coords[5.0]):
            block = tiling.coords[20.0][tiling.descendants(i, 20.0)]
            assert ((block >= [x, y]) & (block < [x + 128, y + 128])).all()

        # pixels: 20x tiles are level-0 crops of the generated image (white outside it)
        padded = np.full((1024, 1024, 3), 255, np.uint8)
        padded[:512, :640] = truth.image
        for i in range(n_low):
            tiles20 = read_tile_block(slide, tiling, i, 20.0)
            for tile, (x, y) in zip(tiles20, tiling.coords[20.0][tiling.descendants(i, 20.0)], strict=True):
                np.testing.assert_array_equal(tile, padded[y : y + TILE, x : x + TILE])
            # a 10x tile is its four 20x children, downsampled (pyramid level 1)
            tiles10 = read_tile_block(slide, tiling, i, 10.0)
            mosaic = np.zeros((2 * TILE, 2 * TILE, 3), np.uint8)
            for k, (dx, dy) in enumerate(dfs_offsets(1)):
                mosaic[dy * TILE : (dy + 1) * TILE, dx * TILE : (dx + 1) * TILE] = tiles20[k]
            down = cv2.resize(mosaic, (TILE, TILE), interpolation=cv2.INTER_AREA)
            assert np.abs(down.astype(int) - tiles10[0].astype(int)).max() <= 2

        # ground-truth tumour: a parent's tumour fraction is the mean of its children's
        mask = read_tumour_mask(tumour_mask_path(root, slide_id))
        frac = {m: mask_fraction_per_tile(mask, slide.dimensions, tiling.coords[m], tiling.tile_size_level0[m]) for m in MAGS}
        np.testing.assert_allclose(frac[10.0], frac[20.0].reshape(-1, 4).mean(1), atol=1e-6)
        np.testing.assert_allclose(frac[5.0], frac[20.0].reshape(-1, 16).mean(1), atol=1e-6)
        assert frac[20.0].max() > 0.9, "the positive slide's tumour is found in its tiles"


def test_tissue_detection_keeps_tissue_and_drops_glass(cohort):
    root, slide_id, truth = cohort
    with open_slide(root / "slides" / f"{slide_id}.tiff") as slide:
        tiling = tile_slide(slide, [5.0], TILE, TissueConfig(downsample=4, sigma=1.0, min_tissue_fraction=0.5))
    true_fraction = mask_fraction_per_tile(truth.tissue[::4, ::4], (640, 512), tiling.coords[5.0], 128.0)
    assert (true_fraction > 0.3).all(), "kept tiles hold tissue"
    image = np.full((64, 64, 3), 243, np.uint8)
    image[16:48, 16:48] = (200, 120, 180)
    mask = tissue_mask(image, TissueConfig(sigma=0.5))
    assert mask[20:44, 20:44].all() and not mask[:8].any()
    assert 0.02 <= otsu_threshold(np.r_[np.full(100, 0.02), np.full(100, 0.5)]) < 0.5


def test_blank_slide_is_an_error_unless_asked_to_keep_all(tmp_path):
    import tifffile

    path = tmp_path / "blank.tiff"
    blank = np.full((256, 256, 3), 245, np.uint8)
    tifffile.imwrite(path, blank, tile=(64, 64), photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with open_slide(path) as slide:
        with pytest.raises(DataError, match="blank.tiff: no tile at 5.0x has tissue"):
            tile_slide(slide, [5.0, 10.0], 16, TissueConfig(downsample=4))
        tiling = tile_slide(slide, [5.0, 10.0], 16, TissueConfig(downsample=4, keep_all_if_none=True))
        assert tiling.num_low_tiles == 16 and len(tiling.coords[10.0]) == 64
