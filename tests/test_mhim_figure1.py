"""scripts/mhim_figure1.py: MHIM's Figure 1 from a tiny c16_like cohort's two stages (1 epoch each)."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import mhim_figure1  # noqa: E402

from mil_experiments.methods.mhim_masks import mhim_masks  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A 12-slide c16_like cohort (~15 s) and its fold-0 stage-1 / stage-2 runs of one epoch (~7 s)."""
    root = tmp_path_factory.mktemp("mhimfig")
    cohort = root / "c16"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_cohorts.py"), "c16_like", "cohort.num_slides=12", f"root={cohort}"],
                   cwd=REPO, check=True, capture_output=True)
    subprocess.run([sys.executable, str(REPO / "scripts" / "mhim_two_stage.py"), "--recipe", "abmil_c16", "--folds", "0",
                    "--out", str(root / "mhim"), f"dataset.root={cohort / 'features' / 'lenet'}", "trainer.max_epochs=1",
                    "encoder.standardize=true", "evaluation.bootstrap=0", "logger=none", "trainer.enable_progress_bar=false"],
                   cwd=REPO, check=True, capture_output=True)
    return {"cohort": cohort, "stage1": root / "mhim" / "stage1" / "fold0", "stage2": root / "mhim" / "stage2" / "fold0"}


@pytest.fixture(scope="module")
def data(runs) -> mhim_figure1.FigureData:
    return mhim_figure1.figure_data(runs["stage1"], runs["stage2"], runs["cohort"], seed=3)


def test_the_figure_is_written(runs, tmp_path, capsys):
    out = tmp_path / "fig" / "figure1.png"
    argv = [f"stage1={runs['stage1']}", f"stage2={runs['stage2']}", f"cohort={runs['cohort']}", f"out={out}"]
    assert mhim_figure1.main(argv) == 0
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) in capsys.readouterr().out


def test_default_slide_is_a_positive_subtle_or_macro_test_slide(runs, data):
    presentations = mhim_figure1.read_presentations(runs["cohort"])
    assert data.label == 1 and presentations[data.slide_id] == data.presentation
    assert data.presentation in ("subtle_only", "macro")
    n = len(data.coords)
    for attention in (data.attention_stage1, data.attention_teacher, data.attention_student):
        assert attention.shape == (n,)
    assert 0 <= data.prob_stage1 <= 1 and 0 <= data.prob_student <= 1
    assert data.tile_level0 == 64  # 20x tiles on the 20x base


def test_masked_tiles_are_what_mhim_masks_returns(data):
    assert (data.ratios.random, data.ratios.high, data.ratios.high_random) == (0.5, 0.01, 0.5)  # the abmil_c16 recipe, beta_h at its start
    _, expected = mhim_masks(torch.from_numpy(data.attention_teacher), data.ratios, "vote", generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(data.masked, expected.numpy())
    union = np.unique(np.concatenate(list(data.masked_parts.values())))
    np.testing.assert_array_equal(union, data.masked)
    n = len(data.coords)
    assert len(data.masked_parts["random"]) == math.ceil(n * 0.5)
    assert len(data.masked_parts["high"]) == math.ceil(math.ceil(n * 0.01 / 0.5) * 0.5)


def test_high_attention_masks_are_among_the_teachers_top_tiles(data):
    n = len(data.coords)
    candidates = math.ceil(n * data.ratios.high / data.ratios.high_random)
    top = set(np.argsort(-data.attention_teacher)[:candidates].tolist())
    assert data.masked_parts["high"].size > 0
    assert set(data.masked_parts["high"].tolist()) <= top
    # with another seed the random part changes, the high part stays within the same top tiles
    _, parts = mhim_figure1.teacher_masks(torch.from_numpy(data.attention_teacher), data.ratios, "vote", seed=4)
    assert not np.array_equal(parts["random"].numpy(), data.masked_parts["random"])
    assert set(parts["high"].tolist()) <= top


def test_a_chosen_slide_is_drawn(runs, data):
    test_ids = [r["bag_id"] for r in csv.DictReader((runs["stage1"] / "test_predictions.csv").open())]
    other = next(s for s in test_ids if s != data.slide_id)
    chosen = mhim_figure1.figure_data(runs["stage1"], runs["stage2"], runs["cohort"], slide=other)
    assert chosen.slide_id == other


@pytest.mark.parametrize("case, named", [
    ("missing_stage1", "stage1="),
    ("stage2_not_mhim", "not method=mhim"),
    ("unknown_slide", "slide=c16_like_999"),
])
def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys, case, named):
    stage1, stage2, extra = runs["stage1"], runs["stage2"], []
    if case == "missing_stage1":
        stage1 = tmp_path / "no_such_run"
    elif case == "stage2_not_mhim":
        stage2 = runs["stage1"]
    else:
        extra = ["slide=c16_like_999"]
    argv = [f"stage1={stage1}", f"stage2={stage2}", f"cohort={runs['cohort']}", f"out={tmp_path / 'x.png'}", *extra]
    assert mhim_figure1.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and err.startswith("error:")
    assert not (tmp_path / "x.png").exists()
