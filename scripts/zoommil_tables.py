"""ZoomMIL's Tables 1-4 and Figure 3 at reduced scale, on the generated cohorts.

    OMP_NUM_THREADS=1 python scripts/zoommil_tables.py --cohort crc_like --table 1 --seeds 1,2,3
    OMP_NUM_THREADS=1 python scripts/zoommil_tables.py --cohort bright_like --table 2 --seeds 1,2,3
    OMP_NUM_THREADS=1 python scripts/zoommil_tables.py --cohort c16_like --table 3 --seeds 1,2,3
    OMP_NUM_THREADS=1 python scripts/zoommil_tables.py --cohort bright_like --table 4 --seeds 1,2,3
    ... [--methods abmil,zoommil] [--method-seeds transmil=1] [--jobs 2] [--out outputs/zoommil_tables] [--predict-limit 12] [trainer.max_epochs=2 ...]

The paper's numbering: Tables 1 / 2 / 3 (CRC / BRIGHT / CAMELYON16 -> crc_like / bright_like /
c16_like) compare the single-magnification baselines, MSMIL on every magnification,
ZoomMIL-EFF and ZoomMIL, all under ZoomMIL's training protocol (experiment=zoommil_protocol
and the cohort's zoommil presets; crc_like and c16_like select on validation loss, as the paper
does for CRC and CAMELYON16); Table 4 is the ablations of ZoomMIL-EFF, as in the paper (the
full ZoomMIL-EFF is the reference row).
Every (method, seed) is one training run in `<out>/<cohort>/table<k>/<method>/seed<k>/`;
a run whose results.json exists is reused, and an interrupted run of the same settings continues
from its last checkpoint, so an interrupted sweep resumes; `--method-seeds
transmil=1` gives one method its own seeds (a TransMIL seed takes over an hour on one thread), so
its row (n = 1: the mean alone) and its Figure 3 point join the others'. `--jobs N` trains N
runs at once, each in its own process on one torch thread (the same numbers as one process
with OMP_NUM_THREADS=1, tested), then measures the compute alone. The compute per
slide (tiles encoded, TFLOPs, seconds on 1 CPU thread) is measured once per method, on the
first seed's model, by the raw-slide prediction command (`mil_experiments.predict`) on the
first `--predict-limit` slides of the cohort (`<method>/predict/summary.json`, reused too).
Writes `table.md` and `table.csv` (one row per method, mean ± std over seeds) and, for
Tables 1-3, `figure3.png` (slides per hour vs test accuracy, with the efficiency frontier).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COHORTS = REPO / "data" / "cohorts"  # where make_cohorts.py writes a cohort by its name
sys.path.insert(0, str(REPO))

from mil_experiments.errors import ConfigError, DataError  # noqa: E402
from mil_experiments.summaries import summarise, test_metrics_of  # noqa: E402

# every run: ZoomMIL's protocol without the extras that only cost time here
COMMON = ["logger=none", "trainer.enable_progress_bar=false", "evaluation.bootstrap=0", "telemetry.count_saved_tensors=false"]
METRICS = (("f1_weighted", "weighted F1"), ("accuracy", "accuracy"), ("kappa_quadratic", "quadratic kappa"), ("auc", "AUC"))
BASELINES = {"maxmil": "Max-MIL", "meanmil": "Mean-MIL", "abmil": "ABMIL", "clam_sb": "CLAM-SB", "transmil": "TransMIL", "dsmil": "DSMIL"}
COMPARISON_TABLE = {"crc_like": 1, "bright_like": 2, "c16_like": 3}  # the paper's table of each cohort's data set
SELECT_ON_LOSS = ("crc_like", "c16_like")  # the paper selects on validation loss for CRC and CAMELYON16
ABLATIONS = {  # Table 4 (on ZoomMIL-EFF, as the paper): method -> (override on the ZoomMIL-EFF preset, the paper's row)
    "zoommil_eff": (None, "ZoomMIL-EFF (full: DIFF-TOPK, DGA, sum)"),
    "nondiff_topk": ("aggregator.selection=hard", "NONDIFF-TOPK"),
    "random_k_lowest": ("aggregator.selection=random_low", "RANDOM K @ lowest"),
    "random_4k_next": ("aggregator.selection=random_next", "RANDOM 4K @ next"),
    "single_attention": ("aggregator.dual_attention=false", "single attention (no DGA)"),
    "highest_only": ("aggregator.highest_only=true", "highest magnification only"),
    "concat_fusion": ("aggregator.fusion=concat", "concatenation instead of sum"),
}


@dataclass(frozen=True)
class Cohort:
    """A generated cohort: its preset name (crc_like | bright_like | c16_like), root folder and magnifications."""

    name: str
    root: Path
    magnifications: tuple[float, ...]

    @property
    def features(self) -> Path:
        return self.root / "features" / "lenet"

    @property
    def label(self) -> str:
        """The name, and the root folder too when it is not data/cohorts/<name> (so a figure's title does not carry a checkout's path)."""
        return self.name if self.root.resolve() == (COHORTS / self.name).resolve() else f"{self.name} ({self.root})"

    @property
    def short(self) -> str:
        """The suffix of the cohort's zoommil presets: crc | bright | c16."""
        return self.name.removesuffix("_like")


@dataclass(frozen=True)
class Method:
    """One row of a table: its name, the paper's row it stands for, and the overrides that train it."""

    name: str
    paper_row: str
    magnifications: str
    overrides: tuple[str, ...]


def find_cohort(value: str) -> Cohort:
    """`crc_like` / `bright_like` / `c16_like` (data/cohorts/<name>) or a cohort root; refuses one without features."""
    root = Path(value) if ("/" in value or Path(value).is_dir()) else COHORTS / value
    features = root / "features" / "lenet"
    if not features.is_dir() or not any(features.glob("*.h5")):
        raise DataError(f"--cohort {value}: no feature files in {features} (make them with: python scripts/make_cohorts.py <crc_like|bright_like|c16_like>)")
    info = root / "cohort.json"
    name = json.loads(info.read_text())["config"]["name"] if info.is_file() else root.name
    if name not in COMPARISON_TABLE:
        raise ConfigError(f"--cohort {value}: cohort {name!r} has no ZoomMIL presets ({', '.join(COMPARISON_TABLE)})")
    from omegaconf import OmegaConf

    magnifications = tuple(float(m) for m in OmegaConf.load(REPO / "conf" / "cohort" / f"{name}.yaml").extract.magnifications)
    return Cohort(name, root, tuple(sorted(magnifications)))


def table_methods(cohort: Cohort, table: int) -> list[Method]:
    """The rows of Table 1 / 2 / 3 (comparison) or Table 4 (ablations of ZoomMIL-EFF) on `cohort`, in the paper's order."""
    data = [f"dataset.root={cohort.features}"]
    protocol = ["experiment=zoommil_protocol", f"dataset={cohort.name}", *data]
    if table != 4 and table != COMPARISON_TABLE[cohort.name]:
        raise ConfigError(f"--table {table}: {cohort.name} stands in for the data set of the paper's Table {COMPARISON_TABLE[cohort.name]} "
                          f"(Table 1: crc_like, 2: bright_like, 3: c16_like; 4: ablations on any)")
    if cohort.name in SELECT_ON_LOSS:
        protocol.append("selection.rule=best_val_loss")
    from omegaconf import OmegaConf

    def chain_of(magnifications) -> str:
        return " → ".join(f"{m:g}x" for m in magnifications)

    mags = cohort.magnifications
    eff_mags = [float(m) for m in OmegaConf.load(REPO / "conf" / "experiment" / f"zoommil_eff_{cohort.short}.yaml").dataset.magnifications]
    every = ",".join(f"{m}" for m in mags)
    chain = chain_of(mags)
    zoommil = ("experiment=zoommil_" + cohort.short, *data)
    eff = ("experiment=zoommil_eff_" + cohort.short, *data)
    if table == 4:
        return [Method(name, row, f"{eff_mags[-1]:g}x (all tiles)" if name == "highest_only" else chain_of(eff_mags), (*eff, *([override] if override else [])))
                for name, (override, row) in ABLATIONS.items()]
    rows = [Method(a, row, f"{mags[-1]:g}x", (*protocol, f"aggregator={a}")) for a, row in BASELINES.items()]
    rows.append(Method("msmil", "MS-MIL (all magnifications)", " + ".join(f"{m:g}x" for m in mags),
                       (*protocol, "aggregator=msmil", f"dataset.magnifications=[{every}]")))
    rows.append(Method("zoommil_eff", "ZoomMIL-EFF", chain_of(eff_mags), eff))
    rows.append(Method("zoommil", "ZoomMIL", chain, zoommil))
    return rows


def train_run(method: Method, seed: int, extra: list[str], run_dir: Path) -> dict:
    """results.json of `method` with `seed`: read when the run finished before, continued when it was stopped, else trained."""
    from tqdm import tqdm

    from mil_experiments.api import train_or_reuse

    return train_or_reuse([*method.overrides, *COMMON, f"seed={seed}", *extra], run_dir, say=tqdm.write)


def train_runs(pending: list[tuple[Method, int, Path]], extra: list[str], jobs: int, on_done) -> dict[tuple[str, int], dict]:
    """results.json of every (method, seed, run folder), trained in this process (`jobs` 1) or in `jobs` worker processes.

    Runs already finished are read here without starting a worker. Each worker trains one run
    at a time on one torch thread, so a run's numbers do not depend on `jobs`; `on_done(method,
    seed)` is called as each finishes.
    """
    results: dict[tuple[str, int], dict] = {}
    to_train = []
    for method, seed, run_dir in pending:
        if jobs == 1 or (run_dir / "results.json").is_file():
            results[method.name, seed] = train_run(method, seed, extra, run_dir)
            on_done(method, seed)
        else:
            to_train.append((method, seed, run_dir))
    if not to_train:
        return results
    from concurrent.futures import as_completed

    from mil_experiments.worker_pool import one_thread_pool, run_task

    with one_thread_pool(min(jobs, len(to_train)), quiet_lightning=True) as pool:
        futures = {pool.submit(run_task, train_run, method, seed, extra, run_dir): (method, seed) for method, seed, run_dir in to_train}
        for future in as_completed(futures):
            method, seed = futures[future]
            results[method.name, seed] = future.result()  # a worker's error is raised here, the other runs finish first
            on_done(method, seed)
    return results


def measure_compute(run_dir: Path, cohort: Cohort, limit: int, out_dir: Path) -> dict:
    """summary.json of the prediction command on the first `limit` slides (1 thread, no heatmaps); reused when present."""
    summary_path = out_dir / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    import tempfile

    from mil_experiments.predict import compose, run_predictions

    settings = [f"checkpoint={run_dir / 'checkpoints' / 'selected.ckpt'}", f"slides={cohort.root / 'slides'}",
                f"labels_csv={cohort.root / 'labels.csv'}", "num_threads=1", "heatmaps=false", "overwrite=true"]
    with tempfile.TemporaryDirectory() as warmup:  # one slide first, unmeasured: lazy imports and first-call setup
        run_predictions(compose([*settings, f"out_dir={warmup}", "limit=1"]))
    return run_predictions(compose([*settings, f"out_dir={out_dir}", f"limit={limit}"]))


def pareto_frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (x and y both better when larger), by increasing x.

    A point is dominated when another is at least as good on both axes and better on one.
    """
    frontier = [i for i, (x, y) in enumerate(points)
                if not any(x2 >= x and y2 >= y and (x2 > x or y2 > y) for x2, y2 in points)]
    return sorted(frontier, key=lambda i: points[i][0])


def table_rows(methods: list[Method], runs: dict[str, list[dict]], compute: dict[str, dict]) -> list[dict]:
    """One row per method: mean / std / n of each metric over its seeds, and its compute per slide."""
    summary = {(r["group"], r["metric"]): r for r in summarise({m.name: [test_metrics_of(r) for r in runs[m.name]] for m in methods})}
    rows = []
    for m in methods:
        row = {"method": m.name, "paper_row": m.paper_row, "magnifications": m.magnifications, "n": len(runs[m.name])}
        for key, _ in METRICS:
            cell = summary.get((m.name, key), {"mean": None, "std": None, "n": 0})
            row.update({f"{key}_mean": cell["mean"], f"{key}_std": cell["std"], f"{key}_n": cell["n"]})
        c = compute[m.name]
        seconds = c["seconds_per_slide"]
        row.update(tiles_per_slide=sum(v for k, v in c["tiles_per_slide"].items() if k.startswith("tiles_encoded_")),
                   tflops_per_slide=c["tflops_per_slide"], seconds_per_slide=seconds,
                   slides_per_hour=3600.0 / seconds if seconds > 0 else None, compute_slides=c["slides"])
        rows.append(row)
    return rows


def markdown(rows: list[dict], title: str) -> str:
    """The table laid out like the paper's: metrics as mean ± std (n), then the compute columns."""
    def cell(row: dict, key: str) -> str:
        mean, std = row[f"{key}_mean"], row[f"{key}_std"]
        if mean is None:
            return "n/a"
        return f"{mean:.3f}" if row[f"{key}_n"] == 1 else f"{mean:.3f} ± {std:.3f}"  # one seed: no spread to show

    header = ["method", "magnification", *[label for _, label in METRICS], "n", "tiles / slide", "TFLOPs / slide", "s / slide (1 thread)"]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["paper_row"], r["magnifications"], *[cell(r, key) for key, _ in METRICS], str(r["n"]),
            f"{r['tiles_per_slide']:.1f}", f"{r['tflops_per_slide']:.4f}", f"{r['seconds_per_slide']:.3f}",
        ]) + " |")
    return "\n".join(lines) + "\n"


LABEL_OFFSETS = [(6, 4), (6, -11), (-6, 4), (-6, -11), (6, 13), (6, -20), (-6, 13), (-6, -20), (0, 22), (0, -29)]  # points


def label_points(axis, labels: list[str], points: list[tuple[float, float]]) -> None:
    """Name each point beside it, at the first of LABEL_OFFSETS where the name stays inside the axes and overlaps no marker and no other name.

    Placed after the layout is final (the boxes are measured on the canvas); a name that finds no
    free place goes to the first offset.
    """
    from matplotlib.transforms import Bbox

    renderer = axis.figure.canvas.get_renderer()
    frame = axis.get_window_extent(renderer)
    taken = [Bbox.from_extents(*(xy - 5), *(xy + 5)) for xy in axis.transData.transform(points)]  # the markers, 10 px squares

    def name_at(label: str, point: tuple[float, float], offset: tuple[int, int]):
        return axis.annotate(label, point, textcoords="offset points", xytext=offset, fontsize=8,
                             ha="left" if offset[0] > 0 else "right" if offset[0] < 0 else "center")

    for label, point in sorted(zip(labels, points, strict=True), key=lambda lp: lp[1][0]):
        for offset in LABEL_OFFSETS:
            text = name_at(label, point, offset)
            box = text.get_window_extent(renderer)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            if inside and not any(box.overlaps(other) for other in taken):
                break
            text.remove()
        else:
            box = name_at(label, point, LABEL_OFFSETS[0]).get_window_extent(renderer)
        taken.append(box)


def plot_figure3(rows: list[dict], path: Path, title: str) -> None:
    """Slides per hour (log x) vs test accuracy (mean ± std), the efficiency frontier through the non-dominated methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["slides_per_hour"] and r["accuracy_mean"] is not None]
    points = [(r["slides_per_hour"], r["accuracy_mean"]) for r in shown]
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for r, (x, y) in zip(shown, points, strict=True):
        zoom = r["method"].startswith("zoommil")
        axis.errorbar(x, y, yerr=r["accuracy_std"] or 0.0, fmt="*" if zoom else "o", markersize=12 if zoom else 7, capsize=3,
                      color="tab:red" if zoom else "tab:blue")
    frontier = pareto_frontier(points)
    if frontier:
        axis.plot([points[i][0] for i in frontier], [points[i][1] for i in frontier], "--", color="gray", label="efficiency frontier")
        axis.legend(loc="best", fontsize=8)
    axis.set_xscale("log")
    axis.set_xlabel("slides per hour (1 CPU thread, log scale)")
    axis.set_ylabel("test accuracy (mean ± std over seeds)")
    axis.set_title(textwrap.fill(title, 90), fontsize=8)
    axis.grid(alpha=0.3, which="both")
    figure.tight_layout()
    label_points(axis, [r["paper_row"].split(" (")[0] for r in shown], points)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def run_table(cohort: Cohort, table: int, methods: list[Method], seeds: list[int], extra: list[str], out: Path, predict_limit: int,
              method_seeds: dict[str, list[int]] | None = None, jobs: int = 1) -> Path:
    """Train (or reuse) every run, measure each method's compute, write table.md / .csv / figure3.png; return table.md.

    `method_seeds` gives the named methods their own seeds instead of `seeds`; a method's
    compute is measured on its first seed's model. With `jobs` > 1 the training runs go
    first, `jobs` at a time in worker processes, then the compute is measured one method at
    a time in this process (so the seconds are not taken while runs share the cores).
    """
    from tqdm import tqdm

    own = method_seeds or {}
    seeds_of = {m.name: own.get(m.name, seeds) for m in methods}
    folder = out / cohort.name / f"table{table}"
    compute: dict[str, dict] = {}
    pending = [(m, s, folder / m.name / f"seed{s}") for m in methods for s in seeds_of[m.name]]
    with tqdm(total=len(pending) + len(methods), desc=f"table {table} on {cohort.name}", unit="run") as bar:
        def done(method: Method, seed: int) -> None:
            bar.set_postfix_str(f"{method.name} seed {seed} done")
            bar.update()

        def measure(method: Method) -> None:
            bar.set_postfix_str(f"{method.name} compute")
            first = folder / method.name / f"seed{seeds_of[method.name][0]}"
            compute[method.name] = measure_compute(first, cohort, predict_limit, folder / method.name / "predict")
            bar.update()

        trained: dict[tuple[str, int], dict] = {}
        if jobs == 1:  # method by method, each method's compute right after its seeds
            for m in methods:
                trained.update(train_runs([p for p in pending if p[0] is m], extra, 1, done))
                measure(m)
        else:
            trained = train_runs(pending, extra, jobs, done)
            for m in methods:
                measure(m)
    runs = {m.name: [trained[m.name, s] for s in seeds_of[m.name]] for m in methods}
    rows = table_rows(methods, runs, compute)
    exceptions = "".join(f"; {name}: seeds {','.join(map(str, s))}" for name, s in own.items())
    compute_seed = "each method's first seed" if exceptions else f"seed {seeds[0]}"
    title = (f"ZoomMIL Table {table} on {cohort.label}: seeds {','.join(map(str, seeds))}{exceptions}"
             f"{', ' + ' '.join(extra) if extra else ''}; compute on {rows[0]['compute_slides']} slides, {compute_seed}")
    write_csv(rows, folder / "table.csv")
    (folder / "table.md").write_text(markdown(rows, title))
    if table != 4:
        plot_figure3(rows, folder / "figure3.png", title)
    return folder / "table.md"


def parse_seeds(text: str) -> list[int]:
    """`1,2,3` -> [1, 2, 3]; anything else is a ConfigError naming --seeds."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text}: expected comma-separated integers, e.g. 1,2,3") from None
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text}: a seed is listed twice")
    return seeds


def parse_method_seeds(values: list[str], methods: list[str], table: int) -> dict[str, list[int]]:
    """`["transmil=1"]` -> {"transmil": [1]}; a method not in the table or bad seeds is a ConfigError naming the value."""
    parsed: dict[str, list[int]] = {}
    for value in values:
        name, sep, seeds = value.partition("=")
        if not sep or name not in methods:
            raise ConfigError(f"--method-seeds {value}: expected METHOD=SEEDS with METHOD one of table {table}'s ({', '.join(methods)})")
        try:
            parsed[name] = parse_seeds(seeds)
        except ConfigError:
            raise ConfigError(f"--method-seeds {value}: expected comma-separated integer seeds after '=', e.g. {name}=1") from None
    return parsed


def main(argv: list[str] | None = None) -> int:
    """The command; returns the exit status (2: bad input, reported as one line)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", required=True, help="crc_like | bright_like | c16_like (data/cohorts/<name>) or a cohort root folder")
    parser.add_argument("--table", type=int, choices=(1, 2, 3, 4), required=True,
                        help="1 / 2 / 3: the comparison (crc_like / bright_like / c16_like, the paper's numbering); 4: ablations of ZoomMIL-EFF")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the table's methods (default: all)")
    parser.add_argument("--method-seeds", action="append", default=[], metavar="METHOD=SEEDS",
                        help="a method's own seeds instead of --seeds, e.g. transmil=1 (repeatable)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "zoommil_tables")
    parser.add_argument("--predict-limit", type=int, default=12, help="slides the compute columns are measured on")
    parser.add_argument("--jobs", type=int, default=1,
                        help="training runs at once, each in its own process on one torch thread (default 1: in this process)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. trainer.max_epochs=2")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    try:
        seeds = parse_seeds(args.seeds)
        if args.jobs < 1:
            raise ConfigError(f"--jobs {args.jobs}: expected a positive number of processes")
        cohort = find_cohort(args.cohort)
        methods = table_methods(cohort, args.table)
        if args.methods:
            known = {m.name: m for m in methods}
            unknown = [n for n in args.methods.split(",") if n not in known]
            if unknown:
                raise ConfigError(f"--methods: {', '.join(unknown)} not in table {args.table} ({', '.join(known)})")
            methods = [known[n] for n in args.methods.split(",")]
        method_seeds = parse_method_seeds(args.method_seeds, [m.name for m in methods], args.table)
        path = run_table(cohort, args.table, methods, seeds, args.overrides, args.out, args.predict_limit, method_seeds, args.jobs)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(path.read_text())
    print(f"wrote {path}, {path.with_suffix('.csv')}" + (f", {path.parent / 'figure3.png'}" if args.table != 4 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
