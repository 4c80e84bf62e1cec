"""Shared pieces of the loader tests: dataset fixtures in each backend's format, and references.

The references are independent of the loaders: source images decoded by PIL, crops and
resizes by torchvision (``resized_crop`` / ``resize`` + ``center_crop`` with antialiasing).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from fastsiam.data import EvalBatch, TwoViewBatch
from fastsiam.data.crops import center_crop_boxes, random_crop_boxes, sample_keys

SIZE = 32  # output side in the tests: small enough for a 2-core CI machine
SCALE = (0.2, 1.0)
RATIO = (3 / 4, 4 / 3)


def folder_images(folder: Path) -> tuple[list[torch.Tensor], list[int]]:
    """Every image of an ImageFolder as uint8 RGB ``[3, H, W]`` (PIL's decode), and labels."""
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(folder))
    images = [TF.pil_to_tensor(Image.open(p).convert("RGB")) for p, _ in ds.samples]
    return images, list(ds.targets)


def write_beton(folder: Path, out: Path) -> Path:
    """An all-JPEG .beton of an ImageFolder (256 px), by data_prep/to_ffcv.py."""
    from data_prep.listing import list_image_folder
    from data_prep.to_ffcv import convert

    convert(list_image_folder(folder), out, write_mode="jpg", max_resolution=256, quiet=True)
    return out


def write_shards(folder: Path, out: Path, shard_size: int = 16) -> Path:
    """Tar shards + DALI index files of an ImageFolder, by data_prep/to_dali.py."""
    from data_prep.listing import list_image_folder
    from data_prep.to_dali import convert

    convert(list_image_folder(folder), out, shard_size=shard_size, quiet=True)
    return out


def shard_images(root: Path) -> tuple[list[torch.Tensor], list[int]]:
    """Every sample of a shard folder decoded by PIL (read with tarfile, not the index)."""
    import tarfile

    from fastsiam.data.shards import read_manifest

    manifest = read_manifest(root)
    images = []
    for entry in manifest.shards:
        with tarfile.open(root / entry.tar) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    data = tar.extractfile(member).read()
                    images.append(TF.pil_to_tensor(Image.open(io.BytesIO(data)).convert("RGB")))
    return images, manifest.labels.tolist()


def view_boxes(seed: int, epoch: int, index: int, image: torch.Tensor) -> list[np.ndarray]:
    """The two crop boxes fastsiam.data.crops assigns to a sample (top, left, h, w)."""
    h, w = image.shape[1:]
    return [
        random_crop_boxes(sample_keys(seed, epoch, [index], v), [h], [w], SCALE, RATIO)[0]
        for v in (0, 1)
    ]


def reference_crop(image: torch.Tensor, box: Iterable[int], size: int = SIZE) -> torch.Tensor:
    top, left, h, w = (int(x) for x in box)
    return TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)


def reference_center(image: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """The evaluation view: the documented central box (resize-then-center-crop's region,
    placed to the pixel), resized by torchvision."""
    h, w = image.shape[1:]
    return reference_crop(image, center_crop_boxes([h], [w], size)[0], size)


def mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference at low resolution (4x4 pixel averages), where resampling
    filters (OpenCV's INTER_AREA, DALI's and torchvision's antialiased bilinear) agree."""
    low = [torch.nn.functional.avg_pool2d(x.float()[None], 4)[0] for x in (a, b)]
    return (low[0] - low[1]).abs().mean().item()


def view_errors(
    batch: TwoViewBatch, indices: list[int], images: list[torch.Tensor], seed: int, epoch: int
) -> tuple[list[float], list[float]]:
    """Per view: the error against its reference crop, and against the same box of another
    image (what a loader delivering the wrong sample would score)."""
    right, wrong = [], []
    for k, i in enumerate(indices):
        other = images[(i + len(images) // 2) % len(images)]
        for view, box in zip(
            (batch.view1[k], batch.view2[k]), view_boxes(seed, epoch, i, images[i])
        ):
            right.append(mean_abs(view, reference_crop(images[i], box)))
            h, w = other.shape[1:]
            clipped = (0, 0, min(int(box[2]), h), min(int(box[3]), w))
            wrong.append(mean_abs(view, reference_crop(other, clipped)))
    return right, wrong


def check_contract(batch: TwoViewBatch | EvalBatch, batch_size: int, size: int = SIZE) -> None:
    """dtype, shape, memory format and device of one batch (a train batch: both views in one
    ``[2B, ...]`` tensor)."""
    two = isinstance(batch, TwoViewBatch)
    views = batch.views if two else batch.view
    assert views.dtype == torch.uint8
    assert views.shape == ((2 if two else 1) * batch_size, 3, size, size)
    assert views.is_contiguous(memory_format=torch.channels_last)
    assert views.device.type == "cpu"
    assert batch.label.dtype == torch.int64
    assert batch.label.shape == (batch_size,)


PER_TRAIN_BATCH = len(TwoViewBatch._fields)  # views, label, draws


def epoch_tensors(loader) -> list[torch.Tensor]:
    """Every tensor of one pass over ``loader`` (for bitwise comparisons): each batch's fields
    in turn (``PER_TRAIN_BATCH`` per train batch)."""
    return [t.clone() for batch in loader for t in batch]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
