"""The contract between every loader backend and the rest of fastsiam.

Training loaders yield :class:`TwoViewBatch`; evaluation loaders (``split="val"``) yield
:class:`EvalBatch`. Images are ``[N, 3, H, W]`` tensors in channels_last memory format on the
training device: a training batch holds both views of its B images in one ``[2B, 3, H, W]``
tensor (view-major), an evaluation batch one view ``[B, 3, H, W]``. A backend that leaves
augmentation to the device hands over ``uint8`` crops; the PIL reference in its ``full`` mode
hands over already-augmented, normalized ``float32`` views, and the device-side augmentation
passes floating views through untouched (see :mod:`fastsiam.augment`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class _TwoViewFields(NamedTuple):
    views: Tensor
    label: Tensor
    draws: Tensor


class TwoViewBatch(_TwoViewFields):
    """Two random views of the same B images in one tensor, their labels (int64 ``[B]``), and
    the device augmentation's random numbers for each view (float32 ``[2B, k]``, or ``[2B, 0]``).

    ``views`` is ``[2B, 3, H, W]``, view-major: rows ``[:B]`` are the images' first views,
    rows ``[B:]`` their second views, both in the order of ``label``. One tensor, because the
    augmentation and the captured step treat both views as one batch: loaders write both crops
    into one buffer, and nothing downstream copies them together again. :attr:`view1` and
    :attr:`view2` are slices of it (no copy).

    A subclass of the field tuple, since a NamedTuple cannot define ``__new__``: the check of
    the shapes runs on every construction (shape metadata only, no device sync).

    ``draws`` (view-major, as ``views``) come from :func:`fastsiam.data.crops.view_uniforms`: a
    function of (seed, epoch, sample, view) alone, so a sample is augmented the same whatever
    batch, rank or world size it lands in. DALI's ``webdataset`` reader (it picks its samples
    itself), the synthetic backend (made-up data) and pil's ``full`` mode (augmented in PIL
    already) leave it empty (``[2B, 0]``, the default), and the augmentation then draws on the
    device.
    """

    __slots__ = ()

    def __new__(cls, views: Tensor, label: Tensor, draws: Tensor | None = None) -> TwoViewBatch:
        if views.dim() != 4 or views.shape[0] % 2 or label.shape != (views.shape[0] // 2,):
            raise ValueError(
                "TwoViewBatch: expected views [2B, C, H, W] (every first view, then every "
                f"second view) and labels [B], got {list(views.shape)} and {list(label.shape)}"
            )
        if draws is None:
            draws = torch.empty((views.shape[0], 0), dtype=torch.float32, device=views.device)
        elif draws.dim() != 2 or draws.shape[0] != views.shape[0] or draws.dtype != torch.float32:
            raise ValueError(f"TwoViewBatch: expected float32 draws [2B, k] = [{views.shape[0]}, k], "
                             f"got {draws.dtype} {list(draws.shape)}")
        return super().__new__(cls, views, label, draws)

    @classmethod
    def from_pair(cls, view1: Tensor, view2: Tensor, label: Tensor, draws: Tensor | None = None) -> TwoViewBatch:
        """A batch from two separate ``[B, 3, H, W]`` views, concatenated (one copy; a
        channels_last pair stays channels_last). For tests and callers that truly hold two
        tensors; loaders write both views into one tensor instead."""
        return cls(torch.cat([view1, view2]), label, draws)

    @property
    def view1(self) -> Tensor:
        """The first views, ``[B, 3, H, W]``: a slice of :attr:`views`."""
        return self.views[: self.views.shape[0] // 2]

    @property
    def view2(self) -> Tensor:
        """The second views, ``[B, 3, H, W]``: a slice of :attr:`views`."""
        return self.views[self.views.shape[0] // 2 :]

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
