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
    ("zoommil_eff_bright", "bright_like", [1.25, 10.0], 4, "best_val_f1_weighted"),
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
