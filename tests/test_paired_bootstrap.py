"""scripts/paired_bootstrap.py: pooled out-of-fold predictions, AUC by hand, a paired interval, one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import paired_bootstrap as pb  # noqa: E402


def write_fold(folder: Path, rows: list[tuple[str, int, float]]) -> None:
    folder.mkdir(parents=True)
    lines = ["bag_id,label,predicted,p_0,p_1,loss"] + [f"{s},{y},{int(p >= 0.5)},{1 - p:.6f},{p:.6f},0.1" for s, y, p in rows]
    (folder / "test_predictions.csv").write_text("\n".join(lines) + "\n")


def test_auc_by_the_rank_formula_against_a_hand_count():
    # positives 0.9, 0.4; negatives 0.4, 0.1: pairs (0.9>0.4) (0.9>0.1) (0.4=0.4: half) (0.4>0.1) -> 3.5 / 4
    assert pb.auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.4, 0.1])) == 0.875


def test_two_folds_pooled_and_the_better_method_has_an_interval_above_zero(tmp_path, capsys):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 120)
    weak = np.clip(0.5 + 0.15 * (labels - 0.5) + rng.normal(0, 0.25, 120), 0, 1)  # overlapping scores
    strong = np.clip(labels * 0.8 + 0.1 + rng.normal(0, 0.05, 120), 0, 1)  # separates the classes
    for name, scores in (("a", weak), ("b", strong)):
        for fold in (0, 1):
            idx = range(fold * 60, fold * 60 + 60)
            write_fold(tmp_path / name / f"fold{fold}", [(f"s{i:03d}", int(labels[i]), float(scores[i])) for i in idx])
    assert pb.main([str(tmp_path / "a"), str(tmp_path / "b"), "--names", "weak,strong", "--resamples", "300",
                    "--out", str(tmp_path / "paired.md")]) == 0
    text = (tmp_path / "paired.md").read_text()
    assert text.startswith("120 slides") and "pooled over 2 test set(s)" in text
    auc_row = next(line for line in text.splitlines() if line.startswith("| auc |"))
    diff = pb.auc(labels, strong) - pb.auc(labels, weak)
    assert f"{diff:+.3f}" in auc_row
    low = float(auc_row.split("[")[1].split(",")[0])
    assert 0 < low < diff and auc_row.endswith("| 0.000 |")  # B is better in every resample


def test_different_test_slides_or_a_slide_in_two_folds_are_one_line_errors(tmp_path, capsys):
    write_fold(tmp_path / "a" / "fold0", [("s1", 1, 0.9), ("s2", 0, 0.1)])
    write_fold(tmp_path / "b" / "fold0", [("s1", 1, 0.9), ("s3", 0, 0.1)])
    assert pb.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "not the same test slides" in capsys.readouterr().err
    write_fold(tmp_path / "c" / "fold0", [("s1", 1, 0.9)])
    write_fold(tmp_path / "c" / "fold1", [("s1", 1, 0.8)])
    assert pb.main([str(tmp_path / "c"), str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "s1 is in two test folds" in err[0]
    assert pb.main([str(tmp_path / "nowhere"), str(tmp_path / "a")]) == 2
    assert "no test_predictions.csv" in capsys.readouterr().err
