"""The cost columns of MHIM-MIL's supplement Table 2: parameters, seconds per epoch and peak memory per strategy.

    OMP_NUM_THREADS=1 python scripts/mhim_cost.py --recipe abmil_c16 --markdown
    OMP_NUM_THREADS=1 python scripts/mhim_cost.py --recipe transmil_c16 --bags 24 --repeats 3 --markdown
    ... [--out outputs/mhim_tables/transmil_c16/supp2_cost.csv] [--device cuda] [dataset.root=...]

For the recipe's baseline (stage 1: ABMIL or TransMIL alone) and each MHIM strategy of the
table (HAM, R-HAM, L-HAM, LR-HAM: the rows of `scripts/mhim_tables.py supp2`), one training
step per bag on the first `--bags` training bags of fold 0 of the recipe's cohort: for MHIM
the teacher's forward on the whole bag (no grad), the masks and the student's forward and
backward on the kept rows; for the baseline the forward and backward on the whole bag. The
teacher is random (`method.allow_random_teacher=true`): the cost depends on how many rows
are kept, which the ratios fix, not on which (and the student starts from scratch,
`init_stu_type=none`, for the same reason). Reports the student's parameters, the median
seconds per bag over `--repeats` round-robin passes (every strategy sees the same load) times
the training bags of an epoch, the peak bytes of activations saved for backward over the bags
(parameters excluded; on CUDA also `torch.cuda.max_memory_allocated`), and the mean kept share.
The EMA update of the teacher (one pass over the parameters per step) is not timed.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from mil_experiments.errors import ConfigError, DataError  # noqa: E402
from mil_experiments.telemetry import Stopwatch, measure_saved_bytes  # noqa: E402

MB = 2**20


@dataclass
class CostRow:
    strategy: str
    parameters: int
    seconds_per_bag: float
    seconds_per_epoch: float  # seconds_per_bag x the training bags of one epoch
    peak_saved_mb: float
    cuda_peak_mb: float | None
    kept_share: float  # mean K / N over the bags (1 for the baseline)


def build(recipe: str, row, device: str, extra: list[str]):
    """The stage-1 (baseline) or stage-2 method of `row`, in train mode on `device`, and its datamodule."""
    from mil_experiments.api import compose_experiment

    if row.baseline:
        overrides = [f"experiment=mhim_{recipe}_baseline"]
    else:
        overrides = [f"experiment=mhim_{recipe}", "method.allow_random_teacher=true", "method.init_stu_type=none",
                     *[f"method.{k}={v}" for k, v in row.changes.items()]]
    exp = compose_experiment([*overrides, "dataset.fold=0", "logger=none", *extra])
    exp.datamodule.setup("fit")
    return exp.method.to(device).train(), exp.datamodule


def one_step(method, bag) -> int:
    """One bag's training gradients (what the engine runs per bag); the kept rows (N for a baseline)."""
    torch.manual_seed(0)
    method.engine.backward_bag(method.encoder, method.head_for(bag), bag.instances, head_parameters=method.head_parameters())
    method.zero_grad(set_to_none=True)
    return getattr(method, "last_kept", bag.size)


def to_device(bag, device: str):
    moved = bag.with_instances(bag.instances.to(device))
    moved.label = bag.label.to(device) if torch.is_tensor(bag.label) else bag.label
    return moved


def measure(recipe: str, bags: int, repeats: int, device: str, extra: list[str]) -> list[CostRow]:
    from mhim_tables import table_rows

    rows = table_rows("supp2", recipe)
    built = [build(recipe, row, device, extra) for row in rows]
    train_set = built[0][1].train_set
    if len(train_set) == 0:
        raise DataError(f"recipe {recipe}: fold 0 has no training bags")
    sample = [to_device(train_set[i], device) for i in range(min(bags, len(train_set)))]
    cuda = device.startswith("cuda")
    saved, peaks, kept, times = {}, {}, {}, {i: [] for i in range(len(rows))}
    for i, (method, _) in enumerate(built):
        one_step(method, sample[0])  # warm-up
        saved[i] = max(measure_saved_bytes(method, lambda m=method, b=b: one_step(m, b)) for b in sample) / MB
        kept[i] = statistics.mean(one_step(method, b) / b.size for b in sample)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            for b in sample:
                one_step(method, b)
            peaks[i] = torch.cuda.max_memory_allocated() / MB
    for _ in range(repeats):  # round robin over the strategies
        for i, (method, _) in enumerate(built):
            for b in sample:
                watch = Stopwatch()
                one_step(method, b)
                times[i].append(watch.elapsed())
    per_epoch = len(train_set)
    return [CostRow(row.label, sum(p.numel() for p in method.aggregator.parameters()), statistics.median(times[i]),
                    statistics.median(times[i]) * per_epoch, saved[i], peaks.get(i), kept[i])
            for i, (row, (method, _)) in enumerate(zip(rows, built, strict=True))]


def markdown(rows: list[CostRow], recipe: str) -> str:
    lines = [f"| {recipe} | parameters | s / epoch | peak saved MB | kept share |" + (" CUDA peak MB |" if rows[0].cuda_peak_mb else ""),
             "|---|---:|---:|---:|---:|" + ("---:|" if rows[0].cuda_peak_mb else "")]
    for r in rows:
        lines.append(f"| {r.strategy} | {r.parameters / 1e3:.0f}K | {r.seconds_per_epoch:.2f} | {r.peak_saved_mb:.2f} | {r.kept_share:.2f} |"
                     + (f" {r.cuda_peak_mb:.0f} |" if r.cuda_peak_mb else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=["abmil_c16", "abmil_tcga", "transmil_c16", "transmil_tcga"], required=True)
    parser.add_argument("--bags", type=int, default=32, help="training bags measured (the first of fold 0)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="CSV of the rows")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every strategy (e.g. encoder.standardize=true)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        rows = measure(args.recipe, args.bags, args.repeats, args.device, args.overrides)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
    print(markdown(rows, args.recipe) if args.markdown else "\n".join(str(r) for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
