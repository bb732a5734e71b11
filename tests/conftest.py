"""Shared test fixtures: tiny configs that train in seconds on a CPU."""

from __future__ import annotations

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
