"""Cost of the per-epoch training-state checkpoint (`checkpoints/last.ckpt`) for a configuration.

    python scripts/checkpoint_cost.py method=abmil_acc alpha=25      # the demo

Trains one epoch of the configuration, then times `Trainer.save_checkpoint` (what the
per-epoch checkpoint does) a few times and prints its median time, its size, and both
against the epoch's training time.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from mil_experiments.api import compose_config
from mil_experiments.experiment import build_experiment, build_trainer


def main(overrides: list[str], repeats: int = 5) -> None:
    out = Path(tempfile.mkdtemp(prefix="checkpoint_cost_"))
    cfg = compose_config([*overrides, "trainer.max_epochs=1", "logger=none", "trainer.enable_progress_bar=false"])
    experiment = build_experiment(cfg, out)
    trainer, callbacks = build_trainer(experiment)
    trainer.fit(experiment.method, datamodule=experiment.datamodule)
    epoch_seconds = callbacks.telemetry.total_train_seconds
    seconds = []
    for i in range(repeats):
        start = time.perf_counter()
        trainer.save_checkpoint(out / f"probe{i}.ckpt")
        seconds.append(time.perf_counter() - start)
    size_mb = (out / "probe0.ckpt").stat().st_size / 2**20
    save = statistics.median(seconds)
    print(f"per-epoch checkpoint: {save * 1000:.1f} ms, {size_mb:.2f} MB on disk (one file, replaced each epoch);"
          f" training epoch {epoch_seconds:.2f} s -> {100 * save / epoch_seconds:.2f}% of the training time")


if __name__ == "__main__":
    main(sys.argv[1:])
