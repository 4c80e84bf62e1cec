"""Batched image ops with per-sample parameters, equal to torchvision's v2 functional ops.

Every op takes float images in [0, 1] of shape ``[B, 3, H, W]`` (any memory format) and its
parameters as tensors of shape ``[B]``, one value per sample (a Python number applies to every
sample), and equals ``torchvision.transforms.v2.functional``'s op applied to each sample with
that sample's value (up to float rounding; tests/test_augment.py checks it).

None of them reads a tensor value on the host, branches on one, or makes a shape that depends
on data, so they run inside a captured CUDA graph. Parameter ranges are therefore not checked
here (that would need a device-to-host copy): the caller draws them in range.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LUMA", "adjust_brightness", "adjust_contrast", "adjust_hue", "adjust_saturation",
    "color_matrix", "gaussian_blur", "gaussian_kernels", "hflip", "normalize", "rgb_to_grayscale",
    "separable_blur", "solarize",
]

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale (and PIL's "L" conversion).
LUMA = (0.2989, 0.587, 0.114)


def _check(img: Tensor, op: str) -> None:
    if img.dim() != 4 or img.shape[1] != 3 or not img.is_floating_point():
        raise ValueError(
            f"{op}: expected float images of shape [B, 3, H, W], got {img.dtype} {list(img.shape)}"
        )


def _per_sample(value: Tensor | float, img: Tensor, name: str) -> Tensor:
    """``value`` as a ``[B, 1, 1, 1]`` tensor of the image's dtype and device."""
    b = img.shape[0]
    if isinstance(value, Tensor):
        if value.shape != (b,):
            raise ValueError(f"{name}: expected one value per sample, shape [{b}], got {list(value.shape)}")
        return value.to(device=img.device, dtype=img.dtype).view(b, 1, 1, 1)
    return torch.full((b, 1, 1, 1), float(value), dtype=img.dtype, device=img.device)


def _gray(img: Tensor) -> Tensor:
    """Luma as ``[B, 1, H, W]``, summed in torchvision's order."""
    r, g, b = img.unbind(dim=1)
    return r.mul(LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(1)


def rgb_to_grayscale(img: Tensor) -> Tensor:
    """Luma ``0.2989 R + 0.587 G + 0.114 B`` repeated on 3 channels (an expanded view)."""
    _check(img, "rgb_to_grayscale")
    return _gray(img).expand(img.shape)


def _blend(img: Tensor, ref: Tensor, factor: Tensor) -> Tensor:
    # torchvision's blend is img * f + ref * (1 - f), clamped; lerp computes the same blend in
    # one kernel.
    return torch.lerp(ref, img, factor).clamp_(0.0, 1.0)


def adjust_brightness(img: Tensor, factor: Tensor | float) -> Tensor:
    """Scale by ``factor`` (>= 0) and clamp to [0, 1]."""
    _check(img, "adjust_brightness")
    return img.mul(_per_sample(factor, img, "adjust_brightness")).clamp_(0.0, 1.0)


def adjust_contrast(img: Tensor, factor: Tensor | float) -> Tensor:
    """Blend with the mean luma of each image: ``factor`` 0 gives a flat grey image."""
    _check(img, "adjust_contrast")
    mean = _gray(img).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(img, mean, _per_sample(factor, img, "adjust_contrast"))


def adjust_saturation(img: Tensor, factor: Tensor | float) -> Tensor:
    """Blend with each pixel's luma: ``factor`` 0 gives the grayscale image."""
    _check(img, "adjust_saturation")
    return _blend(img, _gray(img), _per_sample(factor, img, "adjust_saturation"))


def adjust_hue(img: Tensor, factor: Tensor | float) -> Tensor:
    """Rotate the hue by ``factor`` turns (in [-0.5, 0.5]) in HSV space.

    Written without the HSV round trip's six-way table: a hue rotation keeps each pixel's
    max and min channel, and every output channel is ``max - (max - min) * w(k)`` with
    ``k = (n + 6 h) mod 6`` (n = 5, 3, 1 for R, G, B) and ``w(k) = clamp(min(k, 4 - k), 0, 1)``,
    the standard closed form of HSV -> RGB. It equals torchvision's (Pillow's) round trip up
    to float rounding.
    """
    _check(img, "adjust_hue")
    shift = _per_sample(factor, img, "adjust_hue").view(-1, 1, 1)
    r, g, b = img.unbind(dim=1)
    minc, maxc = torch.aminmax(img, dim=1)
    span = maxc - minc
    # Hue in sixths of a turn, times span: the max channel's sector plus the offset within it.
    num = torch.where(
        maxc == r, g - b,
        torch.where(maxc == g, (b - r).add_(span, alpha=2.0), (r - g).add_(span, alpha=4.0)),
    )
    # Grey pixels (span 0) have num 0 and no hue; the clamp only avoids 0 / 0 there.
    # The per-channel offset n and the shift fold into one [B, 3, 1, 1] term, so the division
    # writes the three channels' k = (n + 6 shift + h) mod 6 directly: one pass over the 1-plane
    # hue instead of a divide, an add and a remainder on it.
    n = torch.arange(5, 0, -2, device=img.device, dtype=img.dtype).view(1, 3, 1, 1)
    k = torch.addcdiv(n + shift.unsqueeze(1) * 6.0, num.unsqueeze(1),
                      span.clamp_min(torch.finfo(img.dtype).tiny).unsqueeze(1)).remainder_(6.0)
    # clamp(min(k, 4 - k), 0, 1) as min(clamp(4 - k, 0, 1), k): equal for k >= 0, bit for bit.
    w = torch.minimum(torch.rsub(k, 4.0).clamp_(0.0, 1.0), k)
    return torch.addcmul(maxc.unsqueeze(1), span.unsqueeze(1), w, value=-1.0)


def gaussian_kernels(sigma: Tensor, kernel_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Normalized 1-D Gaussian kernels ``[B, kernel_size]``, one per sigma, as torchvision's.

    torchvision samples ``x`` at ``(i - K // 2) / sqrt(2)`` and takes ``softmax(-(x / sigma)^2)``,
    i.e. ``exp(-d^2 / (2 sigma^2))`` at integer offsets ``d``, normalized to sum 1.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"gaussian_blur: kernel_size must be a positive odd integer, got {kernel_size}")
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, steps=kernel_size, dtype=dtype, device=sigma.device)
    return torch.softmax(x.div(sigma.to(dtype).view(-1, 1)).pow(2).neg(), dim=1)


def gaussian_blur(img: Tensor, sigma: Tensor | float, kernel_size: int = 23) -> Tensor:
    """Gaussian blur with a per-sample ``sigma``, reflect padding, square ``kernel_size``."""
    _check(img, "gaussian_blur")
    kern = gaussian_kernels(_per_sample(sigma, img, "gaussian_blur").view(-1), kernel_size, img.dtype)
    return separable_blur(img, kern)


def separable_blur(img: Tensor, kernels: Tensor) -> Tensor:
    """Filter each sample with its own symmetric 1-D kernel ``kernels[i]`` (``[B, K]``, K odd)
    along rows, then columns, with reflect padding.

    The image is padded once and filtered by depthwise convolutions whose groups are the
    ``B * 3`` image planes (each plane gets its own sample's kernel). A one-hot (delta) kernel
    returns the sample exactly, so samples that skip the blur need no select afterwards.
    """
    _check(img, "separable_blur")
    bsz, c, h, w = img.shape
    kernel_size = kernels.shape[1]
    half = kernel_size // 2
    if min(h, w) <= half:
        raise ValueError(
            f"gaussian_blur: reflect padding for kernel_size {kernel_size} needs images larger "
            f"than {half} px per side, got {h}x{w}"
        )
    kern = kernels.to(img.dtype).repeat_interleave(c, dim=0)  # [B * 3, K]: one per image plane
    planes = F.pad(img.contiguous(), (half, half, half, half), mode="reflect")
    planes = planes.view(1, bsz * c, h + 2 * half, w + 2 * half)
    planes = F.conv2d(planes, kern.view(bsz * c, 1, 1, kernel_size), groups=bsz * c)
    planes = F.conv2d(planes, kern.view(bsz * c, 1, kernel_size, 1), groups=bsz * c)
    return planes.view(bsz, c, h, w)


def color_matrix(img: Tensor, matrix: Tensor, offset: Tensor | None = None, *,
                 clamp: bool = True, channels_last_out: bool = False) -> Tensor:
    """Per-sample affine colour map ``clamp(M_i x + o_i)`` of every pixel, in one batched GEMM.

    Brightness, contrast, saturation and grayscale are all of this form (see
    :class:`fastsiam.augment.SimSiamAugment`), as is normalization; one ``baddbmm`` over ``[B, 3, H*W]`` reads the batch once and writes it
    once, where the blend formulation needs a pass per term. The identity matrix with a zero
    offset returns every finite pixel bit for bit.

    Args:
        img: float ``[B, 3, H, W]``, planar (NCHW contiguous).
        matrix: ``[B, 3, 3]`` (or ``[1, 3, 3]``), applied as ``out = matrix @ pixel``.
        offset: broadcastable to ``[B, 3]`` (e.g. ``[B, 1]``: one value for every channel), added
            after the product; None for none.
        clamp: clamp the result to [0, 1] (as torchvision's colour ops do).
        channels_last_out: return a channels_last tensor (the GEMM writes NHWC directly).
    """
    _check(img, "color_matrix")
    b, c, h, w = img.shape
    planes = img.reshape(b, c, h * w)
    m = matrix.to(img.dtype).expand(b, 3, 3)  # no copy when already in the image's dtype
    o = None if offset is None else offset.to(img.dtype).expand(b, 3)
    if channels_last_out:  # [B, HW, 3] = pixels^T @ M^T: the NHWC layout, no transpose copy
        lhs, rhs = planes.transpose(1, 2), m.transpose(1, 2)
        out = torch.bmm(lhs, rhs) if o is None else torch.baddbmm(o.unsqueeze(1), lhs, rhs)
        out = out.view(b, h, w, c).permute(0, 3, 1, 2)
    else:
        out = torch.bmm(m, planes) if o is None else torch.baddbmm(o.unsqueeze(2), m, planes)
        out = out.view(b, c, h, w)
    return out.clamp_(0.0, 1.0) if clamp else out


def solarize(img: Tensor, threshold: Tensor | float) -> Tensor:
    """Invert the pixels at or above ``threshold`` (``1 - x``)."""
    _check(img, "solarize")
    return torch.where(img >= _per_sample(threshold, img, "solarize"), 1.0 - img, img)


def hflip(img: Tensor, mask: Tensor) -> Tensor:
    """Mirror left-right the samples where the bool ``mask`` ``[B]`` is set."""
    if img.dim() != 4:
        raise ValueError(f"hflip: expected images of shape [B, C, H, W], got {list(img.shape)}")
    if mask.shape != (img.shape[0],) or mask.dtype != torch.bool:
        raise ValueError(f"hflip: expected a bool mask of shape [{img.shape[0]}], got {mask.dtype} {list(mask.shape)}")
    # One gather along W with a per-sample column index (reversed where flipped): one read and
    # one write of the images, where flip + where read them twice and wrote them twice. The
    # index is [B, 1, 1, W], expanded (no copy) to the image shape.
    w = img.shape[-1]
    cols = torch.arange(w, device=img.device)
    index = torch.where(mask.view(-1, 1, 1, 1), (w - 1) - cols, cols)
    return torch.gather(img, -1, index.expand(img.shape))


def normalize(img: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """``(img - mean) / std`` per channel.

    Sequences become device tensors here (a host-to-device copy: pass tensors already on the
    device inside a captured graph).
    """
    _check(img, "normalize")
    mean_t = torch.as_tensor(mean, dtype=img.dtype, device=img.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=img.dtype, device=img.device).view(1, -1, 1, 1)
    return img.sub(mean_t).div_(std_t)
