"""Accuracy of trained runs per presentation of a benchmark cohort's test slides.

    python scripts/accuracy_by_presentation.py data/cohorts/c16_like outputs/mhim_c16_like/stage1/fold0 outputs/mhim_c16_like/stage2/fold0

Joins each run's `test_predictions.csv` with the cohort's `slides.csv` (class and presentation
of every slide: c16_like's `micro`, `macro`, `subtle_only`, ...) and prints a Markdown table:
one row per run, the share of its test slides classified right in each presentation, and the
run's test accuracy and AUC (from `results.json`).

A folder of runs (`outputs/mhim_c16_like/stage1`, holding `fold0/`, `fold1/`, ...) is one row:
the test predictions of its runs pooled (in k-fold cross-validation, one out-of-fold prediction
per slide), and the runs' test accuracy and AUC as mean ± std.

    python scripts/accuracy_by_presentation.py data/cohorts/c16_like outputs/mhim_c16_like/stage1 outputs/mhim_c16_like/stage2
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np


def run_folders(path: Path) -> list[Path]:
    """`path` itself when it is a run (has test_predictions.csv), else its sub-folders that are runs."""
    if (path / "test_predictions.csv").is_file():
        return [path]
    return sorted(p.parent for p in path.glob("*/test_predictions.csv"))


def accuracy_by_presentation(run_dir: Path, slides_csv: Path) -> dict[str, tuple[float, int]]:
    """`class/presentation` -> (share classified right, number of test slides) of one run (or a folder of runs, pooled)."""
    slides = {r["slide_id"]: r for r in csv.DictReader(slides_csv.open())}
    hits: dict[str, list[bool]] = {}
    rows = [row for run in run_folders(run_dir) for row in csv.DictReader((run / "test_predictions.csv").open())]
    for row in rows:
        slide = slides[row["bag_id"]]
        hits.setdefault(f"{slide['class']}/{slide['presentation']}", []).append(int(row["predicted"]) == int(row["label"]))
    return {k: (float(np.mean(v)), len(v)) for k, v in sorted(hits.items())}


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    cohort, runs = Path(argv[0]), [Path(a) for a in argv[1:]]
    if not (cohort / "slides.csv").is_file():
        print(f"error: {cohort / 'slides.csv'}: not found", file=sys.stderr)
        return 2
    for run in runs:
        if not run_folders(run):
            print(f"error: {run}: no test_predictions.csv in it or in its sub-folders", file=sys.stderr)
            return 2
    tables = {run: accuracy_by_presentation(run, cohort / "slides.csv") for run in runs}
    keys = sorted({k for t in tables.values() for k in t})
    print("| run | method | aggregator | " + " | ".join(f"{k} (n)" for k in keys) + " | test accuracy | test AUC |")
    print("|---|---|---|" + "---|" * len(keys) + "---|---|")
    for run, table in tables.items():
        results = [json.loads((r / "results.json").read_text()) for r in run_folders(run)]
        cells = [f"{table[k][0]:.2f} ({table[k][1]})" if k in table else "" for k in keys]
        metrics = []
        for key in ("test/accuracy", "test/auc"):
            values = np.array([r["test"][key] for r in results])
            metrics.append(f"{values[0]:.3f}" if len(values) == 1 else f"{values.mean():.3f} ± {values.std():.3f} ({len(values)} runs)")
        print(f"| {run} | {results[0]['method']} | {results[0]['aggregator']} | " + " | ".join(cells) + " | " + " | ".join(metrics) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
