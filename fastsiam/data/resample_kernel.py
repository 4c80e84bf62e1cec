"""Crop-and-resize of a batch as one runtime-compiled CUDA kernel: the images read once, the
crops written once.

:func:`fastsiam.data.resample.crop_resize` builds the resize from torch ops: a gather of each
crop's window, a float16 copy for the matrix products, two products and a cast, about 36 times
the output's bytes of device traffic per batch (``tests/test_resample.py``). Here one thread
computes one output pixel (its three channels) straight from the uint8 image: the antialiased
bilinear weights of its row and column (the triangle filter widened by the downscale factor,
as torch's ``interpolate(..., antialias=True)`` and PIL), the separable weighted sum in
float32 over the taps, and the rounded uint8 result in the NHWC output. The device reads the
images and the crops' metadata and writes the output: about three times the output's bytes.

The kernel is compiled at first use by ``torch.cuda._compile_kernel`` (NVRTC inside libtorch,
torch >= 2.8: no nvcc, no Triton), once per device.

Contract:

- :func:`crop_resize_kernel` has the signature of ``crop_resize`` (less ``budget``): one
  host->device copy (eight int64 per crop: the image's address and strides, the box), one
  launch of ``fastsiam::crop_resize_kernel``, a ``torch.library`` custom op whose fake kernel
  the fake-CUDA traffic counter sees (it reads the images, writes ``out``).
- :data:`PIXEL_SOURCE` is plain C++ on one output pixel: tests/test_resample_kernel.py compiles
  the same text with the host's C++ compiler and checks it against ``crop_resize`` and
  torchvision on the CPU; a ``@pytest.mark.cuda`` test checks the compiled kernel on a GPU.
- :func:`kernel_works` compiles and checks the kernel once per device on a small batch against
  ``crop_resize`` on the CPU; a failure (torch without ``_compile_kernel``, no NVRTC, a compile
  error, a mismatch) is one warning, and the caller keeps ``crop_resize``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from fastsiam import nvrtc
from fastsiam.data.resample import crop_resize

__all__ = ["KERNEL_SOURCE", "PIXEL_SOURCE", "crop_resize_kernel", "kernel_works"]

META_COLUMNS = 8  # per crop: address, channel/row/column strides, top, left, height, width

# Output pixel t = (crop k, row oy, column ox) of an [n, size, size, 3] uint8 output. Along each
# axis (a crop of `length` inputs to `size` outputs) every distance is an integer over 2 * size,
# as in fastsiam.data.resample._filter_taps: output o is centred at (2o + 1) length, input j at
# 2 size j + size, the filter's half-width is 2 max(length, size); a tap's weight is
# max(0, 1 - |distance| / half-width), inputs past the crop weigh nothing, and an axis' weights
# are divided by their sum. FASTSIAM_DEVICE is __device__ under NVRTC and empty on the host.
PIXEL_SOURCE = """
FASTSIAM_DEVICE inline float fastsiam_tap(long long distance, long long support) {
  long long d = distance < 0 ? -distance : distance;
  float w = 1.0f - (float)d / (float)support;
  return w > 0.0f ? w : 0.0f;
}

FASTSIAM_DEVICE inline long long fastsiam_first_tap(long long centre, long long support, int size) {
  long long f = centre - support + size;
  return f < 0 ? 0 : f / (2LL * size);
}

FASTSIAM_DEVICE inline unsigned char fastsiam_to_u8(float v) {
  v += 0.5f;  /* the weights sum to one: truncation after +0.5 rounds to nearest */
  return v >= 255.0f ? (unsigned char)255 : (v <= 0.0f ? (unsigned char)0 : (unsigned char)v);
}

FASTSIAM_DEVICE void fastsiam_crop_resize_pixel(const long long* meta, unsigned char* out, int size, long long t) {
  long long per_crop = (long long)size * size;
  long long k = t / per_crop;
  long long rest = t - k * per_crop;
  long long oy = rest / size, ox = rest - oy * size;
  const long long* m = meta + 8 * k;
  const unsigned char* image = (const unsigned char*)m[0];
  long long sc = m[1], sy = m[2], sx = m[3], top = m[4], left = m[5], h = m[6], w = m[7];
  long long support_y = 2 * (h > size ? h : size), centre_y = (2 * oy + 1) * h;
  long long support_x = 2 * (w > size ? w : size), centre_x = (2 * ox + 1) * w;
  long long first_y = fastsiam_first_tap(centre_y, support_y, size);
  long long first_x = fastsiam_first_tap(centre_x, support_x, size);
  long long step = 2LL * size;
  float sum_y = 0.0f, sum_x = 0.0f;
  for (long long j = first_y; j < h && step * j + size - centre_y < support_y; ++j)
    sum_y += fastsiam_tap(step * j + size - centre_y, support_y);
  for (long long j = first_x; j < w && step * j + size - centre_x < support_x; ++j)
    sum_x += fastsiam_tap(step * j + size - centre_x, support_x);
  float acc0 = 0.0f, acc1 = 0.0f, acc2 = 0.0f;
  for (long long jy = first_y; jy < h && step * jy + size - centre_y < support_y; ++jy) {
    float wy = fastsiam_tap(step * jy + size - centre_y, support_y) / sum_y;
    if (wy == 0.0f) continue;
    const unsigned char* row = image + (top + jy) * sy;
    float r0 = 0.0f, r1 = 0.0f, r2 = 0.0f;
    for (long long jx = first_x; jx < w && step * jx + size - centre_x < support_x; ++jx) {
      float wx = fastsiam_tap(step * jx + size - centre_x, support_x) / sum_x;
      const unsigned char* p = row + (left + jx) * sx;
      r0 += wx * (float)p[0];
      r1 += wx * (float)p[sc];
      r2 += wx * (float)p[2 * sc];
    }
    acc0 += wy * r0;
    acc1 += wy * r1;
    acc2 += wy * r2;
  }
  unsigned char* o = out + 3 * t;
  o[0] = fastsiam_to_u8(acc0);
  o[1] = fastsiam_to_u8(acc1);
  o[2] = fastsiam_to_u8(acc2);
}
"""

KERNEL_NAME = "fastsiam_crop_resize"
KERNEL_SOURCE = "#define FASTSIAM_DEVICE __device__\n" + PIXEL_SOURCE + """
extern "C" __global__ void fastsiam_crop_resize(const long long* meta, unsigned char* out, int crops, int size) {
  long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (t < (long long)crops * size * size) fastsiam_crop_resize_pixel(meta, out, size, t);
}
"""

THREADS = 256
_WORKS: dict[torch.device, bool] = {}


def crop_metadata(images: Sequence[Tensor], source: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """int64 ``[n, 8]``: per crop its image's address and (channel, row, column) strides, and
    its box (top, left, height, width). A fake tensor (the traffic counter) has no address: 0."""
    per_image = np.array([(0 if is_fake(im) else im.data_ptr(), *im.stride()) for im in images],
                         dtype=np.int64).reshape(-1, 4)
    src = np.asarray(source, dtype=np.int64)
    return np.ascontiguousarray(np.concatenate([per_image[src], np.asarray(boxes, dtype=np.int64)], axis=1))


def crop_resize_kernel(
    images: Sequence[Tensor], source: np.ndarray, boxes: np.ndarray, size: int, out: Tensor | None = None
) -> Tensor:
    """Resized crops of uint8 ``[3, H, W]`` CUDA images as uint8 NHWC ``[n, size, size, 3]``, by
    the kernel (arguments as :func:`fastsiam.data.resample.crop_resize`). The images must stay
    alive until the kernel has run (stream order: until the caller's stream passes it)."""
    device = images[0].device
    n = len(boxes)
    if out is None:
        out = torch.empty((n, size, size, 3), dtype=torch.uint8, device=device)
    if any(im.dtype != torch.uint8 or im.dim() != 3 or im.shape[0] != 3 for im in images):
        raise ValueError("crop_resize_kernel: expected uint8 [3, H, W] images")
    if out.shape != (n, size, size, 3) or out.dtype != torch.uint8 or not out.is_contiguous():
        raise ValueError(f"crop_resize_kernel: out must be contiguous uint8 [{n}, {size}, {size}, 3], "
                         f"got {out.dtype} {list(out.shape)}")
    meta = torch.from_numpy(crop_metadata(images, source, boxes)).to(device, non_blocking=True)
    torch.ops.fastsiam.crop_resize_kernel(list(images), meta, out, size)
    return out


@torch.library.custom_op("fastsiam::crop_resize_kernel", mutates_args=("out",))
def _crop_resize_op(images: list[Tensor], meta: Tensor, out: Tensor, size: int) -> None:
    # ``images`` are read through the addresses in ``meta``; they are arguments so that the
    # op's reads are visible (to the traffic counter, to anything that orders by arguments).
    # ``out`` is only written, but the counter sees a mutated argument as read and written.
    n = meta.shape[0]
    if n:
        _kernel(out.device)(grid=((n * size * size + THREADS - 1) // THREADS, 1, 1), block=(THREADS, 1, 1),
                            args=[meta, out, n, size])


@_crop_resize_op.register_fake
def _crop_resize_fake(images: list[Tensor], meta: Tensor, out: Tensor, size: int) -> None:
    return None


def _kernel(device: torch.device) -> Callable[..., None]:
    return nvrtc.launcher(KERNEL_SOURCE, KERNEL_NAME, device, "fastsiam::crop_resize_kernel")


def kernel_works(device: torch.device | str) -> bool:
    """Whether the kernel compiles on ``device`` and equals :func:`crop_resize` on the CPU
    within one level on a small batch (checked once per device; cached). False with one
    warning when not, so the caller keeps ``crop_resize``. Under fake CUDA (the traffic
    counter) it is counted, not run: true."""
    device = torch.device(device)
    if is_fake(torch.empty(0, device=device)):
        return True
    if device in _WORKS:
        return _WORKS[device]
    g = torch.Generator().manual_seed(0)
    sizes = [(37, 50), (50, 29), (64, 64), (20, 90)]
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
    source = np.array([0, 1, 2, 3, 2, 0])
    boxes = np.array([[0, 0, 37, 50], [3, 2, 40, 20], [10, 5, 30, 59], [0, 40, 20, 50],
                      [0, 0, 64, 64], [20, 30, 10, 9]])
    reason = None
    try:
        want = crop_resize(images, source, boxes, 24)
        got = crop_resize_kernel([im.to(device) for im in images], source, boxes, 24).cpu()
        err = int((got.int() - want.int()).abs().max())
        if err > 1:
            reason = f"differs from crop_resize by {err} levels (allowed 1)"
    except Exception as exc:  # no _compile_kernel, no NVRTC, a compile error: keep crop_resize
        reason = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    _WORKS[device] = reason is None
    if reason is not None:
        warnings.warn(f"fastsiam: the crop-resize kernel (torch.cuda._compile_kernel) on {device} "
                      f"{reason}; using the batched torch ops (nvjpeg option resize: batched "
                      "silences this)", RuntimeWarning, stacklevel=2)
    return _WORKS[device]
