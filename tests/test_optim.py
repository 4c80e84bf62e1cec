"""fastsiam.optim against independent references: torch.optim.SGD and a per-parameter LARS."""

from __future__ import annotations

import copy
import math
import sys
import types

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastsiam.config import ConfigError, OptimConfig, ScheduleConfig
from fastsiam.model import SimSiam
from fastsiam.optim import (
    LARS,
    SGD,
    LRSchedule,
    build_optimizer,
    build_param_groups,
    build_schedule,
)


class Tiny(nn.Module):
    """4-D, 2-D and 1-D parameters, BatchNorm, and a ``predictor`` like SimSiam's."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(4, 8))
        self.predictor = nn.Sequential(nn.Linear(8, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(),
                                       nn.Linear(6, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.backbone(x))


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(6, 3, 7, 7, generator=g)
    target = torch.randn(6, 8, generator=g)
    return ((model(x) - target) ** 2).mean()


def _shared_grads(ref: nn.Module, ours: nn.Module, step: int) -> None:
    """The reference's gradients, copied to ``ours``: the optimizers then see the same
    sequence of gradients, so the comparison measures their arithmetic alone (training
    dynamics would amplify single-ulp differences between mathematically equal updates)."""
    ref.zero_grad()
    _loss(ref, step).backward()
    for p, q in zip(ours.parameters(), ref.parameters()):
        p.grad = q.grad.clone()


def _assert_params_close(a: nn.Module, b: nn.Module, rtol: float = 1e-6, atol: float = 1e-7) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def _lr_at(step: int) -> float:
    return 0.1 * (1 + math.cos(math.pi * step / 20)) / 2 + 0.01  # changes every step


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_sgd_equals_torch_sgd_over_20_steps(impl: str) -> None:
    torch.manual_seed(0)
    ours_model = Tiny()
    ref_model = copy.deepcopy(ours_model)
    groups = build_param_groups(ours_model, weight_decay=1e-2, fix_pred_lr=True, exclude_1d=True)
    ours = SGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-2, impl=impl)
    ref_groups = build_param_groups(ref_model, weight_decay=1e-2, fix_pred_lr=True, exclude_1d=True)
    ref = torch.optim.SGD(ref_groups, lr=0.1, momentum=0.9, weight_decay=1e-2)
    schedule = LRSchedule(ours, name="constant", base_lr=0.1, epochs=1, steps_per_epoch=20)
    for step in range(20):
        for group in ours.param_groups:
            if not group["fixed_lr"]:
                group["lr"].fill_(_lr_at(step))
        for group in ref.param_groups:
            group["lr"] = 0.1 if group["fixed_lr"] else _lr_at(step)
        _shared_grads(ref_model, ours_model, step)
        ours.step()
        ref.step()
    assert schedule.base_lr == 0.1
    _assert_params_close(ours_model, ref_model)
    moved = sum((p - q).abs().sum() for p, q in zip(ours_model.parameters(), Tiny().parameters()))
    assert moved > 0


def _reference_lars(params: list[nn.Parameter], bufs: dict[int, torch.Tensor], *, lr: float,
                    momentum: float, wd: float, eta: float, exclude_1d: bool) -> None:
    """The formula of issue 6, one parameter at a time, in float64 Python control flow."""
    with torch.no_grad():
        for p in params:
            g = p.grad
            if exclude_1d and p.ndim <= 1:
                d = g.clone()
            else:
                w_norm, g_norm = p.norm().item(), g.norm().item()
                q = eta * w_norm / (g_norm + wd * w_norm) if w_norm > 0 and g_norm > 0 else 1.0
                d = (g + wd * p) * q
            v = bufs.setdefault(id(p), torch.zeros_like(p))
            v.mul_(momentum).add_(d)
            p.sub_(lr * v)


@pytest.mark.parametrize("exclude_1d", [True, False])
def test_lars_equals_per_parameter_reference_over_20_steps(exclude_1d: bool) -> None:
    torch.manual_seed(0)
    ours_model = Tiny()
    with torch.no_grad():
        ours_model.backbone[5].weight.zero_()  # ‖w‖ = 0 for a while: the q = 1 branch
    ref_model = copy.deepcopy(ours_model)
    ours = LARS(ours_model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3,
                trust_coefficient=0.02, exclude_1d=exclude_1d)
    bufs: dict[int, torch.Tensor] = {}
    for step in range(20):
        ours.param_groups[0]["lr"].fill_(_lr_at(step) * 5)
        _shared_grads(ref_model, ours_model, step)
        ours.step()
        _reference_lars(list(ref_model.parameters()), bufs, lr=_lr_at(step) * 5, momentum=0.9,
                        wd=1e-3, eta=0.02, exclude_1d=exclude_1d)
    _assert_params_close(ours_model, ref_model)
    assert ours_model.backbone[5].weight.abs().sum() > 0


@pytest.mark.parametrize("make", [
    lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2, impl="foreach"),
    lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2, impl="fused"),
    lambda ps: LARS(ps, lr=0.1, momentum=0.9, weight_decay=1e-2, exclude_1d=True),
], ids=["sgd-foreach", "sgd-fused", "lars"])
def test_found_inf_skips_the_whole_update_by_masking(make) -> None:
    torch.manual_seed(0)
    model = Tiny()
    opt = make(model.parameters())
    for step, found in enumerate([0.0, 1.0, 0.0]):
        opt.zero_grad()
        _loss(model, step).backward()
        before = [p.detach().clone() for p in model.parameters()]
        bufs = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()
                if "momentum_buffer" in opt.state[p]]
        if found:
            model.backbone[0].weight.grad[0, 0, 0, 0] = float("inf")
            model.predictor[3].bias.grad[0] = float("nan")
        opt.step(found_inf=torch.tensor(found))
        after = list(model.parameters())
        if found:
            assert all(torch.equal(a, b) for a, b in zip(after, before))
            now = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
            assert all(torch.equal(a, b) for a, b in zip(now, bufs))
        else:
            assert all(torch.isfinite(a).all() for a in after)
            assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_param_groups_predictor_fixed_and_1d_excluded() -> None:
    model = SimSiam("resnet18", dim=64, pred_dim=16, small_input=True)
    model.backbone.conv1.weight.requires_grad_(False)
    groups = {g["name"]: g for g in build_param_groups(
        model, weight_decay=1e-4, fix_pred_lr=True, exclude_1d=True)}
    assert list(groups) == ["encoder", "encoder_no_wd", "predictor", "predictor_no_wd"]
    pred_ids = {id(p) for p in model.predictor.parameters()}
    for name, g in groups.items():
        assert g["fixed_lr"] == name.startswith("predictor")
        assert all((id(p) in pred_ids) == name.startswith("predictor") for p in g["params"])
        assert all((p.ndim <= 1) == name.endswith("no_wd") for p in g["params"])
        assert g["weight_decay"] == (0.0 if name.endswith("no_wd") else 1e-4)
    n_groups = sum(len(g["params"]) for g in groups.values())
    assert n_groups == len(list(model.parameters())) - 1  # the frozen conv1 is left out
    plain = build_param_groups(nn.DataParallel(model), weight_decay=1e-4, fix_pred_lr=False,
                               exclude_1d=False)
    assert [g["name"] for g in plain] == ["encoder", "predictor"]
    assert not any(g["fixed_lr"] for g in plain)


def test_build_optimizer_lr_tensors_impls_and_errors() -> None:
    model = Tiny()
    opt = build_optimizer(model, OptimConfig(), lr=0.2, device="cpu")
    assert isinstance(opt, SGD) and opt.impl == "foreach"
    lrs = [g["lr"] for g in opt.param_groups]
    assert all(t.dim() == 0 and t.dtype == torch.float32 and float(t) == pytest.approx(0.2) for t in lrs)
    assert len({id(t) for t in lrs}) == len(lrs)  # one tensor per group
    assert isinstance(build_optimizer(model, OptimConfig(impl="torch"), lr=0.2, device="cpu"),
                      torch.optim.SGD)
    assert isinstance(build_optimizer(model, OptimConfig(name="lars"), lr=0.2, device="cpu"), LARS)
    with pytest.raises(ConfigError, match=r"optim\.impl='torch' is not available for LARS"):
        build_optimizer(model, OptimConfig(name="lars", impl="torch"), lr=0.2, device="cpu")
    if "apex" not in sys.modules:
        with pytest.raises(ConfigError, match=r"optim\.impl=apex needs NVIDIA apex"):
            build_optimizer(model, OptimConfig(impl="apex"), lr=0.2, device="cpu")


def test_apex_impl_builds_fused_sgd_with_the_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {}

    class FakeFusedSGD(torch.optim.SGD):
        def __init__(self, params, **kw):
            calls.update(kw)
            super().__init__(params, **kw)

    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))
    monkeypatch.setitem(sys.modules, "apex.optimizers",
                        types.SimpleNamespace(FusedSGD=FakeFusedSGD))
    opt = build_optimizer(Tiny(), OptimConfig(impl="apex", momentum=0.8, weight_decay=3e-4),
                          lr=0.3, device="cpu")
    assert isinstance(opt, FakeFusedSGD)
    assert calls == {"lr": 0.3, "momentum": 0.8, "weight_decay": 3e-4}
    assert [g["name"] for g in opt.param_groups] == ["encoder", "predictor"]


def test_schedules_hand_computed() -> None:
    opt = build_optimizer(Tiny(), OptimConfig(), lr=1.0, device="cpu")
    enc, pred = opt.param_groups
    enc_lr = enc["lr"]
    cos = build_schedule(ScheduleConfig(name="cosine", warmup_epochs=1, min_lr=0.1), opt,
                         base_lr=1.0, epochs=5, steps_per_epoch=4)
    assert cos.lr_at(0) == pytest.approx(0.25)           # warm-up: (step+1)/4
    assert cos.lr_at(3) == pytest.approx(1.0)
    assert cos.lr_at(4) == pytest.approx(1.0)            # cosine starts at the peak
    assert cos.lr_at(12) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert cos.lr_at(100) == pytest.approx(0.1)
    cos.set(12)
    assert enc["lr"] is enc_lr and float(enc_lr) == pytest.approx(cos.lr_at(12))
    assert float(pred["lr"]) == pytest.approx(1.0)       # fixed group keeps base_lr
    official = build_schedule(ScheduleConfig(name="cosine_epoch"), opt, base_lr=1.0, epochs=5,
                              steps_per_epoch=4)
    for step in (0, 3, 4, 11, 19):
        epoch = step // 4
        assert official.lr_at(step) == pytest.approx(0.5 * (1 + math.cos(math.pi * epoch / 5)))
    const = build_schedule(ScheduleConfig(name="constant"), opt, base_lr=0.7, epochs=5,
                           steps_per_epoch=4)
    assert const.lr_at(0) == const.lr_at(19) == 0.7
    with pytest.raises(ConfigError, match=r"schedule\.warmup_epochs"):
        build_schedule(ScheduleConfig(warmup_epochs=5), opt, base_lr=1.0, epochs=5, steps_per_epoch=4)


def test_schedule_drives_plain_torch_sgd_too() -> None:
    opt = build_optimizer(Tiny(), OptimConfig(impl="torch", fix_pred_lr=False), lr=1.0, device="cpu")
    schedule = build_schedule(ScheduleConfig(name="cosine"), opt, base_lr=1.0, epochs=2,
                              steps_per_epoch=2)
    schedule.set(2)
    assert all(float(g["lr"]) == pytest.approx(0.5) for g in opt.param_groups)


class _OpRecorder(TorchDispatchMode):
    """Every aten op dispatched inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def _host_reads_in_one_step(opt: torch.optim.Optimizer, model: nn.Module) -> int:
    """``aten._local_scalar_dense`` calls (``.item()``: a host sync on CUDA) in one step."""
    for step in range(2):  # the second step's count: the first one creates the momentum buffers
        model.zero_grad()
        _loss(model, step).backward()
        with _OpRecorder() as rec:
            opt.step()
    return sum(op is torch.ops.aten._local_scalar_dense.default for op in rec.ops)


def test_torch_impl_keeps_float_lrs_and_steps_without_reading_the_host() -> None:
    model = Tiny()
    opt = build_optimizer(model, OptimConfig(impl="torch"), lr=0.2, device="cpu")
    assert all(type(g["lr"]) is float and g["lr"] == 0.2 for g in opt.param_groups)
    schedule = build_schedule(ScheduleConfig(name="cosine"), opt, base_lr=0.2, epochs=2,
                              steps_per_epoch=2)
    schedule.set(2)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["encoder"] == pytest.approx(0.1) and lrs["predictor"] == 0.2  # fix_pred_lr
    assert all(type(lr) is float for lr in lrs.values())
    assert _host_reads_in_one_step(opt, model) == 0
    # The contrast: torch.optim.SGD with tensor lrs reads them back in every step.
    tensor_lr = Tiny()
    groups = build_param_groups(tensor_lr, weight_decay=1e-4, fix_pred_lr=True, exclude_1d=True)
    for g in groups:
        g["lr"] = torch.tensor(0.2)
    assert _host_reads_in_one_step(torch.optim.SGD(groups, lr=0.2, momentum=0.9), tensor_lr) > 0


def test_load_state_dict_copies_into_existing_tensors() -> None:
    torch.manual_seed(0)
    model = Tiny()
    opt = build_optimizer(model, OptimConfig(name="sgd"), lr=0.1, device="cpu")
    _loss(model, 0).backward()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    lr_tensors = [g["lr"] for g in opt.param_groups]
    bufs = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
    saved["param_groups"][0]["lr"] = torch.tensor(0.03)
    for s in saved["state"].values():
        s["momentum_buffer"] = s["momentum_buffer"] + 1
    expect = [b + 1 for b in bufs]
    opt.load_state_dict(saved)
    assert [g["lr"] for g in opt.param_groups] == lr_tensors  # same objects
    assert float(lr_tensors[0]) == pytest.approx(0.03)
    for p, b, e in zip(model.parameters(), bufs, expect):
        assert opt.state[p]["momentum_buffer"] is b
        torch.testing.assert_close(b, e)


@pytest.mark.cuda
def test_cuda_fused_sgd_lr_tensor_on_device_no_sync() -> None:
    torch.manual_seed(0)
    model = Tiny().cuda()
    ref_model = copy.deepcopy(model)
    opt = build_optimizer(model, OptimConfig(fix_pred_lr=False), lr=0.1, device="cuda")
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert opt.impl == "fused" and all(g["lr"].is_cuda for g in opt.param_groups)
    schedule = build_schedule(ScheduleConfig(), opt, base_lr=0.1, epochs=1, steps_per_epoch=5)
    x = torch.randn(6, 3, 7, 7, device="cuda")
    for step in range(5):
        for g in ref.param_groups:
            g["lr"] = schedule.lr_at(step)
        ref.zero_grad()
        ref_model(x).square().mean().backward()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            p.grad = q.grad.clone()
        torch.cuda.set_sync_debug_mode("error")
        try:
            schedule.set(step)
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ref.step()
    _assert_params_close(model, ref_model)


@pytest.mark.cuda
def test_cuda_lars_and_masked_sgd_have_no_host_sync() -> None:
    model = Tiny().cuda()
    x = torch.randn(6, 3, 7, 7, device="cuda")
    for opt in (LARS(model.parameters(), lr=0.1, weight_decay=1e-4),
                SGD(model.parameters(), lr=0.1, impl="foreach")):
        model.zero_grad()
        model(x).square().mean().backward()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
            opt.step(found_inf=torch.zeros((), device="cuda"))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_optimizer_table_is_the_configs_vocabulary_and_says_what_each_can_do():
    import dataclasses

    from fastsiam.optim import IMPLS, OPTIMIZERS, optimizer_info

    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(OptimConfig)}
    assert list(OPTIMIZERS) == choices["name"] and tuple(choices["impl"]) == IMPLS
    assert all(set(impls) <= set(IMPLS) - {"auto"} for impls in OPTIMIZERS.values())
    model = Tiny()
    for name, impl, capable in [("sgd", "foreach", True), ("sgd", "torch", False), ("lars", "auto", True)]:
        opt = build_optimizer(model, OptimConfig(name=name, impl=impl), lr=0.1, device="cpu")
        info = optimizer_info(opt)
        assert (info.takes_found_inf, info.graph_safe) == (capable, capable), info
    assert optimizer_info(torch.optim.Adam(model.parameters())).name == "Adam"
