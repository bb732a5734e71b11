"""Mean ± std tables over runs: the fold summary of a sweep and the comparison of methods.

Each finished job's `results.json` gives one row of `test/...` metrics; rows are grouped
(by the sweep's overrides other than `dataset.fold` for a fold summary, by method for a
comparison) and each metric is summarised as mean ± std over the group, the std with
ddof 0 as MHIM's code reports its folds (`np.std`). Undefined values (null) are left out
of a mean and counted in `n`.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

# the papers' table columns first (MHIM: accuracy, AUC, precision, recall, F1; ZoomMIL: accuracy, weighted F1, kappa)
HEADLINE = ("accuracy", "accuracy_macro", "auc", "f1_weighted", "f1_macro", "kappa_quadratic", "precision_youden", "recall_youden", "f1_youden")


def job_dirs(root: Path) -> list[Path]:
    """Every folder under `root` (itself included) holding a results.json."""
    return sorted(p.parent for p in Path(root).rglob("results.json"))


def job_overrides(job_dir: Path) -> list[str]:
    """The Hydra overrides of a multirun job (`.hydra/overrides.yaml`), or none."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path)]


def test_metrics_of(results: dict) -> dict[str, float | None]:
    """The scalar test metrics of one results.json, without the `test/` prefix and the CI keys."""
    return {
        k.removeprefix("test/"): v for k, v in results["test"].items()
        if not k.endswith(("_ci_low", "_ci_high")) and "@" not in k and k not in ("test/loss", "test/youden_threshold")
    }


def summarise(groups: dict[str, list[dict[str, float | None]]]) -> list[dict]:
    """Rows (group, metric, n, mean, std) for every metric of every group."""
    rows = []
    for group, runs in groups.items():
        metrics = [m for m in HEADLINE if any(m in r for r in runs)] + sorted({m for r in runs for m in r} - set(HEADLINE))
        for metric in metrics:
            values = [r[metric] for r in runs if r.get(metric) is not None]
            rows.append({"group": group, "metric": metric, "n": len(values),
                         "mean": float(np.mean(values)) if values else None,
                         "std": float(np.std(values)) if values else None})
    return rows


def write_tables(rows: list[dict], csv_path: Path, md_path: Path, title: str, group_name: str) -> None:
    """`csv_path`: the long table; `md_path`: one row per group, one `mean ± std` column per metric."""
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["group", "metric", "n", "mean", "std"])
        writer.writeheader()
        writer.writerows(rows)
    groups = list(dict.fromkeys(r["group"] for r in rows))
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    cell = {(r["group"], r["metric"]): r for r in rows}
    n_runs = {g: max(r["n"] for r in rows if r["group"] == g) for g in groups}
    lines = [f"# {title}", "", "| " + " | ".join([group_name, "runs", *metrics]) + " |", "|" + "---|" * (len(metrics) + 2)]
    for g in groups:
        values = []
        for m in metrics:
            r = cell.get((g, m))
            values.append("n/a" if r is None or r["mean"] is None else f"{r['mean']:.3f} ± {r['std']:.3f}")
        lines.append("| " + " | ".join([g or "(all)", str(n_runs[g]), *values]) + " |")
    md_path.write_text("\n".join(lines) + "\n")


def write_fold_summary(sweep_dir: Path) -> Path | None:
    """`fold_summary.csv` / `.md` of a sweep over `dataset.fold`: per setting of the other
    overrides, mean ± std over its folds. None when no job overrides `dataset.fold`."""
    groups: dict[str, list[dict]] = defaultdict(list)
    folds_swept = False
    for job in job_dirs(sweep_dir):
        overrides = job_overrides(job)
        folds_swept |= any(o.startswith("dataset.fold=") for o in overrides)
        key = " ".join(o for o in overrides if not o.startswith("dataset.fold="))
        groups[key].append(test_metrics_of(json.loads((job / "results.json").read_text())))
    if not folds_swept:
        return None
    path = sweep_dir / "fold_summary.csv"
    write_tables(summarise(groups), path, sweep_dir / "fold_summary.md", f"Fold summary of {sweep_dir}", "setting")
    return path
