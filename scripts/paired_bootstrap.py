"""Is method B better than method A on the same slides? A paired bootstrap over pooled test predictions.

    python scripts/paired_bootstrap.py outputs/mhim_c16_like/stage1 outputs/mhim_c16_like/stage2 \
        --names ABMIL,MHIM-ABMIL [--resamples 2000] [--seed 0] [--out outputs/mhim_c16_like/paired.md]

A and B are folders of runs (`fold<k>/` or any sub-folders holding `test_predictions.csv`, as
`scripts/mhim_two_stage.py` writes), or single run folders. In k-fold cross-validation every
slide is in exactly one test fold, so the test predictions of all folds pooled are one
out-of-fold prediction per slide. The two methods must have predicted the same slides. Prints
and writes (Markdown) per method: AUC and accuracy per fold and their mean ± std, and the pooled
AUC and accuracy; then B − A pooled with a 95% percentile interval from resampling the slides
with replacement (the same resample for both methods: paired), and the share of resamples in
which B is not better (a one-sided bootstrap p-value). Binary labels only (p_1 is the score).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch
from accuracy_by_presentation import run_folders  # scripts/, next to this one
from torchmetrics.functional.classification import binary_auroc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mil_experiments.errors import DataError  # noqa: E402


def read_predictions(folder: Path) -> dict[str, list[dict]]:
    """Run name -> rows of its test_predictions.csv, for `folder` itself or each run folder below it."""
    files = [run / "test_predictions.csv" for run in run_folders(folder)]
    if not files:
        raise DataError(f"{folder}: no test_predictions.csv in it or in its sub-folders")
    runs = {}
    for path in files:
        with path.open() as f:
            rows = list(csv.DictReader(f))
        if not rows or "p_1" not in rows[0]:
            raise DataError(f"{path}: needs binary predictions (columns bag_id, label, predicted, p_0, p_1)")
        runs[path.parent.name] = rows
    return runs


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the runs compute it (`metrics.bag_metrics`: torchmetrics' binary_auroc; ties count one half); NaN with one class only."""
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(binary_auroc(torch.as_tensor(scores, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long)))


def pooled(runs: dict[str, list[dict]]) -> dict[str, tuple[int, float, int]]:
    """slide -> (label, p_1, predicted) over every run; a slide predicted twice is an error."""
    out = {}
    for name, rows in runs.items():
        for r in rows:
            if r["bag_id"] in out:
                raise DataError(f"{name}: slide {r['bag_id']} is in two test folds; pool runs of one cross-validation only")
            out[r["bag_id"]] = (int(r["label"]), float(r["p_1"]), int(r["predicted"]))
    return out


def per_run(runs: dict[str, list[dict]]) -> list[tuple[str, float, float]]:
    """(run, AUC, accuracy) of each run's own test set."""
    result = []
    for name, rows in runs.items():
        labels = np.array([int(r["label"]) for r in rows])
        result.append((name, auc(labels, np.array([float(r["p_1"]) for r in rows])),
                       float(np.mean(labels == np.array([int(r["predicted"]) for r in rows])))))
    return result


def paired_bootstrap(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, correct_a: np.ndarray, correct_b: np.ndarray,
                     resamples: int, seed: int) -> dict[str, tuple[float, float, float, float]]:
    """metric -> (B − A on all slides, 2.5%, 97.5% percentiles of B − A over resamples, share of resamples with B − A <= 0)."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    diffs = {"auc": [], "accuracy": []}
    for _ in range(resamples):
        idx = rng.integers(0, n, n)  # the same slides for both methods
        y = labels[idx]
        if y.min() == y.max():
            continue
        diffs["auc"].append(auc(y, scores_b[idx]) - auc(y, scores_a[idx]))
        diffs["accuracy"].append(float(correct_b[idx].mean() - correct_a[idx].mean()))
    observed = {"auc": auc(labels, scores_b) - auc(labels, scores_a), "accuracy": float(correct_b.mean() - correct_a.mean())}
    return {k: (observed[k], float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5)), float(np.mean(np.asarray(v) <= 0)))
            for k, v in diffs.items()}


def report(folder_a: Path, folder_b: Path, names: tuple[str, str], resamples: int, seed: int) -> str:
    runs_a, runs_b = read_predictions(folder_a), read_predictions(folder_b)
    pool_a, pool_b = pooled(runs_a), pooled(runs_b)
    if set(pool_a) != set(pool_b):
        only = sorted(set(pool_a) ^ set(pool_b))
        raise DataError(f"{folder_a} and {folder_b}: not the same test slides ({len(only)} differ, e.g. {only[0]})")
    slides = sorted(pool_a)
    labels = np.array([pool_a[s][0] for s in slides])
    if any(pool_b[s][0] != pool_a[s][0] for s in slides):
        raise DataError(f"{folder_a} and {folder_b}: a slide has two different labels")
    scores = [np.array([pool[s][1] for s in slides]) for pool in (pool_a, pool_b)]
    correct = [np.array([pool[s][2] for s in slides]) == labels for pool in (pool_a, pool_b)]
    lines = [f"{len(slides)} slides ({int(labels.sum())} positive), pooled over {len(runs_a)} test set(s)", "",
             "| method | AUC per fold | accuracy per fold | AUC mean ± std | accuracy mean ± std | pooled AUC | pooled accuracy |",
             "|---|---|---|---|---|---|---|"]
    for name, runs, s, c in zip(names, (runs_a, runs_b), scores, correct, strict=True):
        folds = per_run(runs)
        aucs, accs = np.array([f[1] for f in folds]), np.array([f[2] for f in folds])
        lines.append(f"| {name} | {', '.join(f'{a:.3f}' for a in aucs)} | {', '.join(f'{a:.3f}' for a in accs)} | "
                     f"{aucs.mean():.3f} ± {aucs.std():.3f} | {accs.mean():.3f} ± {accs.std():.3f} | {auc(labels, s):.3f} | {c.mean():.3f} |")
    result = paired_bootstrap(labels, scores[0], scores[1], correct[0], correct[1], resamples, seed)
    lines += ["", f"{names[1]} − {names[0]}, pooled, paired bootstrap over slides ({resamples} resamples, seed {seed}):", "",
              "| metric | difference | 95% interval | share of resamples ≤ 0 |", "|---|---|---|---|"]
    for metric, (diff, low, high, p) in result.items():
        lines.append(f"| {metric} | {diff:+.3f} | [{low:+.3f}, {high:+.3f}] | {p:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="runs of the baseline")
    parser.add_argument("b", type=Path, help="runs of the method compared with it")
    parser.add_argument("--names", default="A,B", help="two comma-separated names for the table")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = parser.parse_args(argv)
    names = tuple(args.names.split(","))
    try:
        if len(names) != 2:
            raise DataError(f"--names {args.names}: give two names, e.g. ABMIL,MHIM-ABMIL")
        if args.resamples < 1:
            raise DataError(f"--resamples {args.resamples}: must be >= 1")
        text = report(args.a, args.b, names, args.resamples, args.seed)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
