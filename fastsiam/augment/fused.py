"""SimSiam's augmentation from uint8 views to the normalized output as four runtime-compiled
CUDA kernels: the flip, uint8 -> [0, 1] and the whole ColorJitter in two, the blur, grayscale,
normalization and the cast in two more.

In eager torch :class:`~fastsiam.augment.SimSiamAugment`'s colour stage is a pass over the
batch per op: the flip, the conversion to floating point, each jitter slot's colour matrix and
clamp, each slot's mean luma for the contrast, the hue's arithmetic. Here one thread computes
one output pixel straight from the uint8 crop: it reads the pixel (mirrored when the sample
flips), applies the sample's four ColorJitter ops in the sample's own order, each clamped to
[0, 1] as torchvision clamps them, in float32, and writes the three planar values once in the
working dtype (float32, or float16 rounded to nearest even). The contrast's blend target, the
mean luma of the image *as it is when the contrast comes*, is one number per sample, so a first
kernel computes it from the uint8 crop the same way (each thread the ops before the contrast on
a few pixels, a block's sum in shared memory, one partial sum per block; the partials are added
by torch, in a fixed order). The device reads the uint8 batch twice and writes the planar batch
once, where the slot-by-slot path moved about 3 GB for 2 x 256 views at 224 px.

Then :func:`blur_normalize`: the per-sample separable Gaussian (a delta for samples that skip
it) as a vertical pass (planar in, planar out) and a horizontal pass that also turns grey the
samples that do (grayscale commutes with the blur), normalizes, rounds once to the output dtype
(bfloat16 to nearest even) and writes NHWC: no padded copy, no float32 intermediate. For 2 x 256
views at 224 px, bf16 out, the whole call moves 0.93 GB in 29 kernels (fake-CUDA count, 4x the
floor of reading the views and writing the output once), against 10.6 GB in 103 for the plain ops.

The arithmetic per op is torchvision's: brightness ``clamp(f x)``, contrast
``clamp(f x + (1 - f) mean)``, saturation ``clamp(f x + (1 - f) luma(x))`` (luma ITU-R 601-2,
as its grayscale), hue the closed form of :func:`fastsiam.augment.functional.adjust_hue`. A
disabled op has its identity parameters (factor 1, shift 0), which leave every value as it was.

Contract:

- :func:`color_pixels` (``fastsiam::color_pixels`` and ``fastsiam::contrast_partial``,
  ``torch.library`` custom ops whose fake kernels the fake-CUDA traffic counter sees) takes the
  uint8 ``[N, 3, H, W]`` views (any strides) and the ``[N, PARAM_COLUMNS]`` float32 parameters
  of :func:`pixel_params` and returns the planar ``[N, 3, H, W]`` batch in [0, 1].
- :func:`blur_normalize` (``fastsiam::blur_vertical``, ``fastsiam::blur_horizontal_normalize``)
  takes that planar batch, ``[N, K]`` float32 blur kernels, the ``[N]`` grey flags and the
  normalization as ``[scale(3), shift(3)]``, and returns the output in its dtype and layout.
- :data:`PIXEL_SOURCE` is plain C++: tests/test_augment_fused.py compiles the same text with the
  host's C++ compiler and checks it against the plain ops and torchvision per sample; a
  ``@pytest.mark.cuda`` test checks the NVRTC build on a GPU.
- :func:`fused_color_works` compiles (``torch.cuda._compile_kernel``, NVRTC inside libtorch:
  no nvcc, no Triton, no ``torch.compile``) and checks the kernels once per device and dtype on a
  small batch against the plain ops; a failure is one warning, and the augmentation keeps the
  plain ops. Call it (the augmentation's first call does) before any CUDA graph capture.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from fastsiam import nvrtc
from fastsiam.augment import functional as AF

__all__ = ["PARAM_COLUMNS", "PIXEL_SOURCE", "blur_normalize", "color_pixels", "fused_color_works", "pixel_params",
           "tolerance"]

# Per sample: flip, jitter, the 4 ops' order (op indices as floats), the 4 factors (brightness,
# contrast, saturation, hue shift), the contrast's mean luma (filled by the first kernel).
PARAM_COLUMNS = 11
MEAN_COLUMN = 10
THREADS = 256
PARTIAL_BLOCKS = 16  # partial sums per sample in the contrast's reduction

# The per-pixel arithmetic, host-compilable; FASTSIAM_DEVICE is __device__ under NVRTC and empty
# on the host. Ops: 0 brightness, 1 contrast, 2 saturation, 3 hue (torchvision's fn_idx).
PIXEL_SOURCE = """
FASTSIAM_DEVICE inline float fs_clamp01(float v) { return v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v); }

FASTSIAM_DEVICE inline float fs_luma(float r, float g, float b) { return 0.2989f * r + 0.587f * g + 0.114f * b; }

/* adjust_hue's closed form: channel n (5 red, 3 green, 1 blue) is max - span * w(k),
   k = (n + 6 shift + num / span) mod 6, w = min(clamp(4 - k, 0, 1), k). */
FASTSIAM_DEVICE inline float fs_hue_channel(float n, float shift, float mx, float span, float num) {
  float k = (n + 6.0f * shift) + num / (span > 1.17549435e-38f ? span : 1.17549435e-38f);
  while (k >= 6.0f) k -= 6.0f;  /* fmodf, for the range k takes here (-3..13): exact */
  if (k < 0.0f) k += 6.0f;
  float w = 4.0f - k;
  w = w < 0.0f ? 0.0f : (w > 1.0f ? 1.0f : w);
  w = w < k ? w : k;
  return mx - span * w;
}

FASTSIAM_DEVICE inline void fs_hue(float* r, float* g, float* b, float shift) {
  float mx = *r > *g ? (*r > *b ? *r : *b) : (*g > *b ? *g : *b);
  float mn = *r < *g ? (*r < *b ? *r : *b) : (*g < *b ? *g : *b);
  float span = mx - mn;
  float num = mx == *r ? *g - *b : (mx == *g ? (*b - *r) + 2.0f * span : (*r - *g) + 4.0f * span);
  float r2 = fs_hue_channel(5.0f, shift, mx, span, num);
  float g2 = fs_hue_channel(3.0f, shift, mx, span, num);
  *b = fs_hue_channel(1.0f, shift, mx, span, num);
  *r = r2;
  *g = g2;
}

/* One ColorJitter op on one pixel, with the sample's parameters p (PARAM_COLUMNS floats). */
FASTSIAM_DEVICE inline void fs_jitter_op(int op, const float* p, float* r, float* g, float* b) {
  if (op == 0) {
    float f = p[6];
    *r = fs_clamp01(f * *r); *g = fs_clamp01(f * *g); *b = fs_clamp01(f * *b);
  } else if (op == 1) {
    float f = p[7], m = (1.0f - f) * p[10];
    *r = fs_clamp01(f * *r + m); *g = fs_clamp01(f * *g + m); *b = fs_clamp01(f * *b + m);
  } else if (op == 2) {
    float f = p[8], m = (1.0f - f) * fs_luma(*r, *g, *b);
    *r = fs_clamp01(f * *r + m); *g = fs_clamp01(f * *g + m); *b = fs_clamp01(f * *b + m);
  } else if (p[9] != 0.0f) {
    fs_hue(r, g, b, p[9]);
  }
}

/* Pixel t (sample i, row y, column x) of the uint8 views, mirrored where the sample flips,
   as floats in [0, 1] (torchvision's to_dtype(scale=True): v / 255). */
FASTSIAM_DEVICE inline void fs_read(const unsigned char* img, const float* p, long long i, long long y, long long x,
                                    int w, const int* st, float* r, float* g, float* b) {
  long long xs = p[0] != 0.0f ? (long long)w - 1 - x : x;
  const unsigned char* q = img + i * st[0] + y * st[2] + xs * st[3];
  *r = (float)q[0] / 255.0f;
  *g = (float)q[st[1]] / 255.0f;
  *b = (float)q[2 * st[1]] / 255.0f;
}

/* The luma of pixel (i, pixel) as the contrast sees it: after the ops its sample runs before
   the contrast (0 where the sample runs no jitter: its mean is not used). */
FASTSIAM_DEVICE inline float fs_pre_contrast_luma(const unsigned char* img, const float* params, long long i,
                                                  long long pixel, int w, const int* st) {
  const float* p = params + i * 11;
  if (p[1] == 0.0f) return 0.0f;
  float r, g, b;
  fs_read(img, p, i, pixel / w, pixel % w, w, st, &r, &g, &b);
  for (int k = 0; k < 4; ++k) {
    int op = (int)p[2 + k];
    if (op == 1) break;
    fs_jitter_op(op, p, &r, &g, &b);
  }
  return fs_luma(r, g, b);
}

/* Output pixel t of [n, 3, h, w]: read, every op of the sample in its order, three planar values. */
FASTSIAM_DEVICE inline void fs_color_pixel(const unsigned char* img, const float* params, long long t, int h, int w,
                                           const int* st, float* rgb) {
  long long hw = (long long)h * w;
  long long i = t / hw, pixel = t - i * hw;
  const float* p = params + i * 11;
  float r, g, b;
  fs_read(img, p, i, pixel / w, pixel % w, w, st, &r, &g, &b);
  if (p[1] != 0.0f)
    for (int k = 0; k < 4; ++k) fs_jitter_op((int)p[2 + k], p, &r, &g, &b);
  rgb[0] = r; rgb[1] = g; rgb[2] = b;
}

/* float -> IEEE half bits, round to nearest even (finite values). */
FASTSIAM_DEVICE inline unsigned short fs_half_bits(float v) {
  union { float f; unsigned int u; } c;
  c.f = v;
  unsigned int x = c.u, sign = (x >> 16) & 0x8000u, mant = x & 0x7fffffu;
  int e = (int)((x >> 23) & 0xffu) - 127 + 15;
  if (e >= 31) return (unsigned short)(sign | 0x7c00u);
  if (e <= 0) {
    if (e < -10) return (unsigned short)sign;
    mant |= 0x800000u;
    unsigned int s = (unsigned int)(14 - e), half = mant >> s, rem = mant & ((1u << s) - 1u), mid = 1u << (s - 1u);
    if (rem > mid || (rem == mid && (half & 1u))) half += 1u;
    return (unsigned short)(sign | half);
  }
  unsigned int half = sign | ((unsigned int)e << 10) | (mant >> 13), rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) half += 1u;
  return (unsigned short)half;
}

/* float -> bfloat16 bits, round to nearest even (finite values). */
FASTSIAM_DEVICE inline unsigned short fs_bf16_bits(float v) {
  union { float f; unsigned int u; } c;
  c.f = v;
  return (unsigned short)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

/* IEEE half bits -> float (exact, subnormals included). */
FASTSIAM_DEVICE inline float fs_half_value(unsigned short h) {
  unsigned int sign = ((unsigned int)h & 0x8000u) << 16, e = ((unsigned int)h >> 10) & 0x1fu, mant = (unsigned int)h & 0x3ffu;
  union { float f; unsigned int u; } c;
  if (e == 0) {
    c.f = (float)mant * 5.9604644775390625e-08f;  /* mant * 2^-24: exact */
    c.u |= sign;
  } else {
    c.u = sign | ((e + 112u) << 23) | (mant << 13);
  }
  return c.f;
}

/* Element `at` of a float32 (kind 0) or float16 (1) buffer; fs_store also writes bfloat16 (2). */
FASTSIAM_DEVICE inline float fs_load(const void* base, long long at, int kind) {
  return kind == 1 ? fs_half_value(((const unsigned short*)base)[at]) : ((const float*)base)[at];
}

FASTSIAM_DEVICE inline void fs_store(void* base, long long at, int kind, float v) {
  if (kind == 0) ((float*)base)[at] = v;
  else ((unsigned short*)base)[at] = kind == 1 ? fs_half_bits(v) : fs_bf16_bits(v);
}

/* torch's reflect padding (no edge repeated), for |p - clamp| < n. */
FASTSIAM_DEVICE inline long long fs_reflect(long long p, long long n) { return p < 0 ? -p : (p >= n ? 2 * n - 2 - p : p); }

/* The blur's vertical pass at element t of planar [n, 3, h, w]: sum_j k[i, j] x[i, c, reflect(y + j - K/2), x]. */
FASTSIAM_DEVICE inline float fs_blur_vertical(const void* in, int in_kind, const float* kern, int K, long long t, int h, int w) {
  long long hw = (long long)h * w, plane = t / hw, pixel = t - plane * hw, y = pixel / w, x = pixel - y * w;
  const float* k = kern + (plane / 3) * K;
  float s = 0.0f;
  for (int j = 0; j < K; ++j) s += k[j] * fs_load(in, plane * hw + fs_reflect(y + j - K / 2, h) * w + x, in_kind);
  return s;
}

/* Output pixel t (i, y, x): the blur's horizontal pass, grayscale where the sample turns grey, then
   (v - mean) / std as v * norm[c] + norm[3 + c]. */
FASTSIAM_DEVICE inline void fs_blur_horizontal_normalize(const void* in, int in_kind, const float* kern, int K, const float* gray,
                                                   const float* norm, long long t, int h, int w, float* rgb) {
  long long hw = (long long)h * w, i = t / hw, pixel = t - i * hw, y = pixel / w, x = pixel - y * w;
  const float* k = kern + i * K;
  for (int c = 0; c < 3; ++c) {
    const long long row = (i * 3 + c) * hw + y * w;
    float s = 0.0f;
    for (int j = 0; j < K; ++j) s += k[j] * fs_load(in, row + fs_reflect(x + j - K / 2, w), in_kind);
    rgb[c] = s;
  }
  if (gray[i] != 0.0f) {
    float l = fs_luma(rgb[0], rgb[1], rgb[2]);
    rgb[0] = l; rgb[1] = l; rgb[2] = l;
  }
  for (int c = 0; c < 3; ++c) rgb[c] = rgb[c] * norm[c] + norm[3 + c];
}
"""

KERNEL_SOURCE = "#define FASTSIAM_DEVICE __device__\n" + PIXEL_SOURCE + """
extern "C" __global__ void fastsiam_contrast_partial(const unsigned char* img, const float* params, float* partial,
                                                    int n, int h, int w, int s0, int s1, int s2, int s3) {
  __shared__ float sums[256];
  int st[4] = {s0, s1, s2, s3};
  long long i = blockIdx.y, hw = (long long)h * w;
  float s = 0.0f;
  for (long long pixel = (long long)blockIdx.x * blockDim.x + threadIdx.x; pixel < hw;
       pixel += (long long)gridDim.x * blockDim.x)
    s += fs_pre_contrast_luma(img, params, i, pixel, w, st);
  sums[threadIdx.x] = s;
  __syncthreads();
  for (unsigned int half = blockDim.x / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) sums[threadIdx.x] += sums[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[i * gridDim.x + blockIdx.x] = sums[0];
}

extern "C" __global__ void fastsiam_color_pixels(const unsigned char* img, const float* params, void* out, int kind,
                                                int n, int h, int w, int s0, int s1, int s2, int s3) {
  int st[4] = {s0, s1, s2, s3};
  long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x, hw = (long long)h * w;
  if (t >= (long long)n * hw) return;
  float rgb[3];
  fs_color_pixel(img, params, t, h, w, st, rgb);
  long long i = t / hw, pixel = t - i * hw;
  for (int c = 0; c < 3; ++c) fs_store(out, (i * 3 + c) * hw + pixel, kind, rgb[c]);
}

extern "C" __global__ void fastsiam_blur_vertical(const void* in, void* out, const float* kern, int kind, int n, int h,
                                             int w, int K) {
  long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (t < (long long)n * 3 * h * w) fs_store(out, t, kind, fs_blur_vertical(in, kind, kern, K, t, h, w));
}

extern "C" __global__ void fastsiam_blur_horizontal_normalize(const void* in, void* out, const float* kern, const float* gray,
                                                       const float* norm, int in_kind, int out_kind, int nhwc, int n,
                                                       int h, int w, int K) {
  long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x, hw = (long long)h * w;
  if (t >= (long long)n * hw) return;
  float rgb[3];
  fs_blur_horizontal_normalize(in, in_kind, kern, K, gray, norm, t, h, w, rgb);
  long long i = t / hw, pixel = t - i * hw;
  for (int c = 0; c < 3; ++c) fs_store(out, nhwc ? t * 3 + c : (i * 3 + c) * hw + pixel, out_kind, rgb[c]);
}
"""

PLANAR_DTYPES = (torch.float32, torch.float16)  # what the colour kernel writes and the blur reads
_WORKS: dict[tuple[torch.device, torch.dtype], bool] = {}


def pixel_params(flip: Tensor, jitter: Tensor, order: Tensor, factors: Tensor) -> Tensor:
    """``[N, PARAM_COLUMNS]`` float32 for the kernels, from :class:`~fastsiam.augment.AugParams`'
    fields (the mean column 0 until the first kernel fills it)."""
    cols = [flip.float().unsqueeze(1), jitter.float().unsqueeze(1), order.float(), factors.float(),
            factors.new_zeros(factors.shape[0], 1, dtype=torch.float32)]
    return torch.cat(cols, dim=1)


def color_pixels(views: Tensor, params: Tensor, dtype: torch.dtype, *, contrast: bool = True) -> Tensor:
    """Flip, scale to [0, 1] and ColorJitter the uint8 ``views`` ``[N, 3, H, W]`` with ``params``
    (:func:`pixel_params`): planar ``[N, 3, H, W]`` in ``dtype`` (float32 or float16).
    ``contrast=False`` (the recipe has none) skips the mean's kernel."""
    if views.dtype != torch.uint8 or views.dim() != 4 or views.shape[1] != 3:
        raise ValueError(f"color_pixels: expected uint8 views [N, 3, H, W], got {views.dtype} {list(views.shape)}")
    if params.shape != (views.shape[0], PARAM_COLUMNS) or params.dtype != torch.float32:
        raise ValueError(f"color_pixels: params must be float32 [{views.shape[0]}, {PARAM_COLUMNS}], "
                         f"got {params.dtype} {list(params.shape)}")
    if dtype not in PLANAR_DTYPES:
        raise ValueError(f"color_pixels: dtype must be float32 or float16, got {dtype}")
    if contrast:
        partial = torch.ops.fastsiam.contrast_partial(views, params.contiguous())
        mean = partial.sum(dim=1, keepdim=True) * (1.0 / (views.shape[2] * views.shape[3]))
        params = torch.cat([params[:, :MEAN_COLUMN], mean], dim=1)
    return torch.ops.fastsiam.color_pixels(views, params.contiguous(), dtype == torch.float16)


KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # fs_load / fs_store's buffer kinds


def blur_normalize(planar: Tensor, kernels: Tensor, gray: Tensor, norm: Tensor, out_dtype: torch.dtype,
                   channels_last: bool) -> Tensor:
    """The rest of the pipeline after :func:`color_pixels`, in two kernels: the per-sample
    separable blur (``kernels`` ``[N, K]`` float32, reflect padding, a delta for samples that
    skip it), grayscale where ``gray`` ``[N]`` is 1, and ``x * norm[:3] + norm[3:]`` (the
    normalization), written once in ``out_dtype`` (float32, float16 or bfloat16), NHWC when
    ``channels_last``."""
    n, _, h, w = planar.shape
    k = kernels.shape[1]
    if planar.dtype not in PLANAR_DTYPES or not planar.is_contiguous():
        raise ValueError(f"blur_normalize: expected contiguous float32/float16 planar images, got {planar.dtype}")
    if kernels.shape != (n, k) or k % 2 == 0 or kernels.dtype != torch.float32 or min(h, w) <= k // 2:
        raise ValueError(f"blur_normalize: kernels must be float32 [{n}, odd K] with K // 2 < {min(h, w)}, "
                         f"got {kernels.dtype} {list(kernels.shape)}")
    if out_dtype not in KINDS:
        raise ValueError(f"blur_normalize: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    vertical = torch.ops.fastsiam.blur_vertical(planar, kernels.contiguous())
    return torch.ops.fastsiam.blur_horizontal_normalize(vertical, kernels.contiguous(), gray.float().contiguous(),
                                                        norm.contiguous(), KINDS[out_dtype], channels_last)


@torch.library.custom_op("fastsiam::blur_vertical", mutates_args=())
def _blur_vertical(planar: Tensor, kernels: Tensor) -> Tensor:
    n, _, h, w = planar.shape
    out = torch.empty_like(planar)
    if n:
        _kernel(planar.device, "fastsiam_blur_vertical")(
            grid=((n * 3 * h * w + THREADS - 1) // THREADS, 1, 1), block=(THREADS, 1, 1),
            args=[planar, out, kernels, KINDS[planar.dtype], n, h, w, kernels.shape[1]])
    return out


@_blur_vertical.register_fake
def _blur_vertical_fake(planar: Tensor, kernels: Tensor) -> Tensor:
    return torch.empty_like(planar)


def _normalized_out(planar: Tensor, kind: int, channels_last: bool) -> Tensor:
    dtype = next(d for d, k in KINDS.items() if k == kind)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(planar.shape, dtype=dtype, device=planar.device, memory_format=fmt)


@torch.library.custom_op("fastsiam::blur_horizontal_normalize", mutates_args=())
def _blur_horizontal_normalize(vertical: Tensor, kernels: Tensor, gray: Tensor, norm: Tensor, kind: int,
                               channels_last: bool) -> Tensor:
    n, _, h, w = vertical.shape
    out = _normalized_out(vertical, kind, channels_last)
    if n:
        _kernel(vertical.device, "fastsiam_blur_horizontal_normalize")(
            grid=((n * h * w + THREADS - 1) // THREADS, 1, 1), block=(THREADS, 1, 1),
            args=[vertical, out, kernels, gray, norm, KINDS[vertical.dtype], kind, int(channels_last), n, h, w,
                  kernels.shape[1]])
    return out


@_blur_horizontal_normalize.register_fake
def _blur_horizontal_normalize_fake(vertical: Tensor, kernels: Tensor, gray: Tensor, norm: Tensor, kind: int,
                                    channels_last: bool) -> Tensor:
    return _normalized_out(vertical, kind, channels_last)


def _grid(views: Tensor) -> tuple[int, int, int, list[int]]:
    n, _, h, w = views.shape
    return n, h, w, list(views.stride())


@torch.library.custom_op("fastsiam::contrast_partial", mutates_args=())
def _contrast_partial(views: Tensor, params: Tensor) -> Tensor:
    n, h, w, st = _grid(views)
    partial = torch.empty((n, PARTIAL_BLOCKS), dtype=torch.float32, device=views.device)
    if n:
        _kernel(views.device, "fastsiam_contrast_partial")(
            grid=(PARTIAL_BLOCKS, n, 1), block=(THREADS, 1, 1), args=[views, params, partial, n, h, w, *st])
    return partial


@_contrast_partial.register_fake
def _contrast_partial_fake(views: Tensor, params: Tensor) -> Tensor:
    return torch.empty((views.shape[0], PARTIAL_BLOCKS), dtype=torch.float32, device=views.device)


@torch.library.custom_op("fastsiam::color_pixels", mutates_args=())
def _color_pixels(views: Tensor, params: Tensor, half: bool) -> Tensor:
    n, h, w, st = _grid(views)
    dtype = torch.float16 if half else torch.float32
    out = torch.empty((n, 3, h, w), dtype=dtype, device=views.device)
    if n:
        _kernel(views.device, "fastsiam_color_pixels")(
            grid=((n * h * w + THREADS - 1) // THREADS, 1, 1), block=(THREADS, 1, 1),
            args=[views, params, out, KINDS[dtype], n, h, w, *st])
    return out


@_color_pixels.register_fake
def _color_pixels_fake(views: Tensor, params: Tensor, half: bool) -> Tensor:
    n, _, h, w = views.shape
    return torch.empty((n, 3, h, w), dtype=torch.float16 if half else torch.float32, device=views.device)


def _kernel(device: torch.device, name: str) -> Callable[..., None]:
    return nvrtc.launcher(KERNEL_SOURCE, name, device, "fastsiam's fused colour kernels")


def tolerance(dtype: torch.dtype) -> float:
    """Largest difference allowed between the kernels' output in ``dtype`` and the plain ops in
    float32 on the same input: the kernels compute in float32 and round once, to ``dtype`` (half
    an ulp at 1.0, so one ``eps`` bounds it); in float32 only the order of the operations and the
    contrast mean's summation differ (measured <= 2e-6, the hue's division included)."""
    return torch.finfo(dtype).eps if torch.finfo(dtype).bits == 16 else 1e-5


def fused_color_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernels compile on ``device`` and agree with the plain ops in float32 within
    :func:`tolerance` of ``dtype`` (checked once per device and dtype on a small batch, every
    jitter order among its samples; cached). False with one warning when not, so the caller
    keeps the plain ops. Under fake CUDA (the traffic counter) they are counted, not run: true."""
    from fastsiam.augment.simsiam import SimSiamAugment

    if is_fake(torch.empty(0, device=device)):
        return True
    key = (device, dtype)
    if key in _WORKS:
        return _WORKS[key]
    g = torch.Generator().manual_seed(0)
    views = torch.randint(0, 256, (48, 3, 9, 11), generator=g, dtype=torch.uint8)
    aug = SimSiamAugment(hue=0.5)  # every op on, the hue's whole range
    p = aug.sample_params(48, generator=g)
    reason = None
    try:
        want = aug._color_jitter(aug._to_planar(views, p), p)  # the plain ops, float32, on the CPU
        dev = p._replace(**{f: getattr(p, f).to(device) for f in ("flip", "jitter", "order", "factors")})
        params = pixel_params(dev.flip, dev.jitter, dev.order, dev.factors)
        planar = color_pixels(views.to(device), params, dtype)
        err = (planar.float().cpu() - want).abs().max().item()
        # the blur and normalization on the kernels' own output, against the plain ops in float32
        kernels = torch.rand(48, 5, generator=g)
        kernels /= kernels.sum(dim=1, keepdim=True)
        gray, norm = (torch.rand(48, generator=g) < 0.5).float(), torch.tensor([4.0, 4.5, 4.4, -2.1, -2.0, -1.8])
        blurred = AF.separable_blur(planar.float().cpu(), kernels)
        blurred = torch.where(gray.view(-1, 1, 1, 1) > 0, AF.rgb_to_grayscale(blurred).expand_as(blurred), blurred)
        plain = blurred * norm[:3].view(1, 3, 1, 1) + norm[3:].view(1, 3, 1, 1)
        got = blur_normalize(planar, kernels.to(device), gray.to(device), norm.to(device), torch.float32, True)
        err = max(err, (got.cpu() - plain).abs().max().item() / 5.0)  # in the planar values' units (x 1/std)
        if not err <= tolerance(dtype):
            reason = f"differ from the plain ops in float32 by {err:.3g} (allowed {tolerance(dtype):.3g})"
    except Exception as exc:  # no _compile_kernel, no NVRTC, a compile error: keep the plain ops
        reason = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    _WORKS[key] = reason is None
    if reason is not None:
        warnings.warn(f"fastsiam: the fused colour kernels (torch.cuda._compile_kernel) on {device} in "
                      f"{dtype} {reason}; using the plain torch ops (aug.fused_color: false silences this)",
                      RuntimeWarning, stacklevel=2)
    return _WORKS[key]
