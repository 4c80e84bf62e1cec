"""Batched crop-and-resize of differently sized images on any device, without per-image kernels.

The nvjpeg backend decodes a batch into a list of ``[3, H_i, W_i]`` tensors of different sizes
and needs two resized crops of each. Looping over them would launch a few kernels per image;
instead the crops are resized in a few chunks of a fixed number of kernels each, by separable
resampling (as PIL's and torch's antialiased resize): two batched matrix products
``Ry @ window @ Rx^T`` with per-crop interpolation matrices, on tensor cores in float16 on a
GPU.

The gather decides the device traffic (the padded crops gathered through an int64 index that
this replaced moved some 350 times the output's bytes per batch). Each crop is cut as a view
of its image, a *window* of its chunk's common size ``[hb, 3, wb]`` around the crop, and one
``torch.cat`` of the chunk's views is the gather: CUDA's cat copies strided inputs in batched
launches, so only the windows are read and no index is built. A window's columns start left of
its crop where the crop ends near its image's right edge, so a chunk may be no wider than its
narrowest image; rows below an image's bottom are a zero-strided view of a single zero. Pixels
of a window outside its crop get zero weight: ``Ry`` and ``Rx`` hold each crop's weights at
its offsets in its window. Crops are sorted by width and cut into chunks in that order, so the
windows fit them closely; one indexed copy at the end restores the given order.

The weights are those of torch's ``interpolate(mode="bilinear", antialias=True)`` (the
triangle filter widened by the downscale factor, from PIL): at most ``taps`` per output pixel,
computed once per batch in that compact form and scattered into each chunk's dense matrices.
Adding 0.5 to the pixels as they become floating point makes the last cast to uint8, which
truncates, round to nearest (the weights of every output sum to one). A view equals
``torchvision.transforms.v2.functional.resized_crop(..., antialias=True)`` up to rounding.

What is left of the traffic (``tests/test_resample.py`` counts it on fake CUDA) is mostly the
floor of any such pipeline of torch ops, several times the output: matrix products take no
uint8, so each window is read as uint8, written and read again as float16, and the first
product's result and the float16 output are written and read once each. The fused kernel
that reads each window once is :mod:`fastsiam.data.resample_kernel` (CUDA; the nvjpeg
backend's default on a GPU); this module is its fallback and the path on any other device.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch

GATHER_BUDGET = 1 << 24  # elements of one chunk's uint8 windows (bounds the temporary memory)


def crop_resize(
    images: Sequence[torch.Tensor],
    source: np.ndarray,
    boxes: np.ndarray,
    size: int,
    out: torch.Tensor | None = None,
    budget: int = GATHER_BUDGET,
) -> torch.Tensor:
    """Resized crops of uint8 ``[3, H, W]`` images as uint8 NHWC ``[n, size, size, 3]``.

    Args:
        images: the decoded images, all on one device.
        source: int ``[n]``, the image each crop is cut from.
        boxes: int ``[n, 4]`` crop boxes (top, left, height, width) inside their images.
        size: output side.
        out: optional NHWC uint8 destination (``[n, size, size, 3]``, contiguous).
        budget: elements of a chunk's uint8 windows (bounds the temporary memory).

    Returns:
        ``out``; ``out.permute(0, 3, 1, 2)`` is the channels_last ``[n, 3, size, size]`` batch.
    """
    device = images[0].device
    n = len(boxes)
    if out is None:
        out = torch.empty((n, size, size, 3), dtype=torch.uint8, device=device)
    boxes = np.asarray(boxes, dtype=np.int64)
    order = np.argsort(boxes[:, 3], kind="stable")
    src = np.asarray(source, dtype=np.int64)[order]
    top, left, h, w = boxes[order].T
    image_h = np.array([im.shape[1] for im in images], dtype=np.int64)[src]
    image_w = np.array([im.shape[2] for im in images], dtype=np.int64)[src]
    runs = _chunks(h, w, image_w, budget)
    counts = np.diff([0] + [stop for stop, _, _ in runs])
    window_h = np.repeat([bh for _, bh, _ in runs], counts).astype(np.int64)
    window_w = np.repeat([bw for _, _, bw in runs], counts).astype(np.int64)
    rows = np.minimum(window_h, image_h)  # image rows in each window; zeros below them
    row0 = np.minimum(top, image_h - rows)
    col0 = np.minimum(left, image_w - window_w)
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.arange(n)
    # The only host->device copy: per crop (sorted) its height and width and their offsets in
    # its window; per output crop its place in sorted order.
    meta = np.stack([h, top - row0, w, left - col0, inverse]).astype(np.int32)
    meta_dev = torch.from_numpy(meta).to(device, non_blocking=True)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    taps = 2 * max(int(h.max(initial=1)), int(w.max(initial=1)), size) // size + 1
    weight, position = _filter_taps(meta_dev[0:4:2], meta_dev[1:4:2], size, taps)
    weight = weight.to(dtype)
    zero8 = torch.zeros((), dtype=torch.uint8, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)
    result = torch.empty_like(out)  # in sorted order
    cuts = zip(src.tolist(), rows.tolist(), row0.tolist(), col0.tolist())
    start = 0
    for stop, bh, bw in runs:
        c = stop - start
        windows = []
        for s, r, y, x in itertools.islice(cuts, c):
            image = images[s]
            s_c, s_y, s_x = image.stride()
            # image[:, y:y + r, x:x + bw].permute(1, 0, 2), as one view
            offset = image.storage_offset() + y * s_y + x * s_x
            windows.append(image.as_strided((r, 3, bw), (s_y, s_c, s_x), offset))
            if r < bh:
                windows.append(zero8.expand(bh - r, 3, bw))
        gathered = torch.cat(windows)  # [c * bh, 3, bw]
        pixels = torch.empty((c, bh, 3 * bw), dtype=dtype, device=device)
        torch.add(gathered.view(c, bh, 3 * bw), 0.5, out=pixels)
        # Out of place onto an expanded zero: each dense matrix is only written, once.
        ry = torch.scatter_add(
            zero.expand(c, size, bh), 2, position[0, start:stop], weight[0, start:stop]
        )
        rx = torch.scatter_add(
            zero.expand(c, size, bw), 2, position[1, start:stop], weight[1, start:stop]
        )
        if bw <= bh:  # the smaller intermediate: [size, 3, bw] rows first, else [bh, 3, size]
            rows_done = torch.bmm(ry, pixels)
            resized = torch.bmm(rows_done.view(c, size * 3, bw), rx.mT)
        else:
            cols_done = torch.bmm(pixels.view(c, bh * 3, bw), rx.mT)
            resized = torch.bmm(ry, cols_done.view(c, bh, 3 * size))
        # [c, size, 3, size] (row, channel, column) to NHWC; the cast truncates (see above).
        result[start:stop].copy_(resized.view(c, size, 3, size).transpose(2, 3))
        start = stop
    # Back to the given order with aten's index (what ``result[inverse]`` calls), not
    # index_select, whose CPU kernel copies uint8 rows some 30x slower.
    return torch.ops.aten.index.Tensor_out(result, [meta_dev[4]], out=out)


def _filter_taps(
    lengths: torch.Tensor, offsets: torch.Tensor, size: int, taps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Antialiased bilinear weights from ``lengths`` inputs to ``size`` outputs, compactly.

    ``lengths`` and ``offsets`` are int ``[d, n]`` (d dimensions of n crops). Returns float32
    weights and int64 positions, ``[d, n, size, taps]``. As in torch: output ``o`` is centred at
    ``c = (o + 0.5) * length / size``; with ``support = max(length / size, 1)`` it takes
    inputs ``j`` from ``floor(c - support + 0.5)`` on, input ``j`` (centred at ``j + 0.5``) with
    the triangle filter's weight ``1 - |j + 0.5 - c| / support``, none past the crop, and its
    weights sum to one. Distances are integers over ``2 * size`` here, so a weight is rounded
    once (float32 centres near 500 px would be off by 1e-5). The position of input ``j`` is
    ``offset + j``, clamped into the crop where the weight is zero.
    """
    device = lengths.device
    length = lengths[..., None, None]
    # c, support and distances times 2 * size: integers
    support = 2 * torch.clamp(length, min=size)
    centre = (2 * torch.arange(size, dtype=torch.int32, device=device)[:, None] + 1) * length
    first = torch.div(centre - support + size, 2 * size, rounding_mode="floor").clamp_(min=0)
    j = first + torch.arange(taps, dtype=torch.int32, device=device)
    distance = torch.add(size - centre, j, alpha=2 * size).abs_()
    weight = (1.0 - distance / support).clamp_(min=0.0)
    weight = torch.where(j < length, weight, 0.0)
    weight /= weight.sum(dim=-1, keepdim=True)
    last = (length + offsets[..., None, None] - 1).long()
    position = torch.minimum(
        (first + offsets[..., None, None]).long() + torch.arange(taps, device=device), last
    )
    return weight, position


def _chunks(
    heights: np.ndarray, widths: np.ndarray, image_widths: np.ndarray, budget: int
) -> list[tuple[int, int, int]]:
    """Consecutive runs of the width-sorted crops that share a window: (stop, rows, columns).

    A run ends where its windows would exceed the budget or be wider than one of its images.
    """
    runs = []
    start, bh, bw, narrowest = 0, 0, 0, math.inf
    for i, (h, w, iw) in enumerate(zip(heights.tolist(), widths.tolist(), image_widths.tolist())):
        nh, nw, nn = max(bh, h), max(bw, w), min(narrowest, iw)
        if i > start and (nw > nn or 3 * (i + 1 - start) * nh * nw > budget):
            runs.append((i, bh, bw))
            start, nh, nw, nn = i, h, w, iw
        bh, bw, narrowest = nh, nw, nn
    if len(heights):
        runs.append((len(heights), bh, bw))
    return runs


__all__ = ["crop_resize"]
