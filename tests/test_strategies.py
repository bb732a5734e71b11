"""`strategy=ddp | tile_parallel` from the command line, and `dataset.tiles_per_bag`.

One CLI multirun over both strategies on 2 CPU processes (gloo), compared with a single-
device run. (The gradient equivalence of the engines themselves,
every layout and sharding: tests/test_distributed.py.)
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import RandomSampler

from mil_experiments.api import compose_config
from mil_experiments.bag import Bag, LevelLayout
from mil_experiments.config import validate
from mil_experiments.data.bag_order import EpochOrder, TrainBags, tile_positions
from mil_experiments.data.digits_bags import DigitsBagsDataModule
from mil_experiments.engine.distributed import DataParallelEngine, TileParallelEngine
from mil_experiments.errors import ConfigError
from mil_experiments.run import train_and_test
from tests.conftest import TINY, run_cli

# 7 training bags: uneven on 2 ranks (ddp: rank 1 has no bag in the last step); random
# inference samples (50%), which every rank must draw alike
RUN = [o for o in TINY if not o.startswith("dataset.train_bags")] + ["dataset.train_bags=7", "trainer.accelerator=cpu", "sampling.inference=50"]


def _metrics(folder: Path) -> list[dict[str, str]]:
    with (folder / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _files(folder: Path) -> set[str]:
    """The run's own files (Hydra's .hydra/ and its log aside)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if ".hydra" not in p.parts and p.suffix != ".log"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A multirun over ddp and tile_parallel on 2 processes, and the single-device reference."""
    root = tmp_path_factory.mktemp("strategies")
    multi = run_cli(["-m", "strategy=ddp,tile_parallel", "trainer.devices=2", *RUN], cwd=root)
    assert multi.returncode == 0, multi.stderr[-3000:]
    (sweep,) = (root / "outputs" / "multirun").iterdir()
    assert not (root / "outputs" / "runs").exists()  # no rank made a folder of its own
    # one device, the gradient of 2 bags per step: what ddp on 2 ranks with one bag each computes
    # (in this process: the same code as the CLI's, without a second interpreter start)
    single = root / "single"
    train_and_test(compose_config([*RUN, "method.bags_per_step=2", "method.step_schedule=every_k"]), single)
    # deterministic evaluation: ddp deals the validation and test bags to the ranks
    whole = [*RUN, "sampling.inference=100", "dataset.val_bags=5", "dataset.test_bags=5"]
    split = run_cli(["strategy=ddp", "trainer.devices=2", *whole, "hydra.run.dir=ddp_split"], cwd=root)
    assert split.returncode == 0, split.stderr[-3000:]
    single_whole = root / "single_whole"
    train_and_test(compose_config([*whole, "method.bags_per_step=2", "method.step_schedule=every_k"]), single_whole)
    return {"sweep": sweep, "ddp": sweep / "0", "tile_parallel": sweep / "1", "single": single,
            "ddp_split": root / "ddp_split", "single_whole": single_whole}  # fmt: skip


def test_each_multi_process_run_writes_one_folder_with_the_single_run_files(runs):
    assert sorted(p.name for p in runs["sweep"].iterdir()) == ["0", "1", "multirun.yaml", "summary.csv"]
    single = _files(runs["single"])
    assert {"results.json", "metrics.csv", "config.yaml", "checkpoints/selected.ckpt", "checkpoints/last.ckpt"} <= single
    for name in ("ddp", "tile_parallel"):
        assert _files(runs[name]) == single, name
        results = json.loads((runs[name] / "results.json").read_text())
        assert results["strategy"]["name"] == name and results["strategy"]["world_size"] == 2
        assert len(_metrics(runs[name])) == 2  # one row per epoch: rank 0's file only
    with (runs["sweep"] / "summary.csv").open() as f:
        assert [row["status"] for row in csv.DictReader(f)] == ["ok", "ok"]


def test_ddp_train_loss_equals_single_device_with_the_same_bags_per_step(runs):
    """Rank r takes bags r, r+2, ... of the same order; the step averages the two bags'
    gradients, as one device does with bags_per_step=2 (the 7th bag's step: rank 1 adds 0).
    Validation and test draw their 50% samples from rank 0's random state, as one device does."""
    ddp, single = _metrics(runs["ddp"]), _metrics(runs["single"])
    for a, b in zip(ddp, single, strict=True):
        for key in ("train/loss", "val/loss"):
            assert abs(float(a[key]) - float(b[key])) <= 1e-5 * abs(float(b[key])), (key, a[key], b[key])
        assert a["train/error"] == b["train/error"]
    ddp_test, single_test = (json.loads((runs[n] / "results.json").read_text())["test"] for n in ("ddp", "single"))
    assert ddp_test["test/accuracy"] == single_test["test/accuracy"]
    assert ddp_test["test/auc"] == pytest.approx(single_test["test/auc"], abs=1e-6)


def test_ddp_splits_deterministic_evaluation_bags_and_gathers_every_one_in_order(runs):
    """5 validation and 5 test bags on 2 ranks (3 and 2 each): every epoch's validation
    metrics, the test metrics and test_predictions.csv (bag order) are one device's."""
    split, single = (json.loads((runs[n] / "results.json").read_text()) for n in ("ddp_split", "single_whole"))
    assert split["strategy"]["evaluation_split"] is True
    assert json.loads((runs["ddp"] / "results.json").read_text())["strategy"]["evaluation_split"] is False  # 50% samples: random
    for a, b in zip(_metrics(runs["ddp_split"]), _metrics(runs["single_whole"]), strict=True):
        for key in ("val/loss", "val/auc", "val/error"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-7), (key, a[key], b[key])
    for key in ("test/loss", "test/accuracy", "test/auc"):
        assert split["test"][key] == pytest.approx(single["test"][key], rel=1e-5, abs=1e-7), key
    predictions = [(runs[n] / "test_predictions.csv").read_text().splitlines() for n in ("ddp_split", "single_whole")]
    assert len(predictions[0]) == 6  # header + 5 bags, none twice
    assert [row.split(",")[:3] for row in predictions[0]] == [row.split(",")[:3] for row in predictions[1]]


def test_an_evaluation_shard_serves_only_its_ranks_bags():
    from mil_experiments.data.bag_order import NoBag
    from mil_experiments.data.evaluation_shards import EvaluationShard, every_rank_items

    shard = EvaluationShard(list("abcde"), rank=1, world=2)
    assert len(shard) == 5  # every rank walks every step
    assert [shard[i] if not isinstance(shard[i], NoBag) else None for i in range(5)] == [None, "b", None, "d", None]
    assert every_rank_items([(3, "x"), (1, "y"), (1, "z")], split=False) == ["x", "y", "z"]  # one process: as recorded


def test_tile_parallel_reports_memory_and_time_of_every_rank(runs):
    rows = _metrics(runs["tile_parallel"])
    assert {"time/max_rank_bag_s", "memory/max_rank_peak_saved_mb", "memory/peak_saved_mb"} <= set(rows[0])
    results = json.loads((runs["tile_parallel"] / "results.json").read_text())
    single = json.loads((runs["single"] / "results.json").read_text())
    memory = results["memory"]
    assert memory["max_rank_peak_saved_activations_mb"] >= memory["peak_saved_activations_mb"] > 0
    # each rank holds the encoder activations of half a bag
    assert memory["max_rank_peak_saved_activations_mb"] < single["memory"]["peak_saved_activations_mb"]
    assert results["time"]["max_rank_seconds_per_bag"] >= results["time"]["seconds_per_bag"] > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.devices=2"], "strategy=single: one device only"),
        (["strategy=tile_parallel", "strategy.aggregator=dedicated"], "needs trainer.devices >= 2"),
        (["strategy=tile_parallel", "strategy.shard=rows"], "strategy.shard='rows'"),
        (["strategy=ddp", "+strategy.shard=strided"], "strategy.shard"),
        (["strategy=tile_parallel", "trainer.devices=2", "engine=acc", "engine.acc_mode=recompute"], "acc_mode=cached"),
        (["strategy=ddp", "strategy.backend=mpi"], "strategy.backend='mpi'"),
        (["dataset.tiles_per_bag=0"], "dataset.tiles_per_bag=0"),
    ],
)
def test_bad_strategy_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("+", r"\+")):
        validate(compose_config(overrides))


def test_strategies_wrap_the_configured_engine():
    tile = validate(compose_config(["strategy=tile_parallel", "trainer.devices=2", "strategy.shard=contiguous", "engine=acc", "alpha=10"]))
    assert isinstance(tile.engine, TileParallelEngine) and tile.engine.shard == "contiguous" and tile.engine.inner.config.alpha == 10
    assert tile.world_size == 2 and tile.engine.shard_evaluation  # evaluation bags split by default
    replicated = validate(compose_config(["strategy=tile_parallel", "trainer.devices=2", "strategy.shard_evaluation=false"]))
    assert replicated.engine.shard_evaluation is False and replicated.engine.settings()["shard_evaluation"] is False
    encoder, bag = torch.nn.Linear(3, 2), torch.randn(5, 3)  # no process group (predict loads a tile-parallel run in one process)
    assert torch.equal(tile.engine.encode_for_evaluation(encoder, bag, 2), torch.no_grad()(encoder)(bag))
    assert isinstance(validate(compose_config(["strategy=ddp", "trainer.devices=2"])).engine, DataParallelEngine)


def _digits(**overrides) -> DigitsBagsDataModule:
    config = validate(compose_config([f"dataset.{k}={v}" for k, v in {"train_bags": 6, "val_bags": 4, "test_bags": 4, "bag_size": 8, **overrides}.items()])).dataset
    module = DigitsBagsDataModule(config, seed=3)
    module.setup("fit")
    return module


def _epoch(loader, epoch: int) -> list[Bag]:
    loader.sampler.set_epoch(epoch)  # what Lightning does at every epoch start
    return list(loader)


def test_tiles_per_bag_draws_k_fresh_tiles_each_epoch_and_all_at_evaluation():
    module = _digits(tiles_per_bag=3)
    full = {module.train_set[i].bag_id: module.train_set[i] for i in range(len(module.train_set))}
    loader = module.train_dataloader()
    torch.manual_seed(0)
    first, second = _epoch(loader, 0), _epoch(loader, 1)
    for bags in (first, second):
        assert sorted(b.bag_id for b in bags) == sorted(full)  # every bag once per epoch
        for bag in bags:
            ids = set(full[bag.bag_id].instance_ids.tolist())
            assert bag.size == 3 and len(set(bag.instance_ids.tolist())) == 3 and set(bag.instance_ids.tolist()) <= ids
    drawn = [{b.bag_id: tuple(b.instance_ids.tolist()) for b in bags} for bags in (first, second)]
    assert drawn[0] != drawn[1]  # fresh each epoch
    again = _digits(tiles_per_bag=3).train_dataloader()
    torch.manual_seed(5)  # another bag order: the tiles of a bag in an epoch depend on (seed, epoch, bag) only
    assert {b.bag_id: tuple(b.instance_ids.tolist()) for b in _epoch(again, 1)} == drawn[1]
    assert all(bag.size == 8 for bag in [*module.val_dataloader(), *module.test_dataloader()])


def test_tiles_per_bag_keeps_the_children_of_each_drawn_tile():
    # a 2-level bag: 5 tiles at 5x, their 4 children each at 10x (rows 5 + 4 i .. 5 + 4 i + 3)
    instances = torch.arange(25.0).unsqueeze(1)  # (25, 1): row numbers
    bag = Bag(instances, torch.tensor(1), "slide", levels=LevelLayout((5.0, 10.0), (5, 20)))
    served = TrainBags([bag], tiles_per_bag=2, seed=0)[(0, 4)]
    tiles = tile_positions(5, 2, 0, 4, 0)
    assert served.levels.sizes == (2, 8)
    expected = [*tiles.tolist(), *[5 + 4 * t + c for t in tiles.tolist() for c in range(4)]]
    assert served.instances.squeeze(1).long().tolist() == expected
    assert TrainBags([bag], tiles_per_bag=5, seed=0)[(0, 4)] is bag  # K >= the bag's tiles: the whole bag


def test_epoch_order_on_one_process_is_the_plain_shuffle():
    torch.manual_seed(11)
    plain = list(RandomSampler(range(9)))
    torch.manual_seed(11)
    order = EpochOrder(RandomSampler(range(9)), split="shard")
    order.set_epoch(2)
    assert list(order) == [(i, 2) for i in plain] and len(order) == 9


def test_an_error_in_the_ranks_is_one_line_and_leaves_no_folder(tmp_path):
    """A missing data folder is found when the ranks build the data: the parent reports their DataError."""
    missing = tmp_path / "missing"
    done = run_cli(["strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "dataset=feature_bags",
                    f"dataset.root={missing}", "encoder=identity", "logger=none"], cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == f"error: dataset.root={missing}: folder not found"
    assert not any((tmp_path / "outputs" / "runs").iterdir())


def test_a_rank_dying_after_its_run_finished_is_not_a_failed_run(tmp_path):
    """gloo can abort a rank in interpreter shutdown: the run counts when every rank reported it finished."""
    import pickle

    from mil_experiments.launch import _finished_everywhere

    def report(rank: int, outcome: dict) -> None:
        (tmp_path / f"rank{rank}.pkl").write_bytes(pickle.dumps(outcome))

    report(0, {"status": "ok"})
    assert not _finished_everywhere(str(tmp_path), 2)  # rank 1 never reported: a real failure
    report(1, {"status": "error", "type": "RuntimeError", "message": "boom", "traceback": ""})
    assert not _finished_everywhere(str(tmp_path), 2)
    report(1, {"status": "ok"})
    assert _finished_everywhere(str(tmp_path), 2)


@pytest.mark.slow
def test_torchrun_ranks_share_one_run_folder(tmp_path):
    """torchrun starts both ranks, each running Hydra: one folder remains, rank 0's (make test-slow)."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mil_experiments",
               "strategy=ddp", "trainer.devices=2", *RUN]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "runs").iterdir()
    assert {"results.json", "metrics.csv", "config.yaml", "checkpoints/selected.ckpt"} <= _files(run)
    assert json.loads((run / "results.json").read_text())["strategy"]["world_size"] == 2
