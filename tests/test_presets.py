"""Experiment presets (conf/experiment/): each composes and carries the official protocol values."""

from __future__ import annotations

from pathlib import Path

import pytest

from mil_experiments.api import compose_config

PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes(preset):
    cfg = compose_config([f"experiment={preset}"])
    assert cfg.dataset.name and cfg.aggregator.name and cfg.method.name


@pytest.mark.parametrize(("preset", "dataset", "magnifications", "k", "rule"), [
    ("zoommil_bright", "bright_like", [1.25, 2.5, 10.0], 4, "best_val_f1_weighted"),
    ("zoommil_eff_bright", "bright_like", [1.25, 2.5], 3, "best_val_f1_weighted"),
    ("zoommil_crc", "crc_like", [5.0, 10.0, 20.0], 6, "best_val_loss"),
    ("zoommil_eff_crc", "crc_like", [5.0, 10.0], 4, "best_val_loss"),
    ("zoommil_c16", "c16_like", [5.0, 10.0, 20.0], 6, "best_val_loss"),
    ("zoommil_eff_c16", "c16_like", [5.0, 20.0], 6, "best_val_loss"),
])
def test_zoommil_presets_follow_the_official_protocol(preset, dataset, magnifications, k, rule):
    cfg = compose_config([f"experiment={preset}"])
    assert (cfg.dataset.name, list(cfg.dataset.magnifications), cfg.aggregator.name, cfg.aggregator.k) == (dataset, magnifications, "zoommil", k)
    assert cfg.selection.rule == rule
    # histocartography/zoommil Config + config_bright.json
    assert cfg.method.optimizer.name == "adam" and cfg.method.optimizer.lr == 1e-4 and cfg.method.optimizer.weight_decay == 0.0
    assert (cfg.method.scheduler.name, cfg.method.scheduler.factor, cfg.method.scheduler.patience) == ("plateau", 0.8, 5)
    assert cfg.dataset.class_weighted_sampler is True and cfg.encoder.name == "identity" and cfg.encoder.standardize is True
    assert (cfg.aggregator.sigma, cfg.aggregator.num_samples, cfg.aggregator.dropout) == (0.002, 100, 0.25)


@pytest.mark.parametrize(("preset", "magnifications", "k", "rule", "split"), [
    # the paper, Sec. 4.2: "ZOOMMIL uses K = {16, 12, 300} on CRC, BRIGHT, and CAMELYON16 ... ZOOMMIL-EFF uses K = {12, 8} on CRC and BRIGHT"
    ("zoommil_paper_bright", [1.25, 2.5, 10.0], 12, "best_val_f1_weighted", "csv"),
    ("zoommil_eff_paper_bright", [1.25, 2.5], 8, "best_val_f1_weighted", "csv"),
    ("zoommil_paper_crc", [5.0, 10.0, 20.0], 16, "best_val_loss", "csv"),
    ("zoommil_eff_paper_crc", [5.0, 10.0], 12, "best_val_loss", "csv"),
    ("zoommil_paper_c16", [10.0, 20.0], 300, "best_val_loss", "csv_trainval"),
])
def test_zoommil_paper_presets_carry_the_official_settings(preset, magnifications, k, rule, split):
    cfg = compose_config([f"experiment={preset}"])
    assert (cfg.dataset.name, list(cfg.dataset.magnifications), cfg.dataset.label_column, cfg.dataset.split) == ("feature_bags", magnifications, "type", split)
    assert (cfg.aggregator.name, cfg.aggregator.k, cfg.trainer.max_epochs, cfg.selection.rule) == ("zoommil", k, 100, rule)
    assert cfg.encoder.standardize is False and cfg.dataset.class_weighted_sampler is True


def test_zoommil_paper_preset_trains_on_files_in_the_official_layout(tmp_path):
    """<slide>.h5 with "{mag}x_patches" / "{mag}x_coords", labels with a `type` column, a train/val/test split CSV."""
    import h5py
    import numpy as np

    from mil_experiments.run import train_and_test

    rng = np.random.default_rng(0)
    slides = [f"s{i}" for i in range(9)]
    for i, slide in enumerate(slides):
        with h5py.File(tmp_path / f"{slide}.h5", "w") as f:
            for m, n in ((1.25, 3), (2.5, 12), (10.0, 192)):  # depth first: 4 and 64 children per 1.25x tile
                f[f"{m}x_patches"] = rng.normal(i % 3, 1.0, (n, 8)).astype(np.float32)
                f[f"{m}x_coords"] = np.zeros((n, 2), np.int64)
    (tmp_path / "labels.csv").write_text("slide_id,type\n" + "".join(f"{s},{i % 3}\n" for i, s in enumerate(slides)))
    (tmp_path / "split.csv").write_text("train,val,test\n" + "".join(f"{slides[j]},{slides[3 + j]},{slides[6 + j]}\n" for j in range(3)))
    cfg = compose_config(["experiment=zoommil_paper_bright", f"dataset.root={tmp_path}", "dataset.splits_csv=split.csv",
                          "trainer.max_epochs=1", "aggregator.hidden_dim=8", "aggregator.attention_dim=4", "aggregator.num_samples=5",
                          "logger=none", "trainer.enable_progress_bar=false", "evaluation.bootstrap=0"])
    results = train_and_test(cfg, tmp_path / "run")
    assert results["aggregator"] == "zoommil" and {"test/f1_weighted", "test/kappa_quadratic"} <= set(results["test"])
    rows = [line.split(",") for line in (tmp_path / "run" / "splits.csv").read_text().split()[1:]]
    assert {s for s, split in rows if split == "test"} == {"s6", "s7", "s8"}  # the split CSV's test column
    assert {s for s, split in rows if split == "val"} == {"s3", "s4", "s5"}
