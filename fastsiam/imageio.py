"""Any PIL image to the 8-bit RGB the models see, rescaling the modes wider than 8 bits.

PIL's ``convert("RGB")`` clips instead of rescaling: a 16-bit grey of 25700 (39 %) becomes 255
and a float 0.5 becomes 0, so a 16-bit PNG or a float TIFF would reach the model as a
saturated, almost binary image. :func:`to_rgb` rescales by the mode's range instead. It is the
one rule for the converters (``data_prep/images.py`` wraps it), the loaders and inference.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: Single-channel modes wider than 8 bits, rescaled by :func:`to_uint8_gray`.
DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class UnsupportedImage(ValueError):
    """An image that has no 8-bit RGB form (a mode PIL cannot convert, non-finite floats)."""


def to_uint8_gray(image: Image.Image) -> np.ndarray:
    """A single-channel 16-bit, 32-bit integer or float image as ``uint8 [H, W]``.

    - ``I;16*`` (16-bit PNG/TIFF): ``round(v / 257)``, so 0..65535 maps onto 0..255 exactly;
    - ``I`` (32-bit integers; older Pillow opens 16-bit PNGs so): the same when every value is
      in 0..65535, else min-max;
    - ``F`` (32-bit floats): ``round(v * 255)`` when every value is in [0, 1], else min-max;
      NaN or infinite values raise :class:`UnsupportedImage` (no honest 8-bit value exists).

    Min-max maps the image's own minimum to 0 and maximum to 255 (a constant image is 0).
    """
    a = np.asarray(image)
    if image.mode.startswith("I;16"):
        return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)  # = round(v / 257): no ties
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise UnsupportedImage(f"{image.mode} image has NaN or infinite values")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if image.mode == "I" and lo >= 0 and hi <= 65535:
        a = a / 257
    elif image.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255
    else:
        a = (a - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.rint(a).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """A new, loaded 8-bit RGB image of ``image`` (which is left as it is).

    Modes in :data:`DEEP_MODES` are rescaled (:func:`to_uint8_gray`) and become grey RGB; every
    other mode (RGB, L, P, RGBA, CMYK, ...) converts as torchvision's ``pil_loader`` does
    (alpha dropped, palettes applied). A mode PIL cannot convert raises
    :class:`UnsupportedImage`.
    """
    if image.mode in DEEP_MODES:
        return Image.fromarray(to_uint8_gray(image), "L").convert("RGB")
    try:
        return image.convert("RGB")  # a copy even when image is RGB already
    except ValueError as e:
        raise UnsupportedImage(f"cannot convert mode {image.mode} to RGB ({e})") from None
