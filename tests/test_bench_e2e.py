"""scripts/bench_e2e_aggregator.py: both engines from one seed give the same loss curve, and the table and figure are written."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def test_acc_and_full_bag_runs_side_by_side_on_digits_bags(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_e2e_aggregator", REPO / "scripts" / "bench_e2e_aggregator.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tiny = ["dataset.train_bags=4", "dataset.val_bags=2", "dataset.test_bags=2", "dataset.bag_size=8",
            "telemetry.count_saved_tensors=true", "trainer.precision=64-true"]
    threads = torch.get_num_threads()
    bench.main(["--aggregator", "abmil", "--dataset", "digits_bags", "--epochs", "2", "--alpha", "25", "--out", str(tmp_path), *tiny])
    assert torch.get_num_threads() == threads  # process-wide setting given back (later in-process runs depend on it)
    runs = {name: bench.read_columns(tmp_path / "runs" / f"abmil_{name}" / "metrics.csv") for name in ("full", "acc")}
    assert max(bench.relative_difference(runs["acc"]["train/loss"], runs["full"]["train/loss"])) < 1e-10  # float64: exact
    assert max(runs["acc"]["memory/peak_saved_mb"]) < max(runs["full"]["memory/peak_saved_mb"])  # chunks of 2 of 8 instances
    table = (tmp_path / "e2e_abmil.md").read_text().splitlines()
    assert table[2].startswith("| engine=full | ") and table[3].startswith("| engine=acc alpha=25 | ")
    assert (tmp_path / "e2e_abmil.png").stat().st_size > 10_000
