"""The all-in-memory multi-GPU paper's Figure 4 at reduced scale: K tiles per slide vs
training loss and validation AUC, single device vs tile-parallel.

Two Hydra multiruns over `dataset.tiles_per_bag` (K; "null" = every tile), one with
`strategy=single` and one with `strategy=tile_parallel trainer.devices=R`, each job a
normal run folder; then per K the training loss and validation AUC of every epoch.

    python scripts/figure4_tiles.py                                   # synthetic slides (tiles), K = 16, 64, 256, all
    python scripts/figure4_tiles.py --tiles 4,16,null dataset=digits_bags dataset.bag_size=64 trainer.max_epochs=4
writes figure4.png, figure4.csv and figure4.md under --out. Extra arguments are Hydra
overrides for both sweeps.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def sweep(name: str, tiles: str, strategy: list[str], overrides: list[str], out: Path) -> Path:
    """One multirun over K; returns its sweep folder."""
    folder = out / name
    command = [sys.executable, "-m", "mil_experiments", "-m", f"dataset.tiles_per_bag={tiles}", *strategy, *overrides,
               f"hydra.sweep.dir={folder}", "logger=none", "trainer.enable_progress_bar=false"]  # fmt: skip
    print("+", " ".join(command[1:]), flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(command, check=True, cwd=REPO, env=env)
    return folder


def job_curves(folder: Path) -> dict[str, list[dict[str, float]]]:
    """K (as overridden) -> per epoch train/loss and val/auc, from each job's overrides and metrics.csv."""
    from omegaconf import OmegaConf

    curves = {}
    for job in sorted((p for p in folder.iterdir() if (p / "metrics.csv").is_file()), key=lambda p: int(p.name)):
        overrides = [str(o) for o in OmegaConf.load(job / ".hydra" / "overrides.yaml")]
        k = next(o.split("=", 1)[1] for o in overrides if o.startswith("dataset.tiles_per_bag="))
        with (job / "metrics.csv").open() as f:
            curves[k] = [{"epoch": int(r["epoch"]), "train_loss": float(r["train/loss"]), "val_auc": float(r["val/auc"])} for r in csv.DictReader(f)]
    return curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", default="16,64,256,null", help="the K values swept (null: every tile)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "figure4")
    args, overrides = parser.parse_known_args()
    if not any(o.startswith("dataset=") for o in overrides):
        overrides = ["dataset=synthetic_wsi", "method=abmil_acc", "alpha=25", *overrides]
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {
        "single": job_curves(sweep("single", args.tiles, ["strategy=single"], overrides, args.out)),
        f"tile_parallel x{args.ranks}": job_curves(
            sweep("tile_parallel", args.tiles, ["strategy=tile_parallel", f"trainer.devices={args.ranks}"], overrides, args.out)
        ),
    }
    write_outputs(runs, args.out)


def write_outputs(runs: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (out / "figure4.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["strategy", "tiles_per_bag", "epoch", "train_loss", "val_auc"])
        for strategy, curves in runs.items():
            for k, rows in curves.items():
                for r in rows:
                    writer.writerow([strategy, k, r["epoch"], r["train_loss"], r["val_auc"]])
    lines = ["| K tiles per bag | " + " | ".join(f"{s}: final train loss | {s}: final val AUC" for s in runs) + " |",
             "|---|" + "---:|---:|" * len(runs)]  # fmt: skip
    for k in next(iter(runs.values())):
        cells = []
        for curves in runs.values():
            last = curves[k][-1]
            cells += [f"{last['train_loss']:.4f}", f"{last['val_auc']:.3f}"]
        lines.append(f"| {'all' if k == 'null' else k} | " + " | ".join(cells) + " |")
    (out / "figure4.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for (strategy, curves), style in zip(runs.items(), ("-", "--"), strict=False):
        for k, rows in curves.items():
            epochs = [r["epoch"] for r in rows]
            label = f"K={'all' if k == 'null' else k}, {strategy}"
            axes[0].plot(epochs, [r["train_loss"] for r in rows], style, marker="o", ms=3, label=label)
            axes[1].plot(epochs, [r["val_auc"] for r in rows], style, marker="o", ms=3, label=label)
    axes[0].set_title("training loss")
    axes[1].set_title("validation AUC")
    for axis in axes:
        axis.set_xlabel("epoch")
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "figure4.png", dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
