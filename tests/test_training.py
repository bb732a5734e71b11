"""Training through the real config tree: runs, files, determinism, multiruns, the API."""

from __future__ import annotations

import csv
import json

import lightning as L
import pytest
import torch

from mil_experiments import compose_experiment
from mil_experiments.api import compose_config
from mil_experiments.run import train_and_test
from tests.conftest import run_cli


def test_abmil_run_writes_its_files(tiny, tmp_path):
    results = train_and_test(compose_config(tiny), tmp_path)
    for name in ("config.yaml", "metrics.csv", "results.json", "checkpoints/selected.ckpt"):
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["method"] == "abmil" and saved["seed"] == 42 and saved["epochs"] == 2
    for key in ("test/accuracy", "test/auc", "test/f1_weighted", "test/instance_auc"):
        assert 0.0 <= saved["test"][key] <= 1.0
    assert saved["time"]["train_seconds"] > 0 and saved["memory"]["peak_saved_activations_mb"] > 0
    assert saved["versions"]["torch"].startswith("2.14.1")
    assert saved["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # what the float32 bits depend on
    assert saved["machine"]["torch_threads"] >= 1
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert {"train/loss", "val/loss", "val/error", "val/auc", "time/epoch_train_s", "memory/peak_saved_mb"} <= set(rows[0])
    checkpoint = torch.load(tmp_path / "checkpoints/selected.ckpt", weights_only=False)
    assert checkpoint["epoch"] == saved["selection"]["selected_epoch"]
    assert results["test"] == saved["test"]


def test_same_seed_gives_identical_metrics(tiny, tmp_path):
    first = train_and_test(compose_config(tiny + ["seed=3"]), tmp_path / "a")
    second = train_and_test(compose_config(tiny + ["seed=3"]), tmp_path / "b")
    assert first["test"] == second["test"]
    a = list(csv.DictReader((tmp_path / "a/metrics.csv").open()))
    b = list(csv.DictReader((tmp_path / "b/metrics.csv").open()))
    assert [r["train/loss"] for r in a] == [r["train/loss"] for r in b]
    assert [r["val/loss"] for r in a] == [r["val/loss"] for r in b]


def test_acc_matches_full_bag_training_without_batch_norm(tmp_path):
    """3 epochs of abmil_acc alpha=25 and abmil from the same seed: losses agree to 1e-5."""
    common = [
        "dataset.train_bags=12",
        "dataset.val_bags=4",
        "dataset.test_bags=4",
        "dataset.bag_size=16",
        "trainer.max_epochs=3",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "telemetry.count_saved_tensors=false",
        "method.optimizer.lr=1e-3",
    ]
    train_and_test(compose_config(common + ["method=abmil"]), tmp_path / "full")
    acc = train_and_test(compose_config(common + ["method=abmil_acc", "alpha=25"]), tmp_path / "acc")
    assert acc["engine"]["chunk_size"] == 4 and acc["engine"]["acc_mode"] == "cached"
    full_rows = list(csv.DictReader((tmp_path / "full/metrics.csv").open()))
    acc_rows = list(csv.DictReader((tmp_path / "acc/metrics.csv").open()))
    for f, a in zip(full_rows, acc_rows, strict=True):
        for key in ("train/loss", "val/loss"):
            assert abs(float(a[key]) - float(f[key])) / float(f[key]) < 1e-5


def test_everyday_overrides_compose_and_train(tmp_path):
    overrides = ["method=abmil", "dataset=digits_bags", "trainer.max_epochs=1", "seed=3"]
    results = train_and_test(compose_config(overrides + ["dataset.train_bags=6", "dataset.val_bags=2",
                                                         "dataset.test_bags=4", "logger=csv",
                                                         "trainer.enable_progress_bar=false"]), tmp_path)
    assert results["seed"] == 3 and results["epochs"] == 1
    assert (tmp_path / "lightning_csv").exists()


def test_python_api_gives_parts_ready_for_fit(tiny):
    experiment = compose_experiment(tiny + ["method=abmil_acc", "alpha=50"])
    assert experiment.method.engine.config.alpha == 50.0
    assert experiment.method.encoder.out_dim == 500
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, enable_model_summary=False)
    trainer.fit(experiment.method, datamodule=experiment.datamodule)
    assert {"train/loss", "train/loss_bag", "val/loss", "val/auc"} <= set(trainer.callback_metrics)


def test_multirun_writes_one_summary_row_per_job(tmp_path):
    result = run_cli(["-m", "seed=1,2", *_tiny_cli(), f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "sweep/summary.csv").open()))
    assert [r["seed"] for r in rows] == ["1", "2"]
    assert all(r["status"] == "ok" and 0 <= float(r["test.test/accuracy"]) <= 1 for r in rows)


def test_wandb_logger_runs_offline_and_closes(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = [a for a in _tiny_cli() if not a.startswith("logger=")] + ["logger=wandb", "trainer.max_epochs=1",
                                                                      f"hydra.run.dir={tmp_path}/run"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    offline_runs = list((tmp_path / "run/wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1


def _tiny_cli() -> list[str]:
    from tests.conftest import TINY

    return list(TINY)


@pytest.mark.slow
def test_demo_reaches_the_accuracy_bound(tmp_path):
    """The README demo (ABMIL-ACC-25% on digits bags) reaches test bag accuracy >= 0.85."""
    results = train_and_test(compose_config(["method=abmil_acc", "alpha=25", "logger=none",
                                             "trainer.enable_progress_bar=false"]), tmp_path)
    assert results["test"]["test/accuracy"] >= 0.85
