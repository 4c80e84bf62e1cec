"""Optimizers and learning-rate schedules whose learning rate lives on the device.

- :mod:`~fastsiam.optim.base`: :class:`DeviceLROptimizer` (one lr tensor per group, written in
  place by the schedule, so a captured CUDA graph follows it) and :class:`OptimizerInfo`, what
  an optimizer can do (:func:`optimizer_info`: the step reads it, not the class);
- :mod:`~fastsiam.optim.sgd`: :class:`SGD`, the update of ``torch.optim.SGD`` (dampening 0,
  no Nesterov), ``impl="fused"`` (torch's fused kernel) or ``"foreach"``;
- :mod:`~fastsiam.optim.lars`: :class:`LARS` (You et al. 2017), as SimSiam's linear evaluation;
- :mod:`~fastsiam.optim.factory`: :func:`build_param_groups` (the predictor at a fixed lr,
  1-D parameters out of weight decay by shape) and :func:`build_optimizer` over one table,
  ``OPTIMIZERS``;
- :mod:`~fastsiam.optim.schedule`: :class:`LRSchedule` / :func:`build_schedule` (linear
  warm-up + per-step cosine, the official per-epoch cosine, or constant).
"""

from fastsiam.optim.base import DeviceLROptimizer, OptimizerInfo, optimizer_info
from fastsiam.optim.factory import (
           IMPLS,
           OPTIMIZERS,
           build_optimizer,
           build_param_groups,
           resolve_impl,
)
from fastsiam.optim.lars import LARS
from fastsiam.optim.schedule import SCHEDULES, LRSchedule, build_schedule
from fastsiam.optim.sgd import SGD

__all__ = ["IMPLS", "LARS", "OPTIMIZERS", "SCHEDULES", "SGD", "DeviceLROptimizer", "LRSchedule",
           "OptimizerInfo", "build_optimizer", "build_param_groups", "build_schedule",
           "optimizer_info", "resolve_impl"]
