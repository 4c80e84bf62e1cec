"""Optimizers and learning-rate schedules whose learning rate lives on the device.

In :class:`SGD` and :class:`LARS` every parameter group's ``lr`` is a 0-dim float32 tensor on
the parameters' device (``torch.optim.SGD``, the reference, keeps floats). The schedule writes
it in place (``fill_``, no host synchronization), so a training step captured
once as a CUDA graph follows the schedule on every replay without re-capture.

- :class:`SGD`: momentum SGD with weight decay, numerically the update of
  ``torch.optim.SGD`` (dampening 0, no Nesterov). ``impl="fused"`` runs torch's fused kernel
  (one launch for all tensors), ``impl="foreach"`` torch's multi-tensor ops.
- :class:`LARS`: layer-wise adaptive rate scaling (You, Gitman & Ginsburg, "Large Batch
  Training of Convolutional Networks", 2017), in the form SimSiam's linear evaluation uses.
- :func:`build_param_groups` / :func:`build_optimizer`: the SimSiam recipe's groups
  (predictor at a fixed lr, optional exclusion of 1-D parameters from weight decay).
- :class:`LRSchedule` / :func:`build_schedule`: linear warm-up + per-step cosine, the
  official per-epoch cosine, or constant.

Both optimizers accept ``step(found_inf=t)``, a 0-dim device tensor that is 1 when the
(fp16) gradients overflowed: the whole update, momentum included, is then skipped by masking
with tensor arithmetic, never by a Python ``if`` on a device value, so it can run inside a
CUDA graph (see :class:`fastsiam.step.LossScaler`).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.sgd import sgd as _torch_sgd_functional

from fastsiam.config import ConfigError, OptimConfig, ScheduleConfig

IMPLS = ("auto", "torch", "foreach", "fused", "apex")


def _as_lr_tensor(lr: float | Tensor, device: torch.device) -> Tensor:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr tensor must have one element, got shape {tuple(lr.shape)}")
        return lr.detach().to(device=device, dtype=torch.float32).reshape(()).clone()
    return torch.tensor(float(lr), dtype=torch.float32, device=device)


class _DeviceLROptimizer(torch.optim.Optimizer):
    """Base: one lr tensor per group on its parameters' device, state kept in place on load.

    ``load_state_dict`` copies the loaded learning rates and momentum buffers *into* the
    existing tensors, because a captured CUDA graph holds their addresses.
    """

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


class SGD(_DeviceLROptimizer):
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
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      fixed_lr=False))

    @torch.no_grad()
    def step(self, closure: Any = None, *, found_inf: Tensor | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = self._collect(group)
            if not params:
                continue
            if self.impl == "fused":
                # The fused kernel reads found_inf on the device and skips the whole update.
                _torch_sgd_functional(
                    params, grads, bufs, fused=True, found_inf=found_inf,
                    weight_decay=group["weight_decay"], momentum=group["momentum"],
                    lr=group["lr"], dampening=0.0, nesterov=False, maximize=False)
                continue
            lr, momentum, wd = _masked_coefficients(
                grads, found_inf, group["lr"], group["momentum"], group["weight_decay"])
            _momentum_update(params, grads, bufs, lr, momentum, wd)
        return loss


class LARS(_DeviceLROptimizer):
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

    @torch.no_grad()
    def step(self, closure: Any = None, *, found_inf: Tensor | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = self._collect(group)
            if not params:
                continue
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
        return loss


# --------------------------------------------------------------------------------------------
# the recipe's parameter groups and the optimizer factory


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def build_param_groups(model: nn.Module, *, weight_decay: float, fix_pred_lr: bool,
                       exclude_1d: bool) -> list[dict[str, Any]]:
    """SimSiam's parameter groups: encoder and predictor, each split by decay.

    Parameters under ``model.predictor`` get ``fixed_lr=fix_pred_lr`` (the official code keeps
    the predictor at the initial lr: "fix_lr" in its groups). With ``exclude_1d`` every 1-D
    parameter (bias, BatchNorm weight) goes to a group with ``weight_decay=0``. Frozen
    parameters (``requires_grad=False``, e.g. a linear-evaluation backbone) are left out, and
    empty groups are dropped. Each group has a ``name`` for logs.
    """
    model = _unwrap(model)
    predictor = getattr(model, "predictor", None)
    pred_ids = {id(p) for p in predictor.parameters()} if isinstance(predictor, nn.Module) else set()
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        key = (id(p) in pred_ids, exclude_1d and p.ndim <= 1)
        buckets.setdefault(key, []).append(p)
    groups = []
    for is_pred in (False, True):
        for no_wd in (False, True):
            params = buckets.get((is_pred, no_wd))
            if not params:
                continue
            name = ("predictor" if is_pred else "encoder") + ("_no_wd" if no_wd else "")
            groups.append({"params": params, "name": name,
                           "weight_decay": 0.0 if no_wd else weight_decay,
                           "fixed_lr": bool(is_pred and fix_pred_lr)})
    if not groups:
        raise ValueError("build_param_groups: the model has no trainable parameters")
    return groups


def resolve_impl(impl: str, device: torch.device | str) -> str:
    """``auto`` -> ``fused`` on CUDA, ``foreach`` elsewhere; other names pass through."""
    if impl not in IMPLS:
        raise ConfigError(f"optim.impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl == "auto":
        return "fused" if torch.device(device).type == "cuda" else "foreach"
    return impl


def build_optimizer(model: nn.Module, optim_cfg: OptimConfig, *, lr: float,
                    device: torch.device | str) -> torch.optim.Optimizer:
    """The optimizer of ``optim_cfg`` over :func:`build_param_groups`, at peak ``lr``.

    ``lr`` is the already batch-scaled peak rate (``optim.lr x global_batch / 256``). With
    fastsiam's SGD and LARS every group's lr is its own 0-dim tensor on ``device``; the other
    implementations keep Python floats. ``optim.impl``:
    ``auto`` (fused on CUDA, foreach elsewhere), ``foreach``, ``fused``, ``torch`` (plain
    ``torch.optim.SGD`` with float lrs, the official recipe and the benchmarks' reference;
    not graph-capturable) or ``apex`` (NVIDIA apex's FusedSGD, only when apex is installed).
    LARS has one implementation (multi-tensor): ``auto`` or ``foreach``.
    """
    device = torch.device(device)
    impl = resolve_impl(optim_cfg.impl, device)
    groups = build_param_groups(model, weight_decay=optim_cfg.weight_decay,
                                fix_pred_lr=optim_cfg.fix_pred_lr,
                                exclude_1d=optim_cfg.exclude_1d_from_wd)
    if optim_cfg.name == "lars":
        if optim_cfg.impl not in ("auto", "foreach"):
            raise ConfigError(f"optim.impl={optim_cfg.impl!r} is not available for LARS; "
                              "use auto or foreach (LARS is multi-tensor only)")
        return LARS(groups, lr=lr, momentum=optim_cfg.momentum,
                    weight_decay=optim_cfg.weight_decay,
                    trust_coefficient=optim_cfg.trust_coefficient,
                    exclude_1d=optim_cfg.exclude_1d_from_wd)
    if optim_cfg.name != "sgd":
        raise ConfigError(f"optim.name must be sgd or lars, got {optim_cfg.name!r}")
    if impl == "torch":
        # Float lrs, which LRSchedule writes as they are: torch.optim.SGD reads a tensor lr
        # with .item() in every step, a host sync on CUDA that the official recipe lacks.
        return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg.momentum,
                               weight_decay=optim_cfg.weight_decay)
    if impl == "apex":
        try:
            fused_sgd = importlib.import_module("apex.optimizers").FusedSGD
        except ImportError:
            raise ConfigError("optim.impl=apex needs NVIDIA apex installed (not found); "
                              "use impl=auto (torch's fused kernel)") from None
        return fused_sgd(groups, lr=lr, momentum=optim_cfg.momentum,
                         weight_decay=optim_cfg.weight_decay)
    return SGD(groups, lr=lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay,
               impl=impl)


# --------------------------------------------------------------------------------------------
# schedules

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
