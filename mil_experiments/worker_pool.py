"""The worker processes of a table script's `--jobs N`: one torch thread each, none outliving its sweep.

A `ProcessPoolExecutor`'s workers do not notice when the process that started them dies (`kill
<pid>` or `kill -9` of the sweep): each would finish the run at hand, writing into its
folder beside a restarted sweep that resumes that very run, and then wait for work forever. Here
every worker watches its parent; once the parent is gone, a worker inside a task stops it the way
SIGTERM stops a run (Lightning finishes the bag at hand and raises; `last.ckpt` stays that of the
last finished epoch, so the restarted sweep resumes from it) and exits as the task returns, without
starting the tasks already queued to it; an idle worker exits at once. (Ctrl-C and a closed
terminal send their signal to the workers themselves: they end with the sweep without this.)

    pool = one_thread_pool(jobs)
    future = pool.submit(run_task, train_run, method, seed)   # train_run(method, seed) in a worker
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

PARENT_POLL_S = 1.0  # how often a worker checks that the sweep that started it is alive
STOP_GRACE_S = 300.0  # how long a stopped task may take to reach the end of its bag before the worker exits anyway

_task_running = threading.Event()
_parent_gone = threading.Event()


def one_thread_pool(jobs: int, quiet_lightning: bool = False):
    """A spawn-context process pool of `jobs` workers, each on one torch thread (what OMP_NUM_THREADS=1 gives)."""
    import concurrent.futures
    import multiprocessing

    return concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_start_worker, initargs=(os.getpid(), quiet_lightning))


def run_task(fn, *args):
    """`fn(*args)` in a worker, marked as a task in progress for the parent watch. Submit tasks through it.

    Once the sweep is gone the worker exits here: before a task queued to it starts, and as soon
    as a stopped task returns (its files are written by then).
    """
    _task_running.set()  # set, then check the parent: the watch sets gone, then checks running, so one of the two sees the other
    try:
        if _parent_gone.is_set():
            os._exit(1)
        return fn(*args)
    finally:
        if _parent_gone.is_set():
            os._exit(1)
        _task_running.clear()


def _start_worker(parent_pid: int, quiet_lightning: bool) -> None:
    import torch

    torch.set_num_threads(1)
    if quiet_lightning:
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    """Exit this worker once `parent_pid` is no longer its parent (the parent died and it was re-parented)."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    _parent_gone.set()
    if _task_running.is_set():
        os.kill(os.getpid(), signal.SIGTERM)  # in a fit: Lightning stops after the bag at hand; elsewhere: ends the process
        time.sleep(STOP_GRACE_S)  # run_task exits the process when the task returns; this is the bound
    os._exit(1)
