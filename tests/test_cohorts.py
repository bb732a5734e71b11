"""Benchmark cohorts (conf/cohort/*.yaml): their properties, asserted from the generated masks."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from mil_experiments.data.wsi.cohorts import (
    BenchmarkCohortConfig,
    cohort_plan,
    generate_lesion_slide,
    make_benchmark_cohort,
)
from mil_experiments.data.wsi.masks import kinds_mask_path, read_kinds_mask, read_tumour_mask, tumour_mask_path
from mil_experiments.data.wsi.synthetic import slide_rng
from mil_experiments.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from make_cohorts import extraction_config, load_preset, thread_mismatch  # noqa: E402


def presentation(cfg: BenchmarkCohortConfig, name: str):
    return next((c, p) for c, spec in enumerate(cfg.classes) for p in spec.presentations if p.name == name)


def tile_means(mask: np.ndarray, tile: int) -> np.ndarray:
    """(tiles_y, tiles_x) share of True pixels of a (H, W) bool mask in every tile of side `tile`."""
    h, w = (mask.shape[0] // tile) * tile, (mask.shape[1] // tile) * tile
    return mask[:h, :w].reshape(h // tile, tile, w // tile, tile).mean(axis=(1, 3))


@pytest.fixture(scope="module")
def c16():
    return load_preset("c16_like", [])[1]


def test_presets_load_with_their_classes_and_magnification_chains():
    expected = {"c16_like": (["normal", "tumour"], [5.0, 10.0, 20.0], 20.0), "tcga_like": (["luad_like", "lusc_like"], [10.0, 20.0], 20.0),
                "bright_like": (["non_cancerous", "precancerous", "cancerous"], [1.25, 2.5, 10.0], 10.0),
                "crc_like": (["non_neoplastic", "low_grade", "high_grade"], [5.0, 10.0, 20.0], 20.0)}
    for name, (classes, magnifications, base) in expected.items():
        raw, cfg = load_preset(name, [])
        assert [c.name for c in cfg.classes] == classes
        assert raw["extract"]["magnifications"] == magnifications
        assert 10.0 / cfg.slide.mpp == base
        assert cfg.num_slides >= 200 and round(cfg.num_slides * cfg.split_fractions[2]) >= 60
        # the pyramid reaches the lowest magnification used
        assert base / 2 ** (cfg.slide.pyramid_levels - 1) <= min(magnifications)


def test_cohort_features_are_extracted_on_one_thread_unless_the_preset_says_otherwise(tmp_path):
    # LeNet's float32 features change in their last bits with the thread count, and that moves table rows
    for name in ("c16_like", "tcga_like", "bright_like", "crc_like"):
        raw, _ = load_preset(name, [])
        assert extraction_config(tmp_path, raw).num_threads == 1
    raw, _ = load_preset("bright_like", ["extract.num_threads=2"])
    config = extraction_config(tmp_path, raw)
    assert config.num_threads == 2 and config.magnifications == [1.25, 2.5, 10.0] and config.out_dir == str(tmp_path / "features" / "lenet")
    # features already in place from another thread count (or from before it was recorded) are named, not silently kept
    record = tmp_path / "features" / "lenet" / "extraction.json"
    assert thread_mismatch(record, {"torch_threads": 1}, 1) is None
    for extraction, said in (({"torch_threads": 2}, "on 2 torch threads"), ({}, "on an unrecorded number of torch threads")):
        warning = thread_mismatch(record, extraction, 1)
        assert warning.count("\n") == 0 and str(record) in warning and said in warning and f"delete {record.parent}" in warning


def test_c16_like_tumour_is_small_and_comes_in_a_salient_and_a_subtle_form(c16):
    salient, subtle = 1 + c16.kind_index["salient"], 1 + c16.kind_index["subtle"]
    tile_10x = 2 * 64  # level 0 is 20x: a 64-pixel 10x tile covers 128 level-0 pixels
    shares, seen = [], set()
    for entry in cohort_plan(c16)[:24]:  # the cohort's own first slides: their presentations as drawn
        spec = c16.classes[entry["label"]]
        slide = generate_lesion_slide(slide_rng(c16.seed, entry["index"]), spec.presentations[entry["presentation_index"]], c16)
        present = set(np.unique(slide.kinds).tolist()) - {0}
        seen.add(entry["presentation"])
        if entry["label"] == 0:
            assert not present
            continue
        shares.append((slide.kinds > 0).sum() / slide.tissue.sum())
        if entry["presentation"] == "micro":
            tumour_tiles = (tile_means(slide.kinds > 0, tile_10x) >= 0.5).sum()
            assert present == {salient} and 1 <= tumour_tiles <= 8, (present, tumour_tiles)
        if entry["presentation"] == "subtle_only":
            assert present == {subtle}
        if entry["presentation"] == "macro":
            assert salient in present
    assert seen == {"normal", "micro", "macro", "subtle_only"}
    assert np.median(shares) < 0.05, shares


def test_tcga_like_both_classes_are_tumour_over_most_of_the_tissue():
    cfg = load_preset("tcga_like", [])[1]
    for label, spec in enumerate(cfg.classes):
        slide = generate_lesion_slide(slide_rng(5, label), spec.presentations[0], cfg)
        assert (slide.kinds > 0).sum() / slide.tissue.sum() > 0.4
        assert set(np.unique(slide.kinds)) - {0} == {1 + cfg.kind_index[spec.name]}


def assert_grades_hold_their_lesions(cfg, seed: int, allowed: dict[int, set[str]], required: dict[int, str]) -> None:
    """Every presentation of every grade of `cfg` draws only its `allowed` kinds, always its `required` one; `normal` none."""
    for label, spec in enumerate(cfg.classes):
        for p, pres in enumerate(spec.presentations):
            slide = generate_lesion_slide(slide_rng(seed, 10 * label + p), pres, cfg)
            present = {cfg.kinds[k - 1].name for k in set(np.unique(slide.kinds)) - {0}}
            assert present <= allowed[label]
            if label in required:
                assert required[label] in present
            if pres.name == "normal":
                assert not present


def test_bright_like_grades_hold_their_lesions():
    cfg = load_preset("bright_like", [])[1]
    assert_grades_hold_their_lesions(cfg, 7, allowed={0: {"benign"}, 1: {"atypia", "benign"}, 2: {"carcinoma", "atypia"}},
                                     required={1: "atypia", 2: "carcinoma"})


def test_crc_like_grades_hold_their_lesions_in_the_papers_shares():
    cfg = load_preset("crc_like", [])[1]
    assert_grades_hold_their_lesions(cfg, 9, allowed={0: {"hyperplastic"}, 1: {"low_grade", "hyperplastic"}, 2: {"high_grade", "low_grade"}},
                                     required={1: "low_grade", 2: "high_grade"})
    # ZoomMIL's CRC: 26.5 / 48.7 / 24.8% of the slides, split 70 / 10 / 20 within each class
    plan = cohort_plan(cfg)
    labels = np.array([e["label"] for e in plan])
    assert np.bincount(labels).tolist() == [round(0.265 * 300), round(0.487 * 300), round(0.248 * 300)]
    splits = [e["split"] for e in plan]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (210, 30, 60)


def test_plan_follows_the_class_shares_and_stratifies_the_splits():
    cfg = load_preset("bright_like", [])[1]
    plan = cohort_plan(cfg)
    assert plan == cohort_plan(cfg)  # seeded
    labels = np.array([e["label"] for e in plan])
    assert np.bincount(labels).tolist() == [80, 80, 80]
    for label in range(3):
        splits = [e["split"] for e in plan if e["label"] == label]
        assert (splits.count("train"), splits.count("val"), splits.count("test")) == (40, 16, 24)


def test_written_cohort_masks_agree_and_levels_align(tmp_path):
    from mil_experiments.data.wsi.extraction import ExtractionConfig, run_extraction

    _, cfg = load_preset("c16_like", ["cohort.num_slides=4", "cohort.slide.width=512", "cohort.slide.height=512", "cohort.num_workers=1"])
    summary = make_benchmark_cohort(tmp_path, cfg, progress=False)
    rows = list(csv.DictReader((tmp_path / "slides.csv").open()))
    assert [r["slide_id"] for r in rows] == [s["slide_id"] for s in summary["slides"]]
    for row in rows:
        kinds = read_kinds_mask(kinds_mask_path(tmp_path, row["slide_id"]))
        tumour = read_tumour_mask(tumour_mask_path(tmp_path, row["slide_id"]))
        assert kinds.shape == tumour.shape == (512 // cfg.slide.mask_downsample,) * 2
        assert ((kinds > 0) == tumour).mean() > 0.99  # area-resized binary vs nearest-resized kinds
        assert (int(row["label"]) == 0) == (not (kinds > 0).any())
    run_extraction(ExtractionConfig(
        slides_dir=str(tmp_path / "slides"), out_dir=str(tmp_path / "features"), masks_dir=str(tmp_path / "masks"),
        labels_csv=str(tmp_path / "labels.csv"), splits_csv=str(tmp_path / "splits.csv"), magnifications=[5.0, 10.0, 20.0],
        tile_size=32, encoder={"name": "lenet", "pretrained": False, "input_size": None, "feature_dim": 8, "seed": 0}, progress=False))
    for path in sorted((tmp_path / "features").glob("*.h5")):
        with h5py.File(path) as f:
            counts = [f[f"{m}x"]["features"].shape[0] for m in ("5.0", "10.0", "20.0")]
            assert counts[1] == 4 * counts[0] and counts[2] == 16 * counts[0]
            low, high = f["5.0x"]["tumour_fraction"][:], f["20.0x"]["tumour_fraction"][:]
            # a 5x tile's tumour share is the mean of its 16 children's (depth-first order)
            np.testing.assert_allclose(low, high.reshape(-1, 16).mean(axis=1), atol=0.02)


def test_bad_presets_are_refused_with_the_key_named():
    raw, _ = load_preset("c16_like", [])
    raw["cohort"]["classes"][1]["presentations"][0]["lesions"][0]["kind"] = "missing"
    with pytest.raises(ConfigError, match=r"presentations\[0\] \(micro\): lesion kind 'missing' is not one of"):
        BenchmarkCohortConfig(name="c16_like", **raw["cohort"])
    with pytest.raises(ConfigError, match=r"cohort.split_fractions"):
        load_preset("c16_like", ["cohort.split_fractions=[0.5,0.5,0.5]"])
    with pytest.raises(ConfigError, match=r"no conf/cohort/nope.yaml"):
        load_preset("nope", [])
    result = subprocess.run([sys.executable, "scripts/make_cohorts.py", "nope"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "nope" in result.stderr
