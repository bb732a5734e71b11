"""scripts/figure4_tiles.py: the multi-GPU paper's Figure 4 summary from two sweeps' run folders."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import figure4_tiles  # noqa: E402


def _job(folder: Path, number: int, k: str, seed: int, losses: list[float], aucs: list[float], test_auc: float) -> None:
    """One Hydra multirun job folder as a run leaves it: overrides, metrics.csv, results.json."""
    job = folder / str(number)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- dataset.tiles_per_bag={k}\n- seed={seed}\n- strategy=single\n")
    with (job / "metrics.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "train/loss", "val/loss", "val/auc"])
        for epoch, (loss, auc) in enumerate(zip(losses, aucs, strict=True)):
            writer.writerow([epoch, loss, 0.5, auc])
    (job / "results.json").write_text(json.dumps({"test": {"test/auc": test_auc}}))


def test_the_table_averages_the_seeds_per_k_and_reports_how_far_the_strategies_differ(tmp_path):
    for name, shift in (("single", 0.0), ("tile_parallel", 1e-7)):
        folder = tmp_path / name
        _job(folder, 0, "16", 1, [0.7, 0.6], [0.5, 0.6], 0.60)
        _job(folder, 1, "16", 2, [0.7, 0.4 + shift], [0.5, 0.8], 0.70)
        _job(folder, 2, "null", 1, [0.5, 0.1], [0.8, 0.9], 0.90)
        _job(folder, 3, "null", 2, [0.5, 0.1], [0.8, 0.9 - shift], 0.90)
    runs = {"single": figure4_tiles.job_runs(tmp_path / "single"), "tile_parallel x2": figure4_tiles.job_runs(tmp_path / "tile_parallel")}
    text = figure4_tiles.write_outputs(runs, tmp_path)

    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in text.splitlines() if line.startswith("| 16") or line.startswith("| all")}
    assert list(rows) == ["16", "all"]  # K in order, every tile last
    assert rows["16"][:3] == ["0.5000 ± 0.1000", "0.700 ± 0.100", "0.650 ± 0.050"]  # final epoch, mean ± population std
    assert rows["all"][:3] == ["0.1000 ± 0.0000", "0.900 ± 0.000", "0.900 ± 0.000"]
    assert rows["16"][-1].strip(" |") == "2"  # seeds per K
    assert "train loss 1.00e-07, val AUC 1.00e-07" in text
    with (tmp_path / "figure4.csv").open() as f:
        assert sum(1 for _ in csv.DictReader(f)) == 2 * 4 * 2  # strategies x jobs x epochs
    assert (tmp_path / "figure4.png").stat().st_size > 10_000


def test_a_job_without_the_k_override_is_reported_by_its_folder(tmp_path):
    _job(tmp_path / "single", 0, "16", 1, [0.7], [0.5], 0.6)
    (tmp_path / "single" / "0" / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
    with pytest.raises(SystemExit, match=r"single/0/.hydra/overrides.yaml: no dataset.tiles_per_bag override"):
        figure4_tiles.job_runs(tmp_path / "single")
