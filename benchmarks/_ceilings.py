"""Each loader's ceiling: its own per-image kernels alone, one thread, no pipeline.

A loader does, per image, one decode and two crop-resizes; everything else it spends (reading,
scheduling, copies between buffers, collation, page faults) is overhead. The ceiling of a
backend is the rate of exactly those kernels called back to back on one thread, over the same
JPEGs the loader reads, at the same crop boxes (:mod:`fastsiam.data.crops`), times the number
of worker threads or processes the loader gets: what it could reach if the overhead were
zero and the workers scaled perfectly. A loader row's ``of_ceiling`` is its rate over that.

- ``ffcv``: FFCV's own ``imdecode`` (libjpeg-turbo) and ``resize_crop`` (OpenCV INTER_AREA)
  on the .beton's stored samples (raw ones need no decode), as :class:`~fastsiam.data.ffcv_decoder.TwoCropDecoder` calls them;
- ``torchvision``: ``decode_jpeg`` (libjpeg-turbo) and two uint8 antialiased
  ``resized_crop`` calls, the nvjpeg backend's CPU path, on the shards' original JPEGs;
- ``pil``: Pillow's decode and two bilinear crop-resizes (what torchvision's
  ``RandomResizedCrop`` does to a PIL image), the PIL backend's crop-only path;
- ``dali``: DALI's kernels cannot be called outside a pipeline, so its ceiling is a
  one-thread pipeline fed the JPEGs from memory (``external_source``, no reader, no sampler):
  ``decoders.image`` on the CPU and two ROI ``resize`` ops, the ``decode: once`` graph.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._harness import Measurement, measure
from fastsiam.data.crops import random_crop_boxes, sample_keys

SCALE = (0.2, 1.0)
RATIO = (3 / 4, 4 / 3)
# The backend whose per-image kernels bound each loader variant; None: no such ceiling (the
# full PIL augmentation is the baseline, not a crop loader; synthetic decodes nothing).
KERNELS_OF = {
    "pil_crop": "pil", "ffcv_stock": "ffcv", "ffcv": "ffcv", "ffcv_views": "ffcv",
    "dali_once": "dali", "dali_twice": "dali", "dali_webdataset": "dali", "nvjpeg": "torchvision",
}


def boxes(heights: Sequence[int], widths: Sequence[int], seed: int = 0) -> np.ndarray:
    """Two crop boxes per image, ``[N, 2, 4]`` (top, left, height, width), as the loaders draw."""
    h, w = np.asarray(heights), np.asarray(widths)
    views = [random_crop_boxes(sample_keys(seed, 0, np.arange(len(h)), v), h, w, SCALE, RATIO)
             for v in range(2)]
    return np.stack(views, axis=1)


def beton_images(path: Path, limit: int) -> list[tuple[np.ndarray, int, int]]:
    """The first ``limit`` samples of a .beton as (data, height, width), read with ffcv's
    Reader through its allocation table (as the loader finds them): a JPEG sample's data is its
    bytes (1-D), a raw sample's its pixels ``[h, w, 3]``, in the file's own JPEG/raw mix (the
    README's ImageNet setting stores half raw: the loader decodes only the other half)."""
    from itertools import islice

    from fastsiam.data.beton import open_beton, stored_images

    reader = open_beton(path, "image", "label")
    return [(data if jpeg else np.asarray(data).reshape(h, w, 3), h, w)
            for data, h, w, jpeg in islice(stored_images(reader, path, "image"), limit)]


def file_jpegs(paths: Sequence[Path], limit: int) -> list[tuple[np.ndarray, int, int]]:
    """Up to ``limit`` JPEG files as (bytes, height, width)."""
    from fastsiam.data.jpeg import JPEGHeaderError, jpeg_size

    out = []
    for p in paths:
        data = Path(p).read_bytes()
        try:
            h, w = jpeg_size(data)
        except JPEGHeaderError:  # ImageNet's PNG named .JPEG: no JPEG kernels for it
            continue
        out.append((np.frombuffer(data, dtype=np.uint8), h, w))
        if len(out) == limit:
            break
    return out


# Each runner factory takes the JPEGs and the output side and returns ``run()``, one pass of the
# kernels over every image; ``run`` returns what the kernels made, and :func:`views` turns that
# into ``[N, 2, S, S, 3]`` uint8 for checking (the timed passes never convert).


def _ffcv(jpegs: list, size: int) -> Callable[[], Any]:
    from ffcv.libffcv import imdecode, resize_crop

    crop = boxes([h for _, h, _ in jpegs], [w for _, _, w in jpegs])
    scratch = np.empty(max(h * w for _, h, w in jpegs) * 3, dtype=np.uint8)
    # One output slot per view, as the loader's batch buffer has (not one hot reused buffer).
    out = np.empty((len(jpegs), 2, size, size, 3), dtype=np.uint8)

    def run() -> np.ndarray:
        for i, ((data, h, w), views) in enumerate(zip(jpegs, crop)):
            if data.ndim == 3:  # a raw sample: nothing to decode
                image = data
            else:
                imdecode(data, scratch, h, w, h, w, 0, 0, 1, 1, False, False)
                image = scratch[: h * w * 3].reshape(h, w, 3)
            for v, (top, left, ch, cw) in enumerate(views):
                resize_crop(image, top, top + ch, left, left + cw, out[i, v])
        return out

    return run


def _torchvision(jpegs: list, size: int) -> Callable[[], Any]:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2.functional import resized_crop

    crop = boxes([h for _, h, _ in jpegs], [w for _, _, w in jpegs])
    blobs = [torch.from_numpy(data.copy()) for data, _, _ in jpegs]

    def run() -> list:
        out = []
        for blob, views in zip(blobs, crop):
            image = decode_jpeg(blob, mode=ImageReadMode.RGB)
            out.append([resized_crop(image, top, left, ch, cw, [size, size], antialias=True)
                        for top, left, ch, cw in views.tolist()])
        return out

    return run


def _pil(jpegs: list, size: int) -> Callable[[], Any]:
    from PIL import Image

    from fastsiam.imageio import to_rgb

    crop = boxes([h for _, h, _ in jpegs], [w for _, _, w in jpegs])
    files = [data.tobytes() for data, _, _ in jpegs]

    def run() -> list:
        out = []
        for data, views in zip(files, crop):
            image = to_rgb(Image.open(io.BytesIO(data)))
            out.append([image.resize((size, size), Image.BILINEAR,
                                     box=(left, top, left + cw, top + ch))
                        for top, left, ch, cw in views.tolist()])
        return out

    return run


def _dali(jpegs: list, size: int) -> Callable[[], Any]:
    from nvidia.dali import fn, pipeline_def, types

    crop = boxes([h for _, h, _ in jpegs], [w for _, _, w in jpegs])
    data = [d for d, _, _ in jpegs]
    corners = [[np.ascontiguousarray(crop[:, v, :2]).astype(np.float32),
                (crop[:, v, :2] + crop[:, v, 2:]).astype(np.float32)] for v in range(2)]

    @pipeline_def(batch_size=len(data), num_threads=1, device_id=None, prefetch_queue_depth=1)
    def graph() -> Any:
        encoded, *roi = fn.external_source(
            source=lambda: [data, *(c for view in corners for c in view)], num_outputs=5,
            batch=True, dtype=[types.UINT8, *[types.FLOAT] * 4])
        image = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
        return tuple(fn.resize(image, size=(size, size), roi_start=roi[2 * v],
                               roi_end=roi[2 * v + 1], antialias=True) for v in range(2))

    pipe = graph()
    pipe.build()
    return pipe.run


def views(backend: str, made: Any) -> np.ndarray:
    """What a runner of ``backend`` returned, as uint8 ``[N, 2, S, S, 3]``."""
    if backend == "ffcv":
        return np.array(made)
    if backend == "torchvision":
        return np.stack([[v.permute(1, 2, 0).numpy() for v in pair] for pair in made])
    if backend == "pil":
        return np.stack([[np.asarray(v) for v in pair] for pair in made])
    return np.stack([np.stack([np.asarray(t) for t in out]) for out in made], axis=1)


KERNELS: dict[str, tuple[str, Callable[[list, int], Callable[[], Any]]]] = {
    # backend -> (data format the JPEGs come from, the kernels' runner)
    "ffcv": ("beton", _ffcv),
    "torchvision": ("files", _torchvision),
    "pil": ("files", _pil),
    "dali": ("files", _dali),
}


def single_thread(backend: str, jpegs: list, size: int, repeats: int) -> Measurement:
    """Images/s of ``backend``'s per-image kernels over ``jpegs`` on one thread (median of
    ``repeats`` passes over all of them, after one untimed pass)."""
    import torch

    if not jpegs:
        raise ValueError(f"{backend} ceiling: no images to measure it on")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = KERNELS[backend][1](jpegs, size)
        return measure(run, items_per_call=len(jpegs), iters=1, repeats=repeats, warmup=1)
    finally:
        torch.set_num_threads(threads)


def megapixels(jpegs: list) -> float:
    """Mean megapixels of the decoded images."""
    if not jpegs:
        raise ValueError("no images to measure the ceiling on")
    return round(math.fsum(h * w for _, h, w in jpegs) / len(jpegs) / 1e6, 4)


__all__ = ["KERNELS", "KERNELS_OF", "beton_images", "boxes", "file_jpegs", "megapixels",
           "single_thread", "views"]
