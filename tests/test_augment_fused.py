"""The fused ColorJitter kernels (fastsiam.augment.fused): their C++ source compiled on the host
and run against the plain ops and torchvision, the schedule that calls them, the check that
guards them, their fake-CUDA traffic, and (with a GPU) the jiterator kernels themselves."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
import torch
from test_augment import RECIPES, TOL_HUE, all_orders_params, images, reference_view

from fastsiam.augment import SimSiamAugment, fused
from fastsiam.augment import functional as AF

HARNESS = """
#include <math.h>
{sources}
extern "C" void slot(long n, const float* r, const float* g, const float* b, const float* chan,
                     const float* alpha, const float* beta, const float* gamma, float* out) {{
  for (long i = 0; i < n; ++i)
    out[i] = fastsiam_color_slot<float>(r[i], g[i], b[i], chan[i], alpha[i], beta[i], gamma[i]);
}}
extern "C" void slot_hue(long n, const float* r, const float* g, const float* b, const float* chan,
                         const float* alpha, const float* beta, const float* gamma, const float* shift,
                         float* out) {{
  for (long i = 0; i < n; ++i)
    out[i] = fastsiam_color_slot_hue<float>(r[i], g[i], b[i], chan[i], alpha[i], beta[i], gamma[i], shift[i]);
}}
"""


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """The kernels' own source text, compiled for the host with T = float: the loop over
    elements stands in for jiterator's grid, each call is one thread's work."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler on this machine (scripts/setup.sh installs g++)")
    d = tmp_path_factory.mktemp("fused")
    src = d / "kernels.cpp"
    src.write_text(HARNESS.format(sources=fused.SLOT_SOURCE + fused.SLOT_HUE_SOURCE))
    lib = d / "kernels.so"
    subprocess.run([cxx, "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True,
                   capture_output=True, text=True)
    return ctypes.CDLL(str(lib))


def run_host(lib: ctypes.CDLL, x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
             gamma: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """The host-compiled kernel over ``[N, 3, H, W]`` with the inputs broadcast as jiterator
    broadcasts them: channel planes over C, the channel index over N, H, W, parameters per N."""
    n, _c, h, w = x.shape
    shape = (n, 3, h, w)

    def full(t: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(np.broadcast_to(t.float().numpy(), shape), dtype=np.float32)

    planes = [full(x[:, i:i + 1]) for i in range(3)]
    chan = full(torch.arange(3.0).view(1, 3, 1, 1))
    params = [full(p.view(-1, 1, 1, 1)) for p in (alpha, beta, gamma) + ((shift,) if shift is not None else ())]
    out = np.empty(shape, dtype=np.float32)
    ptr = [a.ctypes.data_as(ctypes.c_void_p) for a in [*planes, chan, *params, out]]
    (lib.slot_hue if shift is not None else lib.slot)(ctypes.c_long(out.size), *ptr)
    return torch.from_numpy(out)


def slot_params(n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Brightness, saturation, contrast and identity slots over factors that clamp, and hue
    shifts up to half a turn either way."""
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(n, generator=g) * 1.6 + 0.2
    kind = torch.arange(n) % 4                      # 0 brightness, 1 saturation, 2 contrast, 3 identity
    alpha = torch.where(kind == 3, 1.0, f)
    beta = torch.where(kind == 1, 1.0 - f, 0.0)
    gamma = torch.where(kind == 2, (1.0 - f) * torch.rand(n, generator=g), 0.0)
    shift = torch.rand(n, generator=g) - 0.5
    shift[::5] = 0.0
    return alpha, beta, gamma, shift


@pytest.mark.parametrize("with_hue", [False, True])
def test_kernel_source_on_the_host_equals_the_plain_ops(host_kernels: ctypes.CDLL, with_hue: bool) -> None:
    x = images(24, h=10, w=12, seed=4)
    alpha, beta, gamma, shift = slot_params(24, seed=1)
    hue = shift if with_hue else None
    got = run_host(host_kernels, x, alpha, beta, gamma, hue)
    want = fused.reference_slot(x, alpha, beta, gamma, hue)
    # float32 on both sides: only the order of the operations differs
    assert (got - want).abs().max() <= (fused.tolerance(torch.float32) if with_hue else 1e-6)
    assert (got - want).abs().mean() <= 1e-6
    identity = (alpha == 1) & (beta == 0) & (gamma == 0)
    if not with_hue:  # an identity slot returns the sample bit for bit
        assert torch.equal(got[identity], x[identity])


def test_jiterator_reads_each_kernels_entry_point() -> None:
    """jiterator's own parser (pure Python, no GPU) finds the entry functions the launches
    name, with one T parameter per tensor the wrapper passes (7 without the hue, 8 with)."""
    from torch.cuda.jiterator import _CodeParser

    for source, name, arity in ((fused.SLOT_SOURCE, "fastsiam_color_slot", 7),
                                (fused.SLOT_HUE_SOURCE, "fastsiam_color_slot_hue", 8)):
        parsed = _CodeParser(source)
        assert (parsed.function_name, parsed.return_type, parsed.template_params) == (name, "T", "<typename T>")
        assert parsed.function_params.count("T ") == arity


def test_kernel_source_hue_matches_torchvision(host_kernels: ctypes.CDLL) -> None:
    from torchvision.transforms.v2 import functional as TF

    x = images(12, h=8, w=9, seed=7)
    ones, zeros = torch.ones(12), torch.zeros(12)
    shift = torch.linspace(-0.5, 0.5, 12)
    got = run_host(host_kernels, x, ones, zeros, zeros, shift)
    want = torch.stack([TF.adjust_hue(x[i], float(shift[i])) for i in range(12)])
    assert (got - want).abs().max() <= TOL_HUE


def test_the_cuda_wrapper_feeds_the_kernel_as_jiterator_would(host_kernels: ctypes.CDLL,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA kernel's Python side on the CPU: jiterator replaced by a launcher that
    broadcasts its inputs as TensorIterator does and runs the host-compiled kernel, so the
    planes, the channel index and the per-sample parameters must reach it in order."""
    from torch.cuda import jiterator

    def create(source: str):
        entry = host_kernels.slot_hue if "fastsiam_color_slot_hue" in source else host_kernels.slot

        def launch(*tensors: torch.Tensor) -> torch.Tensor:
            shape = torch.broadcast_shapes(*(t.shape for t in tensors))
            arrays = [np.ascontiguousarray(np.broadcast_to(t.float().numpy(), shape), dtype=np.float32)
                      for t in tensors]
            out = np.empty(shape, dtype=np.float32)
            entry(ctypes.c_long(out.size), *[a.ctypes.data_as(ctypes.c_void_p) for a in [*arrays, out]])
            return torch.from_numpy(out)

        return launch

    monkeypatch.setattr(jiterator, "_create_jit_fn", create)
    monkeypatch.setattr(fused, "_KERNELS", {})
    monkeypatch.setattr(fused, "_CHANNELS", {})
    x = images(12, h=9, w=11, seed=8)
    alpha, beta, gamma, shift = slot_params(12, seed=6)
    for hue in (None, shift):
        got = fused._color_slot_cuda(x, alpha, beta, gamma, hue)
        want = fused.reference_slot(x, alpha, beta, gamma, hue)
        assert got.shape == x.shape and got.is_contiguous()
        assert (got - want).abs().max() <= (fused.tolerance(torch.float32) if hue is not None else 1e-6)


def test_the_check_accepts_a_correct_half_precision_kernel(host_kernels: ctypes.CDLL,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The first-use check on float16, with the kernel as the GPU runs it (float32 inside, one
    rounding out): it must pass, although the plain float16 ops are further from float32 than
    the kernel is (compared with those, as it first was, it would always fall back)."""
    def slot(x, alpha, beta, gamma, shift=None):
        hue = None if shift is None else shift.float()
        return run_host(host_kernels, x.float(), alpha.float(), beta.float(), gamma.float(), hue).to(x.dtype)

    monkeypatch.setattr(fused, "color_slot", slot)
    monkeypatch.setattr(fused, "_WORKS", {})
    x = images(4).half()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused.fused_color_works(x)
    alpha, beta, gamma, shift = (p.half() for p in slot_params(24, seed=3))
    xs = images(24, h=16, w=16, seed=9).half()
    kernel = slot(xs, alpha, beta, gamma, shift).float()
    plain = fused.reference_slot(xs, alpha, beta, gamma, shift).float()
    want = fused.reference_slot(xs.float(), alpha.float(), beta.float(), gamma.float(), shift.float())
    assert (kernel - want).abs().max() <= fused.tolerance(torch.float16) < (plain - want).abs().max()


@pytest.fixture
def host_fused(host_kernels: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> None:
    """SimSiamAugment on the CPU through the fused schedule, each slot the host-compiled kernel."""
    def slot(x, alpha, beta, gamma, shift=None):
        fused._check(x, alpha, beta, gamma, shift)
        return run_host(host_kernels, x, alpha, beta, gamma, shift)

    monkeypatch.setattr(fused, "color_slot", slot)
    monkeypatch.setattr(SimSiamAugment, "_use_fused", lambda self, x: True)


@pytest.mark.parametrize("config", RECIPES)
def test_fused_schedule_matches_torchvision_for_every_jitter_order(host_fused: None, config: dict) -> None:
    aug = SimSiamAugment(**config)
    p = all_orders_params(aug, "cpu")
    x = images(48, h=24, w=24, seed=5)
    got = AF.normalize(aug.apply(x, p), aug.mean, aug.std)
    want = torch.stack([reference_view(x[i], p, i, aug) for i in range(48)])
    assert (got - want).abs().max() <= TOL_HUE
    assert (got - want).abs().mean() <= 1e-5


def test_the_switch_and_the_device_choose_the_path() -> None:
    from fastsiam.testing.fake_cuda import fake_cuda

    assert not SimSiamAugment()._use_fused(torch.rand(2, 3, 4, 4))  # the CPU keeps the plain ops
    with fake_cuda():
        x = torch.empty(2, 3, 4, 4, device="cuda")
        assert SimSiamAugment()._use_fused(x)
        assert not SimSiamAugment(fused_color=False)._use_fused(x)
        assert not SimSiamAugment(compile=True)._use_fused(x)


def test_the_check_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    monkeypatch.setattr(fused, "_WORKS", {})
    assert fused.fused_color_works(x)  # the CPU op is the reference itself: agrees
    monkeypatch.setattr(fused, "_WORKS", {})
    monkeypatch.setattr(fused, "color_slot", lambda x, *a: x * 0.5)
    with pytest.warns(RuntimeWarning, match=r"differ from the plain ops in float32 by .*using the plain torch ops"):
        assert not fused.fused_color_works(x)
    assert not fused.fused_color_works(x)  # cached: checked once, warned once

    def broken(*a):
        raise RuntimeError("nvrtc: error: identifier is undefined\nmore")

    monkeypatch.setattr(fused, "_WORKS", {})
    monkeypatch.setattr(fused, "color_slot", broken)
    with pytest.warns(RuntimeWarning, match=r"failed: RuntimeError: nvrtc: error: identifier is undefined;"):
        assert not fused.fused_color_works(x)


def test_the_op_refuses_mismatched_parameters() -> None:
    x = torch.rand(2, 3, 4, 4)
    ok = torch.ones(2)
    with pytest.raises(ValueError, match=r"alpha must be \[2\] in torch.float32, got torch.float64 \[2\]"):
        fused.color_slot(x, ok.double(), ok, ok)
    with pytest.raises(ValueError, match=r"expected float images \[N, 3, H, W\]"):
        fused.color_slot(x[:, :2], ok, ok, ok)


def test_fused_call_traffic_on_fake_cuda() -> None:
    """The issue's goal for the default path: 2 x 256 views at 224 px, bf16 out, <= 80 kernels
    and <= 6 GB per call (the plain ops: 103 and 10.6 GB), and nothing that breaks capture."""
    from benchmarks.augment import count

    fused_row = count(256, 224, torch.bfloat16, 3.35e12).rows[0]
    plain_row = count(256, 224, torch.bfloat16, 3.35e12, fused_color=False).rows[0]
    assert fused_row["kernels"] <= 80 and fused_row["device_bytes"] <= 6e9, fused_row
    assert plain_row["kernels"] > fused_row["kernels"] and plain_row["device_bytes"] > 2 * fused_row["device_bytes"]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_fused_kernels_equal_the_plain_ops(dtype: torch.dtype) -> None:
    x = images(24, h=40, w=36, seed=2, device="cuda").to(dtype)
    params = [p.to("cuda", dtype) for p in slot_params(24, seed=3)]
    for hue in (None, params[3]):
        got = fused.color_slot(x, *params[:3], hue).float()
        want = fused.reference_slot(x.float(), *(p.float() for p in params[:3]),
                                    None if hue is None else hue.float())
        assert (got - want).abs().max() <= fused.tolerance(dtype), (dtype, hue is None)
    assert fused.fused_color_works(x)


@pytest.mark.cuda
def test_cuda_fused_pipeline_equals_the_plain_pipeline_and_captures() -> None:
    from fastsiam.data import TwoViewBatch

    u8 = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8, device="cuda")
    batch = TwoViewBatch.from_pair(u8, u8.flip(0), torch.zeros(16, device="cuda"))
    g = torch.Generator(device="cuda")
    aug = SimSiamAugment(out_dtype=torch.bfloat16)
    a = aug(batch, g.manual_seed(5))
    b = SimSiamAugment(out_dtype=torch.bfloat16, fused_color=False)(batch, g.manual_seed(5))
    assert aug._use_fused(u8.half())
    for fa, pb in zip(a, b):
        assert (fa.float() - pb.float()).abs().max() <= 2.5 / 255 / 0.225  # the fp16 path's bound
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            out, _ = aug(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out) and torch.isfinite(out.float()).all()
