"""`dataset=synthetic_wsi`: generates its cohort when the folder is empty, serves tile bags
with ground-truth instance labels, refuses a cohort made with other settings, and trains
end to end with ABMIL-ACC through the real config."""

from __future__ import annotations

import json

import pytest

from mil_experiments.data.synthetic_wsi import SyntheticWSIDataModule
from mil_experiments.data.wsi.synthetic import CohortConfig, SyntheticSlideConfig
from mil_experiments.errors import DataError

TINY_GENERATOR = [
    "dataset.generator.num_slides=6",
    "dataset.generator.num_workers=1",
    "dataset.generator.split_fractions=[0.34,0.33,0.33]",
    "dataset.generator.slide.width=512",
    "dataset.generator.slide.height=512",
    "dataset.generator.slide.pyramid_levels=3",
    "dataset.generator.slide.tiff_tile=64",
    "dataset.generator.slide.large_tumour_radius=[60.0,90.0]",
    "dataset.generator.slide.small_tumour_radius=[15.0,25.0]",
    "dataset.generator.slide.lymphoid_aggregates=[0,0]",
    "dataset.generator.slide.mask_downsample=4",
]


def tiny_config(root) -> SyntheticWSIDataModule.Config:
    slide = SyntheticSlideConfig(width=512, height=512, pyramid_levels=3, tiff_tile=64, large_tumour_radius=[60.0, 90.0],
                                 small_tumour_radius=[15.0, 25.0], lymphoid_aggregates=[0, 0], mask_downsample=4)
    generator = CohortConfig(num_slides=6, num_workers=1, split_fractions=[0.34, 0.33, 0.33], slide=slide)
    return SyntheticWSIDataModule.Config(root=str(root), magnification=10.0, tissue_magnification=5.0, tile_size=32,
                                         image_size=28, tissue={"downsample": 4, "sigma": 1.0}, generator=generator)


def test_generates_then_serves_tile_bags(tmp_path):
    root = tmp_path / "cohort"
    dm = SyntheticWSIDataModule(tiny_config(root), seed=0)
    dm.setup()
    assert (root / "cohort.json").is_file() and len(list((root / "slides").glob("*.tiff"))) == 6
    assert dm.instance_shape == (3, 28, 28) and dm.num_classes == 2
    bags = [s[i] for s in (dm.train_set, dm.val_set, dm.test_set) for i in range(len(s))]
    assert len(bags) == 6
    for bag in bags:
        n = bag.instances.shape[0]
        assert bag.instances.shape[1:] == (3, 28, 28) and n % 4 == 0, "4 children at 10x per 5x tile"
        assert bag.coords.shape == (n, 2) and bag.instance_labels.shape == (n,) and bag.magnification == 10.0
        if int(bag.label) == 0:
            assert int(bag.instance_labels.sum()) == 0
    assert any(int(b.instance_labels.sum()) > 0 for b in bags if int(b.label) == 1)
    assert bags[0].instances.dtype.is_floating_point and abs(float(bags[0].instances.mean())) < 3

    # a second datamodule reuses the cohort; other generator settings are refused
    SyntheticWSIDataModule(tiny_config(root), seed=1).setup()
    other = tiny_config(root)
    other.generator.seed = 9
    with pytest.raises(DataError, match="other generator settings \\(seed\\)"):
        SyntheticWSIDataModule(other, seed=0).setup()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("not a cohort")
    with pytest.raises(DataError, match="busy: not empty and has no cohort.json"):
        SyntheticWSIDataModule(tiny_config(tmp_path / "busy"), seed=0).setup()


def test_abmil_acc_trains_end_to_end_on_synthetic_tiles(tmp_path):
    from mil_experiments.api import compose_config
    from mil_experiments.run import train_and_test

    overrides = [
        "dataset=synthetic_wsi", f"dataset.root={tmp_path / 'cohort'}", "dataset.magnification=10.0",
        "dataset.tissue_magnification=5.0", "dataset.tile_size=32", "dataset.image_size=28", "dataset.tissue.sigma=1.0",
        *TINY_GENERATOR, "method=abmil_acc", "alpha=25", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
        "logger=none",
    ]
    train_and_test(compose_config(overrides), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["method"] == "abmil_acc" and saved["dataset"] == "synthetic_wsi" and saved["epochs"] == 1
    assert 0.0 <= saved["test"]["test/accuracy"] <= 1.0
