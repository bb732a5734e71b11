"""MHIM-MIL's momentum teacher: cosine schedules, EMA update, consistency loss, stage-1 initialisation.

- Cosine schedule (v1 `cosine_scheduler`, no warm-up), per iteration t of T:
  v(t) = final + 0.5 (base - final) (1 + cos(pi t / T)); r_h decays base -> 0
  (`mrh_sche`) and the EMA momentum rises m -> 1 (`mm_sche`).
- EMA: theta_teacher <- m theta_teacher + (1 - m) theta_student, every parameter, after
  every optimizer step.
- Consistency: soft cross-entropy between bag embeddings over the feature dimension,
  L = -sum_d softmax(z_t / tau_t)_d log softmax(z_s / tau_s)_d, the teacher side detached
  (v1 `SoftTargetCrossEntropy_v2`, tau_t = 0.1, tau_s = 1.0).
- Initialisation: the teacher takes every weight of the stage-1 aggregator from its
  selected checkpoint (`checkpoints/selected.ckpt`, keys `aggregator.*`); a missing file, a
  file that is not such a checkpoint, or a key or shape mismatch is a one-line
  `ConfigError` (v1 before commit 745e5b1 silently left the teacher random).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from mil_experiments.errors import ConfigError

AGGREGATOR_PREFIX = "aggregator."
ENCODER_PREFIX = "encoder."


def cosine_value(base: float, final: float, step: int, total: int) -> float:
    """v(step) = final + 0.5 (base - final) (1 + cos(pi step / total)); `final` from step >= total on."""
    if total <= 0 or step >= total:
        return final
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * step / total))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_t <- m theta_t + (1 - m) theta_s for every parameter (the modules have the same structure)."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)


def consistency_loss(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor,
                     temp_student: float = 1.0, temp_teacher: float = 0.1) -> torch.Tensor:
    """Soft cross-entropy of the student's (E,) bag embedding against the detached teacher's (E,)."""
    target = torch.softmax(teacher_embedding.detach().float() / temp_teacher, dim=-1)  # (E,)
    return -(target * torch.log_softmax(student_embedding.float() / temp_student, dim=-1)).sum(-1)


def stage_one_state(path: str | Path, prefix: str = AGGREGATOR_PREFIX, key: str = "method.teacher_init") -> dict[str, torch.Tensor]:
    """The `prefix` weights of a run's checkpoint (`state_dict` of a MILMethod), prefix removed; errors name `key`.

    Raises:
        ConfigError: the file is missing, unreadable, not a run checkpoint, or holds no `prefix` weights.
    """
    where = f"{key}={path}"
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "selected.ckpt"
        where = f"{key}: {path}"
    if not path.is_file():
        raise ConfigError(f"{where}: no such checkpoint (train stage 1 first: the same command with method=abmil, then {key}=<its run folder>)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises pickle / zip errors of several types
        raise ConfigError(f"{where}: not a readable checkpoint ({type(error).__name__})") from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"{where}: not a run checkpoint (no state_dict)")
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if prefix == AGGREGATOR_PREFIX and not weights:
        raise ConfigError(f"{where}: holds no aggregator weights")
    return weights


def load_exactly(module: nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Load `weights` into `module`, refusing missing, unexpected or differently shaped keys (one line)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [k for k in own if k in weights and tuple(own[k].shape) != tuple(weights[k].shape)]
    if missing or unexpected or shapes:
        detail = (f"missing {missing[:3]}" if missing else "") or (f"unexpected {unexpected[:3]}" if unexpected else "")
        detail = detail or f"shape of {shapes[0]}: {tuple(weights[shapes[0]].shape)} there, {tuple(own[shapes[0]].shape)} here"
        raise ConfigError(f"{where}: does not fit this {type(module).__name__} ({detail}); stage 1 must use the same aggregator, its settings and method.binary_head")
    module.load_state_dict(weights)
