"""MHIM-MIL's two stages in one command, per fold: the plain aggregator, then MHIM with its teacher from it.

    python scripts/mhim_two_stage.py --recipe abmil_c16                       # 3 folds, official recipe
    python scripts/mhim_two_stage.py --recipe transmil_tcga --folds 0 trainer.max_epochs=50
    python scripts/mhim_two_stage.py --out DIR aggregator=abmil_mhim --stage2 method.mask_ratio=0.5   # no preset

For each fold k (`dataset.fold=k`):

1. stage 1: `experiment=mhim_<recipe>_baseline` (without a recipe: `method=abmil
   method.binary_head=two_logits`), trained and tested into `<out>/stage1/fold<k>/`; its
   model selected on validation AUC is `checkpoints/selected.ckpt`;
2. stage 2: `experiment=mhim_<recipe>` (without a recipe: `method=mhim method.init_stu_type=fc`)
   with `method.teacher_init=<out>/stage1/fold<k>`: the teacher takes every weight of that
   checkpoint, the student its first fc; trained and tested into `<out>/stage2/fold<k>/`.

The same seed and fold serve both stages (the presets share `mhim_protocol_<dataset>`).
Positional overrides apply to both stages, `--stage1 K=V` / `--stage2 K=V` (repeatable) to
one. A stage whose folder already holds `results.json` is reused, so a stopped command can be
run again. Then `scripts/compare_runs.py <out>/stage1 <out>/stage2 --out <out>` writes
`comparison.md`, `comparison.csv` and `comparison.png` (mean ± std over the folds; the
teacher's test metrics are in each stage-2 `results.json` as `test/teacher_*`).
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mil_experiments.errors import ConfigError, DataError  # noqa: E402

RECIPES = {"abmil_c16": 3, "abmil_tcga": 4, "transmil_c16": 3, "transmil_tcga": 4}  # recipe -> folds of its protocol
PLAIN_STAGE_ONE = ["method=abmil", "method.binary_head=two_logits"]
PLAIN_STAGE_TWO = ["method=mhim", "method.init_stu_type=fc"]


def stage_overrides(recipe: str | None, stage: int) -> list[str]:
    """The preset (or, without a recipe, the plain methods) that selects a stage."""
    if recipe is None:
        return list(PLAIN_STAGE_ONE if stage == 1 else PLAIN_STAGE_TWO)
    return [f"experiment=mhim_{recipe}_baseline" if stage == 1 else f"experiment=mhim_{recipe}"]


def run_stage(overrides: list[str], folder: Path) -> dict:
    """Train and test one stage into `folder`, reuse the results already there, or continue an interrupted run of it.

    A folder without results.json is this script's own unfinished run: continued from its
    last epoch when its config.yaml is these settings', else trained again from the start.
    """
    from mil_experiments.api import train_or_reuse

    reused = (folder / "results.json").is_file()
    print(f"reusing {folder} (results.json present)" if reused else f"{folder}: {' '.join(overrides)}", flush=True)
    return train_or_reuse(overrides, folder, say=lambda line: print(line, flush=True))


def two_stages(recipe: str | None, folds: list[int | None], out: Path, common: list[str],
               stage1: list[str], stage2: list[str]) -> list[tuple[dict, dict]]:
    """Both stages for every fold; returns the (stage 1, stage 2) results per fold."""
    results = []
    for fold in folds:
        name = "run" if fold is None else f"fold{fold}"
        fold_override = [] if fold is None else [f"dataset.fold={fold}"]
        first = out / "stage1" / name
        one = run_stage([*stage_overrides(recipe, 1), *fold_override, *common, *stage1], first)
        two = run_stage([*stage_overrides(recipe, 2), *fold_override, *common, *stage2,
                         f"method.teacher_init={first}"], out / "stage2" / name)
        results.append((one, two))
    return results


def parse_folds(text: str | None, recipe: str | None) -> list[int | None]:
    """`0,1,2` -> [0, 1, 2]; default: every fold of the recipe's protocol, or one run without a recipe."""
    if text is None:
        return list(range(RECIPES[recipe])) if recipe else [None]
    try:
        return [int(f) for f in text.split(",")]
    except ValueError:
        raise ConfigError(f"--folds={text}: give comma-separated fold numbers, e.g. 0,1,2") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                        help="official recipe: presets mhim_<recipe>_baseline and mhim_<recipe>")
    parser.add_argument("--folds", default=None, help="comma-separated folds (default: all of the recipe's protocol)")
    parser.add_argument("--out", type=Path, default=None, help="default: outputs/mhim/<recipe>_<time>")
    parser.add_argument("--stage1", action="append", default=[], metavar="K=V", help="override for stage 1 only")
    parser.add_argument("--stage2", action="append", default=[], metavar="K=V", help="override for stage 2 only")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both stages")
    args = parser.parse_args(argv)
    out = args.out or REPO / "outputs" / "mhim" / f"{args.recipe or 'plain'}_{datetime.now():%Y-%m-%d_%H-%M-%S}"
    try:
        folds = parse_folds(args.folds, args.recipe)
        results = two_stages(args.recipe, folds, out, args.overrides, args.stage1, args.stage2)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for fold, (one, two) in zip(folds, results, strict=True):
        auc = [r["test"].get(k) for r, k in ((one, "test/auc"), (two, "test/auc"), (two, "test/teacher_auc"))]
        shown = ["n/a" if a is None else f"{a:.3f}" for a in auc]
        print(f"{'run' if fold is None else f'fold {fold}'}: test AUC stage 1 {shown[0]}, stage 2 student {shown[1]}, teacher {shown[2]}")
    sys.path.insert(0, str(REPO / "scripts"))
    from compare_runs import main as compare

    return compare([str(out / "stage1"), str(out / "stage2"), "--out", str(out)])


if __name__ == "__main__":
    sys.exit(main())
