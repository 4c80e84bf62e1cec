"""Reading and checking one input image: the bytes, the header, the full decode, RGB.

Every image is checked before it is written: corrupt or truncated files, zero-byte files and
non-images raise :class:`BadImage` with the reason the skip report shows (``--strict`` turns
the first into an error). A file is opened non-blocking and must be a regular file, so a FIFO
in the input cannot hang a worker. Also the ``--verify`` measure (:func:`psnr`) and its samples.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from data_prep.errors import file_kind
from fastsiam import imageio

# --verify compares decoded images with their source above this PSNR (dB). Re-encoding at
# quality 90 with 4:2:0 chroma scores >= 24 dB even on the toy set's saturated synthetic edges
# (its PNG file; photos typically 35-40 dB); an image at the wrong position scores <= 15 dB
# there (unrelated photos ~10-15 dB).
VERIFY_MIN_PSNR = 20.0


class BadImage(Exception):
    """The file is not a usable image; the message is the reason for the report."""


@contextlib.contextmanager
def _open_regular(path: str) -> Iterator[io.BufferedReader]:
    """``path`` opened for reading if it is a regular file (raises BadImage).

    Opened non-blocking and checked with ``fstat`` before reading: a FIFO named ``.JPEG`` (in
    a file list, or swapped in after listing) would otherwise block the reader forever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise BadImage(f"cannot read ({e.strerror or e})") from None
    with open(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise BadImage(f"not a regular file ({file_kind(mode)})")
        try:
            yield f
        except OSError as e:
            raise BadImage(f"cannot read ({e.strerror or e})") from None


def read_file(path: str) -> bytes:
    """The bytes of the regular file ``path`` (raises BadImage)."""
    with _open_regular(path) as f:
        return f.read()


def probe_image(path: str) -> tuple[str | None, tuple[int, int]]:
    """``(None, (width, height))`` when ``path``'s header is an image's, else ``(reason, (0, 0))``.

    Reads only the header: what :func:`check_image` finds without decoding (unreadable, empty,
    not an image, no pixels), at a fraction of a decode's cost. Runs in worker processes.
    """
    try:
        with _open_regular(path) as f:
            return None, _header(f, os.fstat(f.fileno()).st_size).size
    except BadImage as e:
        return str(e), (0, 0)


@contextlib.contextmanager
def _pil_errors() -> Iterator[None]:
    """PIL's failures on bad data as BadImage, with the reasons the report shows."""
    with warnings.catch_warnings():
        # Odd EXIF blocks and large images warn; only failures to decode matter here.
        warnings.simplefilter("ignore")
        try:
            yield
        except Image.UnidentifiedImageError:
            raise BadImage("not an image (unrecognised format)") from None
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad data
            raise BadImage(f"corrupt or truncated image ({type(e).__name__}: {e})") from None


def _header(f: Any, nbytes: int) -> Image.Image:
    """``Image.open`` of the ``nbytes`` bytes in ``f``: header read, pixels not decoded."""
    if nbytes == 0:
        raise BadImage("empty file (0 bytes)")
    with _pil_errors():
        image = Image.open(f)
    if image.width < 1 or image.height < 1:
        raise BadImage(f"image has no pixels ({image.width}x{image.height})")
    return image


def read_header(data: bytes) -> Image.Image:
    """The PIL image of ``data`` with its header read and its pixels not decoded (raises
    BadImage: empty, not an image, no pixels)."""
    return _header(io.BytesIO(data), len(data))


def decode_image(data: bytes) -> Image.Image:
    """Fully decode ``data`` (the corruption check) and return the loaded PIL image.

    Raises:
        BadImage: empty, not an image, truncated or corrupt.
    """
    image = read_header(data)
    with _pil_errors():
        image.load()
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB by fastsiam's one rule (:func:`fastsiam.imageio.to_rgb`: 16-bit and float
    images rescaled, not clipped); an image without an 8-bit form raises BadImage."""
    try:
        return imageio.to_rgb(image)
    except imageio.UnsupportedImage as e:
        raise BadImage(str(e)) from None


def load_rgb(path: str) -> np.ndarray:
    """Read, check and decode one file to a ``uint8 [H, W, 3]`` array (raises BadImage)."""
    return np.asarray(to_rgb(decode_image(read_file(path))))


def check_image(path: str) -> tuple[str | None, tuple[int, int]]:
    """``(None, (width, height))`` when ``path`` decodes to RGB, else ``(reason, (0, 0))``.

    Runs in worker processes.
    """
    try:
        image = decode_image(read_file(path))
        to_rgb(image)
    except BadImage as e:
        return str(e), (0, 0)
    return None, image.size


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (inf when identical)."""
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ, {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(255.0**2 / mse))


def verify_indices(n: int, k: int) -> list[int]:
    """``k`` evenly spread sample indices out of ``n`` (first and last included)."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]
