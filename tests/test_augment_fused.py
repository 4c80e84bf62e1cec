"""The fused colour kernels (fastsiam.augment.fused): their C++ source compiled on the host and
run against torchvision per sample and the plain ops, the Python side that launches them, the
check that guards them, their fake-CUDA traffic, and (with a GPU) the NVRTC build itself."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from host_build import host_library
from test_augment import RECIPES, TOL_HUE, all_orders_params, images, reference_view

from fastsiam.augment import SimSiamAugment, fused
from fastsiam.augment import functional as AF

# The grids as host loops: one call per CUDA kernel, each iteration one thread's (or one
# block's) work; the block's shared-memory sum becomes a plain loop.
HARNESS = """
#define FASTSIAM_DEVICE
{source}
extern "C" void contrast_partial(const unsigned char* img, const float* params, float* partial, int n, int h, int w,
                                 const int* st, int blocks, int threads) {{
  long long hw = (long long)h * w;
  for (long long i = 0; i < n; ++i)
    for (int blk = 0; blk < blocks; ++blk) {{
      float s = 0.0f;
      for (long long px = (long long)blk * threads; px < hw; px += (long long)blocks * threads)
        for (long long q = px; q < px + threads && q < hw; ++q) s += fs_pre_contrast_luma(img, params, i, q, w, st);
      partial[i * blocks + blk] = s;
    }}
}}
extern "C" void color_pixels(const unsigned char* img, const float* params, void* out, int kind, int n, int h, int w,
                             const int* st) {{
  long long hw = (long long)h * w;
  for (long long t = 0; t < (long long)n * hw; ++t) {{
    float rgb[3];
    fs_color_pixel(img, params, t, h, w, st, rgb);
    long long i = t / hw, pixel = t - i * hw;
    for (int c = 0; c < 3; ++c) fs_store(out, (i * 3 + c) * hw + pixel, kind, rgb[c]);
  }}
}}
extern "C" void half_bits(const float* v, unsigned short* out, long long n) {{
  for (long long i = 0; i < n; ++i) out[i] = fs_half_bits(v[i]);
}}
extern "C" void bf16_bits(const float* v, unsigned short* out, long long n) {{
  for (long long i = 0; i < n; ++i) out[i] = fs_bf16_bits(v[i]);
}}
extern "C" void half_values(const unsigned short* h, float* out, long long n) {{
  for (long long i = 0; i < n; ++i) out[i] = fs_half_value(h[i]);
}}
extern "C" void blur_vertical(const void* in, void* out, const float* kern, int kind, int n, int h, int w, int K) {{
  for (long long t = 0; t < (long long)n * 3 * h * w; ++t) fs_store(out, t, kind, fs_blur_vertical(in, kind, kern, K, t, h, w));
}}
extern "C" void blur_horizontal_normalize(const void* in, void* out, const float* kern, const float* gray,
                                          const float* norm, int in_kind, int out_kind, int nhwc, int n, int h, int w,
                                          int K) {{
  long long hw = (long long)h * w;
  for (long long t = 0; t < (long long)n * hw; ++t) {{
    float rgb[3];
    fs_blur_horizontal_normalize(in, in_kind, kern, K, gray, norm, t, h, w, rgb);
    long long i = t / hw, pixel = t - i * hw;
    for (int c = 0; c < 3; ++c) fs_store(out, nhwc ? t * 3 + c : (i * 3 + c) * hw + pixel, out_kind, rgb[c]);
  }}
}}
"""


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    return host_library(tmp_path_factory, "fused", HARNESS.format(source=fused.PIXEL_SOURCE))


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def host_launcher(lib: ctypes.CDLL):
    """A stand-in for ``fused._kernel``: the host build over the arguments the CUDA launch gets."""
    def kernel(device: torch.device, name: str):
        def launch(grid, block, args):
            if name == "fastsiam_blur_vertical":
                planar, out, kern, kind, n, h, w, k = args
                assert grid[0] * block[0] >= n * 3 * h * w
                lib.blur_vertical(_ptr(planar), _ptr(out), _ptr(kern), kind, n, h, w, k)
                return
            if name == "fastsiam_blur_horizontal_normalize":
                planar, out, kern, gray, norm, *ints = args
                assert grid[0] * block[0] >= ints[3] * ints[4] * ints[5]
                lib.blur_horizontal_normalize(_ptr(planar), _ptr(out), _ptr(kern), _ptr(gray), _ptr(norm), *ints)
                return
            if name == "fastsiam_contrast_partial":
                views, params, out, n, h, w, *st = args
                assert grid == (fused.PARTIAL_BLOCKS, n, 1) and block == (fused.THREADS, 1, 1)
                lib.contrast_partial(_ptr(views), _ptr(params), _ptr(out), n, h, w, (ctypes.c_int * 4)(*st),
                                     grid[0], block[0])
                return
            assert name == "fastsiam_color_pixels", name
            views, params, out, kind, n, h, w, *st = args
            assert grid[0] * block[0] >= n * h * w
            lib.color_pixels(_ptr(views), _ptr(params), _ptr(out), kind, n, h, w, (ctypes.c_int * 4)(*st))
        return launch

    return kernel


@pytest.fixture
def host_fused(host: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> None:
    """SimSiamAugment on the CPU through the fused path, its kernels the host build."""
    monkeypatch.setattr(fused, "_kernel", host_launcher(host))
    monkeypatch.setattr(SimSiamAugment, "_use_fused", lambda self, img: img.dtype == torch.uint8)


def u8(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """uint8 views with the cases HSV and clamping care about (test_augment's images)."""
    return (images(n, h=h, w=w, seed=seed) * 255).round().to(torch.uint8)


@pytest.mark.parametrize("config", RECIPES)
def test_fused_pipeline_matches_torchvision_for_every_jitter_order(host_fused: None, config: dict) -> None:
    """Each of the 24 ColorJitter orders twice, flips, greys, blurs (and solarize's place),
    every recipe's enabled and disabled ops: each sample as torchvision's v2 ops give it."""
    aug = SimSiamAugment(**config)
    p = all_orders_params(aug, "cpu")
    x = u8(48, 24, 24, seed=5)
    got = AF.normalize(aug.apply(x, p), aug.mean, aug.std)
    want = torch.stack([reference_view(x[i].float() / 255, p, i, aug) for i in range(48)])
    assert (got - want).abs().max() <= TOL_HUE
    assert (got - want).abs().mean() <= 1e-5


@pytest.mark.parametrize(("out_dtype", "channels_last", "tolerance"), [
    (torch.float32, True, TOL_HUE), (torch.float32, False, TOL_HUE), (torch.bfloat16, True, 2.5 / 255 / 0.225)])
@pytest.mark.parametrize("config", [{}, {"blur_kernel_size": 7, "hue": 0.5}, {"grayscale_p": 0.0, "blur_p": 0.0}])
def test_the_whole_fused_call_matches_torchvision(host_fused: None, config: dict, out_dtype: torch.dtype,
                                                  channels_last: bool, tolerance: float) -> None:
    """The module's call as it runs on CUDA (the four kernels from uint8 views to normalized
    output: colour, vertical blur, horizontal blur + grayscale + normalize + cast), every
    ColorJitter order, against torchvision's v2 ops per sample; bfloat16 within its rounding."""
    from fastsiam.data import TwoViewBatch

    aug = SimSiamAugment(**config, out_dtype=out_dtype, channels_last=channels_last)
    p = all_orders_params(aug, "cpu")
    # a recipe without grey or blur draws none (all_orders_params sets them whatever the recipe)
    p = p._replace(gray=p.gray & (aug.grayscale_p > 0), blur=p.blur & (aug.blur_p > 0))
    x = u8(48, 24, 24, seed=6)
    out = aug._pipeline(x, p, aug._constants(x.device))
    assert out.dtype == out_dtype and out.is_contiguous(memory_format=torch.channels_last if channels_last
                                                        else torch.contiguous_format)
    want = torch.stack([reference_view(x[i].float() / 255, p, i, aug) for i in range(48)])
    assert (out.float() - want).abs().max() <= tolerance
    views = aug(TwoViewBatch(x, torch.zeros(24, dtype=torch.long), torch.rand(48, 14)))
    assert all(v.shape == (24, 3, 24, 24) and v.dtype == out_dtype for v in views)


def test_the_bit_conversions_are_torchs(host: ctypes.CDLL) -> None:
    """bfloat16 rounding of normalized values (either sign, exact ties) and float16 bits back to
    float (every one of the 65,536 patterns but NaNs and infinities), as torch converts them."""
    g = torch.Generator().manual_seed(1)
    v = torch.cat([torch.randn(100_000, generator=g) * 3, torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 0.0])])
    out = np.empty(len(v), dtype=np.uint16)
    host.bf16_bits(_ptr(v), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_longlong(len(v)))
    assert np.array_equal(out, v.bfloat16().view(torch.int16).numpy().view(np.uint16))
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    halves = bits.view(torch.float16)
    finite = torch.isfinite(halves)
    got = torch.empty(65536, dtype=torch.float32)
    host.half_values(_ptr(bits), _ptr(got), ctypes.c_longlong(65536))
    assert torch.equal(got[finite], halves[finite].float())


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_kernels_equal_the_plain_ops(host_fused: None, channels_last: bool, dtype: torch.dtype) -> None:
    """The flip, the conversion and ColorJitter against the plain ops in float32 on the same
    draws, views in either layout: within the kernels' tolerance (one rounding to ``dtype``)."""
    aug = SimSiamAugment(hue=0.5)
    x = u8(40, 17, 23, seed=2)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    p = aug.sample_params(40, generator=torch.Generator().manual_seed(4))
    want = aug._color_jitter(aug._to_planar(x, p), p)
    got = fused.color_pixels(x, fused.pixel_params(p.flip, p.jitter, p.order, p.factors), dtype)
    assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
    assert (got.float() - want).abs().max() <= fused.tolerance(dtype)


def test_the_half_rounding_is_torchs(host: ctypes.CDLL) -> None:
    """float -> float16 bits, round to nearest even, on every kind of value the colours take:
    exact ties, float16's subnormals, values just around 1 and between every level."""
    g = torch.Generator().manual_seed(0)
    ties = torch.tensor([1 + 2**-11, 1 - 2**-12, 2**-14 + 2**-25, 2**-24, 2**-25, 3 * 2**-25], dtype=torch.float32)
    v = torch.cat([torch.rand(100_000, generator=g), torch.rand(20_000, generator=g) * 2**-13,
                   torch.arange(256) / 255.0, ties, torch.tensor([0.0, 1.0, 2**-30])])
    out = np.empty(len(v), dtype=np.uint16)
    host.half_bits(_ptr(v), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_longlong(len(v)))
    assert np.array_equal(out, v.half().view(torch.int16).numpy().view(np.uint16))


def test_the_contrast_mean_is_the_image_before_its_contrast(host_fused: None) -> None:
    """The first kernel's partial sums: per sample, the luma of the image after the ops its
    order runs before the contrast, summed (0 for samples without ColorJitter)."""
    aug = SimSiamAugment()
    x = u8(24, 13, 19, seed=3)
    p = aug.sample_params(24, generator=torch.Generator().manual_seed(8))
    params = fused.pixel_params(p.flip, p.jitter, p.order, p.factors)
    mean = torch.ops.fastsiam.contrast_partial(x, params).sum(dim=1) / (13 * 19)
    from torchvision.transforms.v2 import functional as TF

    ops = {0: TF.adjust_brightness, 2: TF.adjust_saturation, 3: TF.adjust_hue}
    for i in range(24):
        img = x[i].float() / 255
        if p.jitter[i]:
            for op in p.order[i].tolist():
                if op == 1:
                    break
                img = ops[op](img, float(p.factors[i, op]))
        want = TF.rgb_to_grayscale(img).mean() if p.jitter[i] else torch.tensor(0.0)
        assert abs(float(mean[i]) - float(want)) <= 1e-5, (i, float(mean[i]), float(want))


def test_the_switch_the_device_and_the_dtype_choose_the_path() -> None:
    from fastsiam.testing.fake_cuda import fake_cuda

    assert not SimSiamAugment()._use_fused(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))  # the CPU
    with fake_cuda():
        x = torch.empty(2, 3, 4, 4, dtype=torch.uint8, device="cuda")
        assert SimSiamAugment(out_dtype=torch.bfloat16)._use_fused(x)       # float16 working dtype
        assert SimSiamAugment()._use_fused(x)                               # float32
        assert not SimSiamAugment(compute_dtype=torch.bfloat16)._use_fused(x)
        assert not SimSiamAugment(fused_color=False)._use_fused(x)
        assert not SimSiamAugment(compile=True)._use_fused(x)
        assert not SimSiamAugment()._use_fused(x.float())                   # already floating


def test_the_check_accepts_the_kernels_and_falls_back_with_one_warning(host: ctypes.CDLL,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    cpu = torch.device("cpu")
    monkeypatch.setattr(fused, "_kernel", host_launcher(host))
    for dtype in (torch.float32, torch.float16):  # float16: one rounding, within tolerance
        monkeypatch.setattr(fused, "_WORKS", {})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert fused.fused_color_works(cpu, dtype)

    def off(device, name):
        right = host_launcher(host)(device, name)

        def launch(grid, block, args):
            right(grid, block, args)
            if name == "fastsiam_color_pixels":
                args[2].mul_(0.5)
        return launch

    monkeypatch.setattr(fused, "_WORKS", {})
    monkeypatch.setattr(fused, "_kernel", off)
    with pytest.warns(RuntimeWarning, match=r"differ from the plain ops in float32 by .*using the plain torch ops"):
        assert not fused.fused_color_works(cpu, torch.float32)
    assert not fused.fused_color_works(cpu, torch.float32)  # cached: checked once, warned once

    def broken(device, name):
        raise RuntimeError("nvrtc: error: identifier is undefined\nmore")

    monkeypatch.setattr(fused, "_WORKS", {})
    monkeypatch.setattr(fused, "_kernel", broken)
    with pytest.warns(RuntimeWarning, match=r"failed: RuntimeError: nvrtc: error: identifier is undefined;"):
        assert not fused.fused_color_works(cpu, torch.float32)
    with pytest.raises(RuntimeError, match="fastsiam's fused colour kernels: CUDA only, got cpu"):
        monkeypatch.undo()
        fused._kernel(cpu, "fastsiam_color_pixels")


def test_the_op_refuses_what_the_kernels_cannot_read() -> None:
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    ok = torch.zeros(2, fused.PARAM_COLUMNS)
    with pytest.raises(ValueError, match=r"expected uint8 views \[N, 3, H, W\]"):
        fused.color_pixels(x.float(), ok, torch.float32)
    with pytest.raises(ValueError, match=r"params must be float32 \[2, 11\], got torch.float64"):
        fused.color_pixels(x, ok.double(), torch.float32)
    with pytest.raises(ValueError, match=r"dtype must be float32 or float16"):
        fused.color_pixels(x, ok, torch.bfloat16)
    planar, kern, gray, norm = torch.zeros(2, 3, 8, 8), torch.ones(2, 3) / 3, torch.zeros(2), torch.zeros(6)
    with pytest.raises(ValueError, match=r"kernels must be float32 \[2, odd K\] with K // 2 < 8"):
        fused.blur_normalize(planar, torch.ones(2, 4) / 4, gray, norm, torch.float32, True)
    with pytest.raises(ValueError, match=r"out_dtype must be float32, float16 or bfloat16"):
        fused.blur_normalize(planar, kern, gray, norm, torch.float64, True)


def test_fused_call_traffic_on_fake_cuda() -> None:
    """The issue's goals (2 x 256 views at 224 px, bf16 out: the default path <= 80 kernels and
    <= 6 GB, a fused per-pixel path <= 1.5 GB; the plain ops move 103 and 10.6 GB) and nothing
    that breaks capture: 29 kernels and 0.93 GB, 4x the floor (the uint8 views read once, the
    bf16 output written once): the colour kernels read the views twice and write the float16
    planes, the blur's vertical pass reads and writes them, the last pass reads them and
    writes the output."""
    from benchmarks.augment import count

    report = count(256, 224, torch.bfloat16, 3.35e12)
    rows = {r["variant"]: r for r in report.rows}
    call = rows["simsiam_augment (one call)"]
    assert call["kernels"] <= 30 and call["device_bytes"] <= 0.95e9, call
    views = 2 * 256 * 3 * 224 * 224  # values; float16 and bfloat16 are 2 bytes each
    assert rows["in fused.py:color_pixels"]["device_bytes"] <= 2 * views + 2 * views + 1e6
    assert rows["in fused.py:blur_normalize"]["device_bytes"] <= 4 * views + 4 * views + 1e6


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_fused_kernels_equal_the_plain_ops(dtype: torch.dtype) -> None:
    assert fused.fused_color_works(torch.device("cuda", torch.cuda.current_device()), dtype)
    aug = SimSiamAugment(hue=0.5)
    x = u8(64, 40, 36, seed=2).contiguous(memory_format=torch.channels_last)
    p = aug.sample_params(64, generator=torch.Generator().manual_seed(4))
    want = aug._color_jitter(aug._to_planar(x, p), p)
    pc = p._replace(**{f: getattr(p, f).cuda() for f in ("flip", "jitter", "order", "factors")})
    got = fused.color_pixels(x.cuda(), fused.pixel_params(pc.flip, pc.jitter, pc.order, pc.factors), dtype)
    assert (got.float().cpu() - want).abs().max() <= fused.tolerance(dtype)


@pytest.mark.cuda
def test_cuda_fused_pipeline_equals_the_plain_pipeline_and_captures() -> None:
    from fastsiam.data import TwoViewBatch

    views = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8, device="cuda")
    batch = TwoViewBatch.from_pair(views, views.flip(0), torch.zeros(16, device="cuda"))
    g = torch.Generator(device="cuda")
    aug = SimSiamAugment(out_dtype=torch.bfloat16)
    a = aug(batch, g.manual_seed(5))
    b = SimSiamAugment(out_dtype=torch.bfloat16, fused_color=False)(batch, g.manual_seed(5))
    assert aug._use_fused(views)
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
