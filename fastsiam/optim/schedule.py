"""Learning-rate schedules that write the device lr tensors in place: linear warm-up, then a
per-step cosine, the official per-epoch cosine, or constant."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fastsiam.config import ConfigError, ScheduleConfig

SCHEDULES = ("cosine", "cosine_epoch", "constant")


class LRSchedule:
    """Sets every non-fixed group's lr tensor for a global step, in place, without host sync.

    - ``cosine``: per step, ``min + (base − min)·½(1 + cos(π·t))`` with t the fraction of
      post-warm-up steps done (the form mmpretrain's CosineAnnealingLR takes per iteration).
    - ``cosine_epoch``: the official SimSiam schedule, ``base·½(1 + cos(π·epoch/epochs))``
      (``min`` as floor: ``min + (base − min)·…``), constant within an epoch.
    - ``constant``: ``base``.

    A linear warm-up of ``warmup_epochs`` (in steps, possibly fractional epochs) ramps from
    ``base/warmup_steps`` to ``base`` first, for every schedule. Groups with ``fixed_lr``
    stay at ``base_lr`` (SimSiam's predictor).

    Args:
        optimizer: an optimizer whose groups hold ``lr`` tensors (or floats).
        name: ``cosine``, ``cosine_epoch`` or ``constant``.
        base_lr: the peak lr (batch-scaled).
        epochs: training length in epochs.
        steps_per_epoch: optimizer steps per epoch.
        warmup_epochs: length of the linear warm-up.
        min_lr: final lr as a fraction of ``base_lr``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, name: str, base_lr: float,
                 epochs: int, steps_per_epoch: int, warmup_epochs: float = 0.0,
                 min_lr: float = 0.0):
        if name not in SCHEDULES:
            raise ConfigError(f"schedule.name must be one of {', '.join(SCHEDULES)}, got {name!r}")
        if epochs < 1 or steps_per_epoch < 1:
            raise ValueError(f"LRSchedule: need epochs >= 1 and steps_per_epoch >= 1, got {epochs}, {steps_per_epoch}")
        if not 0 <= warmup_epochs < epochs:
            raise ConfigError(f"schedule.warmup_epochs must be in [0, train.epochs={epochs}), got {warmup_epochs}")
        self.optimizer = optimizer
        self.name = name
        self.base_lr = float(base_lr)
        self.min_lr = float(min_lr) * self.base_lr
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = epochs * steps_per_epoch
        self.warmup_steps = round(warmup_epochs * steps_per_epoch)
        for group in optimizer.param_groups:
            if group.get("fixed_lr", False):
                _write(group, self.base_lr)

    def lr_at(self, step: int) -> float:
        """The scheduled (non-fixed) lr at global step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.name == "constant":
            return self.base_lr
        if self.name == "cosine_epoch":
            t = min(step // self.steps_per_epoch, self.epochs) / self.epochs
        else:
            t = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

    def set(self, step: int) -> float:
        """Write ``lr_at(step)`` into every non-fixed group (an in-place device fill)."""
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            if not group.get("fixed_lr", False):
                _write(group, lr)
        return lr


def _write(group: dict[str, Any], value: float) -> None:
    if isinstance(group["lr"], Tensor):
        group["lr"].fill_(value)  # a kernel launch with a host scalar: no synchronization
    else:
        group["lr"] = value


def build_schedule(schedule_cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, *,
                   base_lr: float, epochs: int, steps_per_epoch: int) -> LRSchedule:
    """The :class:`LRSchedule` described by the ``schedule`` config section."""
    return LRSchedule(optimizer, name=schedule_cfg.name, base_lr=base_lr, epochs=epochs,
                      steps_per_epoch=steps_per_epoch, warmup_epochs=schedule_cfg.warmup_epochs,
                      min_lr=schedule_cfg.min_lr)
