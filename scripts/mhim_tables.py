"""MHIM-MIL's supplement tables and figures at reduced scale: every row a stage-2 variant of a recipe.

    OMP_NUM_THREADS=1 python scripts/mhim_tables.py --recipe abmil_c16 --tables supp2,table1,table3,table4,table5
    OMP_NUM_THREADS=1 python scripts/mhim_tables.py --recipe abmil_c16 --tables figure3,figure8
    OMP_NUM_THREADS=1 python scripts/mhim_tables.py --recipe abmil_tcga --tables supp2,table3,table4
    ... [--folds 0,1,2] [--out outputs/mhim_tables] [--list] [--jobs 2] [--stage2 K=V ...] [trainer.max_epochs=2 ...]

A recipe (`abmil_c16`, `abmil_tcga`, `transmil_c16`, `transmil_tcga`) is the pair of presets
`mhim_<recipe>_baseline` (stage 1) and `mhim_<recipe>` (stage 2). Stage 1 is trained once per
fold into `<out>/<recipe>/stage1/fold<k>/` and is the teacher of every row; each row of a table
is the stage-2 preset with a few `method.*` values changed, trained per fold into
`<out>/<recipe>/stage2[_<changed values>]/fold<k>/`. A row whose values equal the preset's (the
published recipe) is `stage2/`, and rows shared by several tables (R-HAM of Table 2 is the
recipe of Table 1 and 3 ...) are trained once. A run whose results.json exists is reused, so a
stopped sweep resumes, and the folders are those of `scripts/mhim_two_stage.py --out
<out>/<recipe>`, whose runs are reused too. `--jobs N` trains N runs at once, each in its own
process on one torch thread (stage 1 of every fold first; the same numbers as the sequential
command with OMP_NUM_THREADS=1, tested); the seconds per epoch of supp2 are then taken while
the runs share the cores (`scripts/mhim_cost.py` measures them alone). Positional overrides go
to every run; `--stage2 K=V` (repeatable) to the stage-2 (MHIM) runs only, after the row's own
values, e.g. `--stage2 method.kept_order=ascending`.

The tables (the supplement's numbering; rows as the paper's for the recipe's dataset):

- supp2: AB-MIL (stage 1), HAM (β_h only), R-HAM (+ β_r), L-HAM (+ β_l), LR-HAM (+ both), with
  AUC, parameters of the student, seconds per training epoch and peak saved activations (MB);
- table1: the (β_r, β_l) grid; table3: β_h constant vs cosine-decayed to 0 (`mrh_sche`);
- table4: randomly-HAM off (ρ = 1) vs on (ρ = 0.5); table5: the student's first fc from stage 1
  or not (`init_stu_type` fc / none), and the baseline retrained with its first fc from stage 1
  (`stage1_init_fc`, `method.init_fc_from`); table6 (TransMIL): layer 0 vs last, voting vs averaging;
- figure3: test AUC vs β_h; figure8: test AUC vs the consistency weight α (`cl_alpha`).

Writes `<out>/<recipe>/<table>.md` and `.csv` (mean ± std over the folds, std with ddof 0 as
MHIM's code) and, for the figures, `<table>.png`.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mil_experiments.errors import ConfigError, DataError  # noqa: E402

RECIPE_FOLDS = {"abmil_c16": 3, "abmil_tcga": 4, "transmil_c16": 3, "transmil_tcga": 4}
# (β_r, β_l) of LR-HAM per recipe: the recipe's own pair, or for C16 ABMIL (whose recipe has no
# low mask) the LR-HAM row of the supplement's Table 1 (50% / 20% = its Table 2 LR-HAM, 95.92)
LR_PAIR = {"abmil_c16": (0.5, 0.2), "abmil_tcga": (0.7, 0.2), "transmil_c16": (0.2, 0.8), "transmil_tcga": (0.6, 0.2)}
# the supplement's Table 1 rows for the recipe's dataset and aggregator: (β_r, β_l)
TABLE1_GRID = {
    "abmil_c16": [(0.4, 0.0), (0.5, 0.0), (0.5, 0.2), (0.6, 0.0)],
    "abmil_tcga": [(0.6, 0.2), (0.7, 0.1), (0.7, 0.2), (0.7, 0.3), (0.8, 0.2)],
    "transmil_c16": [(0.0, 0.7), (0.0, 0.8), (0.2, 0.8), (0.0, 0.9)],
    "transmil_tcga": [(0.5, 0.2), (0.6, 0.1), (0.6, 0.2), (0.6, 0.3), (0.7, 0.2)],
}
BETA_H = (0.0, 0.01, 0.03, 0.05, 0.1)
CL_ALPHA = (0.0, 0.1, 0.5, 1.0)
TABLES = ("supp2", "table1", "table3", "table4", "table5", "table6", "figure3", "figure8")


@dataclass(frozen=True)
class Row:
    """One row: its label and the `method.*` values changed from the stage-2 preset (empty: stage 1 if `baseline`)."""

    label: str
    changes: dict = field(default_factory=dict)
    baseline: bool = False
    fc_from_stage_one: bool = False  # the baseline again, its first fc from stage 1 (Table 5's "w/ init")
    x: float | None = None  # the swept value, for the figures


def table_rows(table: str, recipe: str) -> list[Row]:
    """The rows of `table` for `recipe`, in the paper's order."""
    r, low = LR_PAIR[recipe]
    if table == "supp2":
        head = "AB-MIL" if recipe.startswith("abmil") else "TransMIL"
        return [Row(head, baseline=True), Row("HAM", {"mask_ratio": 0.0, "mask_ratio_l": 0.0}),
                Row("R-HAM", {"mask_ratio": r, "mask_ratio_l": 0.0}), Row("L-HAM", {"mask_ratio": 0.0, "mask_ratio_l": low}),
                Row("LR-HAM", {"mask_ratio": r, "mask_ratio_l": low})]
    if table == "table1":
        return [Row(f"β_r {br:.0%}, β_l {bl:.0%}", {"mask_ratio": br, "mask_ratio_l": bl}) for br, bl in TABLE1_GRID[recipe]]
    if table == "table3":
        return [Row("β_h (constant)", {"mrh_sche": False}), Row("β_h → 0 (cosine decay)", {"mrh_sche": True})]
    if table == "table4":
        return [Row("w/o randomly HAM (ρ = 1)", {"mask_ratio_hr": 1.0}), Row("w/ randomly HAM (ρ = 0.5)", {"mask_ratio_hr": 0.5})]
    if table == "table5":
        head = "AB-MIL" if recipe.startswith("abmil") else "TransMIL"
        return [Row(head, baseline=True), Row(f"{head} w/ init (fc)", baseline=True, fc_from_stage_one=True),
                Row("MHIM-MIL w/o init", {"init_stu_type": "none"}),
                Row("MHIM-MIL w/ init (fc)", {"init_stu_type": "fc"})]
    if table == "table6":
        if not recipe.startswith("transmil"):
            raise ConfigError(f"--tables table6: TransMIL's attention variants need a transmil recipe, not {recipe}")
        return [Row("first layer, voting", {"attn_layer": "0", "msa_fusion": "vote"}),
                Row("last layer, voting", {"attn_layer": "last", "msa_fusion": "vote"}),
                Row("first layer, averaging", {"attn_layer": "0", "msa_fusion": "mean"})]
    if table == "figure3":
        return [Row(f"β_h {b:g}", {"mask_ratio_h": b}, x=b) for b in BETA_H]
    if table == "figure8":
        return [Row(f"α {a:g}", {"cl_alpha": a}, x=a) for a in CL_ALPHA]
    raise ConfigError(f"--tables: unknown table {table!r}; choose from {', '.join(TABLES)}")


def preset_method(recipe: str) -> dict:
    """The stage-2 preset's `method` values (what a row's changes are compared with)."""
    from omegaconf import OmegaConf

    from mil_experiments.api import compose_config

    return OmegaConf.to_container(compose_config([f"experiment=mhim_{recipe}"]).method, resolve=True)


def run_folder(row: Row, preset: dict) -> str:
    """`stage1`, `stage2` (the preset itself) or `stage2_<key>=<value>,...` of the values that differ from the preset."""
    if row.baseline:
        return "stage1_init_fc" if row.fc_from_stage_one else "stage1"
    for key in row.changes:
        if key not in preset:
            raise ConfigError(f"method.{key}: not a key of the MHIM method")
    differ = {k: v for k, v in sorted(row.changes.items()) if str(preset[k]) != str(v) and not _same_number(preset[k], v)}
    return "stage2" if not differ else "stage2_" + ",".join(f"{k}={v}" for k, v in differ.items())


def _same_number(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def train_fold(recipe: str, folder: str, row: Row, fold: int, out: Path, extra: list[str], stage2: tuple[str, ...] = ()) -> dict:
    """results.json of one row and fold: reused when present, else trained (stage 1 first if missing); `stage2`: MHIM runs only."""
    from mhim_two_stage import run_stage

    first = out / "stage1" / f"fold{fold}"
    common = [f"dataset.fold={fold}", *extra]
    stage_one = run_stage([f"experiment=mhim_{recipe}_baseline", *common], first)
    if folder == "stage1":
        return stage_one
    if folder == "stage1_init_fc":
        return run_stage([f"experiment=mhim_{recipe}_baseline", *common, f"method.init_fc_from={first}"], out / folder / f"fold{fold}")
    changes = [f"method.{k}={v}" for k, v in row.changes.items()]
    return run_stage([f"experiment=mhim_{recipe}", *common, *changes, *stage2, f"method.teacher_init={first}"],
                     out / folder / f"fold{fold}")


def train_in_workers(recipe: str, tables: list[str], folds: list[int], out: Path, extra: list[str], preset: dict, jobs: int,
                     stage2: tuple[str, ...] = ()) -> None:
    """Every run the tables need that is not finished, `jobs` at a time in one-thread worker processes.

    Stage 1 of every fold goes first (it is every row's teacher); then each distinct
    (run folder, fold) of the tables once. The tables are then written from the results.json
    files as without `--jobs`.
    """
    from tqdm import tqdm

    from mil_experiments.worker_pool import one_thread_pool, run_task

    later: dict[tuple[str, int], Row] = {}
    for table in tables:
        for row in table_rows(table, recipe):
            folder = run_folder(row, preset)
            for fold in folds:
                if folder != "stage1":
                    later.setdefault((folder, fold), row)
    phases = [[("stage1", Row("stage 1", baseline=True), fold) for fold in folds],
              [(folder, row, fold) for (folder, fold), row in later.items()]]
    phases = [[run for run in phase if not (out / run[0] / f"fold{run[2]}" / "results.json").is_file()] for phase in phases]
    if not any(phases):
        return
    with one_thread_pool(jobs) as pool, \
            tqdm(total=sum(map(len, phases)), desc=f"{recipe}: runs on {jobs} workers", unit="run") as bar:
        for phase in phases:
            futures = [pool.submit(run_task, train_fold, recipe, folder, row, fold, out, extra, stage2) for folder, row, fold in phase]
            for future in futures:
                future.result()  # a worker's error is raised here, after the phase's other runs have finished
                bar.update()


def student_parameters(run_dir: Path) -> int:
    """Parameters of the trained model (the student for stage 2), from its selected checkpoint."""
    import torch

    state = torch.load(run_dir / "checkpoints" / "selected.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    return int(sum(v.numel() for k, v in state.items() if k.startswith("aggregator.")))


def summarise_row(row: Row, folder: str, runs: list[dict], run_dirs: list[Path]) -> dict:
    """Mean ± std over folds of AUC and accuracy (the student's), and the cost columns."""
    def stat(values):
        values = [v for v in values if v is not None]
        return (float(np.mean(values)), float(np.std(values))) if values else (None, None)

    auc = stat([r["test"].get("test/auc") for r in runs])
    acc = stat([r["test"].get("test/accuracy") for r in runs])
    seconds = stat([r["time"]["train_seconds"] / r["epochs"] for r in runs])
    memory = stat([r.get("memory", {}).get("peak_saved_activations_mb") for r in runs])
    return {"row": row.label, "folder": folder, "x": row.x, "folds": len(runs),
            "auc_mean": auc[0], "auc_std": auc[1], "accuracy_mean": acc[0], "accuracy_std": acc[1],
            "auc_per_fold": " / ".join(f"{r['test'].get('test/auc', float('nan')):.3f}" for r in runs),
            "parameters": student_parameters(run_dirs[0]), "seconds_per_epoch": seconds[0], "peak_saved_mb": memory[0]}


def markdown(rows: list[dict], title: str, cost: bool) -> str:
    """The table: AUC (per fold), accuracy; with `cost` also parameters, s / epoch and peak MB."""
    def pm(row, key):
        return "n/a" if row[f"{key}_mean"] is None else f"{row[f'{key}_mean']:.3f} ± {row[f'{key}_std']:.3f}"

    header = ["row", "AUC", "AUC per fold", "accuracy", "run folder"]
    if cost:
        header[4:4] = ["parameters", "s / epoch", "peak saved MB"]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["row"], pm(r, "auc"), r["auc_per_fold"], pm(r, "accuracy"), f"`{r['folder']}`"]
        if cost:
            cells[4:4] = [f"{r['parameters'] / 1e3:.0f}K", f"{r['seconds_per_epoch']:.2f}",
                          "n/a" if r["peak_saved_mb"] is None else f"{r['peak_saved_mb']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list[dict], path: Path, xlabel: str, title: str) -> None:
    """Test AUC (mean ± std over folds) against the swept value, the recipe's value marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["x"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.errorbar(xs, [r["auc_mean"] for r in rows], yerr=[r["auc_std"] for r in rows], marker="o", capsize=3)
    for r in rows:
        if r["folder"] == "stage2":
            ax.plot([r["x"]], [r["auc_mean"]], marker="*", markersize=14, color="tab:red", label="published recipe", linestyle="none")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"test AUC (mean ± std, {rows[0]['folds']} folds)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if any(r["folder"] == "stage2" for r in rows):  # the recipe may lie outside the swept values (TCGA's beta_h)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def run_table(recipe: str, table: str, folds: list[int], out: Path, extra: list[str], preset: dict,
              stage2: tuple[str, ...] = ()) -> Path:
    """Train the missing runs of `table` and write its Markdown, CSV (and PNG for a figure); `stage2`: MHIM runs only."""
    from tqdm import tqdm

    rows = table_rows(table, recipe)
    summaries = []
    for row in tqdm(rows, desc=f"{recipe} {table}", unit="row"):
        folder = run_folder(row, preset)
        runs = [train_fold(recipe, folder, row, fold, out, extra, stage2) for fold in folds]
        summaries.append(summarise_row(row, folder, runs, [out / folder / f"fold{f}" for f in folds]))
    title = f"MHIM-MIL supplement {table}, recipe {recipe} ({len(folds)} folds)"
    (out / f"{table}.md").write_text(markdown(summaries, title, cost=table == "supp2"))
    with open(out / f"{table}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summaries[0]))
        writer.writeheader()
        writer.writerows(summaries)
    if table in ("figure3", "figure8"):
        xlabel = "β_h, high-attention mask ratio" if table == "figure3" else "α, consistency loss weight (cl_alpha)"
        plot_sweep(summaries, out / f"{table}.png", xlabel, title)
    return out / f"{table}.md"


def parse_list(text: str, kind, what: str) -> list:
    try:
        return [kind(v) for v in text.split(",") if v]
    except ValueError:
        raise ConfigError(f"--{what}={text}: give a comma-separated list") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=sorted(RECIPE_FOLDS), required=True)
    parser.add_argument("--tables", default="supp2", help=f"comma-separated, from {','.join(TABLES)}")
    parser.add_argument("--folds", default=None, help="comma-separated folds (default: all of the recipe's protocol)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "mhim_tables")
    parser.add_argument("--list", action="store_true", help="print every row's run folder and exit")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once, each in its own process on one torch thread (default 1: in this process)")
    parser.add_argument("--stage2", action="append", default=[], metavar="K=V", help="override for the stage-2 (MHIM) runs only")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (both stages)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        tables = parse_list(args.tables, str, "tables")
        folds = parse_list(args.folds, int, "folds") if args.folds else list(range(RECIPE_FOLDS[args.recipe]))
        for table in tables:
            table_rows(table, args.recipe)  # unknown table: one line before anything trains
        preset = preset_method(args.recipe)
        out = args.out / args.recipe
        if args.list:
            for table in tables:
                for row in table_rows(table, args.recipe):
                    print(f"{table}\t{row.label}\t{run_folder(row, preset)}")
            return 0
        if args.jobs < 1:
            raise ConfigError(f"--jobs {args.jobs}: expected a positive number of processes")
        if args.jobs > 1:
            train_in_workers(args.recipe, tables, folds, out, args.overrides, preset, args.jobs, tuple(args.stage2))
        for table in tables:
            print(f"wrote {run_table(args.recipe, table, folds, out, args.overrides, preset, tuple(args.stage2))}")
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
