"""The all-in-memory multi-GPU paper's Figure 4 at reduced scale: K tiles per slide vs
training loss and validation AUC, single device vs tile-parallel.

Two Hydra multiruns over `dataset.tiles_per_bag` (K; "null" = every tile) and, with
`--seeds`, over `seed` (the paper repeats every point over 20 Monte-Carlo CV runs), one with
`strategy=single` and one with `strategy=tile_parallel trainer.devices=R`, each job a normal
run folder; then per K the mean ± std over the seeds of the final training loss, the final
validation AUC and the selected model's test AUC, and the largest difference between the
two strategies' curves.

    python scripts/figure4_tiles.py                                   # synthetic slides (tiles), K = 16, 64, 256, all
    python scripts/figure4_tiles.py --seeds 1,2,3 dataset=c16_like encoder=identity encoder.standardize=true
writes figure4.png (the paper's panels a-c: loss curves, final loss and validation AUC
against K), figure4.csv and figure4.md under --out. Extra arguments are Hydra overrides for
both sweeps.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def sweep(name: str, tiles: str, seeds: str | None, strategy: list[str], overrides: list[str], out: Path) -> Path:
    """One multirun over K (and the seeds); returns its sweep folder."""
    folder = out / name
    command = [sys.executable, "-m", "mil_experiments", "-m", f"dataset.tiles_per_bag={tiles}",
               *([f"seed={seeds}"] if seeds else []), *strategy, *overrides,
               f"hydra.sweep.dir={folder}", "logger=none", "trainer.enable_progress_bar=false"]  # fmt: skip
    print("+", " ".join(command[1:]), flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(command, check=True, cwd=REPO, env=env)
    return folder


def job_runs(folder: Path) -> dict[tuple[str, str], dict]:
    """(K, seed) as overridden -> per-epoch train/loss and val/auc, and the test AUC, of each job."""
    from mil_experiments.summaries import job_overrides

    runs = {}
    for job in sorted((p for p in folder.iterdir() if (p / "metrics.csv").is_file()), key=lambda p: int(p.name)):
        overrides = dict(o.split("=", 1) for o in job_overrides(job))
        if "dataset.tiles_per_bag" not in overrides:
            raise SystemExit(f"error: {job / '.hydra' / 'overrides.yaml'}: no dataset.tiles_per_bag override (not a job of this script's sweeps)")
        with (job / "metrics.csv").open() as f:
            curve = [{"epoch": int(r["epoch"]), "train_loss": float(r["train/loss"]), "val_auc": float(r["val/auc"])}
                     for r in csv.DictReader(f)]  # fmt: skip
        results = job / "results.json"
        test_auc = json.loads(results.read_text())["test"]["test/auc"] if results.is_file() else float("nan")
        runs[(overrides["dataset.tiles_per_bag"], overrides.get("seed", "config"))] = {"curve": curve, "test_auc": test_auc}
    return runs


def k_order(k: str) -> float:
    return float("inf") if k == "null" else float(k)


def k_label(k: str) -> str:
    return "all" if k == "null" else k


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std (0 for one value)."""
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def summarize(runs: dict[str, dict]) -> tuple[list[str], dict]:
    """Per K and strategy: mean ± std over seeds of final train loss, final val AUC, test AUC."""
    ks = sorted({k for by_job in runs.values() for k, _ in by_job}, key=k_order)
    summary = {}
    for strategy, by_job in runs.items():
        for k in ks:
            jobs = [job for (kk, _), job in by_job.items() if kk == k]
            summary[strategy, k] = {
                "train_loss": mean_std([j["curve"][-1]["train_loss"] for j in jobs]),
                "val_auc": mean_std([j["curve"][-1]["val_auc"] for j in jobs]),
                "test_auc": mean_std([j["test_auc"] for j in jobs]),
                "n": len(jobs),
            }
    return ks, summary


def largest_difference(runs: dict[str, dict]) -> dict[str, float] | None:
    """The largest |a - b| of train loss and val AUC over every epoch of every (K, seed) both strategies ran."""
    if len(runs) != 2:
        return None
    first, second = runs.values()
    shared = sorted(set(first) & set(second))
    worst = {"train_loss": 0.0, "val_auc": 0.0}
    for job in shared:
        for a, b in zip(first[job]["curve"], second[job]["curve"], strict=True):
            for key in worst:
                worst[key] = max(worst[key], abs(a[key] - b[key]))
    return worst


def write_outputs(runs: dict[str, dict], out: Path) -> str:
    """figure4.csv, figure4.md (returned) and figure4.png from {strategy: job_runs(...)}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (out / "figure4.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["strategy", "tiles_per_bag", "seed", "epoch", "train_loss", "val_auc", "test_auc"])
        for strategy, by_job in runs.items():
            for (k, seed), job in by_job.items():
                for r in job["curve"]:
                    writer.writerow([strategy, k, seed, r["epoch"], r["train_loss"], r["val_auc"], job["test_auc"]])
    ks, summary = summarize(runs)
    columns = ("final train loss", "final val AUC", "test AUC")
    lines = ["| K tiles per bag | " + " | ".join(f"{s}: {c}" for s in runs for c in columns) + " | seeds |",
             "|---|" + "---:|" * (len(columns) * len(runs)) + "---:|"]  # fmt: skip
    for k in ks:
        cells = []
        for strategy in runs:
            row = summary[strategy, k]
            cells += [f"{row['train_loss'][0]:.4f} ± {row['train_loss'][1]:.4f}",
                      f"{row['val_auc'][0]:.3f} ± {row['val_auc'][1]:.3f}", f"{row['test_auc'][0]:.3f} ± {row['test_auc'][1]:.3f}"]  # fmt: skip
        lines.append(f"| {k_label(k)} | " + " | ".join(cells) + f" | {summary[next(iter(runs)), k]['n']} |")
    worst = largest_difference(runs)
    if worst is not None:
        names = " and ".join(runs)
        lines += ["", f"Largest difference between {names} over every epoch of every run: "
                      f"train loss {worst['train_loss']:.2e}, val AUC {worst['val_auc']:.2e}."]  # fmt: skip
    text = "\n".join(lines) + "\n"
    (out / "figure4.md").write_text(text)

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (strategy, by_job), style in zip(runs.items(), ("-", "--"), strict=False):
        for i, k in enumerate(ks):
            curves = [job["curve"] for (kk, _), job in by_job.items() if kk == k]
            epochs = [r["epoch"] for r in curves[0]]
            mean = [statistics.fmean(c[e]["train_loss"] for c in curves) for e in range(len(epochs))]
            axes[0].plot(epochs, mean, style, color=colours[i % len(colours)], label=f"K={k_label(k)}, {strategy}")
        positions = range(len(ks))
        for axis, key in ((axes[1], "train_loss"), (axes[2], "val_auc")):
            means = [summary[strategy, k][key][0] for k in ks]
            stds = [summary[strategy, k][key][1] for k in ks]
            axis.errorbar(positions, means, yerr=stds, fmt="o" + style, capsize=4, label=strategy)
    axes[0].set(title="a) training loss (mean over seeds)", xlabel="epoch", ylabel="training loss")
    axes[1].set(title="b) final training loss", xlabel="K tiles per slide", ylabel="training loss")
    axes[2].set(title="c) final validation AUC", xlabel="K tiles per slide", ylabel="validation AUC")
    for axis in axes[1:]:
        axis.set_xticks(range(len(ks)), [k_label(k) for k in ks])
        axis.legend(fontsize=8)
    axes[0].legend(fontsize=7)
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "figure4.png", dpi=110)
    plt.close(figure)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", default="16,64,256,null", help="the K values swept (null: every tile)")
    parser.add_argument("--seeds", default=None, help="seeds swept at every K, e.g. 1,2,3 (default: the config's seed)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "figure4")
    args, overrides = parser.parse_known_args()
    if not any(o.startswith("dataset=") for o in overrides):
        overrides = ["dataset=synthetic_wsi", "method=abmil_acc", "alpha=25", *overrides]
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {
        "single": job_runs(sweep("single", args.tiles, args.seeds, ["strategy=single"], overrides, args.out)),
        f"tile_parallel x{args.ranks}": job_runs(
            sweep("tile_parallel", args.tiles, args.seeds, ["strategy=tile_parallel", f"trainer.devices={args.ranks}"],
                  overrides, args.out)
        ),
    }  # fmt: skip
    print(write_outputs(runs, args.out))


if __name__ == "__main__":
    main()
