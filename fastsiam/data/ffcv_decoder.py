"""FFCV decoder operations: decode each JPEG once, cut two random resized crops from it
(training) or one center crop (evaluation), and report the JPEGs that do not decode.

SimSiam (Chen & He, CVPR 2021) needs two views of every image. Stock FFCV gets a second view
only through a second pipeline on the same field, which decodes the JPEG a second time; the
decode is most of the per-image cost, so that nearly halves throughput. This operation
decodes into its scratch buffer once and writes both crops, resized with FFCV's own
``resize_crop`` (OpenCV, INTER_AREA), into one uint8 output buffer. The flip and the colour
augmentations are left to the device (:mod:`fastsiam.augment`), where they are batched and
cheap (FFCV's CPU flip copies every image once more).

The batch buffer is filled view-major: FFCV allocates ``[B, 2, S, S, 3]`` (its shapes are per
sample), but the memory holds ``[2B, S, S, 3]`` (every first view, then every second), one
contiguous NHWC block, i.e. the channels_last ``[2B, 3, S, S]`` views of a
:class:`~fastsiam.data.TwoViewBatch` without a copy. Read it with :func:`two_views`.

Crops come from :mod:`fastsiam.data.crops`, a counter-based generator keyed by
(seed, epoch, sample, view), so they are reproducible whatever the thread schedule. The
compiled decoder reads the epoch from a one-element array at run time (FFCV freezes the
decoder's Python state into constants at compile time, and recompiling every epoch would
cost seconds); :meth:`TwoCropDecoder.set_epoch` writes it before an epoch starts.

Damaged JPEGs: FFCV's own decoders ignore libjpeg-turbo's status, so a JPEG it refuses (or
decodes with "corrupt data" warnings) goes into the batch as whatever the scratch buffer held.
These decoders check it: such a sample's views are black and its flag in :attr:`failed` (one
byte per sample, written through its address like the epoch cell, since FFCV compiles arrays
in as read-only constants) is set; the loader reads the flags of each batch it hands out and
applies ``on_corrupt``. :class:`CenterCropDecoder` exists for that check: its box is FFCV's
``CenterCropRGBImageDecoder``'s (:func:`fastsiam.data.crops.center_crop_boxes`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import numba
import numpy as np
import torch
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.libffcv import ctypes_imdecode, ctypes_memcopy, ctypes_resize
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State

from fastsiam.data.crops import eval_crop_fraction, scalar_kernels, seed_key

VIEWS = 2


class TwoCropDecoder(Operation):
    """Decoder for an ``RGBImageField``: two RandomResizedCrops per decoded image.

    Output: a uint8 batch buffer of FFCV shape ``[B, 2, S, S, 3]`` holding ``[2, B, S, S, 3]``
    (view-major, see :func:`two_views`). Works on JPEG and raw samples and on datasets of
    varying image sizes (the scratch buffer fits the largest).

    Args:
        output_size: side ``S`` of both crops.
        scale: range of a crop's area as a fraction of the image's (SimSiam: 0.2-1).
        ratio: range of a crop's aspect ratio, width / height.
        seed: the run's seed; with the epoch, the sample index and the view it fixes a crop.

    Attributes:
        failed: uint8 per sample of the file, set to 1 by the decoder when a JPEG does not
            decode (its views are then black); the loader reads and clears it.
    """

    views = VIEWS
    center = False  # the evaluation box instead of random crops (CenterCropDecoder)

    def __init__(
        self,
        output_size: int,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        seed: int = 0,
    ):
        super().__init__()
        self.output_size = int(output_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.seed = int(seed)
        # Read by the compiled code at the start of every batch (see the module docstring).
        self._epoch_cell = np.zeros(1, dtype=np.int64)
        self.failed = np.zeros(0, dtype=np.uint8)
        # The byte the compiled code copies into a flag. Like the cells above it lives as long
        # as the decoder: FFCV may generate the code more than once and run an older copy.
        self._one = np.ones(1, dtype=np.uint8)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose crops the next batches get; call before the epoch's iterator starts."""
        self._epoch_cell[0] = epoch

    def declare_state_and_memory(
        self, previous_state: State
    ) -> tuple[State, tuple[AllocationQuery, ...]]:
        s = self.output_size
        # uint64: the product of two uint16 maxima overflows numpy's default int on some platforms.
        max_pixels = np.uint64(self.metadata["height"].max()) * np.uint64(
            self.metadata["width"].max()
        )
        out_shape = (self.views, s, s, 3) if self.views > 1 else (s, s, 3)
        u8 = np.dtype("<u1")
        if len(self.failed) != len(self.metadata):
            self.failed = np.zeros(len(self.metadata), dtype=np.uint8)
        return (
            replace(previous_state, jit_mode=True, shape=out_shape, dtype=u8),
            (AllocationQuery(out_shape, u8), AllocationQuery((max_pixels * np.uint64(3),), u8)),
        )

    def generate_code(self) -> Callable:
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        step, crop_box = _compiled_kernels()
        # FFCV's C functions, called through ctypes directly: FFCV's Python wrappers, compiled
        # as numba dispatchers with literal arguments, corrupt numba's overload table and make
        # a later compilation in FFCV's loading thread fail.
        imdecode_c, resize_c = ctypes_imdecode, ctypes_resize
        jpg = IMAGE_MODES["jpg"]
        run_key = seed_key(self.seed)
        epoch_address = self._epoch_cell.ctypes.data
        scale_lo, scale_hi = self.scale
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        ratio_lo, ratio_hi = min(self.ratio), max(self.ratio)
        s = self.output_size
        views_per_image, center = self.views, self.center
        fraction = eval_crop_fraction(s)
        failed_address = np.uint64(self.failed.ctypes.data)
        one_address = self._one.ctypes.data

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, scratch = my_storage
            count = len(batch_indices)
            views = destination[:count].reshape(views_per_image, count, s, s, 3)
            epoch = np.zeros(1, dtype=np.int64)
            ctypes_memcopy(epoch_address, epoch.ctypes.data, 8)
            epoch_key = step(run_key, np.uint64(epoch[0]))
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    buffer = scratch[dst_ix]
                    status = imdecode_c(
                        image_data.ctypes.data,
                        image_data.size,
                        height,
                        width,
                        buffer.ctypes.data,
                        height,
                        width,
                        0,
                        0,
                        1,
                        1,
                        False,
                        False,
                    )
                    if status != 0:  # libjpeg-turbo refused it or reported corrupt data
                        ctypes_memcopy(one_address, failed_address + np.uint64(source_ix), 1)
                        for view in range(views_per_image):
                            views[view, dst_ix] = 0
                        continue
                    image = buffer[: 3 * height * width].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                sample_key = step(epoch_key, np.uint64(source_ix))
                for view in range(views_per_image):
                    if center:
                        h = max(int(min(height, width) * fraction), 1)
                        top, left, w = (int(height) - h) // 2, (int(width) - h) // 2, h
                    else:
                        top, left, h, w = crop_box(
                            step(sample_key, np.uint64(view)),
                            int(height),
                            int(width),
                            scale_lo,
                            scale_hi,
                            log_lo,
                            log_hi,
                            ratio_lo,
                            ratio_hi,
                        )
                    out = views[view, dst_ix]
                    resize_c(
                        0,
                        image.ctypes.data,
                        height,
                        width,
                        top,
                        top + h,
                        left,
                        left + w,
                        out.ctypes.data,
                        s,
                        s,
                    )
            return destination[:count]

        decode.is_parallel = True
        return decode


class CenterCropDecoder(TwoCropDecoder):
    """The evaluation decoder: one view per image, the central square of side
    ``floor(short side * eval_crop_fraction(S))`` resized to ``S`` (FFCV's
    ``CenterCropRGBImageDecoder`` box and resize), with the damaged-JPEG check of
    :class:`TwoCropDecoder`. Output: FFCV shape ``[B, S, S, 3]``."""

    views = 1
    center = True

    def __init__(self, output_size: int):
        super().__init__(output_size)


@functools.cache
def _compiled_kernels():
    # Compiled once per process and shared by every decoder (numba caches by signature).
    return scalar_kernels(numba.njit(nogil=True))


def two_views(batch: torch.Tensor) -> torch.Tensor:
    """The views of a :class:`TwoCropDecoder` batch (any device) as one contiguous NHWC
    ``[2B, S, S, 3]`` block, view-major: a view of ``batch``'s memory (``view`` rather than
    ``reshape``, so a layout that would need a copy fails loudly); ``.permute(0, 3, 1, 2)``
    makes it a channels_last ``[2B, 3, S, S]`` tensor without a copy."""
    n, _, s = batch.shape[:3]
    return batch.view(VIEWS * n, s, s, 3)


__all__ = ["CenterCropDecoder", "TwoCropDecoder", "two_views"]
