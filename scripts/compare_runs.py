"""Compare methods across multirun folders: mean ± std per method and metric, as the papers' tables.

    python scripts/compare_runs.py outputs/multirun/<sweep> [more sweeps ...] [--out DIR] [--metrics accuracy,auc]

Every job with a results.json under the given folders (methods × seeds × folds) is one run;
runs are grouped by method (`method`, aggregator, engine and alpha) and dataset. Writes
`comparison.csv` (long: group, metric, n, mean, std), `comparison.md` (one row per method,
one `mean ± std` column per metric) and `comparison.png` (bars with ± std) into --out
(default: the first folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mil_experiments.summaries import job_dirs, summarise, test_metrics_of, write_tables  # noqa: E402


def method_label(results: dict) -> str:
    """`abmil_acc [abmil, acc 25%] on feature_bags`."""
    engine = results.get("engine", {})
    alpha = f" {engine['alpha']:g}%" if "alpha" in engine else ""
    return f"{results['method']} [{results['aggregator']}, {engine.get('name', '?')}{alpha}] on {results['dataset']}"


def plot(rows: list[dict], metrics: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = list(dict.fromkeys(r["group"] for r in rows))
    cell = {(r["group"], r["metric"]): r for r in rows}
    width = 0.8 / max(len(groups), 1)
    figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(metrics) * max(1, len(groups) / 2)), 4))
    for i, g in enumerate(groups):
        means = [cell[(g, m)]["mean"] if (g, m) in cell and cell[(g, m)]["mean"] is not None else np.nan for m in metrics]
        stds = [cell[(g, m)]["std"] if (g, m) in cell and cell[(g, m)]["std"] is not None else 0 for m in metrics]
        axis.bar(np.arange(len(metrics)) + i * width, means, width, yerr=stds, capsize=3, label=g)
    axis.set_xticks(np.arange(len(metrics)) + width * (len(groups) - 1) / 2, metrics, rotation=30, ha="right")
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("test (mean ± std)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--metrics", default=None, help="comma-separated metrics for the table and the plot (default: all)")
    args = parser.parse_args(argv)
    groups: dict[str, list[dict]] = defaultdict(list)
    for folder in args.folders:
        if not folder.is_dir():
            print(f"error: {folder}: folder not found", file=sys.stderr)
            return 2
        for job in job_dirs(folder):
            results = json.loads((job / "results.json").read_text())
            groups[method_label(results)].append(test_metrics_of(results))
    if not groups:
        print(f"error: no results.json under {', '.join(map(str, args.folders))}", file=sys.stderr)
        return 2
    rows = summarise(groups)
    if args.metrics:
        wanted = args.metrics.split(",")
        rows = [r for r in rows if r["metric"] in wanted]
    out = args.out or args.folders[0]
    out.mkdir(parents=True, exist_ok=True)
    title = f"Comparison of {sum(len(v) for v in groups.values())} runs ({', '.join(map(str, args.folders))})"
    write_tables(rows, out / "comparison.csv", out / "comparison.md", title, "method")
    shown = [m for m in dict.fromkeys(r["metric"] for r in rows) if not m.startswith("f1_class") and m != "instance_auc"]
    plot([r for r in rows if r["metric"] in shown], shown, out / "comparison.png")
    print(f"wrote {out / 'comparison.md'}, {out / 'comparison.csv'}, {out / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
