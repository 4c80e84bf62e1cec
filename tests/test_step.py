"""The training step: eager on the CPU (fp32/bf16, layouts, fp16 scaler logic), graph on CUDA."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastsiam.config import OptimConfig, ScheduleConfig
from fastsiam.data.batch import TwoViewBatch
from fastsiam.model import SimSiam, simsiam_loss, z_std
from fastsiam.optim import SGD, build_optimizer, build_schedule
from fastsiam.step import GraphStep, LossScaler, Step, StepOutput, build_step

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
_DEVICE_CONSTANTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def normalize(batch: TwoViewBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic stand-in for SimSiamAugment: uint8 -> normalized float32.

    The constants are copied to a device once (on the first, eager call): a copy from the host
    inside a captured CUDA graph fails the capture.
    """
    device = batch.views.device
    if device not in _DEVICE_CONSTANTS:
        _DEVICE_CONSTANTS[device] = MEAN.to(device), STD.to(device)
    mean, std = _DEVICE_CONSTANTS[device]
    return ((batch.views.float() - mean) / std).chunk(2)


def make_batch(n: int = 4, size: int = 16, seed: int = 0, device: str = "cpu") -> TwoViewBatch:
    g = torch.Generator().manual_seed(seed)
    views = torch.randint(0, 256, (2 * n, 3, size, size), dtype=torch.uint8, generator=g)
    return TwoViewBatch(views, torch.zeros(n, dtype=torch.long)).to(device)


def make_model(seed: int = 0, device: str = "cpu") -> SimSiam:
    torch.manual_seed(seed)
    return SimSiam("resnet18", dim=64, pred_dim=16, small_input=True).to(device)


def make_optimizer(model: nn.Module, lr: float = 0.05, **kw) -> torch.optim.Optimizer:
    return build_optimizer(model, OptimConfig(**kw), lr=lr, device=next(model.parameters()).device)


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_eager_step_decreases_loss_on_a_fixed_batch(amp: str) -> None:
    model = make_model()
    opt = make_optimizer(model)
    step = build_step(model, opt, normalize, device="cpu", amp=amp)
    batch = make_batch()
    losses = []
    for _ in range(3):
        out = step(batch)
        assert isinstance(out, StepOutput)
        assert out.loss.dim() == 0 and out.z_std.dim() == 0
        assert not out.loss.requires_grad
        losses.append(float(out.loss))
    assert losses[-1] < losses[0] - 0.05, losses
    assert 0.0 < float(out.z_std) < 1.0


def test_step_output_is_the_recipe_loss_and_monitor_and_applies_sgd() -> None:
    model = make_model()
    ref = copy.deepcopy(model)
    opt = make_optimizer(model, lr=0.1, weight_decay=0.0, momentum=0.0, fix_pred_lr=False)
    batch = make_batch()
    out = build_step(model, opt, normalize, device="cpu", amp="none", channels_last=False)(batch)
    p1, p2, z1, z2 = ref(*normalize(batch))
    loss = simsiam_loss(p1, p2, z1, z2)
    loss.backward()
    torch.testing.assert_close(out.loss, loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.z_std, (z_std(z1) + z_std(z2)) / 2, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q - 0.1 * q.grad, rtol=1e-4, atol=1e-5)


def test_channels_last_and_nchw_agree() -> None:
    batch = make_batch()
    results = {}
    for channels_last in (False, True):
        model = make_model()
        opt = make_optimizer(model, lr=0.1)
        step = build_step(model, opt, normalize, device="cpu", amp="none",
                          channels_last=channels_last)
        conv = model.backbone.layer1[0].conv1.weight
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert conv.is_contiguous(memory_format=fmt)
        out = step(batch)
        results[channels_last] = (out.loss, [p.detach().clone() for p in model.parameters()])
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-4, atol=1e-4)
    for a, b in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_graph_mode_falls_back_to_eager_on_cpu_and_fp16_to_fp32() -> None:
    model = make_model()
    opt = make_optimizer(model)
    with pytest.warns(UserWarning, match="train.step=graph needs CUDA"):
        step = build_step(model, opt, normalize, device="cpu", mode="graph")
    assert type(step) is Step and step.mode == "eager"
    with pytest.warns(UserWarning, match="amp=fp16 needs CUDA"):
        step = build_step(model, opt, normalize, device="cpu", amp="fp16")
    assert step.amp == "none" and step.scaler is None
    with pytest.raises(ValueError, match="step mode must be one of eager, graph"):
        build_step(model, opt, normalize, device="cpu", mode="compiled")
    with pytest.raises(ValueError, match="GraphStep needs a CUDA device"):
        GraphStep(model, opt, normalize, device="cpu")


def test_loss_scaler_skips_overflow_and_backs_off_then_grows() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    opt = SGD(lin.parameters(), lr=0.1, momentum=0.9)
    scaler = LossScaler("cpu", init_scale=8.0, growth_interval=2)
    x = torch.randn(5, 4)
    history = []
    for overflow in (True, False, False, False):
        opt.zero_grad()
        before = [p.detach().clone() for p in lin.parameters()]
        loss = lin(x).square().mean()
        scaler.scale_loss(loss).backward()
        expected_grad = lin.weight.grad / 8.0 if not history else None
        if overflow:
            lin.bias.grad[0] = float("inf")
        scaler.unscale_(opt)
        if expected_grad is not None and not overflow:
            torch.testing.assert_close(lin.weight.grad, expected_grad)
        opt.step(found_inf=scaler.found_inf)
        scaler.update()
        changed = any(not torch.equal(p, b) for p, b in zip(lin.parameters(), before))
        history.append((float(scaler.found_inf), float(scaler.scale), changed))
    assert history == [(1.0, 4.0, False), (0.0, 4.0, True), (0.0, 8.0, True), (0.0, 8.0, True)]
    state = scaler.state_dict()
    other = LossScaler("cpu")
    other.load_state_dict(state)
    assert other.state_dict() == state == {"scale": 8.0, "growth_tracker": 1}


def test_fp16_needs_fastsiam_optimizer_and_step_state_roundtrip() -> None:
    model = make_model()
    torch_sgd = make_optimizer(model, impl="torch")
    step = build_step(model, torch_sgd, normalize, device="cpu", amp="bf16")
    assert step.state_dict() == {}
    step.load_state_dict({})
    with pytest.raises(ValueError, match="amp=fp16 needs fastsiam's SGD or LARS"):
        _fp16_step_on_fake_cuda(model, torch_sgd)


def _fp16_step_on_fake_cuda(model: nn.Module, optimizer: torch.optim.Optimizer) -> Step:
    """Build an fp16 Step as on CUDA (fp16 is refused on the CPU before the optimizer check)."""
    import fastsiam.step as step_mod

    original = step_mod._resolve_amp
    step_mod._resolve_amp = lambda amp, device: amp
    try:
        return Step(model, optimizer, normalize, device="cpu", amp="fp16")
    finally:
        step_mod._resolve_amp = original


def test_step_calls_the_ddp_wrapped_forward(tmp_path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        batch = make_batch()
        plain = make_model().to(memory_format=torch.channels_last)
        wrapped = nn.parallel.DistributedDataParallel(
            make_model().to(memory_format=torch.channels_last))
        outs = []
        for model in (plain, wrapped):
            step = build_step(model, make_optimizer(model), normalize, device="cpu", amp="none")
            outs.append(step(batch))
        torch.testing.assert_close(outs[1].loss, outs[0].loss)
        for p, q in zip(wrapped.module.parameters(), plain.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="before wrapping it in DistributedDataParallel"):
            build_step(wrapped, make_optimizer(wrapped), normalize, device="cpu",
                       channels_last=False)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# CUDA: the captured step


@pytest.fixture
def deterministic_cudnn():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def _cuda_pair(amp: str = "none"):
    models = [make_model(device="cuda") for _ in range(2)]
    opts = [make_optimizer(m, lr=0.05) for m in models]
    steps = [build_step(m, o, normalize, device="cuda", amp=amp, mode=mode)
             for m, o, mode in zip(models, opts, ("eager", "graph"))]
    return models, opts, steps


def _assert_models_close(a: nn.Module, b: nn.Module, rtol: float, atol: float) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.cuda
@pytest.mark.usefixtures("deterministic_cudnn")
def test_cuda_graph_replay_equals_eager_fp32() -> None:
    models, opts, steps = _cuda_pair("none")
    assert isinstance(steps[1], GraphStep)
    schedules = [build_schedule(ScheduleConfig(), o, base_lr=0.05, epochs=1, steps_per_epoch=4)
                 for o in opts]
    for i in range(4):
        batch = make_batch(seed=i, device="cuda")
        outs = []
        for schedule, step in zip(schedules, steps):
            schedule.set(i)
            outs.append(step(batch))
        torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(outs[1].z_std, outs[0].z_std, rtol=1e-6, atol=1e-6)
    # weights, BatchNorm running statistics and num_batches_tracked (4 steps x 2 views)
    _assert_models_close(models[0], models[1], rtol=1e-6, atol=1e-7)
    assert int(models[1].backbone.bn1.num_batches_tracked) == 8


@pytest.mark.cuda
def test_cuda_graph_follows_lr_tensor_and_has_no_host_sync() -> None:
    model = make_model(device="cuda")
    opt = make_optimizer(model, lr=0.05, fix_pred_lr=False, weight_decay=0.0)
    schedule = build_schedule(ScheduleConfig(name="constant"), opt, base_lr=0.05, epochs=1,
                              steps_per_epoch=10)
    step = build_step(model, opt, normalize, device="cuda", amp="bf16", mode="graph")
    batch = make_batch(device="cuda")
    step(batch)  # capture (host syncs allowed) and the first replay
    torch.cuda.synchronize()
    for group in opt.param_groups:
        group["lr"].zero_()
    for p in model.parameters():
        opt.state[p]["momentum_buffer"].zero_()
    before = [p.detach().clone() for p in model.parameters()]
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step(batch)
        after_zero_lr = [p.detach().clone() for p in model.parameters()]
        schedule.set(0)
        out2 = step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss) and torch.isfinite(out2.loss)
    assert all(torch.equal(a, b) for a, b in zip(after_zero_lr, before))
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.cuda
def test_cuda_graph_fp16_scaler_skips_overflow_inside_the_graph() -> None:
    model = make_model(device="cuda")
    opt = make_optimizer(model, lr=0.05)
    step = build_step(model, opt, normalize, device="cuda", amp="fp16", mode="graph")
    step.scaler.scale.fill_(2.0**40)  # the scaled fp16 gradients overflow
    batch = make_batch(device="cuda")
    before = [p.detach().clone() for p in model.parameters()]
    step(batch)
    assert float(step.scaler.found_inf) == 1.0 and float(step.scaler.scale) == 2.0**39
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    step.load_state_dict({"scaler": {"scale": 1024.0, "growth_tracker": 0}})
    step(batch)
    assert float(step.scaler.found_inf) == 0.0
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert step.state_dict() == {"scaler": {"scale": 1024.0, "growth_tracker": 1}}


@pytest.mark.cuda
def test_cuda_graph_short_batch_runs_eagerly() -> None:
    model = make_model(device="cuda")
    step = build_step(model, make_optimizer(model), normalize, device="cuda", mode="graph")
    step(make_batch(n=4, device="cuda"))
    with pytest.warns(UserWarning, match="running it eagerly"):
        out = step(make_batch(n=3, device="cuda"))
    assert torch.isfinite(out.loss)


def test_step_benchmark_smoke_writes_rows(tmp_path) -> None:
    import json
    import os

    from benchmarks.step import main

    args = ["--smoke", "--device", "cpu", "--batch-size", "2", "--image-size", "32", "--iters", "1",
            "--repeats", "1", "--warmup", "0", "--dim", "64", "--pred-dim", "16", "--concat",
            "--out", str(tmp_path)]
    assert main(args) == 0
    report = json.loads((tmp_path / f"step-cpu{os.cpu_count()}.json").read_text())
    names = [r["variant"] for r in report["rows"]]
    assert names[:4] == ["reference", "+channels_last", "+bf16", "+fused_optimizer"]
    assert report["baseline"] == "reference" and report["settings"]["skipped"]["+cuda_graph"]
    ref, fused = report["rows"][0], report["rows"][3]
    assert ref["optimizer"] == "torch.SGD" and fused["optimizer"] == "fastsiam.SGD(foreach)"
    assert all(r["items_per_s"] > 0 and r["tflops"] > 0 for r in report["rows"])
