"""The contract between every loader backend and the rest of fastsiam.

Training loaders yield :class:`TwoViewBatch`; evaluation loaders (``split="val"``) yield
:class:`EvalBatch`. Views are ``[B, 3, H, W]`` tensors in channels_last memory format on the
training device. A backend that leaves augmentation to the device hands over ``uint8`` crops;
the PIL reference in its ``full`` mode hands over already-augmented, normalized ``float32``
views, and the device-side augmentation passes floating views through untouched
(see :mod:`fastsiam.augment`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class TwoViewBatch(NamedTuple):
    """Two random views of the same B images, and their labels (int64 ``[B]``)."""

    view1: Tensor
    view2: Tensor
    label: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = True) -> TwoViewBatch:
        return TwoViewBatch(*(to_device(t, device, non_blocking) for t in self))


class EvalBatch(NamedTuple):
    """One deterministic view (resize + center crop) of B images, and their labels."""

    view: Tensor
    label: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = True) -> EvalBatch:
        return EvalBatch(*(to_device(t, device, non_blocking) for t in self))


def to_device(t: Tensor, device: torch.device | str, non_blocking: bool = True) -> Tensor:
    """Move to ``device``; 4-D image tensors also become channels_last."""
    t = t.to(device, non_blocking=non_blocking)
    if t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t
