"""Cost of MHIM-MIL end to end on tiles vs the mask ratio: time and memory of one bag's gradients.

One bag of N tiles (default 200 digits at 28 px through the LeNet encoder, aggregator
abmil_mhim, `method=mhim` with a random teacher and a uniform random mask of ratio r), one
training step's gradients (teacher forward, masks, student forward + backward, encoder
included) with each engine setting:

- `full`: the whole bag encoded once with its graph, backward through every tile;
- `acc`: chunks of ceil(alpha% N), every chunk re-encoded (`skip` off);
- `acc+chunks`: `engine.skip_zero_grad_chunks=true` (a chunk is skipped only if all its rows are masked);
- `acc+rows`: `engine.skip_zero_grad_rows=true` (only the kept rows re-encoded, in dense chunks).

Per setting and ratio: the median wall-clock time per bag over `--repeats` round-robin
repeats after a warm-up, its ratio to `full` at r = 0, the peak bytes of activations saved
for backward (parameters excluded; any device), on CUDA `torch.cuda.max_memory_allocated`,
and the kept rows K. The same random state before every call, so every setting masks the
same rows. The floor of `acc+rows` is a no-grad forward of N plus a forward-backward of K.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python scripts/bench_mhim_rows.py --threads 1 --markdown
    PYTHONPATH=. .venv/bin/python scripts/bench_mhim_rows.py --device cuda --bag-size 2000 --alpha 10
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

from mil_experiments.engine import AccumulationEngine, FullBagEngine  # noqa: E402
from mil_experiments.telemetry import Stopwatch, measure_saved_bytes  # noqa: E402

MB = 2**20
SETTINGS = ("full", "acc", "acc+chunks", "acc+rows")


@dataclass
class Row:
    setting: str
    mask_ratio: float
    bag_size: int
    kept: int
    chunk_size: int
    time_ms: float
    time_ratio: float  # time_ms / time_ms of `full` at mask ratio 0
    saved_mb: float
    saved_ratio: float  # saved_mb / saved_mb of `full` at mask ratio 0
    cuda_peak_mb: float | None


def build(bag_size: int, alpha: float, device: str, extra: list[str]):
    """The MHIM method (random teacher) on digits tiles, and one training bag on `device`."""
    from mil_experiments.api import compose_experiment

    exp = compose_experiment(["dataset=digits_bags", f"dataset.bag_size={bag_size}", "dataset.train_bags=2",
                              "dataset.val_bags=2", "dataset.test_bags=2", "logger=none", "method=mhim",
                              "method.allow_random_teacher=true", "aggregator=abmil_mhim", "engine=acc", f"alpha={alpha}",
                              *extra])
    exp.datamodule.setup("fit")
    method = exp.method.to(device).train()
    bag = exp.datamodule.train_set[0]
    bag = bag.with_instances(bag.instances.to(device))
    bag.label = bag.label.to(device) if torch.is_tensor(bag.label) else bag.label
    return method, bag


def engine_for(setting: str, alpha: float):
    if setting == "full":
        return FullBagEngine()
    return AccumulationEngine(alpha=alpha, skip_zero_grad_chunks=setting == "acc+chunks", skip_zero_grad_rows=setting == "acc+rows")


def one_step(method, bag, engine, seed: int) -> None:
    torch.manual_seed(seed)
    engine.backward_bag(method.encoder, method.head_for(bag), bag.instances, head_parameters=method.head_parameters())
    method.zero_grad(set_to_none=True)


def measure(method, bag, ratios: list[float], alpha: float, repeats: int) -> list[Row]:
    cuda = bag.instances.device.type == "cuda"
    engines = {s: engine_for(s, alpha) for s in SETTINGS}
    times: dict[tuple[str, float], list[float]] = {(s, r): [] for s in SETTINGS for r in ratios}
    saved, peaks, kept = {}, {}, {}
    for r in ratios:
        method.config.mask_ratio = r
        for s in SETTINGS:
            one_step(method, bag, engines[s], seed=0)  # warm-up
            saved[(s, r)] = measure_saved_bytes(method, lambda engine=engines[s]: one_step(method, bag, engine, seed=0)) / MB
            kept[r] = method.last_kept
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                one_step(method, bag, engines[s], seed=0)
                peaks[(s, r)] = torch.cuda.max_memory_allocated() / MB
    for _ in range(repeats):  # round robin: other load falls on every setting alike
        for r in ratios:
            method.config.mask_ratio = r
            for s in SETTINGS:
                watch = Stopwatch()
                one_step(method, bag, engines[s], seed=0)
                times[(s, r)].append(1000 * watch.elapsed())
    base_time = statistics.median(times[("full", ratios[0])])
    base_saved = saved[("full", ratios[0])]
    return [Row(s, r, bag.size, kept[r], engines[s].last_chunk_size, statistics.median(times[(s, r)]),
                statistics.median(times[(s, r)]) / base_time, saved[(s, r)], saved[(s, r)] / base_saved, peaks.get((s, r)))
            for r in ratios for s in SETTINGS]


def markdown(rows: list[Row]) -> str:
    lines = ["| mask ratio | kept K | setting | time/bag ms | × full (r=0) | saved MB | × full (r=0) |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row.mask_ratio:g} | {row.kept} | {row.setting} | {row.time_ms:.1f} | {row.time_ratio:.2f} |"
                     f" {row.saved_mb:.2f} | {row.saved_ratio:.3f} |"
                     + (f" {row.cuda_peak_mb:.0f} |" if row.cuda_peak_mb is not None else ""))
    if rows and rows[0].cuda_peak_mb is not None:
        lines[0] += " CUDA peak MB |"
        lines[1] += "---:|"
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bag-size", type=int, default=200)
    parser.add_argument("--alpha", type=float, default=25.0, help="percent of the bag per chunk")
    parser.add_argument("--ratios", default="0,0.25,0.5,0.75,0.9", help="random mask ratios (method.mask_ratio)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="CSV of the rows")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides (e.g. aggregator.dim=128)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    method, bag = build(args.bag_size, args.alpha, args.device, args.overrides)
    rows = measure(method, bag, ratios, args.alpha, args.repeats)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
    if args.markdown:
        print(markdown(rows))
    else:
        for row in rows:
            print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
