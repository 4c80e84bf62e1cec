"""Batched crop-resize (fastsiam.data.resample): equal to torchvision's resized_crop per crop,
whatever the chunking, and its device traffic on fake CUDA for a realistic batch: bytes and
kernels (counts, so deterministic), one small host->device copy, no copy back, no host sync."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from benchmarks._data import imagenet_crop_batch
from fastsiam.data.resample import _filter_taps, crop_resize
from fastsiam.testing.fake_cuda import fake_cuda


def _noise(sizes: list[tuple[int, int]], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]


def _assert_matches_torchvision(images, source, boxes, out, size, tolerance=1):
    """Every crop within ``tolerance`` levels of torchvision's (torch's uint8 CPU kernel rounds
    its intermediate to uint8, so exact float arithmetic is up to one level away from it)."""
    assert out.shape == (len(boxes), size, size, 3) and out.dtype == torch.uint8
    for k, (s, box) in enumerate(zip(source, boxes)):
        ref = TF.resized_crop(images[s], *(int(x) for x in box), [size, size], antialias=True)
        diff = (out[k].permute(2, 0, 1).int() - ref.int()).abs().max().item()
        assert diff <= tolerance, (k, int(s), box.tolist(), diff)


@pytest.mark.parametrize("size", [7, 32, 224])
@pytest.mark.parametrize("budget", [1 << 24, 1], ids=["chunks", "one-crop-chunks"])
def test_matches_torchvision_per_crop(size: int, budget: int) -> None:
    """Random boxes (upscale and downscale), whole images, 1-pixel crops and lines, boxes on
    every border, in a shuffled order with an unused image."""
    sizes = [
        (50, 80),
        (120, 90),
        (33, 33),
        (300, 200),
        (1, 1),
        (7, 400),
        (375, 500),
        (500, 333),
        (20, 20),
    ]
    images = _noise(sizes)
    rng = np.random.default_rng(0)
    source, boxes = [], []
    for i, (H, W) in enumerate(sizes[:-1]):
        for _ in range(5):
            h, w = int(rng.integers(1, H + 1)), int(rng.integers(1, W + 1))
            source.append(i)
            boxes.append([int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1)), h, w])
        source += [i] * 6
        boxes += [[0, 0, H, W], [H - 1, W - 1, 1, 1], [0, 0, 1, 1], [0, W - 1, H, 1],
                  [H - 1, 0, 1, W], [H // 2, W // 2, H - H // 2, W - W // 2]]  # fmt: skip
    perm = rng.permutation(len(boxes))
    source, boxes = np.array(source)[perm], np.array(boxes)[perm]
    out = crop_resize(images, source, boxes, size, budget=budget)
    _assert_matches_torchvision(images, source, boxes, out, size)


def test_windows_padded_past_the_image_and_shifted_from_its_edge() -> None:
    """One chunk whose window is taller than a short image (zero rows below it) and wider
    than a crop at an image's right edge (the window starts left of the crop), then a crop
    wider than an image in the chunk (a new chunk); the rows-first and columns-first orders."""
    images = _noise([(40, 200), (300, 60), (90, 400), (64, 64)], seed=1)
    source = np.array([0, 1, 2, 3, 3])
    boxes = np.array([[0, 150, 40, 50], [20, 3, 250, 55], [10, 30, 80, 300],
                      [5, 9, 50, 52], [0, 0, 20, 58]])  # fmt: skip
    out = torch.full((5, 32, 32, 3), 7, dtype=torch.uint8)
    assert crop_resize(images, source, boxes, 32, out=out) is out
    _assert_matches_torchvision(images, source, boxes, out, 32)


def test_images_of_any_strides() -> None:
    """Decoders may hand out non-contiguous images (here HWC storage seen as CHW, and a crop
    of a larger tensor): windows are cut with each image's own strides."""
    g = torch.Generator().manual_seed(2)
    hwc = torch.randint(0, 256, (70, 90, 3), generator=g, dtype=torch.uint8).permute(2, 0, 1)
    part = torch.randint(0, 256, (3, 100, 120), generator=g, dtype=torch.uint8)[:, 10:80, 7:100]
    images = [hwc, part]
    source, boxes = (
        np.array([0, 1, 0, 1]),
        np.array([[3, 4, 60, 80], [0, 0, 70, 93], [69, 0, 1, 90], [10, 50, 30, 43]]),
    )
    _assert_matches_torchvision(images, source, boxes, crop_resize(images, source, boxes, 32), 32)


@pytest.mark.parametrize("size", [1, 7, 224])
def test_filter_taps_are_torchs_antialiased_bilinear_weights(size: int) -> None:
    """The compact weights, scattered densely, are torch's own: interpolating the identity
    along one axis gives its interpolation matrix; float32, rounded once, within 1e-6 of it."""
    lengths = torch.tensor([1, 2, 3, 5, 31, 223, 224, 225, 300, 447, 448, 500, 997])
    offsets = torch.arange(len(lengths)) % 3
    taps = 2 * max(int(lengths.max()), size) // size + 1
    weight, position = _filter_taps(lengths[None], offsets[None], size, taps)
    for k, (n, off) in enumerate(zip(lengths.tolist(), offsets.tolist())):
        dense = torch.zeros(size, n + off, dtype=torch.float64)
        dense.scatter_add_(1, position[0, k], weight[0, k].double())
        eye = torch.eye(n, dtype=torch.float64)[None, None]
        ref = F.interpolate(eye, size=(size, n), mode="bilinear", antialias=True)[0, 0]
        torch.testing.assert_close(dense[:, off:], ref, atol=1e-6, rtol=0)
        assert not dense[:, :off].any()


def test_device_traffic_of_aimagenet_crop_batch() -> None:
    """2 x 256 crops at 224 px on fake CUDA: 2.80 GB in 126 kernels, 36x the 77 MB output (the
    gather of padded crops through an int64 index that this replaced: 27.2 GB, 353x, in 1236
    kernels). Most of it is the float16 copies that the matrix products need (see the module
    docstring). One host->device copy (the crops' metadata), none back, no host sync."""
    sizes, source, boxes = imagenet_crop_batch()
    size = 224
    with fake_cuda() as trace:
        images = [torch.empty((3, h, w), dtype=torch.uint8, device="cuda") for h, w in sizes]
        with trace.region("crop_resize"):
            out = crop_resize(images, source, boxes, size)
    assert out.shape == (512, size, size, 3) and out.device.type == "cuda"
    output_bytes = out.numel()
    assert trace.nbytes("crop_resize") <= 38 * output_bytes, trace.summary("crop_resize")
    assert trace.kernels("crop_resize") <= 130, trace.summary("crop_resize")
    problems = trace.problems("crop_resize")
    assert [(op.kind, op.where.split(" in ")[-1]) for op in problems] == [("h2d", "crop_resize")], (
        trace.report("crop_resize")
    )
    assert problems[0].nbytes == 5 * 4 * len(boxes)  # five int32 per crop


@pytest.mark.cuda
def test_realistic_batch_on_the_gpu() -> None:
    """float16 tensor-core products: within two levels of torchvision on the CPU (float16's
    11-bit mantissa at pixel values up to 255.5, in the intermediate and the result)."""
    sizes, source, boxes = imagenet_crop_batch(images_per_batch=32)
    images = [TF.gaussian_blur(im, [5, 5]) for im in _noise(sizes, seed=3)]
    out = crop_resize([im.cuda() for im in images], source, boxes, 224).cpu()
    _assert_matches_torchvision(images, source, boxes, out, 224, tolerance=2)
