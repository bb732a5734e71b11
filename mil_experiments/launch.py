"""Starting the ranks of a multi-process run, and agreeing on its one run folder.

One machine (`python -m mil_experiments strategy=ddp trainer.devices=R`): Hydra composes
the config and makes the run folder once, in the process the user started; `spawn_ranks`
starts R processes (torch.multiprocessing, `strategy.start_method`), each running
`run.train_and_test` on the parent's resolved config in that same folder, with RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set as torchrun would, so that
Lightning takes them as ranks it did not start. Nothing reruns the command line, so a
Hydra multirun runs its jobs one after another, each with its R ranks and one folder.
The parent waits for the ranks and returns rank 0's results.json; a rank's error is
raised in the parent (a ConfigError / DataError as its one line).

Ranks started by someone else (`torchrun`, `srun`, hydra-submitit-launcher's tasks): each
rank ran Hydra itself, which may have named its folder by its own clock;
`agree_on_run_dir` starts the process group early and makes every rank use rank 0's.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import socket
import tempfile
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mil_experiments.errors import ConfigError, DataError

SPAWNED_ENV = "MIL_EXPERIMENTS_SPAWNED"
log = logging.getLogger(__name__)


def spawned() -> bool:
    """Whether this process is a rank started by `spawn_ranks`."""
    return os.environ.get(SPAWNED_ENV) == "1"


def external_environment():
    """Lightning's cluster environment when torchrun or srun started this process with others, else None."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if spawned():
        return None
    for environment in (TorchElasticEnvironment, SLURMEnvironment):
        if environment.detect():
            found = environment()
            if found.world_size() > 1:
                return found
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leave_process_group(exit_process: bool = False) -> None:
    """Wait for every rank, then destroy the default process group.

    Without the barrier a gloo rank that closes its connections while a peer is still using
    them can abort that peer at exit ("terminate called without an active exception"). The
    garbage collection first drops engines and pending works caught in reference cycles, which
    would otherwise keep the gloo group (and its threads) alive into interpreter shutdown,
    where their destruction aborts the process the same way. `exit_process`: end the process
    right after (streams flushed, `os._exit(0)`), skipping interpreter shutdown altogether;
    for a spawned worker whose only output is already written (tests, benchmark scripts).
    """
    import gc
    import sys

    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    if exit_process:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _rank_main(local_rank: int, world: int, port: int, config_yaml: str, output_dir: str, resume: bool, outcomes: str) -> None:
    """One spawned rank: the environment torchrun would give it, then the run."""
    os.environ.update({
        SPAWNED_ENV: "1", "RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world),
        "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    })  # fmt: skip
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    rank_zero_only.rank = local_rank
    if local_rank != 0:
        _close_inherited_log_files()
    outcome: dict = {"status": "ok"}
    try:
        from mil_experiments.run import train_and_test

        train_and_test(OmegaConf.create(config_yaml), Path(output_dir), resume=resume)
    except BaseException as error:  # noqa: BLE001  (every failure goes back to the parent)
        outcome = {"status": "error", "type": type(error).__name__, "message": str(error), "traceback": traceback.format_exc()}
        if isinstance(error, (ConfigError, DataError)) or type(error).__name__ == "RunInterrupted":
            outcome["error"] = error
        _write_outcome(outcomes, local_rank, outcome)
        raise SystemExit(1) from None
    _write_outcome(outcomes, local_rank, outcome)


def _close_inherited_log_files() -> None:
    """A forked rank other than 0 keeps Hydra's console logging but not its run.log (rank 0 writes)."""
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in list(getattr(logger, "handlers", [])):
            if isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)


def _write_outcome(folder: str, rank: int, outcome: dict) -> None:
    with open(Path(folder) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(outcome, f)


def spawn_ranks(cfg: DictConfig, output_dir: Path, world: int, resume: bool, start_method: str, master_port: int) -> dict:
    """Run `cfg` on `world` local ranks in `output_dir`; return rank 0's results."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)  # the parent's values (${now:...} and all)
    port = master_port or free_port()
    with tempfile.TemporaryDirectory(prefix="mil_experiments_ranks_") as outcomes:
        context = mp.start_processes(
            _rank_main,
            args=(world, port, config_yaml, str(output_dir), resume, outcomes),
            nprocs=world,
            join=False,
            start_method=start_method,
        )
        forward = _forward_sigterm(context)
        try:
            failure = None
            try:
                while not context.join():
                    pass
            except ProcessException as error:  # one rank failed; the others were stopped
                failure = error
        finally:
            signal.signal(signal.SIGTERM, forward)
        if failure is not None and _finished_everywhere(outcomes, world) and (output_dir / "results.json").exists():
            # e.g. gloo's threads aborting at exit after the run: its results are complete
            log.warning("rank %d exited abnormally after its run had finished (%s); the results are complete", failure.error_index, failure)
        elif failure is not None:
            _raise_rank_failure(outcomes, failure.error_index, failure)
    return json.loads((output_dir / "results.json").read_text())


def _forward_sigterm(context):
    """SIGTERM to the parent (SLURM, `timeout`) goes to every rank; returns the previous handler."""

    def handler(signum, frame) -> None:
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    return signal.signal(signal.SIGTERM, handler)


def _finished_everywhere(outcomes: str, world: int) -> bool:
    """Whether every rank reported a finished run (a rank may still die in its interpreter's shutdown)."""
    for rank in range(world):
        path = Path(outcomes) / f"rank{rank}.pkl"
        if not path.exists():
            return False
        with path.open("rb") as f:
            if pickle.load(f).get("status") != "ok":
                return False
    return True


def _raise_rank_failure(outcomes: str, rank: int, failure: Exception) -> None:
    path = Path(outcomes) / f"rank{rank}.pkl"
    if not path.exists():
        raise RuntimeError(f"rank {rank} of the run died without a report: {failure}")
    with path.open("rb") as f:
        outcome = pickle.load(f)
    if "error" in outcome:
        raise outcome["error"]
    raise RuntimeError(f"rank {rank}: {outcome['type']}: {outcome['message']}\n{outcome['traceback']}")


def agree_on_run_dir(output_dir: Path, cfg: DictConfig, environment) -> Path:
    """Externally started ranks: start the process group now and return rank 0's run folder.

    A rank whose own Hydra folder differs removes it when it holds nothing but Hydra's files.
    """
    import torch
    import torch.distributed as dist

    from mil_experiments.strategies import process_group_backend

    if not dist.is_initialized():
        backend = process_group_backend(cfg)
        if backend == "nccl":
            torch.cuda.set_device(environment.local_rank())
        os.environ["MASTER_ADDR"] = environment.main_address
        os.environ["MASTER_PORT"] = str(environment.main_port)
        from datetime import timedelta

        dist.init_process_group(
            backend, rank=environment.global_rank(), world_size=environment.world_size(),
            timeout=timedelta(seconds=int(cfg.strategy.get("timeout_s", 1800))),
        )  # fmt: skip
    box = [str(output_dir)]
    dist.broadcast_object_list(box, src=0)
    agreed = Path(box[0])
    if agreed != output_dir and output_dir.is_dir():
        import shutil

        if all(p.name == ".hydra" or p.suffix == ".log" for p in output_dir.iterdir()):
            shutil.rmtree(output_dir, ignore_errors=True)
    return agreed
