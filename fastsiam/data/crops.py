"""Crop boxes shared by the fast backends: counter-based RandomResizedCrop, the eval box, and the
device augmentation's per-view draws (:func:`view_uniforms`).

Every backend that cuts its own crops (ffcv, nvjpeg; DALI draws its own) takes the boxes from
here, so one (seed, epoch, sample, view) gives the same box whatever the backend, the number
of workers or threads, the rank or the world size. There is no RNG state to carry: each draw
is a hash of its coordinates (a counter-based generator in the sense of Salmon et al.,
"Parallel Random Numbers: As Easy as 1, 2, 3", SC 2011), built from the splitmix64 mixer
(Steele, Lea & Flood, "Fast Splittable Pseudorandom Number Generators", OOPSLA 2014).

The box distribution is torchvision's ``RandomResizedCrop.get_params``: up to ten tries of
(area fraction uniform in ``scale``, log aspect ratio uniform in ``log(ratio)``), the first
box that fits wins, else the largest central box within the ratio range.

Two implementations of the same function: :func:`random_crop_boxes` (numpy, vectorized over
a batch, for backends without numba) and the scalar kernels of :func:`scalar_kernels`
(compiled with numba's ``njit`` inside the FFCV decoder). The tests hold them equal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

ATTEMPTS = 10  # torchvision's tries before the central fallback
DRAWS_PER_ATTEMPT = 4  # area, log-ratio, top, left

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_TO_UNIT = 1.0 / 9007199254740992.0  # 2**-53: the top 53 bits as a float in [0, 1)
_MASK = (1 << 64) - 1
_S40 = np.uint64(40)
# The augmentation's draws come from step(sample key, AUGMENT_STREAM), a stream of their own: a
# sample key's own stream holds its crop box's draws.
AUGMENT_STREAM = np.uint64(2)


def mix64(x):
    """splitmix64's output function on uint64 (arrays or numba scalars): bijective, and
    neighbouring inputs give unrelated outputs. Wraps modulo 2**64 by design."""
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


def _step(key, value):
    # One link of the key chain; adding the odd constant keeps mix64(0) = 0 from absorbing.
    return mix64((key ^ value) + _GAMMA)


def seed_key(seed: int) -> np.uint64:
    """The key of a run; ``step(seed_key, epoch)`` is the epoch's key (see scalar_kernels)."""
    return _step(np.zeros(1, np.uint64), np.uint64(seed & _MASK))[0]


def epoch_key(seed: int, epoch: int) -> np.uint64:
    """The key of one epoch of one run; every sample key derives from it."""
    return _step(np.full(1, seed_key(seed), np.uint64), np.uint64(epoch & _MASK))[0]


def sample_keys(
    seed: int, epoch: int, indices: Sequence[int] | np.ndarray, view: int
) -> np.ndarray:
    """uint64 keys for ``view`` (0 or 1) of the samples ``indices`` in ``epoch``."""
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    return _step(_step(np.full(idx.shape, epoch_key(seed, epoch), np.uint64), idx), np.uint64(view))


def derive_seed(*values: int) -> int:
    """A 63-bit seed hashed from integers (e.g. seed, epoch, rank, batch), for torch generators."""
    k = np.zeros(1, np.uint64)
    for v in values:
        k = _step(k, np.uint64(v & _MASK))
    return int(k[0]) & (2**63 - 1)


def uniforms(keys: np.ndarray, count: int) -> np.ndarray:
    """``[len(keys), count]`` floats in [0, 1): draw ``c`` of key ``k`` is
    mix64(k + (c + 1) * gamma), splitmix64's stream seeded at ``k``."""
    return (_stream_bits(keys, count) >> _S11).astype(np.float64) * _TO_UNIT


def view_uniforms(seed: int, epoch: int, indices: Sequence[int] | np.ndarray, count: int) -> np.ndarray:
    """The device augmentation's random numbers for a batch: float32 ``[2 * len(indices), count]``
    in [0, 1), view-major (every sample's first view, then every second), as the batch's views.

    Row ``(v, i)`` depends on (seed, epoch, sample ``indices[i]``, view ``v``) alone, like the crop
    boxes, from its own stream of the sample key (:data:`AUGMENT_STREAM`), so a sample's flip,
    jitter, grayscale, blur and solarize draws are the same whatever batch, rank or world size
    it lands in. 24 bits per draw, exact in float32 (never rounds up to 1).
    """
    keys = np.concatenate([sample_keys(seed, epoch, indices, v) for v in (0, 1)])
    bits = _stream_bits(_step(keys, AUGMENT_STREAM), count)
    return (bits >> _S40).astype(np.float32) * np.float32(2.0**-24)


def _stream_bits(keys: np.ndarray, count: int) -> np.ndarray:
    """uint64 ``[len(keys), count]``: word ``c`` of key ``k`` is mix64(k + (c + 1) * gamma)."""
    c = np.arange(1, count + 1, dtype=np.uint64)
    return mix64(keys.astype(np.uint64)[:, None] + c[None, :] * _GAMMA)


def random_crop_boxes(
    keys: np.ndarray,
    heights: np.ndarray,
    widths: np.ndarray,
    scale: Sequence[float],
    ratio: Sequence[float],
) -> np.ndarray:
    """RandomResizedCrop boxes for a batch: int64 ``[B, 4]`` rows of (top, left, height, width).

    Args:
        keys: uint64 ``[B]`` from :func:`sample_keys`.
        heights, widths: the source images' sizes.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (width / height).
    """
    keys = np.atleast_1d(np.asarray(keys, dtype=np.uint64))
    H = np.asarray(heights, dtype=np.int64).reshape(-1, 1)
    W = np.asarray(widths, dtype=np.int64).reshape(-1, 1)
    u = uniforms(keys, ATTEMPTS * DRAWS_PER_ATTEMPT).reshape(-1, ATTEMPTS, DRAWS_PER_ATTEMPT)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    area = (H * W).astype(np.float64) * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = np.rint(np.sqrt(area * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    top = np.floor(u[..., 2] * (H - h + 1)).astype(np.int64)
    left = np.floor(u[..., 3] * (W - w + 1)).astype(np.int64)
    first = np.argmax(fits, axis=1)
    rows = np.arange(len(keys))
    out = np.stack([top[rows, first], left[rows, first], h[rows, first], w[rows, first]], axis=1)
    miss = ~fits.any(axis=1)
    if miss.any():
        out[miss] = _fallback_boxes(H[miss, 0], W[miss, 0], ratio)
    return out


def _fallback_boxes(H: np.ndarray, W: np.ndarray, ratio: Sequence[float]) -> np.ndarray:
    in_ratio = W / H
    lo, hi = min(ratio), max(ratio)
    w = np.where(in_ratio < lo, W, np.where(in_ratio > hi, np.rint(H * hi), W)).astype(np.int64)
    h = np.where(in_ratio < lo, np.rint(W / lo), H).astype(np.int64)
    return np.stack([(H - h) // 2, (W - w) // 2, h, w], axis=1)


def scalar_kernels(jit):
    """The scalar twins of :func:`sample_keys` and :func:`random_crop_boxes`, compiled by ``jit``.

    Returns ``(step, crop_box)``: ``step(key, value)`` is one link of the key chain
    (``sample key = step(step(epoch_key, index), view)``) and ``crop_box(key, height, width,
    scale_lo, scale_hi, log_ratio_lo, log_ratio_hi, ratio_lo, ratio_hi)`` one box
    (top, left, h, w). ``jit`` is numba's ``njit`` in the FFCV decoder; the functions call each
    other through closures so that this module itself never imports numba.
    """
    mix = jit(mix64)

    def step(key, value):
        return mix((key ^ value) + _GAMMA)

    def unit(key, counter):
        return float(mix(key + np.uint64(counter) * _GAMMA) >> _S11) * _TO_UNIT

    unit = jit(unit)

    def crop_box(
        key, height, width, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi, ratio_lo, ratio_hi
    ):
        area = float(height) * float(width)
        for attempt in range(ATTEMPTS):
            c = attempt * DRAWS_PER_ATTEMPT
            target = area * (scale_lo + (scale_hi - scale_lo) * unit(key, c + 1))
            aspect = math.exp(log_ratio_lo + (log_ratio_hi - log_ratio_lo) * unit(key, c + 2))
            w = int(np.rint(math.sqrt(target * aspect)))
            h = int(np.rint(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(unit(key, c + 3) * (height - h + 1))
                left = int(unit(key, c + 4) * (width - w + 1))
                return top, left, h, w
        w, h = width, height
        if width / height < ratio_lo:
            h = int(np.rint(width / ratio_lo))
        elif width / height > ratio_hi:
            w = int(np.rint(height * ratio_hi))
        return (height - h) // 2, (width - w) // 2, h, w

    return jit(step), jit(crop_box)


def eval_crop_fraction(image_size: int) -> float:
    """Side of the eval crop over the short side: resize to ``round(image_size / 0.875)``
    (256 for 224) then center-crop ``image_size`` is this central square of the source."""
    return image_size / round(image_size / 0.875)


def center_crop_boxes(heights: np.ndarray, widths: np.ndarray, image_size: int) -> np.ndarray:
    """The eval boxes (top, left, side, side) for a batch, int64 ``[B, 4]``.

    The central square of side ``floor(short side * eval_crop_fraction)`` at offsets
    ``(H - side) // 2``, ``(W - side) // 2``: FFCV's ``CenterCropRGBImageDecoder`` rule, which
    every backend follows (the same content as resize-then-crop, placed to the pixel).
    """
    H = np.asarray(heights, dtype=np.int64)
    W = np.asarray(widths, dtype=np.int64)
    side = np.floor(np.minimum(H, W) * eval_crop_fraction(image_size)).astype(np.int64)
    side = np.maximum(side, 1)
    return np.stack([(H - side) // 2, (W - side) // 2, side, side], axis=1)


__all__ = [
    "center_crop_boxes",
    "derive_seed",
    "epoch_key",
    "eval_crop_fraction",
    "mix64",
    "random_crop_boxes",
    "sample_keys",
    "scalar_kernels",
    "seed_key",
    "uniforms",
]
