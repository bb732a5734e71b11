"""Generate the benchmark cohorts and extract their features: `make cohorts`.

    python scripts/make_cohorts.py                      # c16_like, tcga_like, bright_like, crc_like
    python scripts/make_cohorts.py c16_like cohort.num_slides=40 root=/tmp/c16_small

For each named cohort (`conf/cohort/<name>.yaml`; `key=value` overrides apply to every
named cohort): write the slides, masks and CSVs under `root` (skipped when `root` already
holds this very cohort; a different one there is an error), extract LeNet features at the
cohort's magnifications into `<root>/features/lenet` (resumes an interrupted run), draw
`<root>/overview.png` (a thumbnail and its lesion mask per class and presentation, and a
level-0 crop of each lesion kind) and print a summary: slides per class, median lesion
share of the tissue per presentation, tiles per magnification, seconds per step.
`dataset=<name>` then trains on the features.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mil_experiments.data.wsi.cohorts import BenchmarkCohortConfig, make_benchmark_cohort
from mil_experiments.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parent.parent
COHORT_CONF = REPO / "conf" / "cohort"
DEFAULT_COHORTS = ("c16_like", "tcga_like", "bright_like", "crc_like")
ENCODER = {"name": "lenet", "pretrained": False, "input_size": None, "feature_dim": 500, "seed": 0}


def load_preset(name: str, overrides: list[str]) -> tuple[dict, BenchmarkCohortConfig]:
    """The preset `conf/cohort/<name>.yaml` with `overrides`, and its checked generator config."""
    path = COHORT_CONF / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in COHORT_CONF.glob("*.yaml"))
        raise ConfigError(f"cohort {name!r}: no {path.relative_to(REPO)} (known: {known})")
    try:
        preset = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(overrides))
        raw = OmegaConf.to_container(preset, resolve=True)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{path.name}: {str(error).splitlines()[0]}") from None
    try:
        return raw, BenchmarkCohortConfig(name=raw["name"], imitates=raw.get("imitates", ""), **raw["cohort"])
    except TypeError as error:
        raise ConfigError(f"{path.name}: cohort: {error}") from None


def generate(root: Path, cfg: BenchmarkCohortConfig) -> dict:
    """Write the cohort under `root`, or reuse it when `root` holds exactly this cohort."""
    from dataclasses import asdict

    marker = root / "cohort.json"
    if marker.exists():
        existing = json.loads(marker.read_text())
        if existing["config"] != json.loads(json.dumps(asdict(cfg))):
            raise DataError(f"{marker}: holds another cohort (other settings); delete {root} or choose another root=")
        return existing
    if root.exists() and any(p.name != "features" for p in root.iterdir()):
        raise DataError(f"{root}: not empty and no cohort.json; delete it or choose another root=")
    return make_benchmark_cohort(root, cfg)


def extraction_config(root: Path, raw: dict):
    """The feature extraction of the preset `raw` for the cohort under `root`.

    One torch thread unless the preset's `extract.num_threads` says otherwise: LeNet's
    float32 features differ in their last bits (up to 3.3e-7 on bright_like) between 1 and 2
    threads, which is enough to move the reduced-scale tables' CLAM-SB, MS-MIL and ZoomMIL
    rows, so the features must not depend on the machine's core count or OMP_NUM_THREADS.
    """
    from mil_experiments.data.wsi.extraction import ExtractionConfig

    settings = raw.get("extract", {})
    return ExtractionConfig(
        slides_dir=str(root / "slides"),
        out_dir=str(root / "features" / "lenet"),
        labels_csv=str(root / "labels.csv"),
        splits_csv=str(root / "splits.csv"),
        masks_dir=str(root / "masks"),
        magnifications=list(settings.get("magnifications", [10.0, 20.0])),
        tile_size=int(settings.get("tile_size", 64)),
        encoder=dict(ENCODER),
        batch_size=256,
        num_threads=int(settings.get("num_threads", 1)),
    )


def extract(root: Path, raw: dict) -> dict:
    """LeNet features of every slide at the preset's magnifications, with per-tile tumour shares."""
    from mil_experiments.data.wsi.extraction import run_extraction

    config = extraction_config(root, raw)
    run_extraction(config)
    record = Path(config.out_dir) / "extraction.json"  # the run that extracted them (a rerun skips)
    extraction = json.loads(record.read_text())
    warning = thread_mismatch(record, extraction, config.num_threads)
    if warning:
        print(warning, file=sys.stderr)
    return extraction


def thread_mismatch(record: Path, extraction: dict, threads: int) -> str | None:
    """A one-line warning when the features in place were not extracted on `threads` torch threads."""
    used = extraction.get("torch_threads")
    if used == threads:
        return None
    how = "on an unrecorded number of" if used is None else f"on {used}"
    return (f"warning: {record}: features extracted {how} torch threads, not {threads}; their last float32 bits, "
            f"and so some table rows, can differ from the README's: delete {record.parent} to extract them again")


def overview(root: Path, summary: dict, out: Path) -> None:
    """A thumbnail and lesion mask per class and presentation, and a crop of each lesion kind."""
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from mil_experiments.data.wsi.masks import kinds_mask_path, read_kinds_mask
    from mil_experiments.data.wsi.readers import open_slide

    slides = summary["slides"]
    kinds = summary["kind_names"]
    examples = []  # one slide per (class, presentation), the one with the median lesion share
    for key in dict.fromkeys((s["class"], s["presentation"]) for s in slides):
        group = sorted((s for s in slides if (s["class"], s["presentation"]) == key), key=lambda s: s["lesion_share"])
        examples.append(group[len(group) // 2])
    crops = []  # (kind, slide, centre) of a lesion of every kind
    for k, kind in enumerate(kinds):
        for s in slides:
            mask = read_kinds_mask(kinds_mask_path(root, s["slide_id"]))
            ys, xs = np.nonzero(mask == k + 1)
            if len(ys) > 20:
                centre = (int(np.median(xs)) * summary["mask_downsample"], int(np.median(ys)) * summary["mask_downsample"])
                crops.append((kind, s, centre))
                break
    palette = [("#d62728", "red"), ("#1f77b4", "blue"), ("#2ca02c", "green"), ("#9467bd", "purple"), ("#ff7f0e", "orange")]
    colours = ListedColormap(["white"] + [c for c, _ in palette][: len(kinds)])
    colour_names = [n for _, n in palette]
    columns = max(len(examples), len(crops))
    fig, axes = plt.subplots(3, columns, figsize=(2.6 * columns, 8.0), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for j, s in enumerate(examples):
        with open_slide(root / "slides" / f"{s['slide_id']}.tiff") as slide:
            thumbnail = slide.thumbnail(8.0)  # (h, w, 3)
        axes[0, j].imshow(thumbnail)
        axes[0, j].set_title(f"{s['class']}: {s['presentation']}\n{s['slide_id']}, lesion {100 * s['lesion_share']:.1f}%", fontsize=8)
        mask = read_kinds_mask(kinds_mask_path(root, s["slide_id"]))
        mask = cv2.resize(mask, thumbnail.shape[1::-1], interpolation=cv2.INTER_NEAREST)  # (h, w)
        axes[1, j].imshow(thumbnail.mean(axis=2), cmap="gray", vmin=0, vmax=255)
        axes[1, j].imshow(np.ma.masked_equal(mask, 0), cmap=colours, vmin=0, vmax=len(kinds), interpolation="nearest", alpha=0.85)
        axes[1, j].set_title("lesion mask", fontsize=8)
    for j, (kind, s, (x, y)) in enumerate(crops):
        with open_slide(root / "slides" / f"{s['slide_id']}.tiff") as slide:
            axes[2, j].imshow(slide.read_region((max(0, x - 96), max(0, y - 96)), 0, (192, 192)))
        axes[2, j].set_title(f"{kind}, level 0 ({summary['base_magnification']:g}x)", fontsize=8)
    legend = ", ".join(f"{n} {c}" for n, c in zip(kinds, colour_names, strict=False))
    fig.suptitle(f"{summary['config']['name']} (imitates {summary['config']['imitates']}); mask: {legend}", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def describe(summary: dict, extraction: dict, root: Path) -> dict:
    """Slides per class and split, median lesion share per presentation, tiles per magnification."""
    import h5py

    slides = summary["slides"]
    per_presentation = {}
    for s in slides:
        per_presentation.setdefault(f"{s['class']}/{s['presentation']}", []).append(s["lesion_share"])
    tiles: dict[str, list[int]] = {}
    for path in sorted((root / "features" / "lenet").glob("*.h5")):
        with h5py.File(path, "r") as f:
            for name in f:
                if isinstance(f[name], h5py.Group) and "features" in f[name]:
                    tiles.setdefault(name, []).append(int(f[name]["features"].shape[0]))
    return {
        "slides": len(slides),
        "per_class": {c: sum(s["class"] == c for s in slides) for c in summary["class_names"]},
        "test_slides": sum(s["split"] == "test" for s in slides),
        "median_lesion_share": {k: round(float(np.median(v)), 4) for k, v in per_presentation.items()},
        "median_tiles": {k: int(np.median(v)) for k, v in tiles.items()},
        "generation_seconds": summary["generation_seconds"],
        "extraction_seconds": extraction.get("seconds"),
    }


def main(argv: list[str]) -> int:
    names = [a for a in argv if "=" not in a] or list(DEFAULT_COHORTS)
    overrides = [a for a in argv if "=" in a]
    try:
        for name in names:
            raw, cfg = load_preset(name, overrides)
            root = REPO / raw["root"] if not Path(raw["root"]).is_absolute() else Path(raw["root"])
            start = time.perf_counter()
            summary = generate(root, cfg)
            extraction = extract(root, raw)
            overview(root, summary, root / "overview.png")
            facts = describe(summary, extraction, root)
            facts["total_seconds"] = round(time.perf_counter() - start, 1)
            (root / "summary.json").write_text(json.dumps(facts, indent=1))
            print(json.dumps({"cohort": name, "root": str(root), **facts}, indent=1), flush=True)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
