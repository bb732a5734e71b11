"""scripts/mhim_tables.py: MHIM's supplement tables as stage-2 variants of a recipe, on a tiny c16_like cohort."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import mhim_tables  # noqa: E402

from mil_experiments.errors import ConfigError  # noqa: E402

TINY = ["trainer.max_epochs=1", "encoder.standardize=true", "evaluation.bootstrap=0", "logger=none", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def preset() -> dict:
    return mhim_tables.preset_method("abmil_c16")


def folders(table: str, preset: dict, recipe: str = "abmil_c16") -> dict[str, str]:
    return {row.label: mhim_tables.run_folder(row, preset) for row in mhim_tables.table_rows(table, recipe)}


def test_the_published_recipe_is_the_plain_stage_two_folder_in_every_table(preset):
    assert folders("supp2", preset) == {"AB-MIL": "stage1", "HAM": "stage2_mask_ratio=0.0", "R-HAM": "stage2",
                                        "L-HAM": "stage2_mask_ratio=0.0,mask_ratio_l=0.2", "LR-HAM": "stage2_mask_ratio_l=0.2"}
    assert folders("table3", preset)["β_h → 0 (cosine decay)"] == "stage2"
    assert folders("table4", preset) == {"w/o randomly HAM (ρ = 1)": "stage2_mask_ratio_hr=1.0", "w/ randomly HAM (ρ = 0.5)": "stage2"}
    assert folders("table5", preset) == {"AB-MIL": "stage1", "AB-MIL w/ init (fc)": "stage1_init_fc",
                                         "MHIM-MIL w/o init": "stage2_init_stu_type=none", "MHIM-MIL w/ init (fc)": "stage2"}
    assert folders("figure8", preset)["α 0.1"] == "stage2"  # the recipe's cl_alpha
    # LR-HAM of Table 2 is Table 1's 50% / 20% row: one run serves both
    assert folders("table1", preset)["β_r 50%, β_l 20%"] == folders("supp2", preset)["LR-HAM"]


def test_tcga_rows_change_the_tcga_recipe(preset):
    tcga = mhim_tables.preset_method("abmil_tcga")
    assert (tcga["mask_ratio"], tcga["mask_ratio_l"], tcga["mask_ratio_hr"]) == (0.7, 0.2, 1.0)
    assert folders("supp2", tcga, "abmil_tcga")["LR-HAM"] == "stage2"
    assert folders("table4", tcga, "abmil_tcga")["w/o randomly HAM (ρ = 1)"] == "stage2"


def test_bad_table_and_key_are_one_line_errors(preset, capsys):
    with pytest.raises(ConfigError, match="table6.*transmil recipe"):
        mhim_tables.table_rows("table6", "abmil_c16")
    with pytest.raises(ConfigError, match="method.not_a_key"):
        mhim_tables.run_folder(mhim_tables.Row("x", {"not_a_key": 1}), preset)
    assert mhim_tables.main(["--recipe", "abmil_c16", "--tables", "table9", "--list"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown table 'table9'" in err


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Tables 3, 4 and 5 on a 12-slide cohort, fold 0, 1 epoch: stage 1, its fc-initialised rerun, the recipe and three variants."""
    root = tmp_path_factory.mktemp("mhimtables")
    cohort = root / "c16"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_cohorts.py"), "c16_like", "cohort.num_slides=12", f"root={cohort}"],
                   cwd=REPO, check=True, capture_output=True)
    subprocess.run([sys.executable, str(REPO / "scripts" / "mhim_tables.py"), "--recipe", "abmil_c16", "--tables", "table3,table4,table5",
                    "--folds", "0", "--out", str(root / "tables"), "--stage2", "method.kept_order=ascending",
                    f"dataset.root={cohort / 'features' / 'lenet'}", *TINY],
                   cwd=REPO, check=True, capture_output=True)
    return root / "tables" / "abmil_c16"


def test_each_run_is_trained_once_and_shared_by_the_tables(sweep):
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [
        "stage1", "stage1_init_fc", "stage2", "stage2_init_stu_type=none", "stage2_mask_ratio_hr=1.0", "stage2_mrh_sche=False"]
    for table, rows in (("table3", 2), ("table4", 2), ("table5", 4)):
        with open(sweep / f"{table}.csv") as f:
            written = list(csv.DictReader(f))
        assert len(written) == rows and all(0.0 <= float(r["auc_mean"]) <= 1.0 for r in written)
        assert "| row | AUC |" in (sweep / f"{table}.md").read_text()


def test_a_variant_changes_only_its_value_and_learns_from_stage_one(sweep):
    recipe = OmegaConf.load(sweep / "stage2" / "fold0" / "config.yaml").method
    variant = OmegaConf.load(sweep / "stage2_mask_ratio_hr=1.0" / "fold0" / "config.yaml").method
    assert (recipe.mask_ratio_hr, variant.mask_ratio_hr) == (0.5, 1.0)
    assert recipe.kept_order == variant.kept_order == "ascending"  # --stage2: the MHIM runs only, stage 1 has no such key
    assert {k: v for k, v in variant.items() if k != "mask_ratio_hr"} == {k: v for k, v in recipe.items() if k != "mask_ratio_hr"}
    assert Path(variant.teacher_init) == sweep / "stage1" / "fold0"


def test_the_baseline_with_init_is_stage_one_again_with_its_fc(sweep):
    first = OmegaConf.load(sweep / "stage1" / "fold0" / "config.yaml")
    again = OmegaConf.load(sweep / "stage1_init_fc" / "fold0" / "config.yaml")
    assert Path(again.method.init_fc_from) == sweep / "stage1" / "fold0"
    again.method.init_fc_from = None
    assert again.method == first.method and again.seed == first.seed and again.aggregator == first.aggregator


def test_a_second_call_reuses_every_run(sweep, capsys):
    results = sorted(sweep.rglob("results.json"))
    stamps = [p.stat().st_mtime_ns for p in results]
    assert mhim_tables.main(["--recipe", "abmil_c16", "--tables", "table4", "--folds", "0", "--out", str(sweep.parent)]) == 0
    assert [p.stat().st_mtime_ns for p in sorted(sweep.rglob("results.json"))] == stamps
    assert "reusing" in capsys.readouterr().out


def test_cost_columns_follow_the_kept_share(sweep):
    """scripts/mhim_cost.py (supplement Table 2's cost columns): masking shrinks the student's saved activations."""
    import mhim_cost

    cohort = sweep.parent.parent / "c16"
    rows = {r.strategy: r for r in mhim_cost.measure("abmil_c16", bags=2, repeats=1, device="cpu",
                                                       extra=[f"dataset.root={cohort / 'features' / 'lenet'}", "encoder.standardize=true"])}
    assert list(rows) == ["AB-MIL", "HAM", "R-HAM", "L-HAM", "LR-HAM"]
    assert len({r.parameters for r in rows.values()}) == 1  # the student is the baseline's model
    assert rows["AB-MIL"].kept_share == 1.0
    assert 0.45 <= rows["R-HAM"].kept_share <= 0.5 and rows["LR-HAM"].kept_share < rows["R-HAM"].kept_share
    assert rows["R-HAM"].peak_saved_mb < 0.6 * rows["AB-MIL"].peak_saved_mb
    assert all(r.seconds_per_epoch > 0 for r in rows.values())


def test_jobs_give_the_runs_of_one_process_stage_one_first(sweep, tmp_path, monkeypatch):
    """--jobs 2: stage 1 then the rows in one-thread worker processes, the sequential runs' numbers bit for bit."""
    import concurrent.futures
    import json

    import torch

    submitted = []

    class CountingPool(concurrent.futures.ProcessPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            submitted.append(args[2])  # run_task(train_fold, recipe, folder, ...)
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", CountingPool)
    cohort = sweep.parent.parent / "c16"
    argv = ["--recipe", "abmil_c16", "--tables", "table4", "--folds", "0", f"dataset.root={cohort / 'features' / 'lenet'}", *TINY]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what OMP_NUM_THREADS=1 gives the sequential command, and each worker
    try:
        assert mhim_tables.main([*argv, "--out", str(tmp_path / "sequential")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert not submitted
    assert mhim_tables.main([*argv, "--out", str(tmp_path / "parallel"), "--jobs", "2"]) == 0
    assert submitted == ["stage1", "stage2_mask_ratio_hr=1.0", "stage2"]  # the teacher before its students
    for folder in submitted:
        run = Path("abmil_c16") / folder / "fold0"
        sequential, parallel = tmp_path / "sequential" / run, tmp_path / "parallel" / run
        assert (parallel / "test_predictions.csv").read_text() == (sequential / "test_predictions.csv").read_text()
        assert json.loads((parallel / "results.json").read_text())["test"] == json.loads((sequential / "results.json").read_text())["test"]
    assert (tmp_path / "parallel" / "abmil_c16" / "table4.md").read_text() == (tmp_path / "sequential" / "abmil_c16" / "table4.md").read_text()
    assert mhim_tables.main([*argv, "--out", str(tmp_path / "parallel"), "--jobs", "2"]) == 0
    assert len(submitted) == 3  # nothing left to train: no worker started
    assert mhim_tables.main([*argv, "--out", str(tmp_path / "o"), "--jobs", "0"]) == 2
