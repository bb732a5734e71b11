"""Reproduce Figure 1 of the gradient-accumulation paper: does ABMIL-ACC-25% train like full-bag ABMIL?

Four trainings from the same initial weights (same seed): ABMIL-ACC-25% and full-bag
ABMIL, each with batch norm in the encoder (`encoder.norm=batch`) and without
(`encoder.norm=none`). The figure has the paper's layout: row 1 with batch norm, row 2
without; left the two training-loss curves per epoch, right their relative difference
|L_acc - L_full| / L_full on a log axis.

    PYTHONPATH=. .venv/bin/python scripts/figure1.py                       # digits bags, CPU, ~5 min
    PYTHONPATH=. .venv/bin/python scripts/figure1.py --preset figure1_paper dataset.root=/data/qmnist
    PYTHONPATH=. .venv/bin/python scripts/figure1.py --float64-control      # + the no-BN pair in float64
    PYTHONPATH=. .venv/bin/python scripts/figure1.py --plot-only --publish   # redraw, copy to docs/img
    PYTHONPATH=. .venv/bin/python scripts/figure1.py --gradient-check        # one-step gradients per norm

`--float64-control` adds the pair without batch norm trained in float64: separates what
accumulation changes from float32 rounding amplified by training. The runs are trained in-process (`compose_config` + `train_and_test`) under
`<out>/runs/<norm>_<method>/`; a run already complete with the same config is reused.
Writes `<out>/figure1.png` and `<out>/figure1_curves.csv`.
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

REPO = Path(__file__).resolve().parent.parent
FLOAT32_EPS = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class Run:
    """One of the four trainings: its encoder norm, method and the overrides that select it."""

    norm: str  # "batch" | "none"
    method: str  # "acc" | "full"
    float64: bool = False  # the rounding control: the same pair trained in float64

    @property
    def variant(self) -> str:
        return self.norm + ("_fp64" if self.float64 else "")

    @property
    def name(self) -> str:
        return f"{self.variant}_{self.method}"

    @property
    def overrides(self) -> list[str]:
        method = ["method=abmil_acc", "alpha=25"] if self.method == "acc" else ["method=abmil"]
        precision = ["trainer.precision=64-true"] if self.float64 else []
        return [f"encoder.norm={self.norm}", *method, *precision]


RUNS = tuple(Run(norm, method) for norm in ("batch", "none") for method in ("acc", "full"))
FLOAT64_RUNS = (Run("none", "acc", True), Run("none", "full", True))
LABELS = {"acc": "ABMIL-ACC-25%", "full": "ABMIL (full bag)"}
ROW_TITLES = {"batch": "with batch norm", "none": "without batch norm", "none_fp64": "without batch norm, float64"}


def train_runs(
    preset: str, out: Path, extra: list[str], threads: int | None, runs: tuple[Run, ...] = RUNS
) -> dict[str, float]:
    """Train the runs in-process (skipping complete ones); return each run's wall seconds."""
    from mil_experiments.api import compose_config
    from mil_experiments.run import train_and_test

    if threads is not None:
        torch.set_num_threads(threads)
    seconds = {}
    for i, run in enumerate(runs, 1):
        cfg = compose_config([f"experiment={preset}", *run.overrides, *extra])
        run_dir = out / "runs" / run.name
        if _complete(run_dir, cfg):
            print(f"[{i}/{len(runs)}] {run.name}: already complete with this config, reused", flush=True)
            continue
        print(f"[{i}/{len(runs)}] {run.name}: training ({' '.join(run.overrides)})", flush=True)
        start = time.perf_counter()
        train_and_test(cfg, run_dir)
        seconds[run.name] = time.perf_counter() - start
        print(f"[{i}/{len(runs)}] {run.name}: {seconds[run.name]:.0f} s", flush=True)
    return seconds


def _complete(run_dir: Path, cfg: DictConfig) -> bool:
    """The run has every epoch in metrics.csv and was trained with exactly `cfg`."""
    metrics, saved = run_dir / "metrics.csv", run_dir / "config.yaml"
    if not (metrics.exists() and saved.exists()):
        return False
    same_config = saved.read_text() == OmegaConf.to_yaml(cfg, resolve=True)
    return same_config and len(read_metric(metrics, "train/loss")) == int(cfg.trainer.max_epochs)


def read_metric(metrics_csv: Path, key: str) -> list[float]:
    """One value per epoch of `key` from a run's metrics.csv, in epoch order."""
    with metrics_csv.open() as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: int(row["epoch"]))
    return [float(row[key]) for row in rows]


def relative_difference(acc: np.ndarray, full: np.ndarray) -> np.ndarray:
    """|L_acc - L_full| / L_full per epoch (the paper's Fig. 1, right column)."""
    return np.abs(acc - full) / np.abs(full)  # (epochs,)


def collect_curves(out: Path) -> dict[str, dict[str, np.ndarray]]:
    """Per variant (batch, none, and none_fp64 when its runs exist): both loss curves, their relative difference."""
    curves = {}
    for variant in ("batch", "none", "none_fp64"):
        paths = [out / "runs" / f"{variant}_{method}" / "metrics.csv" for method in ("acc", "full")]
        if variant == "none_fp64" and not all(p.exists() for p in paths):
            continue
        acc, full = (np.asarray(read_metric(p, "train/loss")) for p in paths)  # (epochs,) each
        epochs = min(len(acc), len(full))
        acc, full = acc[:epochs], full[:epochs]
        curves[variant] = {"acc": acc, "full": full, "relative_difference": relative_difference(acc, full)}
    return curves


def write_curves_csv(path: Path, curves: dict[str, dict[str, np.ndarray]]) -> None:
    """Long format: norm, epoch, acc loss, full-bag loss, relative difference (full precision)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variant", "epoch", "train_loss_acc25", "train_loss_full", "relative_difference"])
        for variant, c in curves.items():
            for epoch, (a, f, d) in enumerate(zip(c["acc"], c["full"], c["relative_difference"], strict=True)):
                writer.writerow([variant, epoch + 1, repr(float(a)), repr(float(f)), repr(float(d))])


def plot_figure(path: Path, curves: dict[str, dict[str, np.ndarray]], title: str) -> None:
    """The paper's 2 x 2 layout: rows = with / without batch norm; loss curves | relative difference.

    The float64 control, when present, is drawn on the lower right beside the float32 pair.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for row, norm in enumerate(("batch", "none")):
        c = curves[norm]
        epochs = np.arange(1, len(c["acc"]) + 1)
        left, right = axes[row]
        left.plot(epochs, c["full"], "-", color="tab:blue", lw=2.5, label=LABELS["full"])
        left.plot(epochs, c["acc"], "--", color="tab:orange", lw=1.8, label=LABELS["acc"])
        left.set_title(f"Training loss, {ROW_TITLES[norm]}")
        left.set_xlabel("epoch")
        left.set_ylabel("training loss (BCE)")
        left.legend()
        pairs = [(norm, "float32", "tab:red")]
        if norm == "none" and "none_fp64" in curves:
            pairs.append(("none_fp64", "float64", "tab:purple"))
        floor = FLOAT32_EPS / 100
        for variant, label, color in pairs:
            difference = curves[variant]["relative_difference"]
            x = np.arange(1, len(difference) + 1)
            shown = np.where(difference > 0, difference, np.nan)  # exact equality has no place on a log axis
            right.semilogy(x, shown, "o-", color=color, ms=4, label=label if np.any(difference > 0) else None)
            zeros = x[difference == 0]
            if len(zeros):
                right.plot(
                    zeros,
                    np.full(len(zeros), floor),
                    "v",
                    color=color,
                    alpha=0.7,
                    label=f"{label}: equal in every logged digit",
                )
        right.axhline(FLOAT32_EPS, color="gray", ls=":", lw=1)
        right.annotate(
            "float32 eps", (epochs[0], FLOAT32_EPS), textcoords="offset points", xytext=(0, 3), fontsize=8, color="gray"
        )
        right.set_title(f"|L_acc - L_full| / L_full, {ROW_TITLES[norm]}")
        right.set_xlabel("epoch")
        right.set_ylabel("relative difference")
        right.grid(True, which="major", alpha=0.3)
        right.legend(fontsize=8, loc="center right")
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gradient_agreement(preset: str, norm: str, extra: list[str]) -> dict[str, float]:
    """Relative L2 difference of the gradient of one ACC-25% step vs the full-bag step, same weights.

    On the first training bag of `preset` at initialisation, in train mode: ACC-25% float32
    and the full bag in float32 against the full bag in float64 (the rounding floor), and
    the batch-norm running mean after the step (updated once per chunk by ACC).
    """
    import copy

    from mil_experiments.api import compose_experiment
    from mil_experiments.engine import HeadResult, accumulate_gradients, chunk_size_for_alpha

    experiment = compose_experiment([f"experiment={preset}", f"encoder.norm={norm}", "method=abmil_acc", *extra])
    method = experiment.method
    bag = next(iter(experiment.datamodule.train_dataloader()))
    chunk = chunk_size_for_alpha(25, bag.size)

    def step(chunk_size: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        encoder = copy.deepcopy(method.encoder).to(dtype).train()
        aggregator = copy.deepcopy(method.aggregator).to(dtype).train()
        head = lambda features: HeadResult(_bce(aggregator(features).logits, bag.label))  # noqa: E731
        accumulate_gradients(encoder, head, bag.instances.to(dtype), chunk_size)
        grads = [p.grad.double() for p in [*encoder.parameters(), *aggregator.parameters()]]
        running = [b.double() for name, b in encoder.named_buffers() if name.endswith("running_mean")]
        return grads, running

    reference, reference_running = step(bag.size, torch.float64)
    full, _ = step(bag.size, torch.float32)
    acc, acc_running = step(chunk, torch.float32)
    result = {"full_fp32_vs_fp64": _relative(full, reference), "acc25_fp32_vs_full_fp64": _relative(acc, reference)}
    if reference_running:
        result["running_mean_acc25_vs_full"] = _relative(acc_running, reference_running)
    return result


def _bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, target.to(logits.dtype).reshape(1))


def _relative(tensors: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """||a - b|| / ||b|| over a list of tensors taken as one vector."""
    difference = sum(float(((a - b) ** 2).sum()) for a, b in zip(tensors, reference, strict=True)) ** 0.5
    return difference / sum(float((b**2).sum()) for b in reference) ** 0.5


def summary(curves: dict[str, dict[str, np.ndarray]], first: int = 10) -> str:
    """Max relative difference over the first `first` epochs and over all, per row."""
    lines = []
    for variant, c in curves.items():
        d = c["relative_difference"]
        head = float(np.max(d[:first])) if len(d) else math.nan
        lines.append(
            f"{ROW_TITLES[variant]:>28}: max relative difference epochs 1-{min(first, len(d))}: {head:.2e}, "
            f"all {len(d)} epochs: {float(np.max(d)):.2e}, last: {float(d[-1]):.2e}"
        )
    return "\n".join(lines)


def main() -> None:
    """Command line: train (unless --plot-only), draw, write the CSV, optionally publish."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. dataset.root=/data")
    parser.add_argument("--preset", default="figure1", help="conf/experiment preset (figure1 | figure1_paper)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "figures" / "figure1")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads for the runs (1: on a shared 2-core CPU more threads ran slower); "
        "0 keeps torch's default",
    )
    parser.add_argument(
        "--float64-control",
        action="store_true",
        help="also train the pair without batch norm in float64 (trainer.precision=64-true)",
    )
    parser.add_argument("--plot-only", action="store_true", help="redraw from the runs already under --out")
    parser.add_argument(
        "--gradient-check",
        action="store_true",
        help="only print the one-step gradient agreement for norm = batch, group, none, and exit",
    )
    parser.add_argument("--publish", action="store_true", help="copy the PNG to docs/img/figure1.png")
    args = parser.parse_args()

    if args.gradient_check:
        torch.set_num_threads(args.threads or torch.get_num_threads())
        for norm in ("batch", "group", "none"):
            agreement = gradient_agreement(args.preset, norm, args.overrides)
            print(f"norm={norm:>5}: " + ", ".join(f"{k} {v:.2e}" for k, v in agreement.items()))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.plot_only:
        start = time.perf_counter()
        runs = RUNS + (FLOAT64_RUNS if args.float64_control else ())
        seconds = train_runs(args.preset, args.out, args.overrides, args.threads or None, runs)
        if seconds:
            each = ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items())
            print(f"trained in {time.perf_counter() - start:.0f} s ({each})")
    curves = collect_curves(args.out)
    png = args.out / "figure1.png"
    plot_figure(png, curves, f"ABMIL-ACC-25% vs full-bag ABMIL, same initial weights (experiment={args.preset})")
    write_curves_csv(args.out / "figure1_curves.csv", curves)
    print(summary(curves))
    print(f"wrote {png} and {args.out / 'figure1_curves.csv'}")
    if args.publish:
        target = REPO / "docs" / "img" / "figure1.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, target)
        print(f"published {target}")


if __name__ == "__main__":
    main()
