"""MHIM-MIL's Figure 1 on one test slide: ground truth, attention before MHIM, the teacher's masks, attention after MHIM.

    python scripts/mhim_figure1.py stage1=outputs/mhim_c16_like/stage1/fold0 \\
        stage2=outputs/mhim_c16_like/stage2/fold0 cohort=data/cohorts/c16_like \\
        out=docs/img/mhim_figure1_c16.png [slide=<id>] [seed=0] [thumbnail_size=512]

`stage1` is the plain ABMIL run (MHIM's teacher initialisation, "before MHIM"), `stage2` the
`method=mhim` run trained from it (`scripts/mhim_two_stage.py` writes both). Both are rebuilt
from their config.yaml and checkpoints/selected.ckpt (`attention_heatmap.load_run`), reading
the features from `<cohort>/features/lenet` and, for stage 2, taking `stage1` as
`method.teacher_init` (its weights are then replaced by the stage-2 checkpoint's teacher).

The slide, by default: among the test slides of the run whose presentation in
`<cohort>/slides.csv` is `subtle_only` or `macro`, the first where stage 2 is right and
stage 1 wrong (threshold 0.5), else the first positive one; `slide=<id>` chooses it. Panels:

(a) the thumbnail with the ground-truth tumour (`masks/<id>_kinds.png`: salient red, subtle blue);
(b) the stage-1 attention, as percentile within the slide, per tile;
(c) the tiles the stage-2 teacher's attention masks (`mhim_masks` with the run's `method.*`
    ratios): high-attention (hard instances) red, low-attention yellow, random grey. beta_h is
    drawn at its configured start value (with `method.mrh_sche` it decays to 0 by the end of
    training, so at test time it would mask no hard instance); the random part uses a
    torch generator seeded with `seed`; the teacher runs in eval mode (no dropout);
(d) the stage-2 student's attention.

Bad input (a missing run folder, a stage-2 run that is not method=mhim, a slide not in the
test set or not in slides.csv, a missing cohort file) is a one-line error and exit 2.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import h5py  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from attention_heatmap import load_run, run_config  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mil_experiments.data.wsi.masks import kinds_mask_path, read_kinds_mask, read_tumour_mask, tumour_mask_path  # noqa: E402
from mil_experiments.data.wsi.readers import open_slide  # noqa: E402
from mil_experiments.errors import ConfigError, DataError  # noqa: E402
from mil_experiments.evaluation import predicted_label, probabilities  # noqa: E402
from mil_experiments.methods.mhim import _TeacherView  # noqa: E402
from mil_experiments.methods.mhim_masks import MaskRatios, mhim_masks, select  # noqa: E402
from mil_experiments.prediction.heatmap import overlay_heat, percentile_map  # noqa: E402

USAGE = ("usage: mhim_figure1.py stage1=<run dir> stage2=<run dir> cohort=<cohort root> out=<png>"
         " [slide=<id>] [seed=0] [thumbnail_size=512]")
PRESENTATIONS = ("subtle_only", "macro")
DEFAULT_TILE_LEVEL0 = 64  # 20x tiles of 64 px on a 20x base
MASK_COLOURS = {"random": (0.55, 0.55, 0.55), "low": (1.0, 0.85, 0.1), "high": (0.9, 0.1, 0.1)}
KIND_COLOURS = {1: (214, 39, 40), 2: (31, 119, 180)}  # salient red, subtle blue


@dataclass
class FigureData:
    """Everything the figure shows of one slide; instance arrays follow the bag's order."""

    slide_id: str
    label: int
    presentation: str
    coords: np.ndarray  # (N, 2) level-0 (x, y) of the tiles
    tile_level0: float  # tile side in level-0 pixels
    magnification: float
    prob_stage1: float
    prob_student: float
    prob_teacher: float
    attention_stage1: np.ndarray  # (N,)
    attention_teacher: np.ndarray  # (N,) the attention mhim_masks reads
    attention_student: np.ndarray  # (N,)
    ratios: MaskRatios
    masked: np.ndarray  # (M,) ids mhim_masks masks, ascending
    masked_parts: dict[str, np.ndarray]  # random / low / high: each part's ids


def _scored(method, bag) -> tuple[float, np.ndarray]:
    """(positive-class probability, attention (N,)) of `method` (a MILMethod or a _TeacherView) on a bag."""
    with torch.no_grad():
        output = method.predict(method.encode_for_evaluation(bag))
    probability = probabilities(output.logits, method.num_classes)
    probability = float(probability if probability.ndim == 0 else probability[-1])
    return probability, output.instance_scores.reshape(-1).numpy()  # (N,)


def read_presentations(cohort: Path) -> dict[str, str]:
    """slide id -> presentation, from `<cohort>/slides.csv`."""
    path = cohort / "slides.csv"
    if not path.is_file():
        raise DataError(f"cohort={cohort}: no slides.csv (is it a cohort of scripts/make_cohorts.py?)")
    with path.open() as handle:
        return {row["slide_id"]: row["presentation"] for row in csv.DictReader(handle)}


def tile_side_level0(features: Path, magnification: float) -> float:
    """The tile side in level-0 pixels of the `magnification` tiles of a feature file (attrs `patch_size_level0`)."""
    if not features.is_file():
        return float(DEFAULT_TILE_LEVEL0)
    with h5py.File(features, "r") as handle:
        for group in handle.values():
            coords = group.get("coords") if isinstance(group, h5py.Group) else None
            if coords is not None and float(coords.attrs.get("target_magnification", -1)) == float(magnification):
                return float(coords.attrs.get("patch_size_level0", DEFAULT_TILE_LEVEL0))
    return float(DEFAULT_TILE_LEVEL0)


def teacher_masks(attention: torch.Tensor, ratios: MaskRatios, fusion: str, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The ids `mhim_masks` masks (seeded), and each part's ids, redrawn with `select` in its order from the same seed."""
    _, masked = mhim_masks(attention, ratios, fusion, generator=torch.Generator().manual_seed(seed))  # (M,)
    generator = torch.Generator().manual_seed(seed)
    parts = {}
    if ratios.random > 0:
        parts["random"] = select(attention, False, ratios.random, random_ratio=0.001, fusion=fusion, generator=generator)
    if ratios.low > 0:
        parts["low"] = select(attention, False, ratios.low, fusion=fusion, generator=generator)
    if ratios.high > 0:
        parts["high"] = select(attention, True, ratios.high, random_ratio=ratios.high_random, fusion=fusion, generator=generator)
    union = torch.unique(torch.cat(list(parts.values()))) if parts else torch.zeros(0, dtype=torch.long)
    if not torch.equal(union, masked):  # the redraw must be the same draw
        raise RuntimeError("the masks redrawn per part differ from mhim_masks' union")
    return masked, parts


def figure_data(stage1: Path, stage2: Path, cohort: Path, slide: str | None = None, seed: int = 0) -> FigureData:
    """Rebuild both runs, choose the slide, and compute the attention maps and the teacher's masks."""
    for name, run in (("stage1", stage1), ("stage2", stage2)):
        if not run.is_dir():
            raise DataError(f"{name}={run}: no such run folder")
    method_name = str(run_config(stage2).method.name)
    if method_name != "mhim":
        raise ConfigError(f"stage2={stage2}: a method={method_name} run, not method=mhim")
    run_config(stage1)
    presentations = read_presentations(cohort)
    features_dir = cohort / "features" / "lenet"
    first = load_run(stage1, {"dataset.root": str(features_dir)})
    second = load_run(stage2, {"dataset.root": str(features_dir), "method.teacher_init": str(stage1)})
    bags = {b.bag_id: b for b in (first.datamodule.test_set[i] for i in range(len(first.datamodule.test_set)))}
    stage2_bags = {b.bag_id: b for b in (second.datamodule.test_set[i] for i in range(len(second.datamodule.test_set)))}
    if set(bags) != set(stage2_bags):
        raise DataError(f"stage1={stage1} and stage2={stage2}: different test sets (another fold or split?)")
    student, teacher = second.method, _TeacherView(second.method)
    if slide is not None:
        if slide not in bags:
            raise DataError(f"slide={slide}: not in the test set ({', '.join(sorted(bags))})")
        if slide not in presentations:
            raise DataError(f"slide={slide}: not in {cohort / 'slides.csv'}")
    else:
        candidates = [i for i in sorted(bags) if presentations.get(i) in PRESENTATIONS and int(bags[i].label) == 1]
        if not candidates:
            raise DataError(f"cohort={cohort}: no positive {'/'.join(PRESENTATIONS)} slide in the test set")
        slide = candidates[0]
        for candidate in tqdm(candidates, desc="choosing the slide", leave=False):
            label = int(bags[candidate].label)
            right_1 = predicted_label(torch.tensor(_scored(first.method, bags[candidate])[0]), 2) == label
            right_2 = predicted_label(torch.tensor(_scored(student, stage2_bags[candidate])[0]), 2) == label
            if right_2 and not right_1:
                slide = candidate
                break
    bag, bag2 = bags[slide], stage2_bags[slide]
    if bag.coords is None or not torch.equal(bag.coords, bag2.coords):
        raise DataError(f"slide={slide}: its tiles have no coordinates, or differ between the runs")
    prob_1, attention_1 = _scored(first.method, bag)
    prob_s, attention_s = _scored(student, bag2)
    with torch.no_grad():
        teacher_output = teacher.predict(teacher.encode_for_evaluation(bag2))
    prob_t = probabilities(teacher_output.logits, teacher.num_classes)
    prob_t = float(prob_t if prob_t.ndim == 0 else prob_t[-1])
    mining = student.mining_attention(teacher_output)  # (N,) or (H, N)
    c = second.method.config
    ratios = MaskRatios(c.mask_ratio, c.mask_ratio_l, c.mask_ratio_h, c.mask_ratio_hr)  # beta_h at its start
    masked, parts = teacher_masks(mining, ratios, c.msa_fusion, seed)
    return FigureData(
        slide_id=slide, label=int(bag.label), presentation=presentations[slide], coords=bag.coords.numpy(),
        tile_level0=tile_side_level0(features_dir / f"{slide}.h5", bag.magnification), magnification=bag.magnification,
        prob_stage1=prob_1, prob_student=prob_s, prob_teacher=prob_t,
        attention_stage1=attention_1, attention_teacher=mining.reshape(-1, mining.shape[-1]).float().mean(0).numpy(),
        attention_student=attention_s, ratios=ratios, masked=masked.numpy(),
        masked_parts={k: v.numpy() for k, v in parts.items()},
    )


def _mask_panel(thumb: np.ndarray, data: FigureData, downsample: float) -> np.ndarray:
    """(h, w, 4) RGBA overlay: each masked tile in its part's colour (high over low over random)."""
    overlay = np.zeros((*thumb.shape[:2], 4), dtype=np.float32)  # (h, w, 4)
    for part in ("random", "low", "high"):
        for i in data.masked_parts.get(part, []):
            x, y = data.coords[i]
            x0, y0 = int(x / downsample), int(y / downsample)
            x1, y1 = int(np.ceil((x + data.tile_level0) / downsample)), int(np.ceil((y + data.tile_level0) / downsample))
            overlay[y0:y1, x0:x1] = (*MASK_COLOURS[part], 0.9 if part == "high" else 0.6)
    return overlay


def _truth_panel(thumb: np.ndarray, cohort: Path, slide_id: str) -> np.ndarray:
    """(h, w, 3) uint8: the thumbnail with the tumour, salient red and subtle blue when the kinds map exists."""
    import cv2

    size = (thumb.shape[1], thumb.shape[0])
    tumour_path, kinds_path = tumour_mask_path(cohort, slide_id), kinds_mask_path(cohort, slide_id)
    if not tumour_path.is_file():
        raise DataError(f"{tumour_path}: ground-truth mask not found")
    tumour = cv2.resize(read_tumour_mask(tumour_path).astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0  # (h, w)
    kinds = np.where(tumour, 1, 0).astype(np.uint8)  # (h, w)
    if kinds_path.is_file():
        kinds = cv2.resize(read_kinds_mask(kinds_path), size, interpolation=cv2.INTER_NEAREST)  # (h, w)
    shown = thumb.astype(np.float32).copy()  # (h, w, 3)
    for kind, colour in KIND_COLOURS.items():
        shown[kinds == kind] = 0.35 * shown[kinds == kind] + 0.65 * np.array(colour, dtype=np.float32)
    return shown.astype(np.uint8)


def draw(data: FigureData, cohort: Path, out: Path, thumbnail_size: int = 512) -> Path:
    """The four panels (a)-(d) over the slide's thumbnail, saved as a PNG at `out`."""
    slide_path = cohort / "slides" / f"{data.slide_id}.tiff"
    if not slide_path.is_file():
        raise DataError(f"{slide_path}: slide not found")
    with open_slide(slide_path, "tiffslide") as slide:
        downsample = max(1.0, max(slide.dimensions) / thumbnail_size)
        thumb = slide.thumbnail(downsample)  # (h, w, 3)
    shape = thumb.shape[:2]
    fig, axes = plt.subplots(1, 4, figsize=(18, 5.0))
    axes[0].imshow(_truth_panel(thumb, cohort, data.slide_id))
    axes[0].set_title(f"(a) ground truth ({data.presentation})")
    axes[0].legend(handles=[Patch(color=np.array(KIND_COLOURS[1]) / 255, label="salient"),
                            Patch(color=np.array(KIND_COLOURS[2]) / 255, label="subtle")], loc="lower right", fontsize=8)
    overlay_heat(fig, axes[1], thumb, percentile_map(shape, data.coords, data.attention_stage1, data.tile_level0, downsample))
    axes[1].set_title(f"(b) stage 1 ABMIL (before MHIM)\np(tumour) = {data.prob_stage1:.2f}")
    axes[2].imshow(thumb)
    axes[2].imshow(_mask_panel(thumb, data, downsample))
    r = data.ratios
    counts = {k: len(v) for k, v in data.masked_parts.items()}
    axes[2].set_title(f"(c) stage-2 teacher's masks, p(tumour) = {data.prob_teacher:.2f}\n"
                      f"β_r={r.random:g} β_l={r.low:g} β_h={r.high:g} (start of its schedule) ρ={r.high_random:g}:"
                      f" {len(data.masked)}/{len(data.coords)} masked", fontsize=9)
    axes[2].legend(handles=[Patch(color=MASK_COLOURS[k], label=f"{k} ({counts[k]})") for k in ("high", "low", "random") if k in counts],
                   loc="lower right", fontsize=8)
    overlay_heat(fig, axes[3], thumb, percentile_map(shape, data.coords, data.attention_student, data.tile_level0, downsample))
    axes[3].set_title(f"(d) stage 2 MHIM student (after MHIM)\np(tumour) = {data.prob_student:.2f}")
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(f"{data.slide_id}: label {data.label} ({'tumour' if data.label else 'normal'}),"
                 f" {len(data.coords)} tiles at {data.magnification:g}x; attention as percentile within the slide")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    known = {"stage1", "stage2", "cohort", "out", "slide", "seed", "thumbnail_size"}
    if not {"stage1", "stage2", "cohort", "out"} <= set(args) or len(args) != len(argv) or not set(args) <= known:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        cohort = Path(args["cohort"])
        if not cohort.is_dir():
            raise DataError(f"cohort={cohort}: no such folder")
        data = figure_data(Path(args["stage1"]), Path(args["stage2"]), cohort, args.get("slide"), int(args.get("seed", 0)))
        out = draw(data, cohort, Path(args["out"]), int(args.get("thumbnail_size", 512)))
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({data.slide_id}, label {data.label}, p stage 1 {data.prob_stage1:.3f}, student {data.prob_student:.3f},"
          f" teacher {data.prob_teacher:.3f}; {len(data.masked)}/{len(data.coords)} tiles masked"
          f" ({', '.join(f'{k} {len(v)}' for k, v in data.masked_parts.items())}))")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
