"""The photo-like benchmark images: ImageNet's sizes and bytes, a natural power spectrum,
photograph-like entropy next to the toy shapes, and the dataset writer's photo style."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from data_prep.dead_leaves import paint_dead_leaves
from data_prep.make_toy_imagenet import make_toy_imagenet, paint_image


def _jpeg_bytes(image: Image.Image) -> int:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return len(buffer.getvalue())


def _spectrum_slope(image: Image.Image) -> float:
    """Slope of log power against log radial frequency (natural images: about -2)."""
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    grey -= grey.mean()
    power = np.abs(np.fft.fftshift(np.fft.fft2(grey))) ** 2
    h, w = grey.shape
    yy, xx = np.mgrid[0:h, 0:w]
    radius = np.hypot(yy - h // 2, xx - w // 2).astype(int)
    radial = np.bincount(radius.ravel(), power.ravel()) / np.bincount(radius.ravel())
    f = np.arange(4, min(h, w) // 4)  # mid frequencies: above the frame, below blur and noise
    return float(np.polyfit(np.log(f), np.log(radial[f]), 1)[0])


SIZES = [(500, 375), (375, 500), (340, 340), (500, 500), (420, 360), (480, 333)]


def test_sizes_and_bytes_are_imagenets() -> None:
    # ImageNet's train JPEGs: ~0.11-0.25 MP, ~40-150 KB (mean ~110 KB), quality ~90.
    sizes = [_jpeg_bytes(paint_dead_leaves(np.random.default_rng(i), w, h))
             for i, (w, h) in enumerate(SIZES)]
    assert all(40_000 <= b <= 150_000 for b in sizes), sizes


def test_power_spectrum_falls_as_a_photographs() -> None:
    slopes = [_spectrum_slope(paint_dead_leaves(np.random.default_rng(i), w, h))
              for i, (w, h) in enumerate(SIZES[:3])]
    assert all(-2.8 <= s <= -1.6 for s in slopes), slopes


def test_more_entropy_than_the_toy_shapes() -> None:
    # The point of the photo style: JPEG bytes per pixel (what the entropy decoder and IDCT
    # work through) well above the toy classes' at the same sizes.
    photo = toy_shapes = 0
    for i in range(4):
        photo += _jpeg_bytes(paint_dead_leaves(np.random.default_rng(i), 400, 400))
        toy_shapes += _jpeg_bytes(paint_image(np.random.default_rng(i), i, 400, 400))
    assert photo > 2 * toy_shapes, (photo, toy_shapes)


def test_same_rng_same_pixels_and_the_size_asked_for() -> None:
    a = paint_dead_leaves(np.random.default_rng(3), 123, 77)
    b = paint_dead_leaves(np.random.default_rng(3), 123, 77)
    c = paint_dead_leaves(np.random.default_rng(4), 123, 77)
    assert a.size == (123, 77) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_photo_style_dataset(tmp_path: Path) -> None:
    summary = make_toy_imagenet(tmp_path / "photo", num_classes=2, train_per_class=3,
                                val_per_class=1, min_side=340, max_side=500, quirks=False,
                                style="photo")
    record = json.loads((tmp_path / "photo" / "toy_imagenet.json").read_text())
    assert record["style"] == summary["style"] == "photo" and record["shapes"] == []
    ds = ImageFolder(str(tmp_path / "photo" / "train"))
    assert len(ds) == 6
    for path, _ in ds.samples:
        with Image.open(path) as im:
            assert im.format == "JPEG" and min(im.size) >= 340 and max(im.size) <= 500
        assert Path(path).stat().st_size >= 40_000


def test_unknown_style_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"style='oil': expected one of shapes, photo"):
        make_toy_imagenet(tmp_path / "x", style="oil")
