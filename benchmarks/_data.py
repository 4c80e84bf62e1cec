"""Benchmark input: generated images in every loader's format, sized to the run, and its costs.

End-to-end and loader benchmarks need an epoch long enough for their timed steps (a window
that crosses an epoch would time the loader's start-up, which a real 5,000-step ImageNet
epoch amortizes). Painting thousands of images costs more than the benchmark, so a few
hundred distinct images (data_prep/make_toy_imagenet.py: photo-like dead leaves with
``style="photo"``, whose JPEGs decode at a photograph's speed, or the toy's flat shapes) are
repeated ``copies`` times as symbolic links in an ImageFolder tree; the .beton and the
tar shards are converted from that tree, so every format holds the same samples. Repeated
files are read from the page cache like distinct ones would be once ImageNet is cached
(an 8-GPU node's RAM holds its 140 GB); decode cost depends on pixels and entropy-coded
bytes, not on whether an image was seen before.

Everything is cached under one folder, named by its parameters, so the GPU suite prepares the
data once for the loader and end-to-end stages.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
# The generated images' styles (make_toy_imagenet): default side range and how results name them
STYLE_SIDES = {"photo": (340, 500), "shapes": (200, 600)}
STYLE_NAMES = {"photo": "photo-like (dead leaves)", "shapes": "toy ImageNet shapes"}
# ImageNet's commonest image sizes (height, width): the long side is 500 for most of its images.
IMAGENET_SIZES = [(375, 500), (500, 375), (333, 500), (500, 333), (400, 500), (500, 400),
                  (281, 500), (500, 500), (375, 500), (375, 500)]


def imagenet_crop_batch(images_per_batch: int = 256, size: int = 224, seed: int = 0
                        ) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
    """A batch's worth of the nvjpeg backend's crop-resize work, without images: the decoded
    sizes (drawn from :data:`IMAGENET_SIZES`), and two RandomResizedCrop boxes per image (scale
    (0.2, 1), the crops module's own draws) as the source index and boxes, view-major."""
    from fastsiam.data.crops import random_crop_boxes, sample_keys

    rng = np.random.default_rng(seed)
    sizes = [IMAGENET_SIZES[i] for i in rng.integers(0, len(IMAGENET_SIZES), images_per_batch)]
    heights, widths = np.array(sizes).T
    samples = np.arange(images_per_batch)
    boxes = np.concatenate([random_crop_boxes(sample_keys(seed, 0, samples, view), heights, widths,
                                              (0.2, 1.0), (3 / 4, 4 / 3)) for view in (0, 1)])
    return sizes, np.tile(samples, 2), boxes


@dataclass
class BenchData:
    """Where each format of the benchmark's dataset lives (None: not prepared)."""

    imagefolder: Path
    images: int
    distinct: int
    beton: Path | None = None
    shards: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def path_for(self, fmt: str | None) -> Path:
        """The data path for a backend's format (``imagefolder``, ``beton``, ``shards`` or None)."""
        path = {"imagefolder": self.imagefolder, "beton": self.beton, "shards": self.shards,
                None: self.imagefolder}[fmt]
        if path is None:
            raise FileNotFoundError(f"the {fmt} format of the benchmark data was not prepared")
        return path


def list_images(folder: Path) -> list[Path]:
    """ImageFolder files under ``folder`` (``<class>/<image>``), sorted."""
    return sorted(p for p in folder.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)


def make_toy(cache: Path, *, classes: int, distinct: int, min_side: int, max_side: int,
             workers: int, style: str = "shapes") -> Path:
    """The generated train folder with ``distinct`` images (rounded up to whole classes) of
    ``style`` (``shapes`` or ``photo``, see make_toy_imagenet), cached."""
    from data_prep.make_toy_imagenet import make_toy_imagenet

    per_class = math.ceil(distinct / classes)
    root = cache / f"{style}_c{classes}x{per_class}_{min_side}-{max_side}"
    if not (root / "toy_imagenet.json").is_file():
        make_toy_imagenet(root, num_classes=classes, train_per_class=per_class, val_per_class=1,
                          min_side=min_side, max_side=max_side, quirks=False, overwrite=True,
                          workers=max(1, workers), style=style)
    return root / "train"


def repeat_folder(src: Path, dst: Path, copies: int) -> Path:
    """``dst/<class>/<stem>_c<k><suffix>`` -> ``src``'s files, ``copies`` links each (cached)."""
    if dst.is_dir():
        return dst
    staging = dst.with_name(f".{dst.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    for path in list_images(src):
        (staging / path.parent.name).mkdir(parents=True, exist_ok=True)
        for k in range(copies):
            link = staging / path.parent.name / f"{path.stem}_c{k}{path.suffix}"
            link.symlink_to(os.path.relpath(path.resolve(), link.parent.resolve()))
    staging.rename(dst)
    return dst


def prepare(cache: Path, *, min_images: int, formats: set[str], data: Path | None = None,
            classes: int = 8, distinct: int = 256, min_side: int = 200, max_side: int = 600,
            workers: int = 1, style: str = "shapes") -> BenchData:
    """Prepare (or reuse) the benchmark data under ``cache``.

    Args:
        cache: folder for everything made here.
        min_images: images one epoch must hold (the timed steps x batch).
        formats: any of ``beton`` (ffcv) and ``shards`` (dali, nvjpeg) besides the ImageFolder.
        data: an existing ImageFolder train folder to use instead of the toy data (not repeated).
        classes, distinct, min_side, max_side: the generated data (default: ImageNet-like sizes).
        workers: processes for painting and converting.
        style: the generated images: ``shapes`` (the toy's classes) or ``photo`` (dead leaves).
    """
    cache.mkdir(parents=True, exist_ok=True)
    if data is not None:
        folder, copies = Path(data), 1
        distinct_images = len(list_images(folder))
        tag = "data"
    else:
        toy = make_toy(cache, classes=classes, distinct=distinct, min_side=min_side,
                       max_side=max_side, workers=workers, style=style)
        distinct_images = len(list_images(toy))
        copies = max(1, math.ceil(min_images / distinct_images))
        folder = repeat_folder(toy, cache / f"{toy.parent.name}_x{copies}", copies)
        tag = folder.name
    images = distinct_images * copies
    if images < min_images:
        raise ValueError(f"{folder}: {images} images, but one epoch of this run needs {min_images}; "
                         "give more data or lower --iters/--repeats/--batch-size")
    out = BenchData(folder, images, distinct_images)
    if "beton" in formats:
        out.beton = _convert("to_ffcv", folder, cache / f"{tag}.beton", workers)
    if "shards" in formats:
        out.shards = _convert("to_dali", folder, cache / f"{tag}_shards", workers)
    out.info = describe(out)
    return out


def _convert(module: str, folder: Path, out: Path, workers: int) -> Path:
    """Run a data_prep converter with its defaults unless ``out`` already exists."""
    import importlib

    from data_prep.listing import list_image_folder

    if not out.exists():
        converter = importlib.import_module(f"data_prep.{module}")
        converter.convert(list_image_folder(folder), out, workers=max(1, workers), quiet=True)
    return out


def describe(data: BenchData, decode_samples: int = 48) -> dict[str, Any]:
    """Bytes per image in each format, and single-core JPEG decode rates, measured here."""
    files = list_images(data.imagefolder)
    jpeg_bytes = sum(p.stat().st_size for p in files)  # stat follows the links
    info: dict[str, Any] = {
        "images_per_epoch": data.images, "distinct_images": data.distinct,
        "bytes_per_image": {"jpeg_files": round(jpeg_bytes / max(len(files), 1))},
    }
    if data.beton is not None:
        info["bytes_per_image"]["ffcv_beton"] = round(data.beton.stat().st_size / data.images)
        payload = _beton_payload(data.beton)
        if payload is not None:  # small files are mostly FFCV's 8 MiB page granularity
            info["bytes_per_image"]["ffcv_beton_payload"] = round(payload / data.images)
    if data.shards is not None:
        tars = sum(p.stat().st_size for p in data.shards.glob("*.tar"))
        info["bytes_per_image"]["tar_shards"] = round(tars / data.images)
    info.update(decode_rates([p.resolve() for p in files[:: max(1, len(files) // decode_samples)]]))
    return info


def _beton_payload(path: Path) -> int | None:
    """Bytes of sample data in a .beton (its allocation table), without the pages' slack."""
    try:
        from ffcv.reader import Reader
    except ImportError:
        return None
    return int(Reader(str(path)).alloc_table["size"].sum())


def decode_rates(paths: list[Path]) -> dict[str, Any]:
    """Images/s of one core decoding ``paths`` (PIL to RGB; torchvision's libjpeg-turbo)."""
    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    paths = [p for p in paths if p.read_bytes()[:2] == b"\xff\xd8"]  # JPEGs only (ImageNet has a PNG)
    if not paths:
        return {}
    blobs = [p.read_bytes() for p in paths]
    pixels = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for p in paths:
            with Image.open(p) as im:
                pixels.append(im.width * im.height)
                im.convert("RGB").load()
        pil = len(paths) / (time.perf_counter() - start)
        start = time.perf_counter()
        for b in blobs:
            decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB)
        tv = len(paths) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {
        "mean_megapixels": round(statistics.fmean(pixels) / 1e6, 4),
        "decode_images_per_s_per_core": {"pil": round(pil, 1), "torchvision_cpu": round(tv, 1)},
    }
