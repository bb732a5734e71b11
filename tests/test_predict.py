"""Raw-slide inference (`python -m mil_experiments.predict`): ZoomMIL reads only the children of the
tiles it chooses and predicts what the feature path predicts; other models read every tile; the
FLOP count of a tiny model is its hand count; the command writes its files and refuses bad paths."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mil_experiments.api import compose_config
from mil_experiments.bag import LevelLayout
from mil_experiments.data.feature_bags import slide_to_bag
from mil_experiments.data.feature_files import read_feature_file
from mil_experiments.data.wsi.extraction import ExtractionConfig, run_extraction
from mil_experiments.data.wsi.readers import WholeSlide
from mil_experiments.data.wsi.synthetic import CohortConfig, SyntheticSlideConfig, make_cohort
from mil_experiments.models.zoommil import ZoomMIL
from mil_experiments.predict import main
from mil_experiments.prediction.settings import ExtractOverrides
from mil_experiments.prediction.slide_inference import predict_slide
from mil_experiments.prediction.trained_model import build_for_slides, load_trained_model
from tests.conftest import REPO

MAGS = [5.0, 10.0, 20.0]
TILE = 32


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """3 tiny slides (512 px, 20x: levels 20x/10x/5x) and their features (LeNet, 16-d, random weights seed 0)."""
    root = tmp_path_factory.mktemp("predict_cohort")
    slide = SyntheticSlideConfig(
        width=512, height=512, pyramid_levels=3, tiff_tile=64, large_tumour_radius=[60.0, 90.0],
        small_tumour_radius=[15.0, 25.0], lymphoid_aggregates=[0, 1], lymphoid_radius=[15.0, 30.0], mask_downsample=4,
    )
    make_cohort(root, CohortConfig(num_slides=3, seed=3, num_workers=1, split_fractions=[0.34, 0.33, 0.33], slide=slide))
    run_extraction(ExtractionConfig(
        slides_dir=str(root / "slides"), out_dir=str(root / "features"), labels_csv=str(root / "labels.csv"),
        splits_csv=str(root / "splits.csv"), magnifications=MAGS, tile_size=TILE, tissue={"downsample": 4, "sigma": 1.0},
        batch_size=16, progress=False, encoder={"name": "lenet", "input_size": None, "feature_dim": 16, "seed": 0},
    ))
    return root


def make_run(root, run_dir, overrides: list[str]):
    """A run folder as `python -m mil_experiments` leaves it (config.yaml, checkpoints/selected.ckpt), random weights."""
    cfg = compose_config(["logger=none", *overrides])
    torch.manual_seed(1)
    model = build_for_slides(cfg, run_dir)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    torch.save({"state_dict": model.method.state_dict(), "epoch": 0}, run_dir / "checkpoints" / "selected.ckpt")
    return run_dir / "checkpoints" / "selected.ckpt"


def feature_run(root, run_dir, aggregator: list[str]):
    return make_run(root, run_dir, ["dataset=feature_bags", f"dataset.root={root / 'features'}", "encoder=identity",
                                    "method.binary_head=two_logits", *aggregator])


ZOOM = ["aggregator=zoommil", "aggregator.k=2", "aggregator.hidden_dim=16", "aggregator.attention_dim=8"]


def recorded_reads(monkeypatch) -> list[tuple[float, float, float, int]]:
    """Every tile region read from a slide file: (x, y, level-0 side, output side)."""
    calls = []
    original = WholeSlide.read_scaled

    def read_scaled(self, location, size_level0, out_size):
        calls.append((float(location[0]), float(location[1]), float(size_level0), int(out_size)))
        return original(self, location, size_level0, out_size)

    monkeypatch.setattr(WholeSlide, "read_scaled", read_scaled)
    return calls


def test_incremental_zoommil_forward_equals_forward_for_every_selection():
    layout = LevelLayout((2.5, 5.0, 10.0, 20.0), (5, 20, 80, 320))
    cases = [dict(selection=s) for s in ("perturbed", "hard", "random_low", "random_next")]
    cases += [dict(magnifications=[2.5, 5.0, 20.0]), dict(highest_only=True), dict(dual_attention=False, fusion="concat")]
    for case in cases:
        torch.manual_seed(0)
        model = ZoomMIL(in_dim=8, n_outputs=3, k=3, hidden_dim=16, attention_dim=8, **case)
        model.bind_levels(layout)
        model.eval()
        features = torch.randn(layout.total, 8)
        torch.manual_seed(5)
        full = model(features, levels=layout)
        torch.manual_seed(5)  # the random ablations draw the same tiles
        state, fed = model.zoom_start(layout), 0
        while state.rows is not None:
            rows = layout.slices[state.used[state.level]]
            model.zoom_step(state, features[rows][state.rows])
            fed += 1
        out = model.zoom_output(state)
        assert torch.equal(out.logits, full.logits), case
        assert torch.equal(out.instance_scores, full.instance_scores), case
        assert full.level_scores.keys() == out.level_scores.keys() and fed == len(full.level_scores), case
        for key, scores in full.level_scores.items():
            assert torch.equal(out.level_scores[key], scores), (case, key)
    with pytest.raises(RuntimeError, match="for evaluation"):
        model.train().zoom_start(layout)


def test_zoommil_on_a_raw_slide_reads_only_the_chosen_children_and_matches_the_feature_path(cohort, tmp_path, monkeypatch):
    model = load_trained_model(feature_run(cohort, tmp_path / "run", ZOOM))
    assert model.zooms and model.bag_magnifications == MAGS
    for slide_id in ("slide_000", "slide_001", "slide_002"):
        features = read_feature_file(cohort / "features" / f"{slide_id}.h5")
        bag = slide_to_bag(slide_id, 0, features, 0.5)
        with torch.no_grad():
            expected = model.method.predict(bag)  # the ordinary forward on the whole feature bag
        reads = recorded_reads(monkeypatch)
        result = predict_slide(model, cohort / "slides" / f"{slide_id}.tiff")
        torch.testing.assert_close(result.output.logits, expected.logits, rtol=1e-5, atol=1e-6)
        n_low = features.features[5.0].shape[0]
        assert n_low > 2  # the selection (K = 2) leaves tiles out
        # the candidates the forward attended at 10x / 20x are exactly the tiles read there
        for m in (10.0, 20.0):
            attended = np.flatnonzero(expected.level_scores[m].numpy())
            assert len(attended) == 2 * 4
            view = next(v for v in result.levels if v.magnification == m)
            np.testing.assert_array_equal(view.coords, features.coords[m][attended])
        # regions read from the file: every 5x tile's block once, then only the 4 children of each chosen tile
        by_mag = {}
        for x, y, side, out in reads:
            by_mag.setdefault(round(20.0 * out / side, 6), []).append((x, y, side, out))
        low_side = TILE * 20.0 / 5.0
        assert sorted(by_mag) == MAGS
        assert len(by_mag[5.0]) == n_low and all(s == low_side and o == TILE for _, _, s, o in by_mag[5.0])
        for m, parent in ((10.0, 5.0), (20.0, 10.0)):
            parents = np.unique(np.flatnonzero(expected.level_scores[m].numpy()) // 4)
            assert sorted((x, y) for x, y, _, _ in by_mag[m]) == sorted(map(tuple, features.coords[parent][parents].astype(float)))
            assert all(o == 2 * TILE for _, _, _, o in by_mag[m])  # one 2x2 block of children per chosen tile
        assert result.tiles_read == result.tiles_encoded == {5.0: n_low, 10.0: 8, 20.0: 8}
        assert result.tissue_tiles == {5.0: n_low, 10.0: 4 * n_low, 20.0: 16 * n_low}
        monkeypatch.undo()


def test_other_aggregators_encode_every_tile_and_match_the_feature_path(cohort, tmp_path):
    model = load_trained_model(feature_run(cohort, tmp_path / "run", ["aggregator=abmil", "dataset.magnifications=[20.0]"]))
    assert not model.zooms
    features = read_feature_file(cohort / "features" / "slide_001.h5", [20.0])
    with torch.no_grad():
        expected = model.method.predict(slide_to_bag("slide_001", 0, features, 0.5))
    result = predict_slide(model, cohort / "slides" / "slide_001.tiff")
    torch.testing.assert_close(result.output.logits, expected.logits, rtol=1e-5, atol=1e-6)
    n = features.features[20.0].shape[0]
    assert result.tiles_read == result.tiles_encoded == result.tissue_tiles == {20.0: n}
    # a multi-magnification model that does not zoom (MSMIL) reads every tissue tile of every magnification
    msmil = load_trained_model(feature_run(cohort, tmp_path / "msmil", ["aggregator=msmil", "aggregator.hidden_dim=16", "aggregator.attention_dim=8"]))
    assert not msmil.zooms and msmil.bag_magnifications == MAGS
    all_levels = read_feature_file(cohort / "features" / "slide_001.h5")
    with torch.no_grad():
        expected_msmil = msmil.method.predict(slide_to_bag("slide_001", 0, all_levels, 0.5))
    result = predict_slide(msmil, cohort / "slides" / "slide_001.tiff")
    torch.testing.assert_close(result.output.logits, expected_msmil.logits, rtol=1e-5, atol=1e-6)
    assert result.tiles_read == result.tiles_encoded == result.tissue_tiles == {m: all_levels.features[m].shape[0] for m in MAGS}
    # `extract.*` replaces a stored setting: another encoder seed is another encoder, so other logits
    reseeded = load_trained_model(model.run_dir / "checkpoints" / "selected.ckpt", extract=ExtractOverrides(encoder={"seed": 1}))
    assert "lenet[random,seed=1]" in reseeded.encode.name and "seed=0" in model.encode.name
    assert not torch.allclose(predict_slide(reseeded, cohort / "slides" / "slide_001.tiff").output.logits, expected.logits)


def test_flops_of_a_tiny_end_to_end_model_equal_a_hand_count(cohort, tmp_path):
    """LeNet (3x32x32 tiles, 8-d) + ABMIL (attention 4, one logit), trained end to end on 10x tiles."""
    checkpoint = make_run(cohort, tmp_path / "run", [
        "dataset=synthetic_wsi", f"dataset.root={cohort}", "dataset.generate=false", "dataset.magnification=10.0",
        "dataset.tissue_magnification=5.0", f"dataset.tile_size={TILE}", "dataset.tissue.sigma=1.0",
        "encoder=lenet", "encoder.feature_dim=8", "aggregator=abmil", "aggregator.attention_dim=4",
    ])
    result = predict_slide(load_trained_model(checkpoint), cohort / "slides" / "slide_000.tiff")
    n = result.tiles_encoded[10.0]
    assert n == result.tissue_tiles[10.0] > 0
    conv1 = 2 * 20 * 28 * 28 * (3 * 5 * 5)  # 20 maps of 28x28, each output a 3x5x5 dot product
    conv2 = 2 * 50 * 10 * 10 * (20 * 5 * 5)  # after 2x2 pooling: 14x14 -> 10x10
    fc = 2 * (50 * 5 * 5) * 8
    assert result.flops_encoder == n * (conv1 + conv2 + fc)
    attention = 2 * n * 8 * 4 + 2 * n * 4 * 1  # V (8 -> 4), w (4 -> 1)
    pooling = 2 * n * 8  # attention (1 x n) @ features (n x 8)
    classifier = 2 * 8 * 1
    assert result.flops_aggregator == attention + pooling + classifier


def test_predict_command_writes_predictions_csv_and_heatmaps(cohort, tmp_path, capsys):
    checkpoint = feature_run(cohort, tmp_path / "run", ZOOM)
    out = tmp_path / "predictions"
    code = main([f"checkpoint={checkpoint}", f"slides={cohort / 'slides'}", f"out_dir={out}", f"labels_csv={cohort / 'labels.csv'}",
                 "thumbnail_size=128"])
    assert code == 0, capsys.readouterr().err
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["slide_id"] for r in rows] == ["slide_000", "slide_001", "slide_002"]
    labels = dict(line.split(",") for line in (cohort / "labels.csv").read_text().split()[1:])
    for row in rows:
        assert row["label"] == labels[row["slide_id"]]
        assert abs(float(row["prob_0"]) + float(row["prob_1"]) - 1) < 1e-5 and row["predicted"] in ("0", "1")
        assert int(row["tiles_read_10x"]) == int(row["tiles_encoded_10x"]) == 8 < int(row["tissue_tiles_10x"])
        assert int(row["flops"]) == int(row["flops_encoder"]) + int(row["flops_aggregator"]) > 0 and float(row["seconds"]) > 0
        png = out / "heatmaps" / f"{row['slide_id']}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["slides"] == 3 and summary["zooms"] and summary["tiles_per_slide"]["tiles_read_20x"] == 8
    assert main([f"checkpoint={checkpoint}", f"slides={cohort / 'slides'}", f"out_dir={out}"]) == 2
    assert "already holds predictions.csv" in capsys.readouterr().err
    # a file that is no slide stops the command with one line naming it, or is skipped and listed
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "slide_000.tiff").write_bytes((cohort / "slides" / "slide_000.tiff").read_bytes())
    (slides / "broken.tiff").write_text("not a slide")
    assert main([f"checkpoint={checkpoint}", f"slides={slides}", f"out_dir={tmp_path / 'p1'}", "heatmaps=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.tiff" in err[0]
    assert main([f"checkpoint={checkpoint}", f"slides={slides}", f"out_dir={tmp_path / 'p2'}", "heatmaps=false", "skip_failed=true"]) == 0
    summary = json.loads((tmp_path / "p2" / "summary.json").read_text())
    assert summary["slides"] == 1 and [f["slide"] for f in summary["failed"]] == ["broken.tiff"]


def test_bad_checkpoint_or_slides_folder_is_one_line_naming_it(cohort, tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    missing = tmp_path / "nowhere" / "selected.ckpt"
    done = subprocess.run([sys.executable, "-m", "mil_experiments.predict", f"checkpoint={missing}", f"slides={cohort / 'slides'}"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: checkpoint={missing}: file not found"]
    checkpoint = feature_run(cohort, tmp_path / "run", ZOOM)
    assert main([f"checkpoint={checkpoint}", f"slides={tmp_path / 'no_slides'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: slides={tmp_path / 'no_slides'}: folder not found"]
    broken = tmp_path / "broken" / "checkpoints" / "selected.ckpt"
    broken.parent.mkdir(parents=True)
    broken.write_text("not a checkpoint")
    (tmp_path / "broken" / "config.yaml").write_text((tmp_path / "run" / "config.yaml").read_text())
    assert main([f"checkpoint={broken}", f"slides={cohort / 'slides'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: checkpoint={broken}: cannot be read as a run checkpoint")


def test_a_run_on_standardized_features_is_standardized_on_raw_slides_too(cohort, tmp_path):
    checkpoint = feature_run(cohort, tmp_path / "run", ["aggregator=abmil", "dataset.magnifications=[20.0]", "encoder.standardize=true"])
    state = torch.load(checkpoint, weights_only=False)
    state["state_dict"]["encoder.mean"] = torch.linspace(-0.5, 0.5, 16)  # statistics as training would leave them
    state["state_dict"]["encoder.std"] = torch.linspace(0.5, 2.0, 16)
    torch.save(state, checkpoint)
    model = load_trained_model(checkpoint)
    features = read_feature_file(cohort / "features" / "slide_001.h5", [20.0])
    bag = slide_to_bag("slide_001", 0, features, 0.5)
    with torch.no_grad():
        expected = model.method.predict(model.method.encode_for_evaluation(bag))  # (x - mean) / std, then the aggregator
        raw = model.method.predict(bag)
    result = predict_slide(model, cohort / "slides" / "slide_001.tiff")
    torch.testing.assert_close(result.output.logits, expected.logits, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected.logits, raw.logits)


def test_heatmap_puts_the_tumour_mask_next_to_the_attention_with_the_zoomed_tiles(cohort, tmp_path, capsys):
    """masks_dir=<cohort>/masks adds a third panel: the mask in red over a grey thumbnail (Figure 4 style)."""
    import cv2

    from mil_experiments.prediction.heatmap import mask_overlay

    thumb = np.full((8, 8, 3), 200, dtype=np.uint8)
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:8, :8] = 255  # top-left quarter, at twice the thumbnail's size
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    shown = mask_overlay(thumb, tmp_path / "m.png")
    assert (shown[:4, :4] == (214, 39, 40)).all() and (shown[4:, :] != (214, 39, 40)).any(axis=-1).all()
    checkpoint = feature_run(cohort, tmp_path / "run", ZOOM)
    settings = [f"checkpoint={checkpoint}", f"slides={cohort / 'slides'}", "thumbnail_size=128", "flops=false", "limit=1"]
    assert main([*settings, f"out_dir={tmp_path / 'plain'}"]) == 0
    assert main([*settings, f"out_dir={tmp_path / 'masked'}", f"masks_dir={cohort / 'masks'}"]) == 0
    plain = cv2.imread(str(tmp_path / "plain" / "heatmaps" / "slide_000.png"))
    masked = cv2.imread(str(tmp_path / "masked" / "heatmaps" / "slide_000.png"))
    assert masked.shape[0] == plain.shape[0] and abs(masked.shape[1] / plain.shape[1] - 1.5) < 0.01  # three panels, not two
    assert main([*settings, f"out_dir={tmp_path / 'bad'}", f"masks_dir={tmp_path / 'nowhere'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: masks_dir={tmp_path / 'nowhere'}: folder not found"
