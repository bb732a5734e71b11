"""Failure part-way: sweeps that survive a failed job, SIGTERM, resume, folders never overwritten, bad input before training."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mil_experiments.api import compose_config
from mil_experiments.config import validate
from mil_experiments.engine import chunk_slices
from mil_experiments.errors import ConfigError
from mil_experiments.run import train_and_test
from tests.conftest import REPO, TINY, run_cli

SLOWER = [a for a in TINY if not a.startswith("trainer.max_epochs")] + [
    "trainer.max_epochs=4", "dataset.train_bags=40", "dataset.bag_size=10", "telemetry.count_saved_tensors=false",
]  # fmt: skip


def test_a_sweep_runs_every_job_and_reports_the_failed_ones(tmp_path):
    """One config error and one run-time failure in a sweep: the others run, summary.csv says why, exit = failures."""
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", "seed=1,-1", "aggregator._target_=mil_experiments.models.abmil.ABMIL,tests.test_core_axes.BrokenAggregator",
                      *TINY, "trainer.max_epochs=1", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode == 3, result.stderr[-3000:]
    rows = {r["job"]: r for r in csv.DictReader((sweep / "summary.csv").open())}
    assert [rows[j]["status"] for j in sorted(rows)] == ["ok", "failed", "failed", "failed"]
    assert rows["1"]["reason"] == "ValueError: a bug inside a model"  # jobs: seed 1 x (ABMIL, broken), seed -1 x ...
    assert rows["2"]["reason"] == rows["3"]["reason"] == "seed=-1: must be in [0, 4294967295]"
    assert (sweep / "1" / "traceback.txt").exists() and "3 job(s) of the sweep failed" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_stops_with_status_143_keeps_what_was_written_and_resume_gives_the_same_results(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}  # same threads as the in-process run: float sums depend on them
    process = subprocess.Popen([sys.executable, "-m", "mil_experiments", *SLOWER, f"hydra.run.dir={run_dir}"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # stop it once two epochs are written
        if (run_dir / "metrics.csv").exists() and len((run_dir / "metrics.csv").read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    assert f"resume={run_dir}" in stderr.strip().splitlines()[-1]
    assert not (run_dir / "results.json").exists()
    assert (run_dir / "checkpoints/last.ckpt").exists() and (run_dir / "config.yaml").exists()

    resumed = run_cli([f"resume={run_dir}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    uninterrupted = train_and_test(compose_config(SLOWER), tmp_path / "whole")
    after = json.loads((run_dir / "results.json").read_text())
    assert after["test"] == uninterrupted["test"]
    assert after["selection"]["selected_epoch"] == uninterrupted["selection"]["selected_epoch"]
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    whole = list(csv.DictReader((tmp_path / "whole/metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["val/loss"] for r in rows] == [r["val/loss"] for r in whole]
    assert not list(tmp_path.glob("outputs/runs/*"))  # the resume left no stray folder


def test_a_folder_holding_a_run_is_refused_unless_overwrite(tmp_path):
    train_and_test(compose_config(TINY + ["trainer.max_epochs=1"]), tmp_path / "run")
    before = (tmp_path / "run/results.json").read_text()
    with pytest.raises(ConfigError, match=r"already holds a run \(results.json, metrics.csv, config.yaml, checkpoints\)"):
        train_and_test(compose_config(TINY + ["trainer.max_epochs=1", "seed=3"]), tmp_path / "run")
    assert (tmp_path / "run/results.json").read_text() == before
    results = train_and_test(compose_config(TINY + ["trainer.max_epochs=1", "seed=3", "overwrite=true"]), tmp_path / "run")
    assert results["seed"] == 3 and json.loads((tmp_path / "run/results.json").read_text())["seed"] == 3


def test_a_script_run_folder_is_trained_once_then_read_back_and_other_settings_are_noted(tmp_path):
    """train_or_reuse (the table scripts' runs): a finished folder is never trained again, and says when it holds other settings."""
    from mil_experiments.api import train_or_reuse

    overrides = TINY + ["trainer.max_epochs=1"]
    said = []
    first = train_or_reuse(overrides, tmp_path / "run", said.append)
    assert json.loads((tmp_path / "run/overrides.json").read_text()) == overrides and said == []
    written = (tmp_path / "run/results.json").stat().st_mtime_ns
    assert train_or_reuse(overrides, tmp_path / "run", said.append) == first and said == []
    assert train_or_reuse([*overrides, "seed=3"], tmp_path / "run", said.append) == first
    assert said == [f"note: {tmp_path / 'run'} was trained with other overrides; reused as it is (delete it to retrain)"]
    assert (tmp_path / "run/results.json").stat().st_mtime_ns == written


def test_cli_refusals_leave_no_folder_and_resume_refuses_a_finished_run(tmp_path):
    result = run_cli(["alpha=150", "logger=none", f"hydra.run.dir={tmp_path}/refused"], cwd=tmp_path)
    assert result.returncode == 2 and not (tmp_path / "refused").exists()
    (tmp_path / "a_file").write_text("x")
    result = run_cli([f"hydra.run.dir={tmp_path}/a_file"], cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].endswith("that path is a file, not a folder")
    train_and_test(compose_config(TINY + ["trainer.max_epochs=1"]), tmp_path / "done")
    result = run_cli([f"resume={tmp_path}/done"], cwd=tmp_path)
    assert result.returncode == 2 and "that run already finished" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("override, message", [
    ("seed=-1", r"seed=-1: must be in \[0, 4294967295\]"),
    ("seed=4294967296", r"seed=4294967296: must be in"),
    ("trainer.max_epochs=0", r"trainer.max_epochs=0: must be >= 1"),
    ("trainer.max_epochs=-1", r"trainer.max_epochs=-1: must be >= 1"),
    ("trainer.precision=bogus", r"trainer.precision='bogus': choose one of"),
    ("trainer.accelerator=tpu", r"trainer.accelerator='tpu': choose one of"),
    ("trainer.precision=16-mixed", r"float16 needs a CUDA GPU"),
])
def test_trainer_and_seed_values_are_refused_before_training(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config([override]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_gpu_accelerator_without_a_gpu_is_refused():
    with pytest.raises(ConfigError, match=r"trainer.accelerator=gpu: no CUDA GPU is available here"):
        validate(compose_config(["trainer.accelerator=gpu"]))


def test_batch_norm_never_gets_a_chunk_of_one_instance():
    """Regression: bag 13 at alpha 25 gave chunks 4, 4, 4, 1 and batch norm crashed on the last."""
    assert [s.stop - s.start for s in chunk_slices(13, 4, balanced=True)] == [4, 3, 3, 3]
    assert [s.stop - s.start for s in chunk_slices(12, 4, balanced=True)] == [4, 4, 4]
    from mil_experiments.engine import HeadResult, accumulate_gradients
    from mil_experiments.models.encoders import BottleneckResNetEncoder

    torch.manual_seed(0)
    encoder = BottleneckResNetEncoder(1, norm="batch")
    head = torch.nn.Linear(2048, 1)
    accumulate_gradients(encoder, lambda z: HeadResult(head(z).mean()), torch.randn(13, 1, 16, 16), 4)
    assert all(p.grad is not None for p in encoder.parameters())
    with pytest.raises(ConfigError, match=r"dataset.bag_size=1 with batch norm"):
        from mil_experiments import compose_experiment

        compose_experiment(["encoder=resnet_bottleneck", "dataset.bag_size=1", "dataset.image_size=16"])


def test_wandb_online_without_credentials_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    with pytest.raises(ConfigError, match=r"logger.mode=online: no W&B credentials .* or use logger.mode=offline"):
        train_and_test(compose_config(TINY + ["logger=wandb", "logger.mode=online"]), tmp_path / "run")
