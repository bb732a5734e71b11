"""scripts/accuracy_by_presentation.py: per-presentation accuracy of one run, and of a folder of fold runs pooled."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import accuracy_by_presentation as abp  # noqa: E402


def fake_run(folder: Path, predictions: list[tuple[str, int, int]], accuracy: float, auc: float) -> None:
    folder.mkdir(parents=True)
    lines = ["bag_id,label,predicted,p_0,p_1,loss"] + [f"{s},{y},{p},0.5,0.5,0.7" for s, y, p in predictions]
    (folder / "test_predictions.csv").write_text("\n".join(lines) + "\n")
    (folder / "results.json").write_text(json.dumps({"method": "abmil", "aggregator": "abmil", "test": {"test/accuracy": accuracy, "test/auc": auc}}))


def test_a_folder_of_folds_pools_the_predictions_and_averages_the_metrics(tmp_path, capsys):
    (tmp_path / "cohort").mkdir()
    (tmp_path / "cohort" / "slides.csv").write_text(
        "slide_id,label,class,presentation\na,0,normal,normal\nb,1,tumour,subtle_only\nc,1,tumour,subtle_only\nd,1,tumour,micro\n")
    fake_run(tmp_path / "cv" / "fold0", [("a", 0, 0), ("b", 1, 0)], 0.5, 0.6)
    fake_run(tmp_path / "cv" / "fold1", [("c", 1, 1), ("d", 1, 1)], 1.0, 0.8)
    pooled = abp.accuracy_by_presentation(tmp_path / "cv", tmp_path / "cohort" / "slides.csv")
    assert pooled == {"normal/normal": (1.0, 1), "tumour/micro": (1.0, 1), "tumour/subtle_only": (0.5, 2)}
    assert abp.main([str(tmp_path / "cohort"), str(tmp_path / "cv"), str(tmp_path / "cv" / "fold0")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {tmp_path}")]
    assert rows[0].endswith("| 0.750 ± 0.250 (2 runs) | 0.700 ± 0.100 (2 runs) |") and "0.50 (2)" in rows[0]
    assert rows[1].endswith("| 0.500 | 0.600 |") and "0.00 (1)" in rows[1]
    assert abp.main([str(tmp_path / "cohort"), str(tmp_path / "nowhere")]) == 2
    assert "no test_predictions.csv" in capsys.readouterr().err
