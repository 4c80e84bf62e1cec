"""Any PIL image to the 8-bit RGB the models see, rescaling the modes wider than 8 bits.

PIL's ``convert("RGB")`` clips instead of rescaling: a 16-bit grey of 25700 (39 %) becomes 255
and a float 0.5 becomes 0, so a 16-bit PNG or a float TIFF would reach the model as a
saturated, almost binary image. :func:`to_rgb` divides by the mode's full-scale value.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: The value that maps to 255, per mode wider than 8 bits ("I;16" also stands for its
#: byte-order variants I;16L, I;16B, I;16N). "I" (32-bit) is what older Pillow and some TIFF
#: readers give 16-bit data as, so it is scaled as 16-bit; "F" is float in [0, 1].
FULL_SCALE = {"I;16": 65535.0, "I": 65535.0, "F": 1.0}


def to_rgb(image: Image.Image) -> Image.Image:
    """A new 8-bit RGB image of ``image`` (which is left as it is).

    - ``I;16*`` and ``I``: ``round(v * 255 / 65535)`` (so v / 257), clipped to [0, 255];
    - ``F``: ``round(v * 255)``, clipped to [0, 255]; NaN and -inf are 0, +inf is 255;
    - grey is repeated on the three channels; rounding is numpy's ``rint`` (half to even);
    - every other mode (RGB, L, P, RGBA, CMYK, ...): ``image.convert("RGB")`` as torchvision's
      ``pil_loader`` does (alpha is dropped, palettes applied).
    """
    full = FULL_SCALE.get("I;16" if image.mode.startswith("I;16") else image.mode)
    if full is None:
        return image.convert("RGB")  # a copy even when image is RGB already
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=full, neginf=0.0)
    grey = np.clip(np.rint(values * (255.0 / full)), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))
