"""Extract tile features of whole slides into one HDF5 file per slide (a Hydra app).

    python scripts/extract_features.py encoder=lenet
    python scripts/extract_features.py slides_dir=/data/wsi out_dir=/data/features tile_size=256

Config: `conf/extract/config.yaml` (and `conf/extract/encoder/`). See
`mil_experiments.data.wsi.extraction` for what is written.
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mil_experiments.data.wsi.extraction import ExtractionConfig, run_extraction
from mil_experiments.errors import ConfigError, DataError


def checked_config(cfg: DictConfig) -> ExtractionConfig:
    """The composed config checked against `ExtractionConfig` (unknown keys refused)."""
    values = OmegaConf.to_container(cfg, resolve=True)
    values.pop("hydra", None)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExtractionConfig), values))
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or ""
        message = str(getattr(error, "msg", error)).splitlines()[0]
        raise ConfigError(f"{key}: {message}" if key else message) from None


@hydra.main(version_base="1.3", config_path="../conf/extract", config_name="config")
def main(cfg: DictConfig) -> None:
    """Run the extraction and print its summary."""
    try:
        summary = run_extraction(checked_config(cfg))
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    summary.pop("config")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
