"""Momentum SGD with its learning rate on the device: the update of ``torch.optim.SGD``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor
from torch.optim.sgd import sgd as _torch_sgd_functional

from fastsiam.optim.base import (
    DeviceLROptimizer,
    OptimizerInfo,
    _masked_coefficients,
    _momentum_update,
)


class SGD(DeviceLROptimizer):
    """Momentum SGD with L2 weight decay, the update of ``torch.optim.SGD``.

    ``d = g + weight_decay·w``; ``v ← momentum·v + d`` (v starts at 0, so the first step
    gives v = d like torch's); ``w ← w − lr·v``.

    Args:
        params: parameters or parameter groups (dicts may set ``lr``, ``momentum``,
            ``weight_decay`` and ``fixed_lr``, the schedule's flag for a constant lr).
        lr: learning rate (float or 0-dim tensor); stored per group as a device tensor.
        momentum: momentum factor (0 disables the buffer's memory, not the buffer).
        weight_decay: L2 penalty added to the gradient.
        impl: ``"foreach"`` (multi-tensor ops, any device) or ``"fused"`` (torch's fused
            SGD kernel: CUDA, and CPU on recent torch).
    """

    def __init__(self, params: Iterable[Any], lr: float | Tensor, momentum: float = 0.9,
                 weight_decay: float = 0.0, *, impl: str = "foreach"):
        if impl not in ("foreach", "fused"):
            raise ValueError(f"SGD impl must be 'foreach' or 'fused', got {impl!r}")
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: momentum and weight_decay must be >= 0, got {momentum}, {weight_decay}")
        self.impl = impl
        self.info = OptimizerInfo(f"sgd/{impl}", takes_found_inf=True, graph_safe=True)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      fixed_lr=False))

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                bufs: list[Tensor], found_inf: Tensor | None) -> None:
        if self.impl == "fused":
            # The fused kernel reads found_inf on the device and skips the whole update.
            _torch_sgd_functional(
                params, grads, bufs, fused=True, found_inf=found_inf,
                weight_decay=group["weight_decay"], momentum=group["momentum"],
                lr=group["lr"], dampening=0.0, nesterov=False, maximize=False)
            return
        lr, momentum, wd = _masked_coefficients(
            grads, found_inf, group["lr"], group["momentum"], group["weight_decay"])
        _momentum_update(params, grads, bufs, lr, momentum, wd)
