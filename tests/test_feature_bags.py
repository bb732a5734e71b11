"""Feature files (ours, CLAM / TRIDENT, ZoomMIL, .pt), their errors, splits, the
feature_bags datamodule, and one epoch of ABMIL on extracted feature bags via the real config."""

from __future__ import annotations

import csv
import json
import logging

import h5py
import numpy as np
import pytest
import torch

from mil_experiments.data.feature_bags import FeatureBagsDataModule
from mil_experiments.data.feature_files import find_feature_file, read_feature_file, write_feature_file
from mil_experiments.data.slide_splits import kfold_splits, read_labels, read_splits
from mil_experiments.errors import DataError

MAGS = [2.5, 5.0, 20.0]


def multi_mag(n_low: int, dim: int, seed: int = 0) -> tuple[dict, dict, dict]:
    rng = np.random.default_rng(seed)
    counts = {2.5: n_low, 5.0: 4 * n_low, 20.0: 64 * n_low}
    features = {m: rng.standard_normal((n, dim)).astype(np.float32) for m, n in counts.items()}
    coords = {m: rng.integers(0, 1000, (n, 2)) for m, n in counts.items()}
    tumour = {m: rng.uniform(size=n).astype(np.float32) for m, n in counts.items()}
    return features, coords, tumour


def write_csvs(root, labels: dict[str, int], splits: dict[str, str]) -> None:
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "label"])
        w.writerows(labels.items())
    with open(root / "splits.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "split"])
        w.writerows(splits.items())


@pytest.fixture
def bag_folder(tmp_path):
    """Six slides of multi-magnification features, two per split."""
    labels, splits = {}, {}
    for i in range(6):
        slide_id = f"s{i}"
        features, coords, tumour = multi_mag(n_low=2 + i, dim=8, seed=i)
        write_feature_file(tmp_path / f"{slide_id}.h5", features, coords, {"extractor": "test", "tile_size": 64}, tumour)
        labels[slide_id] = i % 2
        splits[slide_id] = ("train", "val", "test")[i // 2]
    write_csvs(tmp_path, labels, splits)
    return tmp_path


def datamodule(root, **overrides) -> FeatureBagsDataModule:
    return FeatureBagsDataModule(FeatureBagsDataModule.Config(root=str(root), **overrides), seed=0)


# --- files ------------------------------------------------------------------------------------
def test_round_trip_and_other_layouts(tmp_path):
    features, coords, tumour = multi_mag(3, 5)
    write_feature_file(tmp_path / "ours.h5", features, coords, {"extractor": "x"}, tumour, {2.5: 512.0, 5.0: 256.0, 20.0: 64.0})
    ours = read_feature_file(tmp_path / "ours.h5")
    assert ours.layout == "mil_experiments" and ours.magnifications == MAGS and ours.feature_dim == 5
    np.testing.assert_array_equal(ours.features[20.0], features[20.0])
    assert read_feature_file(tmp_path / "ours.h5", [20.0, 2.5]).magnifications == [2.5, 20.0]
    assert not (tmp_path / "ours.h5.partial").exists()

    with h5py.File(tmp_path / "clam.h5", "w") as f:  # CLAM: features + coords at the root
        f["features"] = np.ones((4, 7), np.float32)
        f["coords"] = np.zeros((4, 2), np.int64)
    clam = read_feature_file(tmp_path / "clam.h5")
    assert clam.layout == "clam" and clam.magnifications == [None] and clam.coords[None].shape == (4, 2)
    with h5py.File(tmp_path / "trident.h5", "w") as f:  # TRIDENT: the magnification on coords
        f["features"] = np.ones((1, 4, 7), np.float32)
        f["coords"] = np.zeros((4, 2), np.int64)
        f["coords"].attrs["target_magnification"] = 20
    assert read_feature_file(tmp_path / "trident.h5", [20.0]).features[20.0].shape == (4, 7)

    with h5py.File(tmp_path / "zoommil.h5", "w") as f:  # ZoomMIL's key names
        for m, n in ((1.25, 2), (2.5, 8), (10.0, 128)):
            f[f"{m}x_patches"] = np.ones((n, 6), np.float32)
            f[f"{m}x_coords"] = np.zeros((n, 2 * (1 + int(m > 1.25))), np.int64)
    zoommil = read_feature_file(tmp_path / "zoommil.h5")
    assert zoommil.layout == "zoommil" and zoommil.magnifications == [1.25, 2.5, 10.0]

    torch.save(torch.ones(5, 3), tmp_path / "a.pt")
    torch.save({"features": torch.ones(5, 3), "coords": torch.zeros(5, 2)}, tmp_path / "b.pt")
    assert read_feature_file(tmp_path / "a.pt").features[None].shape == (5, 3)
    assert read_feature_file(tmp_path / "b.pt").coords[None].shape == (5, 2)
    assert find_feature_file(tmp_path, "a") == tmp_path / "a.pt"
    assert find_feature_file(tmp_path, "ours") == tmp_path / "ours.h5"


def test_bad_files_are_named(tmp_path):
    with pytest.raises(DataError, match="gone.h5: feature file not found"):
        read_feature_file(tmp_path / "gone.h5")
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.h5: cannot be read as HDF5"):
        read_feature_file(tmp_path / "junk.h5")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.pt: cannot be read by torch.load"):
        read_feature_file(tmp_path / "junk.pt")
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f["features"] = np.zeros((0, 4), np.float32)
    with pytest.raises(DataError, match=r"empty.h5: no features \(0 rows\)"):
        read_feature_file(tmp_path / "empty.h5")
    with h5py.File(tmp_path / "nan.h5", "w") as f:
        f["features"] = np.array([[1.0, np.nan], [0.0, 1.0]], np.float32)
    with pytest.raises(DataError, match="nan.h5: 1 of 2 feature rows hold NaN"):
        read_feature_file(tmp_path / "nan.h5")
    with h5py.File(tmp_path / "patches.h5", "w") as f:
        f["features"] = np.zeros((2, 3, 8, 8), np.uint8)
    with pytest.raises(DataError, match="patches.h5: 'features' has shape"):
        read_feature_file(tmp_path / "patches.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["something"] = np.zeros(3)
    with pytest.raises(DataError, match="other.h5: no features found"):
        read_feature_file(tmp_path / "other.h5")
    features, coords, _ = multi_mag(2, 4)
    features[20.0] = features[20.0][:-1]
    coords[20.0] = coords[20.0][:-1]
    write_feature_file(tmp_path / "misaligned.h5", features, coords, {})
    with pytest.raises(DataError, match="misaligned.h5: 127 rows at 20.0x for 2 at 2.5x; aligned tiling needs 128"):
        read_feature_file(tmp_path / "misaligned.h5")
    features, coords, _ = multi_mag(1, 4)
    write_feature_file(tmp_path / "ok.h5", features, coords, {})
    with pytest.raises(DataError, match="ok.h5: no features at 10.0x"):
        read_feature_file(tmp_path / "ok.h5", [10.0])
    with pytest.raises(DataError, match="clam.h5: the file does not state its magnification"):
        with h5py.File(tmp_path / "clam.h5", "w") as f:
            f["features"] = np.ones((2, 4), np.float32)
        read_feature_file(tmp_path / "clam.h5", [20.0])


# --- splits -----------------------------------------------------------------------------------
def test_split_files_and_kfold(tmp_path):
    (tmp_path / "wide.csv").write_text(",train,val,test\n0,a,b,c\n1,d,,e\n")
    assert read_splits(tmp_path / "wide.csv") == {"a": "train", "b": "val", "c": "test", "d": "train", "e": "test"}
    (tmp_path / "bad.csv").write_text("slide_id,split\na,training\n")
    with pytest.raises(DataError, match="bad.csv:2: split 'training' is not one of train, val, test"):
        read_splits(tmp_path / "bad.csv")
    (tmp_path / "labels.csv").write_text("slide_id,type\na,tumour\nb,normal\n")
    assert read_labels(tmp_path / "labels.csv", "type", ["normal", "tumour"]) == ({"a": 1, "b": 0}, ["normal", "tumour"])
    with pytest.raises(DataError, match=r"labels.csv:2: slide a: label 'tumour' is not an integer; declare text classes"):
        read_labels(tmp_path / "labels.csv", "type")
    (tmp_path / "gap.csv").write_text("slide_id,label\na,1\nb,2\n")
    with pytest.raises(DataError, match="integer labels must be 0..C-1"):
        read_labels(tmp_path / "gap.csv")

    labels = {f"s{i:02d}": int(i < 10) for i in range(30)}
    folds = [kfold_splits(labels, 5, k, 0.25, seed=1) for k in range(5)]
    tests = [{s for s, v in f.items() if v == "test"} for f in folds]
    assert set().union(*tests) == set(labels) and sum(len(t) for t in tests) == 30, "folds partition the slides"
    for t in tests:
        assert sorted(labels[s] for s in t) == [0, 0, 0, 0, 1, 1], "stratified"
    assert folds[0] == kfold_splits(labels, 5, 0, 0.25, seed=1)
    assert folds[0] != kfold_splits(labels, 5, 0, 0.25, seed=2)
    assert sum(v == "val" for v in folds[0].values()) == 6


# --- datamodule -------------------------------------------------------------------------------
def test_datamodule_builds_multi_magnification_bags(bag_folder):
    dm = datamodule(bag_folder)
    dm.setup()
    assert dm.num_classes == 2 and dm.instance_shape == (8,)
    assert [len(s) for s in (dm.train_set, dm.val_set, dm.test_set)] == [2, 2, 2]
    assert dm.describe().magnifications == tuple(MAGS) and dm.describe().multi_level
    bag = dm.train_set[0]
    assert bag.bag_id == "s0" and bag.instances.shape == (2 + 8 + 128, 8)
    assert bag.levels.magnifications == tuple(MAGS) and bag.levels.sizes == (2, 8, 128)
    high = bag.level(2)
    assert high.magnification == 20.0 and high.instances.shape == (128, 8) and high.coords.shape == (128, 2)
    assert bag.level(1).instance_labels.shape == (8,) and bag.instance_labels.shape == (138,)

    single = datamodule(bag_folder, magnifications=[20.0], preload=False)
    single.setup()
    bag = single.test_set[1]
    assert bag.bag_id == "s5" and bag.instances.shape == (64 * 7, 8) and bag.magnification == 20.0
    assert bag.levels is None and not single.describe().multi_level

    folds = datamodule(bag_folder, split="kfold", num_folds=3, fold=1, val_fraction=0.5)
    folds.setup()
    assert sum(len(s) for s in (folds.train_set, folds.val_set, folds.test_set)) == 6


def test_invalid_files_raise_or_are_skipped_and_counted(bag_folder, caplog):
    features, coords, _ = multi_mag(2, 9)  # dimension 9, not 8
    write_feature_file(bag_folder / "s4.h5", features, coords, {})
    with pytest.raises(DataError, match="s4.h5: features of dimension 9 .* the other files have dimension 8"):
        datamodule(bag_folder).setup()
    (bag_folder / "s3.h5").unlink()
    with pytest.raises(DataError, match="no feature file for slide s3"):
        datamodule(bag_folder).setup()
    torch.save(torch.ones(3, 8), bag_folder / "s3.pt")  # a .pt with no magnification
    with caplog.at_level(logging.WARNING):
        dm = datamodule(bag_folder, skip_invalid=True)
        dm.setup()
    assert sorted(s["slide_id"] for s in dm.skipped) == ["s3", "s4"]
    assert "skipped 2 slides" in caplog.text
    assert [len(s) for s in (dm.train_set, dm.val_set, dm.test_set)] == [2, 1, 1]


# --- one epoch of ABMIL on extracted feature bags, through the real config ---------------------
def test_abmil_trains_on_extracted_feature_bags(tmp_path):
    from mil_experiments.api import compose_config
    from mil_experiments.data.wsi.extraction import ExtractionConfig, run_extraction
    from mil_experiments.data.wsi.synthetic import CohortConfig, SyntheticSlideConfig, make_cohort
    from mil_experiments.run import train_and_test

    slides = tmp_path / "cohort"
    slide = SyntheticSlideConfig(width=384, height=384, pyramid_levels=2, tiff_tile=64, large_tumour_radius=[50.0, 80.0],
                                 small_tumour_radius=[15.0, 25.0], lymphoid_aggregates=[0, 0], mask_downsample=4)
    make_cohort(slides, CohortConfig(num_slides=6, seed=2, num_workers=1, split_fractions=[0.34, 0.33, 0.33], slide=slide))
    run_extraction(ExtractionConfig(
        slides_dir=str(slides / "slides"), out_dir=str(tmp_path / "features"), labels_csv=str(slides / "labels.csv"),
        splits_csv=str(slides / "splits.csv"), masks_dir=str(slides / "masks"), magnifications=[5.0, 10.0], tile_size=32,
        tissue={"downsample": 4, "sigma": 1.0}, encoder={"name": "lenet", "input_size": None, "feature_dim": 12},
        num_threads=1, progress=False,
    ))
    overrides = [
        "dataset=feature_bags", f"dataset.root={tmp_path / 'features'}", "encoder=identity", "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false", "logger=none", "dataset.magnifications=[10.0]",
    ]
    results = train_and_test(compose_config(overrides), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["dataset"] == "feature_bags" and saved["epochs"] == 1
    assert 0.0 <= results["test"]["test/accuracy"] <= 1.0


def test_skipped_feature_files_are_counted_in_results(bag_folder, tmp_path):
    from mil_experiments.api import compose_config
    from mil_experiments.run import train_and_test

    (bag_folder / "s3.h5").unlink()
    overrides = ["dataset=feature_bags", f"dataset.root={bag_folder}", "dataset.skip_invalid=true",
                 "dataset.magnifications=[2.5]", "encoder=identity", "trainer.max_epochs=1",
                 "trainer.enable_progress_bar=false", "logger=none"]
    results = train_and_test(compose_config(overrides), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [s["slide_id"] for s in saved["skipped_files"]] == ["s3"] == [s["slide_id"] for s in results["skipped_files"]]
    assert "no feature file for slide s3" in saved["skipped_files"][0]["reason"]


def test_only_the_requested_magnifications_are_read(tmp_path, monkeypatch):
    features, coords, tumour = multi_mag(2, 4)
    write_feature_file(tmp_path / "s.h5", features, coords, {"extractor": "x"}, tumour)
    read = []
    original = h5py.Dataset.__getitem__

    def recording(self, key):
        read.append(self.name)
        return original(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording)
    slide = read_feature_file(tmp_path / "s.h5", [20.0])
    assert slide.magnifications == [20.0]
    assert read and all(name.startswith("/20.0x/") for name in read), read
    with pytest.raises(DataError, match=r"no features at 40.0x \(the file holds \[2.5, 5.0, 20.0\]\)"):
        read_feature_file(tmp_path / "s.h5", [20.0, 40.0])


def test_standardized_identity_encoder_uses_the_training_bags_statistics_and_travels_in_checkpoints(bag_folder, tmp_path):
    from mil_experiments.api import compose_config, compose_experiment
    from mil_experiments.run import train_and_test

    overrides = ["dataset=feature_bags", f"dataset.root={bag_folder}", "dataset.magnifications=[2.5]", "encoder=identity",
                 "encoder.standardize=true", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=none"]
    exp = compose_experiment(overrides, tmp_path / "exp")
    train = exp.datamodule.train_set
    rows = torch.cat([train[i].instances for i in range(len(train))]).double()  # (N_train, D)
    encoder = exp.method.encoder
    torch.testing.assert_close(encoder.mean.double(), rows.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(encoder.std.double(), rows.std(0), atol=1e-6, rtol=0)
    encoded = encoder(rows.float())  # (N_train, D)
    assert encoded.mean(0).abs().max() < 1e-5 and (encoded.std(0) - 1).abs().max() < 1e-5
    # a validation bag is scaled with the training statistics, not its own
    val = exp.datamodule.val_set[0].instances
    torch.testing.assert_close(encoder(val), (val - encoder.mean) / encoder.std)
    train_and_test(compose_config(overrides), tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoints" / "selected.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    torch.testing.assert_close(state["encoder.mean"], encoder.mean)
