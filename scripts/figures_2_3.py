"""Reproduce Figures 2 and 3 of the gradient-accumulation paper with one command.

Figure 2: test bag accuracy and instance-level AUC of ABMIL, ABMIL-ACC-alpha% and
ABMIL-SAMPL (training sampling p%), each evaluated with inference sampling 3/25/50/100%,
over repeats with the data set resampled each time (the seed). Figure 3: wall-clock
training time of each variant, from the same runs.

    python scripts/figures_2_3.py                                  # digits bags, 2 CPU cores, ~15 min
    python scripts/figures_2_3.py --preset figure2_qmnist dataset.root=/data/qmnist   # paper scale, GPU

Each training variant is one Hydra multirun over the seeds (`python -m mil_experiments -m
experiment=<preset> ...`); every run's results.json is gathered into `table.csv`, and the
figures are drawn from it (`--plot-only` redraws from an existing output folder).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
INFERENCE_PERCENTS = (3.0, 25.0, 50.0, 100.0)


def training_variants(alphas: list[str], train_sampling: list[str]) -> dict[str, list[str]]:
    """Each trained variant: its name and the overrides that select it."""
    variants = {"ABMIL": ["method=abmil"]}
    for alpha in alphas:
        variants[f"ABMIL-ACC-{alpha}%"] = ["method=abmil_acc", f"alpha={alpha}"]
    for percent in train_sampling:
        variants[f"ABMIL-SAMPL-{percent}%"] = ["method=abmil_sampl", f"sampling.train={percent}"]
    return variants


def run_sweeps(preset: str, out: Path, seeds: str, variants: dict[str, list[str]], extra: list[str]) -> None:
    """One multirun per variant, sequentially; a variant already complete is skipped."""
    n_seeds = len(seeds.split(","))
    for i, (name, overrides) in enumerate(variants.items(), 1):
        sweep_dir = out / "runs" / _slug(name)
        if len(list(sweep_dir.glob("*/results.json"))) == n_seeds:
            print(f"[{i}/{len(variants)}] {name}: already done, skipped")
            continue
        print(f"[{i}/{len(variants)}] {name}: training {n_seeds} runs", flush=True)
        command = [sys.executable, "-m", "mil_experiments", "-m", f"experiment={preset}", *overrides,
                   f"seed={seeds}", f"hydra.sweep.dir={sweep_dir}", *extra]
        subprocess.run(command, cwd=REPO, check=True)


def collect(out: Path, variants: dict[str, list[str]]) -> list[dict]:
    """One row per (variant, seed, inference percent) from the runs' results.json."""
    rows = []
    for name in variants:
        for results_file in sorted((out / "runs" / _slug(name)).glob("*/results.json")):
            results = json.loads(results_file.read_text())
            test = results["test"]
            percents = results["sampling"]["test_inference"]
            for i, percent in enumerate(percents):
                suffix = "" if i == 0 else f"@inference{percent:g}"
                rows.append({
                    "variant": name,
                    "seed": results["seed"],
                    "inference_percent": percent,
                    "bag_accuracy": test[f"test/accuracy{suffix}"],
                    "bag_auc": test[f"test/auc{suffix}"],
                    "instance_auc": test.get(f"test/instance_auc{suffix}", float("nan")),
                    "train_seconds": results["time"]["train_seconds"],
                    "seconds_per_bag": results["time"]["seconds_per_bag"],
                    "peak_saved_activations_mb": results["memory"]["peak_saved_activations_mb"],
                    "run_dir": results["run_dir"],
                })
    return rows


def write_table(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds, per variant and inference percent."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["variant"], row["inference_percent"])].append(row)
    summary = []
    for (variant, percent), members in groups.items():
        entry = {"variant": variant, "inference_percent": percent, "repeats": len(members)}
        for key in ("bag_accuracy", "instance_auc", "train_seconds"):
            values = np.array([m[key] for m in members], dtype=float)
            entry[f"{key}_mean"] = float(np.nanmean(values))
            entry[f"{key}_std"] = float(np.nanstd(values))
        summary.append(entry)
    return summary


def plot_figure2(summary: list[dict], variants: list[str], path: Path, title: str) -> None:
    """Two panels (bag accuracy, instance AUC): variants on x, one bar per inference percent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {(s["variant"], s["inference_percent"]): s for s in summary}
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.3 * len(variants)), 7), sharex=True)
    width = 0.8 / len(INFERENCE_PERCENTS)
    colours = plt.cm.viridis(np.linspace(0.15, 0.85, len(INFERENCE_PERCENTS)))
    for ax, metric, label in zip(axes, ("bag_accuracy", "instance_auc"), ("Bag accuracy", "Instance AUC"), strict=True):
        for j, percent in enumerate(INFERENCE_PERCENTS):
            x = np.arange(len(variants)) + (j - (len(INFERENCE_PERCENTS) - 1) / 2) * width
            means = [by_key.get((v, percent), {}).get(f"{metric}_mean", np.nan) for v in variants]
            stds = [by_key.get((v, percent), {}).get(f"{metric}_std", 0.0) for v in variants]
            ax.bar(x, means, width, yerr=stds, capsize=2, color=colours[j], label=f"inference {percent:g}%")
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.22)
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(ncol=4, fontsize=8, loc="upper center")
    axes[0].set_title(title)
    axes[1].set_xticks(np.arange(len(variants)), variants, rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_figure3(summary: list[dict], variants: list[str], path: Path, title: str) -> None:
    """Training time per variant (mean and spread over repeats)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = {s["variant"]: s for s in summary if s["inference_percent"] == 100.0}
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(variants)), 3.8))
    means = [times[v]["train_seconds_mean"] for v in variants]
    stds = [times[v]["train_seconds_std"] for v in variants]
    ax.bar(np.arange(len(variants)), means, yerr=stds, capsize=3, color="tab:blue")
    ax.set_xticks(np.arange(len(variants)), variants, rotation=30, ha="right")
    ax.set_ylabel("Training time (s)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _slug(name: str) -> str:
    return name.lower().replace("%", "").replace("-", "_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="figure2_digits", help="experiment preset (conf/experiment/)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default outputs/figures/<preset>)")
    parser.add_argument("--seeds", default="1,2,3", help="one repeat per seed; the data are resampled too")
    parser.add_argument("--alphas", default="3,25,50", help="ABMIL-ACC alpha values")
    parser.add_argument("--train-sampling", default="3,25,50", help="ABMIL-SAMPL training sampling percents")
    parser.add_argument("--plot-only", action="store_true", help="redraw from the runs already in --out")
    parser.add_argument("--publish", action="store_true", help="copy the PNGs to docs/img/")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. dataset.root=...")
    args = parser.parse_args()
    out = (args.out or REPO / "outputs" / "figures" / args.preset).resolve()
    out.mkdir(parents=True, exist_ok=True)
    variants = training_variants(args.alphas.split(","), args.train_sampling.split(","))
    if not args.plot_only:
        run_sweeps(args.preset, out, args.seeds, variants, args.overrides)
    rows = collect(out, variants)
    if not rows:
        sys.exit(f"error: no results.json under {out / 'runs'}; run without --plot-only first")
    write_table(rows, out / "table.csv")
    summary = summarise(rows)
    write_table(summary, out / "summary.csv")
    names = [v for v in variants if any(r["variant"] == v for r in rows)]
    plot_figure2(summary, names, out / "figure2.png", f"Figure 2 ({args.preset}): test performance, mean ± std over seeds")
    plot_figure3(summary, names, out / "figure3.png", f"Figure 3 ({args.preset}): training time, mean ± std over seeds")
    print(f"table: {out / 'table.csv'}\nsummary: {out / 'summary.csv'}\nfigures: {out / 'figure2.png'}, {out / 'figure3.png'}")
    if args.publish:
        (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
        for name in ("figure2", "figure3"):
            shutil.copy(out / f"{name}.png", REPO / "docs" / "img" / f"{name}_{args.preset}.png")


if __name__ == "__main__":
    main()
