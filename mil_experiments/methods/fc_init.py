"""The aggregator's first fc (MHIM v1's `patch_to_emb`) and its initialisation from a run.

MHIM-MIL's student takes stage 1's first fc (`method.init_stu_type=fc`); the supplement's
Table 5 gives the plain baselines the same initialisation to show that it helps MHIM's
teacher-student optimisation rather than any MIL model ("AB-MIL w/ init"):
`method.init_fc_from=<run folder or its selected.ckpt>`, for every method but `mhim`.
Only the fc's weights are taken; every other weight keeps the seed's initialisation.
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from mil_experiments.errors import ConfigError
from mil_experiments.methods.mhim_teacher import load_exactly, stage_one_state
from mil_experiments.models.abmil_mhim import ABMILMHIM
from mil_experiments.models.transmil import TransMIL

INIT_KEY = "method.init_fc_from"


def first_fc(aggregator: nn.Module) -> nn.Module | None:
    """The aggregator's first fc (v1's `patch_to_emb`): ABMIL-MHIM's `embed`, TransMIL's `fc`; others have none."""
    if isinstance(aggregator, ABMILMHIM):
        return aggregator.embed
    if isinstance(aggregator, TransMIL):
        return aggregator.fc
    return None


def init_first_fc(aggregator: nn.Module, path: str | Path) -> None:
    """Load the first fc of `aggregator` from the run at `path` (its selected checkpoint), nothing else.

    Raises:
        ConfigError: the aggregator has no first fc, or the checkpoint is missing, unreadable
            or of another aggregator (every weight is checked, not only the fc's).
    """
    fc = first_fc(aggregator)
    if fc is None:
        raise ConfigError(f"{INIT_KEY}={path}: aggregator {type(aggregator).__name__} has no first fc to initialise"
                          " (abmil_mhim and transmil have one)")
    donor = copy.deepcopy(aggregator)
    load_exactly(donor, stage_one_state(path, key=INIT_KEY), f"{INIT_KEY}={path}")
    fc.load_state_dict(first_fc(donor).state_dict())
