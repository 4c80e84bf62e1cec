"""The loaders' kernels-alone ceilings: each backend's kernels cut the crops the loaders cut
(checked against Pillow's decode, crop and antialiased resize), from the bytes the .beton
stores (read back by ffcv's Reader), and the loader benchmark's rows carry their share."""

from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import _ceilings as ceilings
from data_prep.dead_leaves import paint_dead_leaves
from fastsiam.data.crops import random_crop_boxes, sample_keys

SIZE = 48


def _jpegs(n: int = 3) -> list[tuple[np.ndarray, int, int]]:
    out = []
    for i in range(n):
        image = paint_dead_leaves(np.random.default_rng(i), 150 + 20 * i, 120)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=95)
        out.append((np.frombuffer(buffer.getvalue(), dtype=np.uint8), image.height, image.width))
    return out


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / max(mse, 1e-12)))


def _installed(backend: str) -> bool:
    module = {"ffcv": "ffcv", "dali": "nvidia.dali"}.get(backend)
    return module is None or importlib.util.find_spec(module) is not None


def test_boxes_are_the_loaders() -> None:
    # The loaders' boxes: view v of sample i at epoch 0 is random_crop_boxes of its key.
    heights, widths = np.array([120, 300, 77]), np.array([200, 100, 77])
    got = ceilings.boxes(heights, widths, seed=5)
    for v in range(2):
        keys = sample_keys(5, 0, np.arange(3), v)
        assert np.array_equal(got[:, v], random_crop_boxes(keys, heights, widths, (0.2, 1.0),
                                                           (3 / 4, 4 / 3)))


@pytest.mark.parametrize("backend", sorted(ceilings.KERNELS))
def test_kernels_cut_the_crop_boxes(backend: str) -> None:
    if not _installed(backend):
        pytest.skip(f"{backend} is not installed")
    jpegs = _jpegs()
    made = ceilings.views(backend, ceilings.KERNELS[backend][1](jpegs, SIZE)())
    assert made.shape == (3, 2, SIZE, SIZE, 3) and made.dtype == np.uint8
    crop = ceilings.boxes([h for _, h, _ in jpegs], [w for _, _, w in jpegs])
    for i, (data, _, _) in enumerate(jpegs):
        image = Image.open(io.BytesIO(data.tobytes())).convert("RGB")
        for v, (top, left, h, w) in enumerate(crop[i].tolist()):
            reference = np.asarray(image.crop((left, top, left + w, top + h))
                                   .resize((SIZE, SIZE), Image.BILINEAR))
            # Decoders and resize filters differ in rounding; a wrong box is far below 25 dB.
            assert _psnr(made[i, v], reference) > 25, (backend, i, v)


def test_ffcv_kernels_take_raw_samples_undecoded() -> None:
    if not _installed("ffcv"):
        pytest.skip("ffcv is not installed")
    jpegs = _jpegs()
    pixels = [(np.asarray(Image.open(io.BytesIO(d.tobytes())).convert("RGB")), h, w) for d, h, w in jpegs]
    run = ceilings.KERNELS["ffcv"][1]
    from_jpeg, from_raw = (ceilings.views("ffcv", run(x, SIZE)()) for x in (jpegs, pixels))
    assert min(_psnr(a, b) for a, b in zip(from_jpeg, from_raw)) > 40  # the decoders' rounding


def test_beton_images_are_the_stored_samples(tmp_path: Path) -> None:
    pytest.importorskip("ffcv")
    from data_prep.listing import list_image_folder
    from data_prep.make_toy_imagenet import make_toy_imagenet
    from data_prep.to_ffcv import convert

    # Sources under --max-resolution: a raw sample is its source's pixels, a JPEG sample a
    # re-encoding of them at the source's size.
    make_toy_imagenet(tmp_path / "photo", num_classes=2, train_per_class=4, val_per_class=1,
                      min_side=150, max_side=250, quirks=False, style="photo")
    items = list_image_folder(tmp_path / "photo" / "train").items
    beton = tmp_path / "mixed.beton"  # the README's ImageNet mode: some JPEG, some raw
    convert(list_image_folder(tmp_path / "photo" / "train"), beton, write_mode="proportion",
            max_resolution=256, quiet=True)
    stored = ceilings.beton_images(beton, limit=100)
    assert len(stored) == 8 and len(ceilings.beton_images(beton, limit=3)) == 3
    assert 0 < sum(data.ndim == 3 for data, _, _ in stored) < 8
    for (data, h, w), item in zip(stored, items):
        source = np.asarray(Image.open(item.path).convert("RGB"))
        if data.ndim == 3:
            assert np.array_equal(data, source)
        else:
            with Image.open(io.BytesIO(data.tobytes())) as im:
                assert im.format == "JPEG" and im.size == (w, h) == source.shape[1::-1]
                assert _psnr(np.asarray(im.convert("RGB")), source) > 30


def test_loader_rows_get_their_share_of_the_ceiling(tmp_path, monkeypatch) -> None:
    from benchmarks import loaders
    from benchmarks._harness import summarize

    out = tmp_path / "out"
    fake_paths = {"imagefolder": tmp_path, "none": tmp_path, "shards": tmp_path}
    monkeypatch.setattr(loaders, "prepare", lambda args, names, cache: (fake_paths, {}))
    monkeypatch.setattr(loaders, "measure_variant",
                        lambda name, path, args, common: summarize([60.0], items_per_call=2,
                                                                   iters=1, warmup=0))
    monkeypatch.setattr(ceilings, "file_jpegs", lambda paths, limit: _jpegs(1))
    monkeypatch.setattr(ceilings, "single_thread",
                        lambda backend, jpegs, size, repeats: summarize(
                            [40.0], items_per_call=2, iters=1, warmup=0))
    assert loaders.main(["--smoke", "--backends", "synthetic,nvjpeg,pil_crop", "--workers", "3",
                         "--out", str(out)]) == 0
    from benchmarks._harness import load_result

    rows = {r["variant"]: r for r in
            load_result(out / f"loaders_photo-cpu{os.cpu_count()}.json")["rows"]}
    # --smoke runs one worker: the ceiling is the single thread's 40 images/s x 1.
    assert rows["ceiling: torchvision"]["items_per_s"] == pytest.approx(40.0)
    assert rows["ceiling: torchvision"]["single_thread_images_per_s"] == 40.0
    assert rows["nvjpeg"]["of_ceiling"] == pytest.approx(1.5)
    assert rows["pil_crop"]["of_ceiling"] == pytest.approx(1.5) and "ceiling: pil" in rows
    assert "of_ceiling" not in rows["synthetic"]
