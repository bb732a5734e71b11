"""One aggregator trained end to end on tiles with ACC next to the full-bag engine.

Two trainings of the same config from the same seed, differing only in the engine:
`engine=full` (the whole bag forwarded with its graph) and `engine=acc alpha=A` (the bag
encoded A% at a time, dL/dZ computed once on the full feature matrix, then backpropagated
chunk by chunk; the random draws of the encoder and the aggregator replayed). ACC is exact,
so the two per-epoch training-loss curves must agree to float32 rounding, while the memory
saved for backward drops to about one chunk's encoder activations plus the aggregator's.

Measured per run, from its `metrics.csv`: seconds per training bag (mean over epochs and
bags, Lightning's loop included; the first epoch, a warm-up that fills the tile cache, is
left out when there are more), the peak bytes saved for backward in one bag (any device)
and, on CUDA, `torch.cuda.max_memory_allocated`; the per-epoch training loss of both and
their relative difference |L_acc - L_full| / L_full.

    PYTHONPATH=. .venv/bin/python scripts/bench_e2e_aggregator.py                     # transmil, synthetic slides, 3 epochs
    PYTHONPATH=. .venv/bin/python scripts/bench_e2e_aggregator.py --aggregator abmil --dataset digits_bags --epochs 5

Writes `<out>/e2e_<aggregator>.md` (the table) and `<out>/e2e_<aggregator>.png` (the curves);
`--reuse` redraws from runs already complete with the same config. `trainer.precision=64-true`
as an override gives the float64 control (what remains between the curves is then not float32
rounding amplified by training).
Extra arguments are Hydra overrides given to both runs.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def run_overrides(engine: str, alpha: float) -> list[str]:
    """The engine axis of one of the two runs."""
    return ["engine=full"] if engine == "full" else ["engine=acc", f"alpha={alpha:g}"]


def base_overrides(dataset: str, aggregator: str, epochs: int, seed: int) -> list[str]:
    """What both runs share: image instances (tiles) through LeNet, the last epoch tested."""
    return [f"dataset={dataset}", "encoder=lenet", f"aggregator={aggregator}", "method=abmil", "logger=none",
            f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false", "selection.rule=last",
            "evaluation.bootstrap=0", "evaluation.confusion_matrix=false", f"seed={seed}"]


def read_columns(metrics_csv: Path) -> dict[str, list[float]]:
    """Every numeric column of a run's metrics.csv, one value per epoch in epoch order."""
    with metrics_csv.open() as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: int(row["epoch"]))
    return {key: [float(row[key]) for row in rows if row.get(key) not in (None, "")] for key in rows[0]}


def train(overrides: list[str], run_dir: Path, reuse: bool) -> tuple[dict[str, list[float]], float | None]:
    """Train and test one run in-process; its per-epoch metrics and wall seconds (None when reused).

    With `reuse`, a run folder that already holds every epoch of exactly this config is read instead.
    """
    from omegaconf import OmegaConf

    from mil_experiments.api import compose_config
    from mil_experiments.run import train_and_test

    cfg = compose_config([*overrides, "overwrite=true"])
    metrics, saved = run_dir / "metrics.csv", run_dir / "config.yaml"
    if reuse and metrics.exists() and saved.exists() and saved.read_text() == OmegaConf.to_yaml(cfg, resolve=True):
        columns = read_columns(metrics)
        if len(columns["train/loss"]) == int(cfg.trainer.max_epochs):
            return columns, None
    start = time.perf_counter()
    train_and_test(cfg, run_dir)
    return read_columns(metrics), time.perf_counter() - start


def per_bag(metrics: dict[str, list[float]], key: str) -> float:
    """Mean over epochs of a per-epoch value, leaving out the first (warm-up: tile cache, allocator) when there are more."""
    values = metrics[key]
    return float(np.mean(values[1:] if len(values) > 1 else values))


def relative_difference(acc: list[float], full: list[float]) -> np.ndarray:
    """|L_acc - L_full| / L_full per epoch."""
    a, f = np.asarray(acc), np.asarray(full)  # (epochs,) each
    return np.abs(a - f) / np.abs(f)


def table(runs: dict[str, dict[str, list[float]]], seconds: dict[str, float], labels: dict[str, str]) -> str:
    """Markdown: cost per bag and the loss curve of each run, then their relative difference."""
    cuda = all("memory/peak_cuda_mb" in m and m["memory/peak_cuda_mb"] for m in runs.values())
    head = "| engine | s / bag | × full | peak saved MB / bag | × full |" + (" peak CUDA MB |" if cuda else "")
    epochs = len(runs["full"]["train/loss"])
    head += "".join(f" loss epoch {e + 1} |" for e in range(epochs)) + " run s |"
    rows = [head, "|" + "---|" + "---:|" * (head.count("|") - 2)]
    full_bag, full_mb = per_bag(runs["full"], "time/bag_s"), max(runs["full"]["memory/peak_saved_mb"])
    for name, metrics in runs.items():
        bag, mb = per_bag(metrics, "time/bag_s"), max(metrics["memory/peak_saved_mb"])
        cells = [labels[name], f"{bag:.3f}", f"{bag / full_bag:.2f}", f"{mb:.1f}", f"{mb / full_mb:.3f}"]
        if cuda:
            cells.append(f"{max(metrics['memory/peak_cuda_mb']):.0f}")
        cells += [f"{loss:.6f}" for loss in metrics["train/loss"]] + ["reused" if seconds[name] is None else f"{seconds[name]:.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
    difference = relative_difference(runs["acc"]["train/loss"], runs["full"]["train/loss"])
    rows.append("")
    rows.append("|L_acc − L_full| / L_full per epoch: " + ", ".join(f"{d:.1e}" for d in difference))
    return "\n".join(rows)


def plot(path: Path, runs: dict[str, dict[str, list[float]]], labels: dict[str, str], title: str) -> None:
    """Left: both training-loss curves; right: their relative difference on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, style in (("full", dict(lw=3, alpha=0.5)), ("acc", dict(ls="--", marker="o"))):
        losses = runs[name]["train/loss"]
        left.plot(range(1, len(losses) + 1), losses, label=labels[name], **style)
    left.set(xlabel="epoch", ylabel="training loss (mean over bags)", title="loss curves")
    for axis in (left, right):
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    left.legend()
    difference = relative_difference(runs["acc"]["train/loss"], runs["full"]["train/loss"])
    right.semilogy(range(1, len(difference) + 1), np.maximum(difference, 1e-17), marker="o")
    right.axhline(np.finfo(np.float32).eps, color="grey", ls=":", label="float32 epsilon")
    right.set(xlabel="epoch", ylabel="|L_acc − L_full| / L_full", title="relative difference")
    right.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--aggregator", default="transmil")
    parser.add_argument("--dataset", default="synthetic_wsi", help="a dataset of image bags: synthetic_wsi (tiles), digits_bags, ...")
    parser.add_argument("--alpha", type=float, default=10.0, help="ACC chunk, percent of a bag")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: comparable timings)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs/bench_e2e")
    parser.add_argument("--reuse", action="store_true", help="read a run already complete with the same config instead of training it")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs (e.g. dataset.magnification=5.0)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        run_both(args)
    finally:
        torch.set_num_threads(threads)  # process-wide: give it back (a caller's later runs sum floats with its own threads)


def run_both(args: argparse.Namespace) -> None:
    """Train both engines, then write the table and the figure."""
    labels = {"full": "engine=full", "acc": f"engine=acc alpha={args.alpha:g}"}
    runs, seconds = {}, {}
    for name in ("full", "acc"):
        overrides = [*base_overrides(args.dataset, args.aggregator, args.epochs, args.seed), *args.overrides, *run_overrides(name, args.alpha)]
        print(f"{name}: {' '.join(overrides)}", flush=True)
        runs[name], seconds[name] = train(overrides, args.out / "runs" / f"{args.aggregator}_{name}", args.reuse)
        print(f"{name}: {'reused' if seconds[name] is None else f'{seconds[name]:.0f} s'}, losses {runs[name]['train/loss']}", flush=True)
    text = table(runs, seconds, labels)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"e2e_{args.aggregator}.md").write_text(text + "\n")
    plot(args.out / f"e2e_{args.aggregator}.png", runs, labels, f"aggregator={args.aggregator} end to end on tiles, seed {args.seed}")
    print(text)
    print(f"\nwritten: {args.out / f'e2e_{args.aggregator}.md'}, {args.out / f'e2e_{args.aggregator}.png'}")


if __name__ == "__main__":
    main()
