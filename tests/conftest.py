"""Shared test fixtures: tiny configs that train in seconds on a CPU."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Tiny digits bags and a short run: the real config tree, at toy scale.
TINY = [
    "dataset.train_bags=8",
    "dataset.val_bags=4",
    "dataset.test_bags=6",
    "dataset.bag_size=6",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "evaluation.bootstrap=0",  # 1000 resamples cost ~3 s a run; tests/test_protocols.py covers them
]


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m mil_experiments <args>` in `cwd`, with the repo importable."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run(
        [sys.executable, "-m", "mil_experiments", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextlib.contextmanager
def training_stopped_at_epoch(epoch: int):
    """Runs trained inside raise RuntimeError("stopped") as `epoch` starts (the earlier epochs and their last.ckpt written)."""
    from unittest import mock

    import lightning.pytorch as pl

    import mil_experiments.experiment as experiment

    class Stop(pl.Callback):
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == epoch:
                raise RuntimeError("stopped")

    build_trainer = experiment.build_trainer

    def with_stop(exp):
        trainer, callbacks = build_trainer(exp)
        trainer.callbacks.append(Stop())
        return trainer, callbacks

    with mock.patch.object(experiment, "build_trainer", with_stop), pytest.raises(RuntimeError, match="stopped"):
        yield
