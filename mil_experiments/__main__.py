"""`python -m mil_experiments`: see `mil_experiments.run.main`.

After a multirun the summary is written however the jobs ended, and the exit status is
the number of failed jobs (0 when all succeeded).
"""

import sys
from pathlib import Path

from mil_experiments.run import SWEEP, main


def _refuse_run_dir_that_is_a_file(argv: list[str]) -> None:
    """Hydra would fail with a traceback creating a run folder where a file is."""
    for arg in argv:
        for key in ("hydra.run.dir=", "hydra.sweep.dir="):
            if arg.startswith(key) and Path(arg[len(key) :]).is_file():
                print(f"error: {arg}: that path is a file, not a folder", file=sys.stderr)
                sys.exit(2)


if __name__ == "__main__":
    _refuse_run_dir_that_is_a_file(sys.argv[1:])
    try:
        main()
    finally:
        if SWEEP.sweep_dir is not None:
            from mil_experiments.results import write_summary
            from mil_experiments.strategies import is_rank_zero

            if is_rank_zero():  # torchrun / srun: every rank ran the sweep; rank 0 writes its summary
                write_summary(SWEEP.sweep_dir)
    if SWEEP.failed:
        print(f"error: {len(SWEEP.failed)} job(s) of the sweep failed:\n  " + "\n  ".join(SWEEP.failed), file=sys.stderr)
        sys.exit(min(len(SWEEP.failed), 125))
