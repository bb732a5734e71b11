"""scripts/zoommil_tables.py: the ZoomMIL tables on a tiny bright_like cohort (2 methods x 2 seeds, 1 epoch)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import zoommil_tables  # noqa: E402


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """A 12-slide bright_like cohort (slides, masks, LeNet features), about 15 s."""
    root = tmp_path_factory.mktemp("cohort") / "bright_small"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_cohorts.py"), "bright_like", "cohort.num_slides=12", f"root={root}"],
                   cwd=REPO, check=True, capture_output=True)
    return root


def test_table_rows_are_the_runs_means_and_a_rerun_reuses_them(cohort, tmp_path, capsys):
    out = tmp_path / "tables"
    argv = ["--cohort", str(cohort), "--table", "2", "--methods", "abmil,zoommil", "--seeds", "1,2",
            "--out", str(out), "--predict-limit", "2", "trainer.max_epochs=1"]
    assert zoommil_tables.main(argv) == 0
    folder = out / "bright_like" / "table2"  # the paper's BRIGHT table
    rows = {r["method"]: r for r in csv.DictReader((folder / "table.csv").open())}
    assert list(rows) == ["abmil", "zoommil"]
    for method, row in rows.items():
        assert row["n"] == "2"
        results = [json.loads((folder / method / f"seed{s}" / "results.json").read_text())["test"] for s in (1, 2)]
        for key in ("f1_weighted", "accuracy", "kappa_quadratic", "auc"):
            values = [r[f"test/{key}"] for r in results]
            assert float(row[f"{key}_mean"]) == pytest.approx(np.mean(values))
            assert float(row[f"{key}_std"]) == pytest.approx(np.std(values))
        for key in ("tiles_per_slide", "tflops_per_slide", "seconds_per_slide", "slides_per_hour"):
            assert float(row[key]) > 0
        assert row["compute_slides"] == "2"
    # ZoomMIL encodes the 1.25x tiles and the children of K of them; ABMIL every 10x tissue tile
    assert float(rows["zoommil"]["tflops_per_slide"]) < float(rows["abmil"]["tflops_per_slide"])
    assert float(rows["zoommil"]["tiles_per_slide"]) < float(rows["abmil"]["tiles_per_slide"])
    assert (folder / "figure3.png").stat().st_size > 0
    table = (folder / "table.md").read_text()
    assert "| ABMIL | 10x |" in table and "| ZoomMIL | 1.25x → 2.5x → 10x |" in table
    assert table in capsys.readouterr().out

    watched = [folder / m / f"seed{s}" / "results.json" for m in rows for s in (1, 2)] + [folder / m / "predict" / "summary.json" for m in rows]
    before = {p: p.stat().st_mtime_ns for p in watched}
    (folder / "table.csv").unlink()
    assert zoommil_tables.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in watched} == before  # nothing retrained, nothing re-predicted
    assert [r["method"] for r in csv.DictReader((folder / "table.csv").open())] == ["abmil", "zoommil"]

    # a method with its own seeds (TransMIL's one seed): its row is that seed's, shown without a spread
    assert zoommil_tables.main([*argv, "--method-seeds", "zoommil=1"]) == 0
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    rows = {r["method"]: r for r in csv.DictReader((folder / "table.csv").open())}
    assert rows["abmil"]["n"] == "2" and rows["zoommil"]["n"] == "1"
    seed1 = json.loads((folder / "zoommil" / "seed1" / "results.json").read_text())["test"]["test/f1_weighted"]
    assert float(rows["zoommil"]["f1_weighted_mean"]) == pytest.approx(seed1)
    line = next(li for li in (folder / "table.md").read_text().splitlines() if li.startswith("| ZoomMIL |"))
    assert f"| {seed1:.3f} |" in line and "±" not in line
    assert "zoommil: seeds 1" in (folder / "table.md").read_text()


def test_an_interrupted_run_resumes_from_its_last_epoch_with_the_numbers_of_an_uninterrupted_one(cohort, tmp_path, capsys):
    from tests.conftest import training_stopped_at_epoch

    abmil = next(m for m in zoommil_tables.table_methods(zoommil_tables.find_cohort(str(cohort)), 2) if m.name == "abmil")
    extra = ["trainer.max_epochs=3"]
    whole = zoommil_tables.train_run(abmil, 1, extra, tmp_path / "whole")
    run_dir = tmp_path / "interrupted"
    with training_stopped_at_epoch(1):
        zoommil_tables.train_run(abmil, 1, extra, run_dir)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / "results.json").exists()
    resumed = zoommil_tables.train_run(abmil, 1, extra, run_dir)
    assert f"resuming {run_dir}" in capsys.readouterr().out
    assert resumed["test"] == whole["test"] and resumed["selection"]["selected_epoch"] == whole["selection"]["selected_epoch"]
    assert [r["val/loss"] for r in csv.DictReader((run_dir / "metrics.csv").open())] == \
        [r["val/loss"] for r in csv.DictReader((tmp_path / "whole" / "metrics.csv").open())]
    with training_stopped_at_epoch(1):  # other settings than the interrupted run's: trained afresh
        zoommil_tables.train_run(abmil, 2, extra, tmp_path / "other")
    (tmp_path / "other" / "config.yaml").write_text("seed: 99\n")
    zoommil_tables.train_run(abmil, 2, extra, tmp_path / "other")
    assert "resuming" not in capsys.readouterr().out


def test_jobs_train_in_worker_processes_with_the_numbers_of_one_process(cohort, tmp_path, monkeypatch):
    """--jobs 2: each run in its own one-thread process gives the runs of the sequential command, bit for bit."""
    import concurrent.futures

    import torch

    submitted = []

    class CountingPool(concurrent.futures.ProcessPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            submitted.append(args[1:3])  # run_task(train_run, method, seed, ...)
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", CountingPool)

    argv = ["--cohort", str(cohort), "--table", "2", "--methods", "abmil", "--seeds", "1,2", "--predict-limit", "1", "trainer.max_epochs=1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what OMP_NUM_THREADS=1 gives the sequential command, and each worker
    try:
        assert zoommil_tables.main([*argv, "--out", str(tmp_path / "sequential")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert not submitted  # --jobs 1: no worker
    assert zoommil_tables.main([*argv, "--out", str(tmp_path / "parallel"), "--jobs", "2"]) == 0
    assert sorted(seed for _, seed in submitted) == [1, 2]  # both runs trained in workers
    for seed in (1, 2):
        run = Path("bright_like") / "table2" / "abmil" / f"seed{seed}"
        sequential, parallel = tmp_path / "sequential" / run, tmp_path / "parallel" / run
        assert (parallel / "test_predictions.csv").read_text() == (sequential / "test_predictions.csv").read_text()
        assert json.loads((parallel / "results.json").read_text())["test"] == json.loads((sequential / "results.json").read_text())["test"]
    rows = [r for r in csv.DictReader((tmp_path / "parallel" / "bright_like" / "table2" / "table.csv").open())]
    assert [(r["method"], r["n"]) for r in rows] == [("abmil", "2")]
    assert zoommil_tables.main([*argv, "--out", str(tmp_path / "parallel"), "--jobs", "2"]) == 0
    assert len(submitted) == 2  # finished runs are read back, no worker started for them
    assert zoommil_tables.main([*argv, "--out", str(tmp_path / "o"), "--jobs", "0"]) == 2


def test_a_cohort_without_features_is_one_line_naming_the_folder(tmp_path, capsys):
    missing = tmp_path / "no_cohort"
    assert zoommil_tables.main(["--cohort", str(missing), "--table", "2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("error: ") and str(missing / "features" / "lenet") in err
    assert not (tmp_path / "o").exists()


def test_unknown_method_and_bad_seeds_are_refused(cohort, tmp_path, capsys):
    assert zoommil_tables.main(["--cohort", str(cohort), "--table", "4", "--methods", "abmil", "--out", str(tmp_path)]) == 2
    assert "--methods: abmil not in table 4" in capsys.readouterr().err
    assert zoommil_tables.main(["--cohort", str(cohort), "--table", "2", "--seeds", "1,x", "--out", str(tmp_path)]) == 2
    assert "--seeds 1,x" in capsys.readouterr().err
    for value in ("nope=1", "abmil", "abmil=1,x"):
        assert zoommil_tables.main(["--cohort", str(cohort), "--table", "2", "--method-seeds", value, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"--method-seeds {value}" in err


def test_a_comparison_table_of_another_data_set_is_refused(cohort, tmp_path, capsys):
    for table in (1, 3):  # bright_like stands in for BRIGHT: the paper's Table 2
        assert zoommil_tables.main(["--cohort", str(cohort), "--table", str(table), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"--table {table}: bright_like" in err and "Table 2" in err
    assert not (tmp_path / "o").exists()


def test_table_presets_compose_for_every_row_of_every_cohort(cohort):
    from mil_experiments.api import compose_config

    for table, expected in ((2, 9), (4, 7)):
        methods = zoommil_tables.table_methods(zoommil_tables.find_cohort(str(cohort)), table)
        assert len(methods) == expected
        for m in methods:
            cfg = compose_config([*m.overrides, *zoommil_tables.COMMON, "seed=1"])
            assert cfg.dataset.root == str(cohort / "features" / "lenet")
            assert cfg.method.optimizer.lr == pytest.approx(1e-4)  # ZoomMIL's protocol on every row
            if table == 4:  # the paper ablates ZoomMIL-EFF (1.25x -> 2.5x on BRIGHT)
                assert list(cfg.dataset.magnifications) == [1.25, 2.5] and cfg.aggregator.k == 3
                assert cfg.aggregator.highest_only == (m.name == "highest_only")  # Features @2.5x
    # the paper's CRC (Table 1) and CAMELYON16 (Table 3) select on validation loss; ZoomMIL-EFF is CRC's lowest two
    # magnifications as the paper, and c16_like's extra 5x -> 20x (the paper has no EFF on CAMELYON16)
    for name, table, mags, eff in (("crc_like", 1, (5.0, 10.0, 20.0), [5.0, 10.0]), ("c16_like", 3, (5.0, 10.0, 20.0), [5.0, 20.0])):
        for m in zoommil_tables.table_methods(zoommil_tables.Cohort(name, cohort, mags), table):
            cfg = compose_config([*m.overrides, *zoommil_tables.COMMON, "seed=1"])
            assert cfg.selection.rule == "best_val_loss" and cfg.dataset.name == name
            expected = {"msmil": list(mags), "zoommil": list(mags), "zoommil_eff": eff}.get(m.name, [20.0])
            assert list(cfg.dataset.magnifications) == expected


def test_titles_name_a_cohort_in_its_default_folder_without_the_checkouts_path(cohort):
    default = zoommil_tables.Cohort("c16_like", zoommil_tables.REPO / "data" / "cohorts" / "c16_like", (5.0, 10.0, 20.0))
    assert default.label == "c16_like"
    elsewhere = zoommil_tables.find_cohort(str(cohort))
    assert elsewhere.label == f"bright_like ({cohort})"


def test_pareto_frontier_keeps_the_non_dominated_points_by_speed():
    points = [(10.0, 0.90), (100.0, 0.85), (50.0, 0.80), (1000.0, 0.60), (100.0, 0.70), (5.0, 0.90), (2000.0, 0.60)]
    # (50, .80) is dominated by (100, .85); (100, .70) by (100, .85); (5, .90) by (10, .90); (1000, .60) by (2000, .60)
    assert zoommil_tables.pareto_frontier(points) == [0, 1, 6]
    assert zoommil_tables.pareto_frontier([(1.0, 0.5)]) == [0]
    assert zoommil_tables.pareto_frontier([(1.0, 0.5), (1.0, 0.5)]) == [0, 1]  # ties dominate neither


def test_figure_labels_of_crowded_points_neither_overprint_nor_leave_the_axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # crc_like's Table 1 crowd: five baselines within 5% in speed and 0.06 in accuracy, one at the right edge
    points = [(6000.0, 0.667), (6100.0, 0.661), (6200.0, 0.656), (6150.0, 0.633), (6050.0, 0.611), (4100.0, 0.639), (38000.0, 0.667)]
    labels = ["CLAM-SB", "DSMIL", "ABMIL", "Mean-MIL", "MS-MIL", "TransMIL", "ZoomMIL-EFF"]
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    axis.plot(*zip(*points, strict=True), "o")
    axis.set(xscale="log", ylim=(0.35, 0.75))  # the figure's range: Max-MIL at 0.378 below them
    figure.tight_layout()
    zoommil_tables.label_points(axis, labels, points)
    renderer = figure.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in axis.texts]
    frame = axis.get_window_extent(renderer)
    plt.close(figure)
    assert sorted(t.get_text() for t in axis.texts) == sorted(labels)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
