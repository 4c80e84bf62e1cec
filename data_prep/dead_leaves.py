"""Photo-like images for benchmarks: the dead-leaves model with natural-image statistics.

Decode and resize costs depend on what a JPEG holds: flat colour fields and crisp shapes (the
toy ImageNet's classes) leave most 8x8 blocks with a handful of non-zero coefficients and
decode several times faster than photographs of the same size. A benchmark that means to say
how fast a loader is on ImageNet needs images whose entropy is a photograph's.

The dead-leaves model (Matheron 1968; Lee, Mumford & Huang, "Occlusion models for natural
images", IJCV 2001) is the standard stand-in: opaque discs dropped one over another, radii
drawn from a power law ``p(r) ~ r^-3`` between a pixel and a fraction of the frame, which
gives the scale invariance and the ``1/f^2`` power spectrum of natural scenes. The frame
also gets what real surfaces and cameras add and flat discs lack: a shading gradient, a fine
multiplicative texture (``1/f`` noise), a lens blur and sensor noise, so every block holds
detail at all frequencies, as in a photograph.

The painter has no class signal (the label is the folder a file is written to); it is for
measuring speed and bytes, not for training. ``make_toy_imagenet.py --style photo`` writes a
dataset of these in ImageNet's layout, at ImageNet's sizes and file sizes
(~0.11-0.25 MP, ~50-150 KB at JPEG quality 90).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Radii as fractions of the short side: the smallest leaf is about a pixel, the largest a
# third of the frame; between them p(r) ~ r^-3 (scale invariance, Lee et al. 2001).
MIN_RADIUS_PX = 1.0
MAX_RADIUS_FRACTION = 0.35
# How many times over the leaves cover the frame on average: at 5 the ground shows through
# e^-5 (0.7%) of the pixels.
COVERAGE = 5.0


def _power_law_radii(rng: np.random.Generator, n: int, r_min: float, r_max: float) -> np.ndarray:
    """``n`` radii with density proportional to r^-3 on [r_min, r_max] (inverse CDF)."""
    u = rng.random(n)
    inv_sq = r_min**-2 - u * (r_min**-2 - r_max**-2)
    return inv_sq**-0.5


def _pink_noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Zero-mean, unit-variance noise with a 1/f amplitude spectrum, ``[h, w]`` float32."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    spectrum = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) / f
    spectrum[0, 0] = 0.0
    noise = np.fft.irfft2(spectrum, s=(h, w)).astype(np.float32)
    return noise / max(float(noise.std()), 1e-6)


def paint_dead_leaves(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """One ``w`` x ``h`` RGB photo-like image drawn from ``rng``.

    Leaves are painted in random order (a later disc occludes an earlier one), each in a colour
    drawn around the scene's own palette; then a shading ramp, a fine texture, a lens blur
    and sensor noise are applied to the frame.
    """
    side = min(w, h)
    r_max = MAX_RADIUS_FRACTION * side
    # E[pi r^2] under r^-3 on [r_min, r_max] is 2 pi ln(r_max / r_min) / (1 - (r_min/r_max)^2).
    mean_area = 2 * np.pi * np.log(r_max / MIN_RADIUS_PX) / (1 - (MIN_RADIUS_PX / r_max) ** 2)
    n = max(64, round(COVERAGE * 1.44 * w * h / mean_area))  # 1.44: the margin drawn in
    radii = _power_law_radii(rng, n, MIN_RADIUS_PX, r_max)
    cx = rng.uniform(-0.1 * w, 1.1 * w, n)
    cy = rng.uniform(-0.1 * h, 1.1 * h, n)
    # A scene palette (a few dominant hues, as a photograph has) with per-leaf variation.
    palette = rng.uniform(20, 235, size=(rng.integers(3, 7), 3))
    base = palette[rng.integers(0, len(palette), n)]
    colours = np.clip(base + rng.normal(0, 28, size=(n, 3)), 0, 255)

    image = Image.new("RGB", (w, h), tuple(int(v) for v in palette[0]))
    draw = ImageDraw.Draw(image)
    for x, y, r, c in zip(cx, cy, radii, colours):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(int(c[0]), int(c[1]), int(c[2])))

    pixels = np.asarray(image, dtype=np.float32)
    # Shading over the frame (light falling across the scene) and a fine surface texture.
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    slope = rng.normal(0, 0.35, size=2) / side
    shading = 1.0 + slope[0] * (gx - w / 2) + slope[1] * (gy - h / 2)
    texture = 1.0 + 0.12 * _pink_noise(rng, h, w)
    pixels *= (shading * texture)[..., None]
    frame = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    frame = frame.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 0.9))))
    noisy = np.asarray(frame, dtype=np.float32) + rng.normal(0, 2.5, size=(h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


__all__ = ["paint_dead_leaves"]
