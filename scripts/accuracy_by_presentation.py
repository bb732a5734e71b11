"""Accuracy of trained runs per presentation of a benchmark cohort's test slides.

    python scripts/accuracy_by_presentation.py data/cohorts/c16_like outputs/mhim_c16_like/stage1/fold0 outputs/mhim_c16_like/stage2/fold0

Joins each run's `test_predictions.csv` with the cohort's `slides.csv` (class and presentation
of every slide: c16_like's `micro`, `macro`, `subtle_only`, ...) and prints a Markdown table:
one row per run, the share of its test slides classified right in each presentation, and the
run's test accuracy and AUC (from `results.json`).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np


def accuracy_by_presentation(run_dir: Path, slides_csv: Path) -> dict[str, tuple[float, int]]:
    """`class/presentation` -> (share classified right, number of test slides) of one run."""
    slides = {r["slide_id"]: r for r in csv.DictReader(slides_csv.open())}
    hits: dict[str, list[bool]] = {}
    for row in csv.DictReader((run_dir / "test_predictions.csv").open()):
        slide = slides[row["bag_id"]]
        hits.setdefault(f"{slide['class']}/{slide['presentation']}", []).append(int(row["predicted"]) == int(row["label"]))
    return {k: (float(np.mean(v)), len(v)) for k, v in sorted(hits.items())}


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    cohort, runs = Path(argv[0]), [Path(a) for a in argv[1:]]
    for path in [cohort / "slides.csv", *[r / "test_predictions.csv" for r in runs]]:
        if not path.is_file():
            print(f"error: {path}: not found", file=sys.stderr)
            return 2
    tables = {run: accuracy_by_presentation(run, cohort / "slides.csv") for run in runs}
    keys = sorted({k for t in tables.values() for k in t})
    print("| run | method | aggregator | " + " | ".join(f"{k} (n)" for k in keys) + " | test accuracy | test AUC |")
    print("|---|---|---|" + "---|" * len(keys) + "---|---|")
    for run, table in tables.items():
        results = json.loads((run / "results.json").read_text())
        cells = [f"{table[k][0]:.2f} ({table[k][1]})" if k in table else "" for k in keys]
        print(f"| {run} | {results['method']} | {results['aggregator']} | " + " | ".join(cells)
              + f" | {results['test']['test/accuracy']:.3f} | {results['test']['test/auc']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
