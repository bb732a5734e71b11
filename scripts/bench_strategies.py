"""Tile parallelism on CPU processes: the paper's Figure 3 and a scaling table.

Figure 3 (all-in-memory multi-GPU paper): a short training run, single device against
`TileParallelEngine` on R ranks from the same weights and bags; per optimizer step the
normalised L1 distance of the parameters and of the gradients (sum |a - b| / sum |b| over
all parameters) and the absolute loss difference. In float32, as a real run.

Scaling: one bag of N tiles, forward + backward, per rank: tiles per second (N / the
slowest rank's time per bag) and the peak activations saved for backward (CPU; on CUDA
also `max_memory_allocated`), for 1 rank (the single-device engine) and R ranks.

    python scripts/bench_strategies.py --ranks 4 --tiles 256 --steps 20 --out outputs/strategies
    python scripts/bench_strategies.py --ranks 4 --steps 20 --skip-scaling --dtype float64 --out outputs/strategies_f64
writes figure3.png, figure3.csv, scaling.md and scaling.json under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mil_experiments.engine import AccumulationEngine, FullBagEngine, HeadResult
from mil_experiments.engine.distributed import TileParallelEngine
from mil_experiments.launch import free_port, leave_process_group
from mil_experiments.models.abmil import ABMIL
from mil_experiments.models.aggregator import bag_loss
from mil_experiments.models.encoders import LeNetEncoder
from mil_experiments.telemetry import SavedTensorMeter


def _model() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    encoder = LeNetEncoder(in_channels=1, image_size=28)
    return encoder, ABMIL(encoder.out_dim, 1)


def _bag(n: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 1, 28, 28, generator=generator), torch.tensor(step % 2)  # (n, 1, 28, 28), label


def _head(aggregator: nn.Module, label: torch.Tensor):
    def head(features: torch.Tensor) -> HeadResult:
        loss = bag_loss(aggregator(features, target=label).logits, label)
        return HeadResult(loss, {"bag": loss})

    return head


def _train(engine, n: int, steps: int) -> list[dict]:
    """`steps` Adam steps on fresh bags; per step the loss, the flat gradient and the flat parameters."""
    encoder, aggregator = _model()
    params = [*encoder.parameters(), *aggregator.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    history = []
    for step in range(steps):
        x, y = _bag(n, step)
        result = engine.backward_bag(encoder, _head(aggregator, y), x)
        engine.synchronize(list(encoder.parameters()), list(aggregator.parameters()))
        grad = torch.cat([p.grad.reshape(-1) for p in params]).clone()
        optimizer.step()
        optimizer.zero_grad()
        history.append({"loss": float(result.loss), "grad": grad, "params": torch.cat([p.detach().reshape(-1) for p in params]).clone()})
    return history


def _l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().sum() / b.abs().sum())


def _time_bag(engine, n: int, repeats: int) -> dict:
    """Median seconds per bag (the slowest rank's, ranks in step) and this rank's peak saved bytes."""
    encoder, aggregator = _model()
    x, y = _bag(n, 0)
    times, peak = [], 0
    for _ in range(repeats + 1):  # the first is a warm-up
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        with SavedTensorMeter(exclude=[*encoder.parameters(), *aggregator.parameters()]) as meter:
            engine.backward_bag(encoder, _head(aggregator, y), x)
        engine.synchronize(list(encoder.parameters()), list(aggregator.parameters()))
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed))
        peak = max(peak, meter.peak_bytes)
        encoder.zero_grad(), aggregator.zero_grad()
    return {"seconds_per_bag": sorted(times[1:])[len(times[1:]) // 2], "peak_saved_mb": peak / 2**20}


def _engines(alpha: float):
    inner = FullBagEngine() if alpha == 100 else AccumulationEngine(alpha=alpha)
    return inner


def _worker(rank: int, world: int, port: int, args, out: str) -> None:
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(getattr(torch, args.dtype))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    report: dict = {"scaling": {}, "figure3": {}}
    for alpha in [] if args.skip_scaling else args.alphas:
        for layout in args.layouts:
            if layout == "dedicated" and world < 2:
                continue
            engine = TileParallelEngine(_engines(alpha), shard="strided", layout=layout)
            measured = _time_bag(engine, args.tiles, args.repeats)
            gathered = [None] * world
            dist.all_gather_object(gathered, measured)
            report["scaling"][f"{layout} alpha={alpha:g}"] = gathered
    if args.steps:
        for layout in args.layouts:
            if layout == "dedicated" and world < 2:
                continue
            parallel = _train(TileParallelEngine(FullBagEngine(), shard="strided", layout=layout), args.tiles, args.steps)
            if rank == 0:
                single = _train(FullBagEngine(), args.tiles, args.steps)
                report["figure3"][layout] = [
                    {"step": i, "param_l1": _l1(p["params"], s["params"]), "grad_l1": _l1(p["grad"], s["grad"]),
                     "loss_abs_diff": abs(p["loss"] - s["loss"]), "loss": s["loss"]}
                    for i, (p, s) in enumerate(zip(parallel, single, strict=True))
                ]  # fmt: skip
            dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(report))
    leave_process_group(exit_process=True)


def _single(args) -> dict:
    """1 rank: the single-device engine (no process group)."""
    torch.set_num_threads(args.threads)
    if args.skip_scaling:
        return {}
    return {f"alpha={alpha:g}": _time_bag(_engines(alpha), args.tiles, args.repeats) for alpha in args.alphas}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tiles", type=int, default=256, help="tiles per bag (LeNet, 1x28x28)")
    parser.add_argument("--steps", type=int, default=20, help="Figure 3: optimizer steps (0 skips it)")
    parser.add_argument("--repeats", type=int, default=5, help="scaling: timed bags (after one warm-up)")
    parser.add_argument("--alphas", type=float, nargs="+", default=[100.0, 25.0])
    parser.add_argument("--layouts", nargs="+", default=["replicated", "dedicated"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="Figure 3 in float64 separates the decomposition from float32 rounding")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("outputs/strategies"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    single = _single(args)
    path = args.out / "ranks.json"
    mp.spawn(_worker, args=(args.ranks, free_port(), args, str(path)), nprocs=args.ranks, join=True)
    report = json.loads(path.read_text())
    if report["scaling"]:
        write_scaling(single, report["scaling"], args)
    if report["figure3"]:
        write_figure3(report["figure3"], args)


def write_scaling(single: dict, parallel: dict, args) -> None:
    rows = ["| ranks | layout | α | s / bag | tiles / s | peak saved MB, rank 0 | peak saved MB, max over ranks |", "|---:|---|---:|---:|---:|---:|---:|"]
    for key, m in single.items():
        rows.append(f"| 1 | single device | {key.split('=')[1]} | {m['seconds_per_bag']:.3f} | {args.tiles / m['seconds_per_bag']:.0f} | {m['peak_saved_mb']:.2f} | {m['peak_saved_mb']:.2f} |")
    for key, ranks in parallel.items():
        layout, alpha = key.split(" ")
        seconds = ranks[0]["seconds_per_bag"]
        rows.append(
            f"| {args.ranks} | {layout} | {alpha.split('=')[1]} | {seconds:.3f} | {args.tiles / seconds:.0f} |"
            f" {ranks[0]['peak_saved_mb']:.2f} | {max(r['peak_saved_mb'] for r in ranks):.2f} |"
        )
    text = f"One bag of {args.tiles} LeNet tiles (1x28x28) + ABMIL, forward + backward, {args.threads} thread(s) per rank, median of {args.repeats}\n\n" + "\n".join(rows) + "\n"
    (args.out / "scaling.md").write_text(text)
    (args.out / "scaling.json").write_text(json.dumps({"single": single, "parallel": parallel, "tiles": args.tiles}, indent=2))
    print(text)


def write_figure3(curves: dict, args) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (args.out / "figure3.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layout", "step", "param_l1", "grad_l1", "loss_abs_diff", "loss"])
        for layout, rows in curves.items():
            for r in rows:
                writer.writerow([layout, r["step"], r["param_l1"], r["grad_l1"], r["loss_abs_diff"], r["loss"]])
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for layout, rows in curves.items():
        steps = [r["step"] for r in rows]
        for axis, key, title in zip(axes, ("param_l1", "grad_l1", "loss_abs_diff"),
                                    ("parameters: normalised L1", "gradients: normalised L1", "loss: |difference|"), strict=True):
            axis.semilogy(steps, [max(r[key], 1e-12) for r in rows], marker="o", ms=3, label=f"{args.ranks} ranks, {layout}")
            axis.set_title(title)
            axis.set_xlabel("optimizer step")
    axes[0].legend()
    figure.suptitle(f"single device vs tile-parallel ({args.tiles} tiles per bag, LeNet + ABMIL, Adam, {args.dtype})")
    figure.tight_layout()
    figure.savefig(args.out / "figure3.png", dpi=110)
    plt.close(figure)
    worst = {layout: {k: max(r[k] for r in rows) for k in ("param_l1", "grad_l1", "loss_abs_diff")} for layout, rows in curves.items()}
    print("Figure 3, worst over steps:", json.dumps(worst))


if __name__ == "__main__":
    main()
