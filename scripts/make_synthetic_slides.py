"""Write the synthetic whole-slide cohort (pyramidal TIFFs, tumour masks, labels, splits).

    python scripts/make_synthetic_slides.py
    python scripts/make_synthetic_slides.py root=data/small generator.num_slides=8 generator.slide.width=2048

Settings come from `conf/dataset/synthetic_wsi.yaml` (keys `root` and `generator`), so the
cohort written here is the one `dataset=synthetic_wsi` expects; overrides use Hydra's syntax.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mil_experiments.data.wsi.synthetic import CohortConfig, make_cohort
from mil_experiments.errors import ConfigError, DataError

DATASET_CONF = Path(__file__).resolve().parent.parent / "conf" / "dataset"


def main(overrides: list[str]) -> int:
    """Compose `synthetic_wsi.yaml` with `overrides` and write the cohort under its root."""
    with initialize_config_dir(config_dir=str(DATASET_CONF), version_base="1.3"):
        cfg = compose(config_name="synthetic_wsi", overrides=overrides)
    try:
        generator = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(CohortConfig), cfg.generator))
        root = Path(cfg.root)
        if (root / "cohort.json").exists() or (root.exists() and any(root.iterdir())):
            raise DataError(f"{root}: not empty; delete it or choose another root=")
        summary = make_cohort(root, generator)
    except OmegaConfBaseException as error:
        print(f"error: generator: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    labels = [s["label"] for s in summary["slides"]]
    print(json.dumps({
        "root": str(root),
        "slides": len(labels),
        "positive": sum(labels),
        "base_magnification": summary["base_magnification"],
        "generation_seconds": summary["generation_seconds"],
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
