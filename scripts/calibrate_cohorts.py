"""Calibration of the benchmark cohorts: ABMIL on each cohort's highest and lowest magnification.

    python scripts/calibrate_cohorts.py                          # all three, 3 seeds
    python scripts/calibrate_cohorts.py --cohorts c16_like --seeds 1 --epochs 20

Each run is the ordinary CLI config (`dataset=<cohort> encoder=identity
encoder.standardize=true aggregator=abmil`, the cohort's own train / val / test split, the
default model selection, `OMP_NUM_THREADS=1` advised on a shared machine) at one
magnification; the test accuracy (micro and macro), AUC (one-vs-rest macro beyond two
classes) and, per presentation of the test slides (`slides.csv`: micro-metastasis, subtle
form only, ...), the share of slides classified right. A cohort is calibrated when ABMIL on
its highest magnification lands clearly below perfect and above chance, and (c16_like)
clearly worse on the lowest magnification. Writes `outputs/calibration/calibration.md` and
`.csv`, and keeps each run folder under `outputs/calibration/<cohort>/<mag>x/seed<k>`.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent


def run_one(cohort: str, magnification: float, seed: int, epochs: int, lr: float, out: Path, extra: list[str]) -> dict:
    """Train and test ABMIL on one magnification of `cohort`; the run's results with per-presentation accuracy."""
    from mil_experiments.api import compose_config
    from mil_experiments.run import train_and_test

    if out.exists():
        shutil.rmtree(out)
    cfg = compose_config([
        f"dataset={cohort}", f"dataset.magnifications=[{magnification}]", "encoder=identity", "encoder.standardize=true", "aggregator=abmil",
        "logger=none", f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false", f"seed={seed}",
        f"method.optimizer.lr={lr}", "evaluation.bootstrap=0", "telemetry.count_saved_tensors=false", *extra,
    ])
    from accuracy_by_presentation import accuracy_by_presentation  # scripts/, next to this one

    results = train_and_test(cfg, out)
    root = Path(OmegaConf.select(cfg, "dataset.root"))  # <cohort>/features/lenet
    by_presentation = accuracy_by_presentation(out, root.parent.parent / "slides.csv")
    test = results["test"]
    return {
        "accuracy": test["test/accuracy"],
        "accuracy_macro": test.get("test/accuracy_macro"),
        "auc": test["test/auc"],
        "presentations": {k: share for k, (share, _) in by_presentation.items()},
        "selected_epoch": results["selection"]["selected_epoch"],
    }


def cell(values: list[float]) -> str:
    values = [v for v in values if v is not None and v == v]
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohorts", default="c16_like,tcga_like,bright_like")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    parser.add_argument("--levels", default="highest,lowest", help="which magnifications of each cohort: highest, lowest or both")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "calibration")
    parser.add_argument("overrides", nargs="*", help="extra CLI overrides for every run")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, table = [], ["| cohort | magnification | test accuracy | macro accuracy | test AUC | accuracy per test presentation |", "|---|---|---|---|---|---|"]
    for cohort in args.cohorts.split(","):
        preset = OmegaConf.load(REPO / "conf" / "cohort" / f"{cohort}.yaml")
        magnifications = list(preset.extract.magnifications)
        chosen = {"highest": max(magnifications), "lowest": min(magnifications)}
        for magnification in [chosen[level] for level in args.levels.split(",")]:
            runs = [run_one(cohort, magnification, seed, args.epochs, args.lr, args.out / cohort / f"{magnification}x" / f"seed{seed}", args.overrides)
                    for seed in seeds]
            for seed, r in zip(seeds, runs, strict=True):
                rows.append({"cohort": cohort, "magnification": magnification, "seed": seed, **{k: v for k, v in r.items() if k != "presentations"},
                             **{f"acc[{k}]": v for k, v in r["presentations"].items()}})
            presentations = sorted({k for r in runs for k in r["presentations"]})
            per = ", ".join(f"{k} {np.mean([r['presentations'][k] for r in runs if k in r['presentations']]):.2f}" for k in presentations)
            table.append(f"| {cohort} | {magnification:g}x | {cell([r['accuracy'] for r in runs])} | {cell([r['accuracy_macro'] for r in runs])}"
                         f" | {cell([r['auc'] for r in runs])} | {per} |")
            print(table[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    header = f"ABMIL on standardized features, {args.epochs} epochs, Adam lr {args.lr:g}, seeds {args.seeds}, the cohort's split, default selection\n\n"
    (args.out / "calibration.md").write_text(header + "\n".join(table) + "\n")
    keys = sorted({k for r in rows for k in r})
    with open(args.out / "calibration.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    print(json.dumps({"written": str(args.out / "calibration.md")}))


if __name__ == "__main__":
    main()
