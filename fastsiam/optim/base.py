"""The base of fastsiam's optimizers: the learning rate lives on the device, and what every
optimizer the factory builds can do (:class:`OptimizerInfo`).

Every parameter group's ``lr`` is a 0-dim float32 tensor on the parameters' device
(``torch.optim.SGD``, the reference, keeps floats). The schedule writes it in place (``fill_``,
no host synchronization), so a training step captured once as a CUDA graph follows the
schedule on every replay without re-capture. ``step(found_inf=t)`` takes a 0-dim device tensor
that is 1 when the (fp16) gradients overflowed: the whole update, momentum included, is then
skipped by masking with tensor arithmetic, never by a Python ``if`` on a device value, so it
can run inside a CUDA graph (see :class:`fastsiam.step.LossScaler`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class OptimizerInfo:
    """What an optimizer can do, read by the step instead of checking its class (in the spirit
    of timm's ``OptimInfo``).

    Args:
        name: ``optim.name`` and ``optim.impl`` it is built for, e.g. ``sgd/fused``.
        takes_found_inf: ``step(found_inf=t)`` skips the update when ``t`` is 1, on the device
            (needed by fp16's loss scaler and ``train.on_nonfinite=skip``).
        graph_safe: its step can be captured in a CUDA graph (``train.step=graph``).
    """

    name: str
    takes_found_inf: bool
    graph_safe: bool


def _as_lr_tensor(lr: float | Tensor, device: torch.device) -> Tensor:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr tensor must have one element, got shape {tuple(lr.shape)}")
        return lr.detach().to(device=device, dtype=torch.float32).reshape(()).clone()
    return torch.tensor(float(lr), dtype=torch.float32, device=device)


def optimizer_info(optimizer: torch.optim.Optimizer) -> OptimizerInfo:
    """What ``optimizer`` can do: fastsiam's optimizers say (their ``info``); any other
    (``torch.optim.SGD``, apex's FusedSGD, a user's) can do none of it."""
    info = getattr(optimizer, "info", None)
    if isinstance(info, OptimizerInfo):
        return info
    return OptimizerInfo(type(optimizer).__name__, takes_found_inf=False, graph_safe=False)


class DeviceLROptimizer(torch.optim.Optimizer):
    """Base: one lr tensor per group on its parameters' device, state kept in place on load.

    ``load_state_dict`` copies the loaded learning rates and momentum buffers *into* the
    existing tensors, because a captured CUDA graph holds their addresses. Subclasses give
    their :class:`OptimizerInfo` as ``info``.
    """

    info: OptimizerInfo

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        device = group["params"][0].device if group["params"] else torch.device("cpu")
        shared = any(g is not group and g["lr"] is group["lr"] for g in self.param_groups)
        if not isinstance(group["lr"], Tensor) or shared or group["lr"].device != device:
            group["lr"] = _as_lr_tensor(group["lr"], device)

    def init_state(self) -> None:
        """Create every momentum buffer now (zeros; the first update then equals torch's)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        lrs = [g["lr"] for g in self.param_groups]
        old = {p: dict(s) for p, s in self.state.items()}
        super().load_state_dict(state_dict)
        for group, lr in zip(self.param_groups, lrs):
            with torch.no_grad():
                lr.copy_(torch.as_tensor(group["lr"], dtype=lr.dtype))
            group["lr"] = lr
        for p, s in self.state.items():
            for key, value in s.items():
                kept = old.get(p, {}).get(key)
                if isinstance(kept, Tensor) and isinstance(value, Tensor) and kept.shape == value.shape:
                    with torch.no_grad():
                        kept.copy_(value)
                    s[key] = kept

    @torch.no_grad()
    def step(self, closure: Any = None, *, found_inf: Tensor | None = None) -> Any:
        """One update of every group (:meth:`_update`), skipped on the device when
        ``found_inf`` is 1."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = self._collect(group)
            if params:
                self._update(group, params, grads, bufs, found_inf)
        return loss

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                bufs: list[Tensor], found_inf: Tensor | None) -> None:
        raise NotImplementedError

    def _collect(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(
                    p, memory_format=torch.preserve_format)
        grads = [p.grad for p in params]
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        return params, grads, bufs


def _masked_coefficients(
    grads: list[Tensor], found_inf: Tensor | None, lr: Tensor, momentum: float, weight_decay: float
) -> tuple[Tensor, float | Tensor, float | Tensor]:
    """With ``found_inf`` (1: skip), zero the gradients and turn the step into the identity.

    Zeroed gradients, weight decay 0, momentum 1 and lr 0 leave buffers and weights unchanged;
    all of it is device arithmetic (graph-safe). ``masked_fill_`` also clears inf/NaN, which a
    multiplication by 0 would not.
    """
    if found_inf is None:
        return lr, momentum, weight_decay
    skip = found_inf.reshape(()).to(torch.bool)
    for g in grads:
        g.masked_fill_(skip, 0.0)
    keep = 1.0 - found_inf.reshape(()).to(lr.dtype)
    return lr * keep, momentum * keep + (1.0 - keep), weight_decay * keep


def _momentum_update(
    params: list[Tensor], grads: list[Tensor], bufs: list[Tensor],
    lr: Tensor, momentum: float | Tensor, weight_decay: float | Tensor,
) -> None:
    """``d = g + wd·w``; ``v ← m·v + d``; ``w ← w − lr·v`` with foreach ops and a tensor lr."""
    if isinstance(weight_decay, Tensor):
        grads = torch._foreach_add(grads, torch._foreach_mul(params, weight_decay))
    elif weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, grads)
    torch._foreach_sub_(params, torch._foreach_mul(bufs, lr))
