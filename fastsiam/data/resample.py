"""Batched crop-and-resize of differently sized images on any device, without per-image kernels.

The nvjpeg backend decodes a batch into a list of ``[3, H_i, W_i]`` tensors of different sizes
and needs two resized crops of each. Looping over them would launch a few kernels per image;
instead the images are concatenated into one flat buffer, every crop is gathered into a padded
``[n, 3, h, w]`` block, and the resize is two batched matrix products with per-crop
interpolation matrices, ``Ry @ crop @ Rx^T`` (separable resampling, as in PIL's and torch's
antialiased resize). The number of kernels depends on the batch's memory footprint, not on its
length; on a GPU the products run on tensor cores in float16.

The interpolation matrices are those of torch's ``interpolate(mode="bilinear",
antialias=True)`` (the triangle filter widened by the downscale factor, from PIL), so a view
matches ``torchvision.transforms.v2.functional.resized_crop(..., antialias=True)`` up to
rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

GATHER_BUDGET = (
    1 << 24
)  # elements of one chunk's padded crops (the int64 index is 8x that in bytes)


def interpolation_matrices(
    lengths: torch.Tensor, size: int, padded: int, dtype: torch.dtype
) -> torch.Tensor:
    """``[n, size, padded]`` antialiased bilinear weights from ``lengths[i]`` inputs to ``size``.

    Output ``o`` of crop ``i`` is centred at ``(o + 0.5) * lengths[i] / size`` in input
    coordinates; input ``j`` (centred at ``j + 0.5``) gets the triangle filter's weight at
    their distance over ``max(scale, 1)``; weights beyond ``lengths[i]`` are zero and each row
    sums to one.
    """
    length = lengths.to(torch.float64)[:, None, None]
    scale = length / size
    centre = (
        torch.arange(size, dtype=torch.float64, device=lengths.device)[None, :, None] + 0.5
    ) * scale
    j = torch.arange(padded, dtype=torch.float64, device=lengths.device)[None, None, :] + 0.5
    w = (1.0 - (j - centre).abs() / scale.clamp(min=1.0)).clamp(min=0.0)
    w = torch.where(j < length, w, torch.zeros((), dtype=w.dtype, device=w.device))
    return (w / w.sum(dim=2, keepdim=True)).to(dtype)


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
        budget: elements of padded crops gathered per chunk (bounds the temporary memory).

    Returns:
        ``out``; ``out.permute(0, 3, 1, 2)`` is the channels_last ``[n, 3, size, size]`` batch.
    """
    device = images[0].device
    n = len(boxes)
    if out is None:
        out = torch.empty((n, size, size, 3), dtype=torch.uint8, device=device)
    heights = np.array([im.shape[1] for im in images], dtype=np.int64)
    widths = np.array([im.shape[2] for im in images], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(3 * heights * widths)[:-1]])
    flat = torch.cat([im.reshape(-1) for im in images])
    source = np.asarray(source, dtype=np.int64)
    boxes = np.asarray(boxes, dtype=np.int64)
    # Per crop: flat offset, plane size, row stride, top, left, height, width.
    meta = np.stack(
        [
            offsets[source],
            heights[source] * widths[source],
            widths[source],
            boxes[:, 0],
            boxes[:, 1],
            boxes[:, 2],
            boxes[:, 3],
        ],
        axis=1,
    )
    meta_dev = torch.from_numpy(meta).to(device, non_blocking=True)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    start = 0
    for stop, bh, bw in _chunks(boxes[:, 2], boxes[:, 3], budget):
        m = meta_dev[start:stop]
        off, plane, stride, top, left, h, w = (m[:, k] for k in range(7))
        ys = torch.minimum(torch.arange(bh, device=device)[None, :], h[:, None] - 1) + top[:, None]
        xs = torch.minimum(torch.arange(bw, device=device)[None, :], w[:, None] - 1) + left[:, None]
        channel = torch.arange(3, device=device)[None, :, None, None] * plane[:, None, None, None]
        index = (
            off[:, None, None, None]
            + channel
            + (ys * stride[:, None])[:, None, :, None]
            + xs[:, None, None, :]
        )
        crops = flat[index].to(dtype)  # [c, 3, bh, bw]; rows/columns past a crop repeat its edge
        ry = interpolation_matrices(h, size, bh, dtype)  # [c, size, bh]
        rx = interpolation_matrices(w, size, bw, dtype)  # [c, size, bw]
        resized = torch.matmul(torch.matmul(ry[:, None], crops), rx[:, None].transpose(-1, -2))
        out[start:stop].copy_(resized.round_().clamp_(0, 255).permute(0, 2, 3, 1))
        start = stop
    return out


def _chunks(heights: np.ndarray, widths: np.ndarray, budget: int) -> list[tuple[int, int, int]]:
    """Consecutive runs of crops whose padded blocks fit the budget: (stop, max h, max w)."""
    runs = []
    start, bh, bw = 0, 0, 0
    for i, (h, w) in enumerate(zip(heights.tolist(), widths.tolist())):
        nh, nw = max(bh, h), max(bw, w)
        if i > start and 3 * (i + 1 - start) * nh * nw > budget:
            runs.append((i, bh, bw))
            start, nh, nw = i, h, w
        bh, bw = nh, nw
    runs.append((len(heights), bh, bw))
    return runs


__all__ = ["crop_resize", "interpolation_matrices"]
