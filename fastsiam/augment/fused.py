"""ColorJitter's slots as runtime-compiled CUDA kernels: one read and one write of the batch each.

In eager torch one ColorJitter slot of :class:`~fastsiam.augment.SimSiamAugment` is a batched
GEMM and a clamp (two reads and two writes of the batch) and the hue rotation is about twenty
plane-sized passes, because no eager kernel clamps its own output or does the HSV arithmetic in
one go. Here a slot, ``clamp(alpha x + beta luma(x) + gamma, 0, 1)`` per pixel with per-sample
``alpha``, ``beta``, ``gamma`` (brightness, saturation and contrast are all of this form), is one
elementwise kernel, and the last slot before the hue carries the hue rotation in the same
kernel. The kernels are compiled at first use by ``torch.cuda.jiterator`` (NVRTC inside
libtorch: no Triton, no nvcc, no ``torch.compile``), so they run in a captured CUDA graph
like any other elementwise kernel.

Contract:

- :func:`color_slot` is a ``torch.library`` custom op, ``fastsiam::color_slot``: on CUDA the
  jiterator kernel, elsewhere :func:`reference_slot`, the plain-torch twin (the ops the eager
  path runs); under ``FakeTensorMode`` one kernel that reads ``x`` and writes its result, which
  is what the fake-CUDA traffic counter sees.
- The kernels' source (:data:`SLOT_SOURCE`, :data:`SLOT_HUE_SOURCE`) is plain C++ on one
  pixel: tests/test_augment_fused.py compiles the same text with the host's C++ compiler and
  checks it against :func:`reference_slot` on the CPU; a ``@pytest.mark.cuda`` test checks the
  jiterator kernels against it on a GPU.
- :func:`fused_color_works` compiles and checks the kernels once per device and dtype, on a
  small batch, before they are used; a failure (no NVRTC, a compile error, a mismatch) is one
  warning, and the augmentation keeps the plain ops. Call it (the augmentation's first call
  does) before any CUDA graph capture, as that warm-up needs a host sync.

An elementwise kernel sees one element of each input, and its output is the broadcast shape:
the kernel writes ``[N, 3, H, W]`` (one thread per output value) from the three channel planes
of ``x`` (``[N, 1, H, W]`` views, broadcast over the channel dimension), a ``[1, 3, 1, 1]``
channel index and the ``[N, 1, 1, 1]`` per-sample parameters, and computes the whole pixel for
the channel it writes (the three channels of a pixel read the same input values, so the
recomputation costs arithmetic, not memory traffic).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from fastsiam.augment import functional as AF

__all__ = ["SLOT_HUE_SOURCE", "SLOT_SOURCE", "color_slot", "fused_color_works", "reference_slot"]

# One slot: clamp(alpha x + beta luma + gamma, 0, 1), the output channel `chan` of the pixel.
# Arithmetic in float whatever T is (float16 in the default CUDA path): one rounding per output.
SLOT_SOURCE = """
template <typename T> T fastsiam_color_slot(T r_, T g_, T b_, T chan_, T alpha_, T beta_, T gamma_) {
  float r = r_, g = g_, b = b_, alpha = alpha_, beta = beta_, gamma = gamma_;
  float luma = 0.2989f * r + 0.587f * g + 0.114f * b;
  float c = chan_;
  float x = c < 0.5f ? r : (c < 1.5f ? g : b);
  float y = alpha * x + beta * luma + gamma;
  y = y < 0.0f ? 0.0f : (y > 1.0f ? 1.0f : y);
  return T(y);
}
"""

# A slot, then the hue rotation by `shift` turns, as fastsiam.augment.functional.adjust_hue's
# closed form: every output channel is max - span * w(k), k = (n + 6 shift + 6 h) mod 6.
SLOT_HUE_SOURCE = """
template <typename T> T fastsiam_color_slot_hue(T r_, T g_, T b_, T chan_, T alpha_, T beta_, T gamma_, T shift_) {
  float r = r_, g = g_, b = b_, alpha = alpha_, beta = beta_, gamma = gamma_;
  float luma = 0.2989f * r + 0.587f * g + 0.114f * b;
  r = alpha * r + beta * luma + gamma;
  g = alpha * g + beta * luma + gamma;
  b = alpha * b + beta * luma + gamma;
  r = r < 0.0f ? 0.0f : (r > 1.0f ? 1.0f : r);
  g = g < 0.0f ? 0.0f : (g > 1.0f ? 1.0f : g);
  b = b < 0.0f ? 0.0f : (b > 1.0f ? 1.0f : b);
  float mx = r > g ? (r > b ? r : b) : (g > b ? g : b);
  float mn = r < g ? (r < b ? r : b) : (g < b ? g : b);
  float span = mx - mn;
  float num = mx == r ? g - b : (mx == g ? (b - r) + 2.0f * span : (r - g) + 4.0f * span);
  float c = chan_;
  float n = c < 0.5f ? 5.0f : (c < 1.5f ? 3.0f : 1.0f);
  float shift = shift_;
  float k = (n + 6.0f * shift) + num / (span > 1.17549435e-38f ? span : 1.17549435e-38f);
  k = fmodf(k, 6.0f);
  k = k < 0.0f ? k + 6.0f : k;
  float w = 4.0f - k;
  w = w < 0.0f ? 0.0f : (w > 1.0f ? 1.0f : w);
  w = w < k ? w : k;
  return T(mx - span * w);
}
"""

_KERNELS: dict[bool, object] = {}              # with_hue -> jiterator function (created lazily)
_CHANNELS: dict[tuple[torch.device, torch.dtype], Tensor] = {}
_WORKS: dict[tuple[torch.device, torch.dtype], bool] = {}


def reference_slot(x: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor, shift: Tensor | None) -> Tensor:
    """The plain-torch twin: one colour matrix ``alpha I + beta luma`` and offset ``gamma`` per
    sample, clamped (:func:`~fastsiam.augment.functional.color_matrix`), then the hue rotation
    by ``shift`` turns when given."""
    eye = torch.eye(3, dtype=x.dtype, device=x.device)
    luma = torch.tensor([list(AF.LUMA)] * 3, dtype=x.dtype, device=x.device)
    matrices = alpha.view(-1, 1, 1) * eye + beta.view(-1, 1, 1) * luma
    out = AF.color_matrix(x.contiguous(), matrices, gamma.view(-1, 1))
    return out if shift is None else AF.adjust_hue(out, shift)


def _check(x: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor, shift: Tensor | None) -> None:
    if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"color_slot: expected float images [N, 3, H, W], got {x.dtype} {list(x.shape)}")
    for name, p in (("alpha", alpha), ("beta", beta), ("gamma", gamma), ("shift", shift)):
        if p is not None and (p.shape != (x.shape[0],) or p.dtype != x.dtype):
            raise ValueError(f"color_slot: {name} must be [{x.shape[0]}] in {x.dtype}, got {p.dtype} {list(p.shape)}")


@torch.library.custom_op("fastsiam::color_slot", mutates_args=())
def color_slot(x: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor, shift: Tensor | None = None) -> Tensor:
    """``clamp(alpha x + beta luma(x) + gamma, 0, 1)`` per sample, then the hue rotation by
    ``shift`` turns when given: planar ``[N, 3, H, W]`` in [0, 1] in, a new planar tensor out.

    ``alpha``, ``beta``, ``gamma`` and ``shift`` are ``[N]`` in ``x``'s dtype. Brightness ``f`` is
    ``(f, 0, 0)``, saturation ``(f, 1 - f, 0)``, contrast ``(f, 0, (1 - f) mean_luma)``, and
    ``(1, 0, 0)`` leaves a sample unchanged bit for bit. On CUDA one jiterator kernel; on any
    other device :func:`reference_slot`.
    """
    _check(x, alpha, beta, gamma, shift)
    return reference_slot(x, alpha, beta, gamma, shift)


@color_slot.register_kernel("cuda")
def _color_slot_cuda(x: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor, shift: Tensor | None = None) -> Tensor:
    _check(x, alpha, beta, gamma, shift)
    params = [alpha, beta, gamma] if shift is None else [alpha, beta, gamma, shift]
    with_hue = shift is not None
    kernel = _KERNELS.get(with_hue)
    if kernel is None:
        from torch.cuda import jiterator  # created on first use: it records CUDA's availability

        kernel = jiterator._create_jit_fn(SLOT_HUE_SOURCE if with_hue else SLOT_SOURCE)
        _KERNELS[with_hue] = kernel
    key = (x.device, x.dtype)
    chan = _CHANNELS.get(key)
    if chan is None:
        chan = _CHANNELS[key] = torch.arange(3, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    per_sample = [p.view(-1, 1, 1, 1) for p in params]
    out = kernel(x[:, 0:1], x[:, 1:2], x[:, 2:3], chan, *per_sample)  # type: ignore[operator]
    # Broadcasting these shapes gives a planar result; the next slot's GEMV of the mean luma
    # and the blur rely on it, so any other layout is made planar here rather than there.
    return out if out.is_contiguous() else out.contiguous()


@color_slot.register_fake
def _color_slot_fake(x: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor, shift: Tensor | None = None) -> Tensor:
    _check(x, alpha, beta, gamma, shift)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def tolerance(dtype: torch.dtype) -> float:
    """Largest difference allowed between the kernels in ``dtype`` and :func:`reference_slot` in
    float32 on the same inputs: the kernels compute in float32 and round once, to ``dtype``
    (half an ulp at 1.0, so one ``eps`` bounds it); float32 leaves only the order of the
    operations (measured <= 1e-6, the hue's division included).

    Not the plain ops in ``dtype``: those round after every op, and in float16 drift up to
    7e-3 from float32 through the hue (2 x 256 random pixels), more than the kernels do.
    """
    return torch.finfo(dtype).eps if torch.finfo(dtype).bits == 16 else 1e-5


def fused_color_works(like: Tensor) -> bool:
    """Whether :func:`color_slot`'s CUDA kernels compile and agree with :func:`reference_slot`
    in float32 on ``like``'s device, within :func:`tolerance` of its dtype (checked once, on a
    small random batch; cached).

    False with one warning when they do not, so the caller keeps the plain ops. A fake tensor
    (the traffic counter) counts the kernels without running them: true for it.
    """
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(like):
        return True
    device, dtype = like.device, like.dtype
    key = (device, dtype)
    if key in _WORKS:
        return _WORKS[key]
    g = torch.Generator(device=device).manual_seed(0)
    n = 16
    x = torch.rand(n, 3, 8, 8, generator=g, device=device).to(dtype)
    alpha = (torch.rand(n, generator=g, device=device) * 0.8 + 0.6).to(dtype)
    beta = ((1 - alpha.float()) * (torch.rand(n, generator=g, device=device) < 0.5)).to(dtype)
    gamma = (torch.rand(n, generator=g, device=device) * 0.4 - 0.2).to(dtype)
    shift = (torch.rand(n, generator=g, device=device) * 0.2 - 0.1).to(dtype)
    reason = None
    try:
        for hue in (None, shift):
            got = color_slot(x, alpha, beta, gamma, hue).float()
            want = reference_slot(*(t.float() for t in (x, alpha, beta, gamma)),
                                  None if hue is None else hue.float())
            err = (got - want).abs().max().item()
            if not err <= tolerance(dtype):
                reason = f"differ from the plain ops in float32 by {err:.3g} (allowed {tolerance(dtype):.3g})"
                break
    except Exception as exc:  # no NVRTC, a compile error, an unsupported dtype: keep the plain ops
        reason = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    _WORKS[key] = reason is None
    if reason is not None:
        warnings.warn(f"fastsiam: the fused ColorJitter kernels (torch.cuda.jiterator) on {device} in "
                      f"{dtype} {reason}; using the plain torch ops (aug.fused_color: false silences this)",
                      RuntimeWarning, stacklevel=2)
    return _WORKS[key]
