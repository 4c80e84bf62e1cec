"""LARS: layer-wise adaptive rate scaling (You, Gitman & Ginsburg, "Large Batch Training of
Convolutional Networks", 2017), in the form SimSiam's linear evaluation uses."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from fastsiam.optim.base import (
    DeviceLROptimizer,
    OptimizerInfo,
    _masked_coefficients,
    _momentum_update,
)


class LARS(DeviceLROptimizer):
    """LARS (You et al. 2017) as used by SimSiam's linear evaluation (trust 0.001).

    For a parameter w with gradient g (and ``ndim > 1`` when ``exclude_1d``)::

        q = trust_coefficient·‖w‖ / (‖g‖ + weight_decay·‖w‖)   if ‖w‖ > 0 and ‖g‖ > 0, else 1
        d = (g + weight_decay·w)·q;   v ← momentum·v + d;   w ← w − lr·v

    With ``exclude_1d``, 1-D parameters (biases, norm weights) use d = g: neither weight decay
    nor adaptation. The trust ratio is computed for all tensors at once (``_foreach_norm`` and
    ``torch.where`` on the device), so a step has no host synchronization.

    Args:
        params: parameters or parameter groups (groups may override every keyword below).
        lr: learning rate (float or 0-dim tensor), stored per group as a device tensor.
        momentum: momentum factor.
        weight_decay: L2 penalty, inside the trust ratio's denominator too.
        trust_coefficient: the LARS coefficient eta.
        exclude_1d: no weight decay or adaptation for 1-D parameters.
    """

    def __init__(self, params: Iterable[Any], lr: float | Tensor, momentum: float = 0.9,
                 weight_decay: float = 0.0, trust_coefficient: float = 0.001,
                 exclude_1d: bool = True):
        if momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError("LARS: need momentum >= 0, weight_decay >= 0, trust_coefficient > 0; "
                             f"got {momentum}, {weight_decay}, {trust_coefficient}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, exclude_1d=exclude_1d,
                                      fixed_lr=False))

    info = OptimizerInfo("lars/foreach", takes_found_inf=True, graph_safe=True)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                bufs: list[Tensor], found_inf: Tensor | None) -> None:
        lr, momentum, wd = _masked_coefficients(
            grads, found_inf, group["lr"], group["momentum"], group["weight_decay"])
        adapted = [not (group["exclude_1d"] and p.ndim <= 1) for p in params]
        a_params = [p for p, a in zip(params, adapted) if a]
        a_grads = [g for g, a in zip(grads, adapted) if a]
        directions = [g for g, a in zip(grads, adapted) if not a]
        if a_params:
            w_norm = torch.stack(torch._foreach_norm(a_params))
            g_norm = torch.stack(torch._foreach_norm(a_grads))
            ratio = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm)
            q = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
            if isinstance(wd, Tensor):
                d = torch._foreach_add(a_grads, torch._foreach_mul(a_params, wd))
            else:
                d = torch._foreach_add(a_grads, a_params, alpha=wd)
            torch._foreach_mul_(d, list(q.unbind(0)))
            it = iter(d)
            directions = [next(it) if a else g for g, a in zip(grads, adapted)]
        _momentum_update(params, directions, bufs, lr, momentum, 0.0)
