"""The `--jobs` workers of the table scripts: one torch thread each, and gone once their sweep is killed."""
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mil_experiments.worker_pool import one_thread_pool, run_task

REPO = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie left for a non-reaping PID 1 counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def test_a_worker_runs_on_one_torch_thread_and_returns_the_task_result():
    with one_thread_pool(1) as pool:
        assert pool.submit(run_task, _threads).result() == 1
        assert pool.submit(run_task, divmod, 7, 2).result() == (3, 1)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to see the worker end")
@pytest.mark.parametrize("busy", [True, False], ids=["inside a task", "idle"])
def test_workers_exit_when_the_sweep_that_started_them_is_killed(tmp_path, busy):
    """`kill -9 <sweep>`: a worker inside a run gets SIGTERM, exits when the run returns and starts no queued run."""
    sweep = textwrap.dedent(f"""
        import os, signal, sys, time
        from pathlib import Path
        from mil_experiments.worker_pool import one_thread_pool, run_task

        def run_until_sigterm(marker):  # what Lightning does: note SIGTERM, stop after the bag at hand
            stop = []
            signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
            while not stop:
                time.sleep(0.05)
            Path(marker).write_text("stopped")

        if __name__ == "__main__":
            pool = one_thread_pool(1)
            print(pool.submit(run_task, os.getpid).result(), flush=True)
            if {busy}:
                pool.submit(run_task, run_until_sigterm, {str(tmp_path / "first")!r})
                pool.submit(run_task, Path({str(tmp_path / "queued")!r}).write_text, "ran")
            time.sleep(600)
    """)
    script = tmp_path / "sweep.py"
    script.write_text(sweep)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    worker = None
    try:
        assert select.select([parent.stdout], [], [], 120)[0], "the sweep printed no worker pid"
        worker = int(parent.stdout.readline())
        time.sleep(1)  # the first task is running in the worker
        assert _alive(worker)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 20
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(worker)
        if busy:
            assert (tmp_path / "first").read_text() == "stopped"  # SIGTERM, and the task ran to its end
            assert not (tmp_path / "queued").exists()
    finally:
        parent.kill()
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)


@pytest.mark.slow
def test_a_sweep_killed_mid_run_resumes_to_the_numbers_of_an_uninterrupted_one(tmp_path):
    """zoommil_tables --jobs 2 killed with -9 after an epoch: the workers end, the rerun resumes both seeds, same results."""
    import json

    cohort = tmp_path / "bright_small"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_cohorts.py"), "bright_like", "cohort.num_slides=12", f"root={cohort}"],
                   cwd=REPO, check=True, capture_output=True)
    argv = [sys.executable, str(REPO / "scripts" / "zoommil_tables.py"), "--cohort", str(cohort), "--table", "2", "--methods", "abmil",
            "--seeds", "1,2", "--predict-limit", "1", "trainer.max_epochs=40"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*argv, "--out", str(tmp_path / "whole")], cwd=REPO, env=env, check=True, capture_output=True)
    runs = [Path("bright_like") / "table2" / "abmil" / f"seed{s}" for s in (1, 2)]
    sweep = subprocess.Popen([*argv, "--out", str(tmp_path / "killed"), "--jobs", "2"], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = [tmp_path / "killed" / run / "checkpoints" / "last.ckpt" for run in runs]
    deadline = time.monotonic() + 300
    while not all(c.is_file() for c in ckpts) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(c.is_file() for c in ckpts), "no run of the sweep finished an epoch in 300 s"
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(sweep.pid)], capture_output=True, text=True).stdout.split()]
    sweep.send_signal(signal.SIGKILL)
    sweep.wait(timeout=10)
    deadline = time.monotonic() + 60
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert workers and not any(map(_alive, workers))
    assert not any((tmp_path / "killed" / run / "results.json").is_file() for run in runs)  # stopped mid-run
    finished = subprocess.run([*argv, "--out", str(tmp_path / "killed"), "--jobs", "2"], cwd=REPO, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert finished.stderr.count("resuming") + finished.stdout.count("resuming") == 2
    for run in runs:
        whole, resumed = (json.loads((tmp_path / folder / run / "results.json").read_text()) for folder in ("whole", "killed"))
        assert resumed["test"] == whole["test"]
        assert resumed["selection"]["selected_epoch"] == whole["selection"]["selected_epoch"]
        assert (tmp_path / "killed" / run / "test_predictions.csv").read_text() == (tmp_path / "whole" / run / "test_predictions.csv").read_text()
