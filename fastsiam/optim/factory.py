"""The SimSiam recipe's parameter groups and the optimizer factory: ``optim.name`` and
``optim.impl`` -> an optimizer and its :class:`~fastsiam.optim.base.OptimizerInfo`."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from fastsiam.config import ConfigError, OptimConfig
from fastsiam.optim.lars import LARS
from fastsiam.optim.sgd import SGD

IMPLS = ("auto", "torch", "foreach", "fused", "apex")


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


def resolve_impl(impl: str, device: torch.device | str, available: Iterable[str] = IMPLS) -> str:
    """``auto`` -> ``fused`` on CUDA where the optimizer has it (``available``), else
    ``foreach``; other names pass through."""
    if impl not in IMPLS:
        raise ConfigError(f"optim.impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl == "auto":
        return "fused" if torch.device(device).type == "cuda" and "fused" in available else "foreach"
    return impl


def _sgd(impl: str) -> Any:
    def build(groups: list[dict[str, Any]], lr: float, cfg: OptimConfig) -> torch.optim.Optimizer:
        return SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, impl=impl)
    return build


def _torch_sgd(groups: list[dict[str, Any]], lr: float, cfg: OptimConfig) -> torch.optim.Optimizer:
    # Float lrs, which LRSchedule writes as they are: torch.optim.SGD reads a tensor lr with
    # .item() in every step, a host sync on CUDA that the official recipe lacks.
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _apex_sgd(groups: list[dict[str, Any]], lr: float, cfg: OptimConfig) -> torch.optim.Optimizer:
    try:
        fused_sgd = importlib.import_module("apex.optimizers").FusedSGD
    except ImportError:
        raise ConfigError("optim.impl=apex needs NVIDIA apex installed (not found); "
                          "use impl=auto (torch's fused kernel)") from None
    return fused_sgd(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _lars(groups: list[dict[str, Any]], lr: float, cfg: OptimConfig) -> torch.optim.Optimizer:
    return LARS(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                trust_coefficient=cfg.trust_coefficient, exclude_1d=cfg.exclude_1d_from_wd)


# optim.name -> resolved optim.impl -> builder(groups, lr, cfg): the one place an optimizer is
# added. What each built optimizer can do is its optimizer_info (fastsiam's own say; any
# other, torch's or apex's, can do none of it).
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "sgd": {"foreach": _sgd("foreach"), "fused": _sgd("fused"), "torch": _torch_sgd,
            "apex": _apex_sgd},
    "lars": {"foreach": _lars},
}


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
    impls = OPTIMIZERS.get(optim_cfg.name)
    if impls is None:
        raise ConfigError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {optim_cfg.name!r}")
    impl = resolve_impl(optim_cfg.impl, device, impls)
    if impl not in impls:
        raise ConfigError(f"optim.impl={optim_cfg.impl!r} is not available for "
                          f"{optim_cfg.name.upper()}; use auto or {' or '.join(impls)}")
    groups = build_param_groups(model, weight_decay=optim_cfg.weight_decay,
                                fix_pred_lr=optim_cfg.fix_pred_lr,
                                exclude_1d=optim_cfg.exclude_1d_from_wd)
    return impls[impl](groups, lr, optim_cfg)
