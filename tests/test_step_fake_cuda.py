"""The training step on fake CUDA: the captured region and each replay make no host traffic.

Runs :class:`fastsiam.step.GraphStep` (and the eager :class:`~fastsiam.step.Step`) unchanged on
fake CUDA tensors (:mod:`fastsiam.testing.fake_cuda`): warm-up, capture, replay. Inside the
region captured as a CUDA graph - augmentation of the views, autocast forward, loss, z-std,
backward, fp16 loss scaling, the optimizer update - there must be no host<->device copy and no
host synchronization (either fails the capture on a GPU, or bakes a stale value into every
replay). Between replays (``LRSchedule.set``, the one copy into the static input, the replay) the
same holds, so the host never waits for the GPU inside the loop.

torch's fused SGD kernel has no fake kernel in torch 2.14 (it asks for a driver): the trace
records it as one opaque kernel (``fastsiam.testing.fake_cuda.OPAQUE_OPS``) and the rest of the
region is traced as usual; ``tests/test_step.py``'s ``@pytest.mark.cuda`` tests run it for real.
"""

from __future__ import annotations

import pytest
import torch

from fastsiam.augment import DRAW_COLUMNS, SimSiamAugment
from fastsiam.config import OptimConfig, ScheduleConfig
from fastsiam.data.batch import TwoViewBatch
from fastsiam.model import SimSiam
from fastsiam.optim import build_optimizer, build_schedule
from fastsiam.probe import OnlineProbe
from fastsiam.step import GraphStep, Step, build_step
from fastsiam.testing.fake_cuda import CAPTURE, DeviceTrace, fake_cuda

OUT_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": torch.float32}


def _views(n: int, size: int, floating: bool, channels_last: bool, draws: bool = False) -> TwoViewBatch:
    """Loader output on the device: uint8 crops, or the PIL reference's normalized floats; with
    ``draws``, the augmentation's per-view uniforms as the pil/ffcv/nvjpeg loaders carry them."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dtype = torch.float32 if floating else torch.uint8
    views = torch.empty((2 * n, 3, size, size), dtype=dtype, device="cuda", memory_format=fmt)
    carried = torch.empty((2 * n, DRAW_COLUMNS), device="cuda") if draws else None
    return TwoViewBatch(views, torch.empty(n, dtype=torch.long, device="cuda"), carried)


def _run_step(*, mode: str = "graph", amp: str = "bf16", channels_last: bool = True,
              floating: bool = False, optimizer: str = "sgd", impl: str = "foreach",
              skip_nonfinite: bool = False, backbone: str = "resnet18", size: int = 16,
              n: int = 4, draws: bool = False, probe: bool = False) -> tuple[DeviceTrace, Step]:
    with fake_cuda(callers=probe) as trace:
        model = SimSiam(backbone, dim=64, pred_dim=16, small_input=backbone == "resnet18")
        model.to("cuda")
        online = OnlineProbe(model.feat_dim, 10, device="cuda", lr=0.1) if probe else None
        opt = build_optimizer(model, OptimConfig(name=optimizer, impl=impl), lr=0.05, device="cuda")
        schedule = build_schedule(ScheduleConfig(), opt, base_lr=0.05, epochs=1, steps_per_epoch=10)
        augment = SimSiamAugment(out_dtype=OUT_DTYPE[amp], channels_last=channels_last)
        step = build_step(model, opt, augment, device="cuda", amp=amp, channels_last=channels_last,
                          mode=mode, skip_nonfinite=skip_nonfinite, probe=online)
        batch = _views(n, size, floating, channels_last, draws)
        schedule.set(0)
        step(batch)  # graph: warm-up, capture, first replay
        for i in (1, 2):
            with trace.region(f"step {i}"):
                schedule.set(i)
                step(_views(n, size, floating, channels_last, draws))
    return trace, step


@pytest.mark.parametrize("floating", [False, True], ids=["uint8_views", "float_views"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("amp", ["bf16", "fp16", "none"])
def test_graph_capture_and_replay_have_no_host_traffic(amp: str, channels_last: bool,
                                                       floating: bool) -> None:
    trace, step = _run_step(amp=amp, channels_last=channels_last, floating=floating)
    assert isinstance(step, GraphStep) and step.graph is not None
    trace.assert_clean(CAPTURE)
    # Every stage of the step ran inside the capture: a few hundred kernels for ResNet-18.
    names = {op.name for op in trace.select(CAPTURE, "kernel")}
    assert "aten.convolution_backward.default" in names
    assert "aten._foreach_add_.List" in names or "aten._foreach_add_.Scalar" in names
    if not floating:
        assert "aten.rand.generator" in names  # the augmentation's draws are captured too
    if amp == "fp16":
        assert "aten._amp_foreach_non_finite_check_and_unscale_.default" in names
        assert "aten._amp_update_scale_.default" in names
    for i in (1, 2):
        trace.assert_clean(f"step {i}")
        # lr fills, one copy of the batch (both views) into the static buffer, one replay, two
        # output clones
        assert trace.counts(f"step {i}")["launch"] == 1
        kernels = [op.name for op in trace.select(f"step {i}", "kernel")]
        assert [k for k in kernels if k.startswith("aten.copy")] == ["aten.copy_.default"], kernels


@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_the_online_probe_is_captured_with_its_labels_a_static_input(skip_nonfinite: bool) -> None:
    """The probe inside the captured step: no host traffic, its head's GEMMs, cross-entropy
    and SGD update in the graph, its labels copied into the static batch by each replay
    (with the views); the kernels it adds, counted: 10 (its forward, backward and fused SGD
    update) against the step's 709 at this size."""
    trace, step = _run_step(probe=True, skip_nonfinite=skip_nonfinite)
    plain, _ = _run_step(skip_nonfinite=skip_nonfinite)
    trace.assert_clean(CAPTURE)
    probe_ops = [op for op in trace.select(CAPTURE, "kernel") if "probe.py" in (op.where or "")]
    names = {op.name for op in probe_ops}
    assert {"aten.addmm.default", "aten._log_softmax.default", "aten.nll_loss_forward.default"} <= names, names
    added = trace.kernels(CAPTURE) - plain.kernels(CAPTURE)
    assert 0 < added <= 20, (added, plain.kernels(CAPTURE))
    for i in (1, 2):
        trace.assert_clean(f"step {i}")
        copies = [op for op in trace.select(f"step {i}", "kernel") if op.name.startswith("aten.copy")]
        assert len(copies) == 2  # the views and the labels
    assert step.probe is not None and step._static.label.shape == (4,)


def test_carried_draws_are_a_static_input_of_the_graph() -> None:
    """Batches that carry the augmentation's draws: the graph reads them from its static
    buffer (no device RNG inside it), and each replay copies the views and the draws in."""
    trace, _ = _run_step(draws=True)
    trace.assert_clean(CAPTURE)
    names = {op.name for op in trace.select(CAPTURE, "kernel")}
    assert "aten.convolution_backward.default" in names and "aten.rand.generator" not in names
    for i in (1, 2):
        trace.assert_clean(f"step {i}")
        copies = [op for op in trace.select(f"step {i}", "kernel") if op.name.startswith("aten.copy")]
        # the counter's copy_: the source read, the destination read and written (n=4, 16 px)
        assert [op.nbytes for op in copies] == [3 * (2 * 4 * 3 * 16 * 16), 3 * (2 * 4 * DRAW_COLUMNS * 4)]


@pytest.mark.parametrize(("optimizer", "impl", "skip_nonfinite"), [
    ("sgd", "foreach", False), ("sgd", "foreach", True),
    ("sgd", "fused", False), ("sgd", "fused", True),
    ("lars", "foreach", False), ("lars", "foreach", True),
])
def test_every_optimizer_captures_with_and_without_found_inf(optimizer: str, impl: str,
                                                             skip_nonfinite: bool) -> None:
    trace, _ = _run_step(optimizer=optimizer, impl=impl, skip_nonfinite=skip_nonfinite)
    trace.assert_clean(CAPTURE)
    names = [op.name for op in trace.select(CAPTURE, "kernel")]
    if impl == "fused":
        # No fake kernel: recorded opaque; once per parameter group.
        assert sum(n.startswith("aten._fused_sgd_") for n in names) >= 2
    if skip_nonfinite:  # the loss's finiteness becomes found_inf on the device
        assert "aten.bitwise_not.default" in names
        if impl != "fused":
            assert any(n.startswith("aten.masked_fill_") for n in names)  # the masked update


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_eager_step_has_no_host_sync(amp: str) -> None:
    trace, step = _run_step(mode="eager", amp=amp)
    assert type(step) is Step
    for i in (1, 2):
        trace.assert_clean(f"step {i}")


def test_headline_step_resnet50_224_batch_256() -> None:
    """The configuration the benchmarks report (ResNet-50, 2 x 256 views at 224 px, bf16,
    channels_last, fused SGD, graph): clean, and its kernel count and traffic stated."""
    trace, _ = _run_step(backbone="resnet50", size=224, n=256, impl="fused")
    trace.assert_clean(CAPTURE)
    kernels, gigabytes = trace.kernels(CAPTURE), trace.nbytes(CAPTURE) / 1e9
    # Bounds of the traffic model, loose enough for other torch versions' decompositions.
    assert 1000 < kernels < 4000, trace.summary(CAPTURE)
    assert 50 < gigabytes < 400, trace.summary(CAPTURE)


def test_the_cuda_tests_stand_in_augmentation_captures() -> None:
    """tests/test_step.py's ``normalize`` (the stand-in augmentation of its four GraphStep
    CUDA tests) runs inside the captured region too."""
    from tests.test_step import make_batch, make_model, make_optimizer, normalize

    with fake_cuda() as trace:
        model = make_model(device="cuda")
        step = build_step(model, make_optimizer(model), normalize, device="cuda", amp="bf16",
                          mode="graph")
        step(make_batch(device="cuda"))
    trace.assert_clean(CAPTURE)


def test_step_with_sync_batchnorm_captures_its_collectives() -> None:
    """fastsiam's SyncBatchNorm (two processes, on torch's fake process group) inside the
    captured step: no host sync, and one all-reduce per BatchNorm layer and view each way.
    torch's own SyncBatchNorm cannot be traced here (its CUDA kernels have no fake kernels); it
    masks ``count_all`` on the host in every layer (114 syncs for these two views)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from fastsiam.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        with fake_cuda() as trace:
            model = convert_sync_batchnorm(SimSiam("resnet50", dim=64, pred_dim=16))
            model.to("cuda", memory_format=torch.channels_last)
            layers = sum(isinstance(m, SyncBatchNorm) for m in model.modules())
            opt = build_optimizer(model, OptimConfig(impl="foreach"), lr=0.05, device="cuda")
            augment = SimSiamAugment(out_dtype=torch.bfloat16)
            step = build_step(model, opt, augment, device="cuda", amp="bf16", mode="graph")
            step(_views(4, 32, floating=False, channels_last=True))
    finally:
        dist.destroy_process_group()
    trace.assert_clean(CAPTURE)
    reduces = [op for op in trace.select(CAPTURE) if op.name.startswith("c10d.allreduce_")]
    assert layers == 57 and len(reduces) == 2 * 2 * layers  # forward + backward, two views
